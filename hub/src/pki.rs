//! The fleet's PKI: a CA, the hub's server certificate, and one certificate per device.
//!
//! ```text
//! DIR/ca.pem  DIR/ca-key.pem            CA (key mode 0600)
//! DIR/hub.pem DIR/hub-key.pem           hub server cert: SANs localhost, 127.0.0.1, --san ...
//! DIR/devices/{id}/cert.pem, key.pem    device client cert: subject O = device id, CN = device id
//! DIR/hubs/{name}/cert.pem, key.pem     hub replica's client cert for an external broker:
//!                                       CN = O = "hub:{name}"
//! ```
//!
//! The device id is the certificate subject's O (organization) field: that is the form the
//! broker-side tenant check (rumqttd's `validate-tenant-prefix`) reads, and the one the hub's
//! gateway reads. It is the CN too, which is what an external broker takes as the user name
//! (Mosquitto's `use_identity_as_username`, EMQX's `peer_cert_as_username = cn`), and the
//! ACL ties the topics `fleet/v1/{user}/...` to it. A hub replica's identity has a colon,
//! which no device id can have, so no device certificate can ever carry a hub's rights.
//! Keys are written to files with mode 0600 and never printed.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use fleetsync_protocol::topic::validate_device_id;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// What went wrong making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The device id is not usable in a topic.
    #[error("device id {0:?}: must be 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadDeviceId(String),
    /// Refusing to overwrite.
    #[error("{0} exists; refusing to overwrite (remove it first)")]
    Exists(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_path_buf())
        } else {
            PkiError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn dn(cn: &str, o: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, o);
    dn
}

/// Paths `pki init` wrote.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// CA certificate.
    pub ca: PathBuf,
    /// Hub certificate.
    pub hub_cert: PathBuf,
    /// Hub key.
    pub hub_key: PathBuf,
}

/// Creates a CA and a hub server certificate in `dir`.
pub fn init(dir: &Path, extra_sans: &[String]) -> Result<PkiPaths, PkiError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = dn("fleetsync CA", "fleetsync");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2044, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(extra_sans.iter().cloned());
    let hub_key = KeyPair::generate()?;
    let mut hub = CertificateParams::new(sans)?;
    hub.distinguished_name = dn("fleetsync-hub", "fleetsync");
    hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    hub.not_before = rcgen::date_time_ymd(2024, 1, 1);
    hub.not_after = rcgen::date_time_ymd(2034, 1, 1);
    let issuer = Issuer::new(ca, &ca_key);
    let hub_cert = hub.signed_by(&hub_key, &issuer)?;

    let paths = PkiPaths {
        ca: dir.join("ca.pem"),
        hub_cert: dir.join("hub.pem"),
        hub_key: dir.join("hub-key.pem"),
    };
    for p in [
        &paths.ca,
        &dir.join("ca-key.pem"),
        &paths.hub_cert,
        &paths.hub_key,
    ] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    write_file(&paths.ca, &ca_cert.pem(), false)?;
    write_file(&paths.hub_key, &hub_key.serialize_pem(), true)?;
    write_file(&paths.hub_cert, &hub_cert.pem(), false)?;
    Ok(paths)
}

/// The user name (certificate CN) of hub replica `name` at an external broker.
pub fn hub_identity(name: &str) -> String {
    format!("hub:{name}")
}

/// Issues hub replica `name`'s client certificate (for an external broker) into
/// `dir/hubs/{name}/`. Each replica has its own: the broker takes the identity as the
/// client id, so two replicas with one certificate would push each other off.
pub fn issue_hub(dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    validate_device_id(name).map_err(|_| PkiError::BadDeviceId(name.to_string()))?;
    let out = dir.join("hubs").join(name);
    issue_client(
        dir,
        &hub_identity(name),
        &out,
        rcgen::date_time_ymd(2034, 1, 1).into(),
    )?;
    Ok(out)
}

/// Names of the hub replicas issued in `dir` (`dir/hubs/*/cert.pem`), sorted.
pub fn hub_names(dir: &Path) -> Result<Vec<String>, PkiError> {
    let hubs = dir.join("hubs");
    let mut names = Vec::new();
    let entries = match fs::read_dir(&hubs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(io(&hubs)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(&hubs))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().join("cert.pem").is_file() && validate_device_id(&name).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Issues a client certificate for `device` into `dir/devices/{device}/`.
pub fn issue_device(dir: &Path, device: &str) -> Result<PathBuf, PkiError> {
    issue_device_until(dir, device, rcgen::date_time_ymd(2034, 1, 1).into())
}

/// [`issue_device`] with a certificate that expires at `not_after` (a device being
/// retired, or a test of expiry).
pub fn issue_device_until(
    dir: &Path,
    device: &str,
    not_after: std::time::SystemTime,
) -> Result<PathBuf, PkiError> {
    validate_device_id(device).map_err(|_| PkiError::BadDeviceId(device.to_string()))?;
    let out = dir.join("devices").join(device);
    issue_client(dir, device, &out, not_after)?;
    Ok(out)
}

/// Issues a client certificate with subject CN = O = `identity` into `out/`.
fn issue_client(
    dir: &Path,
    identity: &str,
    out: &Path,
    not_after: std::time::SystemTime,
) -> Result<(), PkiError> {
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io(&ca_pem_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(identity, identity);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = time::OffsetDateTime::from(not_after);
    let cert = params.signed_by(&key, &issuer)?;

    fs::create_dir_all(out).map_err(io(out))?;
    write_file(&out.join("key.pem"), &key.serialize_pem(), true)?;
    write_file(&out.join("cert.pem"), &cert.pem(), false)?;
    Ok(())
}

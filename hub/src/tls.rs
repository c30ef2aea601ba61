//! TLS for device connections: TLS 1.3 only, a client certificate from the fleet CA
//! required, and the device id read from the certificate subject's O field.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Loading certificates or building the TLS config failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// rustls refused the material.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The device listener's TLS: the rustls config and the verifier of device certificates
/// in it, which the gateway runs again on a resumed session (rustls checks the client
/// certificate on full handshakes only; a session ticket carries the certificate it was
/// issued with, however old).
#[derive(Debug, Clone)]
pub struct DeviceTls {
    /// The server config.
    pub config: Arc<rustls::ServerConfig>,
    /// Checks a device certificate chain against the fleet CA at a given time.
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// The device listener's TLS: its server config and the verifier in it.
pub fn device_tls(ca: &Path, cert: &Path, key: &Path) -> Result<DeviceTls, TlsError> {
    let verifier = client_verifier(ca)?;
    let config = Arc::new(config_with(verifier.clone(), cert, key)?);
    Ok(DeviceTls { config, verifier })
}

fn client_verifier(
    ca: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

fn config_with(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => pem_err(
                key,
                format!("not the private key of the certificate {}", cert.display()),
            ),
            other => TlsError::Rustls(other),
        })?;
    // Stateless session tickets (keys rotated by the ticketer, never stored): a device
    // that reconnects to the same hub process resumes without a certificate verify and
    // signature on either side, which is what keeps a reconnect storm (a cell tower back,
    // a hub under load) from feeding on itself. The resumed session carries the client
    // certificate it was opened with, so the device id is the same as on the full
    // handshake. A hub restart starts with new keys: the next connection is full again.
    // The gateway checks that certificate's validity again on every resumed session
    // (`broker::gateway`), and closes a connection when its certificate expires.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(cfg)
}

/// TLS 1.3 client config of the hub's own connection to an external broker: trust `ca`
/// (the broker's), present the hub's certificate. The agent has the same helper for its
/// device certificate (`fleetsync_agent::client_tls`); both behave alike.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| pem_err(ca, e))?;
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => pem_err(
                key,
                format!("not the private key of the certificate {}", cert.display()),
            ),
            other => TlsError::Rustls(other),
        })
}

/// When a certificate stops being valid (its notAfter), if it can be read.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The device id in a client certificate: the subject's O field, which must be a valid
/// device id.
pub fn device_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let org = parsed.subject().iter_organization().next()?.as_str().ok()?;
    fleetsync_protocol::topic::validate_device_id(org).ok()?;
    Some(org.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub's client TLS (for an external broker) takes what the agent's takes
    /// (`fleetsync_agent::client_tls`) and refuses what it refuses: a key that is not the
    /// certificate's is named, so is a missing file.
    #[test]
    fn client_tls_loads_a_hub_certificate_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        crate::pki::init(&pki, &[]).unwrap();
        let a = crate::pki::issue_hub(&pki, "a").unwrap();
        let b = crate::pki::issue_hub(&pki, "b").unwrap();
        let ca = pki.join("ca.pem");
        let cfg = client_tls(&ca, &a.join("cert.pem"), &a.join("key.pem")).unwrap();
        assert!(cfg.client_auth_cert_resolver.has_certs());
        let wrong = client_tls(&ca, &a.join("cert.pem"), &b.join("key.pem")).unwrap_err();
        assert!(wrong.to_string().contains("not the private key"), "{wrong}");
        assert!(
            wrong
                .to_string()
                .contains(&b.join("key.pem").display().to_string())
        );
        let missing = client_tls(
            &pki.join("nope.pem"),
            &a.join("cert.pem"),
            &a.join("key.pem"),
        )
        .unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
    }
}

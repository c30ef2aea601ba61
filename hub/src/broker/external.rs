//! Configuration for an external broker that enforces what the embedded gateway enforces:
//! `fleetsync-hub broker-config mosquitto --pki DIR` writes a Mosquitto 2 config and ACL.
//!
//! ```text
//! listener  TLS 1.3, client certificate required (signed by DIR/ca.pem), the broker's
//!           server certificate DIR/hub.pem (its SANs: `pki init --san`)
//! identity  certificate CN = user name = client id (so no client can take over another's
//!           session)
//! ACL       device D:     write fleet/v1/D/up, blob, status; read fleet/v1/D/down
//!           hub:NAME:     read fleet/v1/+/up, blob (shared), status; write fleet/v1/+/down
//!           anyone else:  nothing
//! ```
//!
//! Hub identities are the certificates under `DIR/hubs/` (`pki issue-hub`); run the
//! command again after issuing one and reload the broker (`kill -HUP`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fleetsync_protocol::topic::{Channel, Layout};

use crate::pki;

/// What the Mosquitto config is made of.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// The PKI directory (`pki init`, `pki issue-hub`).
    pub pki: PathBuf,
    /// Listener address (`0.0.0.0`, or one interface).
    pub bind: String,
    /// Listener port.
    pub port: u16,
    /// Where the ACL file is (the config names it).
    pub acl_path: PathBuf,
    /// Where the broker keeps its sessions and queued messages (persistence).
    pub data_dir: PathBuf,
    /// The shared subscription group of the replicas (`[broker] shared_group`).
    pub shared_group: String,
    /// Largest packet (`[broker] max_packet_bytes` plus MQTT headers).
    pub max_packet_bytes: usize,
    /// The account Mosquitto switches to when started as root (its default: `mosquitto`);
    /// it must be able to read the broker's key.
    pub user: Option<String>,
}

/// A generated broker configuration.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `mosquitto.conf`.
    pub config: String,
    /// The ACL file.
    pub acl: String,
    /// The hub identities the ACL lets in.
    pub hubs: Vec<String>,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The Mosquitto 2 config and ACL for `opts`.
pub fn mosquitto(opts: &MosquittoOptions) -> Result<Generated, pki::PkiError> {
    let pki_dir = absolute(&opts.pki);
    for f in ["ca.pem", "hub.pem", "hub-key.pem"] {
        let p = pki_dir.join(f);
        if !p.is_file() {
            return Err(pki::PkiError::Io {
                path: p,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found (run `fleetsync-hub pki init` first)",
                ),
            });
        }
    }
    let hubs = pki::hub_names(&pki_dir)?
        .iter()
        .map(|n| pki::hub_identity(n))
        .collect::<Vec<_>>();
    let mut c = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        c,
        "# Mosquitto 2 for fleetsync hub replicas, written by `fleetsync-hub broker-config mosquitto`.\n\
         # Devices and hubs log in with their certificates only; the ACL ties each device's\n\
         # topics to its certificate. Reload after a new `pki issue-hub`: kill -HUP <pid>.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         {user}\n\
         listener {port} {bind}\n\
         protocol mqtt\n\
         tls_version tlsv1.3\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         # The certificate's CN is the user name (device id, or hub:NAME) and the client id.\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         \n\
         acl_file {acl}\n\
         \n\
         # Sessions (the devices' subscriptions, downlinks waiting for an offline device)\n\
         # survive a broker restart.\n\
         persistence true\n\
         persistence_location {data}/\n\
         autosave_interval 30\n\
         # Messages queued per client past those in flight: a device's downlinks while it\n\
         # is offline (a few), and a hub replica's uplinks while its database round is\n\
         # slow (thousands a second; past the limit the broker drops them and the devices\n\
         # send them again after their ack timeout). QoS 1 messages in flight per client.\n\
         max_queued_messages 50000\n\
         max_inflight_messages 1000\n\
         max_packet_size {packet}\n\
         # Devices send a will (status offline); retained statuses give every hub presence.\n\
         retain_available true",
        port = opts.port,
        bind = opts.bind,
        user = match &opts.user {
            Some(u) => format!(
                "# Started as root, run as this account (it reads the key below).\nuser {u}\n"
            ),
            None => String::new(),
        },
        ca = pki_dir.join("ca.pem").display(),
        cert = pki_dir.join("hub.pem").display(),
        key = pki_dir.join("hub-key.pem").display(),
        acl = absolute(&opts.acl_path).display(),
        data = absolute(&opts.data_dir).display(),
        packet = opts.max_packet_bytes + 1024,
    );
    Ok(Generated {
        acl: acl(&hubs, &opts.shared_group),
        config: c,
        hubs,
    })
}

/// The ACL: devices by pattern on their user name, hubs by name.
fn acl(hubs: &[String], group: &str) -> String {
    let l = Layout::External;
    let own = |ch: Channel| {
        l.topic("DEVICE", ch)
            .map(|t| t.replace("DEVICE", "%u"))
            .unwrap_or_default()
    };
    let mut a = String::new();
    let _ = writeln!(
        a,
        "# fleetsync ACL, written by `fleetsync-hub broker-config mosquitto`.\n\
         # A device (user name = certificate CN = device id) writes only its own up, blob\n\
         # and status, and reads only its own down.\n\
         pattern write {up}\n\
         pattern write {blob}\n\
         pattern write {status}\n\
         pattern read {down}",
        up = own(Channel::Up),
        blob = own(Channel::Blob),
        status = own(Channel::Status),
        down = own(Channel::Down),
    );
    if hubs.is_empty() {
        let _ = writeln!(
            a,
            "\n# No hub certificates in the PKI yet (`fleetsync-hub pki issue-hub --name NAME`)."
        );
    }
    for hub in hubs {
        let _ = writeln!(
            a,
            "\n# Hub replica {hub}: every device's uplinks (shared in group {group}), every\n\
             # status, and every device's downlinks.\n\
             user {hub}\n\
             topic read {up}\n\
             topic read {blob}\n\
             topic read {status}\n\
             topic write {down}",
            up = l.hub_filter(Channel::Up),
            blob = l.hub_filter(Channel::Blob),
            status = l.hub_filter(Channel::Status),
            down = l.hub_filter(Channel::Down),
        );
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_ties_devices_to_their_topics_and_names_each_hub() {
        let acl = acl(&["hub:a".to_string(), "hub:b".to_string()], "g");
        for line in [
            "pattern write fleet/v1/%u/up",
            "pattern write fleet/v1/%u/blob",
            "pattern write fleet/v1/%u/status",
            "pattern read fleet/v1/%u/down",
            "user hub:a",
            "user hub:b",
            "topic read fleet/v1/+/up",
            "topic write fleet/v1/+/down",
        ] {
            assert!(acl.lines().any(|l| l == line), "{line:?} missing:\n{acl}");
        }
        // No rule lets a device read another's downlinks or write another's uplinks.
        assert!(
            !acl.lines()
                .any(|l| l.starts_with("topic") && !l.contains("fleet/v1/+/"))
        );
        assert!(!acl.contains("pattern read fleet/v1/+"));
    }

    /// deploy/replicas/emqx-acl.conf grants the same: the hub filters of the topic layout,
    /// each device its own topics.
    #[test]
    fn the_emqx_example_matches_the_topic_layout() {
        let emqx = include_str!("../../../deploy/replicas/emqx-acl.conf");
        let l = Layout::External;
        for f in [
            format!("$share/fleetsync-hub/{}", l.hub_filter(Channel::Up)),
            format!("$share/fleetsync-hub/{}", l.hub_filter(Channel::Blob)),
            l.hub_filter(Channel::Status).to_string(),
            l.hub_filter(Channel::Down).to_string(),
        ] {
            assert!(emqx.contains(&format!("\"{f}\"")), "{f} missing");
        }
        for ch in [Channel::Up, Channel::Blob, Channel::Status, Channel::Down] {
            let own = l.topic("X", ch).unwrap().replace("X", "${username}");
            assert!(emqx.contains(&format!("\"{own}\"")), "{own} missing");
        }
        assert!(emqx.trim_end().ends_with("{deny, all}."));
    }
}

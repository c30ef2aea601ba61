//! The hub's configuration: one TOML file, a few environment overrides, unknown keys
//! refused with the key named. `fleetsync-hub config example` prints [`EXAMPLE`].
//!
//! Relative paths are resolved against the directory of the config file, so a config
//! next to its `pki/` folder works from any working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A complete, commented config that runs as is after `fleetsync-hub pki init --dir pki`.
pub const EXAMPLE: &str = r#"# fleetsync-hub configuration. Unknown keys are errors.
# Environment overrides: FLEETSYNC_HUB_OPERATOR_TOKEN, FLEETSYNC_HUB_HTTP_LISTEN,
# FLEETSYNC_HUB_MQTT_LISTEN, FLEETSYNC_HUB_STORE_PATH.
# Relative paths are relative to this file's directory.

[mqtt]
# Devices connect here: MQTT over TLS 1.3 with a client certificate issued by `ca`
# (`fleetsync-hub pki issue-device`). The certificate's O field is the device id.
listen = "0.0.0.0:8883"
ca = "pki/ca.pem"
cert = "pki/hub.pem"
key = "pki/hub-key.pem"
# A client that has not finished its TLS handshake by then is dropped.
handshake_timeout_ms = 5000
# Devices connected at once; further connections are refused until one leaves.
max_connections = 10000
# Largest MQTT packet a device may send (event batches, blob chunks).
max_packet_bytes = 262144

[http]
# Operator API, /healthz, /readyz, /metrics.
listen = "127.0.0.1:8080"

[store]
# The hub's sled store. Events are acked to devices only once they are durable here.
path = "data/hub"

[auth]
# Bearer token of the operator API. Set it from a secret store via
# FLEETSYNC_HUB_OPERATOR_TOKEN rather than writing it here in production.
operator_token = "change-me-operator-token"
"#;

/// Hub configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device-facing MQTT.
    pub mqtt: MqttConfig,
    /// HTTP APIs.
    pub http: HttpConfig,
    /// Storage.
    pub store: StoreConfig,
    /// Credentials.
    pub auth: AuthConfig,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Where devices connect (TLS).
    pub listen: SocketAddr,
    /// CA that signs device certificates (PEM).
    pub ca: PathBuf,
    /// The hub's server certificate chain (PEM).
    pub cert: PathBuf,
    /// The hub's private key (PEM).
    pub key: PathBuf,
    /// TLS handshake deadline.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Most device connections at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest MQTT packet accepted from a device.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address of the HTTP APIs.
    pub listen: SocketAddr,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled store.
    pub path: PathBuf,
}

/// `[auth]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token of the operator API.
    pub operator_token: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("operator_token", &"<redacted>")
            .finish()
    }
}

fn default_handshake_timeout_ms() -> u64 {
    5000
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_packet_bytes() -> usize {
    256 * 1024
}

impl MqttConfig {
    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid, has an unknown key or a bad value.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`, applies environment overrides, resolves relative paths, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `FLEETSYNC_HUB_*` overrides from `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let addr = |k: &str, v: String| {
            v.parse::<SocketAddr>()
                .map_err(|e| ConfigError::Invalid(format!("{k}={v:?}: expected host:port ({e})")))
        };
        if let Some(v) = get("FLEETSYNC_HUB_OPERATOR_TOKEN") {
            self.auth.operator_token = v;
        }
        if let Some(v) = get("FLEETSYNC_HUB_HTTP_LISTEN") {
            self.http.listen = addr("FLEETSYNC_HUB_HTTP_LISTEN", v)?;
        }
        if let Some(v) = get("FLEETSYNC_HUB_MQTT_LISTEN") {
            self.mqtt.listen = addr("FLEETSYNC_HUB_MQTT_LISTEN", v)?;
        }
        if let Some(v) = get("FLEETSYNC_HUB_STORE_PATH") {
            self.store.path = v.into();
        }
        Ok(())
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.mqtt.ca,
            &mut self.mqtt.cert,
            &mut self.mqtt.key,
            &mut self.store.path,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks values a type cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.operator_token.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.operator_token must be at least 16 characters".into(),
            ));
        }
        if self.mqtt.max_packet_bytes < 16 * 1024 {
            return Err(ConfigError::Invalid(
                "mqtt.max_packet_bytes must be at least 16384".into(),
            ));
        }
        if self.mqtt.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "mqtt.max_connections must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_minimal_config_defaults_the_rest() {
        let cfg = Config::parse(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        let minimal = r#"
            [mqtt]
            listen = "127.0.0.1:8883"
            ca = "ca.pem"
            cert = "hub.pem"
            key = "hub-key.pem"
            [http]
            listen = "127.0.0.1:8080"
            [store]
            path = "data"
            [auth]
            operator_token = "0123456789abcdef"
        "#;
        let cfg = Config::parse(minimal).unwrap();
        assert_eq!(cfg.mqtt.max_packet_bytes, 256 * 1024);
        assert_eq!(cfg.mqtt.handshake_timeout(), Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = EXAMPLE.replace("[http]", "[http]\nlisten_port = 3");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.contains("listen_port"), "{e}");
    }
}

#[cfg(test)]
mod deploy_example {
    /// deploy/hub.toml is what `fleetsync-hub config example` prints.
    #[test]
    fn deploy_copy_is_the_example() {
        assert_eq!(
            include_str!("../../deploy/hub.toml"),
            super::EXAMPLE,
            "regenerate deploy/hub.toml"
        );
    }
}

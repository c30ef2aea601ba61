//! The agent's configuration: one TOML file, environment overrides, unknown keys refused
//! with the key named. `fleetsync-agent config example` prints [`EXAMPLE`].
//!
//! Relative paths are resolved against the directory of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A complete, commented config.
pub const EXAMPLE: &str = r#"# fleetsync-agent configuration. Unknown keys are errors.
# Environment overrides: FLEETSYNC_AGENT_API_TOKEN, FLEETSYNC_AGENT_HUB_URL.
# Relative paths are relative to this file's directory.

# This vehicle's id: must match the O field of the certificate below.
device_id = "V1"

[hub]
# The hub's device endpoint (TLS 1.3, client certificate).
url = "mqtts://localhost:8883"
ca = "pki/ca.pem"
cert = "pki/devices/V1/cert.pem"
key = "pki/devices/V1/key.pem"
# A batch the hub has not acked by then is sent again.
ack_timeout_ms = 10000
# "embedded" (default): url is a hub's own device endpoint. "external": url is a broker
# (Mosquitto, EMQX) in front of hub replicas; the agent then keeps a persistent session
# there (downlinks wait for it while it is offline) and publishes its presence.
# broker = "embedded"

[store]
# Events stay here until the hub acks them.
path = "data/agent"
# What the store's directory may take of the gateway's flash, which sled's working
# segments pass by about 2 MiB (more under heavy load; see the README). POD photos count at their size, events at 4x theirs (what
# sled's files take per live byte). Past it, old GPS fixes are dropped (declared as a
# Gap event); POD, geofence, trip and exception events are never dropped: new ones are
# refused with 507 instead.
quota_bytes = 67108864

[api]
# The driver's tablet calls this over the gateway's LAN.
listen = "127.0.0.1:8090"
# Bearer token of the local API (FLEETSYNC_AGENT_API_TOKEN overrides it).
token = "change-me-driver-token"
# Connections open at once (more wait in the listen backlog, holding none of the agent's
# file descriptors, which the store and the uplink need), and the time a client has to
# send a request's headers (a stalled or idle client is closed after it).
max_connections = 64
header_timeout_ms = 10000
# A POD upload that sends no byte for this long (a tablet gone off the Wi-Fi mid-upload)
# is answered 408 and its upload place, quota reservation and partial file are freed.
body_timeout_ms = 30000

[gps]
# Where fixes come from (leave out for no GPS):
#   gpsd://HOST:PORT                     gpsd's JSON protocol (the usual way on Linux gateways)
#   nmea+serial:///dev/ttyUSB0?baud=9600 NMEA 0183 from a serial receiver
#   nmea+tcp://HOST:PORT                 NMEA 0183 from a TCP socket
#   nmea+file:///path/log.nmea?pace=realtime|max   replay a captured log
source = "gpsd://127.0.0.1:2947"

[ignition]
# A file holding 1 (on) or 0 (off), e.g. a GPIO value file; polled twice a second.
# Leave the section out when the gateway has no ignition input.
# path = "/sys/class/gpio/gpio17/value"

[geofence]
# Hysteresis and timing of stop fences (metres, milliseconds, metres per second).
margin_m = 25.0
enter_debounce_ms = 10000
exit_debounce_ms = 10000
dwell_ms = 300000
stationary_speed_mps = 0.5
moving_speed_mps = 2.0
stationary_after_ms = 30000

[health]
# A health event (backlog, disk use, link statistics) every this many seconds.
interval_s = 60

[uplink]
# Events per batch, and batches awaiting a hub ack at once.
batch_max_events = 60
max_inflight = 32
# A partly filled telemetry batch waits at most this long.
batch_max_delay_ms = 1000
"#;

/// Agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This vehicle's id.
    pub device_id: String,
    /// The hub.
    pub hub: HubConfig,
    /// The store.
    pub store: StoreSection,
    /// The local API.
    pub api: ApiConfig,
    /// GPS input.
    #[serde(default)]
    pub gps: GpsConfig,
    /// Ignition input.
    #[serde(default)]
    pub ignition: IgnitionConfig,
    /// Geofence thresholds.
    #[serde(default)]
    pub geofence: crate::geofence::GeofenceConfig,
    /// Health events.
    #[serde(default)]
    pub health: HealthConfig,
    /// Batching.
    #[serde(default)]
    pub uplink: UplinkConfig,
}

/// `[hub]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `mqtts://host:port`.
    pub url: String,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Device certificate (PEM).
    pub cert: PathBuf,
    /// Device key (PEM).
    pub key: PathBuf,
    /// Resend deadline.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Which broker `url` is: the hub's embedded one, or an external broker in front of
    /// hub replicas (another topic layout, a persistent session, presence messages).
    #[serde(default)]
    pub broker: BrokerKind,
}

/// `[hub] broker`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// The hub's own broker (`/tenants/{id}/...`).
    #[default]
    Embedded,
    /// An external broker (`fleet/v1/{id}/...`), shared by hub replicas.
    External,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Directory.
    pub path: PathBuf,
    /// The bound of the store directory on disk (events at 4x their logical bytes).
    pub quota_bytes: u64,
}

/// `[api]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer token.
    pub token: String,
    /// Connections open at once.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Longest wait for the next bytes of a POD upload's body.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
}

fn default_api_max_connections() -> usize {
    64
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

fn default_body_timeout_ms() -> u64 {
    30_000
}

impl ApiConfig {
    /// The server loop's limits.
    pub fn limits(&self) -> crate::api::serve::ServeLimits {
        crate::api::serve::ServeLimits {
            max_connections: self.max_connections,
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms),
        }
    }

    /// Longest wait for the next bytes of a POD upload's body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("body_timeout_ms", &self.body_timeout_ms)
            .finish()
    }
}

/// `[gps]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpsConfig {
    /// Source URL; none = no GPS.
    pub source: Option<String>,
}

/// `[ignition]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgnitionConfig {
    /// File holding 1 or 0.
    pub path: Option<PathBuf>,
}

/// `[health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between health events.
    #[serde(default = "default_health_interval_s")]
    pub interval_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_s: default_health_interval_s(),
        }
    }
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Events per batch.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Batches in flight.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Longest wait to fill a telemetry batch.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            batch_max_events: default_batch_max_events(),
            max_inflight: default_max_inflight(),
            batch_max_delay_ms: default_batch_max_delay_ms(),
        }
    }
}

fn default_ack_timeout_ms() -> u64 {
    10_000
}
fn default_health_interval_s() -> u64 {
    60
}
fn default_batch_max_events() -> usize {
    60
}
fn default_max_inflight() -> usize {
    32
}
fn default_batch_max_delay_ms() -> u64 {
    1000
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML, unknown key or bad value.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// toml's message (names the key and line).
        message: String,
    },
    /// Out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads, overrides from the environment, resolves paths, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Ok(v) = std::env::var("FLEETSYNC_AGENT_API_TOKEN") {
            cfg.api.token = v;
        }
        if let Ok(v) = std::env::var("FLEETSYNC_AGENT_HUB_URL") {
            cfg.hub.url = v;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.hub.ca,
            &mut cfg.hub.cert,
            &mut cfg.hub.key,
            &mut cfg.store.path,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fleetsync_protocol::topic::validate_device_id(&self.device_id)
            .map_err(|e| ConfigError::Invalid(format!("device_id {:?}: {e}", self.device_id)))?;
        self.hub_addr()?;
        if self.api.token.len() < 16 {
            return Err(ConfigError::Invalid(
                "api.token must be at least 16 characters".into(),
            ));
        }
        if !(1..=4096).contains(&self.api.max_connections) {
            return Err(ConfigError::Invalid(format!(
                "api.max_connections = {}: must be from 1 to 4096 (keep it well below the process's file limit)",
                self.api.max_connections
            )));
        }
        if !(100..=600_000).contains(&self.api.header_timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "api.header_timeout_ms = {}: must be from 100 to 600000 (ms)",
                self.api.header_timeout_ms
            )));
        }
        if !(100..=600_000).contains(&self.api.body_timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "api.body_timeout_ms = {}: must be from 100 to 600000 (ms)",
                self.api.body_timeout_ms
            )));
        }
        if self.store.quota_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid(
                "store.quota_bytes must be at least 65536".into(),
            ));
        }
        if !(1..=fleetsync_protocol::limits::MAX_BATCH_EVENTS)
            .contains(&self.uplink.batch_max_events)
        {
            return Err(ConfigError::Invalid(format!(
                "uplink.batch_max_events must be 1 to {}",
                fleetsync_protocol::limits::MAX_BATCH_EVENTS
            )));
        }
        if !(1..=64).contains(&self.uplink.max_inflight) {
            return Err(ConfigError::Invalid(
                "uplink.max_inflight must be 1 to 64".into(),
            ));
        }
        if let Some(src) = &self.gps.source {
            src.parse::<crate::gps::GpsSource>()
                .map_err(|e| ConfigError::Invalid(format!("gps.source {src:?}: {e}")))?;
        }
        self.geofence
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.health.interval_s == 0 {
            return Err(ConfigError::Invalid(
                "health.interval_s must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Host and port of `hub.url`.
    pub fn hub_addr(&self) -> Result<(String, u16), ConfigError> {
        let bad = || {
            ConfigError::Invalid(format!(
                "hub.url {:?}: expected mqtts://host:port",
                self.hub.url
            ))
        };
        let rest = self.hub.url.strip_prefix("mqtts://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok((host.to_string(), port.parse().map_err(|_| bad())?))
    }

    /// The resend deadline.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.hub.ack_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_is_valid_and_unknown_keys_are_named() {
        let cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.hub_addr().unwrap(), ("localhost".to_string(), 8883));
        let e = toml::from_str::<Config>(&EXAMPLE.replace("[api]", "[api]\nport = 1")).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }

    #[test]
    fn minimal_config_runs_with_defaults() {
        let cfg: Config = toml::from_str(
            r#"
            device_id = "V9"
            [hub]
            url = "mqtts://127.0.0.1:8883"
            ca = "ca.pem"
            cert = "c.pem"
            key = "k.pem"
            [store]
            path = "d"
            quota_bytes = 1048576
            [api]
            listen = "127.0.0.1:0"
            token = "0123456789abcdef"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.uplink.batch_max_events, 60);
        assert_eq!(cfg.health.interval_s, 60);
        assert_eq!(cfg.api.body_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn body_timeout_out_of_range_is_named() {
        for bad in ["99", "600001"] {
            let text = EXAMPLE.replace(
                "body_timeout_ms = 30000",
                &format!("body_timeout_ms = {bad}"),
            );
            let cfg: Config = toml::from_str(&text).unwrap();
            let e = cfg.validate().unwrap_err();
            assert!(e.to_string().contains("api.body_timeout_ms"), "{e}");
        }
    }
}

#[cfg(test)]
mod deploy_example {
    /// deploy/agent.toml is what `fleetsync-agent config example` prints.
    #[test]
    fn deploy_copy_is_the_example() {
        assert_eq!(
            include_str!("../../deploy/agent.toml"),
            super::EXAMPLE,
            "regenerate deploy/agent.toml"
        );
    }
}

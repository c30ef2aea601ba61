//! The hub's configuration: one TOML file, a few environment overrides, unknown keys
//! refused with the key named. `fleetsync-hub config example` prints [`EXAMPLE`].
//!
//! Relative paths are resolved against the directory of the config file, so a config
//! next to its `pki/` folder works from any working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::{MAX_BLOB_BYTES, PartialBlobLimits};

/// A complete, commented config that runs as is after `fleetsync-hub pki init --dir pki`.
pub const EXAMPLE: &str = r#"# fleetsync-hub configuration. Unknown keys are errors.
# Environment overrides: FLEETSYNC_HUB_OPERATOR_TOKEN, FLEETSYNC_HUB_HTTP_LISTEN,
# FLEETSYNC_HUB_MQTT_LISTEN, FLEETSYNC_HUB_BROKER_URL, FLEETSYNC_HUB_STORE_PATH,
# FLEETSYNC_HUB_STORE_URL (either store override replaces the file's store choice).
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
# TLS handshakes in progress at once, and from one source address (an IPv6 /64): a
# budget of their own, so clients that connect and never finish a handshake cannot take
# the fleet's places. Past either, a new connection is closed at once. Vehicles behind
# one carrier NAT share a source address: handshakes take milliseconds, so 64 at once
# from one address is plenty for a fleet.
max_handshakes = 1024
max_handshakes_per_source = 64
# Largest MQTT packet a device may send (event batches, blob chunks).
max_packet_bytes = 262144

[broker]
# Where devices connect. "embedded" (the default): the hub's own broker, set up by [mqtt]
# above, for one hub process. "external": hub replicas share a broker (Mosquitto 2, EMQX,
# any MQTT 5 broker with shared subscriptions) and a PostgreSQL store; remove [mqtt]
# then. `fleetsync-hub broker-config mosquitto --pki pki` writes a Mosquitto config and
# ACL that tie each device's topics to its certificate.
# kind = "external"
# url = "mqtts://broker.example.net:8883"   # or FLEETSYNC_HUB_BROKER_URL
# ca = "pki/ca.pem"                          # signs the broker's server certificate
# cert = "pki/hubs/hub-a/cert.pem"           # `fleetsync-hub pki issue-hub --name hub-a`,
# key = "pki/hubs/hub-a/key.pem"             # one per replica: it is its client id too
# shared_group = "fleetsync-hub"             # replicas of a group split the devices' traffic
# max_packet_bytes = 262144

[http]
# Operator API, /healthz, /readyz, /metrics.
listen = "127.0.0.1:8080"
# Connections open at once (more wait in the listen backlog), and the time a client has
# to send a request's headers (a stalled or idle client is closed after it).
max_connections = 1024
header_timeout_ms = 10000
# The hub's address as the ERP and partners reach it: links in their messages (a POD's
# evidence) start with it. Unset: those links are paths on whatever address they use.
# public_url = "https://hub.example.com"

[portal]
# The customer portal's API (/v1/portal), tracking links (/t/...) and POD image URLs
# (/p/...) are served on [http] listen.
# Keys that sign tracking links and POD image URLs (HMAC-SHA256), each a random secret
# of at least 32 characters. New links are signed with the first; links signed with any
# of them work. Rotate: put a new key first, drop the old one once its links expired
# (dropping a key revokes every link it signed). Unset: a random key per start (links
# die with the process and work on one replica only).
# link_keys = ["change-me-to-32-or-more-random-characters"]
# max_link_ttl_s = 2592000   # longest life of a tracking link
# pod_url_ttl_s = 600        # life of a signature or photo URL
# rate_per_s = 10            # requests a second per customer credential or link ...
# burst = 40                 # ... and at once (then 429 with Retry-After)
# poll_ms = 250              # the live stream reads the store this often at the latest
#                            # (at once on a commit it shows: this hub's, or via LISTEN)
# heartbeat_s = 15           # a comment on each open stream this often
# stream_buffer = 64         # changes a slow stream client may lag before it is dropped
# max_streams = 10000        # live streams open at once (then 503)

[store]
# Where the hub keeps events, devices, blobs and assignments. Events are acked to
# devices only once they are durable here. Exactly one of:
# - path: the embedded sled store, a directory on this machine (one hub process);
# - url:  PostgreSQL, shared by every hub process of the fleet, for example
#         url = "postgres://fleetsync@db.example.net:5432/fleetsync"
#   (the password from ~/.pgpass or the URL; migrations are applied at start).
path = "data/hub"
# PostgreSQL only: connections per hub process, and the longest a statement may run.
# pool_size = 16
# statement_timeout_ms = 30000
# Unfinished blob uploads (POD photos arrive in chunks): what one device may hold (its
# oldest uploads make room for newer ones; at least 33554432, one whole blob), and how
# long an upload with no new chunk is kept (agents send an unacknowledged blob again,
# whole).
# partial_blob_budget_bytes = 67108864
# partial_blob_ttl_s = 3600

[shipments]
# A shipment waiting this long (released but on no vehicle, dispatched but not
# acknowledged by the vehicle, delivered without a confirmed POD, in review) is listed at
# GET /v1/ops/shipments/stuck and counted in fleetsync_hub_shipments_stuck.
# stuck_after_s = 900
# Arrival estimates (ETA) of each open stop, from the vehicle's newest position: made
# every eta_interval_s; straight-line metres x eta_road_factor over the vehicle's recent
# speed, or eta_fallback_kmh while it stands still; eta_service_s at each stop before
# driving on. An EST milestone is recorded when an estimate moves by more than 5 minutes.
# eta_interval_s = 30
# eta_road_factor = 1.3
# eta_fallback_kmh = 30
# eta_service_s = 300
# The mapping tables (canonical state -> ERP status, portal status, webhook type) are
# built in (GET /v1/erp/mappings); to replace them, give every state a row:
# [shipments.mappings]
# version = "sap-2"
# [[shipments.mappings.states]]
# state = "POD_CONFIRMED"
# erp_status = "INVOICE_READY"
# portal_status = "Delivered"
# webhook_type = "shipment.pod_confirmed.v1"
# releases_billing = true
# (... one [[shipments.mappings.states]] per state)

# ERP connectors: each [[erp]] hears the shipments' milestones (DISPATCHED, DEPARTED,
# ARRIVED, DELIVERED, DELIVERY_FAILED, POD_CONFIRMED, RETURNED, ETA) as CloudEvents at
# POST {base_url}/events, each exactly once in effect: the Idempotency-Key header is the
# same on every retry, and the ERP answers 409 to a key it applied before. Order per
# shipment holds. Refused messages (4xx) wait as dead letters at GET /v1/ops/deadletters.
# [[erp]]
# name = "sap"
# base_url = "https://erp.example.net/fleetsync"
# auth_header_env = "FLEETSYNC_ERP_SAP_AUTH"   # or auth_header = "Bearer ..."
# rate_per_s = 10        # token bucket: requests a second ...
# burst = 10             # ... and at once
# timeout_ms = 10000
# max_attempts = 50      # then a dead letter; so is a row older than max_age_s
# max_age_s = 86400
# backoff_ms = 1000      # doubled each failure, full jitter, up to backoff_cap_ms
# backoff_cap_ms = 300000
# breaker_failures = 5   # failures in a row open the circuit breaker ...
# breaker_open_ms = 30000  # ... for this long, then one probe
# ca = "pki/erp-ca.pem"  # extra CA certificates for https (a private CA)

# Partner webhooks (Standard Webhooks): subscriptions are made at POST /v1/ops/webhooks;
# this table says how they are delivered.
[webhooks]
# When each attempt goes, in seconds after the one before (the first at once); after the
# last, a dead letter at GET /v1/ops/deadletters.
# retry_schedule_s = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
# timeout_ms = 15000
# rate_per_s = 50          # per subscription: token bucket rate ...
# burst = 20               # ... and size
# breaker_failures = 5     # failures in a row open a subscription's breaker ...
# breaker_open_ms = 30000  # ... for this long, then one probe
# rotation_overlap_s = 86400   # the old secret still signs this long after a rotation
# keep_delivered_s = 604800    # delivered messages kept for replays
# max_subscriptions = 1000
# Life of the signed signature/photo URLs in a POD_CONFIRMED delivery's evidence (the
# portal's [portal] link_keys sign them; set those on a real hub, or they die at restart).
# evidence_url_ttl_s = 604800
# Targets must be https:// and public; allow http:// and loopback/private addresses
# only in a lab:
# allow_insecure_targets = false

[auth]
# Bearer token of the operator API. Set it from a secret store via
# FLEETSYNC_HUB_OPERATOR_TOKEN rather than writing it here in production.
operator_token = "change-me-operator-token"
"#;

/// Hub configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where devices connect: the embedded broker or an external one (`[broker]`).
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Device-facing MQTT of the embedded broker (`[mqtt]`; absent with an external one).
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// HTTP APIs.
    pub http: HttpConfig,
    /// Storage.
    pub store: StoreConfig,
    /// Credentials.
    pub auth: AuthConfig,
    /// Shipments: when one counts as stuck, and the mapping tables.
    #[serde(default)]
    pub shipments: ShipmentsConfig,
    /// ERP connectors (`[[erp]]`): each hears the shipments' milestones through the outbox.
    #[serde(default)]
    pub erp: Vec<ErpConfig>,
    /// Partner webhooks (`[webhooks]`; the subscriptions are made at /v1/ops/webhooks).
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// The customer portal, tracking links and the live stream (`[portal]`).
    #[serde(default)]
    pub portal: crate::portal::PortalConfig,
}

/// Which broker devices connect to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// The hub's own (rumqttd behind the TLS gateway, `[mqtt]`): one hub process.
    #[default]
    Embedded,
    /// A broker (cluster) the hub replicas connect to as MQTT 5 clients.
    External,
}

/// `[broker]`: the embedded broker (default) or an external broker shared by replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `embedded` or `external`.
    #[serde(default)]
    pub kind: BrokerKind,
    /// External: `mqtts://host[:port]` (port 8883 if left out).
    pub url: Option<String>,
    /// External: the CA that signs the broker's server certificate (PEM).
    pub ca: Option<PathBuf>,
    /// External: this hub's client certificate (`fleetsync-hub pki issue-hub`).
    pub cert: Option<PathBuf>,
    /// External: its private key.
    pub key: Option<PathBuf>,
    /// External: the shared subscription group the replicas split device traffic in.
    #[serde(default = "default_shared_group")]
    pub shared_group: String,
    /// External: largest MQTT packet (a device's batch or blob chunk).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Embedded,
            url: None,
            ca: None,
            cert: None,
            key: None,
            shared_group: default_shared_group(),
            max_packet_bytes: default_max_packet_bytes(),
        }
    }
}

fn default_shared_group() -> String {
    "fleetsync-hub".to_string()
}

/// Where an external broker is, parsed from [`BrokerConfig::url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    /// Host name or address (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl BrokerConfig {
    /// The external broker's host and port, or why `url` is not `mqtts://host[:port]`.
    pub fn endpoint(&self) -> Result<BrokerEndpoint, String> {
        let url = self
            .url
            .as_deref()
            .ok_or("broker.url: required with kind = \"external\"")?;
        let rest = url.strip_prefix("mqtts://").ok_or_else(|| {
            format!("broker.url = {url:?}: expected mqtts://HOST[:PORT] (TLS is required)")
        })?;
        let rest = rest.trim_end_matches('/');
        let bad = || format!("broker.url = {url:?}: expected mqtts://HOST[:PORT]");
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal without a port: [::1]
            Some((h, p)) if !p.ends_with(']') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (rest, 8883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || port == 0 {
            return Err(bad());
        }
        Ok(BrokerEndpoint {
            host: host.to_string(),
            port,
        })
    }
}

/// `[webhooks]`: how partner webhooks are delivered (Standard Webhooks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// When each attempt goes, in seconds after the one before; the first goes at once
    /// (so the first entry is 0); after the last, a dead letter.
    #[serde(default = "default_webhook_schedule")]
    pub retry_schedule_s: Vec<f64>,
    /// Each request's deadline.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests a second to one subscription (token bucket rate) ...
    #[serde(default = "default_webhook_rate")]
    pub rate_per_s: f64,
    /// ... and at once (token bucket size; also the most in flight).
    #[serde(default = "default_webhook_burst")]
    pub burst: u32,
    /// Failures in a row that open a subscription's circuit breaker ...
    #[serde(default = "default_erp_breaker_failures")]
    pub breaker_failures: u32,
    /// ... for this long, then one probe.
    #[serde(default = "default_erp_breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// After a secret rotation the old secret signs too for this long.
    #[serde(default = "default_webhook_overlap_s")]
    pub rotation_overlap_s: u64,
    /// Delivered rows are kept this long for `POST /v1/ops/webhooks/{id}/replay`.
    #[serde(default = "default_webhook_keep_s")]
    pub keep_delivered_s: u64,
    /// Most subscriptions.
    #[serde(default = "default_webhook_max")]
    pub max_subscriptions: usize,
    /// Allow `http://` targets and loopback, private and link-local addresses (tests,
    /// a lab; never on a hub that operators outside the company can reach).
    #[serde(default)]
    pub allow_insecure_targets: bool,
    /// Life of the signed POD evidence URLs (`/p/<token>`) in POD_CONFIRMED deliveries: a
    /// partner has no credential, so the URL is the key; a replay signs new ones.
    #[serde(default = "default_evidence_url_ttl_s")]
    pub evidence_url_ttl_s: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            retry_schedule_s: default_webhook_schedule(),
            timeout_ms: default_webhook_timeout_ms(),
            rate_per_s: default_webhook_rate(),
            burst: default_webhook_burst(),
            breaker_failures: default_erp_breaker_failures(),
            breaker_open_ms: default_erp_breaker_open_ms(),
            rotation_overlap_s: default_webhook_overlap_s(),
            keep_delivered_s: default_webhook_keep_s(),
            max_subscriptions: default_webhook_max(),
            allow_insecure_targets: false,
            evidence_url_ttl_s: default_evidence_url_ttl_s(),
        }
    }
}

impl WebhooksConfig {
    /// Each subscription's rate and breaker settings.
    pub fn limits(&self) -> crate::outbox::worker::Limits {
        crate::outbox::worker::Limits {
            rate_per_s: self.rate_per_s,
            burst: self.burst,
            timeout_ms: self.timeout_ms,
            breaker_failures: self.breaker_failures,
            breaker_open_ms: self.breaker_open_ms,
        }
    }
}

fn default_webhook_schedule() -> Vec<f64> {
    // Standard Webhooks: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    vec![0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
}
fn default_webhook_timeout_ms() -> u64 {
    15_000
}
fn default_webhook_rate() -> f64 {
    50.0
}
fn default_webhook_burst() -> u32 {
    20
}
fn default_webhook_overlap_s() -> u64 {
    86_400
}
fn default_webhook_keep_s() -> u64 {
    7 * 86_400
}
fn default_webhook_max() -> usize {
    1_000
}
fn default_evidence_url_ttl_s() -> u64 {
    7 * 86_400
}

/// `[[erp]]`: one ERP the hub tells about milestones (`POST {base_url}/events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErpConfig {
    /// Its name (in outbox row ids, metrics and the dead-letter API).
    pub name: String,
    /// Where its event endpoint lives (`http://` or `https://`).
    pub base_url: String,
    /// The `Authorization` header's value, if it wants one.
    #[serde(default)]
    pub auth_header: Option<String>,
    /// The same from an environment variable (for secrets), named here.
    #[serde(default)]
    pub auth_header_env: Option<String>,
    /// Requests a second (token bucket rate).
    #[serde(default = "default_erp_rate")]
    pub rate_per_s: f64,
    /// Requests at once after a pause (token bucket size; also the most in flight).
    #[serde(default = "default_erp_burst")]
    pub burst: u32,
    /// Each request's deadline.
    #[serde(default = "default_erp_timeout_ms")]
    pub timeout_ms: u64,
    /// The mapping table version its messages use (the configured one if unset).
    #[serde(default)]
    pub mapping_version: Option<String>,
    /// A row is given up (dead letter) after this many attempts...
    #[serde(default = "default_erp_max_attempts")]
    pub max_attempts: u32,
    /// ... or when it is this old.
    #[serde(default = "default_erp_max_age_s")]
    pub max_age_s: u64,
    /// Backoff after the first failure; doubled each time, with full jitter...
    #[serde(default = "default_erp_backoff_ms")]
    pub backoff_ms: u64,
    /// ... up to this.
    #[serde(default = "default_erp_backoff_cap_ms")]
    pub backoff_cap_ms: u64,
    /// The circuit breaker opens after this many failures in a row...
    #[serde(default = "default_erp_breaker_failures")]
    pub breaker_failures: u32,
    /// ... for this long, then lets one probe through.
    #[serde(default = "default_erp_breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// A PEM file of extra CA certificates to trust for `https://` (a private CA).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_erp_rate() -> f64 {
    10.0
}
fn default_erp_burst() -> u32 {
    10
}
fn default_erp_timeout_ms() -> u64 {
    10_000
}
fn default_erp_max_attempts() -> u32 {
    50
}
fn default_erp_max_age_s() -> u64 {
    86_400
}
fn default_erp_backoff_ms() -> u64 {
    1_000
}
fn default_erp_backoff_cap_ms() -> u64 {
    300_000
}
fn default_erp_breaker_failures() -> u32 {
    5
}
fn default_erp_breaker_open_ms() -> u64 {
    30_000
}

impl ErpConfig {
    /// The `Authorization` header value: from the environment variable if one is named.
    pub fn authorization(&self) -> Result<Option<String>, ConfigError> {
        match &self.auth_header_env {
            Some(var) => std::env::var(var).map(Some).map_err(|_| {
                ConfigError::Invalid(format!(
                    "erp {:?}: auth_header_env names {var}, which is not set in the environment",
                    self.name
                ))
            }),
            None => Ok(self.auth_header.clone()),
        }
    }
}

/// `[shipments]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipmentsConfig {
    /// A shipment waiting this long in one of the stuck conditions is listed as stuck.
    #[serde(default = "default_stuck_after_s")]
    pub stuck_after_s: u64,
    /// Mapping tables replacing the built-in ones (`[shipments.mappings]`).
    #[serde(default)]
    pub mappings: Option<crate::shipments::Mappings>,
    /// Seconds between rounds of arrival estimates.
    #[serde(default = "default_eta_interval_s")]
    pub eta_interval_s: u64,
    /// Road distance over straight-line distance.
    #[serde(default = "default_eta_road_factor")]
    pub eta_road_factor: f64,
    /// Speed to plan with while a vehicle's recent speed is unknown or near zero (km/h).
    #[serde(default = "default_eta_fallback_kmh")]
    pub eta_fallback_kmh: u32,
    /// Seconds at each stop before driving on.
    #[serde(default = "default_eta_service_s")]
    pub eta_service_s: u64,
}

impl Default for ShipmentsConfig {
    fn default() -> Self {
        ShipmentsConfig {
            stuck_after_s: default_stuck_after_s(),
            mappings: None,
            eta_interval_s: default_eta_interval_s(),
            eta_road_factor: default_eta_road_factor(),
            eta_fallback_kmh: default_eta_fallback_kmh(),
            eta_service_s: default_eta_service_s(),
        }
    }
}

impl ShipmentsConfig {
    /// The estimate settings.
    pub fn eta(&self) -> crate::shipments::eta::EtaSettings {
        crate::shipments::eta::EtaSettings {
            road_factor: self.eta_road_factor,
            fallback_kmh: f64::from(self.eta_fallback_kmh),
            service_s: self.eta_service_s,
        }
    }
}

fn default_eta_interval_s() -> u64 {
    30
}

fn default_eta_road_factor() -> f64 {
    1.3
}

fn default_eta_fallback_kmh() -> u32 {
    30
}

fn default_eta_service_s() -> u64 {
    300
}

fn default_stuck_after_s() -> u64 {
    900
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
    /// Most TLS handshakes in progress.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Most TLS handshakes in progress from one source address.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
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
    /// Connections open at once.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// The hub's address as those outside reach it (`https://hub.example.com`, maybe with
    /// a path prefix): links in messages to the ERP and to webhook partners start with
    /// it. Unset: they are paths (`/v1/erp/blobs/...`) on the address the reader uses.
    #[serde(default)]
    pub public_url: Option<String>,
}

impl HttpConfig {
    /// The server loop's limits.
    pub fn limits(&self) -> crate::api::serve::ServeLimits {
        crate::api::serve::ServeLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
        }
    }
}

/// `[store]`: exactly one of `path` (sled) and `url` (PostgreSQL).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled store.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// PostgreSQL connection URL.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL connections per hub process.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Longest a PostgreSQL statement may run.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Most bytes of unfinished blob uploads one device may hold (its oldest uploads
    /// make room for newer ones).
    #[serde(default = "default_partial_blob_budget_bytes")]
    pub partial_blob_budget_bytes: u64,
    /// An unfinished blob upload that gets no chunk for this long is dropped.
    #[serde(default = "default_partial_blob_ttl_s")]
    pub partial_blob_ttl_s: u64,
    /// The outbox's sinks: each new fact a sink hears of gets one outbox row per sink, in
    /// the fact's write (set by the hub from its sinks, not read from the file).
    #[serde(skip)]
    pub outbox_sinks: Vec<String>,
}

impl StoreConfig {
    /// The sled store at `path` with the other settings at their defaults.
    pub fn sled(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: Some(path.into()),
            url: None,
            pool_size: default_pool_size(),
            statement_timeout_ms: default_statement_timeout_ms(),
            partial_blob_budget_bytes: default_partial_blob_budget_bytes(),
            partial_blob_ttl_s: default_partial_blob_ttl_s(),
            outbox_sinks: Vec::new(),
        }
    }

    /// The limits on unfinished blob uploads these settings give.
    pub fn partial_blob_limits(&self) -> PartialBlobLimits {
        PartialBlobLimits {
            budget_bytes: self.partial_blob_budget_bytes,
            ttl_ms: self.partial_blob_ttl_s.saturating_mul(1000),
        }
    }

    /// PostgreSQL at `url` with the other settings at their defaults.
    pub fn postgres(url: impl Into<String>) -> Self {
        StoreConfig {
            path: None,
            url: Some(url.into()),
            ..Self::sled("")
        }
    }
}

/// The URL without its password, for logs and messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("partial_blob_budget_bytes", &self.partial_blob_budget_bytes)
            .field("partial_blob_ttl_s", &self.partial_blob_ttl_s)
            .finish()
    }
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
fn default_http_max_connections() -> usize {
    1024
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_max_handshakes_per_source() -> usize {
    64
}
fn default_max_packet_bytes() -> usize {
    256 * 1024
}
fn default_pool_size() -> usize {
    16
}
fn default_partial_blob_budget_bytes() -> u64 {
    PartialBlobLimits::default().budget_bytes
}
fn default_partial_blob_ttl_s() -> u64 {
    PartialBlobLimits::default().ttl_ms / 1000
}
fn default_statement_timeout_ms() -> u64 {
    30_000
}

/// `[http] public_url` must be a base address: http(s), a host, no query or fragment.
fn check_public_url(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err("expected an http(s) address with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a base address has no query or fragment".into());
    }
    Ok(())
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
            let listen = addr("FLEETSYNC_HUB_MQTT_LISTEN", v)?;
            match self.mqtt.as_mut() {
                Some(m) => m.listen = listen,
                None => {
                    return Err(ConfigError::Invalid(
                        "FLEETSYNC_HUB_MQTT_LISTEN is set but the config has no [mqtt] (an external broker is used)".into(),
                    ));
                }
            }
        }
        if let Some(v) = get("FLEETSYNC_HUB_BROKER_URL") {
            self.broker.url = Some(v);
        }
        if let Some(v) = get("FLEETSYNC_HUB_STORE_PATH") {
            self.store.path = Some(v.into());
            self.store.url = None;
        }
        if let Some(v) = get("FLEETSYNC_HUB_STORE_URL") {
            self.store.url = Some(v);
            self.store.path = None;
        }
        Ok(())
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let store = self.store.path.as_mut();
        let mqtt = self
            .mqtt
            .as_mut()
            .map(|m| [&mut m.ca, &mut m.cert, &mut m.key])
            .into_iter()
            .flatten();
        let b = &mut self.broker;
        let broker = [b.ca.as_mut(), b.cert.as_mut(), b.key.as_mut()]
            .into_iter()
            .flatten();
        for p in mqtt.chain(broker).chain(store) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for ca in self.erp.iter_mut().filter_map(|e| e.ca.as_mut()) {
            if ca.is_relative() {
                *ca = base.join(&*ca);
            }
        }
    }

    /// `[broker]` and `[mqtt]` agree: the embedded broker needs `[mqtt]` and none of the
    /// external keys; an external one needs its URL and TLS material and no `[mqtt]`.
    fn validate_broker(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let b = &self.broker;
        match b.kind {
            BrokerKind::Embedded => {
                if self.mqtt.is_none() {
                    return bad("[mqtt] is required with the embedded broker (where devices connect, and its TLS material); or set [broker] kind = \"external\"".into());
                }
                for (key, set) in [
                    ("url", b.url.is_some()),
                    ("ca", b.ca.is_some()),
                    ("cert", b.cert.is_some()),
                    ("key", b.key.is_some()),
                ] {
                    if set {
                        return bad(format!(
                            "broker.{key} is for an external broker; set broker.kind = \"external\" or remove it"
                        ));
                    }
                }
            }
            BrokerKind::External => {
                if self.mqtt.is_some() {
                    return bad("[mqtt] configures the embedded broker; with broker.kind = \"external\" devices connect to the broker: remove [mqtt]".into());
                }
                b.endpoint().map_err(ConfigError::Invalid)?;
                for (key, set) in [
                    ("ca", b.ca.is_some()),
                    ("cert", b.cert.is_some()),
                    ("key", b.key.is_some()),
                ] {
                    if !set {
                        return bad(format!(
                            "broker.{key}: required with an external broker (`fleetsync-hub pki issue-hub` makes the hub's certificate)"
                        ));
                    }
                }
                let g = &b.shared_group;
                if g.is_empty()
                    || g.len() > 64
                    || !g
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                {
                    return bad(format!(
                        "broker.shared_group = {g:?}: 1 to 64 letters, digits, '-' or '_'"
                    ));
                }
                if !(16 * 1024..=16 << 20).contains(&b.max_packet_bytes) {
                    return bad(format!(
                        "broker.max_packet_bytes = {}: must be from 16384 to 16777216 (bytes)",
                        b.max_packet_bytes
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks values a type cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.operator_token.len() < 16 {
            return Err(ConfigError::Invalid(
                "auth.operator_token must be at least 16 characters".into(),
            ));
        }
        self.portal.validate().map_err(ConfigError::Invalid)?;
        let range = |key: &str, v: u64, lo: u64, hi: u64, unit: &str| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{key} = {v}: must be from {lo} to {hi}{unit}"
                )))
            }
        };
        self.validate_broker()?;
        if let Some(mqtt) = &self.mqtt {
            range(
                "mqtt.handshake_timeout_ms",
                mqtt.handshake_timeout_ms,
                100,
                60_000,
                " (ms)",
            )?;
            range(
                "mqtt.max_packet_bytes",
                mqtt.max_packet_bytes as u64,
                16 * 1024,
                16 << 20,
                " (bytes)",
            )?;
            range(
                "mqtt.max_connections",
                mqtt.max_connections as u64,
                1,
                1_000_000,
                "",
            )?;
            range(
                "mqtt.max_handshakes",
                mqtt.max_handshakes as u64,
                1,
                100_000,
                "",
            )?;
            range(
                "mqtt.max_handshakes_per_source",
                mqtt.max_handshakes_per_source as u64,
                1,
                mqtt.max_handshakes as u64,
                " (at most mqtt.max_handshakes)",
            )?;
        }
        range(
            "http.max_connections",
            self.http.max_connections as u64,
            1,
            100_000,
            "",
        )?;
        range(
            "http.header_timeout_ms",
            self.http.header_timeout_ms,
            100,
            600_000,
            " (ms)",
        )?;
        range(
            "store.partial_blob_budget_bytes",
            self.store.partial_blob_budget_bytes,
            u64::from(MAX_BLOB_BYTES),
            1 << 40,
            " (bytes; at least one whole blob)",
        )?;
        range(
            "store.partial_blob_ttl_s",
            self.store.partial_blob_ttl_s,
            10,
            30 * 86_400,
            " (s)",
        )?;
        range(
            "shipments.stuck_after_s",
            self.shipments.stuck_after_s,
            60,
            7 * 86_400,
            " (s)",
        )?;
        range(
            "shipments.eta_interval_s",
            self.shipments.eta_interval_s,
            1,
            3_600,
            " (s)",
        )?;
        range(
            "shipments.eta_fallback_kmh",
            u64::from(self.shipments.eta_fallback_kmh),
            1,
            200,
            " (km/h)",
        )?;
        range(
            "shipments.eta_service_s",
            self.shipments.eta_service_s,
            0,
            86_400,
            " (s)",
        )?;
        let mut names = std::collections::HashSet::new();
        for e in &self.erp {
            let bad = |what: &str| ConfigError::Invalid(format!("erp {:?}: {what}", e.name));
            if e.name.is_empty()
                || e.name.len() > 64
                || !e
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad("name: 1 to 64 letters, digits, '-' or '_'"));
            }
            if !names.insert(e.name.as_str()) {
                return Err(bad("name: two [[erp]] tables have it"));
            }
            if e.name == crate::outbox::webhooks::STAGING {
                return Err(bad(
                    "name: \"webhooks\" is the partner webhooks' own outbox",
                ));
            }
            if !(e.base_url.starts_with("http://") || e.base_url.starts_with("https://")) {
                return Err(bad(
                    "base_url: expected http://HOST[:PORT][/PATH] or https://...",
                ));
            }
            if e.auth_header.is_some() && e.auth_header_env.is_some() {
                return Err(bad("set auth_header or auth_header_env, not both"));
            }
            e.authorization()?;
            if !(e.rate_per_s > 0.0 && e.rate_per_s <= 10_000.0) {
                return Err(bad("rate_per_s: more than 0, at most 10000"));
            }
            range(
                &format!("erp.{}.burst", e.name),
                u64::from(e.burst),
                1,
                1_000,
                "",
            )?;
            range(
                &format!("erp.{}.timeout_ms", e.name),
                e.timeout_ms,
                100,
                300_000,
                " (ms)",
            )?;
            range(
                &format!("erp.{}.max_attempts", e.name),
                u64::from(e.max_attempts),
                1,
                1_000_000,
                "",
            )?;
            range(
                &format!("erp.{}.max_age_s", e.name),
                e.max_age_s,
                60,
                30 * 86_400,
                " (s)",
            )?;
            range(
                &format!("erp.{}.backoff_ms", e.name),
                e.backoff_ms,
                1,
                3_600_000,
                " (ms)",
            )?;
            range(
                &format!("erp.{}.backoff_cap_ms", e.name),
                e.backoff_cap_ms,
                e.backoff_ms,
                86_400_000,
                " (ms; at least backoff_ms)",
            )?;
            range(
                &format!("erp.{}.breaker_failures", e.name),
                u64::from(e.breaker_failures),
                1,
                10_000,
                "",
            )?;
            range(
                &format!("erp.{}.breaker_open_ms", e.name),
                e.breaker_open_ms,
                10,
                3_600_000,
                " (ms)",
            )?;
            let want = self
                .shipments
                .mappings
                .as_ref()
                .map_or(crate::shipments::Mappings::default().version, |m| {
                    m.version.clone()
                });
            if let Some(v) = &e.mapping_version
                && *v != want
            {
                return Err(bad(&format!(
                    "mapping_version {v:?}: the hub's mapping tables are version {want:?} ([shipments.mappings])"
                )));
            }
        }
        let w = &self.webhooks;
        let sched = &w.retry_schedule_s;
        if sched.is_empty()
            || sched.len() > 100
            || sched[0] != 0.0
            || sched.iter().any(|s| !(0.0..=7.0 * 86_400.0).contains(s))
        {
            return Err(ConfigError::Invalid(format!(
                "webhooks.retry_schedule_s = {sched:?}: expected 1 to 100 waits in seconds (0 to 604800), the first 0 (the first attempt goes at once), e.g. [0, 5, 300, 1800, 7200, 18000, 36000, 36000]"
            )));
        }
        range("webhooks.timeout_ms", w.timeout_ms, 100, 300_000, " (ms)")?;
        if !(w.rate_per_s > 0.0 && w.rate_per_s <= 10_000.0) {
            return Err(ConfigError::Invalid(
                "webhooks.rate_per_s: more than 0, at most 10000".into(),
            ));
        }
        range("webhooks.burst", u64::from(w.burst), 1, 1_000, "")?;
        range(
            "webhooks.breaker_failures",
            u64::from(w.breaker_failures),
            1,
            10_000,
            "",
        )?;
        range(
            "webhooks.breaker_open_ms",
            w.breaker_open_ms,
            10,
            3_600_000,
            " (ms)",
        )?;
        range(
            "webhooks.rotation_overlap_s",
            w.rotation_overlap_s,
            0,
            30 * 86_400,
            " (s)",
        )?;
        range(
            "webhooks.keep_delivered_s",
            w.keep_delivered_s,
            0,
            365 * 86_400,
            " (s)",
        )?;
        range(
            "webhooks.max_subscriptions",
            w.max_subscriptions as u64,
            1,
            100_000,
            "",
        )?;
        range(
            "webhooks.evidence_url_ttl_s",
            w.evidence_url_ttl_s,
            1,
            90 * 86_400,
            " (s)",
        )?;
        if let Some(u) = &self.http.public_url {
            check_public_url(u).map_err(|e| {
                ConfigError::Invalid(format!(
                    "http.public_url = {u:?}: {e}, e.g. \"https://hub.example.com\""
                ))
            })?;
        }
        let f = self.shipments.eta_road_factor;
        if !(1.0..=5.0).contains(&f) {
            return Err(ConfigError::Invalid(format!(
                "shipments.eta_road_factor: {f} is out of range; expected 1.0 to 5.0 (road metres per straight-line metre; 1.3 is typical)"
            )));
        }
        if let Some(m) = &self.shipments.mappings {
            m.validate()
                .map_err(|e| ConfigError::Invalid(format!("shipments.mappings: {e}")))?;
        }
        match (&self.store.path, &self.store.url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "store: set either path (sled) or url (PostgreSQL), not both".into(),
                ));
            }
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "store: set path (sled, a directory) or url (PostgreSQL, postgres://...)"
                        .into(),
                ));
            }
            (None, Some(url)) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(ConfigError::Invalid(format!(
                        "store.url: {:?} is not a PostgreSQL URL; expected postgres://USER@HOST:PORT/DATABASE",
                        redact_url(url)
                    )));
                }
                if !(1..=1024).contains(&self.store.pool_size) {
                    return Err(ConfigError::Invalid(
                        "store.pool_size must be from 1 to 1024".into(),
                    ));
                }
                if !(100..=3_600_000).contains(&self.store.statement_timeout_ms) {
                    return Err(ConfigError::Invalid(
                        "store.statement_timeout_ms must be from 100 to 3600000".into(),
                    ));
                }
            }
            (Some(path), None) => {
                if path.exists() && !path.is_dir() {
                    return Err(ConfigError::Invalid(format!(
                        "store.path {}: exists and is not a directory",
                        path.display()
                    )));
                }
                // Not there yet: it is created at start, under its nearest existing
                // ancestor, which must be a directory.
                let base = path
                    .ancestors()
                    .skip(1)
                    .map(|a| {
                        if a.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            a
                        }
                    })
                    .find(|a| a.exists());
                if let Some(a) = base
                    && !a.is_dir()
                {
                    return Err(ConfigError::Invalid(format!(
                        "store.path {}: {} is not a directory",
                        path.display(),
                        a.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_tables_from_the_config_must_cover_every_state() {
        let mut rows = String::new();
        for m in crate::shipments::Mappings::default().states {
            rows.push_str(&format!(
                "[[shipments.mappings.states]]\nstate = \"{}\"\nerp_status = \"X_{}\"\nportal_status = \"p\"\nwebhook_type = \"w.v1\"\nreleases_billing = {}\n",
                m.state.as_str(),
                m.state.as_str(),
                m.releases_billing
            ));
        }
        let base = EXAMPLE.replace("[shipments]\n", "");
        let text = format!(
            "{base}\n[shipments]\nstuck_after_s = 600\n[shipments.mappings]\nversion = \"sap-2\"\n{rows}"
        );
        let cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        let m = cfg.shipments.mappings.as_ref().unwrap();
        assert_eq!(m.version, "sap-2");
        assert_eq!(
            m.of(crate::shipments::State::PodConfirmed)
                .unwrap()
                .erp_status,
            "X_POD_CONFIRMED"
        );
        // One state short: refused, naming it.
        let cut = rows.rfind("[[shipments.mappings.states]]").unwrap();
        let text = format!(
            "{base}\n[shipments.mappings]\nversion = \"sap-2\"\n{}",
            &rows[..cut]
        );
        let err = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("CANCELLED"), "{err}");
    }

    #[test]
    fn store_is_path_or_url_and_env_overrides_replace_the_choice() {
        let mut cfg = Config::parse(EXAMPLE).unwrap();
        cfg.apply_env(|k| {
            (k == "FLEETSYNC_HUB_STORE_URL").then(|| "postgres://u:secret@db/fleet".into())
        })
        .unwrap();
        assert_eq!(cfg.store.path, None);
        cfg.validate().unwrap();
        assert!(!format!("{:?}", cfg.store).contains("secret"));
        cfg.store.path = Some("data".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        cfg.store.path = None;
        cfg.store.url = Some("mysql://db/fleet".into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("not a PostgreSQL URL"), "{e}");
        let text = EXAMPLE.replace("path = \"data/hub\"", "");
        let e = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("set path"), "{e}");
    }

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("postgres://fleet:pw@db:5432/x"),
            "postgres://fleet:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://fleet@db/x"), "postgres://fleet@db/x");
    }

    #[test]
    fn an_external_broker_needs_its_url_and_certificate_and_no_mqtt_section() {
        let external = r#"
[broker]
kind = "external"
url = "mqtts://broker.example.net"
ca = "pki/ca.pem"
cert = "pki/hubs/a/cert.pem"
key = "pki/hubs/a/key.pem"
[http]
listen = "127.0.0.1:8080"
[store]
url = "postgres://db/fleet"
[auth]
operator_token = "0123456789abcdef"
"#;
        let cfg = Config::parse(external).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.mqtt.is_none());
        assert_eq!(
            cfg.broker.endpoint().unwrap(),
            BrokerEndpoint {
                host: "broker.example.net".into(),
                port: 8883
            }
        );
        let err = |text: &str| {
            Config::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(&external.replace("cert = \"pki/hubs/a/cert.pem\"\n", "")).contains("broker.cert")
        );
        assert!(
            err(&external.replace("mqtts://broker.example.net", "mqtt://broker:1883"))
                .contains("TLS is required")
        );
        assert!(err(&external.replace("broker.example.net", "b:99999")).contains("broker.url"));
        let both = format!(
            "{external}[mqtt]\nlisten = \"0.0.0.0:8883\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n"
        );
        assert!(err(&both).contains("remove [mqtt]"));
        let no_mqtt = external.replace("kind = \"external\"", "kind = \"embedded\"");
        assert!(err(&no_mqtt).contains("[mqtt] is required"));
        assert!(
            err(&external.replace(
                "kind = \"external\"",
                "kind = \"external\"\nshared_group = \"a/b\""
            ))
            .contains("broker.shared_group")
        );
        let ipv6 = BrokerConfig {
            url: Some("mqtts://[::1]:1884".into()),
            ..BrokerConfig::default()
        };
        assert_eq!(ipv6.endpoint().unwrap().host, "::1");
        assert_eq!(ipv6.endpoint().unwrap().port, 1884);
    }

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
        let mqtt = cfg.mqtt.as_ref().unwrap();
        assert_eq!(mqtt.max_packet_bytes, 256 * 1024);
        assert_eq!(mqtt.handshake_timeout(), Duration::from_secs(5));
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

    /// deploy/hub-postgres.toml is the example on PostgreSQL and is valid.
    #[test]
    fn deploy_postgres_example_is_valid() {
        let cfg = super::Config::parse(include_str!("../../deploy/hub-postgres.toml")).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.store.path.is_none());
        assert!(cfg.store.url.as_deref().unwrap().starts_with("postgres://"));
    }

    /// The replica examples (deploy/replicas/) are valid external-broker configs, each
    /// replica with its own certificate.
    #[test]
    fn deploy_replica_examples_are_valid() {
        let mut certs = Vec::new();
        for text in [
            include_str!("../../deploy/replicas/hub-replica.toml"),
            include_str!("../../deploy/replicas/hub-a.toml"),
            include_str!("../../deploy/replicas/hub-b.toml"),
        ] {
            let cfg = super::Config::parse(text).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.broker.kind, super::BrokerKind::External);
            assert!(cfg.mqtt.is_none() && cfg.store.url.is_some());
            certs.push(cfg.broker.cert.unwrap());
        }
        assert_ne!(
            certs[1], certs[2],
            "the compose replicas share a certificate"
        );
    }
}

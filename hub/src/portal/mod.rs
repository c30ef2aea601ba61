//! The experience layer: what customers (portal) and consignees (tracking links) see of
//! their shipments, governed by rules of its own, never the fleet's raw data.
//!
//! ```text
//! view.rs   record + facts + a few reads -> PortalShipment (customer) -> TrackingShipment
//! feed.rs   the store-polled change feed, one broadcast channel per customer (SSE)
//! links.rs  HMAC-signed tracking link and POD URL tokens (keys rotatable)
//! limit.rs  token buckets per credential / link (429 + Retry-After)
//! ```
//!
//! The HTTP side is `api/portal.rs`; the pages over it are in `web/`.

pub mod feed;
pub mod limit;
pub mod links;
pub mod view;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::shipments::Mappings;
use crate::store::Store;

/// `[portal]` in the hub's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// Keys that sign tracking links and POD URLs (the first signs; all are accepted).
    #[serde(default)]
    pub link_keys: Vec<String>,
    /// Longest life of a tracking link.
    #[serde(default = "default_max_link_ttl_s")]
    pub max_link_ttl_s: u64,
    /// Life of a POD image URL.
    #[serde(default = "default_pod_url_ttl_s")]
    pub pod_url_ttl_s: u64,
    /// Requests a second per credential or link (token bucket rate) ...
    #[serde(default = "default_rate_per_s")]
    pub rate_per_s: f64,
    /// ... and at once.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// How often the change feed reads the store at the latest (it reads at once when the
    /// store signals a commit it shows: see [`feed`]).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// A comment line on every open stream this often, so proxies keep it open.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: u64,
    /// Changes a stream client may fall behind before it is dropped.
    #[serde(default = "default_stream_buffer")]
    pub stream_buffer: usize,
    /// Streams open at once (past this: 503).
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            link_keys: Vec::new(),
            max_link_ttl_s: default_max_link_ttl_s(),
            pod_url_ttl_s: default_pod_url_ttl_s(),
            rate_per_s: default_rate_per_s(),
            burst: default_burst(),
            poll_ms: default_poll_ms(),
            heartbeat_s: default_heartbeat_s(),
            stream_buffer: default_stream_buffer(),
            max_streams: default_max_streams(),
        }
    }
}

fn default_max_link_ttl_s() -> u64 {
    30 * 86_400
}
fn default_pod_url_ttl_s() -> u64 {
    600
}
fn default_rate_per_s() -> f64 {
    10.0
}
fn default_burst() -> u32 {
    40
}
fn default_poll_ms() -> u64 {
    250
}
fn default_heartbeat_s() -> u64 {
    15
}
fn default_stream_buffer() -> usize {
    64
}
fn default_max_streams() -> usize {
    10_000
}

impl PortalConfig {
    /// Checks what a type cannot.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(k) = self
            .link_keys
            .iter()
            .position(|k| k.len() < links::MIN_KEY_LEN)
        {
            return Err(format!(
                "portal.link_keys[{k}]: at least {} characters (a random secret)",
                links::MIN_KEY_LEN
            ));
        }
        if !(self.rate_per_s > 0.0 && self.rate_per_s.is_finite()) || self.burst == 0 {
            return Err("portal.rate_per_s and portal.burst: more than 0".into());
        }
        if self.stream_buffer == 0 || self.stream_buffer > 10_000 {
            return Err("portal.stream_buffer: 1 to 10000 changes".into());
        }
        if self.heartbeat_s == 0 || self.poll_ms < 50 || self.pod_url_ttl_s == 0 {
            return Err(
                "portal.heartbeat_s and portal.pod_url_ttl_s: more than 0; portal.poll_ms: at least 50"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The portal's shared parts (cheap to clone).
#[derive(Debug, Clone)]
pub struct Portal {
    /// The settings.
    pub cfg: Arc<PortalConfig>,
    /// The store.
    pub store: Store,
    /// The mapping tables.
    pub mappings: Arc<Mappings>,
    /// Signs and checks tokens.
    pub signer: Arc<links::Signer>,
    /// Request budgets.
    pub limiter: Arc<limit::Limiter>,
    /// Stream clients' channels.
    pub channels: Arc<feed::Channels>,
    /// Streams open now.
    pub streams: Arc<AtomicUsize>,
    /// Backlog views built lately, shared by clients that connect together.
    pub recent: Arc<feed::RecentViews>,
    /// Backlog view builds under way (at most [`feed::VIEW_READS`]).
    pub view_builds: Arc<tokio::sync::Semaphore>,
    /// Ends the streams at shutdown.
    pub shutdown: CancellationToken,
}

impl Portal {
    /// The portal of a hub. Without configured keys, links are signed with a random key
    /// (they die with the process and work on this replica only; a warning says so).
    pub fn new(
        cfg: PortalConfig,
        store: Store,
        mappings: Mappings,
        shutdown: CancellationToken,
    ) -> Portal {
        let signer = links::Signer::new(&cfg.link_keys).unwrap_or_else(|| {
            tracing::warn!(
                "portal.link_keys is not set: tracking links are signed with a random key and stop working when the hub restarts"
            );
            links::Signer::random()
        });
        Portal {
            limiter: Arc::new(limit::Limiter::new(cfg.rate_per_s, cfg.burst)),
            cfg: Arc::new(cfg),
            store,
            mappings: Arc::new(mappings),
            signer: Arc::new(signer),
            channels: Arc::default(),
            streams: Arc::default(),
            recent: Arc::default(),
            view_builds: Arc::new(tokio::sync::Semaphore::new(feed::VIEW_READS)),
            shutdown,
        }
    }

    /// How views are built now.
    pub fn ctx(&self, now_ms: u64) -> view::Ctx<'_> {
        view::Ctx {
            mappings: &self.mappings,
            signer: &self.signer,
            pod_url_ttl_s: self.cfg.pod_url_ttl_s,
            now_ms,
        }
    }
}

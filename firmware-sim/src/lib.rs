//! fleetsync-sim: simulated vehicles, drivers and faults for the demo, load tests and the
//! chaos harness.
//!
//! - [`route`]: generated drives between waypoints, 1 Hz.
//! - [`nmea`]: the NMEA sentences a receiver would print for them (agents read them
//!   through their real `nmea+tcp://` source).
//! - [`images`]: small real PNG signatures and JPEG photos for POD.
//! - [`chaos`]: the `chaos` mode: agent and hub processes under faults, and the oracle.
//! - [`load`]: the `load` mode: many protocol-level vehicles over TLS against a hub.
//! - [`replicas`]: the `replicas` topology of both: a Mosquitto and hub replicas on
//!   PostgreSQL.
//! - [`sse`]: reading Server-Sent Events (the portal stream's clients).
//! - [`demo`]: the `demo` mode: an in-process hub and N vehicles with real agents,
//!   drivers taking POD, a live display and a report checked against the hub.

pub mod chaos;
pub mod demo;
pub mod fake_erp;
pub mod images;
pub mod load;
pub mod load_portal;
pub mod nmea;
pub mod ports;
pub mod replicas;
pub mod route;
pub mod sse;

pub use demo::{DemoOptions, Report, demo};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Bad options (exit code 64).
    #[error("{0}")]
    Options(String),
    /// The PKI could not be made.
    #[error("pki: {0}")]
    Pki(#[from] fleetsync_hub::pki::PkiError),
    /// The in-process hub did not start.
    #[error("hub: {0}")]
    HubStart(#[from] fleetsync_hub::HubError),
    /// The hub's API did not answer as expected.
    #[error("hub API: {0}")]
    Hub(String),
    /// A vehicle's agent did not start.
    #[error("agent of {vehicle}: {source}")]
    Agent {
        /// Device id.
        vehicle: String,
        /// Why.
        source: fleetsync_agent::AgentError,
    },
    /// File system or sockets.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The `[store]` section of a hub config the simulator writes: PostgreSQL at `url` when
/// given (checked to be empty first: a run's oracle must see only its own events), else
/// sled in `dir`.
pub async fn hub_store_section(url: Option<&str>, dir: &std::path::Path) -> Result<String, String> {
    let Some(url) = url else {
        return Ok(format!("[store]\npath = \"{}\"\n", dir.display()));
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "--store: expected a postgres:// URL (without --store the hub uses sled), got {:?}",
            fleetsync_hub::config::redact_url(url)
        ));
    }
    let cfg = fleetsync_hub::config::StoreConfig::postgres(url);
    let store = fleetsync_hub::store::Store::open(&cfg)
        .await
        .map_err(|e| format!("--store: {e}"))?;
    let devices = store.devices().await.map_err(|e| format!("--store: {e}"))?;
    if !devices.is_empty() {
        return Err(format!(
            "--store: the database already holds {} devices; give each run an empty database (createdb)",
            devices.len()
        ));
    }
    Ok(format!("[store]\nurl = \"{url}\"\n"))
}

//! fleetsync-agent: the in-vehicle agent.
//!
//! Data flow:
//!
//! ```text
//! local API (driver's tablet) --+
//! health (periodic)       ------+--> store (sled, two lanes, durable) --> uplink (MQTT/TLS)
//!                                          ^                                   |
//!                                          +------ delete on hub Ack <---------+
//! ```

pub mod api;
pub mod config;
pub mod edge;
pub mod geofence;
pub mod gps;
pub mod jobs;
pub mod store;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_protocol::topic::Layout;
use fleetsync_protocol::{Body, BoundedString, Event, Health};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store did not open.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// Certificates could not be loaded.
    #[error("{path}: {message}")]
    Tls {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// Bad config value.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The API could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate names another device than the config: the hub would refuse
    /// every connection (it takes the id from the certificate), so the agent does not
    /// start.
    #[error(
        "device_id {device_id:?} but {path} is the certificate of {cert_id:?}: the hub knows a device by its certificate; use that device's certificate or fix device_id"
    )]
    Identity {
        /// The config's device id.
        device_id: String,
        /// What the certificate says.
        cert_id: String,
        /// The certificate file.
        path: String,
    },
}

impl AgentError {
    /// Whether an operator must change the configuration or its files (exit code 64, no
    /// restart).
    pub fn is_config(&self) -> bool {
        use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, PermissionDenied};
        match self {
            AgentError::Tls { .. } | AgentError::Config(_) | AgentError::Identity { .. } => true,
            AgentError::Bind { source, .. } => {
                matches!(
                    source.kind(),
                    AddrInUse | AddrNotAvailable | PermissionDenied
                )
            }
            AgentError::Store(_) => false,
        }
    }
}

/// Checks what `run` will use beyond the file: the TLS material loads, and the device
/// certificate is this device's (its subject's O field is `device_id`).
pub fn preflight(cfg: &Config) -> Result<rustls::ClientConfig, AgentError> {
    let tls = client_tls(&cfg.hub.ca, &cfg.hub.cert, &cfg.hub.key)?;
    let path = &cfg.hub.cert;
    let first = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .next()
        .ok_or_else(|| tls_err(path, "no certificate found"))?
        .map_err(|e| tls_err(path, e))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| tls_err(path, format!("not an X.509 certificate: {e}")))?;
    let cert_id = parsed
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .unwrap_or("")
        .to_string();
    if cert_id != cfg.device_id {
        return Err(AgentError::Identity {
            device_id: cfg.device_id.clone(),
            cert_id,
            path: path.display().to_string(),
        });
    }
    Ok(tls)
}

fn tls_err(path: &std::path::Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Tls {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// TLS 1.3 client config: trust the fleet CA, present the device certificate.
pub fn client_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ClientConfig, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(ca, e))? {
        roots
            .add(c.map_err(|e| tls_err(ca, e))?)
            .map_err(|e| tls_err(ca, e))?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(cert, e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(cert, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| tls_err(cert, e))
}

/// A started agent.
#[derive(Debug)]
pub struct Running {
    /// Where the local API listens.
    pub api_addr: SocketAddr,
    /// The store.
    pub store: store::Store,
    /// Link state.
    pub link: Arc<uplink::LinkState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits for every task (after shutdown).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the agent: store (epoch bump), uplink, health, local API.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<Running, AgentError> {
    let (host, port) = cfg.hub_addr()?;
    let tls = Arc::new(preflight(&cfg)?);
    let store_cfg = store::StoreConfig {
        path: cfg.store.path.clone(),
        quota_bytes: cfg.store.quota_bytes,
        space_factor: store::SLED_SPACE_FACTOR,
        // No waiting window: writers arriving during one round's fsync form the next group.
        commit_interval: Duration::ZERO,
    };
    let store = tokio::task::spawn_blocking(move || store::Store::open(store_cfg))
        .await
        .map_err(|e| AgentError::Tls {
            path: "store".into(),
            message: e.to_string(),
        })??;
    info!(device = %cfg.device_id, epoch = store.epoch(), "store opened");
    let link = Arc::new(uplink::LinkState::default());
    let wake = Arc::new(Notify::new());
    let edge = Arc::new(edge::Edge::new(cfg.geofence.clone()));
    let gps_stats = Arc::new(gps::GpsStats::default());
    let mut tasks = Vec::new();
    let (assign_tx, assign_rx) = tokio::sync::mpsc::channel(jobs::ASSIGNMENT_QUEUE);
    let (current_tx, current) = jobs::current(&store);
    tasks.push(tokio::spawn(jobs::run(
        assign_rx,
        store.clone(),
        wake.clone(),
        current_tx,
        shutdown.clone(),
    )));
    let (fix_tx, fix_rx) = tokio::sync::mpsc::channel(edge::FIX_QUEUE);
    if let Some(src) = &cfg.gps.source {
        let source: gps::GpsSource = src
            .parse()
            .map_err(|e| config::ConfigError::Invalid(format!("gps.source {src:?}: {e}")))?;
        let (stats, sd) = (gps_stats.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = gps::run(source, fix_tx, stats, sd).await {
                warn!(error = %e, "GPS source stopped");
            }
        }));
    } else {
        drop(fix_tx);
    }
    tasks.push(tokio::spawn(edge::run(
        edge.clone(),
        fix_rx,
        current.clone(),
        cfg.ignition.path.clone(),
        store.clone(),
        wake.clone(),
        shutdown.clone(),
    )));

    let up_cfg = uplink::UplinkConfig {
        device_id: cfg.device_id.clone(),
        host,
        port,
        tls,
        ack_timeout: cfg.ack_timeout(),
        batch_max_events: cfg.uplink.batch_max_events,
        max_inflight: cfg.uplink.max_inflight,
        batch_max_delay: Duration::from_millis(cfg.uplink.batch_max_delay_ms),
        layout: match cfg.hub.broker {
            config::BrokerKind::Embedded => Layout::Embedded,
            config::BrokerKind::External => Layout::External,
        },
        assignments: assign_tx,
    };
    tasks.push(tokio::spawn(uplink::run(
        up_cfg,
        store.clone(),
        link.clone(),
        wake.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(health(
        store.clone(),
        link.clone(),
        wake.clone(),
        Duration::from_secs(cfg.health.interval_s),
        shutdown.clone(),
    )));

    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.api.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: cfg.api.listen,
        source,
    })?;
    let app = api::app(api::ApiState {
        device_id: cfg.device_id.as_str().into(),
        store: store.clone(),
        link: link.clone(),
        wake,
        token: cfg.api.token.as_str().into(),
        assignment: current,
        edge,
        gps: gps_stats,
        pod_lock: Arc::new(tokio::sync::Mutex::new(())),
        pod_uploads: Arc::new(tokio::sync::Semaphore::new(api::MAX_POD_UPLOADS)),
        body_timeout: cfg.api.body_timeout(),
    });
    tasks.push(tokio::spawn(api::serve::serve(
        listener,
        app,
        cfg.api.limits(),
        shutdown.clone(),
    )));
    info!(%api_addr, "agent started");
    Ok(Running {
        api_addr,
        store,
        link,
        tasks,
    })
}

/// Runs until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    start(cfg, shutdown).await?.wait().await;
    Ok(())
}

async fn health(
    store: store::Store,
    link: Arc<uplink::LinkState>,
    wake: Arc<Notify>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = store.stats();
        let ev = Event {
            time_ms: now_ms(),
            body: Body::Health(Health {
                backlog_critical: s.critical.events.min(u64::from(u32::MAX)) as u32,
                backlog_telemetry: s.telemetry.events.min(u64::from(u32::MAX)) as u32,
                disk_used_bytes: s.disk_bytes,
                disk_quota_bytes: s.quota_bytes,
                uptime_s: started.elapsed().as_secs().min(u64::from(u32::MAX)) as u32,
                version: BoundedString::try_from_str(env!("CARGO_PKG_VERSION")).unwrap_or_default(),
                link: link.stats(),
            }),
        };
        match store.append_buffered(ev) {
            Ok(_) => wake.notify_one(),
            Err(e) => warn!(error = %e, "health event not stored"),
        }
    }
}

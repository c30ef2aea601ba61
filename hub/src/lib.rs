//! fleetsync-hub: accepts devices, deduplicates and stores their events, acks them, and
//! serves the operator API.
//!
//! Data flow:
//!
//! ```text
//! device --TLS--> broker::gateway (mTLS, prefix guard) --> broker::embedded (rumqttd)
//!        --> ingest (decode, one store round: dedup + write, durable) --> ack on the
//!            device's down topic
//!   or   --TLS--> external broker (its ACL ties topics to certificates; see
//!            broker::external) --> shared subscription --> ingest of one replica
//! dispatch: assignments to devices (send, resend, acks)
//! store: the interface; sled (embedded) or PostgreSQL (several hubs) behind it
//! api (axum): operator API over the store, /healthz, /readyz, /metrics
//! web: the portal, tracking and console pages over those APIs (assets embedded)
//! ```

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod ingest;
pub mod metrics;
pub mod outbox;
pub mod pki;
pub mod portal;
pub mod presence;
pub mod shipments;
pub mod store;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetsync_protocol::topic::Layout;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The store did not open.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// TLS material is missing or unusable.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The embedded broker did not start.
    #[error("{0}")]
    Broker(#[from] broker::embedded::BrokerError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}{}", if source.kind() == std::io::ErrorKind::AddrInUse { " (is another hub or program on that port?)" } else { "" })]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The ingest did not subscribe in time.
    #[error("ingest did not become ready within 10 s")]
    NotReady,
    /// An outbox sink could not be set up.
    #[error("{0}")]
    Sink(String),
    /// The configuration cannot be run as it is.
    #[error("invalid config: {0}")]
    Config(String),
}

impl HubError {
    /// Whether an operator must change the configuration (exit code 64, no restart):
    /// unusable TLS material, a listen address in use or not this machine's, a store
    /// that cannot be used as configured.
    pub fn is_config(&self) -> bool {
        use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, PermissionDenied};
        match self {
            HubError::Store(e) => e.is_config(),
            HubError::Tls(_) | HubError::Sink(_) | HubError::Config(_) => true,
            HubError::Bind { source, .. } => {
                matches!(
                    source.kind(),
                    AddrInUse | AddrNotAvailable | PermissionDenied
                )
            }
            HubError::Broker(_) | HubError::NotReady => false,
        }
    }
}

/// What `config check` checks beyond the file itself, the same way `run` will use it:
/// the TLS material loads and the key matches the certificate, and both listen
/// addresses can be bound now (a port in use is named). The store is checked by
/// [`Config::validate`] (sled) or when it is opened (PostgreSQL).
pub fn preflight(cfg: &Config) -> Result<(), HubError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut listen = vec![cfg.http.listen];
    match cfg.broker.kind {
        config::BrokerKind::Embedded => {
            let mqtt = embedded_mqtt(cfg)?;
            tls::device_tls(&mqtt.ca, &mqtt.cert, &mqtt.key)?;
            listen.push(mqtt.listen);
        }
        config::BrokerKind::External => {
            external_tls(&cfg.broker)?;
        }
    }
    for addr in listen {
        if addr.port() != 0 {
            std::net::TcpListener::bind(addr).map_err(|source| HubError::Bind { addr, source })?;
        }
    }
    Ok(())
}

fn embedded_mqtt(cfg: &Config) -> Result<&config::MqttConfig, HubError> {
    cfg.mqtt
        .as_ref()
        .ok_or_else(|| HubError::Config("[mqtt] is required with the embedded broker".into()))
}

/// The hub's client TLS for an external broker.
fn external_tls(b: &config::BrokerConfig) -> Result<Arc<rustls::ClientConfig>, HubError> {
    let need = |p: &Option<std::path::PathBuf>, key: &str| {
        p.clone().ok_or_else(|| {
            HubError::Config(format!("broker.{key}: required with an external broker"))
        })
    };
    let (ca, cert, key) = (
        need(&b.ca, "ca")?,
        need(&b.cert, "cert")?,
        need(&b.key, "key")?,
    );
    Ok(Arc::new(tls::client_tls(&ca, &cert, &key)?))
}

/// A started hub.
#[derive(Debug)]
pub struct Running {
    /// Where devices connect.
    pub mqtt_addr: SocketAddr,
    /// Where the HTTP APIs listen.
    pub http_addr: SocketAddr,
    /// The store (for in-process tests and the simulator).
    pub store: store::Store,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until every task has stopped (after the shutdown token is cancelled).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts every part of the hub and returns once devices can connect.
pub async fn start(mut cfg: Config, shutdown: CancellationToken) -> Result<Running, HubError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if cfg.broker.kind == config::BrokerKind::External && cfg.store.url.is_none() {
        tracing::warn!(
            "external broker with the sled store: run only ONE hub process so (replicas must share a PostgreSQL store, store.url)"
        );
    }
    // Every new fact a sink hears of gets an outbox row for it in the fact's write: one
    // per ERP, and one staged for the webhook subscriptions (fanned out after).
    cfg.store.outbox_sinks = cfg.erp.iter().map(|e| e.name.clone()).collect();
    cfg.store
        .outbox_sinks
        .push(outbox::webhooks::STAGING.to_string());
    let store = store::Store::open(&cfg.store).await?;
    info!(backend = store.backend(), "store open");
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = Arc::new(presence::Registry::default());
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let (downlink_tx, downlink_rx) = tokio::sync::mpsc::channel(dispatch::DOWNLINK_QUEUE);
    let (listening_tx, listening_rx) = tokio::sync::mpsc::channel(dispatch::DOWNLINK_QUEUE);
    let (layout, link, max_packet_bytes) = match cfg.broker.kind {
        config::BrokerKind::Embedded => {
            let mqtt = embedded_mqtt(&cfg)?;
            let (max_packet, max_conn) = (mqtt.max_packet_bytes, mqtt.max_connections);
            let broker =
                tokio::task::spawn_blocking(move || broker::embedded::start(max_packet, max_conn))
                    .await
                    .map_err(|e| broker::embedded::BrokerError::Start(e.to_string()))??;
            let link = ingest::Link::Embedded {
                host: broker.addr.ip().to_string(),
                port: broker.addr.port(),
                username: broker::embedded::HUB_USER.to_string(),
                password: broker.secret.clone(),
            };
            (Layout::Embedded, (link, Some(broker)), max_packet)
        }
        config::BrokerKind::External => {
            let ep = cfg.broker.endpoint().map_err(HubError::Config)?;
            let link = ingest::Link::External(ingest::ExternalLink {
                host: ep.host,
                port: ep.port,
                tls: external_tls(&cfg.broker)?,
                group: cfg.broker.shared_group.clone(),
                client_id: format!("fleetsync-hub-{}", random_suffix()),
                presence: registry.clone(),
                listening: listening_tx.clone(),
            });
            (Layout::External, (link, None), cfg.broker.max_packet_bytes)
        }
    };
    let (link, embedded) = link;
    let ingest_cfg = ingest::IngestConfig {
        link,
        layout,
        max_packet_bytes,
    };
    let dispatch = dispatch::Dispatch::new(store.clone(), layout, downlink_tx);
    tasks.push(tokio::spawn(ingest::run(
        ingest_cfg,
        store.clone(),
        dispatch.clone(),
        metrics.clone(),
        ready.clone(),
        ingest::DownlinkInputs {
            queued: downlink_rx,
            listening: listening_rx,
        },
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(ingest::sweep_uploads(
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    )));
    // Devices may only come in once the hub's subscriptions exist.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready.load(Ordering::SeqCst) {
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return Err(HubError::NotReady);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mqtt_addr = match (embedded, cfg.mqtt.as_ref()) {
        (Some(broker), Some(mqtt)) => {
            let device_tls = tls::device_tls(&mqtt.ca, &mqtt.cert, &mqtt.key)?;
            let listener = tokio::net::TcpListener::bind(mqtt.listen)
                .await
                .map_err(|source| HubError::Bind {
                    addr: mqtt.listen,
                    source,
                })?;
            let mqtt_addr = listener.local_addr().map_err(|source| HubError::Bind {
                addr: mqtt.listen,
                source,
            })?;
            broker::gateway::log_listening(mqtt_addr);
            // Files kept for everything but devices: the HTTP connections, the store,
            // outbound clients, the handshakes in progress.
            let reserve = cfg.http.max_connections + mqtt.max_handshakes + 256;
            let max_connections = match broker::gateway::devices_within_file_limit(
                mqtt.max_connections,
                reserve,
            ) {
                Some(fit) if fit < mqtt.max_connections => {
                    tracing::warn!(
                        max_connections = mqtt.max_connections,
                        fit,
                        files_per_device = broker::gateway::FILES_PER_DEVICE,
                        "the open-file limit (ulimit -n, LimitNOFILE) holds fewer devices than mqtt.max_connections; the rest are refused"
                    );
                    fit
                }
                _ => mqtt.max_connections,
            };
            let gw_cfg = broker::gateway::GatewayConfig {
                handshake_timeout: mqtt.handshake_timeout(),
                max_connections,
                max_handshakes: mqtt.max_handshakes,
                max_handshakes_per_source: mqtt.max_handshakes_per_source,
                max_packet_bytes: mqtt.max_packet_bytes,
                upstream: broker.addr,
                secret: broker.secret.clone(),
                listening: listening_tx,
                verifier: device_tls.verifier.clone(),
            };
            tasks.push(tokio::spawn(broker::gateway::run(
                listener,
                TlsAcceptor::from(device_tls.config.clone()),
                gw_cfg,
                registry.clone(),
                metrics.clone(),
                shutdown.clone(),
            )));
            mqtt_addr
        }
        _ => {
            // Devices connect to the external broker; this is where it is.
            let ep = cfg.broker.endpoint().map_err(HubError::Config)?;
            let found = tokio::net::lookup_host((ep.host.as_str(), ep.port))
                .await
                .ok()
                .and_then(|mut a| a.next());
            found.ok_or_else(|| {
                HubError::Config(format!("broker.url: cannot resolve {}", ep.host))
            })?
        }
    };

    let http = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|source| HubError::Bind {
            addr: cfg.http.listen,
            source,
        })?;
    let http_addr = http.local_addr().map_err(|source| HubError::Bind {
        addr: cfg.http.listen,
        source,
    })?;
    let shipments = shipments::service::Shipments::new(
        store.clone(),
        dispatch.clone(),
        cfg.shipments.mappings.clone().unwrap_or_default(),
    );
    // A crash between a shipment write and its dispatch left a stale assignment.
    if let Err(e) = shipments.reconcile(ingest::now_ms()).await {
        tracing::warn!(error = ?e, "could not bring every vehicle's assignment in line with its shipments at start");
    }
    tasks.push(tokio::spawn(confirm_pods(
        shipments.clone(),
        metrics.clone(),
        cfg.shipments.stuck_after_s * 1000,
        shutdown.clone(),
    )));
    // The portal's signer also signs the evidence URLs of webhook deliveries.
    let portal = portal::Portal::new(
        cfg.portal.clone(),
        store.clone(),
        shipments.mappings().clone(),
        shutdown.clone(),
    );
    let evidence = outbox::erp::EvidenceLinks::new(
        cfg.http.public_url.as_deref(),
        portal.signer.clone(),
        cfg.webhooks.evidence_url_ttl_s,
    );
    for erp in &cfg.erp {
        let c = outbox::erp::Connector::new(
            erp.clone(),
            store.clone(),
            shipments.mappings().clone(),
            evidence.clone(),
        )
        .map_err(HubError::Sink)?;
        let limits = c.limits();
        let w = outbox::worker::Worker::new(c, limits, store.clone(), &metrics);
        info!(erp = %erp.name, base_url = %erp.base_url, "ERP connector started");
        tasks.push(tokio::spawn(w.run(shutdown.clone())));
    }
    outbox::webhooks::client(&cfg.webhooks).map_err(HubError::Sink)?;
    tasks.push(tokio::spawn(outbox::webhooks::run(
        store.clone(),
        cfg.webhooks.clone(),
        shipments.mappings().clone(),
        evidence,
        metrics.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(estimate_arrivals(
        shipments.clone(),
        metrics.clone(),
        cfg.shipments.eta(),
        Duration::from_secs(cfg.shipments.eta_interval_s),
        shutdown.clone(),
    )));
    let stuck_after_ms = cfg.shipments.stuck_after_s * 1000;
    tasks.push(tokio::spawn(portal::feed::run(
        portal.clone(),
        shutdown.clone(),
    )));
    let app = api::app(api::AppState {
        portal,
        stuck_after_ms,
        store: store.clone(),
        registry,
        metrics,
        operator_token: cfg.auth.operator_token.as_str().into(),
        ready,
        dispatch,
        shipments,
        webhooks: Arc::new(cfg.webhooks.clone()),
    });
    tasks.push(tokio::spawn(api::serve::serve(
        http,
        app,
        cfg.http.limits(),
        shutdown.clone(),
    )));
    info!(%mqtt_addr, %http_addr, "hub started");
    Ok(Running {
        mqtt_addr,
        http_addr,
        store,
        tasks,
    })
}

/// 12 random hex digits: a replica's MQTT client id differs from every other's.
fn random_suffix() -> String {
    use rand::Rng as _;
    let bytes: [u8; 6] = rand::rng().random();
    hex::encode(bytes)
}

/// Judges delivered PODs every 2 s ([`shipments::service::Shipments::confirm_pods`])
/// and counts stuck shipments every 30 s for `/metrics`.
async fn confirm_pods(
    shipments: shipments::service::Shipments,
    metrics: Arc<metrics::Metrics>,
    stuck_after_ms: u64,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = shipments.confirm_pods(ingest::now_ms()).await {
            tracing::warn!(error = ?e, "POD confirmation round failed; trying again");
        }
        n += 1;
        if n % 15 != 1 {
            continue;
        }
        match shipments.stuck(ingest::now_ms(), stuck_after_ms).await {
            Ok(list) => {
                for (reason, gauge) in shipments::service::STUCK_REASONS
                    .iter()
                    .zip(&metrics.shipments_stuck)
                {
                    let c = list.iter().filter(|s| s.reason == *reason).count() as u64;
                    gauge.store(c, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = ?e, "could not count stuck shipments"),
        }
        if let Ok(open) = shipments
            .store()
            .reviews(Some(shipments::correlate::ReviewStatus::Open), 100_000)
            .await
        {
            metrics
                .review_open
                .store(open.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Estimates arrivals every `every` ([`shipments::service::Shipments::estimate`]).
async fn estimate_arrivals(
    shipments: shipments::service::Shipments,
    metrics: Arc<metrics::Metrics>,
    settings: shipments::eta::EtaSettings,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shipments.estimate(&settings, ingest::now_ms()).await {
            Ok(r) => {
                metrics::Metrics::add(&metrics.eta_facts, r.facts);
                metrics::Metrics::add(&metrics.eta_rounds, 1);
                metrics.eta_vehicles.store(r.vehicles, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = ?e, "arrival estimate round failed; trying again"),
        }
    }
}

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), HubError> {
    start(cfg, shutdown).await?.wait().await;
    Ok(())
}

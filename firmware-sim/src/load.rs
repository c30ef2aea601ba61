//! `load`: many lightweight protocol-level vehicles against a hub.
//!
//! Each vehicle is an MQTT client with its own certificate over real TLS (no agent, no
//! sled): it captures `rate` fixes per second and publishes what it has every second as a
//! `Batch` (what an agent's 1 s batch delay does), keeps up to 8 batches awaiting the hub's
//! `Ack`, and measures capture-to-ack latency. The hub runs as a separate process (this
//! executable's `hub` mode) unless `--hub` points at one, so its CPU time and RSS can be
//! read from /proc. At the end the harness waits for every batch to be acked and checks
//! the hub's event count of every vehicle: the load mode's oracle.
//!
//! `--topology replicas`: the vehicles connect to a Mosquitto the simulator starts, in
//! front of `--replicas` hub replica processes (two by default) on one PostgreSQL database (see
//! [`crate::replicas`]), on the external topic layout; the hub figures are both
//! replicas' CPU (summed) and the larger peak RSS, and each process (the replicas and the
//! broker) is reported with its CPU, RSS and peak RSS.
//!
//! `--portal-clients N` adds the customer portal's live stream: N stream clients over
//! real HTTP, a shipment per vehicle, latency and completeness of what the clients get
//! (see [`crate::load_portal`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{Batch, Body, BoundedVec, Downlink, Event, Fix, Uplink, frame};
use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::chaos::oracle::Latency;
use crate::replicas::{Broker, Topology, replica_name};

const OPERATOR_TOKEN: &str = "load-operator-token-0123456789abcdef";
const INFLIGHT: usize = 8;
/// New TLS connections per second while ramping up.
const RAMP_PER_S: usize = 250;
/// `replicas`: a batch not acked this long is published again, as an agent does after
/// its ack timeout (a broker may lose a message; the embedded hub's path never did, and
/// the embedded runs keep their old behaviour: resend only after a reconnect).
const RESEND_AFTER_MS: u64 = 5_000;

/// Flags of `fleetsync-sim load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Vehicles.
    pub vehicles: usize,
    /// Fixes per second per vehicle.
    pub rate: f64,
    /// Hub replicas of `--topology replicas` (1 to 8).
    pub replicas: usize,
    /// Seconds measured (after the ramp-up).
    pub duration: Duration,
    /// This executable (runs the hub process).
    pub exe: PathBuf,
    /// Working directory to keep (PKI, hub data, log).
    pub dir: Option<PathBuf>,
    /// PostgreSQL URL for the hub's store (sled in the working directory if `None`).
    pub store: Option<String>,
    /// Measure partner webhooks too (see [`webhook_setup`]).
    pub webhooks: bool,
    /// Measure the portal's live stream too (see [`crate::load_portal`]).
    pub portal: Option<crate::load_portal::PortalOptions>,
    /// One hub, or a broker and hub replicas (which need `store`).
    pub topology: Topology,
    /// The Mosquitto executable for `replicas` (see [`crate::replicas::mosquitto_exe`]).
    pub mosquitto: Option<PathBuf>,
}

/// One process's figures in the window (`replicas`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFigures {
    /// `hub a`, `hub b`, `mosquitto`.
    pub name: String,
    /// CPU in the window, percent of one core.
    pub cpu_percent: f64,
    /// Resident at the end of the window (VmRSS), MiB.
    pub rss_mib: f64,
    /// Peak resident (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

/// The load report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Vehicles connected.
    pub vehicles: usize,
    /// Fixes per second per vehicle.
    pub rate_hz: f64,
    /// Seconds measured.
    pub duration_s: f64,
    /// Events captured in the window.
    pub events_sent: u64,
    /// Events acked by the hub in the window.
    pub events_acked: u64,
    /// Acked events per second in the window.
    pub acked_per_s: f64,
    /// Capture to hub ack, ms: includes the vehicle's own batching (it publishes what it
    /// captured once a second, as an agent batches).
    pub latency_ms: Latency,
    /// Publish to hub ack, ms: the hub's part (TLS, broker, ingest, dedup, fsync, ack).
    pub hub_latency_ms: Latency,
    /// Hub CPU in the window, percent of one core.
    pub hub_cpu_percent: f64,
    /// Hub peak RSS, MiB.
    pub hub_peak_rss_mib: f64,
    /// `replicas`: each replica and the broker (left out for the embedded topology).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessFigures>,
    /// Left out for the embedded topology.
    #[serde(skip_serializing_if = "Topology::is_embedded")]
    pub topology: Topology,
    /// `replicas`: how many hub replicas ran (0 for the embedded topology).
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub replicas: usize,
    /// `replicas`: events published again after [`RESEND_AFTER_MS`] without an ack.
    #[serde(skip_serializing_if = "is_zero")]
    pub resent_after_timeout: u64,
    /// `replicas`: events the replicas found already stored (resends whose first copy had
    /// arrived: its ack was what went missing).
    #[serde(skip_serializing_if = "is_zero")]
    pub hub_duplicates: u64,
    /// Events captured over the whole run.
    pub events_captured: u64,
    /// Events the hub holds for the vehicles after the drain.
    pub stored_at_hub: u64,
    /// Events captured over the whole run and not at the hub after the drain.
    pub lost: u64,
    /// Events at the hub beyond what was sent.
    pub duplicated: u64,
    /// Connection errors seen by clients.
    pub client_errors: u64,
    /// The same errors by message (most frequent first, at most 5 kinds).
    pub client_error_kinds: Vec<(String, u64)>,
    /// `--webhooks`: arrivals sent in the window, each an ARRIVED milestone a webhook must
    /// carry.
    pub webhook_expected: u64,
    /// Of them, received by the subscription's receiver.
    pub webhook_received: u64,
    /// From the hub's record of the arrival (the fact's `recordedtime`, taken as its
    /// ingest round starts, before the commit) to the webhook request's arrival.
    pub webhook_latency_ms: Latency,
    /// `--webhooks`: the release of one shipment per vehicle, before the window, is a burst
    /// of DISPATCHED milestones that the subscription's rate limit (`[webhooks]
    /// rate_per_s`) spreads out; the window starts once they all arrived, so its latency
    /// is the steady state's. How long that took, ms (0: not measured).
    pub webhook_release_drain_ms: u64,
    /// `--portal-clients`: what the stream clients got.
    pub portal: Option<crate::load_portal::PortalReport>,
    /// Oracle verdict.
    pub ok: bool,
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why load could not run.
#[derive(Debug, thiserror::Error)]
#[error("load set-up: {0}")]
pub struct LoadError(String);

impl LoadError {
    pub(crate) fn new<E: std::fmt::Display>(x: E) -> Self {
        LoadError(x.to_string())
    }
}

fn e<E: std::fmt::Display>(x: E) -> LoadError {
    LoadError(x.to_string())
}

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    acked: AtomicU64,
    resent: AtomicU64,
    errors: AtomicU64,
    error_kinds: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    measuring: std::sync::atomic::AtomicBool,
    sent_window: AtomicU64,
    acked_window: AtomicU64,
    latencies: std::sync::Mutex<Vec<u32>>,
    hub_latencies: std::sync::Mutex<Vec<u32>>,
    /// When the window began (ms), for the vehicles' arrivals.
    window_start_ms: AtomicU64,
    /// Arrivals sent in the window.
    trips: AtomicU64,
    /// Vehicles capture nothing while set (the portal's baseline phase).
    paused: std::sync::atomic::AtomicBool,
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((cpu, hwm))
}

/// Runs the load and returns the report.
pub async fn load(opts: LoadOptions, shutdown: CancellationToken) -> Result<LoadReport, LoadError> {
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(e)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(e)?;
            tmp.path().to_path_buf()
        }
    };
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        fleetsync_hub::pki::init(&pki, &[]).map_err(e)?;
    }
    let ids: Vec<String> = (0..opts.vehicles).map(|i| format!("LOAD-{i:05}")).collect();
    for id in &ids {
        if !pki.join("devices").join(id).exists() {
            fleetsync_hub::pki::issue_device(&pki, id).map_err(e)?;
        }
    }
    let replicas = opts.topology == Topology::Replicas;
    // What the replicas topology needs, checked before anything is started.
    let mosquitto = match replicas {
        true => {
            crate::replicas::require_store(opts.store.as_deref()).map_err(LoadError)?;
            Some(crate::replicas::mosquitto_exe(opts.mosquitto.as_deref()).map_err(LoadError)?)
        }
        false => None,
    };
    let port = || crate::ports::unused_port().map_err(e);
    let (mqtt, http) = (port()?, port()?);
    // Every simulated vehicle connects from this one address: the per-source handshake
    // cap (a defence against strangers on one address) is lifted to the total.
    let store = crate::hub_store_section(opts.store.as_deref(), &dir.join("hub-data"))
        .await
        .map_err(e)?;
    // The stream clients each hold an HTTP connection (and the harness a few more).
    let http_max = opts.portal.as_ref().map_or(1024, |p| p.clients + 256);
    let broker = match &mosquitto {
        Some(exe) => {
            crate::replicas::issue_hubs(&pki, opts.replicas).map_err(LoadError)?;
            Some(
                Broker::start(exe, &pki, &dir.join("mosquitto"))
                    .await
                    .map_err(LoadError)?,
            )
        }
        None => None,
    };
    // The hub (embedded), or each replica: name, config, log, API port.
    let mut specs = Vec::new();
    match &broker {
        None => {
            let toml = dir.join("hub.toml");
            std::fs::write(
                &toml,
                format!(
                    "[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nmax_connections = {}\nmax_handshakes_per_source = 1024\n[http]\nlisten = \"127.0.0.1:{http}\"\nmax_connections = {http_max}\n{store}[auth]\noperator_token = \"{OPERATOR_TOKEN}\"\n[webhooks]\nallow_insecure_targets = true\nrate_per_s = {WEBHOOK_RATE}\nburst = {WEBHOOK_BURST}\n",
                    pki.join("ca.pem").display(),
                    pki.join("hub.pem").display(),
                    pki.join("hub-key.pem").display(),
                    opts.vehicles + 100,
                ),
            )
            .map_err(e)?;
            specs.push(("hub".to_string(), toml, dir.join("hub.log"), http));
        }
        Some(b) => {
            for i in 0..opts.replicas {
                let name = replica_name(i);
                let http = if i == 0 { http } else { port()? };
                let toml = dir.join(format!("hub-{name}.toml"));
                std::fs::write(
                    &toml,
                    format!(
                        "{}[http]\nlisten = \"127.0.0.1:{http}\"\nmax_connections = {http_max}\n{store}[auth]\noperator_token = \"{OPERATOR_TOKEN}\"\n[webhooks]\nallow_insecure_targets = true\nrate_per_s = {WEBHOOK_RATE}\nburst = {WEBHOOK_BURST}\n",
                        crate::replicas::broker_section(&pki, i, b.port),
                    ),
                )
                .map_err(e)?;
                specs.push((
                    format!("hub {name}"),
                    toml,
                    dir.join(format!("hub-{name}.log")),
                    http,
                ));
            }
        }
    }
    let (device_port, layout) = match &broker {
        None => (mqtt, Layout::Embedded),
        Some(b) => (b.port, Layout::External),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(e)?;
    // Killed when the run ends, or on an early return.
    let mut hubs = Hubs(Vec::new());
    // One at a time: the first replica makes the database's schema.
    for (name, toml, log, http) in &specs {
        let log_file = std::fs::File::create(log).map_err(e)?;
        // `FLEETSYNC_HUB_WRAPPER` runs the hub under another program, e.g.
        // `heaptrack -o /tmp/hub` to see where its memory goes (the RSS figures are then
        // the wrapper's).
        let mut cmd = match std::env::var("FLEETSYNC_HUB_WRAPPER") {
            Ok(w) => {
                let mut it = w.split_whitespace();
                let mut c = std::process::Command::new(it.next().unwrap_or("env"));
                c.args(it).arg(&opts.exe);
                c
            }
            Err(_) => std::process::Command::new(&opts.exe),
        };
        let child = cmd
            .args(["hub", "--config"])
            .arg(toml)
            // `FLEETSYNC_HUB_LOG` overrides the hub's log filter (e.g. to see why
            // connections close: `warn,fleetsync_hub::broker=debug`); the log is
            // `hub.log` (`hub-a.log`, ...) in `--dir`.
            .env(
                "RUST_LOG",
                std::env::var("FLEETSYNC_HUB_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(e)?;
        hubs.0.push((name.clone(), child));
        let url = format!("http://127.0.0.1:{http}/readyz");
        let ready = async {
            for _ in 0..300 {
                if client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        if !ready.await {
            return Err(LoadError(match replicas {
                true => format!("{name} did not become ready (log: {})", log.display()),
                false => "hub did not become ready".into(),
            }));
        }
    }
    let base = format!("http://127.0.0.1:{http}");
    let receiver = match opts.webhooks {
        true => Some(webhook_setup(&client, &base).await?),
        false => None,
    };
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if i > 0 && i % RAMP_PER_S == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let tls = fleetsync_agent::client_tls(
            &pki.join("ca.pem"),
            &pki.join("devices").join(id).join("cert.pem"),
            &pki.join("devices").join(id).join("key.pem"),
        )
        .map_err(e)?;
        // With --webhooks or --portal-clients, each vehicle arrives once at its stop,
        // spread over the window.
        let trip = (receiver.is_some() || opts.portal.is_some()).then(|| {
            opts.duration
                .mul_f64(0.05 + 0.75 * (i as f64 + 0.5) / ids.len() as f64)
        });
        tasks.push(tokio::spawn(vehicle(
            id.clone(),
            device_port,
            layout,
            replicas.then_some(RESEND_AFTER_MS),
            Arc::new(tls),
            opts.rate,
            trip,
            shared.clone(),
            stop.clone(),
        )));
    }
    // Settle, then measure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let customers = opts.portal.as_ref().map_or(0, |p| p.customers);
    let mut erp_token = None;
    let mut webhook_release_drain_ms = 0;
    if receiver.is_some() || opts.portal.is_some() {
        erp_token = Some(release_shipments(&client, &base, &ids, customers).await?);
    }
    if let Some(fake) = &receiver {
        webhook_release_drain_ms = release_drained(fake, ids.len()).await;
    }
    // The stream's RSS figures are the (first) hub's.
    let pid = hubs.0.first().map_or(0, |(_, c)| c.id());
    let mut portal = match (&opts.portal, erp_token) {
        (Some(p), Some(token)) => {
            let stops = ids.iter().map(|id| stop_of(id)).collect();
            let mut portal = crate::load_portal::Portal::connect(
                p.clone(),
                &client,
                &base,
                OPERATOR_TOKEN,
                token,
                pid,
                &ids,
                stops,
            )
            .await?;
            portal.baseline(&shared.paused).await;
            Some(portal)
        }
        _ => None,
    };
    // The processes measured: the hub, or the replicas and the broker.
    let mut pids: Vec<(String, u32)> = hubs.0.iter().map(|(n, c)| (n.clone(), c.id())).collect();
    if let Some(pid) = broker.as_ref().and_then(Broker::pid) {
        pids.push(("mosquitto".into(), pid));
    }
    let before: Vec<_> = pids.iter().map(|(_, pid)| proc_stat(*pid)).collect();
    shared.window_start_ms.store(now_ms(), Ordering::SeqCst);
    shared.measuring.store(true, Ordering::SeqCst);
    let changes = portal.as_mut().map(|p| p.start_window());
    let t = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(opts.duration) => {}
        _ = shutdown.cancelled() => {}
    }
    shared.measuring.store(false, Ordering::SeqCst);
    let window = t.elapsed().as_secs_f64();
    let after: Vec<_> = pids.iter().map(|(_, pid)| proc_stat(*pid)).collect();
    let memory: Vec<_> = pids
        .iter()
        .map(|(_, pid)| crate::replicas::memory(*pid))
        .collect();
    if let (Some(p), Some(changes)) = (portal.as_mut(), changes) {
        p.end_window(changes).await;
    }
    // Stop capturing; wait for the last acks.
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let ticks = 100.0; // USER_HZ on Linux
    let figures = |i: usize| match (before[i], after[i]) {
        (Some((c0, _)), Some((c1, hwm))) => (
            (c1 - c0) as f64 / ticks / window * 100.0,
            hwm as f64 / 1024.0,
        ),
        _ => (0.0, 0.0),
    };
    let mut processes = Vec::new();
    let (mut cpu, mut rss) = (0.0, 0.0);
    for (i, (name, _)) in pids.iter().enumerate() {
        let (c, peak) = figures(i);
        if i < hubs.0.len() {
            // The replicas' CPU adds up; the RSS figure is the larger replica's.
            cpu += c;
            rss = f64::max(rss, peak);
        }
        if replicas {
            processes.push(ProcessFigures {
                name: name.clone(),
                cpu_percent: c,
                rss_mib: memory[i].as_ref().map_or(0.0, |m| m.rss_mib),
                peak_rss_mib: peak,
            });
        }
    }
    // Oracle: every event sent is at the hub exactly once.
    let sent_total = shared.sent.load(Ordering::SeqCst);
    let mut at_hub = 0u64;
    // For the portal: the hub's record time of each fix, by (vehicle, capture time).
    let mut recorded: std::collections::HashMap<(u32, u64), u64> = Default::default();
    for (i, id) in ids.iter().enumerate() {
        let mut after = String::new();
        loop {
            let Ok(r) = client
                .get(format!(
                    "{base}/v1/ops/devices/{id}/events?kind=position&limit=1000&after={after}"
                ))
                .bearer_auth(OPERATOR_TOKEN)
                .send()
                .await
            else {
                break;
            };
            let Ok(page) = r.json::<serde_json::Value>().await else {
                break;
            };
            let events = page["events"].as_array().map_or(&[][..], |a| a.as_slice());
            at_hub += events.len() as u64;
            if portal.is_some() {
                for ev in events {
                    let ms = |k: &str| {
                        let t = chrono::DateTime::parse_from_rfc3339(ev[k].as_str()?).ok()?;
                        u64::try_from(t.timestamp_millis()).ok()
                    };
                    if let (Some(at), Some(rec)) = (ms("event_time"), ms("recorded_time")) {
                        recorded.insert((i as u32, at), rec);
                    }
                }
            }
            match page["next"].as_str() {
                Some(n) => after = n.to_string(),
                None => break,
            }
        }
    }
    let trips = shared.trips.load(Ordering::SeqCst);
    let (webhook_received, webhook_latency_ms) = match &receiver {
        Some(fake) => webhook_latencies(fake, trips).await,
        None => (0, Latency::default()),
    };
    let portal = portal.map(|p| p.report(&recorded));
    let mut hub_duplicates = 0;
    if replicas {
        for (_, _, _, http) in &specs {
            hub_duplicates += metric(
                &client,
                &format!("http://127.0.0.1:{http}"),
                "fleetsync_hub_duplicates_dropped_total",
            )
            .await;
        }
    }
    drop(hubs);
    drop(broker);
    let take = |m: &std::sync::Mutex<Vec<u32>>| {
        percentiles(std::mem::take(
            &mut *m.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    };
    let acked_window = shared.acked_window.load(Ordering::SeqCst);
    let lost = sent_total.saturating_sub(at_hub);
    let duplicated = at_hub.saturating_sub(sent_total);
    Ok(LoadReport {
        vehicles: opts.vehicles,
        rate_hz: opts.rate,
        duration_s: window,
        events_sent: shared.sent_window.load(Ordering::SeqCst),
        events_acked: acked_window,
        acked_per_s: acked_window as f64 / window,
        latency_ms: take(&shared.latencies),
        hub_latency_ms: take(&shared.hub_latencies),
        hub_cpu_percent: cpu,
        resent_after_timeout: shared.resent.load(Ordering::SeqCst),
        hub_duplicates,
        processes,
        topology: opts.topology,
        replicas: if replicas { opts.replicas } else { 0 },
        hub_peak_rss_mib: rss,
        events_captured: sent_total,
        stored_at_hub: at_hub,
        lost,
        duplicated,
        client_errors: shared.errors.load(Ordering::SeqCst),
        client_error_kinds: {
            let kinds = shared.error_kinds.lock().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<(String, u64)> = kinds.iter().map(|(k, n)| (k.clone(), *n)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(5);
            v
        },
        webhook_expected: if receiver.is_some() { trips } else { 0 },
        webhook_received,
        webhook_latency_ms,
        webhook_release_drain_ms,
        ok: lost == 0
            && duplicated == 0
            && sent_total > 0
            && (receiver.is_none() || webhook_received == trips)
            && portal.as_ref().is_none_or(|p| p.ok),
        portal,
    })
}

/// A counter from a hub's `/metrics` (0 if unreadable).
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> u64 {
    let Ok(r) = client
        .get(format!("{base}/metrics"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
    else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn now_ms() -> u64 {
    fleetsync_agent::now_ms()
}

/// The load's webhook subscription hears every event of every vehicle: the release of a
/// shipment per vehicle and each ETA round are bursts of one webhook per shipment, which
/// the default per-subscription rate (50/s) would spread over 20 s at 1,000 vehicles, and
/// every later milestone of a shipment waits for its earlier ones (order per shipment).
/// A partner taking a fleet of that size agrees a higher rate: this one.
const WEBHOOK_RATE: u32 = 500;
/// ... and burst.
const WEBHOOK_BURST: u32 = 100;

/// The webhook receiver's name.
const RECEIVER: &str = "load";

/// `--webhooks`: a receiver in this process, subscribed to every event type.
async fn webhook_setup(
    client: &reqwest::Client,
    base: &str,
) -> Result<crate::fake_erp::FakeErp, LoadError> {
    let fake = crate::fake_erp::FakeErp::start().await.map_err(e)?;
    let r = client
        .post(format!("{base}/v1/ops/webhooks"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&serde_json::json!({"url": fake.hook_url(RECEIVER), "description": "load"}))
        .send()
        .await
        .map_err(e)?;
    let v: serde_json::Value = r.json().await.map_err(e)?;
    let secret = v["secret"]
        .as_str()
        .ok_or_else(|| LoadError(format!("no webhook subscription: {v}")))?;
    fake.set_hook_secrets(RECEIVER, vec![secret.to_string()]);
    Ok(fake)
}

/// The delivery stop of vehicle `id`'s shipment.
fn stop_of(id: &str) -> String {
    format!("{id}-stop")
}

/// Releases one shipment per vehicle through the ERP API (16 at a time; a vehicle the
/// hub has not heard from yet is retried), for customer `LOAD`, or spread over
/// `customers` (see [`crate::load_portal::customer_of`]); the ERP credential's token.
async fn release_shipments(
    client: &reqwest::Client,
    base: &str,
    ids: &[String],
    customers: usize,
) -> Result<String, LoadError> {
    let r = client
        .post(format!("{base}/v1/ops/credentials"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&serde_json::json!({"role": "erp", "name": "load ERP"}))
        .send()
        .await
        .map_err(e)?;
    let v: serde_json::Value = r.json().await.map_err(e)?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| LoadError(format!("no ERP credential: {v}")))?
        .to_string();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ids = Arc::new(ids.to_vec());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (client, base, token, next, ids) = (
            client.clone(),
            base.to_string(),
            token.clone(),
            next.clone(),
            ids.clone(),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok(());
                };
                let body = match customers {
                    0 => serde_json::json!({
                        "reference": format!("SO-{id}"), "customer_id": "LOAD", "vehicle": id,
                        "stops": [{"id": stop_of(id), "kind": "delivery", "name": "Customer",
                                   "location": {"lat": 52.37, "lon": 4.89}, "radius_m": 50}]}),
                    n => crate::load_portal::shipment_body(
                        id,
                        &stop_of(id),
                        &crate::load_portal::customer_of(i, n),
                        1,
                    ),
                };
                let mut tries = 0;
                loop {
                    let r = client
                        .put(format!("{base}/v1/erp/shipments/LS-{id}"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .map_err(e)?;
                    if r.status().is_success() {
                        break;
                    }
                    tries += 1;
                    if tries > 50 {
                        return Err(LoadError(format!(
                            "shipment of {id}: {}",
                            r.text().await.unwrap_or_default()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(e)??;
    }
    Ok(token)
}

/// Waits (120 s at most) until the receiver has the DISPATCHED milestone of each of the
/// `shipments` just released; how long that took, ms.
async fn release_drained(fake: &crate::fake_erp::FakeErp, shipments: usize) -> u64 {
    let t = Instant::now();
    let dispatched = || {
        fake.hook_applied(RECEIVER)
            .iter()
            .filter(|r| r.body["data"]["milestone"] == "DISPATCHED")
            .count()
    };
    while dispatched() < shipments && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.elapsed().as_millis() as u64
}

/// Waits (30 s at most) for the webhook of each of `trips` arrivals; how many came and
/// the latency of each from the hub's record of the arrival.
async fn webhook_latencies(fake: &crate::fake_erp::FakeErp, trips: u64) -> (u64, Latency) {
    let arrivals = || {
        fake.hook_applied(RECEIVER)
            .into_iter()
            .filter(|r| r.body["data"]["milestone"] == "ARRIVED")
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (arrivals().len() as u64) < trips && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = arrivals();
    let lat: Vec<u32> = got
        .iter()
        .filter_map(|r| {
            let t = r.body["recordedtime"].as_str()?;
            let at = chrono::DateTime::parse_from_rfc3339(t).ok()?;
            let at = u64::try_from(at.timestamp_millis()).ok()?;
            Some(r.received_ms.saturating_sub(at).min(u64::from(u32::MAX)) as u32)
        })
        .collect();
    (got.len() as u64, percentiles(lat))
}

/// The hub processes of a run, killed when it ends (or on an early return).
struct Hubs(Vec<(String, std::process::Child)>);

impl Drop for Hubs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn vehicle(
    id: String,
    port: u16,
    layout: Layout,
    resend_after_ms: Option<u64>,
    tls: Arc<rustls::ClientConfig>,
    rate: f64,
    trip: Option<Duration>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut trip = trip;
    let mut opts = MqttOptions::new(id.clone(), "localhost", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    let up = layout
        .topic(&id, Channel::Up)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let down = layout
        .topic(&id, Channel::Down)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let mut capture = tokio::time::interval(period);
    let mut send = tokio::time::interval(Duration::from_secs(1));
    let mut pending: Vec<Event> = Vec::new();
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    let mut seq = 0u64;
    let mut subscribed = false;
    let mut stopping = false;
    let drain_deadline = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(drain_deadline);
    let (lat0, lon0) = (523_700_000, 48_900_000);
    loop {
        tokio::select! {
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(30));
            }
            _ = &mut drain_deadline => return,
            _ = capture.tick(), if subscribed && !stopping => {
                if shared.paused.load(Ordering::Relaxed) {
                    // The portal's baseline: no capture (the tick is taken, so no burst after).
                    continue;
                }
                pending.push(Event {
                    time_ms: now_ms(),
                    body: Body::Position(Fix { lat_e7: lat0 + pending.len() as i32 * 90, lon_e7: lon0, speed_cmps: Some(1000), heading_ddeg: Some(900), hdop_d: Some(9), satellites: Some(9) }),
                });
                shared.sent.fetch_add(1, Ordering::Relaxed);
                if shared.measuring.load(Ordering::Relaxed) {
                    shared.sent_window.fetch_add(1, Ordering::Relaxed);
                    // --webhooks: the arrival at this vehicle's stop, once, when due.
                    let start = shared.window_start_ms.load(Ordering::Relaxed);
                    if let Some(after) = trip
                        && now_ms() >= start + after.as_millis() as u64
                        && let Ok(stop_id) = fleetsync_protocol::BoundedString::try_from_str(&stop_of(&id))
                    {
                        trip = None;
                        pending.push(Event {
                            time_ms: now_ms(),
                            body: Body::Trip(fleetsync_protocol::Trip {
                                kind: fleetsync_protocol::TripKind::Arrived,
                                stop_id: Some(stop_id),
                            }),
                        });
                        // Not in `sent`: the oracle counts positions.
                        shared.trips.fetch_add(1, Ordering::Relaxed);
                        shared.sent_window.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = send.tick(), if subscribed => {
                if let Some(after) = resend_after_ms {
                    let now = now_ms();
                    for b in inflight.iter_mut().filter(|b| now.saturating_sub(b.published_ms) >= after) {
                        b.published_ms = now;
                        let _ = client.try_publish(up.clone(), QoS::AtLeastOnce, false, b.frame.clone());
                        shared.resent.fetch_add(b.n as u64, Ordering::Relaxed);
                    }
                }
                if !pending.is_empty() && inflight.len() < INFLIGHT {
                    let n = pending.len().min(fleetsync_protocol::limits::MAX_BATCH_EVENTS);
                    let events: Vec<Event> = pending.drain(..n).collect();
                    let first_time = events[0].time_ms;
                    let batch = Batch { epoch: 1, first_seq: seq, events: BoundedVec::try_from_iter(events).unwrap_or_default() };
                    if let Ok(bytes) = frame::encode(&Uplink::Batch(batch)) {
                        // Kept until acked: resent as is after a reconnect.
                        let _ = client.try_publish(up.clone(), QoS::AtLeastOnce, false, bytes.clone());
                        inflight.push_back(Inflight { first_seq: seq, n, captured_ms: first_time, published_ms: now_ms(), frame: bytes });
                        seq += n as u64;
                    }
                }
                if stopping && pending.is_empty() && inflight.is_empty() {
                    let _ = client.try_disconnect();
                    return;
                }
            }
            ev = el.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(down.clone(), QoS::AtLeastOnce);
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    subscribed = true;
                    for b in &mut inflight {
                        b.published_ms = now_ms();
                        let _ = client.try_publish(up.clone(), QoS::AtLeastOnce, false, b.frame.clone());
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if let Ok(Downlink::Ack(a)) = frame::decode(&p.payload) {
                        let now = now_ms();
                        // Any batch the ack covers, not only the oldest: replicas ack the
                        // batches they took in parallel, so a later one may come first.
                        inflight.retain(|&Inflight { first_seq: first, n, captured_ms: t0, published_ms: published, .. }| {
                            if !a.ranges.iter().any(|r| r.first <= first && first + n as u64 - 1 <= r.last) {
                                return true;
                            }
                            shared.acked.fetch_add(n as u64, Ordering::Relaxed);
                            if shared.measuring.load(Ordering::Relaxed) {
                                shared.acked_window.fetch_add(n as u64, Ordering::Relaxed);
                                let ms = |since: u64| now.saturating_sub(since).min(u64::from(u32::MAX)) as u32;
                                shared.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(ms(t0));
                                shared.hub_latencies.lock().unwrap_or_else(|p| p.into_inner()).push(ms(published));
                            }
                            false
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    *shared.error_kinds.lock().unwrap_or_else(|p| p.into_inner()).entry(e.to_string()).or_default() += 1;
                    // Unacked batches are resent after reconnecting (the hub dedups).
                    subscribed = false;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// A batch awaiting the hub's ack, kept to be resent as is after a reconnect.
struct Inflight {
    first_seq: u64,
    n: usize,
    /// Capture time of its first event.
    captured_ms: u64,
    /// Time of its last publish.
    published_ms: u64,
    frame: Vec<u8>,
}

/// Percentiles of a set of latencies in ms.
pub(crate) fn percentiles(mut lat: Vec<u32>) -> Latency {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0) as u64
    };
    Latency {
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
        max: lat.last().copied().unwrap_or(0) as u64,
    }
}

/// The readable summary.
pub fn print_summary(r: &LoadReport) {
    println!(
        "load: {} vehicles at {} Hz for {:.0} s: {:.0} events/s acked ({} of {} captured in the window)",
        r.vehicles, r.rate_hz, r.duration_s, r.acked_per_s, r.events_acked, r.events_sent
    );
    for (what, l) in [
        ("capture -> hub ack", &r.latency_ms),
        ("publish -> hub ack", &r.hub_latency_ms),
    ] {
        println!(
            "latency {what}: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            l.p50, l.p90, l.p99, l.max
        );
    }
    if r.topology.is_embedded() {
        println!(
            "hub: {:.0}% of one core, peak RSS {:.1} MiB; client errors {}",
            r.hub_cpu_percent, r.hub_peak_rss_mib, r.client_errors
        );
    } else {
        println!(
            "topology: Mosquitto + {} hub replica(s) on one PostgreSQL database; hubs: {:.0}% of one core together, largest peak RSS {:.1} MiB; client errors {}",
            r.replicas, r.hub_cpu_percent, r.hub_peak_rss_mib, r.client_errors
        );
        for p in &r.processes {
            println!(
                "  {}: {:.0}% of one core, RSS {:.1} MiB, peak RSS {:.1} MiB",
                p.name, p.cpu_percent, p.rss_mib, p.peak_rss_mib
            );
        }
        println!(
            "resent after {RESEND_AFTER_MS} ms without an ack: {} events; the replicas found {} already stored",
            r.resent_after_timeout, r.hub_duplicates
        );
    }
    for (kind, n) in &r.client_error_kinds {
        println!("  {n:>6} x {kind}");
    }
    if r.webhook_expected > 0 {
        let l = &r.webhook_latency_ms;
        println!(
            "webhooks: {} of {} arrivals delivered; hub record -> webhook request: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            r.webhook_received, r.webhook_expected, l.p50, l.p90, l.p99, l.max
        );
        println!(
            "webhooks: the release burst (a DISPATCHED per vehicle) reached the receiver in {} ms, before the window",
            r.webhook_release_drain_ms
        );
    }
    if let Some(p) = &r.portal {
        crate::load_portal::print_summary(p);
    }
    println!(
        "oracle: captured {}, stored at the hub {}, lost {}, duplicated {}: {}",
        r.events_captured,
        r.stored_at_hub,
        r.lost,
        r.duplicated,
        if r.ok { "PASS" } else { "FAIL" }
    );
}

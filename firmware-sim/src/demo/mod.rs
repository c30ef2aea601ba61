//! `fleetsync-sim demo`: a hub and N vehicles with real agents, in this process, on the
//! embedded defaults, so a newcomer sees the whole system with one command.
//!
//! ```text
//! hub (fleetsync_hub::start, temp PKI + data dir) <--mqtts-- agent per vehicle
//!   ^ operator API: assignments, events, blobs            ^ nmea+tcp (vehicle task)
//!   |                                                     ^ ignition file (vehicle task)
//!   +------------------ sim (reqwest) --------------------+ driver API: jobs, POD
//! ```
//!
//! Lifecycle: start hub -> start agents -> print where everything is -> drive rounds with
//! a live display -> (Ctrl-C or `--duration`) stop driving -> drain (agents' backlogs to 0,
//! at most `--drain-s`) -> compare with the hub ([`report`]) -> summary, JSON report ->
//! stop agents and hub.

pub mod display;
pub mod plan;
pub mod portal;
pub mod report;
pub mod vehicle;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_protocol::Lane;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use report::Report;

use crate::SimError;
use vehicle::{VehicleCtx, VehicleState};

/// Most vehicles one demo runs (each is a full agent with a sled store).
pub const MAX_VEHICLES: usize = 100;
/// How long agents and the hub get to stop after the run.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Events read per page from the hub.
const PAGE: usize = 1000;
/// `--speedup` unless given: a newcomer's first minute shows arrivals, PODs and
/// milestones (at 1, the first van reaches its first stop after 40 to 90 s).
pub const DEFAULT_SPEEDUP: f64 = 10.0;

/// The `demo` mode's options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Vehicles to simulate, each a real agent with its own certificate, store and API.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub vehicles: usize,
    /// Seed of the stops, drives and POD outcomes: the same seed gives the same routes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// GPS fixes sent per wall-clock second (their GPS times stay 1 s apart, so the
    /// agents' dwell times and the hub's milestones are those of real driving). The
    /// default, 10, drives a round of stops in about a minute, its first arrival and POD
    /// within the first 20 s; 1 is real time.
    #[arg(long, default_value_t = DEFAULT_SPEEDUP, value_name = "F")]
    pub speedup: f64,
    /// Stop after S seconds, print the summary and exit (default: run until Ctrl-C).
    #[arg(long, value_name = "S")]
    pub duration: Option<u64>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Keep the hub's PKI and data and the agents' stores in DIR (reused by the next run)
    /// instead of a temporary directory deleted at exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The hub's HTTP APIs (operator API, /metrics); if the port is taken a free one is
    /// used and a note says so.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub http: SocketAddr,
    /// Where devices connect (MQTT over TLS 1.3); if the port is taken a free one is used
    /// and a note says so.
    #[arg(long, default_value = "127.0.0.1:8883", value_name = "ADDR")]
    pub mqtt: SocketAddr,
    /// No live progress display (the start-up notes and the summary are still printed).
    #[arg(long)]
    pub no_progress: bool,
    /// Replay a recorded track (GPX, or an NMEA log) instead of generated drives: every
    /// van follows it, with 3 stops along it.
    #[arg(long, value_name = "FILE")]
    pub route: Option<PathBuf>,
    /// Longest wait at the end for every agent's backlog to reach the hub.
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub drain_s: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            vehicles: 5,
            seed: 42,
            speedup: DEFAULT_SPEEDUP,
            duration: None,
            report: None,
            data_dir: None,
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            mqtt: SocketAddr::from(([127, 0, 0, 1], 8883)),
            no_progress: false,
            drain_s: 30,
            route: None,
        }
    }
}

impl DemoOptions {
    fn validate(&self) -> Result<(), SimError> {
        if !(1..=MAX_VEHICLES).contains(&self.vehicles) {
            return Err(SimError::Options(format!(
                "--vehicles: expected 1 to {MAX_VEHICLES}, got {}",
                self.vehicles
            )));
        }
        if !(self.speedup.is_finite() && (0.1..=100.0).contains(&self.speedup)) {
            return Err(SimError::Options(format!(
                "--speedup: expected 0.1 to 100 fixes per second, got {}",
                self.speedup
            )));
        }
        if self.duration == Some(0) {
            return Err(SimError::Options(
                "--duration: expected at least 1 second".into(),
            ));
        }
        Ok(())
    }
}

/// A bearer-token HTTP client for one API.
#[derive(Debug, Clone)]
pub struct Http {
    /// `http://host:port`.
    pub base: String,
    /// Bearer token.
    pub token: String,
    /// The client (10 s timeout).
    pub client: reqwest::Client,
}

impl Http {
    fn new(client: &reqwest::Client, addr: SocketAddr, token: &str) -> Http {
        Http {
            base: format!("http://{addr}"),
            token: token.to_string(),
            client: client.clone(),
        }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
    }

    /// GET `path`, expecting 2xx JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, String> {
        let r = self
            .get(path)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("GET {path}: {}", r.status()));
        }
        r.json().await.map_err(|e| format!("GET {path}: {e}"))
    }
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SimError {
    let what = format!("{what} {}", path.display());
    move |source| SimError::Io { what, source }
}

/// `addr` if it can be bound now, else the same host on a free port (and a note).
fn pick_addr(addr: SocketAddr, what: &str, notes: &mut Vec<String>) -> SocketAddr {
    if addr.port() == 0 || std::net::TcpListener::bind(addr).is_ok() {
        return addr;
    }
    notes.push(format!(
        "{addr} is taken: the {what} uses a free port instead (below)"
    ));
    SocketAddr::new(addr.ip(), 0)
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

struct Started {
    id: String,
    ctx: VehicleCtx,
    api_addr: SocketAddr,
    store: fleetsync_agent::store::Store,
    link: Arc<fleetsync_agent::uplink::LinkState>,
    agent: fleetsync_agent::Running,
    gps: Option<tokio::net::TcpListener>,
}

/// Runs the demo until `shutdown` is cancelled or `--duration` passes; returns the report
/// (also printed, and written to `--report`).
pub async fn demo(opts: DemoOptions, shutdown: CancellationToken) -> Result<Report, SimError> {
    opts.validate()?;
    let (_tmp, root) = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("fleetsync-demo-")
                .tempdir()
                .map_err(io_err(
                    "cannot create a temporary directory in",
                    &std::env::temp_dir(),
                ))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let ids: Vec<String> = (1..=opts.vehicles).map(|i| format!("van-{i:02}")).collect();

    // PKI: a CA, the hub's certificate, one certificate per vehicle (kept ones reused).
    let pki = root.join("pki");
    if !pki.join("ca.pem").exists() {
        fleetsync_hub::pki::init(&pki, &[])?;
    }
    for id in &ids {
        if !pki.join("devices").join(id).join("cert.pem").exists() {
            fleetsync_hub::pki::issue_device(&pki, id)?;
        }
    }

    // The hub, on the defaults of `fleetsync-hub config example`.
    let mut notes = Vec::new();
    let operator_token = random_token();
    let mut cfg =
        fleetsync_hub::Config::parse(fleetsync_hub::config::EXAMPLE).map_err(SimError::Options)?;
    let mqtt = cfg.mqtt.as_mut().ok_or_else(|| {
        SimError::Options("the example config has no [mqtt] (embedded broker)".into())
    })?;
    mqtt.listen = pick_addr(opts.mqtt, "device endpoint", &mut notes);
    mqtt.ca = pki.join("ca.pem");
    mqtt.cert = pki.join("hub.pem");
    mqtt.key = pki.join("hub-key.pem");
    cfg.http.listen = pick_addr(opts.http, "operator API", &mut notes);
    cfg.store = fleetsync_hub::config::StoreConfig::sled(root.join("hub"));
    cfg.auth.operator_token = operator_token.clone();
    // The ERP the hub tells about milestones: a fake one in this process, whose
    // applications the display shows ("ERP: SO-1003 POD_CONFIRMED -> ...").
    let fake_erp = crate::fake_erp::FakeErp::start()
        .await
        .map_err(|source| SimError::Io {
            what: "start the demo's fake ERP".into(),
            source,
        })?;
    cfg.erp = vec![
        toml::from_str(&format!(
            "name = \"demo-erp\"\nbase_url = \"{}\"",
            fake_erp.base_url()
        ))
        .map_err(|e| SimError::Options(format!("demo ERP config: {e}")))?,
    ];
    // Tracking links signed with a key of this run (the hub warns without one).
    cfg.portal.link_keys = vec![format!("{}{}", random_token(), random_token())];
    cfg.validate()
        .map_err(|e| SimError::Options(e.to_string()))?;
    let hub_sd = CancellationToken::new();
    let hub = fleetsync_hub::start(cfg, hub_sd.clone()).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| SimError::Options(format!("HTTP client: {e}")))?;
    let ops = Http::new(&client, hub.http_addr, &operator_token);
    let run_nonce = hex::encode(rand::random::<[u8; 4]>());
    // The ERP's credential: shipments are released through the ERP API.
    let erp_token = client
        .post(format!("{}/v1/ops/credentials", ops.base))
        .bearer_auth(&ops.token)
        .json(&serde_json::json!({"role": "erp", "name": "demo ERP"}))
        .send()
        .await
        .map_err(|e| SimError::Options(format!("making the ERP credential: {e}")))?
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_string))
        .ok_or_else(|| SimError::Options("the hub made no ERP credential".into()))?;
    let erp = Http::new(&client, hub.http_addr, &erp_token);

    // The vehicles' agents.
    let agent_sd = CancellationToken::new();
    let mut vehicles = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        let v = start_vehicle(
            &opts, &root, &pki, &hub, &client, &ops, &erp, &run_nonce, index, id, &agent_sd,
        )
        .await;
        match v {
            Ok(v) => vehicles.push(v),
            Err(e) => {
                agent_sd.cancel();
                hub_sd.cancel();
                return Err(e);
            }
        }
    }

    // The web pages: a customer of the first van's first stop signs in to the portal.
    let customer = match vehicles.first() {
        Some(v) => Some(portal::customer(&ops, &v.ctx).await?),
        None => None,
    };
    print_intro(
        &opts,
        &root,
        opts.data_dir.is_none(),
        &notes,
        &hub,
        &ops,
        &vehicles,
        customer.as_ref(),
    );

    // Drive.
    let drive_sd = CancellationToken::new();
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let mut drivers = Vec::with_capacity(vehicles.len());
    for v in &mut vehicles {
        if let Some(gps) = v.gps.take() {
            drivers.push(tracker.spawn(vehicle::run(v.ctx.clone(), gps, drive_sd.clone())));
        }
    }
    tracker.close();
    if let Some(c) = &customer {
        // Once the first van's round is released (a few seconds).
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = portal::tracking_link(c, Duration::from_secs(30)) => match r {
                Ok(url) => println!(
                    "  tracking link   {url}\n                  ({}'s delivery {}: no sign-in, valid {} h)\n",
                    c.name, c.shipment_id, portal::LINK_TTL_S / 3600
                ),
                Err(e) => warn!(error = %e, "no tracking link for the demo"),
            },
        }
    }
    let display_sd = CancellationToken::new();
    let rows = vehicles
        .iter()
        .map(|v| display::Row {
            id: v.id.clone(),
            state: v.ctx.state.clone(),
            store: v.store.clone(),
            link: v.link.clone(),
        })
        .collect();
    let display = (!opts.no_progress).then(|| {
        tokio::spawn(display::run(
            rows,
            ops.clone(),
            fake_erp.clone(),
            display_sd.clone(),
        ))
    });
    match opts.duration {
        Some(s) => {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(s)) => {}
            }
        }
        None => shutdown.cancelled().await,
    }
    drive_sd.cancel();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .is_err()
    {
        warn!("vehicles did not stop within 30 s");
    }
    // The GPS connections stay open until the agents stop.
    let mut gps_streams = Vec::with_capacity(drivers.len());
    for d in drivers {
        if d.is_finished()
            && let Ok(s) = d.await
        {
            gps_streams.push(s);
        }
    }
    let driven_s = started.elapsed().as_secs_f64();
    display_sd.cancel();
    if let Some(d) = display {
        let _ = d.await;
    }
    println!(
        "\nstopped driving after {driven_s:.0} s; waiting for the agents' backlogs to reach the hub (at most {} s)...",
        opts.drain_s
    );

    // Drain, then compare with the hub.
    let (drained, taken) = drain(&vehicles, Duration::from_secs(opts.drain_s)).await;
    let mut reports = Vec::with_capacity(vehicles.len());
    let mut all_lat = Vec::new();
    for (v, fixes_taken) in vehicles.iter().zip(taken) {
        let (r, lat) = vehicle_report(v, &ops, drained, fixes_taken).await?;
        all_lat.extend(lat);
        reports.push(r);
    }
    let mut report = Report::build(opts.seed, opts.speedup, driven_s, drained, reports, all_lat);
    println!("\n{}", report.summary());
    let (by_state, open) = shipments_at_hub(&ops).await;
    let total: u64 = by_state.values().sum();
    let states: Vec<String> = by_state.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "shipments released through the ERP API: {total} ({})\nreview queue: {open} open (GET /v1/ops/review?status=open)",
        states.join(", ")
    );
    report.shipments = by_state;
    report.review_open = open;
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| SimError::Options(format!("report: {e}")))?;
        std::fs::write(path, json).map_err(io_err("cannot write the report to", path))?;
        println!("report written to {}", path.display());
    }

    // Stop everything.
    agent_sd.cancel();
    for v in vehicles {
        if tokio::time::timeout(STOP_GRACE, v.agent.wait())
            .await
            .is_err()
        {
            warn!(vehicle = %v.id, "agent did not stop in time");
        }
    }
    drop(gps_streams);
    hub_sd.cancel();
    if tokio::time::timeout(STOP_GRACE, hub.wait()).await.is_err() {
        warn!("hub did not stop in time");
    }
    info!("demo finished");
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn start_vehicle(
    opts: &DemoOptions,
    root: &Path,
    pki: &Path,
    hub: &fleetsync_hub::Running,
    client: &reqwest::Client,
    ops: &Http,
    erp: &Http,
    run_nonce: &str,
    index: usize,
    id: &str,
    agent_sd: &CancellationToken,
) -> Result<Started, SimError> {
    let dir = root.join("vehicles").join(id);
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let ignition = dir.join("ignition");
    std::fs::write(&ignition, "0\n").map_err(io_err("cannot write", &ignition))?;
    let gps = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(io_err("cannot listen for the GPS stream of", Path::new(id)))?;
    let gps_addr = gps
        .local_addr()
        .map_err(io_err("GPS stream address of", Path::new(id)))?;
    let track = match &opts.route {
        Some(path) => Some(Arc::new(
            crate::route::load_track(path)
                .map_err(|e| SimError::Options(format!("--route: {e}")))?,
        )),
        None => None,
    };
    let token = random_token();
    let mut cfg: fleetsync_agent::Config = toml::from_str(fleetsync_agent::config::EXAMPLE)
        .map_err(|e| SimError::Options(format!("agent example config: {e}")))?;
    cfg.device_id = id.to_string();
    cfg.hub.url = format!("mqtts://localhost:{}", hub.mqtt_addr.port());
    let dev = pki.join("devices").join(id);
    cfg.hub.ca = pki.join("ca.pem");
    cfg.hub.cert = dev.join("cert.pem");
    cfg.hub.key = dev.join("key.pem");
    cfg.store.path = dir.join("store");
    cfg.api.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.api.token = token.clone();
    cfg.gps.source = Some(format!("nmea+tcp://{gps_addr}"));
    cfg.ignition.path = Some(ignition.clone());
    cfg.health.interval_s = 10;
    cfg.validate()
        .map_err(|e| SimError::Options(format!("{id}: {e}")))?;
    let agent = fleetsync_agent::start(cfg, agent_sd.clone())
        .await
        .map_err(|source| SimError::Agent {
            vehicle: id.to_string(),
            source,
        })?;
    let ctx = VehicleCtx {
        id: id.to_string(),
        index,
        seed: opts.seed,
        speedup: opts.speedup,
        run_nonce: run_nonce.to_string(),
        ops: ops.clone(),
        erp: erp.clone(),
        driver: Http::new(client, agent.api_addr, &token),
        ignition,
        state: Arc::new(VehicleState::default()),
        track,
    };
    Ok(Started {
        id: id.to_string(),
        api_addr: agent.api_addr,
        store: agent.store.clone(),
        link: agent.link.clone(),
        ctx,
        agent,
        gps: Some(gps),
    })
}

/// Shipments by state as the hub has them (after PODs had a moment to be judged), and
/// the open items of the review queue.
async fn shipments_at_hub(ops: &Http) -> (std::collections::BTreeMap<String, u64>, u64) {
    let mut by_state: std::collections::BTreeMap<String, u64> = Default::default();
    let mut last = String::new();
    for _ in 0..10 {
        by_state.clear();
        let mut cursor = String::new();
        loop {
            let path = format!("/v1/ops/shipments?limit=1000{cursor}");
            let Ok(page) = ops.get_json(&path).await else {
                break;
            };
            for s in page["shipments"].as_array().into_iter().flatten() {
                *by_state
                    .entry(s["state"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
            match page["next"].as_str() {
                Some(n) => cursor = format!("&cursor={n}"),
                None => break,
            }
        }
        let now = format!("{by_state:?}");
        // Settled once two looks a second apart agree and nothing waits for its photos.
        if now == last && !by_state.contains_key("DELIVERED") {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let open = ops
        .get_json("/v1/ops/review?status=open")
        .await
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0) as u64;
    (by_state, open)
}

#[allow(clippy::too_many_arguments)]
fn print_intro(
    opts: &DemoOptions,
    root: &Path,
    temporary: bool,
    notes: &[String],
    hub: &fleetsync_hub::Running,
    ops: &Http,
    vehicles: &[Started],
    customer: Option<&portal::Customer>,
) {
    let base = &ops.base;
    let token = &ops.token;
    let first = vehicles.first().map_or("van-01", |v| v.id.as_str());
    let mut s = String::new();
    s.push_str(&format!(
        "fleetsync demo: a hub and {} vehicles with real agents (seed {}, speedup {})\n",
        vehicles.len(),
        opts.seed,
        opts.speedup
    ));
    for n in notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s.push_str(&format!(
        "  data dir        {}{}\n",
        root.display(),
        if temporary {
            " (deleted at exit; keep it with --data-dir)"
        } else {
            ""
        }
    ));
    s.push_str(&format!("  operator API    {base}/v1/ops   (OpenAPI: {base}/v1/openapi.json, metrics: {base}/metrics)\n"));
    s.push_str(&format!("  operator token  {token}\n"));
    s.push_str(&format!(
        "  devices         mqtts://{} (TLS 1.3, client certificates from {})\n",
        hub.mqtt_addr,
        root.join("pki").display()
    ));
    s.push_str("  try:\n");
    s.push_str(&format!(
        "    curl -s -H 'Authorization: Bearer {token}' {base}/v1/ops/devices\n"
    ));
    s.push_str(&format!(
        "    curl -s -H 'Authorization: Bearer {token}' '{base}/v1/ops/devices/{first}/events?limit=20&kind=geofence'\n"
    ));
    s.push_str(&format!(
        "    curl -s -H 'Authorization: Bearer {token}' '{base}/v1/ops/shipments?limit=20'   (then /v1/ops/shipments/ID: its milestones)\n"
    ));
    s.push_str("  web pages (open in a browser; the tokens stay in the tab):\n");
    if let Some(c) = customer {
        s.push_str(&format!(
            "    portal        {}\n                  (signed in as customer {}: {}'s shipments, live)\n",
            portal::portal_url(c),
            c.id,
            c.name
        ));
    }
    s.push_str(&format!(
        "    console       {}\n                  (the operator: fleet map, stuck shipments, review queue, dead letters)\n",
        portal::console_url(ops)
    ));
    s.push_str("  vehicles (the driver's local API: GET /v1/jobs, GET /v1/status, POST /v1/stops/{stop}/pod):\n");
    for v in vehicles {
        s.push_str(&format!(
            "    {:<8} http://{}   token {}\n",
            v.id, v.api_addr, v.ctx.driver.token
        ));
    }
    s.push_str(&format!(
        "GPS time runs {}x wall time (--speedup 1: real time). What happens is told below as it happens: \
         arrivals (the agents' geofences), PODs, the hub's shipment milestones.\n",
        opts.speedup
    ));
    match opts.duration {
        Some(d) => s.push_str(&format!("running for {d} s (Ctrl-C stops earlier)\n")),
        None => s.push_str(
            "running until Ctrl-C (the hub stays up meanwhile: try the commands above)\n",
        ),
    }
    println!("{s}");
}

/// Waits until every agent has read every fix sent and its backlog is empty, or `max`
/// passes. Returns whether all drained, and each agent's fixes read.
async fn drain(vehicles: &[Started], max: Duration) -> (bool, Vec<u64>) {
    let deadline = Instant::now() + max;
    loop {
        let mut all = true;
        let mut taken = Vec::with_capacity(vehicles.len());
        for v in vehicles {
            let sent = v.ctx.state.progress().fixes_sent;
            let fixes = match v.ctx.driver.get_json("/v1/status").await {
                Ok(s) => s["gps"]["fixes"].as_u64().unwrap_or(0),
                Err(_) => 0,
            };
            let s = v.store.stats();
            let backlog = s.critical.events + s.telemetry.events + s.blobs.events;
            all &= fixes >= sent && backlog == 0;
            taken.push(fixes);
        }
        if all || Instant::now() > deadline {
            return (all, taken);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every event of `device` at the hub, following the pages.
async fn hub_events(ops: &Http, device: &str) -> Result<Vec<Value>, SimError> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = ops
            .get_json(&format!(
                "/v1/ops/devices/{device}/events?limit={PAGE}&after={after}"
            ))
            .await;
        let page = match page {
            Ok(p) => p,
            // A device that never sent anything is simply absent.
            Err(e) if e.ends_with("404 Not Found") => return Ok(out),
            Err(e) => return Err(SimError::Hub(e)),
        };
        if let Some(events) = page["events"].as_array() {
            out.extend(events.iter().cloned());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return Ok(out),
        }
    }
}

/// Events the agent still holds (both lanes).
fn left_in_agent(store: &fleetsync_agent::store::Store) -> Vec<(u32, u64)> {
    const MAX_LEFT: usize = 1_000_000;
    let mut out = Vec::new();
    for lane in [Lane::Critical, Lane::Telemetry] {
        let mut after = None;
        while out.len() < MAX_LEFT {
            let Ok(Some(b)) = store.next_batch(lane, after, PAGE, usize::MAX) else {
                break;
            };
            let n = b.events.len() as u64;
            if n == 0 {
                break;
            }
            out.extend((0..n).map(|i| (b.epoch, b.first_seq + i)));
            after = Some(fleetsync_agent::store::EventId {
                epoch: b.epoch,
                seq: b.first_seq + n - 1,
            });
        }
    }
    out
}

async fn vehicle_report(
    v: &Started,
    ops: &Http,
    drained: bool,
    fixes_taken: u64,
) -> Result<(report::VehicleReport, Vec<u64>), SimError> {
    let epoch = v.store.epoch();
    let events = hub_events(ops, &v.id).await?;
    let pods = v.ctx.state.pods();
    let left = if drained {
        Vec::new()
    } else {
        left_in_agent(&v.store)
    };
    let view = report::check(
        &events,
        epoch,
        &pods,
        &left,
        &v.ctx.state.fix_wall(),
        fixes_taken,
    );
    let mut counts = view.counts;
    let p = v.ctx.state.progress();
    counts.fixes_sent = p.fixes_sent;
    counts.pods_failed = p.pods_failed;
    counts.rounds_done = u64::from(p.rounds_done);
    for pod in &pods {
        for blob in &pod.blobs {
            counts.blobs_posted += 1;
            let bytes = blob.bytes();
            let sha = vehicle::sha256_hex(&bytes);
            if let Ok(r) = ops.get(&format!("/v1/ops/blobs/{sha}")).await
                && r.status() == 200
                && let Ok(got) = r.bytes().await
                && got.as_ref() == bytes.as_slice()
            {
                counts.blobs_verified += 1;
            }
        }
    }
    let latency = report::Latency::of(view.latencies.clone());
    Ok((
        report::VehicleReport {
            id: v.id.clone(),
            epoch,
            counts,
            latency,
        },
        view.latencies,
    ))
}

//! `chaos`: real agent processes and a hub process under faults, then the oracle.
//!
//! ```text
//! sim --NMEA/tcp--> agent process --mqtts--> proxy (per vehicle) --> hub process
//!  |  driver: exceptions, PODs (with blobs), telemetry bursts via the agent's API
//!  |  faults: kill -9 agent / hub (restarted), link cut, acks black-holed (-> resends
//!  |          -> duplicates at the hub), link delay, disk quota pressure (vehicle 0:
//!  |          small quota, bursts while cut off -> Gap events), clock skew (vehicle 1:
//!  |          GPS time 2 minutes ahead)
//!  |  a customer's portal streams open throughout (reconnecting with Last-Event-ID,
//!  |  one twice away longer than the feed's slack): see [`portal_watch`]
//!  `-> after the run: restore everything, wait for every backlog to drain, then the oracle
//!      (events, PODs, the ERP and webhook sinks, the evidence links, the portal stream)
//! ```
//!
//! `--topology replicas` puts a Mosquitto (started here, see [`crate::replicas`]) and two
//! hub replica processes on one PostgreSQL database where the hub was; the proxies lead
//! to the broker, the agents use the external layout (`[hub] broker = "external"`). Its
//! faults replace the hub's kill -9 with a kill -9 of one replica at a time (started again
//! a few seconds later, while the other carries the fleet and both run the outbox), and
//! add broker restarts (SIGTERM, started again on the same port). The oracle is the same,
//! read from replica a, and replica b must hold the same events.
//!
//! Processes are this same executable run as `fleetsync-sim hub|agent --config FILE`, so
//! they are the real hub and agent code in separate processes that can be killed with -9.
//! Every loop is bounded by the run's duration plus a drain deadline.

pub mod oracle;
pub mod portal_watch;
pub mod proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::fake_erp::{FakeErp, Fault};
use crate::replicas::{Broker, REPLICAS, Topology, replica_name};
use crate::route::{SimFix, Waypoint, drive};
use oracle::{Accepted, Verdict};
use proxy::{Link, Mode};

const OPERATOR_TOKEN: &str = "chaos-operator-token-0123456789abcdef";
const DRIVER_TOKEN: &str = "chaos-driver-token-0123456789abcdef";
/// The vehicle whose disk quota is squeezed.
const QUOTA_VEHICLE: usize = 0;
/// Its quota (the smallest the agent accepts).
const SMALL_QUOTA: u64 = 64 * 1024;
/// The vehicle whose GPS clock runs ahead.
const SKEW_VEHICLE: usize = 1;
const SKEW_MS: u64 = 120_000;
/// How long the backlog may take to drain once faults stop.
const DRAIN: Duration = Duration::from_secs(120);

/// Flags of `fleetsync-sim chaos`.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Vehicles (agent processes).
    pub vehicles: usize,
    /// How long faults are injected.
    pub duration: Duration,
    /// Seed of routes and the fault schedule.
    pub seed: u64,
    /// The executable to run as `hub` / `agent` (normally this one).
    pub exe: PathBuf,
    /// Keep the working directory here instead of a temporary one.
    pub dir: Option<PathBuf>,
    /// PostgreSQL URL for the hub's store (sled in the working directory if `None`).
    pub store: Option<String>,
    /// One hub, or a broker and hub replicas (which need `store`).
    pub topology: Topology,
    /// The Mosquitto executable for `replicas` (see [`crate::replicas::mosquitto_exe`]).
    pub mosquitto: Option<PathBuf>,
}

/// Faults injected, by kind.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Faults {
    /// Agent processes killed with -9.
    pub agent_kills: u32,
    /// Hub process killed with -9.
    pub hub_kills: u32,
    /// Links cut.
    pub link_cuts: u32,
    /// Links whose acks were black-holed.
    pub ack_blackholes: u32,
    /// Links delayed.
    pub link_delays: u32,
    /// Telemetry bursts into the small-quota vehicle while cut off.
    pub quota_bursts: u32,
    /// Vehicles with a skewed GPS clock.
    pub clock_skews: u32,
    /// Webhook secrets rotated mid-run.
    pub secret_rotations: u32,
    /// `replicas`: hub replicas killed with -9 (one at a time).
    #[serde(skip_serializing_if = "is_zero")]
    pub replica_kills: u32,
    /// `replicas`: broker restarts (SIGTERM, started again).
    #[serde(skip_serializing_if = "is_zero")]
    pub broker_restarts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The chaos report.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Vehicles.
    pub vehicles: usize,
    /// Seconds of faults.
    pub duration_s: u64,
    /// Seed.
    pub seed: u64,
    /// Left out for the embedded topology.
    #[serde(skip_serializing_if = "Topology::is_embedded")]
    pub topology: Topology,
    /// Faults by kind.
    pub faults: Faults,
    /// The oracle's figures and verdict.
    pub oracle: Verdict,
}

/// Why chaos could not run.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Set-up failed.
    #[error("chaos set-up: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(e: E) -> ChaosError {
    ChaosError::Setup(e.to_string())
}

fn free_port() -> Result<u16, ChaosError> {
    crate::ports::unused_port().map_err(setup)
}

/// A child process we can kill -9 and start again.
struct Proc {
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(exe: &Path, args: &[&str], log: PathBuf) -> Proc {
        Proc {
            exe: exe.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
            child: None,
        }
    }

    fn start(&mut self) -> Result<(), ChaosError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(setup)?;
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env("RUST_LOG", "warn,rumqttd=off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(setup)?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Vehicle {
    id: String,
    api: SocketAddr,
    proc: Mutex<Proc>,
    link: Link,
    fixes: Vec<SimFix>,
    /// Fixes written to the agent's GPS socket: (index, wall time written).
    sent: Mutex<Vec<(usize, Instant)>>,
    /// Wall times of kills of this agent and when it was back.
    kills: Mutex<Vec<(Instant, Instant)>>,
    accepted: Mutex<Vec<Accepted>>,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

async fn wait_ok(client: &reqwest::Client, url: &str, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn agent_toml(
    dir: &Path,
    pki: &Path,
    id: &str,
    proxy: u16,
    api: u16,
    gps: u16,
    quota: u64,
    external: bool,
) -> String {
    let d = pki.join("devices").join(id);
    let broker = if external {
        "broker = \"external\"\n"
    } else {
        ""
    };
    format!(
        r#"device_id = "{id}"
[hub]
url = "mqtts://localhost:{proxy}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
ack_timeout_ms = 3000
{broker}[store]
path = "{store}"
quota_bytes = {quota}
[api]
listen = "127.0.0.1:{api}"
token = "{DRIVER_TOKEN}"
[gps]
source = "nmea+tcp://127.0.0.1:{gps}"
[health]
interval_s = 5
[uplink]
batch_max_delay_ms = 500
"#,
        ca = pki.join("ca.pem").display(),
        cert = d.join("cert.pem").display(),
        key = d.join("key.pem").display(),
        store = dir.join(format!("agent-{id}")).display(),
    )
}

/// Runs chaos and returns the report; the oracle's verdict is in it.
pub async fn chaos(
    opts: ChaosOptions,
    shutdown: CancellationToken,
) -> Result<ChaosReport, ChaosError> {
    let replicas = opts.topology == Topology::Replicas;
    // What the replicas topology needs, checked before anything is made.
    let mosquitto = if replicas {
        crate::replicas::require_store(opts.store.as_deref()).map_err(ChaosError::Setup)?;
        Some(crate::replicas::mosquitto_exe(opts.mosquitto.as_deref()).map_err(ChaosError::Setup)?)
    } else {
        None
    };
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(setup)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(setup)?;
            tmp.path().to_path_buf()
        }
    };
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        fleetsync_hub::pki::init(&pki, &[]).map_err(setup)?;
    }
    let mut broker = match &mosquitto {
        Some(exe) => {
            crate::replicas::issue_hubs(&pki, REPLICAS).map_err(ChaosError::Setup)?;
            Some(
                Broker::start(exe, &pki, &dir.join("mosquitto"))
                    .await
                    .map_err(ChaosError::Setup)?,
            )
        }
        None => None,
    };
    let (mqtt, http_port) = (free_port()?, free_port()?);
    // Where the vehicles' proxies lead: the hub's own broker, or the external one.
    let device_port = broker.as_ref().map_or(mqtt, |b| b.port);
    let hub_addr: SocketAddr = format!("127.0.0.1:{device_port}").parse().map_err(setup)?;
    let store = crate::hub_store_section(opts.store.as_deref(), &dir.join("hub-data"))
        .await
        .map_err(setup)?;
    // The ERP: a fake that applies each Idempotency-Key once and answers from a seeded
    // plan of faults (throttling, outages, 500s, a timeout after it applied the call).
    // The same server hosts the partners' webhook receivers, each with its own plan
    // (and one outage of several seconds: an hour-long one, compressed in time).
    let erp = FakeErp::start().await.map_err(setup)?;
    erp.plan(erp_faults(opts.seed, 400));
    for (i, r) in RECEIVERS.iter().enumerate() {
        erp.plan_hook(r, erp_faults(opts.seed ^ (i as u64 + 1), 400));
    }
    let link_key = format!("chaos-{:016x}-{:016x}", rand::random::<u64>(), opts.seed);
    let hub_config = |transport: &str, http_port: u16| {
        format!(
            "{transport}[http]\nlisten = \"127.0.0.1:{http_port}\"\n{store}[auth]\noperator_token = \"{OPERATOR_TOKEN}\"\n\
             [[erp]]\nname = \"{ERP_NAME}\"\nbase_url = \"{erp_url}\"\ntimeout_ms = 1000\nbackoff_ms = 100\nbackoff_cap_ms = 2000\nbreaker_failures = 5\nbreaker_open_ms = 2000\nrate_per_s = 100\nburst = 8\n\
             [webhooks]\nallow_insecure_targets = true\ntimeout_ms = 1000\nretry_schedule_s = {schedule:?}\nbreaker_failures = 5\nbreaker_open_ms = 2000\n\
             [portal]\nlink_keys = [\"{link_key}\"]\n",
            schedule = [[0.0].as_slice(), &[0.5, 1.0], &[2.0; 60]].concat(),
            // One key for every replica: a link one signs opens at any other.
            link_key = link_key,
            erp_url = erp.base_url(),
        )
    };
    // The hub process (embedded), or each replica: its config, log and API.
    let mut hub_specs: Vec<(PathBuf, PathBuf, String)> = Vec::new();
    match &broker {
        None => {
            let transport = format!(
                "[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                ca = pki.join("ca.pem").display(),
                cert = pki.join("hub.pem").display(),
                key = pki.join("hub-key.pem").display(),
            );
            hub_specs.push((
                dir.join("hub.toml"),
                dir.join("hub.log"),
                format!("http://127.0.0.1:{http_port}"),
            ));
            std::fs::write(&hub_specs[0].0, hub_config(&transport, http_port)).map_err(setup)?;
        }
        Some(b) => {
            for i in 0..REPLICAS {
                let http = if i == 0 { http_port } else { free_port()? };
                let name = replica_name(i);
                let toml = dir.join(format!("hub-{name}.toml"));
                let transport = crate::replicas::broker_section(&pki, i, b.port);
                std::fs::write(&toml, hub_config(&transport, http)).map_err(setup)?;
                hub_specs.push((
                    toml,
                    dir.join(format!("hub-{name}.log")),
                    format!("http://127.0.0.1:{http}"),
                ));
            }
        }
    }
    let hub_urls: Vec<String> = hub_specs.iter().map(|(_, _, u)| u.clone()).collect();
    let hub_http = hub_urls[0].clone();
    let mut hubs = Vec::new();
    let client = http();
    // One at a time: the first replica makes the database's schema.
    for (toml, log, url) in &hub_specs {
        let toml_s = toml.display().to_string();
        let hub = Arc::new(Mutex::new(Proc::new(
            &opts.exe,
            &["hub", "--config", &toml_s],
            log.clone(),
        )));
        lock(&hub).start()?;
        if !wait_ok(&client, &format!("{url}/readyz"), Duration::from_secs(30)).await {
            return Err(ChaosError::Setup(if replicas {
                format!("hub replica did not become ready (log: {})", log.display())
            } else {
                "hub did not become ready".into()
            }));
        }
        hubs.push(hub);
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let start_ms = fleetsync_agent::now_ms();
    let mut vehicles = Vec::new();
    let mut gps_listeners = Vec::new();
    for i in 0..opts.vehicles {
        let id = format!("CHAOS-{i:03}");
        if !pki.join("devices").join(&id).exists() {
            fleetsync_hub::pki::issue_device(&pki, &id).map_err(setup)?;
        }
        let proxy_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(setup)?;
        let proxy_port = proxy_l.local_addr().map_err(setup)?.port();
        let link = proxy::start(proxy_l, hub_addr, shutdown.clone());
        let gps_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(setup)?;
        let gps_port = gps_l.local_addr().map_err(setup)?.port();
        let api = free_port()?;
        let quota = if i == QUOTA_VEHICLE {
            SMALL_QUOTA
        } else {
            64 << 20
        };
        let toml = dir.join(format!("agent-{id}.toml"));
        std::fs::write(
            &toml,
            agent_toml(&dir, &pki, &id, proxy_port, api, gps_port, quota, replicas),
        )
        .map_err(setup)?;
        let toml_s = toml.display().to_string();
        let mut p = Proc::new(
            &opts.exe,
            &["agent", "--config", &toml_s],
            dir.join(format!("agent-{id}.log")),
        );
        p.start()?;
        // A loop around a random centre, long enough for the run.
        let (lat, lon) = (
            52.30 + rng.random_range(0.0..0.1),
            4.80 + rng.random_range(0.0..0.15),
        );
        let mut wps = vec![Waypoint {
            lat,
            lon,
            dwell_s: 2,
        }];
        for _ in 0..12 {
            wps.push(Waypoint {
                lat: lat + rng.random_range(-0.01..0.01),
                lon: lon + rng.random_range(-0.015..0.015),
                dwell_s: rng.random_range(5..20),
            });
        }
        let skew = if i == SKEW_VEHICLE { SKEW_MS } else { 0 };
        let mut fixes = drive(&wps, start_ms + skew, 11.0, opts.seed ^ i as u64);
        fixes.truncate(
            (opts.duration.as_secs() as usize + DRAIN.as_secs() as usize + 30).min(fixes.len()),
        );
        vehicles.push(Arc::new(Vehicle {
            api: format!("127.0.0.1:{api}").parse().map_err(setup)?,
            id,
            proc: Mutex::new(p),
            link,
            fixes,
            sent: Mutex::new(Vec::new()),
            kills: Mutex::new(Vec::new()),
            accepted: Mutex::new(Vec::new()),
        }));
        gps_listeners.push(gps_l);
    }
    let mut faults = Faults {
        clock_skews: u32::from(opts.vehicles > SKEW_VEHICLE),
        ..Faults::default()
    };
    let erp_token = make_credential(
        &client,
        &hub_http,
        json!({"role": "erp", "name": "chaos ERP"}),
    )
    .await?;
    // Customer CHAOS's portal page, open from before its shipments exist to the end,
    // through every fault (and, with replicas, on each replica in turn).
    let customer_token = make_credential(
        &client,
        &hub_http,
        json!({"role": "customer", "name": "chaos customer", "customer_id": "CHAOS"}),
    )
    .await?;
    let watch_stop = CancellationToken::new();
    let ours: portal_watch::Ours = Arc::new(|id: &str| id.starts_with("SHP-CHAOS-"));
    let (watches, watch_tasks): (Vec<_>, Vec<_>) = [("steady", None), ("roaming", Some(opts.seed))]
        .into_iter()
        .map(|(name, roam)| {
            portal_watch::start(
                name,
                hub_urls.clone(),
                customer_token.clone(),
                ours.clone(),
                roam,
                opts.duration,
                watch_stop.clone(),
            )
        })
        .unzip();
    // Two partners: one hears of everything, one of CHAOS's milestones but estimates.
    let mut subs = Vec::new();
    for (i, receiver) in RECEIVERS.iter().enumerate() {
        let hears_eta = i == 0;
        let sub = subscribe(&client, &hub_http, &erp_token, &erp, receiver, hears_eta).await?;
        subs.push(oracle::Subscription {
            id: sub,
            receiver: receiver.to_string(),
            hears_eta,
        });
    }
    for v in &vehicles {
        if !wait_ok(
            &client,
            &format!("http://{}/healthz", v.api),
            Duration::from_secs(30),
        )
        .await
        {
            return Err(ChaosError::Setup(format!("agent {} did not start", v.id)));
        }
        // The vehicle's shipment, released through the ERP API: one delivery at the
        // middle of its route; the hub builds the vehicle's assignment from it. The hub
        // knows a vehicle once its gateway has been heard from: retried until then.
        let stop = &v.fixes[v.fixes.len() / 2];
        let body = json!({
            "reference": format!("SO-{}", v.id), "customer_id": "CHAOS", "vehicle": v.id,
            "stops": [{"id": stop_id(&v.id), "kind": "delivery", "name": "Customer",
                       "location": {"lat": stop.lat, "lon": stop.lon}, "radius_m": 50}],
            "pod_policy": {"signature": true, "min_photos": 1}});
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = client
                .put(format!(
                    "{hub_http}/v1/erp/shipments/{}",
                    shipment_id(&v.id)
                ))
                .bearer_auth(&erp_token)
                .json(&body)
                .send()
                .await
                .map_err(setup)?;
            if r.status().is_success() {
                break;
            }
            let (status, text) = (r.status(), r.text().await.unwrap_or_default());
            if status != 400 || Instant::now() > deadline {
                return Err(ChaosError::Setup(format!(
                    "shipment for {}: {status}: {text}",
                    v.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Feeders and drivers run until `stop`; faults until the duration is over.
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for (v, l) in vehicles.iter().zip(gps_listeners) {
        tasks.push(tokio::spawn(feed_gps(v.clone(), l, stop.clone())));
        tasks.push(tokio::spawn(driver(
            v.clone(),
            client.clone(),
            stop.clone(),
            opts.seed,
        )));
    }
    let run_until = Instant::now() + opts.duration;
    let fault_gap = Duration::from_millis(
        (opts.duration.as_millis() as u64 / (opts.vehicles as u64 + 6)).clamp(1500, 8000),
    );
    let mut next_hub_kill = opts.duration.as_secs_f64() * rng.random_range(0.3..0.45);
    let mut hub_kills_left = if replicas { 0 } else { 2 };
    // Replicas: three kills -9 of one replica at a time, alternating, each down a few
    // seconds while the fault loop goes on; two broker restarts.
    let mut replica_kills_left = 0;
    let mut next_replica_kill = 0.0;
    let mut next_victim = 0;
    let mut broker_restarts_left = 0;
    let mut next_broker_restart = 0.0;
    if replicas {
        replica_kills_left = 3;
        next_replica_kill = opts.duration.as_secs_f64() * rng.random_range(0.1..0.2);
        next_victim = rng.random_range(0..REPLICAS);
        broker_restarts_left = 2;
        next_broker_restart = opts.duration.as_secs_f64() * rng.random_range(0.25..0.35);
    }
    // When the replica killed last is up again (no second kill before that).
    let mut replica_back = Instant::now();
    let mut replica_restarts = Vec::new();
    let t0 = Instant::now();
    // Half way, the first partner's secret is rotated: both sign during the overlap, and
    // its receiver accepts either, as a partner switching over would. (Replicas: through
    // replica b; the subscription was made through a.)
    let rotation = tokio::spawn(rotate_later(
        client.clone(),
        hub_urls[hub_urls.len() - 1].clone(),
        erp.clone(),
        subs[0].clone(),
        opts.duration / 2,
    ));
    while Instant::now() < run_until && !shutdown.is_cancelled() {
        tokio::time::sleep(fault_gap.min(run_until.saturating_duration_since(Instant::now())))
            .await;
        if Instant::now() >= run_until {
            break;
        }
        if hub_kills_left > 0 && t0.elapsed().as_secs_f64() > next_hub_kill {
            hub_kills_left -= 1;
            next_hub_kill += opts.duration.as_secs_f64() * 0.35;
            lock(&hubs[0]).kill9();
            faults.hub_kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
            lock(&hubs[0]).start()?;
            continue;
        }
        if replica_kills_left > 0
            && t0.elapsed().as_secs_f64() > next_replica_kill
            && Instant::now() > replica_back
        {
            replica_kills_left -= 1;
            next_replica_kill += opts.duration.as_secs_f64() * 0.3;
            let hub = hubs[next_victim].clone();
            next_victim = (next_victim + 1) % REPLICAS;
            lock(&hub).kill9();
            faults.replica_kills += 1;
            let down = Duration::from_millis(rng.random_range(2000..8000));
            replica_back = Instant::now() + down;
            replica_restarts.push(tokio::spawn(async move {
                tokio::time::sleep(down).await;
                lock(&hub).start()
            }));
            continue;
        }
        if let Some(b) = broker.as_mut()
            && broker_restarts_left > 0
            && t0.elapsed().as_secs_f64() > next_broker_restart
        {
            broker_restarts_left -= 1;
            next_broker_restart += opts.duration.as_secs_f64() * 0.4;
            b.stop().await;
            faults.broker_restarts += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
            b.spawn().await.map_err(ChaosError::Setup)?;
            continue;
        }
        let v = vehicles[rng.random_range(0..vehicles.len())].clone();
        match rng.random_range(0..5) {
            0 => {
                let killed = Instant::now();
                lock(&v.proc).kill9();
                faults.agent_kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..2000))).await;
                lock(&v.proc).start()?;
                let back = Instant::now() + Duration::from_secs(3);
                lock(&v.kills).push((killed, back));
            }
            1 => {
                v.link.set(Mode::Cut);
                faults.link_cuts += 1;
                let v2 = v.clone();
                let d = Duration::from_millis(rng.random_range(2000..8000));
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    v2.link.set(Mode::Pass);
                });
            }
            2 => {
                v.link.set(Mode::Blackhole);
                faults.ack_blackholes += 1;
                let v2 = v.clone();
                let d = Duration::from_millis(rng.random_range(2000..5000));
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    v2.link.set(Mode::Cut);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    v2.link.set(Mode::Pass);
                });
            }
            3 => {
                v.link.set(Mode::Delay(Duration::from_millis(
                    rng.random_range(100..600),
                )));
                faults.link_delays += 1;
                let v2 = v.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    v2.link.set(Mode::Pass);
                });
            }
            _ => {
                // Quota pressure: cut the small-quota vehicle off and post a burst of
                // positions through its API: the store must thin and declare gaps.
                let q = vehicles[QUOTA_VEHICLE].clone();
                q.link.set(Mode::Cut);
                faults.quota_bursts += 1;
                burst(&q, &client, 1500).await;
                q.link.set(Mode::Pass);
            }
        }
    }
    // Faults over: links up, processes up, then let the GPS feed stop and everything drain.
    for v in &vehicles {
        v.link.set(Mode::Pass);
    }
    for r in replica_restarts {
        r.await.map_err(setup)??;
    }
    for (hub, url) in hubs.iter().zip(&hub_urls) {
        if !wait_ok(&client, &format!("{url}/readyz"), Duration::from_secs(30)).await {
            lock(hub).kill9();
            lock(hub).start()?;
        }
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if !rotation.await.unwrap_or(false) {
        return Err(ChaosError::Setup(
            "could not rotate the webhook secret in 30 s".into(),
        ));
    }
    faults.secret_rotations += 1;
    let drained = oracle::wait_drained(
        &client,
        &vehicles.iter().map(|v| v.api).collect::<Vec<_>>(),
        DRIVER_TOKEN,
        DRAIN,
    )
    .await;
    let records = vehicles
        .iter()
        .map(|v| oracle::VehicleRecord {
            id: v.id.clone(),
            fixes: v.fixes.clone(),
            sent: lock(&v.sent).clone(),
            kill_windows: lock(&v.kills).clone(),
            accepted: lock(&v.accepted).clone(),
            skewed: v.id.ends_with(&format!("{SKEW_VEHICLE:03}")),
        })
        .collect::<Vec<_>>();
    let mut verdict = oracle::check(&client, &hub_http, OPERATOR_TOKEN, &records, drained).await;
    // Any replica answers the same: the others' view of the same database must agree
    // (read a moment later: the agents' health reports may have added events since).
    for (i, url) in hub_urls.iter().enumerate().skip(1) {
        let other = oracle::check(&client, url, OPERATOR_TOKEN, &records, drained).await;
        if other.stored < verdict.stored
            || (other.ok, other.lost, other.duplicated)
                != (verdict.ok, verdict.lost, verdict.duplicated)
        {
            verdict.failures.push(format!(
                "replica {} disagrees with replica a: {} events stored (a: {}), {} lost (a: {}), {} duplicated (a: {}), verdict {} (a: {})",
                replica_name(i),
                other.stored,
                verdict.stored,
                other.lost,
                verdict.lost,
                other.duplicated,
                verdict.duplicated,
                other.ok,
                verdict.ok
            ));
            verdict.ok = false;
        }
    }
    let shipments: Vec<String> = vehicles.iter().map(|v| shipment_id(&v.id)).collect();
    // An operator works the review queue: each open item of the chaos shipments is
    // accepted, so their POD_CONFIRMED (with its evidence links) must reach the ERP and
    // the partners exactly once too.
    verdict.reviews_accepted = accept_reviews(&client, &hub_http, &shipments).await?;
    oracle::check_sinks(
        &client,
        &hub_http,
        OPERATOR_TOKEN,
        &erp_token,
        &erp,
        ERP_NAME,
        &subs,
        &shipments,
        &mut verdict,
    )
    .await;
    // Last, what the customer's open page shows: the reviews just accepted included.
    portal_watch::check(
        &client,
        &hub_http,
        &customer_token,
        &watches,
        &shipments,
        &mut verdict,
    )
    .await;
    watch_stop.cancel();
    for t in watch_tasks {
        let _ = t.await;
    }
    Ok(ChaosReport {
        vehicles: opts.vehicles,
        duration_s: opts.duration.as_secs(),
        seed: opts.seed,
        topology: opts.topology,
        faults,
        oracle: verdict,
    })
}

/// The chaos ERP's name in the hub config.
const ERP_NAME: &str = "chaos-erp";

/// The fake webhook receivers' names (one per subscription).
const RECEIVERS: [&str; 2] = ["partner-all", "partner-milestones"];

/// A seeded plan of `n` answers: mostly normal, with 503 and 429 asking to come back in
/// a second, 500s, slow answers, calls applied but answered only after the hub's 1 s
/// timeout, and one outage of 8 s (every request a 503) somewhere in the first 150.
fn erp_faults(seed: u64, n: usize) -> Vec<Fault> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xe4b);
    let outage = rng.random_range(20..150);
    (0..n)
        .map(|i| {
            if i == outage {
                return Fault::Down(Duration::from_secs(8));
            }
            match rng.random_range(0..100) {
                0..64 => Fault::Ok,
                64..70 => Fault::Slow(Duration::from_millis(rng.random_range(100..700))),
                70..78 => Fault::RetryAfter(503, 1),
                78..84 => Fault::RetryAfter(429, 1),
                84..93 => Fault::Status(500),
                _ => Fault::ApplyThenStall(Duration::from_millis(1500)),
            }
        })
        .collect()
}

/// Subscribes receiver `name` of `fake` (every event type, or every one but arrival
/// estimates, of customer CHAOS; the types from the ERP API's mapping tables) and gives
/// the receiver the secret; the id.
async fn subscribe(
    client: &reqwest::Client,
    hub: &str,
    erp_token: &str,
    fake: &FakeErp,
    name: &str,
    hears_eta: bool,
) -> Result<String, ChaosError> {
    let mut body = json!({"url": fake.hook_url(name), "description": name});
    if !hears_eta {
        let m: Value = client
            .get(format!("{hub}/v1/erp/mappings"))
            .bearer_auth(erp_token)
            .send()
            .await
            .map_err(setup)?
            .json()
            .await
            .map_err(setup)?;
        let types: Vec<&str> = m["states"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["webhook_type"].as_str())
            .collect();
        body["event_types"] = json!(types);
        body["customer_id"] = json!("CHAOS");
    }
    let r = client
        .post(format!("{hub}/v1/ops/webhooks"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&body)
        .send()
        .await
        .map_err(setup)?;
    let v: Value = r.json().await.map_err(setup)?;
    let (Some(id), Some(secret)) = (v["id"].as_str(), v["secret"].as_str()) else {
        return Err(ChaosError::Setup(format!("no webhook subscription: {v}")));
    };
    fake.set_hook_secrets(name, vec![secret.to_string()]);
    Ok(id.to_string())
}

/// After `after`, rotates `sub`'s secret (retried while the hub is down); its receiver
/// then accepts the old and the new one. Whether it was done.
async fn rotate_later(
    client: reqwest::Client,
    hub: String,
    fake: FakeErp,
    sub: oracle::Subscription,
    after: Duration,
) -> bool {
    tokio::time::sleep(after).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let r = client
            .post(format!("{hub}/v1/ops/webhooks/{}/rotate-secret", sub.id))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await;
        if let Ok(r) = r
            && r.status().is_success()
            && let Ok(v) = r.json::<Value>().await
            && let Some(new) = v["secret"].as_str()
        {
            // The old one is the first the receiver has (never rotated before).
            let mut secrets = vec![new.to_string()];
            secrets.extend(fake.hook_secrets(&sub.receiver));
            fake.set_hook_secrets(&sub.receiver, secrets);
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves the vehicle's route as NMEA at 1 Hz to whichever agent connection is open.
async fn feed_gps(v: Arc<Vehicle>, listener: tokio::net::TcpListener, stop: CancellationToken) {
    let mut sock: Option<tokio::net::TcpStream> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for (i, fix) in v.fixes.iter().enumerate() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Take the newest connection (an agent restarted since).
        while let Ok(Ok((s, _))) =
            tokio::time::timeout(Duration::from_millis(1), listener.accept()).await
        {
            sock = Some(s);
        }
        if let Some(s) = sock.as_mut() {
            let text = crate::nmea::sentences(fix);
            if s.write_all(text.as_bytes()).await.is_ok() {
                lock(&v.sent).push((i, Instant::now()));
            } else {
                sock = None;
            }
        }
    }
}

/// The shipment the ERP releases for vehicle `id`.
pub fn shipment_id(id: &str) -> String {
    format!("SHP-{id}")
}

/// Its delivery stop (an ERP location id, one per vehicle).
fn stop_id(id: &str) -> String {
    format!("{id}-customer")
}

/// Accepts every open review item of `shipments` as an operator; how many.
async fn accept_reviews(
    client: &reqwest::Client,
    hub: &str,
    shipments: &[String],
) -> Result<u64, ChaosError> {
    let r = client
        .get(format!("{hub}/v1/ops/review?status=open&limit=1000"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .map_err(setup)?;
    let items: Value = r.json().await.map_err(setup)?;
    let mut n = 0;
    for item in items.as_array().into_iter().flatten() {
        let ours = item["shipment_id"]
            .as_str()
            .is_some_and(|s| shipments.iter().any(|x| x == s));
        let Some(id) = item["id"].as_str().filter(|_| ours) else {
            continue;
        };
        let r = client
            .post(format!("{hub}/v1/ops/review/{id}/accept"))
            .bearer_auth(OPERATOR_TOKEN)
            .json(&json!({"note": "chaos: accepted by the operator"}))
            .send()
            .await
            .map_err(setup)?;
        if !r.status().is_success() {
            let st = r.status();
            return Err(ChaosError::Setup(format!(
                "accepting review item {id}: HTTP {st}: {}",
                r.text().await.unwrap_or_default()
            )));
        }
        n += 1;
    }
    Ok(n)
}

/// A credential made with the operator token (`body`: its role, name, customer).
async fn make_credential(
    client: &reqwest::Client,
    hub: &str,
    body: Value,
) -> Result<String, ChaosError> {
    let r = client
        .post(format!("{hub}/v1/ops/credentials"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&body)
        .send()
        .await
        .map_err(setup)?;
    let v: Value = r.json().await.map_err(setup)?;
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| ChaosError::Setup(format!("no credential for {body}: {v}")))
}

/// Posts exceptions and PODs like a driver; records what the agent accepted (201).
async fn driver(v: Arc<Vehicle>, client: reqwest::Client, stop: CancellationToken, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed ^ v.id.len() as u64);
    let base = format!("http://{}", v.api);
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))) => {}
        }
        n += 1;
        if n.is_multiple_of(6) {
            // A POD with a signature and a photo, retried with the same Idempotency-Key.
            let key = format!("{}-pod-{n}", v.id);
            let sig = crate::chaos::oracle::png_bytes(n, &v.id);
            let photo = crate::chaos::oracle::jpeg_bytes(n, &v.id);
            for _ in 0..5 {
                let form = reqwest::multipart::Form::new()
                    .text("outcome", "delivered")
                    .text("shipment_id", shipment_id(&v.id))
                    .text("recipient_name", "Chaos Monkey")
                    .part(
                        "signature",
                        reqwest::multipart::Part::bytes(sig.clone()).file_name("s.png"),
                    )
                    .part(
                        "photo",
                        reqwest::multipart::Part::bytes(photo.clone()).file_name("p.jpg"),
                    );
                match client
                    .post(format!("{base}/v1/stops/{}/pod", stop_id(&v.id)))
                    .bearer_auth(DRIVER_TOKEN)
                    .header("Idempotency-Key", &key)
                    .multipart(form)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 201 => {
                        if let Ok(b) = r.json::<Value>().await {
                            lock(&v.accepted).push(Accepted::Pod {
                                pod_id: b["pod_id"].as_str().unwrap_or_default().to_string(),
                                blobs: vec![sig.clone(), photo.clone()],
                            });
                        }
                        break;
                    }
                    // 404 until the assignment arrived, 507 under quota: not accepted.
                    Ok(_) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        } else {
            let text = format!("{}-exception-{n}", v.id);
            let body = json!({"code": "other", "text": text});
            if let Ok(r) = client
                .post(format!("{base}/v1/exceptions"))
                .bearer_auth(DRIVER_TOKEN)
                .json(&body)
                .send()
                .await
                && r.status() == 201
                && let Ok(b) = r.json::<Value>().await
            {
                lock(&v.accepted).push(Accepted::Critical {
                    epoch: b["epoch"].as_u64().unwrap_or_default(),
                    seq: b["seq"].as_u64().unwrap_or_default(),
                    text,
                });
            }
        }
    }
}

/// Posts `n` positions through the agent's API (telemetry) and records the 201s.
async fn burst(v: &Vehicle, client: &reqwest::Client, n: usize) {
    let base = format!("http://{}/v1/events", v.api);
    let t = fleetsync_agent::now_ms();
    let mut accepted: HashMap<(u64, u64), u64> = HashMap::new();
    for i in 0..n {
        let time = t + i as u64;
        let body = json!({"kind": "position", "event_time": fleetsync_protocol::json::Time(time).to_rfc3339(),
            "lat": 10.0 + i as f64 * 1e-5, "lon": 10.0});
        if let Ok(r) = client
            .post(&base)
            .bearer_auth(DRIVER_TOKEN)
            .json(&body)
            .send()
            .await
            && r.status() == 201
            && let Ok(b) = r.json::<Value>().await
        {
            accepted.insert(
                (
                    b["epoch"].as_u64().unwrap_or_default(),
                    b["seq"].as_u64().unwrap_or_default(),
                ),
                time,
            );
        }
    }
    lock(&v.accepted).extend(accepted.into_iter().map(|((epoch, seq), time_ms)| {
        Accepted::Telemetry {
            epoch,
            seq,
            time_ms,
        }
    }));
}

/// The readable summary.
pub fn print_summary(r: &ChaosReport) {
    let o = &r.oracle;
    let f = &r.faults;
    println!(
        "chaos: {} vehicles, {} s of faults, seed {}",
        r.vehicles, r.duration_s, r.seed
    );
    let hub_faults = match r.topology {
        Topology::Embedded => format!("hub kill -9 {}", f.hub_kills),
        Topology::Replicas => format!(
            "replica kill -9 {} (one of {REPLICAS} at a time), broker restarts {}",
            f.replica_kills, f.broker_restarts
        ),
    };
    if !r.topology.is_embedded() {
        println!("topology: Mosquitto + {REPLICAS} hub replicas on one PostgreSQL database");
    }
    println!(
        "faults: agent kill -9 {}, {hub_faults}, link cuts {}, lost-ack windows {}, delayed links {}, quota bursts {}, skewed clocks {}",
        f.agent_kills, f.link_cuts, f.ack_blackholes, f.link_delays, f.quota_bursts, f.clock_skews
    );
    println!(
        "events: accepted {}, stored at hub {}, lost {}, duplicated {}, gaps {} (declaring {} dropped), fixes in kill windows {}",
        o.accepted, o.stored, o.lost, o.duplicated, o.gap_events, o.gapped, o.fixes_in_kill_windows
    );
    println!(
        "PODs {} with {} blobs byte-identical, {} of them one DELIVERED fact each of their shipment; delivered shipments judged once: {} POD_CONFIRMED, {} in review; assignments acknowledged {}; drained {}",
        o.pods,
        o.blobs_verified,
        o.pod_facts,
        o.pods_confirmed,
        o.pods_in_review,
        o.assignments_acked,
        o.drained
    );
    println!(
        "ERP: {} milestones expected, {} applied exactly once, in order per shipment: {}; {} requests on the wire ({} faults answered), {} dead letters",
        o.erp_expected,
        o.erp_applied,
        o.erp_in_order,
        o.erp_requests,
        o.erp_faults,
        o.erp_dead_letters
    );
    println!(
        "webhooks: {} milestones expected over {} subscriptions, {} applied exactly once, in order per shipment: {}; {} requests ({} faults answered), {} bad signatures, {} secret rotated",
        o.webhooks_expected,
        RECEIVERS.len(),
        o.webhooks_applied,
        o.webhooks_in_order,
        o.webhook_requests,
        o.webhook_faults,
        o.webhook_bad_signatures,
        f.secret_rotations
    );
    println!(
        "POD evidence: {} review items accepted by the operator; {} links in POD_CONFIRMED messages opened to the POD's bytes (the ERP's with its credential, the partners' signed ones with none)",
        o.reviews_accepted, o.evidence_links_verified
    );
    println!(
        "portal streams of customer CHAOS, two clients through the faults: {} connections ({} resumed with Last-Event-ID, {} after staying away longer than the feed's slack: {} of {} shipments written meanwhile caught up), {} shipment and {} position events; {} of {} shipment views at the API's rev",
        o.portal_connects,
        o.portal_resumes,
        o.portal_aways,
        o.portal_caught_up,
        o.portal_away_changed,
        o.portal_shipment_events,
        o.portal_position_events,
        o.portal_current,
        o.portal_expected
    );
    println!(
        "latency capture -> hub (critical events): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        o.latency_ms.p50, o.latency_ms.p90, o.latency_ms.p99, o.latency_ms.max
    );
    for msg in &o.failures {
        println!("FAIL {msg}");
    }
    println!("oracle: {}", if o.ok { "PASS" } else { "FAIL" });
}

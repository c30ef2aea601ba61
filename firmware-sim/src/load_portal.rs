//! `load --portal-clients N`: the customer portal's live stream (`GET /v1/portal/stream`)
//! fanned out to N clients over real HTTP while the load runs.
//!
//! ```text
//! set-up   a shipment per vehicle (customer C{i % customers}), a customer credential
//!          each, hub VmRSS read (the load running, no stream client yet), then the
//!          clients connect: N / customers per customer, each its own HTTP connection
//! baseline the vehicles stop capturing (3 s for their last batches), then for
//!          --portal-baseline s only ERP changes run: a shipment's order lines changed
//!          through the ERP API every CHANGE_EVERY, round robin over the shipments
//! window   the vehicles capture again (the load's measured window): positions, one
//!          arrival per vehicle, and the same ERP changes; hub VmRSS sampled
//! drain    5 s with the clients still connected, then they close
//! ```
//!
//! Latency of a delivered change = its receipt at the client (when the chunk holding it
//! was read) minus the hub's own time stamp of the change, read from the hub, never from
//! the client's clock of sending:
//! - a shipment event: its `updated` (the record's `updated_ms`, stamped by the hub as it
//!   writes the record: ERP changes when the request is handled, arrivals as their
//!   ingest round starts, ETA estimates when made; all before the commit);
//! - a position event: the `recorded_time` the hub's store holds for that fix (read back
//!   through the operator events API after the run; stamped as the ingest round starts,
//!   before the commit).
//!
//! Both stamps precede the commit, so the figure is an upper bound of commit-to-client.
//! Hub and clients run on one machine and one clock. Each (client, change) counts once
//! (the first receipt). A change counts in the phase its hub stamp falls in.
//!
//! No silent drops: of what the customers' clients received stamped within the phases,
//! every client of a customer must have received every change any client of that
//! customer received; every ERP change must reach every client of its customer (an
//! event of the shipment with `updated` at or after the change's); and every client must
//! have its vehicle's newest fix stored a second before the window's end, or a newer one.
//! The feed sends a vehicle's newest fix when it reads: fixes superseded between two
//! reads are not sent (counted as `fixes_superseded`). A client whose stream ends before
//! the drain (the hub drops a client that falls `stream_buffer` changes behind) is
//! counted in `streams_ended` and fails the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::chaos::oracle::Latency;

/// One ERP change this often during the baseline and the window.
const CHANGE_EVERY: Duration = Duration::from_millis(100);
/// Time for the clients to get the last changes after the window.
const DRAIN: Duration = Duration::from_secs(5);
/// The figure's targets.
const TARGET_P99_MS: u64 = 200;
const TARGET_RSS_GROWTH_MIB: f64 = 64.0;

/// `--portal-clients` and its companions.
#[derive(Debug, Clone)]
pub struct PortalOptions {
    /// Stream clients in all.
    pub clients: usize,
    /// Customers they are spread over (the vehicles' shipments too).
    pub customers: usize,
    /// Seconds of the baseline phase (ERP changes only, vehicles paused).
    pub baseline: Duration,
}

/// What the stream clients saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PortalReport {
    /// Stream clients.
    pub clients: usize,
    /// Customers.
    pub customers: usize,
    /// Shipments (one per vehicle).
    pub shipments: usize,
    /// Hub VmRSS before the clients connected (the load running), MiB.
    pub rss_before_mib: f64,
    /// Hub VmRSS with the clients connected and idle (2 s after the last opened), MiB.
    pub rss_connected_mib: f64,
    /// Highest hub VmRSS with the clients connected (baseline, window, drain), MiB.
    pub rss_with_clients_mib: f64,
    /// The highest minus the one before (includes whatever the load itself grew
    /// meanwhile: its store's cache, its connections' buffers).
    pub rss_growth_mib: f64,
    /// ERP changes made in the baseline / the window.
    pub erp_changes: (u64, u64),
    /// ERP changes refused by the hub (should be 0).
    pub erp_errors: u64,
    /// Baseline (vehicles paused): deliveries of shipment changes and their latency.
    pub baseline_deliveries: u64,
    /// Baseline latency, hub stamp to client, ms.
    pub baseline_latency_ms: Latency,
    /// Window: deliveries of shipment changes (ERP changes, arrivals, ETA estimates).
    pub shipment_deliveries: u64,
    /// Their latency, ms.
    pub shipment_latency_ms: Latency,
    /// Window: deliveries of positions.
    pub position_deliveries: u64,
    /// Their latency, ms.
    pub position_latency_ms: Latency,
    /// Window: every delivery.
    pub all_latency_ms: Latency,
    /// Window shipment-change p99 over the baseline's p99.
    pub p99_ratio_vs_baseline: f64,
    /// Window: fixes the hub stored for the vehicles / distinct fixes the clients got.
    pub fixes_stored: u64,
    /// Of them, sent to the clients.
    pub fixes_delivered: u64,
    /// Fixes superseded by a newer one before the feed read (never sent, by design).
    pub fixes_superseded: u64,
    /// Position events whose fix the store does not know (should be 0).
    pub positions_unmatched: u64,
    /// Deliveries missing at a client (see the module note; should be 0).
    pub missing: u64,
    /// Of them, ERP changes that did not reach a client of their customer.
    pub missing_erp: u64,
    /// Of them, newest fixes that did not reach a client.
    pub missing_last_fix: u64,
    /// Streams that ended before the drain.
    pub streams_ended: u64,
    /// Stream clients that could not connect.
    pub connect_errors: u64,
    /// `--portal-control`: the control run's (no stream client) highest hub VmRSS over
    /// the same phases, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_control_mib: Option<f64>,
    /// `--portal-control`: what the clients cost, the highest hub VmRSS with them minus
    /// the control's, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_clients_cost_mib: Option<f64>,
    /// p99 of every delivery in the window under the target and the RSS the clients cost
    /// (with a control run; else the growth over the run) under its.
    pub targets_met: bool,
    /// Nothing dropped, nothing ended.
    pub ok: bool,
}

/// The customer of vehicle `i`'s shipment.
pub fn customer_of(i: usize, customers: usize) -> String {
    format!("C{:03}", i % customers.max(1))
}

/// A shipment's ERP body: one delivery stop; `qty` changes its order line.
pub fn shipment_body(vehicle: &str, stop: &str, customer: &str, qty: u64) -> serde_json::Value {
    serde_json::json!({
        "reference": format!("SO-{vehicle}"), "customer_id": customer, "vehicle": vehicle,
        "stops": [{"id": stop, "kind": "delivery", "name": "Customer",
                   "location": {"lat": 52.37, "lon": 4.89}, "radius_m": 50}],
        "lines": [{"sku": "PALLET", "quantity": qty}]})
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum What {
    /// Shipment (vehicle index), its `updated_ms`.
    Shipment(u32, u64),
    /// Shipment (vehicle index), the fix's capture time.
    Position(u32, u64),
}

#[derive(Debug, Default)]
struct ClientLog {
    rx: Vec<(u64, What)>,
    ended: bool,
}

/// The running stream clients and what they measure.
#[derive(Debug)]
pub struct Portal {
    opts: PortalOptions,
    http: reqwest::Client,
    base: String,
    erp_token: String,
    vehicles: Vec<String>,
    stops: Vec<String>,
    /// Per client: its customer index and log.
    logs: Vec<(usize, Arc<Mutex<ClientLog>>)>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    connect_errors: u64,
    rss_before_kib: u64,
    rss_connected_kib: u64,
    rss_max_kib: Arc<AtomicU64>,
    /// ERP changes: (vehicle index, updated_ms), and refusals.
    changes: Arc<Mutex<Vec<(u32, u64)>>>,
    erp_errors: Arc<AtomicU64>,
    next_change: Arc<AtomicU64>,
    baseline: (u64, u64),
    window: (u64, u64),
}

fn e<E: std::fmt::Display>(x: E) -> super::load::LoadError {
    super::load::LoadError::new(x)
}

fn now_ms() -> u64 {
    fleetsync_agent::now_ms()
}

/// The hub's VmRSS, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rfc3339_ms(s: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    u64::try_from(t.timestamp_millis()).ok()
}

/// The vehicle index in a shipment id `LS-LOAD-00042`.
fn index_of(shipment: &str) -> Option<u32> {
    shipment.rsplit('-').next()?.parse().ok()
}

impl Portal {
    /// Makes the customers' credentials, reads the hub's RSS, connects the clients and
    /// waits until every stream is open.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        opts: PortalOptions,
        http: &reqwest::Client,
        base: &str,
        operator_token: &str,
        erp_token: String,
        pid: u32,
        vehicles: &[String],
        stops: Vec<String>,
    ) -> Result<Portal, super::load::LoadError> {
        let mut tokens = Vec::new();
        for c in 0..opts.customers {
            let r = http
                .post(format!("{base}/v1/ops/credentials"))
                .bearer_auth(operator_token)
                .json(
                    &serde_json::json!({"role": "customer", "name": format!("load customer {c}"),
                                          "customer_id": customer_of(c, opts.customers)}),
                )
                .send()
                .await
                .map_err(e)?;
            let v: serde_json::Value = r.json().await.map_err(e)?;
            tokens.push(
                v["token"]
                    .as_str()
                    .ok_or_else(|| e(format!("no customer credential: {v}")))?
                    .to_string(),
            );
        }
        // Before any client: a few samples, the highest.
        let mut rss_before_kib = 0;
        for _ in 0..3 {
            rss_before_kib = rss_before_kib.max(rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let stream_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(e)?;
        let stop = CancellationToken::new();
        let rss_max_kib = Arc::new(AtomicU64::new(0));
        let mut logs = Vec::new();
        let mut tasks = Vec::new();
        let opened = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        for i in 0..opts.clients {
            let customer = i % opts.customers.max(1);
            let log = Arc::new(Mutex::new(ClientLog::default()));
            logs.push((customer, log.clone()));
            tasks.push(tokio::spawn(client(
                stream_http.clone(),
                format!("{base}/v1/portal/stream"),
                tokens[customer].clone(),
                log,
                opened.clone(),
                failed.clone(),
                stop.clone(),
            )));
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while opened.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) < opts.clients as u64
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_connected_kib = rss_kib(pid).unwrap_or(0);
        {
            let (rss, stop) = (rss_max_kib.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    rss.fetch_max(rss_kib(pid).unwrap_or(0), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }));
        }
        Ok(Portal {
            http: http.clone(),
            base: base.to_string(),
            erp_token,
            vehicles: vehicles.to_vec(),
            stops,
            logs,
            stop,
            tasks,
            connect_errors: failed.load(Ordering::SeqCst),
            rss_before_kib,
            rss_connected_kib,
            rss_max_kib,
            changes: Arc::default(),
            erp_errors: Arc::default(),
            next_change: Arc::default(),
            baseline: (0, 0),
            window: (0, 0),
            opts,
        })
    }

    /// The baseline phase: `paused` stops the vehicles' capture; ERP changes only.
    pub async fn baseline(&mut self, paused: &AtomicBool) {
        paused.store(true, Ordering::SeqCst);
        // The vehicles' last batches and the feed's reads of them.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let start = now_ms();
        let changer = self.changes_until(CancellationToken::new());
        tokio::select! {
            _ = changer.0 => {}
            _ = tokio::time::sleep(self.opts.baseline) => {}
        }
        changer.1.cancel();
        self.baseline = (start, now_ms());
        paused.store(false, Ordering::SeqCst);
    }

    /// ERP changes until the returned token is cancelled.
    fn changes_until(
        &self,
        stop: CancellationToken,
    ) -> (tokio::task::JoinHandle<()>, CancellationToken) {
        let (http, base, token) = (self.http.clone(), self.base.clone(), self.erp_token.clone());
        let (vehicles, stops) = (self.vehicles.clone(), self.stops.clone());
        let (changes, errors, next) = (
            self.changes.clone(),
            self.erp_errors.clone(),
            self.next_change.clone(),
        );
        let customers = self.opts.customers;
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHANGE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let i = (n as usize) % vehicles.len();
                let body =
                    shipment_body(&vehicles[i], &stops[i], &customer_of(i, customers), n + 2);
                let r = http
                    .put(format!("{base}/v1/erp/shipments/LS-{}", vehicles[i]))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                let updated = match r {
                    Ok(r) if r.status().is_success() => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["updated"].as_str().and_then(rfc3339_ms)),
                    _ => None,
                };
                match updated {
                    Some(t) => changes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i as u32, t)),
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        (task, stop)
    }

    /// Starts the window's ERP changes; [`Portal::end_window`] stops them.
    pub fn start_window(&mut self) -> CancellationToken {
        self.window.0 = now_ms();
        let (task, stop) = self.changes_until(CancellationToken::new());
        self.tasks.push(task);
        stop
    }

    /// Ends the window (`changes` is what [`Portal::start_window`] returned), lets the
    /// clients drain, closes them.
    pub async fn end_window(&mut self, changes: CancellationToken) {
        self.window.1 = now_ms();
        changes.cancel();
        tokio::time::sleep(DRAIN).await;
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// The report; `recorded` is the hub's record time of each stored fix by
    /// (vehicle index, capture time), from the store.
    pub fn report(&self, recorded: &HashMap<(u32, u64), u64>) -> PortalReport {
        let (b0, b1) = self.baseline;
        let (w0, w1) = self.window;
        let in_base = |t: u64| (b0..=b1).contains(&t);
        let in_window = |t: u64| (w0..=w1).contains(&t);
        let hub_stamp = |w: &What| -> Option<u64> {
            match *w {
                What::Shipment(_, updated) => Some(updated),
                What::Position(v, fix) => recorded.get(&(v, fix)).copied(),
            }
        };
        let mut base_lat = Vec::new();
        let (mut ship_lat, mut pos_lat) = (Vec::new(), Vec::new());
        let mut unmatched = 0u64;
        let mut ended = 0u64;
        // Per client: what it got (first receipts, within the phases), and everything it
        // got (a change at the end of the window may reach a client only as part of a
        // newer view stamped after it: the feed sends a shipment's newest view).
        let mut got: Vec<HashMap<What, u64>> = Vec::new();
        let mut got_all: Vec<HashMap<What, u64>> = Vec::new();
        for (_, log) in &self.logs {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            ended += u64::from(log.ended);
            let mut mine: HashMap<What, u64> = HashMap::new();
            got_all.push(log.rx.iter().map(|(at, w)| (*w, *at)).collect());
            for (at, w) in &log.rx {
                let Some(stamp) = hub_stamp(w) else {
                    unmatched += 1;
                    continue;
                };
                if !(in_base(stamp) || in_window(stamp)) || mine.contains_key(w) {
                    continue;
                }
                mine.insert(*w, *at);
                let ms = at.saturating_sub(stamp).min(u64::from(u32::MAX)) as u32;
                match (w, in_base(stamp)) {
                    (_, true) => base_lat.push(ms),
                    (What::Shipment(..), false) => ship_lat.push(ms),
                    (What::Position(..), false) => pos_lat.push(ms),
                }
            }
            got.push(mine);
        }
        // Every client of a customer has what any of them has.
        let mut missing = 0u64;
        let mut union: BTreeMap<usize, HashSet<What>> = BTreeMap::new();
        for ((c, _), mine) in self.logs.iter().zip(&got) {
            union.entry(*c).or_default().extend(mine.keys().copied());
        }
        for ((c, _), mine) in self.logs.iter().zip(&got) {
            missing += union[c].iter().filter(|w| !mine.contains_key(w)).count() as u64;
        }
        // Newest per (client, shipment): shipment `updated` and fix time.
        let newest = |mine: &HashMap<What, u64>| {
            let mut ship: HashMap<u32, u64> = HashMap::new();
            let mut fix: HashMap<u32, u64> = HashMap::new();
            for w in mine.keys() {
                match *w {
                    What::Shipment(v, t) => {
                        let e = ship.entry(v).or_default();
                        *e = (*e).max(t);
                    }
                    What::Position(v, t) => {
                        let e = fix.entry(v).or_default();
                        *e = (*e).max(t);
                    }
                }
            }
            (ship, fix)
        };
        let newest: Vec<_> = got_all.iter().map(newest).collect();
        let customers = self.opts.customers.max(1);
        let changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing_erp = 0u64;
        let mut erp_changes = (0u64, 0u64);
        for (v, t) in changes.iter() {
            if in_base(*t) {
                erp_changes.0 += 1;
            } else if in_window(*t) {
                erp_changes.1 += 1;
            } else {
                continue;
            }
            for ((c, _), (ship, _)) in self.logs.iter().zip(&newest) {
                if *c == *v as usize % customers && ship.get(v).is_none_or(|u| u < t) {
                    missing_erp += 1;
                }
            }
        }
        // The newest fix of each vehicle stored a second before the window's end.
        let mut last_fix: HashMap<u32, u64> = HashMap::new();
        let mut fixes_stored = 0u64;
        for ((v, fix), rec) in recorded {
            if in_window(*rec) {
                fixes_stored += 1;
            }
            if *rec >= w0 && *rec + 1000 <= w1 {
                let e = last_fix.entry(*v).or_default();
                *e = (*e).max(*fix);
            }
        }
        let mut missing_last_fix = 0u64;
        for ((c, _), (_, fix)) in self.logs.iter().zip(&newest) {
            for (v, want) in &last_fix {
                if *c == *v as usize % customers && fix.get(v).is_none_or(|got| got < want) {
                    missing_last_fix += 1;
                }
            }
        }
        let delivered_fixes: HashSet<(u32, u64)> = got
            .iter()
            .flat_map(|m| m.keys())
            .filter_map(|w| match *w {
                What::Position(v, t) if recorded.get(&(v, t)).is_some_and(|r| in_window(*r)) => {
                    Some((v, t))
                }
                _ => None,
            })
            .collect();
        let fixes_delivered = delivered_fixes.len() as u64;
        let all: Vec<u32> = ship_lat.iter().chain(&pos_lat).copied().collect();
        let (base_n, ship_n, pos_n) = (
            base_lat.len() as u64,
            ship_lat.len() as u64,
            pos_lat.len() as u64,
        );
        let baseline_latency_ms = super::load::percentiles(base_lat);
        let shipment_latency_ms = super::load::percentiles(ship_lat);
        let all_latency_ms = super::load::percentiles(all);
        let rss_with = self.rss_max_kib.load(Ordering::Relaxed);
        let mib = |k: u64| k as f64 / 1024.0;
        let growth = mib(rss_with.saturating_sub(self.rss_before_kib));
        let missing_total = missing + missing_erp + missing_last_fix;
        PortalReport {
            clients: self.opts.clients,
            customers: self.opts.customers,
            shipments: self.vehicles.len(),
            rss_before_mib: mib(self.rss_before_kib),
            rss_connected_mib: mib(self.rss_connected_kib),
            rss_with_clients_mib: mib(rss_with),
            rss_growth_mib: growth,
            rss_control_mib: None,
            rss_clients_cost_mib: None,
            erp_changes,
            erp_errors: self.erp_errors.load(Ordering::Relaxed),
            baseline_deliveries: base_n,
            shipment_deliveries: ship_n,
            position_deliveries: pos_n,
            p99_ratio_vs_baseline: if baseline_latency_ms.p99 > 0 {
                shipment_latency_ms.p99 as f64 / baseline_latency_ms.p99 as f64
            } else {
                0.0
            },
            baseline_latency_ms,
            shipment_latency_ms,
            position_latency_ms: super::load::percentiles(pos_lat),
            targets_met: all_latency_ms.p99 < TARGET_P99_MS
                && growth < TARGET_RSS_GROWTH_MIB
                && ship_n + pos_n > 0,
            all_latency_ms,
            fixes_stored,
            fixes_delivered,
            fixes_superseded: fixes_stored.saturating_sub(fixes_delivered),
            positions_unmatched: unmatched,
            missing: missing_total,
            missing_erp,
            missing_last_fix,
            streams_ended: ended,
            connect_errors: self.connect_errors,
            ok: missing_total == 0
                && ended == 0
                && unmatched == 0
                && self.connect_errors == 0
                // A control run (no client) has nothing to deliver.
                && (ship_n + pos_n > 0 || self.opts.clients == 0),
        }
    }
}

#[derive(Deserialize)]
struct ShipmentData {
    id: String,
    updated: String,
}

#[derive(Deserialize)]
struct PositionData {
    shipment_id: String,
    vehicle: VehicleData,
}

#[derive(Deserialize)]
struct VehicleData {
    time: String,
}

/// One stream client: reads events until `stop`, logging each with its receipt time.
async fn client(
    http: reqwest::Client,
    url: String,
    token: String,
    log: Arc<Mutex<ClientLog>>,
    opened: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let resp = match http.get(&url).bearer_auth(&token).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            tracing::warn!(status = %r.status(), "portal stream client: not opened");
            failed.fetch_add(1, Ordering::SeqCst);
            return;
        }
        Err(err) => {
            tracing::warn!(error = %err, "portal stream client: not opened");
            failed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    opened.fetch_add(1, Ordering::SeqCst);
    let mut resp = resp;
    let mut buf: Vec<u8> = Vec::new();
    let mut parsed: Vec<(u64, What)> = Vec::new();
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => break,
            c = resp.chunk() => c,
        };
        let at = now_ms();
        match chunk {
            Ok(Some(bytes)) => buf.extend_from_slice(&bytes),
            Ok(None) | Err(_) => {
                log.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
                break;
            }
        }
        for ev in crate::sse::take_events(&mut buf) {
            let what = match ev.name.as_str() {
                "shipment" => serde_json::from_str::<ShipmentData>(&ev.data)
                    .ok()
                    .and_then(|d| Some(What::Shipment(index_of(&d.id)?, rfc3339_ms(&d.updated)?))),
                "position" => serde_json::from_str::<PositionData>(&ev.data)
                    .ok()
                    .and_then(|d| {
                        Some(What::Position(
                            index_of(&d.shipment_id)?,
                            rfc3339_ms(&d.vehicle.time)?,
                        ))
                    }),
                _ => None,
            };
            if let Some(w) = what {
                parsed.push((at, w));
            }
        }
        if !parsed.is_empty() {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .rx
                .append(&mut parsed);
        }
    }
}

/// The readable summary.
pub fn print_summary(p: &PortalReport) {
    let l = |x: &Latency| {
        format!(
            "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            x.p50, x.p90, x.p99, x.max
        )
    };
    println!(
        "portal stream: {} clients over {} customers ({} shipments); connect errors {}, streams ended early {}",
        p.clients, p.customers, p.shipments, p.connect_errors, p.streams_ended
    );
    println!(
        "  baseline (vehicles paused, {} ERP changes): {} deliveries, hub stamp -> client {}",
        p.erp_changes.0,
        p.baseline_deliveries,
        l(&p.baseline_latency_ms)
    );
    println!(
        "  window, shipment changes ({} by ERP, arrivals, ETAs): {} deliveries, {}",
        p.erp_changes.1,
        p.shipment_deliveries,
        l(&p.shipment_latency_ms)
    );
    println!(
        "  window, positions: {} deliveries, {}; fixes stored {}, sent {}, superseded (an older fix of the same round or read) {}",
        p.position_deliveries,
        l(&p.position_latency_ms),
        p.fixes_stored,
        p.fixes_delivered,
        p.fixes_superseded
    );
    println!(
        "  window, every delivery: {}; shipment p99 vs baseline p99: {:.2}x",
        l(&p.all_latency_ms),
        p.p99_ratio_vs_baseline
    );
    println!(
        "  hub RSS {:.1} MiB before the clients, {:.1} MiB with them connected and idle, {:.1} MiB at most with them: +{:.1} MiB",
        p.rss_before_mib, p.rss_connected_mib, p.rss_with_clients_mib, p.rss_growth_mib
    );
    if let (Some(control), Some(cost)) = (p.rss_control_mib, p.rss_clients_cost_mib) {
        println!(
            "  the clients' cost: {:.1} MiB at most with them, {control:.1} MiB at most in the control run without them: {cost:+.1} MiB",
            p.rss_with_clients_mib
        );
    }
    println!(
        "  missing deliveries {} (ERP changes {}, newest fixes {}), unmatched positions {}, ERP errors {}: {}; targets (p99 < {TARGET_P99_MS} ms, RSS {} < {TARGET_RSS_GROWTH_MIB} MiB): {}",
        p.missing,
        p.missing_erp,
        p.missing_last_fix,
        p.positions_unmatched,
        p.erp_errors,
        if p.ok { "PASS" } else { "FAIL" },
        if p.rss_clients_cost_mib.is_some() {
            "the clients cost"
        } else {
            "growth"
        },
        if p.targets_met { "met" } else { "NOT met" }
    );
}

/// Judges `run`'s RSS target by what its clients cost: its highest hub VmRSS over that of
/// `control`, the same run without stream clients (`--portal-control`).
pub fn judge_by_control(run: &mut super::load::LoadReport, control: &super::load::LoadReport) {
    let (Some(p), Some(c)) = (run.portal.as_mut(), control.portal.as_ref()) else {
        return;
    };
    let cost = p.rss_with_clients_mib - c.rss_with_clients_mib;
    p.rss_control_mib = Some(c.rss_with_clients_mib);
    p.rss_clients_cost_mib = Some(cost);
    p.targets_met = p.all_latency_ms.p99 < TARGET_P99_MS
        && cost < TARGET_RSS_GROWTH_MIB
        && p.shipment_deliveries + p.position_deliveries > 0;
}

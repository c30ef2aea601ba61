//! One simulated vehicle: a real agent started in-process, the GPS receiver it reads (an
//! NMEA 0183 TCP stream this task serves), its ignition input (a file holding 1 or 0), and
//! the driver who takes a POD through the agent's local API at each stop.
//!
//! ```text
//! round r:  GET/PUT hub /v1/ops/devices/{id}/assignment -> wait until acknowledged
//!           ignition 1, depot, for each stop: drive (route::drive) + dwell, stand on
//!           until the driver has taken the POD, ..., back to the depot, ignition 0
//! driver:   poll agent GET /v1/jobs/{stop} until "arrived" -> POST /v1/stops/{stop}/pod
//! ```
//!
//! GPS times are one second apart whatever `speedup` is; the wall time each fix was written
//! is logged, so latency can be measured from when the receiver "saw" it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Http;
use super::plan::{self, PlannedStop, Round};
use crate::images;
use crate::route::{SimFix, Waypoint, drive};

/// Town cruise speed of the vans (m/s).
const CRUISE_MPS: f64 = 9.0;
/// Seconds (GPS time) standing at the depot before and after a round.
const DEPOT_DWELL_S: u32 = 5;
/// Most extra seconds (GPS time) a van stands at a stop waiting for its driver.
const MAX_WAIT_FOR_DRIVER_S: u32 = 180;
/// Seconds (GPS time) parked between rounds.
const PARK_S: u64 = 20;
/// How long the agent has to connect to its GPS stream.
const GPS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the hub has to get an assignment acknowledged.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Fixes whose send time is kept for the latency figures (about 11 days at 1 Hz); later
/// fixes are measured from their GPS time.
const MAX_FIX_LOG: usize = 1_000_000;
/// Attempts of one POD request (same Idempotency-Key each time).
const POD_ATTEMPTS: u32 = 3;
/// Lines of news a vehicle holds until the display takes them; when full, the oldest
/// goes (the display takes them every second, so only a stalled terminal loses any).
pub const MAX_NEWS: usize = 64;

const RECIPIENTS: [&str; 8] = [
    "M. de Vries",
    "J. Jansen",
    "S. Bakker",
    "L. Visser",
    "A. Smit",
    "R. Meijer",
    "E. de Boer",
    "T. Mulder",
];

/// What the live display shows.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Current round (1-based; 0 before the first).
    pub round: u32,
    /// Stop the van is heading to or standing at (1-based; 0 at the depot).
    pub stop_k: usize,
    /// Stops in this round.
    pub stop_n: usize,
    /// Speed of the last fix.
    pub speed_mps: f64,
    /// What the van is doing.
    pub phase: &'static str,
    /// Fixes written to the agent's GPS stream.
    pub fixes_sent: u64,
    /// PODs the agent answered 201.
    pub pods_posted: u64,
    /// PODs the agent refused or that failed.
    pub pods_failed: u64,
    /// Rounds finished.
    pub rounds_done: u32,
}

/// A POD the driver took.
#[derive(Debug, Clone)]
pub struct PodRecord {
    /// Stop.
    pub stop_id: String,
    /// The agent's POD id.
    pub pod_id: String,
    /// Its identity.
    pub epoch: u32,
    /// Its identity.
    pub seq: u64,
    /// delivered / refused / damaged.
    pub outcome: &'static str,
    /// The files sent.
    pub blobs: Vec<BlobRecord>,
    /// Who signed (delivered, damaged).
    pub recipient: Option<&'static str>,
}

impl PodRecord {
    /// "delivered to J. Jansen, signature + 1 photo" (or "refused, 1 photo"), for the
    /// live display.
    pub fn what(&self) -> String {
        let photos = self
            .blobs
            .iter()
            .filter(|b| matches!(b, BlobRecord::Photo(_)))
            .count();
        let signed = self
            .blobs
            .iter()
            .any(|b| matches!(b, BlobRecord::Signature(_)));
        let files = match (signed, photos) {
            (true, 1) => "signature + 1 photo".to_string(),
            (true, n) => format!("signature + {n} photos"),
            (false, 1) => "1 photo".to_string(),
            (false, n) => format!("{n} photos"),
        };
        match (self.outcome, self.recipient) {
            ("delivered", Some(r)) => format!("delivered to {r}, {files}"),
            (outcome, Some(r)) => format!("{outcome}, signed by {r}, {files}"),
            (outcome, None) => format!("{outcome}, {files}"),
        }
    }
}

/// A file sent with a POD: its sha256 and how to make its bytes again (the images are
/// deterministic in their seed, so a long run keeps no image bytes in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRecord {
    /// [`images::signature_png`] of this seed.
    Signature(u64),
    /// [`images::photo_jpeg`] of this seed.
    Photo(u64),
}

impl BlobRecord {
    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            BlobRecord::Signature(seed) => images::signature_png(seed),
            BlobRecord::Photo(seed) => images::photo_jpeg(seed),
        }
    }

    /// Lowercase hex sha256 of the bytes.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.bytes())
    }
}

/// Everything the vehicle's tasks record, read by the display and the report.
#[derive(Debug, Default)]
pub struct VehicleState {
    progress: Mutex<Progress>,
    pods: Mutex<Vec<PodRecord>>,
    /// GPS time (ms) -> wall time (ms) it was written.
    fix_wall: Mutex<HashMap<u64, u64>>,
    /// What just happened, oldest first, for the live display (at most [`MAX_NEWS`]).
    news: Mutex<VecDeque<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VehicleState {
    /// A copy of the progress.
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.progress));
    }

    /// The PODs taken so far.
    pub fn pods(&self) -> Vec<PodRecord> {
        lock(&self.pods).clone()
    }

    /// Wall time a fix with GPS time `gps_ms` was written, if it was.
    pub fn fix_wall(&self) -> HashMap<u64, u64> {
        lock(&self.fix_wall).clone()
    }

    /// Takes the news since the last call.
    pub fn take_news(&self) -> Vec<String> {
        lock(&self.news).drain(..).collect()
    }

    fn tell(&self, line: String) {
        let mut news = lock(&self.news);
        if news.len() >= MAX_NEWS {
            news.pop_front();
        }
        news.push_back(line);
    }
}

/// What a vehicle task needs.
#[derive(Debug, Clone)]
pub struct VehicleCtx {
    /// Device id.
    pub id: String,
    /// 0-based index (seeds the plan).
    pub index: usize,
    /// The demo's seed.
    pub seed: u64,
    /// Fixes per wall second.
    pub speedup: f64,
    /// Unique per run: keeps Idempotency-Keys fresh when a data dir is reused.
    pub run_nonce: String,
    /// The hub's operator API.
    pub ops: Http,
    /// The hub's ERP API (an ERP credential).
    pub erp: Http,
    /// The agent's local API with the driver's token.
    pub driver: Http,
    /// The ignition file the agent polls.
    pub ignition: PathBuf,
    /// Shared records.
    pub state: Arc<VehicleState>,
    /// A recorded track to replay instead of generated drives (`--route FILE`).
    pub track: Option<Arc<Vec<SimFix>>>,
}

/// Why driving stopped.
#[derive(Debug)]
enum Halt {
    /// The demo is stopping.
    Stopped,
    /// The GPS stream could not be (re)established.
    Gps(io::Error),
    /// The hub or agent API did not do what was expected.
    Api(String),
}

/// The GPS receiver: writes one fix per tick to the agent's connection.
struct Receiver {
    listener: TcpListener,
    sock: Option<TcpStream>,
    ticker: tokio::time::Interval,
    next_ms: u64,
    stop: CancellationToken,
    state: Arc<VehicleState>,
}

impl Receiver {
    async fn accept(&mut self) -> Result<(), Halt> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(Halt::Stopped),
            r = tokio::time::timeout(GPS_ACCEPT_TIMEOUT, self.listener.accept()) => match r {
                Ok(Ok((s, _))) => {
                    let _ = s.set_nodelay(true);
                    self.sock = Some(s);
                    Ok(())
                }
                Ok(Err(e)) => Err(Halt::Gps(e)),
                Err(_) => Err(Halt::Gps(io::Error::new(io::ErrorKind::TimedOut, "the agent did not connect to its GPS stream"))),
            }
        }
    }

    /// Writes one fix at the next tick, GPS time one second after the previous.
    async fn send(
        &mut self,
        lat: f64,
        lon: f64,
        speed_mps: f64,
        heading_deg: f64,
    ) -> Result<(), Halt> {
        tokio::select! {
            _ = self.stop.cancelled() => return Err(Halt::Stopped),
            _ = self.ticker.tick() => {}
        }
        let fix = SimFix {
            time_ms: self.next_ms,
            lat,
            lon,
            speed_mps,
            heading_deg,
        };
        let text = crate::nmea::sentences(&fix);
        for attempt in 0..2 {
            if self.sock.is_none() {
                self.accept().await?;
            }
            let Some(sock) = self.sock.as_mut() else {
                continue;
            };
            match sock.write_all(text.as_bytes()).await {
                Ok(()) => {
                    let mut log = lock(&self.state.fix_wall);
                    if log.len() < MAX_FIX_LOG {
                        log.insert(fix.time_ms, fleetsync_agent::now_ms());
                    }
                    drop(log);
                    self.state.update(|p| {
                        p.fixes_sent += 1;
                        p.speed_mps = speed_mps;
                    });
                    self.next_ms += 1000;
                    return Ok(());
                }
                Err(e) => {
                    debug!(error = %e, attempt, "GPS stream broke; waiting for the agent to reconnect");
                    self.sock = None;
                }
            }
        }
        Err(Halt::Gps(io::Error::other(
            "GPS stream broke twice in a row",
        )))
    }

    /// Sends the fixes of a drive (their own times are ignored: the receiver's clock counts).
    async fn send_all(&mut self, fixes: &[SimFix]) -> Result<(), Halt> {
        for f in fixes {
            self.send(f.lat, f.lon, f.speed_mps, f.heading_deg).await?;
        }
        Ok(())
    }
}

/// Drives rounds until `stop` is cancelled. Returns the GPS connection, still open, so the
/// caller can keep it until the agent has stopped (a receiver does not vanish before the
/// gateway is switched off).
pub async fn run(ctx: VehicleCtx, gps: TcpListener, stop: CancellationToken) -> Option<TcpStream> {
    let period = Duration::from_secs_f64(1.0 / ctx.speedup);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rx = Receiver {
        listener: gps,
        sock: None,
        ticker,
        next_ms: fleetsync_agent::now_ms(),
        stop: stop.clone(),
        state: ctx.state.clone(),
    };
    let mut ignition_on = false;
    let r = async {
        rx.accept().await?;
        for round in 1u32.. {
            let plan = match &ctx.track {
                Some(t) => plan::round_on_track(t, ctx.seed, &ctx.id, ctx.index, round),
                None => plan::round(ctx.seed, &ctx.id, ctx.index, round),
            };
            ctx.state.update(|p| {
                p.round = round;
                p.stop_k = 0;
                p.stop_n = plan.stops.len();
                p.phase = "assigning";
            });
            assign(&ctx, &plan, &stop).await?;
            ctx.state.tell(format!(
                "{} round {round}: {} shipments released through the ERP API, first stop {}",
                ctx.id,
                plan.stops.len(),
                plan.stops.first().map_or("-", |s| s.name.as_str())
            ));
            set_ignition(&ctx, true).await;
            ignition_on = true;
            // GPS time never goes back (the agent ignores older fixes).
            rx.next_ms = rx.next_ms.max(fleetsync_agent::now_ms());
            let (done_tx, done_rx) = watch::channel(0usize);
            let (leg_tx, leg_rx) = watch::channel(0usize);
            let driving = drive_round(&ctx, &plan, &mut rx, done_rx, leg_tx);
            let driver = driver_round(&ctx, round, &plan, leg_rx, done_tx, &stop);
            let (d, ()) = tokio::join!(driving, driver);
            d?;
            set_ignition(&ctx, false).await;
            ignition_on = false;
            ctx.state
                .tell(format!("{} back at the depot, round {round} done", ctx.id));
            ctx.state.update(|p| {
                p.rounds_done += 1;
                p.phase = "parked";
                p.speed_mps = 0.0;
                p.stop_k = 0;
            });
            let park = Duration::from_secs_f64((PARK_S as f64 / ctx.speedup).max(1.5));
            tokio::select! {
                _ = stop.cancelled() => return Err(Halt::Stopped),
                _ = tokio::time::sleep(park) => {}
            }
        }
        Ok(())
    }
    .await;
    if ignition_on {
        set_ignition(&ctx, false).await;
    }
    ctx.state.update(|p| {
        p.phase = "stopped";
        p.speed_mps = 0.0;
    });
    match r {
        Ok(()) | Err(Halt::Stopped) => {}
        Err(Halt::Gps(e)) => warn!(vehicle = %ctx.id, error = %e, "vehicle stopped: GPS stream"),
        Err(Halt::Api(e)) => warn!(vehicle = %ctx.id, error = %e, "vehicle stopped"),
    }
    rx.sock
}

async fn set_ignition(ctx: &VehicleCtx, on: bool) {
    if let Err(e) = tokio::fs::write(&ctx.ignition, if on { "1\n" } else { "0\n" }).await {
        warn!(vehicle = %ctx.id, error = %e, "cannot write the ignition file");
    }
}

/// Releases the round's shipments through the hub's ERP API (one per stop, on this
/// vehicle), and waits until the hub's assignment for the vehicle carries every stop, the
/// agent acknowledged it, and its driver API shows them.
async fn assign(ctx: &VehicleCtx, plan: &Round, stop: &CancellationToken) -> Result<(), Halt> {
    let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
    let pause = |ms| async move {
        tokio::select! {
            _ = stop.cancelled() => Err(Halt::Stopped),
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
        }
    };
    for (k, s) in plan.stops.iter().enumerate() {
        let id = format!("{}-{}", s.shipment_id, ctx.run_nonce);
        let path = format!("/v1/erp/shipments/{id}");
        loop {
            let r = ctx
                .erp
                .client
                .put(format!("{}{path}", ctx.erp.base))
                .bearer_auth(&ctx.erp.token)
                .json(&plan.shipment(k, &ctx.id))
                .send()
                .await
                .map_err(|e| Halt::Api(format!("PUT {path}: {e}")))?;
            let status = r.status();
            if status.is_success() {
                break;
            }
            let body = r.text().await.unwrap_or_default();
            // The hub knows a vehicle once its gateway has been heard from.
            if status == 400
                && body.contains("\"vehicle\"")
                && tokio::time::Instant::now() < deadline
            {
                pause(200).await?;
                continue;
            }
            return Err(Halt::Api(format!("PUT {path}: {status}: {body}")));
        }
    }
    let path = format!("/v1/ops/devices/{}/assignment", ctx.id);
    loop {
        if let Ok(v) = ctx.ops.get_json(&path).await
            && v["acknowledged"] == true
            && v["acked_version"] == v["assignment"]["version"]
            && plan.stops.iter().all(|s| {
                v["assignment"]["stops"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["id"] == s.id.as_str()))
            })
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Halt::Api(format!(
                "the assignment of {} with round {} was not acknowledged within {ACK_TIMEOUT:?}",
                ctx.id, plan.job_id
            )));
        }
        pause(100).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for s in &plan.stops {
            let ok = matches!(ctx.driver.get(&format!("/v1/jobs/{}", s.id)).await, Ok(r) if r.status() == 200);
            all &= ok;
        }
        if all {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Halt::Api(format!(
                "the driver API does not show the stops of {}",
                plan.job_id
            )));
        }
        pause(50).await?;
    }
}

/// The van's side of a round. `leg` tells the driver which stop the van is heading to or
/// standing at (the stop count once it heads back to the depot); `done` is how many stops
/// the driver has finished.
async fn drive_round(
    ctx: &VehicleCtx,
    plan: &Round,
    rx: &mut Receiver,
    done: watch::Receiver<usize>,
    leg: watch::Sender<usize>,
) -> Result<(), Halt> {
    if let Some(track) = ctx.track.clone() {
        return drive_track_round(ctx, plan, &track, rx, done, leg).await;
    }
    let depot = Waypoint {
        lat: plan.depot.0,
        lon: plan.depot.1,
        dwell_s: 0,
    };
    ctx.state.update(|p| p.phase = "at depot");
    for _ in 0..DEPOT_DWELL_S {
        rx.send(depot.lat, depot.lon, 0.0, 0.0).await?;
    }
    let mut prev = depot;
    for (k, s) in plan.stops.iter().enumerate() {
        leg.send_replace(k);
        ctx.state.update(|p| {
            p.stop_k = k + 1;
            p.phase = "driving";
        });
        let to = Waypoint {
            lat: s.lat,
            lon: s.lon,
            dwell_s: s.dwell_s,
        };
        let fixes = drive(&[prev, to], 0, CRUISE_MPS, plan.drive_seed ^ k as u64);
        let moving = fixes.len().saturating_sub(s.dwell_s as usize);
        rx.send_all(&fixes[..moving]).await?;
        ctx.state.update(|p| p.phase = "at stop");
        rx.send_all(&fixes[moving..]).await?;
        let heading = fixes.last().map_or(0.0, |f| f.heading_deg);
        let mut waited = 0;
        while *done.borrow() <= k && waited < MAX_WAIT_FOR_DRIVER_S {
            rx.send(s.lat, s.lon, 0.0, heading).await?;
            waited += 1;
        }
        prev = Waypoint { dwell_s: 0, ..to };
    }
    leg.send_replace(plan.stops.len());
    ctx.state.update(|p| {
        p.stop_k = 0;
        p.phase = "to depot";
    });
    let back = Waypoint {
        dwell_s: DEPOT_DWELL_S,
        ..depot
    };
    let fixes = drive(&[prev, back], 0, CRUISE_MPS, plan.drive_seed ^ 0xD0);
    rx.send_all(&fixes).await
}

/// A round on a replayed track: the recording up to each stop, standing there until the
/// driver is done, then the rest of the recording.
async fn drive_track_round(
    ctx: &VehicleCtx,
    plan: &Round,
    track: &[SimFix],
    rx: &mut Receiver,
    done: watch::Receiver<usize>,
    leg: watch::Sender<usize>,
) -> Result<(), Halt> {
    ctx.state.update(|p| p.phase = "at depot");
    for _ in 0..DEPOT_DWELL_S {
        rx.send(track[0].lat, track[0].lon, 0.0, 0.0).await?;
    }
    let mut prev = 0usize;
    for (k, (s, &i)) in plan.stops.iter().zip(&plan.track_idx).enumerate() {
        leg.send_replace(k);
        ctx.state.update(|p| {
            p.stop_k = k + 1;
            p.phase = "driving";
        });
        rx.send_all(&track[prev..=i]).await?;
        ctx.state.update(|p| p.phase = "at stop");
        let heading = track[i].heading_deg;
        let mut waited = 0;
        while waited < s.dwell_s || (*done.borrow() <= k && waited < MAX_WAIT_FOR_DRIVER_S) {
            rx.send(s.lat, s.lon, 0.0, heading).await?;
            waited += 1;
        }
        prev = i + 1;
    }
    leg.send_replace(plan.stops.len());
    ctx.state.update(|p| {
        p.stop_k = 0;
        p.phase = "to depot";
    });
    rx.send_all(&track[prev.min(track.len())..]).await
}

/// The driver's side of a round: a POD at each stop once the agent says "arrived".
async fn driver_round(
    ctx: &VehicleCtx,
    round: u32,
    plan: &Round,
    leg: watch::Receiver<usize>,
    done: watch::Sender<usize>,
    stop: &CancellationToken,
) {
    let poll = Duration::from_secs_f64((0.5 / ctx.speedup).max(0.05));
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.drive_seed ^ 0x00D5_1DE5);
    for (k, s) in plan.stops.iter().enumerate() {
        let path = format!("/v1/jobs/{}", s.id);
        // Once in the demo a driver takes the POD while the van is still on its way: the
        // agent takes it, the hub finds the geo-stamp outside the stop's fence and puts it
        // in the review queue.
        let too_early = ctx.index == 0 && round == 1 && k + 1 == plan.stops.len();
        let arrived = loop {
            if stop.is_cancelled() {
                return;
            }
            if *leg.borrow() > k {
                break false;
            }
            if too_early && *leg.borrow() == k {
                break true;
            }
            if let Ok(v) = ctx.driver.get_json(&path).await
                && v["state"] == "arrived"
            {
                break true;
            }
            tokio::time::sleep(poll).await;
        };
        if !arrived {
            warn!(vehicle = %ctx.id, stop = %s.id, "the agent never said arrived; no POD taken");
            ctx.state.update(|p| p.pods_failed += 1);
            continue;
        }
        let at = format!("{} ({}/{})", s.name, k + 1, plan.stops.len());
        if too_early {
            ctx.state.tell(format!(
                "{}'s driver takes the POD for {at} before the van is there: the hub will hold it for review",
                ctx.id
            ));
        } else {
            ctx.state.tell(format!("{} arrived at {at}", ctx.id));
        }
        // The driver walks to the door: a few seconds.
        let walk = rng.random_range(3.0..8.0) / ctx.speedup;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs_f64(walk)) => {}
        }
        let seed = rng.random();
        match post_pod(ctx, round, s, seed, too_early).await {
            Ok(rec) => {
                ctx.state.tell(format!(
                    "{} POD captured at {}: {}",
                    ctx.id,
                    s.name,
                    rec.what()
                ));
                lock(&ctx.state.pods).push(rec);
                ctx.state.update(|p| p.pods_posted += 1);
            }
            Err(e) => {
                warn!(vehicle = %ctx.id, stop = %s.id, error = %e, "POD not taken");
                ctx.state
                    .tell(format!("{} POD at {} failed: {e}", ctx.id, s.name));
                ctx.state.update(|p| p.pods_failed += 1);
            }
        }
        done.send_replace(k + 1);
    }
}

/// Takes a POD at `s`: mostly delivered, sometimes refused or damaged; a signature PNG
/// (unless refused) and a photo JPEG made on the fly.
async fn post_pod(
    ctx: &VehicleCtx,
    round: u32,
    s: &PlannedStop,
    seed: u64,
    delivered: bool,
) -> Result<PodRecord, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let roll: f64 = if delivered { 0.0 } else { rng.random() };
    let (outcome, reason) = if roll < 0.8 {
        ("delivered", None)
    } else if roll < 0.9 {
        ("refused", Some("customer_refused"))
    } else {
        ("damaged", Some("packaging_damaged"))
    };
    let recipient = RECIPIENTS[rng.random_range(0..RECIPIENTS.len())];
    let mut files = Vec::new();
    if outcome != "refused" {
        files.push(BlobRecord::Signature(rng.random()));
    }
    files.push(BlobRecord::Photo(rng.random()));
    let signature = files
        .iter()
        .find(|f| matches!(f, BlobRecord::Signature(_)))
        .map(BlobRecord::bytes);
    let photo = files
        .iter()
        .find(|f| matches!(f, BlobRecord::Photo(_)))
        .map(BlobRecord::bytes)
        .unwrap_or_default();
    let key = format!("{}-{}-r{round}-{}", ctx.run_nonce, ctx.id, s.id);
    let url = format!("{}/v1/stops/{}/pod", ctx.driver.base, s.id);
    let mut last_err = String::new();
    for attempt in 0..POD_ATTEMPTS {
        let part = |bytes: &[u8], name: &str, mime: &str| {
            reqwest::multipart::Part::bytes(bytes.to_vec())
                .file_name(name.to_string())
                .mime_str(mime)
                .map_err(|e| e.to_string())
        };
        let mut form = reqwest::multipart::Form::new()
            .text("outcome", outcome)
            .text(
                "shipment_id",
                format!("{}-{}", s.shipment_id, ctx.run_nonce),
            );
        if let Some(r) = reason {
            form = form.text("reason_code", r);
        }
        if outcome != "refused" {
            form = form.text("recipient_name", recipient);
        }
        if let Some(sig) = &signature {
            form = form.part("signature", part(sig, "signature.png", "image/png")?);
        }
        form = form.part("photo", part(&photo, "doorstep.jpg", "image/jpeg")?);
        let r = ctx
            .driver
            .client
            .post(&url)
            .bearer_auth(&ctx.driver.token)
            .header("Idempotency-Key", &key)
            .multipart(form)
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 201 => {
                let v: Value = r
                    .json()
                    .await
                    .map_err(|e| format!("201 without a JSON body: {e}"))?;
                return Ok(PodRecord {
                    stop_id: s.id.clone(),
                    pod_id: v["pod_id"].as_str().unwrap_or_default().to_string(),
                    epoch: v["epoch"].as_u64().unwrap_or(0) as u32,
                    seq: v["seq"].as_u64().unwrap_or(0),
                    outcome,
                    blobs: files,
                    recipient: (outcome != "refused").then_some(recipient),
                });
            }
            Ok(r) if r.status().is_server_error() => {
                last_err = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok(r) => {
                let status = r.status();
                return Err(format!("{status}: {}", r.text().await.unwrap_or_default()));
            }
            Err(e) => last_err = e.to_string(),
        }
        debug!(vehicle = %ctx.id, attempt, error = %last_err, "POD attempt failed; retrying with the same Idempotency-Key");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(last_err)
}

/// Lowercase hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

//! The chaos run's customer: two portal streams (`/v1/portal/stream` of customer CHAOS)
//! held open through the faults as open portal pages hold them.
//!
//! ```text
//! each client: connect (hub a, then b, a, ... with replicas), Last-Event-ID = the last
//!   id it got -> events until the stream ends (a hub killed, a replica gone) -> again
//!   after 300 ms
//! "steady" stays; "roaming" goes away twice for longer than the feed's slack (a phone in
//!   a tunnel) while the steady one keeps the customer's feed going, so that only a
//!   working resume from Last-Event-ID brings it up to date
//! ```
//!
//! The page keeps, per shipment, the view with the highest `rev`; so does this client.
//! Back from away, it reads the customer's shipments from the API first: each one written
//! while it was away must reach it at that `rev` or a later one within [`CATCH_UP`] of
//! reconnecting (the backlog a `Last-Event-ID` asks for; without it, a client gets only the
//! last 5 s). After the sinks are checked, [`check`] holds it against the API: every chaos
//! shipment must be shown at the `rev` and status `GET /v1/portal/shipments` answers with.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::oracle::Verdict;

/// How long the roaming client stays away each time: longer than the hub's ETA round
/// (30 s, which rewrites every open shipment) plus the feed's 5 s slack (what a client
/// without `Last-Event-ID` gets as its backlog), so that shipments are written while it is
/// away and more than the slack before it comes back.
const AWAY: std::ops::Range<u64> = 36_000..42_000;
/// When in the run it goes away (fractions of the run; not sooner than [`BETWEEN`] after
/// it came back).
const AWAY_AT: [std::ops::Range<f64>; 2] = [0.03..0.08, 0.45..0.5];
/// Least time connected between two absences.
const BETWEEN: Duration = Duration::from_secs(10);
/// A stream silent this long (no event, no heartbeat) is taken for dead.
const IDLE: Duration = Duration::from_secs(40);
/// How long the views may take to reach the API's revs once the run is over.
const SETTLE: Duration = Duration::from_secs(30);
/// How long after reconnecting the shipments written while away may take to arrive: the
/// backlog is read at once, and a shorter time than the ETA round's makes it unlikely that
/// a rewrite in that time hides a resume that did not work.
const CATCH_UP: Duration = Duration::from_secs(3);

/// What the client has seen.
#[derive(Debug, Default)]
struct Seen {
    /// Per shipment: the highest `rev` and that view's status.
    views: HashMap<String, (u64, String)>,
    shipment_events: u64,
    position_events: u64,
    connects: u64,
    /// Connections opened with a `Last-Event-ID`.
    resumes: u64,
    aways: u64,
    /// Shipments written while it was away, and of them those that reached it at the
    /// API's rev (or later) within [`CATCH_UP`] of reconnecting.
    away_changed: u64,
    caught_up: u64,
    /// Back from away: the revs it must reach (shipment -> the API's rev before it
    /// reconnected), and by when (set when the stream opens).
    catch_up: Option<(HashMap<String, u64>, Option<Instant>)>,
    /// Events it could not read, or of a shipment not CHAOS's, or what did not catch up
    /// (first few).
    bad: Vec<String>,
    last_id: Option<String>,
}

impl Seen {
    /// Keeps what went wrong (the first few), naming client `who`.
    fn note(&mut self, who: &str, msg: String) {
        if self.bad.len() < 5 {
            self.bad.push(format!("{who} client: {msg}"));
        }
    }

    /// Takes one event into what the client shows, or says why it cannot.
    fn take(
        &mut self,
        ev: crate::sse::Event,
        ours: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(), String> {
        match ev.name.as_str() {
            "shipment" => {
                let d: ShipmentData = serde_json::from_str(&ev.data)
                    .map_err(|e| format!("shipment event unreadable ({e}): {}", ev.data))?;
                if !ours(&d.id) {
                    return Err(format!("shipment event of {}: not CHAOS's", d.id));
                }
                self.shipment_events += 1;
                let v = self.views.entry(d.id).or_insert((0, String::new()));
                if d.rev > v.0 {
                    *v = (d.rev, d.status);
                }
            }
            "position" => match serde_json::from_str::<PositionData>(&ev.data) {
                Ok(d) if ours(&d.shipment_id) => self.position_events += 1,
                _ => return Err(format!("position event unreadable: {}", ev.data)),
            },
            other => return Err(format!("unknown event {other:?}")),
        }
        if ev.id.is_some() {
            self.last_id = ev.id;
        }
        Ok(())
    }
}

/// The running client.
#[derive(Debug)]
pub struct Watch {
    name: &'static str,
    seen: Mutex<Seen>,
}

impl Watch {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Deserialize)]
struct ShipmentData {
    id: String,
    rev: u64,
    status: String,
}

#[derive(Deserialize)]
struct PositionData {
    shipment_id: String,
}

/// Which shipments are the customer's (any other in its stream is a failure).
pub type Ours = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Starts a client `name` on `hubs` (taken in turn at each connection) with the customer
/// credential `token`, for the shipments `ours` admits; with `roam_seed` it goes away
/// twice within `run` (at seeded times). It ends at `stop`.
pub fn start(
    name: &'static str,
    hubs: Vec<String>,
    token: String,
    ours: Ours,
    roam_seed: Option<u64>,
    run: Duration,
    stop: CancellationToken,
) -> (Arc<Watch>, JoinHandle<()>) {
    let watch = Arc::new(Watch {
        name,
        seen: Mutex::new(Seen::default()),
    });
    let t0 = Instant::now();
    let mut aways: Vec<(Instant, Duration)> = match roam_seed {
        Some(seed) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9047a1);
            AWAY_AT
                .into_iter()
                .map(|at| {
                    (
                        t0 + run.mul_f64(rng.random_range(at)),
                        Duration::from_millis(rng.random_range(AWAY)),
                    )
                })
                .collect()
        }
        None => Vec::new(),
    };
    aways.reverse();
    let task = tokio::spawn(run_client(watch.clone(), hubs, token, ours, aways, stop));
    (watch, task)
}

async fn run_client(
    watch: Arc<Watch>,
    hubs: Vec<String>,
    token: String,
    ours: Ours,
    mut aways: Vec<(Instant, Duration)>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_default();
    let mut n = 0usize;
    while !stop.is_cancelled() {
        let hub = &hubs[n % hubs.len()];
        n += 1;
        let last_id = watch.seen().last_id.clone();
        let mut req = http
            .get(format!("{hub}/v1/portal/stream"))
            .bearer_auth(&token);
        if let Some(id) = &last_id {
            req = req.header("Last-Event-ID", id);
        }
        let away_at = aways.last().map(|(at, _)| *at);
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = req.send() => r,
        };
        match opened {
            Ok(resp) if resp.status().is_success() => {
                {
                    let mut s = watch.seen();
                    s.connects += 1;
                    s.resumes += u64::from(last_id.is_some());
                    // The catch-up's time starts with a stream that opened (again, if the
                    // last one ended before it was over).
                    if let Some((_, by)) = &mut s.catch_up {
                        *by = Some(Instant::now() + CATCH_UP);
                    }
                }
                read(&watch, resp, &*ours, away_at, &stop).await;
            }
            // A hub starting up, or not there: try again (any other answer is kept, and
            // the check fails on it).
            Ok(resp) if resp.status().is_server_error() => {}
            Ok(resp) => {
                let st = resp.status();
                let body = resp.text().await.unwrap_or_default();
                note_bad(&watch, format!("stream at {hub} answered {st}: {body}"));
            }
            Err(_) => {}
        }
        if let Some((at, d)) = aways.last().copied()
            && Instant::now() >= at
        {
            aways.pop();
            judge_catch_up(&watch);
            watch.seen().aways += 1;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(d) => {}
            }
            let back = Instant::now();
            if let Some((at, _)) = aways.last_mut() {
                *at = (*at).max(back + BETWEEN);
            }
            // What the API shows before the stream is opened again: what it must catch up.
            let next = &hubs[n % hubs.len()];
            let until = Instant::now() + SETTLE;
            let api = loop {
                match api_views(&http, next, &token, &*ours).await {
                    Ok(a) => break Some(a),
                    Err(_) if Instant::now() < until && !stop.is_cancelled() => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(e) => {
                        note_bad(&watch, format!("back from away: {e}"));
                        break None;
                    }
                }
            };
            if let Some(api) = api {
                let mut s = watch.seen();
                let must: HashMap<String, u64> = api
                    .into_iter()
                    .filter(|(id, (rev, _))| s.views.get(id).is_none_or(|(r, _)| r < rev))
                    .map(|(id, (rev, _))| (id, rev))
                    .collect();
                s.away_changed += must.len() as u64;
                s.catch_up = Some((must, None));
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn note_bad(watch: &Watch, msg: String) {
    watch.seen().note(watch.name, msg);
}

/// Reads one connection's events until it ends, `away_at`, or `stop`.
async fn read(
    watch: &Watch,
    mut resp: reqwest::Response,
    ours: &(dyn Fn(&str) -> bool + Sync),
    away_at: Option<Instant>,
    stop: &CancellationToken,
) {
    let away = async {
        match away_at {
            Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(away);
    let mut buf = Vec::new();
    loop {
        let by = watch.seen().catch_up.as_ref().and_then(|(_, by)| *by);
        let caught = async {
            match by {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        let chunk = tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut away => return,
            _ = caught => {
                judge_catch_up(watch);
                continue;
            }
            c = tokio::time::timeout(IDLE, resp.chunk()) => c,
        };
        match chunk {
            Ok(Ok(Some(bytes))) => buf.extend_from_slice(&bytes),
            // Ended, broken, or silent past the heartbeat: connect again.
            _ => return,
        }
        for ev in crate::sse::take_events(&mut buf) {
            let mut s = watch.seen();
            if let Err(msg) = s.take(ev, ours) {
                s.note(watch.name, msg);
            }
        }
    }
}

/// The catch-up's time is over: what reached the API's rev counts as caught up, the rest
/// is a failure.
fn judge_catch_up(watch: &Watch) {
    let mut s = watch.seen();
    let Some((must, _)) = s.catch_up.take() else {
        return;
    };
    let mut missed = Vec::new();
    for (id, rev) in &must {
        match s.views.get(id) {
            Some((r, _)) if r >= rev => s.caught_up += 1,
            shown => missed.push(format!(
                "{id} (the API had rev {rev}, the stream gave {})",
                shown.map_or("nothing".into(), |(r, _)| format!("rev {r}"))
            )),
        }
    }
    drop(s);
    if !missed.is_empty() {
        missed.sort();
        note_bad(
            watch,
            format!(
                "back from away, {} of {} shipments written meanwhile did not arrive within {} s of reconnecting with Last-Event-ID: {}",
                missed.len(),
                must.len(),
                CATCH_UP.as_secs(),
                missed
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
}

#[derive(Deserialize)]
struct Page {
    shipments: Vec<Summary>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct Summary {
    id: String,
    status: String,
    rev: u64,
}

/// The API's `(rev, status)` of the shipments `ours` admits, as the customer reads them.
async fn api_views(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    ours: &(dyn Fn(&str) -> bool + Sync),
) -> Result<HashMap<String, (u64, String)>, String> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{hub}/v1/portal/shipments?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if r.status() == 429 {
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if !r.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", r.status()));
        }
        let page: Page = r.json().await.map_err(|e| format!("GET {url}: {e}"))?;
        for s in page.shipments {
            if ours(&s.id) {
                out.insert(s.id, (s.rev, s.status));
            }
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => return Ok(out),
        }
    }
}

/// Holds the client's views against the API once the run is over (retried for
/// [`SETTLE`]: the last writes may still be on their way), then stops it. Fails the
/// verdict on a shipment shown at another `rev` than the API's, on no position event at
/// all (the vehicles drove to their customers' stops), and on any unreadable event.
pub async fn check(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    watches: &[Arc<Watch>],
    shipments: &[String],
    verdict: &mut Verdict,
) {
    let wanted: HashSet<&str> = shipments.iter().map(String::as_str).collect();
    let deadline = Instant::now() + SETTLE;
    let mut behind: Vec<String>;
    loop {
        let api = match api_views(client, hub, token, &|id: &str| wanted.contains(id)).await {
            Ok(a) => a,
            Err(e) => {
                verdict.failures.push(format!("portal check: {e}"));
                verdict.ok = false;
                return;
            }
        };
        behind = Vec::new();
        verdict.portal_expected = (wanted.len() * watches.len()) as u64;
        verdict.portal_current = 0;
        for w in watches {
            let s = w.seen();
            for id in shipments {
                let shown = s.views.get(id);
                match (api.get(id), shown) {
                    (Some(a), Some(v)) if a == v => verdict.portal_current += 1,
                    (a, v) => behind.push(format!(
                        "{id}: the {} client shows {}, the API has {}",
                        w.name,
                        v.map_or("nothing".into(), |(r, st)| format!("rev {r} ({st})")),
                        a.map_or("nothing".into(), |(r, st)| format!("rev {r} ({st})")),
                    )),
                }
            }
        }
        if behind.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut fail = |m: String| {
        verdict.failures.push(m);
        verdict.ok = false;
    };
    if !behind.is_empty() {
        fail(format!(
            "portal stream: {} of {} shipment views not as the API has them {} s after the run: {}",
            behind.len(),
            shipments.len() * watches.len(),
            SETTLE.as_secs(),
            behind
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut bad = Vec::new();
    for w in watches {
        judge_catch_up(w);
        let s = w.seen();
        verdict.portal_connects += s.connects;
        verdict.portal_resumes += s.resumes;
        verdict.portal_aways += s.aways;
        verdict.portal_away_changed += s.away_changed;
        verdict.portal_caught_up += s.caught_up;
        verdict.portal_shipment_events += s.shipment_events;
        verdict.portal_position_events += s.position_events;
        if s.aways > 0 && s.away_changed == 0 {
            bad.push(format!(
                "the {} client was away {} times and no shipment was written meanwhile: its resume was not put to the test",
                w.name, s.aways
            ));
        }
        if s.position_events == 0 {
            bad.push(format!(
                "the {} client got no position event, while every vehicle drove to its customer's stop",
                w.name
            ));
        }
        bad.extend(s.bad.iter().cloned());
    }
    for b in bad {
        fail(format!("portal stream: {b}"));
    }
}

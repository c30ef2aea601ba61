//! The live display: what just happened, one line each as it happens ("van-02 arrived at
//! Bakkerij Jordaan (1/3)", "van-02 POD captured at ...", a shipment's milestone as the
//! hub records it), above one line per vehicle. On a terminal the vehicle lines are
//! redrawn in place every second under the news (plain ANSI); on anything else (a pipe, a
//! CI log) the news is printed as it comes and the vehicle lines every [`PLAIN_EVERY`].
//!
//! News comes from the vehicles' tasks ([`VehicleState::take_news`]) and from the hub's
//! operator API (`GET /v1/ops/shipments?updated_after=...`, every [`MILESTONES_EVERY`]):
//! each change of a shipment's state is a milestone the hub derived from the vehicles'
//! events.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Http;
use super::vehicle::VehicleState;
use crate::fake_erp::FakeErp;

/// Redraw period on a terminal, and how often news is printed.
const REDRAW: Duration = Duration::from_secs(1);
/// Period of the vehicle lines when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// How often the hub's shipments are read for milestones.
const MILESTONES_EVERY: Duration = Duration::from_secs(2);
/// Shipments whose last state is remembered (to tell a change); past it, those not
/// updated lately are forgotten (an update of one prints its state again).
const MAX_SHIPMENTS: usize = 10_000;
/// Pages of shipments read per look (1,000 each).
const MAX_PAGES: usize = 5;

/// What one line shows.
#[derive(Debug)]
pub struct Row {
    /// Device id.
    pub id: String,
    /// The vehicle's progress.
    pub state: Arc<VehicleState>,
    /// The agent's store (backlog).
    pub store: fleetsync_agent::store::Store,
    /// The agent's link (connected).
    pub link: Arc<fleetsync_agent::uplink::LinkState>,
}

/// One vehicle's line.
pub fn line(row: &Row) -> String {
    let p = row.state.progress();
    let s = row.store.stats();
    let backlog = s.critical.events + s.telemetry.events;
    let stop = if p.stop_k == 0 {
        "  -/-".to_string()
    } else {
        format!("{:>3}/{}", p.stop_k, p.stop_n)
    };
    format!(
        "{:<8} round {:<3} stop {stop}  {:<10} {:>3.0} km/h  {:<9} backlog {:>5}  PODs {:>3}{}",
        row.id,
        p.round,
        if p.phase.is_empty() {
            "starting"
        } else {
            p.phase
        },
        p.speed_mps * 3.6,
        if row.link.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "offline"
        },
        backlog,
        p.pods_posted,
        if p.pods_failed > 0 {
            format!(" ({} failed)", p.pods_failed)
        } else {
            String::new()
        }
    )
}

/// The hub's shipments as last seen, to turn state changes into news.
#[derive(Debug, Default)]
struct Milestones {
    /// Shipment id -> (state, updated) as last seen.
    seen: HashMap<String, (String, String)>,
    /// The latest `updated` seen (RFC 3339): the next look asks for what changed since a
    /// little before it.
    latest: Option<chrono::DateTime<chrono::FixedOffset>>,
}

impl Milestones {
    async fn look(&mut self, ops: &Http) -> Vec<String> {
        // A margin for updates committed out of order around the latest one seen.
        let since = self.latest.map(|t| {
            (t - chrono::TimeDelta::seconds(5)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
        let mut news = Vec::new();
        let mut cursor = String::new();
        for _ in 0..MAX_PAGES {
            let mut path = "/v1/ops/shipments?limit=1000".to_string();
            if let Some(s) = &since {
                path.push_str(&format!("&updated_after={s}"));
            }
            path.push_str(&cursor);
            let Ok(page) = ops.get_json(&path).await else {
                break;
            };
            for s in page["shipments"].as_array().into_iter().flatten() {
                let (Some(id), Some(state), Some(updated)) =
                    (s["id"].as_str(), s["state"].as_str(), s["updated"].as_str())
                else {
                    continue;
                };
                if let Ok(t) = chrono::DateTime::parse_from_rfc3339(updated) {
                    self.latest = Some(self.latest.map_or(t, |l| l.max(t)));
                }
                let changed = self.seen.get(id).is_none_or(|(was, _)| was != state);
                self.seen
                    .insert(id.to_string(), (state.to_string(), updated.to_string()));
                // CREATED and PLANNED are the ERP's release and the hub's assignment,
                // which the vehicle's news already says ("round 1: 3 shipments ...").
                if changed && !matches!(state, "CREATED" | "PLANNED") {
                    news.push(format!(
                        "shipment {} for {} on {}: {state}",
                        s["reference"].as_str().unwrap_or(id),
                        s["customer_id"].as_str().unwrap_or("?"),
                        s["vehicle"].as_str().unwrap_or("no vehicle"),
                    ));
                }
            }
            match page["next"].as_str() {
                Some(n) => cursor = format!("&cursor={n}"),
                None => break,
            }
        }
        if self.seen.len() > MAX_SHIPMENTS
            && let Some(cut) = since
        {
            self.seen.retain(|_, (_, updated)| *updated >= cut);
        }
        news
    }
}

/// What the ERP applied since the last call, as news ("ERP: SO-1003 POD_CONFIRMED ->
/// INVOICE_READY, billing released").
fn erp_news(erp: &FakeErp, seen: &mut usize) -> Vec<String> {
    let applied = erp.applied();
    let news = applied
        .iter()
        .skip(*seen)
        .filter(|r| r.body["data"]["milestone"] != "ETA")
        .map(|r| {
            let d = &r.body["data"];
            let billing = if d["billing_release"] == true {
                let ev = &d["evidence"];
                let photos = ev["photos"].as_array().map_or(0, Vec::len);
                let sig = if ev["signature"].is_string() {
                    "signature + "
                } else {
                    ""
                };
                format!(", billing released (evidence: {sig}{photos} photo(s) at the hub)")
            } else {
                String::new()
            };
            format!(
                "ERP: {} {} -> {}{billing}",
                d["reference"].as_str().unwrap_or("?"),
                d["milestone"].as_str().unwrap_or("?"),
                d["erp_status"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    *seen = applied.len();
    news
}

/// Draws until `stop`.
pub async fn run(rows: Vec<Row>, ops: Http, erp: FakeErp, stop: CancellationToken) {
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut tick = tokio::time::interval(REDRAW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut milestones = Milestones::default();
    let mut erp_seen = 0;
    let mut looked: Option<Instant> = None;
    let mut plain_at: Option<Instant> = None;
    let mut drawn = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut news: Vec<String> = rows.iter().flat_map(|r| r.state.take_news()).collect();
        if looked.is_none_or(|l| l.elapsed() >= MILESTONES_EVERY) {
            looked = Some(Instant::now());
            news.extend(milestones.look(&ops).await);
        }
        news.extend(erp_news(&erp, &mut erp_seen));
        let t = start.elapsed().as_secs();
        let mut out = String::new();
        if tty {
            if drawn {
                // Back over the vehicle lines: the news goes where they were.
                out.push_str(&format!("\x1b[{}A", rows.len()));
            }
            for l in &news {
                out.push_str(&format!("\x1b[2K[{t:>4} s] {l}\n"));
            }
            for r in &rows {
                out.push_str("\x1b[2K");
                out.push_str(&line(r));
                out.push('\n');
            }
        } else {
            for l in &news {
                out.push_str(&format!("[{t:>4} s] {l}\n"));
            }
            if plain_at.is_none_or(|p| p.elapsed() >= PLAIN_EVERY) {
                plain_at = Some(Instant::now());
                for r in &rows {
                    out.push_str(&format!("[{t:>4} s]   {}\n", line(r)));
                }
            }
        }
        drawn = true;
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
    }
}

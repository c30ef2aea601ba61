//! The end of a run: what each vehicle sent and the agent accepted, checked against what
//! the hub holds (the delivery contract's oracle), as a JSON report and a summary table.
//!
//! Per vehicle, over the agent's current epoch:
//!
//! - `lost`: accepted events missing at the hub. The agent gives seqs densely from 0, so
//!   the accepted set known here is every seq up to the highest one at the hub, every POD
//!   the agent answered 201, and whatever the agent still holds after the drain; `lost` is
//!   the larger of that set's misses, missing positions (fixes the agent took minus
//!   positions at the hub) and missing PODs.
//! - `duplicated`: events at the hub whose content (everything but `epoch`, `seq`,
//!   `recorded_time`) equals an earlier one's, plus repeated `(epoch, seq)`.
//! - latency: `recorded_time - capture`, where capture is the wall time the fix was written
//!   to the agent for events stamped with a fix's GPS time (positions, geofence, trips from
//!   fixes) and `event_time` otherwise (agent clock: POD, health, ignition, acks).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use fleetsync_protocol::json::Time;
use serde::Serialize;
use serde_json::Value;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Events measured.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Largest.
    pub max_ms: u64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(mut samples: Vec<u64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let p = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Latency {
            count: n as u64,
            p50_ms: p(0.50),
            p90_ms: p(0.90),
            p99_ms: p(0.99),
            max_ms: samples[n - 1],
        }
    }
}

/// Figures of one vehicle (or the total).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Rounds driven to the end.
    pub rounds_done: u64,
    /// Fixes written to the agent's GPS stream.
    pub fixes_sent: u64,
    /// Fixes the agent read.
    pub fixes_taken: u64,
    /// Positions of this run at the hub.
    pub positions_at_hub: u64,
    /// Events of this run at the hub (all kinds).
    pub events_at_hub: u64,
    /// PODs the agent answered 201.
    pub pods_posted: u64,
    /// PODs not taken (agent refused, never arrived).
    pub pods_failed: u64,
    /// Of the posted PODs, those at the hub.
    pub pods_at_hub: u64,
    /// Files sent with the posted PODs.
    pub blobs_posted: u64,
    /// Of those, fetched from the hub byte-identical.
    pub blobs_verified: u64,
    /// Geofence enters at the hub.
    pub geofence_enter: u64,
    /// Geofence exits at the hub.
    pub geofence_exit: u64,
    /// Accepted by the agent, not at the hub after the drain.
    pub lost: u64,
    /// Same event content more than once at the hub.
    pub duplicated: u64,
    /// Events the agent still held after the drain.
    pub backlog_left: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.rounds_done += o.rounds_done;
        self.fixes_sent += o.fixes_sent;
        self.fixes_taken += o.fixes_taken;
        self.positions_at_hub += o.positions_at_hub;
        self.events_at_hub += o.events_at_hub;
        self.pods_posted += o.pods_posted;
        self.pods_failed += o.pods_failed;
        self.pods_at_hub += o.pods_at_hub;
        self.blobs_posted += o.blobs_posted;
        self.blobs_verified += o.blobs_verified;
        self.geofence_enter += o.geofence_enter;
        self.geofence_exit += o.geofence_exit;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.backlog_left += o.backlog_left;
    }
}

/// One vehicle's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct VehicleReport {
    /// Device id.
    pub id: String,
    /// The agent's epoch in this run.
    pub epoch: u32,
    /// Figures.
    #[serde(flatten)]
    pub counts: Counts,
    /// Capture to hub.
    pub latency: Latency,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always "demo".
    pub mode: &'static str,
    /// The seed of the stops and drives.
    pub seed: u64,
    /// Fixes per wall second.
    pub speedup: f64,
    /// Wall seconds from the first vehicle's start to the end of driving.
    pub driven_s: f64,
    /// Whether every agent's backlog reached 0 within the drain wait.
    pub drained: bool,
    /// Per vehicle.
    pub vehicles: Vec<VehicleReport>,
    /// Sums.
    pub total: Counts,
    /// Capture to hub, all vehicles.
    pub latency: Latency,
    /// lost == 0, duplicated == 0, every POD and blob at the hub, every fix taken at the hub.
    pub oracle_ok: bool,
    /// Why the oracle failed (empty when it passed).
    pub oracle_failures: Vec<String>,
    /// Shipments the demo released through the ERP API, by state at the end.
    pub shipments: std::collections::BTreeMap<String, u64>,
    /// Open items in the hub's review queue at the end.
    pub review_open: u64,
}

/// What the hub holds for one device and epoch, and the checks against what was accepted.
pub(crate) struct HubView {
    pub(crate) counts: Counts,
    pub(crate) latencies: Vec<u64>,
}

fn time_ms(v: &Value) -> Option<u64> {
    serde_json::from_value::<Time>(v.clone()).ok().map(|t| t.0)
}

/// Compares a device's hub events (all epochs) with what the sim knows was accepted.
pub(crate) fn check(
    events: &[Value],
    epoch: u32,
    pods: &[super::vehicle::PodRecord],
    left_in_agent: &[(u32, u64)],
    fix_wall: &HashMap<u64, u64>,
    fixes_taken: u64,
) -> HubView {
    let mut c = Counts::default();
    let mut ids: HashSet<(u32, u64)> = HashSet::new();
    let mut contents: HashSet<String> = HashSet::new();
    let mut pod_ids: HashSet<String> = HashSet::new();
    let mut max_seq: Option<u64> = None;
    let mut latencies = Vec::new();
    for e in events {
        let (Some(ep), Some(seq)) = (e["epoch"].as_u64(), e["seq"].as_u64()) else {
            continue;
        };
        if ep != u64::from(epoch) {
            continue;
        }
        if !ids.insert((epoch, seq)) {
            tracing::warn!(epoch, seq, "the hub lists this event twice");
            c.duplicated += 1;
            continue;
        }
        let mut content = e.clone();
        if let Some(m) = content.as_object_mut() {
            for k in ["epoch", "seq", "recorded_time"] {
                m.remove(k);
            }
        }
        let content = content.to_string();
        if contents.contains(&content) {
            tracing::warn!(epoch, seq, event = %content, "the hub holds this event's content twice");
            c.duplicated += 1;
        } else {
            contents.insert(content);
        }
        max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
        c.events_at_hub += 1;
        match e["kind"].as_str() {
            Some("position") => c.positions_at_hub += 1,
            Some("geofence") => match e["transition"].as_str() {
                Some("enter") => c.geofence_enter += 1,
                Some("exit") => c.geofence_exit += 1,
                _ => {}
            },
            Some("pod") => {
                if let Some(p) = e["pod_id"].as_str() {
                    pod_ids.insert(p.to_string());
                }
            }
            _ => {}
        }
        if let (Some(t), Some(r)) = (time_ms(&e["event_time"]), time_ms(&e["recorded_time"])) {
            let capture = fix_wall.get(&t).copied().unwrap_or(t);
            latencies.push(r.saturating_sub(capture));
        }
    }
    let mut known: BTreeSet<(u32, u64)> = BTreeSet::new();
    if let Some(m) = max_seq {
        known.extend((0..=m).map(|s| (epoch, s)));
    }
    known.extend(pods.iter().map(|p| (p.epoch, p.seq)));
    known.extend(left_in_agent.iter().copied());
    let missing = known.iter().filter(|id| !ids.contains(id)).count() as u64;
    c.pods_posted = pods.len() as u64;
    c.pods_at_hub = pods.iter().filter(|p| pod_ids.contains(&p.pod_id)).count() as u64;
    c.fixes_taken = fixes_taken;
    c.backlog_left = left_in_agent.len() as u64;
    c.lost = missing
        .max(fixes_taken.saturating_sub(c.positions_at_hub))
        .max(c.pods_posted - c.pods_at_hub);
    HubView {
        counts: c,
        latencies,
    }
}

impl Report {
    /// Sums the vehicles, computes latency and the oracle's verdict.
    pub(crate) fn build(
        seed: u64,
        speedup: f64,
        driven_s: f64,
        drained: bool,
        vehicles: Vec<VehicleReport>,
        all_latencies: Vec<u64>,
    ) -> Report {
        let mut total = Counts::default();
        for v in &vehicles {
            total.add(&v.counts);
        }
        let mut failures = Vec::new();
        if total.lost > 0 {
            failures.push(format!("{} events lost", total.lost));
        }
        if total.duplicated > 0 {
            failures.push(format!("{} events duplicated", total.duplicated));
        }
        if total.pods_at_hub != total.pods_posted {
            failures.push(format!(
                "{} of {} PODs at the hub",
                total.pods_at_hub, total.pods_posted
            ));
        }
        if total.blobs_verified != total.blobs_posted {
            failures.push(format!(
                "{} of {} blobs byte-identical at the hub",
                total.blobs_verified, total.blobs_posted
            ));
        }
        if total.positions_at_hub != total.fixes_taken {
            failures.push(format!(
                "{} positions at the hub for {} fixes taken",
                total.positions_at_hub, total.fixes_taken
            ));
        }
        Report {
            mode: "demo",
            seed,
            speedup,
            driven_s,
            drained,
            vehicles,
            total,
            latency: Latency::of(all_latencies),
            oracle_ok: failures.is_empty(),
            oracle_failures: failures,
            shipments: Default::default(),
            review_open: 0,
        }
    }

    /// The readable summary table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<8} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>4} {:>3} {:>6} {:>6} {:>6} {:>6}",
            "vehicle",
            "fixes",
            "pos@h",
            "events",
            "POD",
            "POD@h",
            "blobs",
            "ok",
            "enter",
            "exit",
            "lost",
            "dup",
            "p50ms",
            "p90ms",
            "p99ms",
            "maxms"
        );
        let mut line = |name: &str, c: &Counts, l: &Latency| {
            let _ = writeln!(
                s,
                "{:<8} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>4} {:>3} {:>6} {:>6} {:>6} {:>6}",
                name,
                c.fixes_sent,
                c.positions_at_hub,
                c.events_at_hub,
                c.pods_posted,
                c.pods_at_hub,
                c.blobs_posted,
                c.blobs_verified,
                c.geofence_enter,
                c.geofence_exit,
                c.lost,
                c.duplicated,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms
            );
        };
        for v in &self.vehicles {
            line(&v.id, &v.counts, &v.latency);
        }
        line("total", &self.total, &self.latency);
        let _ = writeln!(
            s,
            "drive {:.0} s at speedup {}; backlog {}; {}",
            self.driven_s,
            self.speedup,
            if self.drained {
                "drained".to_string()
            } else {
                format!("NOT drained ({} events left)", self.total.backlog_left)
            },
            if self.oracle_ok {
                "oracle: OK (lost 0, duplicated 0, every POD and blob at the hub)".to_string()
            } else {
                format!("oracle: FAILED: {}", self.oracle_failures.join("; "))
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).collect());
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count),
            (50, 90, 99, 100, 100)
        );
        assert_eq!(Latency::of(vec![]), Latency::default());
    }

    #[test]
    fn holes_and_repeats_are_lost_and_duplicated() {
        let ev = |seq: u64, t: &str| {
            json!({"epoch": 2, "seq": seq, "recorded_time": "2026-01-01T00:00:01Z",
                   "kind": "position", "event_time": t, "lat": 52.0, "lon": 4.0})
        };
        let events = vec![
            ev(0, "2026-01-01T00:00:00Z"),
            ev(2, "2026-01-01T00:00:00.500Z"),
            ev(3, "2026-01-01T00:00:00.500Z"),
            json!({"epoch": 1, "seq": 7, "kind": "position"}),
        ];
        let v = check(&events, 2, &[], &[], &HashMap::new(), 4);
        assert_eq!(v.counts.positions_at_hub, 3);
        assert_eq!(v.counts.duplicated, 1);
        // seq 1 is a hole; one of 4 fixes missing.
        assert_eq!(v.counts.lost, 1);
        assert_eq!(v.latencies, vec![1000, 500, 500]);
    }
}

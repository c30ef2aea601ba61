//! Where each vehicle is, when it will reach its open stops, and whether that is in time.
//!
//! ```text
//! position events --(ingest round, same write)--> VehiclePosition per device
//!     newest fix by capture time; a 5-minute moving average of the reported speeds
//! every eta_interval_s: for each vehicle with open shipments and a fresh position
//!     its assignment's stops in planned order, not yet arrived at
//!     eta(first) = fix time + metres to the fence x road_factor / speed
//!     eta(next)  = eta(previous) + service_s + metres between the stops x road_factor / speed
//!     speed = the recent average, or eta_fallback_kmh while it is under 2 m/s (a van at a
//!     light or a depot is not a van that will never arrive)
//! per (shipment, stop): StopEstimate on the record; an EST fact only when the estimate
//!     moves by more than 5 minutes from the last published one
//! ```
//!
//! Timeliness of an open stop, at read time (`now`):
//! - `late`: the window's end has passed, or the last two estimates in a row fell after it;
//! - `at_risk`: the latest estimate falls after the window's end, the one before did not;
//! - `unknown`: no position from the vehicle for 10 minutes (or never), or no estimate yet;
//! - `on_time`: otherwise (also a stop without a window).
//!
//! A reached stop is `late` if the vehicle arrived after the window's end, else `on_time`.
//! A shipment's timeliness is its worst stop (late, at_risk, unknown, on_time), counting
//! only stops not yet reached while any is open. Fixes older than the stored one (a
//! backlog sent after an outage, newest first) change neither the position nor the speed.
//!
//! An EST fact's id names the stop and the fix it was computed from
//! (`eta:{stop}:{device}:{epoch}:{seq}`), so hub processes estimating from the same
//! position write one fact.

use std::collections::BTreeMap;

use fleetsync_protocol::{Fence, Fix};
use serde::{Deserialize, Serialize};

use super::correlate::{haversine_m, outside_m};

/// Positions this old make timeliness `unknown`.
pub const STALE_AFTER_MS: u64 = 10 * 60_000;
/// An estimate is published (an EST fact) only when it moves by more than this.
pub const PUBLISH_STEP_MS: u64 = 5 * 60_000;
/// Time constant of the speed average.
const SPEED_TAU_MS: f64 = 5.0 * 60_000.0;
/// Below this average (cm/s) the fallback speed is used.
const MIN_SPEED_CMPS: f64 = 200.0;

/// How estimates are made (`[shipments]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EtaSettings {
    /// Road distance over straight-line distance.
    pub road_factor: f64,
    /// Speed when the vehicle's recent speed is unknown or near zero (km/h).
    pub fallback_kmh: f64,
    /// Time spent at each stop before driving on (s).
    pub service_s: u64,
}

impl Default for EtaSettings {
    fn default() -> Self {
        EtaSettings {
            road_factor: 1.3,
            fallback_kmh: 30.0,
            service_s: 300,
        }
    }
}

/// The newest position a vehicle reported, and how fast it has been going.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VehiclePosition {
    /// Capture time of the newest fix (ms).
    pub time_ms: u64,
    /// When the hub stored it (ms).
    pub recorded_ms: u64,
    /// Latitude in 1e-7 degree.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degree.
    pub lon_e7: i32,
    /// The fix's own ground speed (cm/s).
    pub speed_cmps: Option<u16>,
    /// Moving average of the reported speeds over about 5 minutes (cm/s).
    pub avg_speed_cmps: Option<f64>,
    /// The fix's event: its epoch.
    pub epoch: u32,
    /// The fix's event: its sequence number.
    pub seq: u64,
}

/// One fix of a batch: capture time, the fix, its event's epoch and seq.
pub type FixAt<'a> = (u64, &'a Fix, u32, u64);

/// `prev` with `fixes` folded in (any order; fixes not newer than `prev` are ignored);
/// `None` if nothing changes.
pub fn fold_position(
    prev: Option<&VehiclePosition>,
    fixes: &mut [FixAt<'_>],
    recorded_ms: u64,
) -> Option<VehiclePosition> {
    fixes.sort_by_key(|(t, _, e, s)| (*t, *e, *s));
    let mut cur = prev.cloned();
    let mut changed = false;
    for (t, fix, epoch, seq) in fixes.iter() {
        if cur.as_ref().is_some_and(|c| *t <= c.time_ms) {
            continue;
        }
        let avg = match (cur.as_ref(), fix.speed_cmps) {
            (Some(c), Some(v)) => Some(match c.avg_speed_cmps {
                Some(a) => {
                    let alpha = 1.0 - (-((t - c.time_ms) as f64) / SPEED_TAU_MS).exp();
                    a + alpha * (f64::from(v) - a)
                }
                None => f64::from(v),
            }),
            (None, v) => v.map(f64::from),
            (Some(c), None) => c.avg_speed_cmps,
        };
        cur = Some(VehiclePosition {
            time_ms: *t,
            recorded_ms,
            lat_e7: fix.lat_e7,
            lon_e7: fix.lon_e7,
            speed_cmps: fix.speed_cmps,
            avg_speed_cmps: avg,
            epoch: *epoch,
            seq: *seq,
        });
        changed = true;
    }
    if changed { cur } else { None }
}

/// A stop's estimate as the hub keeps it on the shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopEstimate {
    /// The estimate last published (the latest EST fact's time, ms).
    pub eta_ms: u64,
    /// Consecutive estimates after the window's end (0, 1, 2: two or more), each from
    /// another fix (estimates from the same fix are the same estimate).
    pub late_streak: u8,
    /// The fix the published estimate came from (`device:epoch:seq`).
    pub position: String,
    /// The fix that last counted in `late_streak`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streak_from: Option<String>,
}

/// Metres per second to plan with.
fn speed_mps(pos: &VehiclePosition, s: &EtaSettings) -> f64 {
    match pos.avg_speed_cmps {
        Some(v) if v >= MIN_SPEED_CMPS => v / 100.0,
        _ => s.fallback_kmh / 3.6,
    }
}

/// The centre of a fence (a polygon's vertex mean).
fn centre(f: &Fence) -> (f64, f64) {
    match f {
        Fence::Circle { center, .. } => (
            f64::from(center.lat_e7) / 1e7,
            f64::from(center.lon_e7) / 1e7,
        ),
        Fence::Polygon { points } => {
            let n = points.len().max(1) as f64;
            let (la, lo) = points.iter().fold((0.0, 0.0), |(a, b), p| {
                (a + f64::from(p.lat_e7) / 1e7, b + f64::from(p.lon_e7) / 1e7)
            });
            (la / n, lo / n)
        }
    }
}

/// Estimated arrival (ms) at each of `stops` (in driving order, none reached yet) from
/// `pos`: see the module note.
pub fn estimate(pos: &VehiclePosition, stops: &[(&str, &Fence)], s: &EtaSettings) -> Vec<u64> {
    let v = speed_mps(pos, s);
    let drive_ms = |m: f64| (m * s.road_factor / v * 1000.0).round() as u64;
    let mut out = Vec::with_capacity(stops.len());
    let mut t = pos.time_ms;
    let mut prev: Option<&Fence> = None;
    for (_, fence) in stops {
        t += match prev {
            None => drive_ms(outside_m(fence, pos.lat_e7, pos.lon_e7)),
            Some(p) => s.service_s * 1000 + drive_ms(haversine_m(centre(p), centre(fence))),
        };
        out.push(t);
        prev = Some(fence);
    }
    out
}

/// What a new estimate does to a stop's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// The record to keep.
    pub estimate: StopEstimate,
    /// Whether to publish it as an EST fact.
    pub publish: bool,
    /// Whether the record changed (and must be written).
    pub changed: bool,
}

/// Folds a new estimate `eta_ms` for a stop with window end `window_end_ms` into `prev`.
pub fn next_estimate(
    prev: Option<&StopEstimate>,
    eta_ms: u64,
    window_end_ms: Option<u64>,
    position: &str,
) -> Next {
    let late = window_end_ms.is_some_and(|end| eta_ms > end);
    let (streak, streak_from) = match prev {
        _ if !late => (0, None),
        None => (1, Some(position.to_string())),
        // The same fix again (another hub, a restart): not a second estimate.
        Some(p) if p.streak_from.as_deref() == Some(position) || p.late_streak >= 2 => {
            (p.late_streak, p.streak_from.clone())
        }
        Some(p) => (p.late_streak + 1, Some(position.to_string())),
    };
    let publish = prev.is_none_or(|p| p.eta_ms.abs_diff(eta_ms) > PUBLISH_STEP_MS);
    let estimate = StopEstimate {
        eta_ms: if publish {
            eta_ms
        } else {
            prev.map_or(eta_ms, |p| p.eta_ms)
        },
        late_streak: streak,
        streak_from,
        position: if publish {
            position.to_string()
        } else {
            prev.map_or_else(|| position.to_string(), |p| p.position.clone())
        },
    };
    let changed = prev != Some(&estimate);
    Next {
        estimate,
        publish,
        changed,
    }
}

/// On time or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timeliness {
    /// Nothing wrong known.
    OnTime,
    /// Not known: no recent position or no estimate.
    Unknown,
    /// One late estimate.
    AtRisk,
    /// Two late estimates in a row, or the window has passed.
    Late,
}

impl Timeliness {
    /// The name in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Timeliness::OnTime => "on_time",
            Timeliness::Unknown => "unknown",
            Timeliness::AtRisk => "at_risk",
            Timeliness::Late => "late",
        }
    }
}

/// What is known about one stop when asked.
#[derive(Debug, Clone, Copy)]
pub struct StopView<'a> {
    /// The window's end (ms).
    pub window_end_ms: Option<u64>,
    /// When the vehicle arrived there (ms), if it did.
    pub arrived_ms: Option<u64>,
    /// The stop's estimate.
    pub estimate: Option<&'a StopEstimate>,
}

/// A stop's timeliness at `now_ms`, given the capture time of the vehicle's newest fix.
pub fn stop_timeliness(v: StopView<'_>, position_ms: Option<u64>, now_ms: u64) -> Timeliness {
    if let Some(arrived) = v.arrived_ms {
        return if v.window_end_ms.is_some_and(|end| arrived > end) {
            Timeliness::Late
        } else {
            Timeliness::OnTime
        };
    }
    if v.window_end_ms.is_some_and(|end| now_ms > end) {
        return Timeliness::Late;
    }
    if position_ms.is_none_or(|p| now_ms.saturating_sub(p) > STALE_AFTER_MS) {
        return Timeliness::Unknown;
    }
    match v.estimate {
        None => Timeliness::Unknown,
        Some(e) if e.late_streak >= 2 => Timeliness::Late,
        Some(e) if e.late_streak == 1 => Timeliness::AtRisk,
        Some(_) => Timeliness::OnTime,
    }
}

/// A shipment's timeliness: its worst open stop, or its worst reached stop when none is
/// open; `unknown` without stops.
pub fn shipment_timeliness(
    stops: &BTreeMap<&str, StopView<'_>>,
    position_ms: Option<u64>,
    now_ms: u64,
) -> Timeliness {
    let open: Vec<&StopView<'_>> = stops.values().filter(|v| v.arrived_ms.is_none()).collect();
    let pick: Vec<&StopView<'_>> = if open.is_empty() {
        stops.values().collect()
    } else {
        open
    };
    pick.into_iter()
        .map(|v| stop_timeliness(*v, position_ms, now_ms))
        .max()
        .unwrap_or(Timeliness::Unknown)
}

/// A shipment's timeliness and each stop's, from its record and facts (arrivals are its
/// ACT ARRIVED facts), at `now_ms`, given the capture time of its vehicle's newest fix.
pub fn of_shipment<'a>(
    rec: &'a super::ShipmentRecord,
    facts: &[super::Fact],
    position_ms: Option<u64>,
    now_ms: u64,
) -> (Timeliness, BTreeMap<&'a str, Timeliness>) {
    let mut views: BTreeMap<&str, StopView<'_>> = BTreeMap::new();
    for stop in &rec.spec.stops {
        let arrived_ms = facts
            .iter()
            .filter(|f| {
                f.classifier == super::Classifier::Actual
                    && f.kind == super::FactType::Arrived
                    && f.stop_id.as_deref() == Some(stop.id.as_str())
            })
            .map(|f| f.event_time.0)
            .min();
        views.insert(
            &stop.id,
            StopView {
                window_end_ms: stop.window.map(|w| w.end.0),
                arrived_ms,
                estimate: rec.estimates.get(&stop.id),
            },
        );
    }
    let whole = shipment_timeliness(&views, position_ms, now_ms);
    let each = views
        .iter()
        .map(|(id, v)| (*id, stop_timeliness(*v, position_ms, now_ms)))
        .collect();
    (whole, each)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetsync_protocol::Point;

    fn fix(lat: f64, lon: f64, speed_cmps: Option<u16>) -> Fix {
        Fix {
            lat_e7: (lat * 1e7) as i32,
            lon_e7: (lon * 1e7) as i32,
            speed_cmps,
            heading_ddeg: None,
            hdop_d: None,
            satellites: None,
        }
    }

    fn circle(lat: f64, lon: f64, r: u32) -> Fence {
        Fence::Circle {
            center: Point {
                lat_e7: (lat * 1e7) as i32,
                lon_e7: (lon * 1e7) as i32,
            },
            radius_m: r,
        }
    }

    #[test]
    fn newest_fix_wins_and_backfill_changes_nothing() {
        let (a, b, c) = (
            fix(51.0, 5.0, Some(1000)),
            fix(51.1, 5.0, Some(1000)),
            fix(51.2, 5.0, Some(0)),
        );
        let mut batch = vec![(2_000, &b, 1, 2), (1_000, &a, 1, 1)];
        let p = fold_position(None, &mut batch, 9).unwrap();
        assert_eq!((p.time_ms, p.seq, p.lat_e7), (2_000, 2, b.lat_e7));
        assert_eq!(p.avg_speed_cmps, Some(1000.0));
        // An older fix (backlog after an outage) and the same fix again: no change.
        let mut old = vec![(500, &c, 1, 0), (2_000, &b, 1, 2)];
        assert_eq!(fold_position(Some(&p), &mut old, 10), None);
        // A newer fix at rest pulls the average down by its share of 5 minutes.
        let mut newer = vec![(62_000, &c, 1, 3)];
        let q = fold_position(Some(&p), &mut newer, 11).unwrap();
        let avg = q.avg_speed_cmps.unwrap();
        let want = 1000.0 * (-60_000.0f64 / 300_000.0).exp();
        assert!((avg - want).abs() < 0.01, "{avg} vs {want}");
    }

    #[test]
    fn estimates_chain_along_the_stops() {
        let s = EtaSettings::default();
        let pos = VehiclePosition {
            time_ms: 1_000_000,
            recorded_ms: 0,
            lat_e7: 510_000_000,
            lon_e7: 50_000_000,
            speed_cmps: Some(1000),
            avg_speed_cmps: Some(1000.0),
            epoch: 1,
            seq: 1,
        };
        // 0.1 degree north is 11,119 m; the fence's edge 119 m nearer.
        let (f1, f2) = (circle(51.1, 5.0, 119), circle(51.2, 5.0, 50));
        let etas = estimate(&pos, &[("A", &f1), ("B", &f2)], &s);
        let first = 1_000_000 + (11_000.0 * 1.3 / 10.0 * 1000.0) as u64;
        assert!(etas[0].abs_diff(first) < 2_000, "{etas:?} vs {first}");
        let second = etas[0] + 300_000 + (11_119.0 * 1.3 / 10.0 * 1000.0) as u64;
        assert!(etas[1].abs_diff(second) < 2_000, "{etas:?} vs {second}");
        // Standing still: the fallback speed (30 km/h), not forever.
        let still = VehiclePosition {
            avg_speed_cmps: Some(10.0),
            ..pos
        };
        let e = estimate(&still, &[("A", &f1)], &s)[0];
        let want = 1_000_000 + (11_000.0 * 1.3 / (30.0 / 3.6) * 1000.0) as u64;
        assert!(e.abs_diff(want) < 2_000, "{e} vs {want}");
    }

    #[test]
    fn published_only_on_a_five_minute_move_and_late_after_two() {
        let end = Some(10_000_000);
        let n = next_estimate(None, 5_000_000, end, "p1");
        assert!(n.publish && n.changed);
        assert_eq!(n.estimate.late_streak, 0);
        // Four minutes later: nothing to write.
        let m = next_estimate(Some(&n.estimate), 5_240_000, end, "p2");
        assert!(!m.publish && !m.changed);
        assert_eq!(m.estimate.position, "p1");
        // Past the window: one late estimate is at risk, written but published only if
        // it moved far enough.
        let l1 = next_estimate(Some(&m.estimate), 10_100_000, end, "p3");
        assert!(l1.publish && l1.changed);
        assert_eq!(l1.estimate.late_streak, 1);
        let view = |e| StopView {
            window_end_ms: end,
            arrived_ms: None,
            estimate: Some(e),
        };
        assert_eq!(
            stop_timeliness(view(&l1.estimate), Some(9_000_000), 9_100_000),
            Timeliness::AtRisk
        );
        // The same fix again (a second hub, a restart) is not a second estimate.
        let again = next_estimate(Some(&l1.estimate), 10_150_000, end, "p3");
        assert!(!again.changed);
        let l2 = next_estimate(Some(&l1.estimate), 10_150_000, end, "p4");
        assert!(!l2.publish && l2.changed);
        assert_eq!(l2.estimate.late_streak, 2);
        assert_eq!(
            stop_timeliness(view(&l2.estimate), Some(9_000_000), 9_100_000),
            Timeliness::Late
        );
        // A third late estimate changes nothing; back in time resets.
        assert!(!next_estimate(Some(&l2.estimate), 10_150_000, end, "p5").changed);
        let ok = next_estimate(Some(&l2.estimate), 9_500_000, end, "p6");
        assert_eq!(ok.estimate.late_streak, 0);
        assert!(ok.publish);
        // No position for 10 minutes: unknown; the window passed: late regardless.
        assert_eq!(
            stop_timeliness(view(&ok.estimate), Some(9_000_000), 9_000_000 + 600_001),
            Timeliness::Unknown
        );
        assert_eq!(
            stop_timeliness(view(&ok.estimate), None, 10_000_001),
            Timeliness::Late
        );
    }

    #[test]
    fn a_shipment_is_its_worst_open_stop() {
        let on = StopEstimate {
            eta_ms: 1,
            late_streak: 0,
            position: String::new(),
            streak_from: None,
        };
        let risk = StopEstimate {
            late_streak: 1,
            ..on.clone()
        };
        let mut stops = BTreeMap::new();
        stops.insert(
            "P1",
            StopView {
                window_end_ms: Some(100),
                arrived_ms: Some(500),
                estimate: None,
            },
        );
        stops.insert(
            "D1",
            StopView {
                window_end_ms: Some(10_000),
                arrived_ms: None,
                estimate: Some(&risk),
            },
        );
        // The late pickup is done; the open delivery decides.
        assert_eq!(
            shipment_timeliness(&stops, Some(900), 1_000),
            Timeliness::AtRisk
        );
        stops.get_mut("D1").unwrap().estimate = Some(&on);
        assert_eq!(
            shipment_timeliness(&stops, Some(900), 1_000),
            Timeliness::OnTime
        );
        // All reached: the late pickup shows.
        stops.get_mut("D1").unwrap().arrived_ms = Some(2_000);
        assert_eq!(
            shipment_timeliness(&stops, Some(900), 1_000),
            Timeliness::Late
        );
    }
}

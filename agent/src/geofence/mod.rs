//! Geofencing and trip detection on the device: a pure, deterministic engine.
//!
//! The engine owns no clock and does no I/O: every input carries its own time (GPS time
//! where known), and the same inputs always give the same events. The caller stamps each
//! returned [`Body`] with the time of the input that produced it and stores it.
//!
//! ```text
//! set_assignment(a)          fences = a.stops[i].fence, fence id = stop id, stop order kept
//! on_fix(t, fix)      -> [Geofence{Enter|Exit|Dwell}, Trip{Arrived|Departed}]* per fence
//!                        in stop order, then at most one Trip{Moving|Stationary}
//! on_ignition(t, on)  -> Trip{IgnitionOn|IgnitionOff} when the state changes
//! ```
//!
//! # Fences (one state machine per stop)
//!
//! `d` is the signed distance to the fence edge (negative inside, see [`geo`]).
//!
//! ```text
//! Outside --(d <= 0 on every fix for enter_debounce_ms)--> Inside   emits Enter, Arrived
//! Inside  --(d > margin_m on every fix for exit_debounce_ms)--> Outside  emits Exit, Departed
//! Inside  --(dwell_ms after the Enter, d <= margin_m)--> emits Dwell, once per visit
//! ```
//!
//! - Enter needs the vehicle geometrically inside the fence; Exit needs it more than
//!   `margin_m` outside the edge. In the band `0 < d <= margin_m` the confirmed state holds,
//!   and any fix there breaks a pending run (of either direction). So GPS jitter smaller than
//!   the margin at an edge gives at most one Enter and never an Exit.
//! - A "run" is a sequence of consecutive fixes all on the same side of the threshold; its
//!   length is measured from its first fix's time. A debounce of 0 acts on the first fix.
//! - Invariants: per fence, Enter and Exit alternate starting with Enter; Dwell only comes
//!   between an Enter and the next Exit, at most once; Arrived follows each Enter and
//!   Departed each Exit of the same stop, in the same call.
//! - Departed from the **origin** is the Departed of the assignment's first stop: the origin
//!   is not a separate fence. Like every stop, the origin gets Enter/Arrived when the vehicle
//!   is (debounced) inside it, including right after start-up.
//! - [`StopState`] per stop for the driver API: `NotVisited`, then `Arrived { at_ms }` /
//!   `Departed { at_ms }` with the time of the fix that confirmed the transition (the same
//!   time the event carries).
//!
//! # Assignment changes
//!
//! State is keyed by stop id. A stop kept in a new version keeps its confirmed state
//! (inside or not, dwell sent, [`StopState`]); if its fence changed, only the pending run is
//! dropped and the new geometry takes over, so a vehicle that is no longer inside the moved
//! fence gets its Exit through the normal debounce: alternation holds across versions. A
//! stop that disappears is forgotten without an Exit (the engine's caller decides what a
//! withdrawn stop means); if it reappears later it starts `Outside`/`NotVisited`. A stop id
//! repeated within one assignment is ignored after its first occurrence. Which assignment is
//! current (versions, late arrivals) is the caller's business.
//!
//! # Motion
//!
//! ```text
//! Unknown|Stationary --(a fix with speed >= moving_speed_mps)--> Moving      emits Moving
//! Unknown|Moving --(speed <= stationary_speed_mps on every fix for stationary_after_ms)-->
//!                                                                Stationary  emits Stationary
//! ```
//!
//! Speeds between the two thresholds hold the state and break a pending stationary run.
//! Fixes without a speed do not touch the motion state (speed derived from jittery
//! positions would make a parked vehicle look like it moves). Moving and Stationary
//! alternate.
//!
//! # Ignition
//!
//! The first report emits its state; later reports emit only on a change, so IgnitionOn and
//! IgnitionOff alternate. Ignition does not touch the motion state (a vehicle can be towed).
//!
//! # Input hygiene
//!
//! A fix older than the last accepted fix is ignored (no events, no state change); equal
//! times are accepted. A fix with coordinates out of range is ignored.
//! Everything is bounded: one track per stop of the assignment (at most `MAX_STOPS`), at
//! most a few events per call.

pub mod geo;

#[cfg(test)]
mod tests;

use fleetsync_protocol::{Assignment, Body, Fence, Fix, Geofence, Id, Transition, Trip, TripKind};
use serde::{Deserialize, Serialize};

use geo::{LatLon, Shape};

/// Thresholds of the engine. Times in ms, distances in metres, speeds in m/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeofenceConfig {
    /// Hysteresis: an Exit needs the vehicle more than this far outside the edge (an Enter
    /// needs it inside the edge).
    pub margin_m: f64,
    /// Inside continuously this long before Enter.
    pub enter_debounce_ms: u64,
    /// Past the margin continuously this long before Exit.
    pub exit_debounce_ms: u64,
    /// Dwell this long after the Enter.
    pub dwell_ms: u64,
    /// At or below this speed a fix counts as standing still.
    pub stationary_speed_mps: f64,
    /// At or above this speed a fix means Moving.
    pub moving_speed_mps: f64,
    /// Standing still continuously this long before Stationary.
    pub stationary_after_ms: u64,
}

impl Default for GeofenceConfig {
    fn default() -> Self {
        GeofenceConfig {
            margin_m: 25.0,
            enter_debounce_ms: 10_000,
            exit_debounce_ms: 10_000,
            dwell_ms: 5 * 60_000,
            stationary_speed_mps: 0.5,
            moving_speed_mps: 2.0,
            stationary_after_ms: 30_000,
        }
    }
}

/// A configuration the engine cannot work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GeofenceConfigError {
    /// `margin_m` is negative or not finite.
    #[error("geofence.margin_m must be a finite number >= 0, got {0}")]
    Margin(f64),
    /// The speed thresholds are not `0 <= stationary < moving`.
    #[error(
        "geofence speeds must satisfy 0 <= stationary_speed_mps < moving_speed_mps, got {stationary} and {moving}"
    )]
    Speeds {
        /// stationary_speed_mps
        stationary: f64,
        /// moving_speed_mps
        moving: f64,
    },
}

impl GeofenceConfig {
    /// Checks the values (the engine still behaves deterministically without this, but
    /// the hysteresis guarantees need a margin >= 0 and stationary < moving).
    pub fn validate(&self) -> Result<(), GeofenceConfigError> {
        if !(self.margin_m.is_finite() && self.margin_m >= 0.0) {
            return Err(GeofenceConfigError::Margin(self.margin_m));
        }
        let (s, m) = (self.stationary_speed_mps, self.moving_speed_mps);
        if !(s.is_finite() && m.is_finite() && s >= 0.0 && s < m) {
            return Err(GeofenceConfigError::Speeds {
                stationary: s,
                moving: m,
            });
        }
        Ok(())
    }
}

/// Where the vehicle stands with a stop, for the driver API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StopState {
    /// Never entered (or unknown stop).
    NotVisited,
    /// Inside the stop's fence since `at_ms`.
    Arrived {
        /// Time of the Enter.
        at_ms: u64,
    },
    /// Left the stop's fence at `at_ms`.
    Departed {
        /// Time of the Exit.
        at_ms: u64,
    },
}

/// One fence's state machine.
#[derive(Debug, Clone)]
struct Track {
    id: Id,
    fence: Fence,
    shape: Shape,
    /// Confirmed state.
    inside: bool,
    /// Time of the last Enter (meaningful while `inside`).
    entered_ms: u64,
    /// Dwell sent for the current visit.
    dwelled: bool,
    /// Start of the current run of fixes arguing for a change of `inside`.
    run_since: Option<u64>,
    stop: StopState,
}

impl Track {
    fn new(id: Id, fence: Fence) -> Self {
        let shape = Shape::from_fence(&fence);
        Track {
            id,
            fence,
            shape,
            inside: false,
            entered_ms: 0,
            dwelled: false,
            run_since: None,
            stop: StopState::NotVisited,
        }
    }

    fn step(&mut self, cfg: &GeofenceConfig, t: u64, p: LatLon, out: &mut Vec<Body>) {
        let d = self.shape.signed_distance_m(p);
        if !self.inside {
            if d <= 0.0 {
                let since = *self.run_since.get_or_insert(t);
                if t.saturating_sub(since) >= cfg.enter_debounce_ms {
                    self.inside = true;
                    self.entered_ms = t;
                    self.dwelled = false;
                    self.run_since = None;
                    self.stop = StopState::Arrived { at_ms: t };
                    out.push(self.geofence(Transition::Enter));
                    out.push(self.trip(TripKind::Arrived));
                }
            } else {
                self.run_since = None;
            }
        } else if d > cfg.margin_m {
            let since = *self.run_since.get_or_insert(t);
            if t.saturating_sub(since) >= cfg.exit_debounce_ms {
                self.inside = false;
                self.run_since = None;
                self.stop = StopState::Departed { at_ms: t };
                out.push(self.geofence(Transition::Exit));
                out.push(self.trip(TripKind::Departed));
            }
            return;
        } else {
            self.run_since = None;
        }
        if self.inside && !self.dwelled && t.saturating_sub(self.entered_ms) >= cfg.dwell_ms {
            self.dwelled = true;
            out.push(self.geofence(Transition::Dwell));
        }
    }

    fn geofence(&self, transition: Transition) -> Body {
        Body::Geofence(Geofence {
            fence_id: self.id.clone(),
            transition,
        })
    }

    fn trip(&self, kind: TripKind) -> Body {
        Body::Trip(Trip {
            kind,
            stop_id: Some(self.id.clone()),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MotionState {
    Unknown,
    Moving,
    Stationary,
}

/// The geofence and trip engine. See the module note for the rules.
#[derive(Debug, Clone)]
pub struct Engine {
    cfg: GeofenceConfig,
    /// In stop order; ids unique.
    tracks: Vec<Track>,
    last_fix_ms: Option<u64>,
    motion: MotionState,
    slow_since: Option<u64>,
    ignition: Option<bool>,
}

impl Engine {
    /// An engine with no fences.
    pub fn new(cfg: GeofenceConfig) -> Self {
        Engine {
            cfg,
            tracks: Vec::new(),
            last_fix_ms: None,
            motion: MotionState::Unknown,
            slow_since: None,
            ignition: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &GeofenceConfig {
        &self.cfg
    }

    /// Takes the fences of `a` (one per stop, fence id = stop id), keeping the state of
    /// stops that persist (see the module note).
    pub fn set_assignment(&mut self, a: &Assignment) {
        let mut old = std::mem::take(&mut self.tracks);
        for stop in a.stops.iter() {
            if self.tracks.iter().any(|t| t.id == stop.id) {
                continue;
            }
            let track = match old.iter().position(|t| t.id == stop.id) {
                Some(i) => {
                    let mut t = old.swap_remove(i);
                    if t.fence != stop.fence {
                        t.shape = Shape::from_fence(&stop.fence);
                        t.fence = stop.fence.clone();
                        t.run_since = None;
                    }
                    t
                }
                None => Track::new(stop.id.clone(), stop.fence.clone()),
            };
            self.tracks.push(track);
        }
    }

    /// The origin: the assignment's first stop.
    pub fn origin(&self) -> Option<&str> {
        self.tracks.first().map(|t| t.id.as_str())
    }

    /// Feeds one GPS fix taken at `time_ms`; returns the events it causes, in order.
    pub fn on_fix(&mut self, time_ms: u64, fix: &Fix) -> Vec<Body> {
        let mut out = Vec::new();
        if self.last_fix_ms.is_some_and(|last| time_ms < last) {
            return out;
        }
        let Some(p) = LatLon::from_e7(fix.lat_e7, fix.lon_e7) else {
            return out;
        };
        self.last_fix_ms = Some(time_ms);
        for t in &mut self.tracks {
            t.step(&self.cfg, time_ms, p, &mut out);
        }
        if let Some(cmps) = fix.speed_cmps {
            self.step_motion(time_ms, f64::from(cmps) / 100.0, &mut out);
        }
        out
    }

    fn step_motion(&mut self, t: u64, speed: f64, out: &mut Vec<Body>) {
        let mut emit = |kind| {
            out.push(Body::Trip(Trip {
                kind,
                stop_id: None,
            }))
        };
        if speed >= self.cfg.moving_speed_mps {
            self.slow_since = None;
            if self.motion != MotionState::Moving {
                self.motion = MotionState::Moving;
                emit(TripKind::Moving);
            }
        } else if speed <= self.cfg.stationary_speed_mps {
            if self.motion == MotionState::Stationary {
                return;
            }
            let since = *self.slow_since.get_or_insert(t);
            if t.saturating_sub(since) >= self.cfg.stationary_after_ms {
                self.slow_since = None;
                self.motion = MotionState::Stationary;
                emit(TripKind::Stationary);
            }
        } else {
            self.slow_since = None;
        }
    }

    /// Feeds the ignition input; emits IgnitionOn/IgnitionOff when the state changes (and
    /// for the first report).
    pub fn on_ignition(&mut self, _time_ms: u64, on: bool) -> Vec<Body> {
        if self.ignition == Some(on) {
            return Vec::new();
        }
        self.ignition = Some(on);
        let kind = if on {
            TripKind::IgnitionOn
        } else {
            TripKind::IgnitionOff
        };
        vec![Body::Trip(Trip {
            kind,
            stop_id: None,
        })]
    }

    /// The state of stop `stop_id` (`NotVisited` for an unknown stop).
    pub fn stop_state(&self, stop_id: &str) -> StopState {
        self.tracks
            .iter()
            .find(|t| t.id.as_str() == stop_id)
            .map_or(StopState::NotVisited, |t| t.stop)
    }

    /// The fences the vehicle is currently (confirmed) inside, in stop order.
    pub fn inside(&self) -> Vec<String> {
        self.tracks
            .iter()
            .filter(|t| t.inside)
            .map(|t| t.id.as_str().to_owned())
            .collect()
    }
}

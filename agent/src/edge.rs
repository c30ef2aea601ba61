//! The vehicle edge: GPS fixes and the ignition input in, positions and geofence / trip
//! events out to the store.
//!
//! ```text
//! gps::run --(GpsFix, bounded)--> run(): position -> store (telemetry, group commit)
//!                                        engine.on_fix -> Geofence/Trip -> store (critical, durable)
//! ignition file (0/1, polled) ----------> engine.on_ignition -> IgnitionOn/Off
//! jobs (watch) -------------------------> engine.set_assignment
//! ```
//!
//! [`Edge`] is shared with the driver API: the last fix (POD geo-stamp) and each stop's
//! visit state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetsync_protocol::{Body, Event, Fix};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::geofence::{Engine, GeofenceConfig, StopState};
use crate::gps::GpsFix;
use crate::store::Store;

/// Fixes buffered between the GPS reader and the edge task.
pub const FIX_QUEUE: usize = 256;
/// How often the ignition input is read.
const IGNITION_POLL: Duration = Duration::from_millis(500);

/// Live vehicle state.
#[derive(Debug)]
pub struct Edge {
    last_fix: Mutex<Option<(u64, Fix)>>,
    engine: Mutex<Engine>,
}

impl Edge {
    /// A new edge with the given geofence thresholds.
    pub fn new(cfg: GeofenceConfig) -> Self {
        Edge {
            last_fix: Mutex::new(None),
            engine: Mutex::new(Engine::new(cfg)),
        }
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest fix and its time.
    pub fn last_fix(&self) -> Option<(u64, Fix)> {
        *self.last_fix.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stop's state: `not_visited`, `arrived` or `departed`.
    pub fn stop_state(&self, stop: &str) -> &'static str {
        match self.engine().stop_state(stop) {
            StopState::NotVisited => "not_visited",
            StopState::Arrived { .. } => "arrived",
            StopState::Departed { .. } => "departed",
        }
    }

    /// Feeds a fix; returns the events it caused.
    pub fn on_fix(&self, time_ms: u64, fix: Fix) -> Vec<Body> {
        *self.last_fix.lock().unwrap_or_else(|p| p.into_inner()) = Some((time_ms, fix));
        self.engine().on_fix(time_ms, &fix)
    }
}

async fn store_events(store: &Store, wake: &Notify, time_ms: u64, bodies: Vec<Body>) {
    for body in bodies {
        if let Err(e) = store.append(Event { time_ms, body }).await {
            warn!(error = %e, "geofence/trip event not stored");
        }
    }
    wake.notify_one();
}

fn read_ignition(path: &PathBuf) -> Option<bool> {
    let s = std::fs::read_to_string(path).ok()?;
    match s.trim() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// Runs the edge until `shutdown` (or the GPS source ends and no ignition input is set).
pub async fn run(
    edge: Arc<Edge>,
    mut fixes: mpsc::Receiver<GpsFix>,
    mut assignment: crate::jobs::Current,
    ignition: Option<PathBuf>,
    store: Store,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    if let Some(a) = assignment.borrow_and_update().clone() {
        edge.engine().set_assignment(&a);
    }
    let mut ignition_state = None;
    let mut poll = tokio::time::interval(IGNITION_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gps_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            f = fixes.recv(), if gps_open => {
                let Some(f) = f else {
                    gps_open = false;
                    continue;
                };
                let fix = f.to_fix();
                let pos = Event { time_ms: f.time_ms, body: Body::Position(fix) };
                if let Err(e) = store.append_buffered(pos) {
                    warn!(error = %e, "position not stored");
                }
                let events = edge.on_fix(f.time_ms, fix);
                if events.is_empty() {
                    wake.notify_one();
                } else {
                    store_events(&store, &wake, f.time_ms, events).await;
                }
            }
            changed = assignment.changed() => {
                if changed.is_err() {
                    return;
                }
                if let Some(a) = assignment.borrow_and_update().clone() {
                    edge.engine().set_assignment(&a);
                }
            }
            _ = poll.tick(), if ignition.is_some() => {
                let Some(path) = &ignition else { continue };
                let now = read_ignition(path);
                if now.is_some() && now != ignition_state {
                    if let Some(on) = now {
                        let t = crate::now_ms();
                        let events = edge.engine().on_ignition(t, on);
                        store_events(&store, &wake, t, events).await;
                    }
                    ignition_state = now;
                }
            }
        }
    }
}

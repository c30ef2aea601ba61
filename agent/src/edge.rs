//! What the vehicle knows right now, shared by the GPS/geofence task and the driver API:
//! the last fix and each stop's visit state.

use std::collections::HashMap;
use std::sync::Mutex;

use fleetsync_protocol::Fix;

/// Live vehicle state.
#[derive(Debug, Default)]
pub struct Edge {
    last_fix: Mutex<Option<(u64, Fix)>>,
    stops: Mutex<HashMap<String, &'static str>>,
}

impl Edge {
    /// Records the newest fix.
    pub fn set_fix(&self, time_ms: u64, fix: Fix) {
        *self.last_fix.lock().unwrap_or_else(|p| p.into_inner()) = Some((time_ms, fix));
    }

    /// The newest fix and its time.
    pub fn last_fix(&self) -> Option<(u64, Fix)> {
        *self.last_fix.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a stop's state (`arrived`, `departed`).
    pub fn set_stop(&self, stop: &str, state: &'static str) {
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).insert(stop.to_string(), state);
    }

    /// A stop's state: `not_visited`, `arrived` or `departed`.
    pub fn stop_state(&self, stop: &str) -> &'static str {
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).get(stop).copied().unwrap_or("not_visited")
    }

    /// Forgets stop states (a new job).
    pub fn clear_stops(&self) {
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

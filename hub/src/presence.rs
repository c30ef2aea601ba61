//! Presence: which devices have an open connection to this hub process.
//!
//! The embedded layout knows it first-hand: the TLS gateway opens and closes each
//! device's connection and tells the [`Registry`]. It is this process's view and is kept
//! in memory (a connection does not outlive its process). With several hub processes
//! behind an external broker (the scale-out issue) presence comes from the broker's
//! retained status messages instead, which every process sees alike; the API asks this
//! module either way, so only this module changes then.

use std::collections::HashMap;
use std::sync::Mutex;

/// Connected devices (a device may briefly hold two connections while reconnecting).
#[derive(Debug, Default)]
pub struct Registry {
    open: Mutex<HashMap<String, usize>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // A panic while holding this lock cannot leave the map inconsistent (single ops).
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn opened(&self, device: &str) {
        *self.lock().entry(device.to_string()).or_default() += 1;
    }

    pub(crate) fn closed(&self, device: &str) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(device) {
            *n -= 1;
            if *n == 0 {
                m.remove(device);
            }
        }
    }

    /// Whether `device` has an open connection.
    pub fn is_connected(&self, device: &str) -> bool {
        self.lock().contains_key(device)
    }

    /// How many devices are connected.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

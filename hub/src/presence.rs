//! Presence: which devices are connected.
//!
//! The embedded layout knows it first-hand: the TLS gateway opens and closes each
//! device's connection and tells the [`Registry`] ([`Registry::opened`],
//! [`Registry::closed`]). It is this process's view and is kept in memory (a connection
//! does not outlive its process). With several hub replicas behind an external broker,
//! presence comes from the devices' retained `status` messages (`online`, and `offline`
//! as the last will), which every replica reads alike ([`Registry::set`]); the API asks
//! this module either way.

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

    /// Sets `device`'s presence from its broker status (external broker).
    pub(crate) fn set(&self, device: &str, online: bool) {
        let mut m = self.lock();
        if online {
            m.insert(device.to_string(), 1);
        } else {
            m.remove(device);
        }
    }

    /// Forgets every device (the link to the broker is lost: nothing is known).
    pub(crate) fn clear(&self) {
        self.lock().clear();
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

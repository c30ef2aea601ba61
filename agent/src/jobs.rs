//! Jobs: the assignment the hub sent down, kept durably so the driver works offline.
//!
//! ```text
//! uplink (Downlink::Assignment) --> run() --> store.put_assignment: the assignment and its
//!                                             AssignmentAck event (critical lane) in one
//!                                             durable transaction, newer versions only
//!                                          --> watch channel: driver API, geofence engine
//! ```
//!
//! A newer version replaces an older one; an older one arriving late, or the one in force
//! arriving again, is ignored: its ack was stored with it and is on its way to the hub,
//! whatever crashed since. The current assignment is loaded from the store at start.

use std::sync::Arc;

use fleetsync_protocol::{Assignment, AssignmentAck, Body, Event};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Store;

/// Assignments waiting for the task.
pub const ASSIGNMENT_QUEUE: usize = 8;

/// The current assignment, shared with readers.
pub type Current = watch::Receiver<Option<Arc<Assignment>>>;

/// Loads the stored assignment and returns the channel it is published on.
pub fn current(store: &Store) -> (watch::Sender<Option<Arc<Assignment>>>, Current) {
    let initial = match store.assignment() {
        Ok(a) => a.map(Arc::new),
        Err(e) => {
            warn!(error = %e, "stored assignment unreadable; waiting for the hub to resend");
            None
        }
    };
    watch::channel(initial)
}

/// Receives assignments from the uplink until `shutdown`.
pub async fn run(
    mut rx: mpsc::Receiver<Assignment>,
    store: Store,
    wake: Arc<Notify>,
    publish: watch::Sender<Option<Arc<Assignment>>>,
    shutdown: CancellationToken,
) {
    loop {
        let a = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = rx.recv() => match a {
                Some(a) => a,
                None => return,
            },
        };
        let ack = Event {
            time_ms: crate::now_ms(),
            body: Body::AssignmentAck(AssignmentAck {
                assignment_id: a.id.clone(),
                version: a.version,
            }),
        };
        match store.put_assignment(&a, ack).await {
            Ok(true) => {
                info!(job = %a.id, version = a.version, stops = a.stops.len(), "assignment stored");
                wake.notify_one();
                publish.send_replace(Some(Arc::new(a)));
            }
            Ok(false) => {
                // Older, or the one in force again (the hub resends until our ack arrives;
                // that ack was stored with the assignment and is on its way).
            }
            Err(e) => warn!(error = %e, "assignment not stored; the hub will resend"),
        }
    }
}

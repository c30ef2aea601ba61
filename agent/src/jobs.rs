//! Jobs: the assignment the hub sent down, kept durably so the driver works offline.
//!
//! ```text
//! uplink (Downlink::Assignment) --> run() --> store.put_assignment (durable, newer only)
//!                                          --> AssignmentAck event (critical lane)
//!                                          --> watch channel: driver API, geofence engine
//! ```
//!
//! A newer version replaces an older one; an older one arriving late is ignored (and not
//! acknowledged again). The current assignment is loaded from the store at start.

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
        match store.put_assignment(&a).await {
            Ok(true) => {
                info!(job = %a.id, version = a.version, stops = a.stops.len(), "assignment stored");
                let ack = Event {
                    time_ms: crate::now_ms(),
                    body: Body::AssignmentAck(AssignmentAck {
                        assignment_id: a.id.clone(),
                        version: a.version,
                    }),
                };
                if let Err(e) = store.append(ack).await {
                    // The hub resends until acknowledged; the next copy is ignored as not
                    // newer, so acknowledge what is in force when that happens.
                    warn!(error = %e, "assignment ack not stored");
                }
                wake.notify_one();
                publish.send_replace(Some(Arc::new(a)));
            }
            Ok(false) => {
                // Not newer. If it is the one in force, the hub is still waiting for our
                // ack (it resends only then): the ack may be queued behind a backlog, or
                // lost to a crash between storing the assignment and its ack. Ack again;
                // the hub treats repeated acks as one.
                let in_force = publish
                    .borrow()
                    .as_ref()
                    .is_some_and(|cur| cur.id == a.id && cur.version == a.version);
                if in_force {
                    let ack = Event {
                        time_ms: crate::now_ms(),
                        body: Body::AssignmentAck(AssignmentAck {
                            assignment_id: a.id.clone(),
                            version: a.version,
                        }),
                    };
                    if let Err(e) = store.append(ack).await {
                        warn!(error = %e, "assignment ack not stored");
                    }
                    wake.notify_one();
                }
            }
            Err(e) => warn!(error = %e, "assignment not stored; the hub will resend"),
        }
    }
}

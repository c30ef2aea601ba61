//! Assignments to vehicles: what is sent, when it is sent again, and what counts as
//! acknowledged. One home for the assignment logic; the store persists the record and
//! applies a device's `AssignmentAck` inside the ingest round that stores the ack event
//! ([`AssignmentRecord::apply_ack`], so the ack and its event commit together).
//!
//! ```text
//! api PUT assignment --assign()--> store.put_assignment (durable) --> downlink queue
//! gateway: device's downlink SUBACK --listening--> on_listening() --> downlink queue
//! ingest round heard a device --resend_due()--> downlink queue (at most every RESEND_MS)
//! device AssignmentAck event --ingest round--> AssignmentRecord::apply_ack
//! ```
//!
//! Invariants: a version is recorded only if it is higher than the one recorded (versions
//! count up per device); an assignment is on its way whenever the device is listening and
//! has not acknowledged the newest version.

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{Assignment, Downlink, frame};
use tokio::sync::mpsc;

use crate::store::{Store, StoreError};

/// An unacknowledged assignment is sent again when its device is heard from, at most this
/// often.
pub const RESEND_MS: u64 = 10_000;

/// Frames to send to devices `(topic, frame)`, e.g. assignments; the ingest worker owns
/// the MQTT client that publishes them.
pub type DownlinkTx = mpsc::Sender<(String, Vec<u8>)>;
/// The receiving side, owned by the ingest worker.
pub type DownlinkRx = mpsc::Receiver<(String, Vec<u8>)>;
/// Downlink frames queued (full: the frame waits for the device's next resend).
pub const DOWNLINK_QUEUE: usize = 1024;

/// Why an assignment was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// The device id or the frame is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A version at least as new is already recorded.
    #[error(
        "version {offered} is not newer than version {current} already sent; versions count up per device"
    )]
    Stale {
        /// The version offered.
        offered: u32,
        /// The version recorded.
        current: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends assignments to devices.
#[derive(Debug, Clone)]
pub struct Dispatch {
    store: Store,
    layout: Layout,
    downlinks: DownlinkTx,
}

impl Dispatch {
    /// Assignments over `store`, published on `layout`'s topics through `downlinks`.
    pub fn new(store: Store, layout: Layout, downlinks: DownlinkTx) -> Self {
        Dispatch {
            store,
            layout,
            downlinks,
        }
    }

    /// Records `a` as `device`'s assignment (durably) and sends it now; a device that is
    /// offline gets it when it next listens.
    pub async fn assign(
        &self,
        device: &str,
        a: &Assignment,
        now_ms: u64,
    ) -> Result<(), AssignError> {
        let down = self
            .layout
            .topic(device, Channel::Down)
            .map_err(|e| AssignError::Invalid(format!("device id {device:?}: {e}")))?;
        let bytes = frame::encode(&Downlink::Assignment(a.clone())).map_err(|e| {
            AssignError::Invalid(format!("assignment too large for one frame: {e}"))
        })?;
        if let Err(current) = self.store.put_assignment(device, a, now_ms).await? {
            return Err(AssignError::Stale {
                offered: a.version,
                current,
            });
        }
        if self.downlinks.try_send((down.to_string(), bytes)).is_err() {
            tracing::warn!(%device, "downlink queue full; assignment goes out when the device is next heard from");
        }
        Ok(())
    }

    /// The assignments of those of `devices` that have not acknowledged theirs and were
    /// last sent at least `min_gap_ms` ago, as downlink frames; notes them as sent. One
    /// store read for all of them (an ingest round hears from many devices).
    pub async fn resend_due(
        &self,
        devices: &[String],
        now_ms: u64,
        min_gap_ms: u64,
    ) -> Vec<(String, Vec<u8>)> {
        let records = match self.store.assignments(devices).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "could not read assignments to resend");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (device, rec) in records {
            if rec.acknowledged() || now_ms.saturating_sub(rec.sent_ms) < min_gap_ms {
                continue;
            }
            let (Ok(down), Ok(bytes)) = (
                self.layout.topic(&device, Channel::Down),
                frame::encode(&Downlink::Assignment(rec.assignment)),
            ) else {
                continue;
            };
            if let Err(e) = self.store.mark_assignment_sent(&device, now_ms).await {
                tracing::debug!(%device, error = %e, "could not note the resend time");
            }
            out.push((down.to_string(), bytes));
        }
        out
    }

    /// A device whose downlink subscription was just confirmed: what it has not
    /// acknowledged goes now.
    pub async fn on_listening(&self, device: &str, now_ms: u64) -> Option<(String, Vec<u8>)> {
        self.resend_due(&[device.to_string()], now_ms, 0)
            .await
            .pop()
    }
}

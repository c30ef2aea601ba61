//! The messages: what a device sends up and what the hub sends down.
//!
//! Every enum here is append-only: a new kind goes at the end, existing variants are never
//! reordered or removed, because postcard encodes the variant index. The golden-byte tests
//! in `tests/golden.rs` pin one instance of every message.
//!
//! Units are integers chosen for the wire (no floats):
//!
//! ```text
//! time        u64  milliseconds since 1970-01-01T00:00:00Z (GPS time where known)
//! lat/lon     i32  1e-7 degree (about 1.1 cm)
//! speed       u16  0.01 m/s
//! heading     u16  0.1 degree, 0..3600
//! hdop        u16  0.1
//! ```

use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::bounded::{BoundedString, BoundedVec};
use crate::limits::{
    MAX_ACK_RANGES, MAX_CHUNK_BYTES, MAX_CODE_LEN, MAX_ID_LEN, MAX_NAME_LEN, MAX_PHOTOS,
    MAX_POLYGON_POINTS, MAX_STOP_SHIPMENTS, MAX_STOPS, MAX_TEXT_LEN,
};

/// An identifier (shipment, stop, fence, POD, assignment, command).
pub type Id = BoundedString<MAX_ID_LEN>;
/// A short machine-readable code (reason codes, exception codes).
pub type Code = BoundedString<MAX_CODE_LEN>;
/// A sha256 digest.
pub type Sha256 = [u8; 32];

/// One event as captured on the device. Its identity `(device, epoch, seq)` is given by
/// its place in a [`Batch`].
/// (Its serde form is for local storage; on the wire events travel inside a `Batch`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Capture time in ms since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub body: Body,
}

/// The kinds of event. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Without an allocator there is no Box: variants are stored inline on purpose.
#[allow(clippy::large_enum_variant)]
pub enum Body {
    /// A GPS fix.
    Position(Fix),
    /// A geofence transition computed on the device.
    Geofence(Geofence),
    /// Ignition, departure, arrival, moving/stationary.
    Trip(Trip),
    /// Proof of delivery.
    Pod(Pod),
    /// A driver- or device-reported exception.
    Exception(Exception),
    /// Periodic device health.
    Health(Health),
    /// Telemetry the device had to drop, declared so nothing vanishes silently.
    Gap(Gap),
    /// The device stored an assignment.
    AssignmentAck(AssignmentAck),
}

impl Body {
    /// The snake_case kind name used in the JSON shape, topics of logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Position(_) => "position",
            Body::Geofence(_) => "geofence",
            Body::Trip(_) => "trip",
            Body::Pod(_) => "pod",
            Body::Exception(_) => "exception",
            Body::Health(_) => "health",
            Body::Gap(_) => "gap",
            Body::AssignmentAck(_) => "assignment_ack",
        }
    }

    /// Whether the event travels in the critical lane (never evicted on the device).
    pub fn is_critical(&self) -> bool {
        !matches!(self, Body::Position(_) | Body::Health(_))
    }
}

/// A GPS fix (time is the event's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fix {
    /// Latitude in 1e-7 degree.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degree.
    pub lon_e7: i32,
    /// Ground speed in 0.01 m/s.
    pub speed_cmps: Option<u16>,
    /// Course over ground in 0.1 degree (0..3600).
    pub heading_ddeg: Option<u16>,
    /// Horizontal dilution of precision in 0.1.
    pub hdop_d: Option<u16>,
    /// Satellites used in the fix.
    pub satellites: Option<u8>,
}

/// A point in 1e-7 degree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Latitude in 1e-7 degree.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degree.
    pub lon_e7: i32,
}

/// Geofence transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// Entered the fence (past the hysteresis margin, after the dwell debounce).
    Enter,
    /// Left the fence.
    Exit,
    /// Stayed inside longer than the configured dwell time.
    Dwell,
}

/// A geofence transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geofence {
    /// The fence (a stop id for assignment fences).
    pub fence_id: Id,
    /// What happened.
    pub transition: Transition,
}

/// Trip milestones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripKind {
    /// Ignition switched on.
    IgnitionOn,
    /// Ignition switched off.
    IgnitionOff,
    /// Left a stop (or the origin).
    Departed,
    /// Arrived at a stop.
    Arrived,
    /// Came to a standstill.
    Stationary,
    /// Started moving.
    Moving,
}

/// A trip milestone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trip {
    /// What happened.
    pub kind: TripKind,
    /// The stop, for departures and arrivals.
    pub stop_id: Option<Id>,
}

/// POD outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Delivered in full.
    Delivered,
    /// Refused by the recipient.
    Refused,
    /// Delivered damaged.
    Damaged,
    /// Partly delivered.
    Partial,
}

/// Media types of POD blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaType {
    /// image/png
    #[serde(rename = "image/png")]
    Png,
    /// image/svg+xml
    #[serde(rename = "image/svg+xml")]
    Svg,
    /// image/jpeg
    #[serde(rename = "image/jpeg")]
    Jpeg,
    /// image/heic
    #[serde(rename = "image/heic")]
    Heic,
}

impl MediaType {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            MediaType::Png => "image/png",
            MediaType::Svg => "image/svg+xml",
            MediaType::Jpeg => "image/jpeg",
            MediaType::Heic => "image/heic",
        }
    }
}

/// A content-addressed blob (signature, photo) that travels in [`BlobChunk`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// sha256 of the whole blob.
    pub sha256: Sha256,
    /// Length in bytes.
    pub len: u32,
    /// What it is.
    pub media: MediaType,
}

/// Proof of delivery (capture time is the event's time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// The POD id given by the agent.
    pub pod_id: Id,
    /// The shipment delivered.
    pub shipment_id: Id,
    /// The stop.
    pub stop_id: Id,
    /// Outcome.
    pub outcome: Outcome,
    /// Reason code, required unless delivered.
    pub reason_code: Option<Code>,
    /// Who received it.
    pub recipient_name: BoundedString<MAX_NAME_LEN>,
    /// Free text from the driver.
    pub notes: Option<BoundedString<MAX_TEXT_LEN>>,
    /// Signature image.
    pub signature: Option<BlobRef>,
    /// Photos.
    pub photos: BoundedVec<BlobRef, MAX_PHOTOS>,
    /// Where the agent was when the POD was captured.
    pub geo: Option<Point>,
}

/// An exception.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    /// Code from the fixed list the driver API offers.
    pub code: Code,
    /// Free text.
    pub text: BoundedString<MAX_TEXT_LEN>,
    /// The stop concerned, if any.
    pub stop_id: Option<Id>,
}

/// Link statistics of the uplink since the agent started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LinkStats {
    /// Successful connections.
    pub connects: u32,
    /// Lost connections.
    pub disconnects: u32,
    /// Batches sent (including resends).
    pub batches_sent: u32,
    /// Batches resent because no hub ack came in time.
    pub resends: u32,
    /// Round trip of the last batch to its hub ack, ms.
    pub last_ack_rtt_ms: Option<u32>,
}

/// Periodic device health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Unacknowledged critical events.
    pub backlog_critical: u32,
    /// Unacknowledged telemetry events.
    pub backlog_telemetry: u32,
    /// Bytes the store uses.
    pub disk_used_bytes: u64,
    /// The store's quota.
    pub disk_quota_bytes: u64,
    /// Seconds since the agent started.
    pub uptime_s: u32,
    /// Agent version.
    pub version: BoundedString<32>,
    /// Uplink statistics.
    pub link: LinkStats,
}

/// Store lanes on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// POD, geofence, trip, exceptions, gaps, acks: never evicted.
    Critical,
    /// Positions and health: thinned under quota pressure.
    Telemetry,
}

/// Why telemetry was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The store's byte quota was reached.
    Quota,
    /// The store was found corrupt and the damaged range discarded.
    Corruption,
}

/// A declared gap: `count` telemetry events with seqs in `first_seq..=last_seq` of
/// `epoch` were dropped on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The lane that was thinned.
    pub lane: Lane,
    /// The epoch of the dropped events.
    pub epoch: u32,
    /// First dropped seq.
    pub first_seq: u64,
    /// Last dropped seq.
    pub last_seq: u64,
    /// How many were dropped in that range.
    pub count: u32,
    /// Why.
    pub reason: GapReason,
}

/// The device stored assignment `assignment_id` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentAck {
    /// Assignment id.
    pub assignment_id: Id,
    /// Version stored.
    pub version: u32,
}

/// A chunk of a content-addressed blob. A blob travels in chunks of [`MAX_CHUNK_BYTES`]
/// at offsets that are multiples of it, the last one shorter if the blob ends there; the
/// hub refuses other chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    /// sha256 of the whole blob.
    pub sha256: Sha256,
    /// Offset of `data` in the blob.
    pub offset: u32,
    /// Total blob length.
    pub total_len: u32,
    /// The bytes.
    pub data: BoundedVec<u8, MAX_CHUNK_BYTES>,
}

/// Device to hub. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Without an allocator there is no Box: variants are stored inline on purpose.
#[allow(clippy::large_enum_variant)]
pub enum Uplink {
    /// Events, on the uplink topic.
    Batch(Batch),
    /// Blob bytes, on the blob topic.
    BlobChunk(BlobChunk),
}

/// An inclusive range of seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    /// First seq.
    pub first: u64,
    /// Last seq (inclusive).
    pub last: u64,
}

/// The hub has durably stored these seqs of `epoch`; the device may delete them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Epoch of the seqs.
    pub epoch: u32,
    /// Stored seq ranges.
    pub ranges: BoundedVec<SeqRange, MAX_ACK_RANGES>,
}

/// A geofence shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Without an allocator there is no Box: variants are stored inline on purpose.
#[allow(clippy::large_enum_variant)]
pub enum Fence {
    /// A circle.
    Circle {
        /// Centre.
        center: Point,
        /// Radius in metres.
        radius_m: u32,
    },
    /// A simple polygon (implicitly closed).
    Polygon {
        /// Vertices.
        points: BoundedVec<Point, MAX_POLYGON_POINTS>,
    },
}

/// A delivery window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Opens, ms since the Unix epoch.
    pub start_ms: u64,
    /// Closes, ms since the Unix epoch.
    pub end_ms: u64,
}

/// A stop of an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    /// Stop id (also its fence id).
    pub id: Id,
    /// Name shown to the driver.
    pub name: BoundedString<MAX_NAME_LEN>,
    /// Address shown to the driver.
    pub address: BoundedString<MAX_TEXT_LEN>,
    /// Shipments to hand over here.
    pub shipment_ids: BoundedVec<Id, MAX_STOP_SHIPMENTS>,
    /// The stop's fence.
    pub fence: Fence,
    /// Delivery window.
    pub window: Option<Window>,
}

/// A job for a vehicle: its stops in order. A newer version replaces an older one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Job id.
    pub id: Id,
    /// Version; higher wins.
    pub version: u32,
    /// Stops in order.
    pub stops: BoundedVec<Stop, MAX_STOPS>,
}

/// Device configuration pushed by operators; `None` keeps the device's own setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Version; higher wins.
    pub version: u32,
    /// Health event interval.
    pub health_interval_s: Option<u32>,
    /// Longest a batch waits to fill before it is sent.
    pub batch_max_delay_ms: Option<u32>,
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Send a health event now.
    SendHealth,
    /// Resend every unacknowledged event.
    Resync,
}

/// An operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Command id.
    pub id: Id,
    /// What to do.
    pub kind: CommandKind,
}

/// The hub has stored blob `sha256` completely and verified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobAck {
    /// The blob.
    pub sha256: Sha256,
}

/// Hub to device. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Without an allocator there is no Box: variants are stored inline on purpose.
#[allow(clippy::large_enum_variant)]
pub enum Downlink {
    /// Events stored.
    Ack(Ack),
    /// A job.
    Assignment(Assignment),
    /// Settings.
    Config(Config),
    /// An operator command.
    Command(Command),
    /// A blob stored.
    BlobAck(BlobAck),
}

//! The hub's store: one async interface made of the hub's use cases, two backends behind it.
//!
//! ```text
//! Store::Sled      store/sled/      embedded default ([store] path): one process, one disk
//! Store::Postgres  store/postgres/  [store] url: several hub processes on one database
//! ```
//!
//! The unit of work is the ingest round ([`Store::ingest`]): every batch, blob chunk and
//! quarantined frame of a round is written together; a failed round is never acked, and
//! what a failed round may have left (sled only) is whole per event. For each batch the
//! round deduplicates on `(device, epoch, seq)`, records what a new event implies (the
//! device record, an assignment acknowledgement, and whatever later issues add: facts,
//! outbox rows), and returns which events were new, so a redelivered batch yields nothing
//! downstream.
//!
//! Invariants, both backends (the conformance suite in `tests/tests/store_conformance.rs`
//! runs the same behaviour tests against each):
//! - durability is the store's job: when a call that writes returns `Ok`, what it wrote
//!   survives kill -9 and power loss. No caller flushes or fsyncs.
//! - an event identity is stored at most once, whatever the interleaving of redeliveries
//!   (on PostgreSQL also across hub processes).
//! - a blob is stored only once all its bytes are there and their sha256 matches.
//! - a blob upload in progress belongs to the device that sends it: its parts are kept
//!   per `(device, sha256)`, so another device naming the same digest cannot touch them.
//!   One device holds at most [`PartialBlobLimits::budget_bytes`] of parts in at most
//!   [`MAX_PARTIAL_UPLOADS`] uploads (a chunk that needs more room evicts that device's
//!   least recently fed uploads, never another device's), and an upload that gets no chunk
//!   for [`PartialBlobLimits::ttl_ms`] is dropped by [`Store::sweep_partial_blobs`]. The
//!   agent sends one blob at a time and sends it whole again when it gets no `BlobAck`,
//!   so neither rule costs a well-behaved device anything.
//! - the quarantine keeps at most [`MAX_QUARANTINE`] frames of at most
//!   [`MAX_QUARANTINE_RAW`] bytes each, at most [`MAX_QUARANTINE_PER_DEVICE`] of them from
//!   one device.

pub mod postgres;
pub mod sled;

use std::path::PathBuf;

use fleetsync_protocol::limits::MAX_CHUNK_BYTES;
use fleetsync_protocol::{Assignment, Batch, BlobChunk, Event, Fence, Health, Sha256};
use serde::{Deserialize, Serialize};

use crate::auth::Credential;
use crate::config::StoreConfig;
use crate::outbox::webhooks::Subscription;
use crate::outbox::{DeadLetter, Delivery, OutboxRow};
use crate::shipments::correlate::{ReviewItem, ReviewStatus};
use crate::shipments::eta::VehiclePosition;
use crate::shipments::{Fact, ShipmentRecord, State};

/// Largest blob the hub assembles.
pub const MAX_BLOB_BYTES: u32 = 32 * 1024 * 1024;
/// Quarantined frames kept (oldest dropped past this).
pub const MAX_QUARANTINE: usize = 10_000;
/// Bytes kept of each quarantined frame.
pub const MAX_QUARANTINE_RAW: usize = 64 * 1024;
/// Quarantined frames kept per device (its oldest dropped past this), so one device's
/// garbage cannot push every other device's out.
pub const MAX_QUARANTINE_PER_DEVICE: usize = 100;
/// Bytes of a quarantined frame shown in listings ([`QuarantineEntry::head`]); the
/// whole frame is read one at a time ([`Store::quarantined_raw`]).
pub const QUARANTINE_HEAD: usize = 64;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] ::sled::Error),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored row did not decode.
    #[error("corrupt row: {0}")]
    Codec(#[from] postcard::Error),
    /// A stored JSON record does not decode.
    #[error("stored record does not decode: {0}")]
    Json(#[from] serde_json::Error),
    /// PostgreSQL answered with an error or the connection failed.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The database cannot be reached now (down, network, pool exhausted): try again.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The configured store cannot be used as configured (wrong path or URL, no
    /// permission, a schema from a newer hub): an operator must change something.
    #[error("{0}")]
    Config(String),
    /// The blocking task running a sled call failed.
    #[error("store task: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether an operator must fix the configuration (the hub exits with 64 on these).
    pub fn is_config(&self) -> bool {
        matches!(self, StoreError::Config(_))
    }
}

/// An event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    /// When the hub stored it (ms since the Unix epoch).
    pub recorded_ms: u64,
    /// The event.
    pub event: Event,
}

/// What the hub knows of a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// First batch seen.
    pub first_seen_ms: u64,
    /// Last batch seen.
    pub last_seen_ms: u64,
    /// Highest epoch seen.
    pub epoch: u32,
    /// Newest health event (capture time, body).
    pub last_health: Option<(u64, Health)>,
}

impl DeviceRecord {
    /// Merges what one round saw of the device. Every part is a maximum, so applying the
    /// same round twice (a redelivery, a retried transaction) changes nothing.
    pub fn merge(&mut self, seen_ms: u64, epoch: Option<u32>, health: Option<&(u64, Health)>) {
        if self.first_seen_ms == 0 {
            self.first_seen_ms = seen_ms;
        }
        self.last_seen_ms = self.last_seen_ms.max(seen_ms);
        if let Some(e) = epoch {
            self.epoch = self.epoch.max(e);
        }
        if let Some((t, h)) = health
            && self.last_health.as_ref().is_none_or(|(old, _)| old <= t)
        {
            self.last_health = Some((*t, h.clone()));
        }
    }
}

/// A frame that did not decode, kept for operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Device the topic names.
    pub device: String,
    /// Topic it came on.
    pub topic: String,
    /// When.
    pub recorded_ms: u64,
    /// Why it was refused.
    pub error: String,
    /// The raw bytes (the store keeps at most [`MAX_QUARANTINE_RAW`]).
    pub raw: Vec<u8>,
}

/// A quarantined frame as listed: what it is, its size and its first bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineEntry {
    /// Its id.
    pub id: u64,
    /// Device the topic names.
    pub device: String,
    /// Topic it came on.
    pub topic: String,
    /// When.
    pub recorded_ms: u64,
    /// Why it was refused.
    pub error: String,
    /// Bytes kept of it.
    pub bytes: usize,
    /// Its first [`QUARANTINE_HEAD`] bytes.
    pub head: Vec<u8>,
}

impl QuarantineEntry {
    fn of(id: u64, q: Quarantined) -> Self {
        let bytes = q.raw.len();
        let mut head = q.raw;
        head.truncate(QUARANTINE_HEAD);
        QuarantineEntry {
            id,
            device: q.device,
            topic: q.topic,
            recorded_ms: q.recorded_ms,
            error: q.error,
            bytes,
            head,
        }
    }
}

/// The assignment sent to a device and what it acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The newest assignment sent.
    pub assignment: Assignment,
    /// When it was last sent.
    pub sent_ms: u64,
    /// Highest version the device acknowledged (an `AssignmentAck` event).
    pub acked_version: Option<u32>,
    /// When that ack was captured on the device.
    pub acked_ms: Option<u64>,
}

impl AssignmentRecord {
    /// A new record for `a`, sent at `now_ms`, not acknowledged yet.
    pub fn new(a: &Assignment, now_ms: u64) -> Self {
        AssignmentRecord {
            assignment: a.clone(),
            sent_ms: now_ms,
            acked_version: None,
            acked_ms: None,
        }
    }

    /// Whether the device has acknowledged the newest version.
    pub fn acknowledged(&self) -> bool {
        self.acked_version
            .is_some_and(|v| v >= self.assignment.version)
    }

    /// Applies an `AssignmentAck` the device captured at `time_ms`; returns whether the
    /// record changed. Only an ack of exactly the assignment and version the hub sent
    /// counts: a device cannot acknowledge what it was never sent (a forged or stale
    /// version is ignored), and applying the same ack twice changes nothing.
    pub fn apply_ack(&mut self, id: &str, version: u32, time_ms: u64) -> bool {
        if self.assignment.id.as_str() != id
            || version != self.assignment.version
            || self.acked_version == Some(version)
        {
            return false;
        }
        self.acked_version = Some(version);
        self.acked_ms = Some(time_ms);
        true
    }
}

/// Result of storing one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// The seqs (in the batch's epoch) of the events written now, in batch order: what
    /// is new downstream. A redelivery yields none.
    pub new: Vec<u64>,
    /// Events already present with the same content.
    pub duplicates: u64,
    /// Identities already taken by different content (a device whose store was wiped and
    /// restarted its epochs): counted apart, never silently "deduped".
    pub conflicts: u64,
}

impl Ingested {
    /// New events written.
    pub fn inserted(&self) -> u64 {
        self.new.len() as u64
    }
}

/// Most blob uploads in progress per device (see the module note).
pub const MAX_PARTIAL_UPLOADS: usize = 8;

/// Bounds on one device's blob uploads in progress (see the module note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialBlobLimits {
    /// Most bytes of parts one device may hold.
    pub budget_bytes: u64,
    /// An upload with no chunk for this long is dropped.
    pub ttl_ms: u64,
}

impl Default for PartialBlobLimits {
    fn default() -> Self {
        PartialBlobLimits {
            budget_bytes: 2 * u64::from(MAX_BLOB_BYTES),
            ttl_ms: 3_600_000,
        }
    }
}

/// One device's upload of one blob, while bytes are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// The blob's length, as its chunks say.
    pub total_len: u32,
    /// Bytes of parts stored.
    pub stored: u64,
    /// When the last chunk came (hub clock).
    pub updated_ms: u64,
}

/// Which of a device's other uploads (`mine`, with `this` among them or not) to drop so
/// that `add` more bytes for `this` fit the limits: least recently fed first. Both
/// backends evict by this one rule.
pub fn uploads_to_evict(
    mine: &[(Sha256, UploadRecord)],
    this: &Sha256,
    add: u64,
    limits: &PartialBlobLimits,
) -> Vec<Sha256> {
    let mut others: Vec<&(Sha256, UploadRecord)> = mine.iter().filter(|(s, _)| s != this).collect();
    others.sort_by_key(|(s, r)| (r.updated_ms, *s));
    let mut bytes: u64 = mine.iter().map(|(_, r)| r.stored).sum::<u64>() + add;
    let mut count = others.len() + 1;
    let mut out = Vec::new();
    for (sha, rec) in others {
        if bytes <= limits.budget_bytes && count <= MAX_PARTIAL_UPLOADS {
            break;
        }
        bytes -= rec.stored;
        count -= 1;
        out.push(*sha);
    }
    out
}

/// What a sweep of uploads in progress did and left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Uploads dropped because they were idle past the limit.
    pub expired: u64,
    /// Uploads still in progress.
    pub uploads: u64,
    /// Bytes of parts they hold.
    pub bytes: u64,
}

/// Result of storing a blob chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// More chunks needed; `evicted` of the device's other uploads were dropped to make
    /// room for this one.
    Partial {
        /// Uploads dropped for room.
        evicted: u32,
    },
    /// The blob is complete and verified (now or earlier).
    Complete,
    /// All bytes arrived but the digest did not match; the parts were dropped.
    DigestMismatch,
    /// The chunk is inconsistent (offset/length past the total, total over the limit).
    Invalid(String),
}

/// One item of an ingest round.
#[derive(Debug, Clone)]
pub enum Item {
    /// A batch of events from `device` (identity from the authenticated topic).
    Batch {
        /// The device.
        device: String,
        /// The batch.
        batch: Batch,
    },
    /// A blob chunk from `device`.
    Chunk {
        /// The device.
        device: String,
        /// The chunk.
        chunk: BlobChunk,
    },
    /// A frame refused before it reached the store.
    Quarantine(Quarantined),
}

/// What the round did with one [`Item`], in the same position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A batch.
    Batch(Ingested),
    /// A blob chunk.
    Chunk(ChunkOutcome),
    /// A quarantined frame and its id.
    Quarantined(u64),
}

/// A page of events: `(epoch, seq, stored)` in order.
pub type EventRows = Vec<(u32, u64, StoredEvent)>;

/// Checks a chunk against the blob it claims to belong to; `Some(why)` if it cannot be
/// part of any valid blob. Both backends refuse the same chunks. Chunks are
/// [`MAX_CHUNK_BYTES`] long at multiples of it (the last may be shorter), as the agent
/// sends them: so an upload's parts never overlap and never hold more than the blob.
pub fn chunk_invalid(chunk: &BlobChunk) -> Option<String> {
    let end = u64::from(chunk.offset) + chunk.data.len() as u64;
    if chunk.total_len > MAX_BLOB_BYTES {
        return Some(format!("blob of {} bytes over the limit", chunk.total_len));
    }
    if end > u64::from(chunk.total_len) || (chunk.data.is_empty() && chunk.total_len > 0) {
        return Some("chunk past the blob's end".into());
    }
    if !(chunk.offset as usize).is_multiple_of(MAX_CHUNK_BYTES) {
        return Some(format!(
            "chunk at offset {}, not a multiple of {MAX_CHUNK_BYTES}",
            chunk.offset
        ));
    }
    if chunk.data.len() != MAX_CHUNK_BYTES && end != u64::from(chunk.total_len) {
        return Some(format!(
            "chunk of {} bytes that is not the blob's last; chunks are {MAX_CHUNK_BYTES} bytes",
            chunk.data.len()
        ));
    }
    None
}

/// Assembles a blob of `total_len` bytes from `(offset, bytes)` parts (sorted by offset)
/// if they cover it contiguously from 0; `None` while bytes are missing.
pub(crate) fn assemble<B: AsRef<[u8]>>(parts: &[(u64, B)], total_len: u32) -> Option<Vec<u8>> {
    let total = u64::from(total_len);
    let mut covered = 0u64;
    for (off, v) in parts {
        if *off > covered {
            break;
        }
        covered = covered.max(off + v.as_ref().len() as u64);
    }
    if covered < total {
        return None;
    }
    let mut blob = vec![0u8; total_len as usize];
    for (off, v) in parts {
        // Parts stored under another total length may lie past this blob's end.
        let off = *off as usize;
        if off >= blob.len() {
            continue;
        }
        let v = v.as_ref();
        let n = v.len().min(blob.len() - off);
        blob[off..off + n].copy_from_slice(&v[..n]);
    }
    Some(blob)
}

/// What a shipment write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutShipment {
    /// Written with its facts and locations.
    Written,
    /// Another write came first (the stored rev is not the expected one); nothing written.
    Stale,
    /// A stop id is already the ERP location of another fence; nothing written.
    LocationConflict {
        /// The stop id.
        stop_id: String,
    },
}

/// One compare-and-swap write of a shipment record and its new facts.
#[derive(Debug, Clone)]
pub struct ShipmentWrite {
    /// The record to write.
    pub rec: ShipmentRecord,
    /// The rev the stored record must still have.
    pub expected_rev: u64,
    /// New facts (a fact id already there is kept as it is).
    pub facts: Vec<Fact>,
}

/// A page of shipments: filters, cursor and size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipmentQuery {
    /// Only in this state.
    pub state: Option<State>,
    /// Only written after this time (ms).
    pub updated_after: Option<u64>,
    /// Only of this customer.
    pub customer_id: Option<String>,
    /// After this `(updated_ms, id)` (the previous page's last).
    pub after: Option<(u64, String)>,
    /// At most this many.
    pub limit: usize,
}

impl ShipmentQuery {
    /// Whether `r` passes the filters and comes after the cursor.
    pub fn admits(&self, r: &ShipmentRecord) -> bool {
        self.state.is_none_or(|s| r.state == s)
            && self.updated_after.is_none_or(|t| r.updated_ms > t)
            && self
                .customer_id
                .as_deref()
                .is_none_or(|c| r.spec.customer_id == c)
            && self
                .after
                .as_ref()
                .is_none_or(|(t, id)| (r.updated_ms, r.id.as_str()) > (*t, id.as_str()))
    }
}

/// The hub's store.
// The sled variant is a few hundred bytes of tree handles: a store is made once per
// process and cloned into a handful of tasks, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded sled.
    Sled(sled::SledStore),
    /// PostgreSQL.
    Postgres(postgres::PgStore),
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sled($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens the configured backend; on PostgreSQL applies pending migrations first.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        match (&cfg.path, &cfg.url) {
            (_, Some(url)) => Ok(Store::Postgres(
                postgres::PgStore::open(url, cfg, true).await?,
            )),
            (Some(path), None) => Ok(Store::Sled(
                sled::SledStore::open_async(path)
                    .await?
                    .with_partial_blob_limits(cfg.partial_blob_limits())
                    .with_outbox_sinks(cfg.outbox_sinks.clone()),
            )),
            (None, None) => Err(StoreError::Config(
                "store: set [store] path (sled) or [store] url (PostgreSQL)".into(),
            )),
        }
    }

    /// Which backend, for logs and `/metrics`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sled(_) => "sled",
            Store::Postgres(_) => "postgres",
        }
    }

    /// One ingest round as one unit of work. `Ok`: every item is written and durable,
    /// outcomes in item order. `Err`: nothing of it may be acked; PostgreSQL wrote none of
    /// it, sled may have written some events, each together with all it implies (so
    /// their redelivery is a duplicate with nothing missing).
    pub async fn ingest(
        &self,
        items: Vec<Item>,
        recorded_ms: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        both!(self, s => s.ingest(items, recorded_ms).await)
    }

    /// Keeps a refused frame for operators; returns its id.
    pub async fn quarantine(&self, q: Quarantined) -> Result<u64, StoreError> {
        let out = self.ingest(vec![Item::Quarantine(q)], 0).await?;
        match out.first() {
            Some(Outcome::Quarantined(id)) => Ok(*id),
            _ => Err(StoreError::Task("quarantine returned no id".into())),
        }
    }

    /// Quarantined frames, newest first, strictly older than `before` (an id) if given.
    pub async fn quarantined(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        both!(self, s => s.quarantined(limit, before).await)
    }

    /// One quarantined frame's kept bytes.
    pub async fn quarantined_raw(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        both!(self, s => s.quarantined_raw(id).await)
    }

    /// Every device with its record, by id.
    pub async fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        both!(self, s => s.devices().await)
    }

    /// One device's record.
    pub async fn device(&self, device: &str) -> Result<Option<DeviceRecord>, StoreError> {
        both!(self, s => s.device(device).await)
    }

    /// Events of `device` strictly after `(epoch, seq)` in order, at most `limit`,
    /// optionally of one kind only.
    pub async fn events(
        &self,
        device: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<EventRows, StoreError> {
        both!(self, s => s.events(device, after, limit, kind).await)
    }

    /// A verified blob.
    pub async fn blob(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        both!(self, s => s.blob(sha256).await)
    }

    /// Drops blob uploads that got no chunk since `now_ms - ttl` and says what is left.
    pub async fn sweep_partial_blobs(&self, now_ms: u64) -> Result<SweepReport, StoreError> {
        both!(self, s => s.sweep_partial_blobs(now_ms).await)
    }

    /// The limits on uploads in progress this store applies.
    pub fn partial_blob_limits(&self) -> PartialBlobLimits {
        both!(self, s => s.partial_blob_limits())
    }

    /// Records `a` as the device's assignment if its version is higher than the one
    /// already recorded; otherwise returns `Err(current version)`.
    pub async fn put_assignment(
        &self,
        device: &str,
        a: &Assignment,
        now_ms: u64,
    ) -> Result<Result<(), u32>, StoreError> {
        both!(self, s => s.put_assignment(device, a, now_ms).await)
    }

    /// The device's assignment record.
    pub async fn assignment(&self, device: &str) -> Result<Option<AssignmentRecord>, StoreError> {
        both!(self, s => s.assignment(device).await)
    }

    /// The assignment records of those of `devices` that have one (one read for a whole
    /// ingest round's devices).
    pub async fn assignments(
        &self,
        devices: &[String],
    ) -> Result<Vec<(String, AssignmentRecord)>, StoreError> {
        both!(self, s => s.assignments(devices).await)
    }

    /// Notes that the device's assignment was sent again at `now_ms`.
    pub async fn mark_assignment_sent(&self, device: &str, now_ms: u64) -> Result<(), StoreError> {
        both!(self, s => s.mark_assignment_sent(device, now_ms).await)
    }

    /// Stores a new credential.
    pub async fn put_credential(&self, c: &Credential) -> Result<(), StoreError> {
        both!(self, s => s.put_credential(c).await)
    }

    /// The credential whose token has this sha256.
    pub async fn credential_by_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<Credential>, StoreError> {
        both!(self, s => s.credential_by_token(token_sha256).await)
    }

    /// Every credential, by id.
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        both!(self, s => s.credentials().await)
    }

    /// Removes a credential (its token stops working at once); what was removed.
    pub async fn delete_credential(&self, id: &str) -> Result<Option<Credential>, StoreError> {
        both!(self, s => s.delete_credential(id).await)
    }

    /// Writes a shipment record (if the stored one still has `expected_rev`; `None`: if
    /// there is none), its new facts (a fact id already there is kept as it is) and the
    /// ERP location ids its stops name (refused if one names another fence), as one.
    pub async fn put_shipment(
        &self,
        rec: &ShipmentRecord,
        expected_rev: Option<u64>,
        facts: &[Fact],
        locations: &[(String, Fence)],
    ) -> Result<PutShipment, StoreError> {
        both!(self, s => s.put_shipment(rec, expected_rev, facts, locations).await)
    }

    /// Writes each of `writes` as [`Store::put_shipment`] would (without locations), each
    /// its own compare-and-swap; on sled all in one durable write. Whether each was
    /// written.
    pub async fn put_shipments(&self, writes: Vec<ShipmentWrite>) -> Result<Vec<bool>, StoreError> {
        match self {
            Store::Sled(s) => s.put_shipments(writes).await,
            Store::Postgres(s) => {
                let mut out = Vec::with_capacity(writes.len());
                for w in &writes {
                    let r = s
                        .put_shipment(&w.rec, Some(w.expected_rev), &w.facts, &[])
                        .await?;
                    out.push(r == PutShipment::Written);
                }
                Ok(out)
            }
        }
    }

    /// A shipment and its facts.
    pub async fn shipment(
        &self,
        id: &str,
    ) -> Result<Option<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        both!(self, s => s.shipment(id).await)
    }

    /// Shipments by `(updated_ms, id)`, filtered.
    pub async fn shipments(&self, q: &ShipmentQuery) -> Result<Vec<ShipmentRecord>, StoreError> {
        both!(self, s => s.shipments(q).await)
    }

    /// The shipments on `vehicle` that are not finished, with their facts.
    pub async fn vehicle_shipments(
        &self,
        vehicle: &str,
    ) -> Result<Vec<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        let v = [vehicle.to_string()];
        Ok(self
            .vehicles_shipments(&v)
            .await?
            .remove(vehicle)
            .unwrap_or_default())
    }

    /// The same for many vehicles at once (those with none are left out).
    pub async fn vehicles_shipments(
        &self,
        vehicles: &[String],
    ) -> Result<std::collections::BTreeMap<String, Vec<(ShipmentRecord, Vec<Fact>)>>, StoreError>
    {
        both!(self, s => s.vehicles_shipments(vehicles).await)
    }

    /// Vehicles that have (or had) shipments.
    pub async fn shipment_vehicles(&self) -> Result<Vec<String>, StoreError> {
        both!(self, s => s.shipment_vehicles().await)
    }

    /// Review items, oldest first, optionally of one status.
    pub async fn reviews(
        &self,
        status: Option<ReviewStatus>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        both!(self, s => s.reviews(status, limit).await)
    }

    /// The review items naming a shipment, oldest first.
    pub async fn reviews_of(&self, shipment: &str) -> Result<Vec<ReviewItem>, StoreError> {
        both!(self, s => s.reviews_of(shipment).await)
    }

    /// The newest position of each of `devices` that has one (folded in by the ingest
    /// round that stored the fix).
    pub async fn positions(
        &self,
        devices: &[String],
    ) -> Result<std::collections::BTreeMap<String, VehiclePosition>, StoreError> {
        both!(self, s => s.positions(devices).await)
    }

    /// One review item.
    pub async fn review(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        both!(self, s => s.review(id).await)
    }

    /// Writes a review item if the stored one has status `expected` (`None`: if there is
    /// none); whether it was written.
    pub async fn put_review(
        &self,
        item: &ReviewItem,
        expected: Option<ReviewStatus>,
    ) -> Result<bool, StoreError> {
        both!(self, s => s.put_review(item, expected).await)
    }

    /// Whether a verified blob is stored (without reading it).
    pub async fn blob_exists(&self, sha256: &Sha256) -> Result<bool, StoreError> {
        both!(self, s => s.blob_exists(sha256).await)
    }

    /// Pending outbox rows of `sink`, oldest first.
    pub async fn outbox_pending(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        both!(self, s => s.outbox_pending(sink, limit).await)
    }

    /// Up to `limit` rows of `sink` to deliver now: the first row of each shipment (the
    /// rest wait for it), due by `now_ms`; on PostgreSQL leased until `lease_until` so no
    /// other hub delivers them meanwhile (a hub that dies leaves them to the next after
    /// the lease).
    pub async fn outbox_due(
        &self,
        sink: &str,
        now_ms: u64,
        lease_until: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        match self {
            Store::Sled(s) => s.outbox_due(sink, now_ms, limit).await,
            Store::Postgres(s) => s.outbox_due(sink, now_ms, lease_until, limit).await,
        }
    }

    /// Records what became of delivered rows, all in one write: done rows go, retried
    /// rows wait, dead ones become dead letters.
    pub async fn outbox_settle(
        &self,
        results: Vec<(OutboxRow, Delivery)>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        both!(self, s => s.outbox_settle(results, now_ms).await)
    }

    /// Rows waiting in `sink`'s outbox, and the oldest one's creation time (ms).
    pub async fn outbox_depth(&self, sink: &str) -> Result<(u64, Option<u64>), StoreError> {
        both!(self, s => s.outbox_depth(sink).await)
    }

    /// Dead letters, oldest first, optionally of one sink and one shipment.
    pub async fn deadletters(
        &self,
        sink: Option<String>,
        shipment: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        both!(self, s => s.deadletters(sink, shipment, limit).await)
    }

    /// Puts a dead letter back at the end of its sink's outbox under the same id.
    pub async fn replay_deadletter(&self, id: &str) -> Result<Option<OutboxRow>, StoreError> {
        both!(self, s => s.replay_deadletter(id).await)
    }

    /// Changes each time a write of this process that added outbox rows is durable
    /// (workers wait on it instead of polling; rows another hub writes are polled for).
    pub fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        both!(self, s => s.outbox_signal())
    }

    /// Changes each time a write that changed what the portal's stream shows (a shipment
    /// record, a vehicle's position) is durable: a write of this process, and on
    /// PostgreSQL also of any other hub process while [`Store::listen_portal`] runs. The
    /// portal feed reads the store when it changes instead of waiting for its next poll.
    pub fn portal_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        both!(self, s => s.portal_signal())
    }

    /// Feeds [`Store::portal_signal`] from other hub processes' commits until `shutdown`
    /// (PostgreSQL: `LISTEN`, see `store/postgres`); the embedded store has no other
    /// process, so this only waits.
    pub async fn listen_portal(&self, shutdown: tokio_util::sync::CancellationToken) {
        match self {
            Store::Sled(_) => shutdown.cancelled().await,
            Store::Postgres(s) => s.listen_portal(shutdown).await,
        }
    }

    /// Writes a webhook subscription (new or changed).
    pub async fn put_webhook(&self, sub: &Subscription) -> Result<(), StoreError> {
        both!(self, s => s.put_webhook(sub).await)
    }

    /// One webhook subscription.
    pub async fn webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        both!(self, s => s.webhook(id).await)
    }

    /// Every webhook subscription, by id.
    pub async fn webhooks(&self) -> Result<Vec<Subscription>, StoreError> {
        let mut v = both!(self, s => s.webhooks().await)?;
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Deletes a subscription with its waiting rows, dead letters and delivered rows.
    pub async fn delete_webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        both!(self, s => s.delete_webhook(id).await)
    }

    /// Moves up to `limit` staged webhook rows (sink `webhooks`, oldest first) to the
    /// subscriptions that hear of them ([`crate::outbox::webhooks::fan_out`]), in one
    /// write; `event_type` names a row's type. Returns how many staged rows it took.
    pub async fn webhook_fanout(
        &self,
        limit: usize,
        event_type: impl Fn(&OutboxRow) -> String + Send + 'static,
    ) -> Result<usize, StoreError> {
        both!(self, s => s.webhook_fanout(limit, event_type).await)
    }

    /// Puts back subscription `id`'s delivered rows and dead letters recorded at or after
    /// `since_ms`, under their ids, in their first order. Returns how many.
    pub async fn webhook_replay(&self, id: &str, since_ms: u64) -> Result<usize, StoreError> {
        both!(self, s => s.webhook_replay(id, since_ms).await)
    }

    /// Drops delivered subscription rows recorded before `before_ms`.
    pub async fn prune_delivered(&self, before_ms: u64) -> Result<u64, StoreError> {
        both!(self, s => s.prune_delivered(before_ms).await)
    }

    /// Whether the store answers now (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        both!(self, s => s.ping().await)
    }
}

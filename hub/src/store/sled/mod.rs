//! The sled backend: the embedded default, one hub process on one disk.
//!
//! ```text
//! tree events:      key  device_id ++ 0x00 ++ epoch: u32 BE ++ seq: u64 BE
//!                   val  postcard(StoredEvent { recorded_ms: u64, event: Event })
//! tree devices:     key  device_id            val  postcard(DeviceRecord)
//! tree blobs:       key  sha256 (32 bytes)    val  the verified blob
//! tree blob_uploads:      key  device_id ++ 0x00 ++ sha256   val  postcard(UploadRecord)
//! tree blob_upload_parts: key  device_id ++ 0x00 ++ sha256 ++ offset: u32 BE
//!                         val  chunk bytes (until the blob is complete)
//! tree quarantine:  key  id: u64 BE           val  postcard(Quarantined)
//! tree quarantine_by_device: key device_id ++ 0x00 ++ id: u64 BE   val  empty
//! tree assignments: key  device_id            val  postcard(AssignmentRecord)
//! tree credentials:          key  id                val  postcard(Credential)
//! tree shipments:            key  shipment id       val  JSON(ShipmentRecord)
//! tree shipment_facts:       key  shipment id ++ 0x00 ++ fact id   val  JSON(Fact)
//! tree shipments_by_vehicle: key  vehicle ++ 0x00 ++ shipment id   val  empty
//! tree locations:            key  ERP location (stop) id           val  JSON(Fence)
//! tree reviews:              key  review id (the source event's)   val  JSON(ReviewItem)
//! tree reviews_by_shipment:  key  shipment id ++ 0x00 ++ review id val  empty
//! tree positions:            key  device id         val  postcard(VehiclePosition)
//! tree shipments_by_stop:    key  stop id ++ 0x00 ++ shipment id   val  empty
//!                            (shipments not finished; an entry may outlive a stop the
//!                            ERP removed: readers check the record)
//! tree credentials_by_token: key  sha256(token)     val  id
//! tree outbox:               key  sink ++ 0x00 ++ seq: u64 BE      val  JSON(OutboxRow)
//! tree outbox_ids:           key  outbox row id     val  seq: u64 BE
//! tree deadletters:          key  outbox row id     val  JSON(DeadLetter)
//! tree outbox_sent:          key  sink ++ 0x00 ++ seq: u64 BE      val  JSON(OutboxRow)
//!                            (webhook subscriptions' delivered rows, for replays)
//! tree webhooks:             key  subscription id   val  JSON(Subscription)
//! ```
//!
//! A unit of work without sled transactions: every call that writes ends with
//! [`durable::make_durable`] (sled flush plus fsync of what changed, which sled 0.34.7's
//! flush does not do) before it returns. Rounds are written by one task at a time (the
//! ingest worker), and sled recovers a prefix of one thread's writes after a crash. So
//! within a round, whatever a new event implies (assignment ack, device record, later
//! facts and outbox rows) is written first, keyed so that writing it again changes
//! nothing, and the event row last: the event row is the commit marker. A crash before
//! the marker leaves idempotent effects that the redelivery (never acked, so it comes)
//! writes again together with the marker; a crash after it leaves the whole.
//!
//! Event rows are written with compare-and-swap on an absent key, so a redelivery in any
//! order changes nothing. A call that fails part way may have written some events of
//! its round, each with everything it implies: their redelivery is a duplicate with
//! nothing missing. A failed sync marks the store failed for the life of the process
//! (writes refused, readiness red): the kernel may have dropped what it could not write.
//!
//! An upload's record is written before its part and removed after its parts, so a crash
//! leaves no part without a record (the sweep finds every part through its record); the
//! record's byte count may then be one chunk high until the upload ends or expires.
//!
//! Known limit: sled keeps values over a quarter of its segment (assembled POD photos,
//! not chunks) in files of its own that it writes without fsync; `make_durable` syncs
//! them before the round is acked, but a power loss inside a round can leave sled's log
//! naming a blob file that never reached the disk.

mod durable;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fleetsync_protocol::{Assignment, Batch, BlobChunk, Body, Health, Sha256};

use crate::auth::Credential;
use crate::outbox::webhooks::{self, Subscription};
use crate::outbox::{self, DeadLetter, Delivery, OutboxRow, Settled};
use crate::shipments::correlate::{self, ReviewItem, ReviewStatus};
use crate::shipments::eta::{self, VehiclePosition};
use crate::shipments::{Fact, ShipmentRecord};
use fleetsync_protocol::Fence;
use sha2::Digest as _;

use super::{
    AssignmentRecord, ChunkOutcome, DeviceRecord, EventRows, Ingested, Item, MAX_QUARANTINE,
    MAX_QUARANTINE_PER_DEVICE, MAX_QUARANTINE_RAW, Outcome, PartialBlobLimits, PutShipment,
    QuarantineEntry, Quarantined, ShipmentQuery, StoreError, StoredEvent, SweepReport,
    UploadRecord, assemble, chunk_invalid, uploads_to_evict,
};

/// Read calls on blocking threads at once. sled reads are short and mostly from its
/// cache; without a bound, a thousand portal clients connecting at once each took a
/// thread of tokio's blocking pool for their backlog reads, and the pool grew to its 512
/// threads (with jemalloc's caches per thread, about 150 MiB more hub RSS for those
/// clients; README, "Portal live stream").
const READ_CALLS: usize = 8;
/// Write calls on blocking threads at once: one writes and syncs (each holds `synced`),
/// one waits to go next; the rest wait here, without a thread.
const WRITE_CALLS: usize = 2;

/// The hub's sled store.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
    path: PathBuf,
    events: ::sled::Tree,
    devices: ::sled::Tree,
    blobs: ::sled::Tree,
    blob_uploads: ::sled::Tree,
    blob_upload_parts: ::sled::Tree,
    partial_limits: PartialBlobLimits,
    outbox_sinks: Arc<Vec<String>>,
    outbox: ::sled::Tree,
    outbox_ids: ::sled::Tree,
    deadletters: ::sled::Tree,
    outbox_sent: ::sled::Tree,
    webhooks: ::sled::Tree,
    /// Bumped once a write that added outbox rows is durable.
    outbox_signal: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set when a write adds an outbox row (one write call at a time).
    outbox_pushed: Arc<AtomicBool>,
    /// Bumped once a write that changed a shipment record or a position is durable.
    portal_signal: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set when a write changes a shipment record or a position (one write call at a time).
    portal_pushed: Arc<AtomicBool>,
    quarantine: ::sled::Tree,
    quarantine_by_device: ::sled::Tree,
    assignments: ::sled::Tree,
    credentials: ::sled::Tree,
    credentials_by_token: ::sled::Tree,
    shipments: ::sled::Tree,
    shipment_facts: ::sled::Tree,
    shipments_by_vehicle: ::sled::Tree,
    locations: ::sled::Tree,
    reviews: ::sled::Tree,
    reviews_by_shipment: ::sled::Tree,
    positions: ::sled::Tree,
    shipments_by_stop: ::sled::Tree,
    quarantined_count: Arc<AtomicUsize>,
    /// What the last `make_durable` synced; held for a whole write call, so one call
    /// writes and syncs at a time (the order the module note relies on).
    synced: Arc<Mutex<durable::Synced>>,
    /// Set once a sync failed: the kernel may have dropped the dirty pages it could not
    /// write, so a later sync that succeeds proves nothing. Every write fails from then
    /// on and readiness goes red until the hub restarts and sled re-reads its disk.
    failed: Arc<AtomicBool>,
    /// Permits for [`READ_CALLS`] and [`WRITE_CALLS`].
    reads: Arc<tokio::sync::Semaphore>,
    writes: Arc<tokio::sync::Semaphore>,
}

fn event_key(device: &str, epoch: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 13);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn by_device_key(device: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Key of one device's upload of one blob; its parts' keys extend it with the offset.
fn upload_key(device: &str, sha256: &Sha256) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 37);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(sha256);
    k
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, StoreError> {
    Ok(postcard::from_bytes(v)?)
}

/// Key of an outbox row (`sink ++ 0x00 ++ seq`).
fn outbox_key(sink: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(sink.len() + 9);
    k.extend_from_slice(sink.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Key of a pair of ids (`a ++ 0x00 ++ b`).
fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// The JSON value under `key` in `tree`, if any.
fn json_get<T: serde::de::DeserializeOwned>(
    tree: &::sled::Tree,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
        None => Ok(None),
    }
}

/// Drops the tree of ownerless parts an older hub kept (`sha256 ++ offset` keys).
fn db_drop_old_parts(db: &::sled::Db) -> Result<(), StoreError> {
    if db.tree_names().iter().any(|n| &n[..] == b"blob_parts") {
        db.drop_tree("blob_parts")?;
    }
    Ok(())
}

/// The decoded value under `key` in `tree`, if any.
fn get<T: serde::de::DeserializeOwned>(
    tree: &::sled::Tree,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    tree.get(key)?.map(|v| decode(&v)).transpose()
}

impl SledStore {
    /// Opens (or creates) the store at `path` (blocking).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if path.exists() && !path.is_dir() {
            return Err(StoreError::Config(format!(
                "store.path {}: exists and is not a directory",
                path.display()
            )));
        }
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Config(format!(
                "store.path {}: cannot create it: {e}",
                path.display()
            ))
        })?;
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                ::sled::Error::Io(io) => StoreError::Config(format!(
                    "store.path {}: cannot open the sled store: {io}",
                    path.display()
                )),
                other => StoreError::Sled(other),
            })?;
        let store = Self {
            events: db.open_tree("events")?,
            devices: db.open_tree("devices")?,
            blobs: db.open_tree("blobs")?,
            blob_uploads: db.open_tree("blob_uploads")?,
            blob_upload_parts: db.open_tree("blob_upload_parts")?,
            partial_limits: PartialBlobLimits::default(),
            outbox_sinks: Arc::new(Vec::new()),
            outbox: db.open_tree("outbox")?,
            outbox_ids: db.open_tree("outbox_ids")?,
            deadletters: db.open_tree("deadletters")?,
            outbox_sent: db.open_tree("outbox_sent")?,
            webhooks: db.open_tree("webhooks")?,
            outbox_signal: Arc::new(tokio::sync::watch::Sender::new(0)),
            outbox_pushed: Arc::new(AtomicBool::new(false)),
            portal_signal: Arc::new(tokio::sync::watch::Sender::new(0)),
            portal_pushed: Arc::new(AtomicBool::new(false)),
            quarantine: db.open_tree("quarantine")?,
            quarantine_by_device: db.open_tree("quarantine_by_device")?,
            assignments: db.open_tree("assignments")?,
            credentials: db.open_tree("credentials")?,
            credentials_by_token: db.open_tree("credentials_by_token")?,
            shipments: db.open_tree("shipments")?,
            shipment_facts: db.open_tree("shipment_facts")?,
            shipments_by_vehicle: db.open_tree("shipments_by_vehicle")?,
            locations: db.open_tree("locations")?,
            reviews: db.open_tree("reviews")?,
            reviews_by_shipment: db.open_tree("reviews_by_shipment")?,
            positions: db.open_tree("positions")?,
            shipments_by_stop: db.open_tree("shipments_by_stop")?,
            quarantined_count: Arc::new(AtomicUsize::new(0)),
            synced: Arc::new(Mutex::new(durable::Synced::default())),
            failed: Arc::new(AtomicBool::new(false)),
            reads: Arc::new(tokio::sync::Semaphore::new(READ_CALLS)),
            writes: Arc::new(tokio::sync::Semaphore::new(WRITE_CALLS)),
            path: path.to_path_buf(),
            db,
        };
        // Parts of a store from before uploads had owners: dropped (the agents send
        // every unacknowledged blob again, whole).
        db_drop_old_parts(&store.db)?;
        if !store.shipments.is_empty() && store.shipments_by_stop.is_empty() {
            // A store from before the per-stop index: index what is there, once.
            for v in store.shipments.iter().values() {
                let rec: ShipmentRecord = serde_json::from_slice(&v?)?;
                store.index_stops(&rec)?;
            }
        }
        if !store.reviews.is_empty() && store.reviews_by_shipment.is_empty() {
            // A store from before the per-shipment index: index what is there, once.
            for v in store.reviews.iter().values() {
                let item: ReviewItem = serde_json::from_slice(&v?)?;
                store.index_review(&item)?;
            }
        }
        let n = store.quarantine.iter().keys().count();
        store.quarantined_count.store(n, Ordering::Relaxed);
        if n > 0 && store.quarantine_by_device.is_empty() {
            // A store from before the per-device index: index what is there, once.
            for kv in store.quarantine.iter() {
                let (k, v) = kv?;
                let q: Quarantined = decode(&v)?;
                let mut id = [0u8; 8];
                id.copy_from_slice(&k);
                store
                    .quarantine_by_device
                    .insert(by_device_key(&q.device, u64::from_be_bytes(id)), &[])?;
            }
        }
        Ok(store)
    }

    /// The same store applying `limits` to blob uploads in progress.
    pub fn with_partial_blob_limits(mut self, limits: PartialBlobLimits) -> Self {
        self.partial_limits = limits;
        self
    }

    /// See [`super::Store::partial_blob_limits`].
    pub fn partial_blob_limits(&self) -> PartialBlobLimits {
        self.partial_limits
    }

    /// The same store writing outbox rows for `sinks`.
    pub fn with_outbox_sinks(mut self, sinks: Vec<String>) -> Self {
        self.outbox_sinks = Arc::new(sinks);
        self
    }

    /// Writes the outbox rows `new_facts` of `rec` make, those not written yet (before
    /// the facts themselves: see [`crate::outbox`]).
    fn append_outbox(
        &self,
        rec: &ShipmentRecord,
        new_facts: &[Fact],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        for mut row in outbox::rows_for(&self.outbox_sinks, rec, new_facts, now_ms) {
            if self.outbox_ids.contains_key(row.id.as_bytes())? {
                continue;
            }
            self.push_outbox(&mut row)?;
        }
        Ok(())
    }

    /// Appends `row` at the end of its sink's outbox (a new seq).
    fn push_outbox(&self, row: &mut OutboxRow) -> Result<(), StoreError> {
        row.seq = self.db.generate_id()?;
        self.outbox
            .insert(outbox_key(&row.sink, row.seq), serde_json::to_vec(&*row)?)?;
        self.outbox_ids
            .insert(row.id.as_bytes(), &row.seq.to_be_bytes())?;
        self.outbox_pushed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// See [`super::Store::outbox_due`]: one process delivers from sled, so no lease.
    pub async fn outbox_due(
        &self,
        sink: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut prefix = sink.as_bytes().to_vec();
        prefix.push(0);
        self.blocking(move |s| {
            let mut blocked = std::collections::HashSet::new();
            let mut out = Vec::new();
            for v in s.outbox.scan_prefix(&prefix).values() {
                let row: OutboxRow = serde_json::from_slice(&v?)?;
                // Only the first row of a shipment: the rest wait for it.
                if !blocked.insert(row.shipment_id.clone()) {
                    continue;
                }
                if row.next_ms <= now_ms {
                    out.push(row);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::outbox_settle`].
    pub async fn outbox_settle(
        &self,
        results: Vec<(OutboxRow, Delivery)>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(move |s| {
            for (row, d) in results {
                let key = outbox_key(&row.sink, row.seq);
                let keep = webhooks::is_subscription_sink(&row.sink).then(|| row.clone());
                match row.settle(d, now_ms) {
                    Settled::Gone => {
                        if let Some(row) = keep {
                            s.outbox_sent.insert(&key, serde_json::to_vec(&row)?)?;
                        }
                        s.outbox.remove(key)?;
                    }
                    Settled::Waiting(row) => {
                        s.outbox.insert(key, serde_json::to_vec(&row)?)?;
                    }
                    Settled::Dead(dead) => {
                        s.deadletters
                            .insert(dead.row.id.as_bytes(), serde_json::to_vec(&dead)?)?;
                        s.outbox.remove(key)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// See [`super::Store::outbox_depth`].
    pub async fn outbox_depth(&self, sink: &str) -> Result<(u64, Option<u64>), StoreError> {
        let mut prefix = sink.as_bytes().to_vec();
        prefix.push(0);
        self.blocking(move |s| {
            let n = s.outbox.scan_prefix(&prefix).keys().count() as u64;
            let oldest = match s.outbox.scan_prefix(&prefix).values().next() {
                Some(v) => Some(serde_json::from_slice::<OutboxRow>(&v?)?.created_ms),
                None => None,
            };
            Ok((n, oldest))
        })
        .await
    }

    /// See [`super::Store::deadletters`].
    pub async fn deadletters(
        &self,
        sink: Option<String>,
        shipment: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.blocking(move |s| {
            let mut out = Vec::new();
            for v in s.deadletters.iter().values() {
                let d: DeadLetter = serde_json::from_slice(&v?)?;
                if sink.as_ref().is_none_or(|x| *x == d.row.sink)
                    && shipment.as_ref().is_none_or(|x| *x == d.row.shipment_id)
                {
                    out.push(d);
                }
            }
            out.sort_by(|a, b| (a.dead_ms, &a.row.id).cmp(&(b.dead_ms, &b.row.id)));
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::replay_deadletter`].
    pub async fn replay_deadletter(&self, id: &str) -> Result<Option<OutboxRow>, StoreError> {
        let id = id.to_string();
        self.write(move |s| {
            let Some(d) = json_get::<DeadLetter>(&s.deadletters, id.as_bytes())? else {
                return Ok(None);
            };
            // Back at the end of its sink's outbox, under the same id.
            let mut row = d.row.replayed();
            s.push_outbox(&mut row)?;
            s.deadletters.remove(id.as_bytes())?;
            Ok(Some(row))
        })
        .await
    }

    /// See [`super::Store::outbox_signal`].
    pub fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox_signal.subscribe()
    }

    /// See [`super::Store::portal_signal`].
    pub fn portal_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.portal_signal.subscribe()
    }

    /// See [`super::Store::put_webhook`].
    pub async fn put_webhook(&self, sub: &Subscription) -> Result<(), StoreError> {
        let (key, val) = (sub.id.clone(), serde_json::to_vec(sub)?);
        self.write(move |s| {
            s.webhooks.insert(key.as_bytes(), val)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Store::webhook`].
    pub async fn webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        json_get(&self.webhooks, id.as_bytes())
    }

    /// See [`super::Store::webhooks`].
    pub async fn webhooks(&self) -> Result<Vec<Subscription>, StoreError> {
        self.webhooks_now()
    }

    /// See [`super::Store::delete_webhook`].
    pub async fn delete_webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let id = id.to_string();
        self.write(move |s| {
            let Some(sub) = json_get::<Subscription>(&s.webhooks, id.as_bytes())? else {
                return Ok(None);
            };
            let mut prefix = webhooks::sink_of(&id).into_bytes();
            prefix.push(0);
            for tree in [&s.outbox, &s.outbox_sent] {
                for k in tree.scan_prefix(&prefix).keys() {
                    tree.remove(k?)?;
                }
            }
            let sink = webhooks::sink_of(&id);
            for kv in s.deadletters.iter() {
                let (k, v) = kv?;
                let d: DeadLetter = serde_json::from_slice(&v)?;
                if d.row.sink == sink {
                    s.deadletters.remove(k)?;
                }
            }
            s.webhooks.remove(id.as_bytes())?;
            Ok(Some(sub))
        })
        .await
    }

    /// See [`super::Store::webhook_fanout`].
    pub async fn webhook_fanout(
        &self,
        limit: usize,
        event_type: impl Fn(&OutboxRow) -> String + Send + 'static,
    ) -> Result<usize, StoreError> {
        let mut prefix = webhooks::STAGING.as_bytes().to_vec();
        prefix.push(0);
        if self.outbox.scan_prefix(&prefix).next().is_none() {
            return Ok(0);
        }
        self.write(move |s| {
            let subs = s.webhooks_now()?;
            let mut n = 0;
            for kv in s.outbox.scan_prefix(&prefix).take(limit) {
                let (k, v) = kv?;
                let staged: OutboxRow = serde_json::from_slice(&v)?;
                for mut row in webhooks::fan_out(&staged, &subs, &event_type(&staged)) {
                    // Written before (a crash after the rows, before the removal): skip.
                    if !s.outbox_ids.contains_key(row.id.as_bytes())? {
                        s.push_outbox(&mut row)?;
                    }
                }
                s.outbox.remove(k)?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    fn webhooks_now(&self) -> Result<Vec<Subscription>, StoreError> {
        let mut out = Vec::new();
        for v in self.webhooks.iter().values() {
            out.push(serde_json::from_slice(&v?)?);
        }
        Ok(out)
    }

    /// See [`super::Store::webhook_replay`].
    pub async fn webhook_replay(&self, id: &str, since_ms: u64) -> Result<usize, StoreError> {
        let sink = webhooks::sink_of(id);
        self.write(move |s| {
            let mut prefix = sink.clone().into_bytes();
            prefix.push(0);
            // Delivered rows and dead letters, in their first order.
            let mut rows: Vec<(Option<Vec<u8>>, OutboxRow)> = Vec::new();
            for kv in s.outbox_sent.scan_prefix(&prefix) {
                let (k, v) = kv?;
                let row: OutboxRow = serde_json::from_slice(&v)?;
                if row.created_ms >= since_ms {
                    rows.push((Some(k.to_vec()), row));
                }
            }
            for v in s.deadletters.iter().values() {
                let d: DeadLetter = serde_json::from_slice(&v?)?;
                if d.row.sink == sink && d.row.created_ms >= since_ms {
                    rows.push((None, d.row));
                }
            }
            rows.sort_by_key(|(_, r)| r.seq);
            let n = rows.len();
            for (sent_key, row) in rows {
                match sent_key {
                    Some(k) => {
                        s.outbox_sent.remove(k)?;
                    }
                    None => {
                        s.deadletters.remove(row.id.as_bytes())?;
                    }
                }
                let mut row = row.replayed();
                s.push_outbox(&mut row)?;
            }
            Ok(n)
        })
        .await
    }

    /// See [`super::Store::prune_delivered`].
    pub async fn prune_delivered(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.write(move |s| {
            let mut n = 0;
            for kv in s.outbox_sent.iter() {
                let (k, v) = kv?;
                let row: OutboxRow = serde_json::from_slice(&v)?;
                if row.created_ms < before_ms {
                    s.outbox_sent.remove(k)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
    }

    /// See [`super::Store::outbox_pending`].
    pub async fn outbox_pending(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut prefix = sink.as_bytes().to_vec();
        prefix.push(0);
        self.blocking(move |s| {
            s.outbox
                .scan_prefix(&prefix)
                .values()
                .take(limit)
                .map(|v| Ok(serde_json::from_slice(&v?)?))
                .collect()
        })
        .await
    }

    /// Opens the store on a blocking thread.
    pub async fn open_async(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs the read `f` on a blocking thread, at most [`READ_CALLS`] at once.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_thread(&self.reads, f).await
    }

    /// Runs `f` on a blocking thread once `calls` has a permit for it (waiting callers
    /// queue in order, without a thread each).
    async fn on_thread<T: Send + 'static>(
        &self,
        calls: &tokio::sync::Semaphore,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // The semaphore is never closed.
        let _permit = calls
            .acquire()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs the write `f` and makes it durable, one write call at a time.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_thread(&self.writes, move |s| {
            // A panic in another call cannot leave the map wrong, only stale: a stale
            // entry at worst syncs a file once more.
            let mut synced = s.synced.lock().unwrap_or_else(|p| p.into_inner());
            s.check_not_failed()?;
            let out = f(s)?;
            if let Err(source) = durable::make_durable(&s.db, &s.path, &mut synced) {
                s.failed.store(true, Ordering::SeqCst);
                tracing::error!(path = %s.path.display(), error = %source,
                    "store sync failed: nothing more is acked until the hub restarts (check the disk)");
                return Err(StoreError::Io {
                    path: s.path.clone(),
                    source,
                });
            }
            if s.outbox_pushed.swap(false, Ordering::Relaxed) {
                s.outbox_signal.send_modify(|n| *n = n.wrapping_add(1));
            }
            if s.portal_pushed.swap(false, Ordering::Relaxed) {
                s.portal_signal.send_modify(|n| *n = n.wrapping_add(1));
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::ingest`].
    pub async fn ingest(
        &self,
        items: Vec<Item>,
        recorded_ms: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.write(move |s| {
            items
                .iter()
                .map(|item| match item {
                    Item::Batch { device, batch } => s
                        .ingest_batch(device, batch, recorded_ms)
                        .map(Outcome::Batch),
                    Item::Chunk { device, chunk } => {
                        s.touch_device(device, recorded_ms)?;
                        s.put_chunk(device, chunk, recorded_ms).map(Outcome::Chunk)
                    }
                    Item::Quarantine(q) => s.put_quarantine(q).map(Outcome::Quarantined),
                })
                .collect()
        })
        .await
    }

    fn ingest_batch(
        &self,
        device: &str,
        batch: &Batch,
        recorded_ms: u64,
    ) -> Result<Ingested, StoreError> {
        let mut out = Ingested::default();
        for (i, event) in batch.events.iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            let key = event_key(device, batch.epoch, seq);
            // An event with effects (an ack, a newer health) is new only if its row is
            // absent: its effects are written first (idempotent), its row (the marker)
            // last. A position has none: its row is the whole of it.
            let has_effects = matches!(event.body, Body::AssignmentAck(_) | Body::Health(_))
                || correlate::correlates(&event.body);
            if has_effects && !self.events.contains_key(&key)? {
                match &event.body {
                    Body::AssignmentAck(a) => {
                        self.ack_assignment(device, &a.assignment_id, a.version, event.time_ms)?
                    }
                    Body::Health(h) => self.merge_device(
                        device,
                        recorded_ms,
                        Some(batch.epoch),
                        Some(&(event.time_ms, h.clone())),
                    )?,
                    _ => self.correlate_event(device, batch.epoch, seq, event, recorded_ms)?,
                }
            }
            let row = postcard::to_stdvec(&StoredEvent {
                recorded_ms,
                event: event.clone(),
            })?;
            match self
                .events
                .compare_and_swap(key, None as Option<&[u8]>, Some(row))?
            {
                Ok(()) => out.new.push(seq),
                Err(existing) => {
                    // Same identity: a redelivery, unless the content differs.
                    let same = existing
                        .current
                        .as_ref()
                        .and_then(|b| postcard::from_bytes::<StoredEvent>(b).ok())
                        .is_some_and(|old| old.event == *event);
                    if same {
                        out.duplicates += 1;
                    } else {
                        out.conflicts += 1;
                    }
                }
            }
        }
        // Last seen and epoch are merged for redeliveries too, so a crash before this
        // line is repaired by the redelivery; so is the position (only newer fixes count).
        self.merge_position(device, batch, recorded_ms)?;
        self.merge_device(device, recorded_ms, Some(batch.epoch), None)?;
        Ok(out)
    }

    /// Folds the batch's fixes into the device's newest position ([`eta::fold_position`]).
    fn merge_position(
        &self,
        device: &str,
        batch: &Batch,
        recorded_ms: u64,
    ) -> Result<(), StoreError> {
        let mut fixes: Vec<eta::FixAt<'_>> = batch
            .events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.body {
                Body::Position(f) => Some((e.time_ms, f, batch.epoch, batch.first_seq + i as u64)),
                _ => None,
            })
            .collect();
        if fixes.is_empty() {
            return Ok(());
        }
        let prev: Option<VehiclePosition> = match self.positions.get(device.as_bytes())? {
            Some(v) => Some(decode(&v)?),
            None => None,
        };
        if let Some(next) = eta::fold_position(prev.as_ref(), &mut fixes, recorded_ms) {
            self.positions
                .insert(device.as_bytes(), postcard::to_stdvec(&next)?)?;
            self.portal_pushed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Keeps a shipment's stops in the per-stop index while it is not finished.
    fn index_stops(&self, rec: &ShipmentRecord) -> Result<(), StoreError> {
        for stop in &rec.spec.stops {
            let key = pair_key(&stop.id, &rec.id);
            if rec.state.is_finished() {
                self.shipments_by_stop.remove(key)?;
            } else {
                self.shipments_by_stop.insert(key, &[])?;
            }
        }
        Ok(())
    }

    /// The open shipments at `stop` on vehicles other than `device`.
    fn open_elsewhere(&self, stop: &str, device: &str) -> Result<Vec<String>, StoreError> {
        let mut prefix = stop.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for k in self.shipments_by_stop.scan_prefix(&prefix).keys() {
            let k = k?;
            if let Some(r) = json_get::<ShipmentRecord>(&self.shipments, &k[prefix.len()..])?
                && !r.state.is_finished()
                && r.vehicle.as_deref().is_some_and(|v| v != device)
                && r.spec.stops.iter().any(|s| s.id == stop)
            {
                out.push(r.id);
            }
        }
        Ok(out)
    }

    /// Adds a review item to its shipment's index.
    fn index_review(&self, item: &ReviewItem) -> Result<(), StoreError> {
        if let Some(sid) = &item.shipment_id {
            self.reviews_by_shipment
                .insert(pair_key(sid, &item.id), &[])?;
        }
        Ok(())
    }

    /// Writes the facts and review items a new trip or POD event implies (before the
    /// event's row: facts and items are keyed by the event, records only gain a rev).
    fn correlate_event(
        &self,
        device: &str,
        epoch: u32,
        seq: u64,
        event: &fleetsync_protocol::Event,
        recorded_ms: u64,
    ) -> Result<(), StoreError> {
        let mut open = self.open_shipments_blocking(device)?;
        if let Body::Pod(p) = &event.body
            && !open.iter().any(|(r, _)| r.id == p.shipment_id.as_str())
            && let Some((r, f)) = self.shipment_blocking(&p.shipment_id)?
            && r.vehicle.as_deref() == Some(device)
        {
            open.push((r, f));
        }
        let elsewhere = match correlate::unmatched_arrival(event, &open) {
            Some(stop) => self.open_elsewhere(stop, device)?,
            None => Vec::new(),
        };
        let c = correlate::correlate(
            device,
            epoch,
            seq,
            event,
            recorded_ms,
            &open,
            &|id| self.shipments.contains_key(id.as_bytes()).unwrap_or(false),
            &|_| elsewhere.clone(),
        );
        // Per shipment, the facts not stored yet (a redelivery after a crash may find some).
        let mut fresh: BTreeMap<String, Vec<Fact>> = BTreeMap::new();
        for (sid, fact) in c.facts {
            if let Some((_, facts)) = open.iter_mut().find(|(r, _)| r.id == sid)
                && !facts.iter().any(|f| f.id == fact.id)
            {
                facts.push(fact.clone());
            }
            if !self.shipment_facts.contains_key(pair_key(&sid, &fact.id))? {
                fresh.entry(sid).or_default().push(fact);
            }
        }
        for item in c.reviews {
            if !self.reviews.contains_key(item.id.as_bytes())? {
                self.index_review(&item)?;
                self.reviews
                    .insert(item.id.as_bytes(), serde_json::to_vec(&item)?)?;
            }
        }
        for (rec, facts) in &mut open {
            let new = fresh.remove(&rec.id).unwrap_or_default();
            let state = crate::shipments::facts::replay(facts, &rec.spec);
            // A record whose state lags its facts (a crash between the two) is repaired.
            if new.is_empty() && state == rec.state {
                continue;
            }
            rec.rev += 1;
            rec.updated_ms = recorded_ms;
            rec.state = state;
            // Outbox rows, then facts, then the record (see crate::outbox).
            self.append_outbox(rec, &new, recorded_ms)?;
            for f in &new {
                self.shipment_facts
                    .insert(pair_key(&rec.id, &f.id), serde_json::to_vec(f)?)?;
            }
            self.index_stops(rec)?;
            self.shipments
                .insert(rec.id.as_bytes(), serde_json::to_vec(&*rec)?)?;
            self.portal_pushed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn merge_device(
        &self,
        device: &str,
        seen_ms: u64,
        epoch: Option<u32>,
        health: Option<&(u64, Health)>,
    ) -> Result<(), StoreError> {
        self.devices.fetch_and_update(device.as_bytes(), |old| {
            let mut rec: DeviceRecord = old
                .and_then(|b| postcard::from_bytes(b).ok())
                .unwrap_or_default();
            rec.merge(seen_ms, epoch, health);
            postcard::to_stdvec(&rec).ok()
        })?;
        Ok(())
    }

    /// Notes that a device was seen (a blob chunk, for instance) without events.
    fn touch_device(&self, device: &str, recorded_ms: u64) -> Result<(), StoreError> {
        self.merge_device(device, recorded_ms, None, None)
    }

    /// See [`super::Store::devices`].
    pub async fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        self.blocking(|s| {
            let mut out = Vec::new();
            for kv in s.devices.iter() {
                let (k, v) = kv?;
                out.push((String::from_utf8_lossy(&k).into_owned(), decode(&v)?));
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::device`].
    pub async fn device(&self, device: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let device = device.to_string();
        self.blocking(move |s| get(&s.devices, device.as_bytes()))
            .await
    }

    /// See [`super::Store::events`].
    pub async fn events(
        &self,
        device: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<EventRows, StoreError> {
        let (device, kind) = (device.to_string(), kind.map(str::to_string));
        self.blocking(move |s| s.events_blocking(&device, after, limit, kind.as_deref()))
            .await
    }

    fn events_blocking(
        &self,
        device: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<EventRows, StoreError> {
        let mut prefix = device.as_bytes().to_vec();
        prefix.push(0);
        let start = match after {
            Some((e, s)) => {
                let mut k = event_key(device, e, s);
                k.push(0); // strictly after
                k
            }
            None => prefix.clone(),
        };
        let mut end = device.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for kv in self.events.range(start..end) {
            let (k, v) = kv?;
            let tail = &k[prefix.len()..];
            if tail.len() != 12 {
                continue;
            }
            let epoch = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
            let mut s = [0u8; 8];
            s.copy_from_slice(&tail[4..]);
            let stored: StoredEvent = decode(&v)?;
            if kind.is_some_and(|k| k != stored.event.body.kind()) {
                continue;
            }
            out.push((epoch, u64::from_be_bytes(s), stored));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Stores `device`'s chunk of its upload and assembles the blob once every byte is
    /// there (see the store's module note for the limits).
    fn put_chunk(
        &self,
        device: &str,
        chunk: &BlobChunk,
        now_ms: u64,
    ) -> Result<ChunkOutcome, StoreError> {
        if let Some(why) = chunk_invalid(chunk) {
            return Ok(ChunkOutcome::Invalid(why));
        }
        let key = upload_key(device, &chunk.sha256);
        if self.blobs.contains_key(chunk.sha256)? {
            // Done before (perhaps by another device): this device's upload is moot.
            self.drop_upload(&key)?;
            return Ok(ChunkOutcome::Complete);
        }
        let mut rec: Option<UploadRecord> = get(&self.blob_uploads, &key)?;
        if rec.is_some_and(|r| r.total_len != chunk.total_len) {
            // The same digest with another length: one of them is wrong; start over.
            self.drop_upload(&key)?;
            rec = None;
        }
        let mut part_key = key.clone();
        part_key.extend_from_slice(&chunk.offset.to_be_bytes());
        let old_len = self
            .blob_upload_parts
            .get(&part_key)?
            .map_or(0, |v| v.len() as u64);
        let add = (chunk.data.len() as u64).saturating_sub(old_len);
        let mut evicted = 0u32;
        if add > 0 {
            let mine = self.uploads_of(device)?;
            for sha in uploads_to_evict(&mine, &chunk.sha256, add, &self.partial_limits) {
                self.drop_upload(&upload_key(device, &sha))?;
                evicted += 1;
            }
        }
        let stored = rec.map_or(0, |r| r.stored) + chunk.data.len() as u64 - old_len;
        let rec = UploadRecord {
            total_len: chunk.total_len,
            stored,
            updated_ms: now_ms,
        };
        // Record first, part second: no part is ever without its record.
        self.blob_uploads
            .insert(&key[..], postcard::to_stdvec(&rec)?)?;
        self.blob_upload_parts
            .insert(part_key, chunk.data.as_slice())?;
        if stored < u64::from(chunk.total_len) {
            return Ok(ChunkOutcome::Partial { evicted });
        }
        let mut parts = Vec::new();
        for kv in self.blob_upload_parts.scan_prefix(&key) {
            let (k, v) = kv?;
            let o = &k[key.len()..];
            if o.len() == 4 {
                parts.push((u64::from(u32::from_be_bytes([o[0], o[1], o[2], o[3]])), v));
            }
        }
        let Some(blob) = assemble(&parts, chunk.total_len) else {
            return Ok(ChunkOutcome::Partial { evicted });
        };
        drop(parts);
        let digest: Sha256 = sha2::Sha256::digest(&blob).into();
        if digest == chunk.sha256 {
            // The blob before its parts go: a crash in between leaves parts to sweep,
            // never a blob that is neither whole nor resumable.
            self.blobs.insert(chunk.sha256, blob)?;
        }
        self.drop_upload(&key)?;
        Ok(if digest == chunk.sha256 {
            ChunkOutcome::Complete
        } else {
            ChunkOutcome::DigestMismatch
        })
    }

    /// `device`'s uploads in progress.
    fn uploads_of(&self, device: &str) -> Result<Vec<(Sha256, UploadRecord)>, StoreError> {
        let mut prefix = device.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.blob_uploads.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if let Ok(sha) = Sha256::try_from(&k[prefix.len()..]) {
                out.push((sha, decode(&v)?));
            }
        }
        Ok(out)
    }

    /// Removes one upload: its parts, then its record.
    fn drop_upload(&self, key: &[u8]) -> Result<(), StoreError> {
        for k in self.blob_upload_parts.scan_prefix(key).keys() {
            self.blob_upload_parts.remove(k?)?;
        }
        self.blob_uploads.remove(key)?;
        Ok(())
    }

    /// See [`super::Store::put_credential`]. The record first, its token index second:
    /// a crash between leaves a credential no token reaches, never a token without one.
    pub async fn put_credential(&self, c: &Credential) -> Result<(), StoreError> {
        let c = c.clone();
        self.write(move |s| {
            s.credentials
                .insert(c.id.as_bytes(), postcard::to_stdvec(&c)?)?;
            s.credentials_by_token
                .insert(c.token_sha256, c.id.as_bytes())?;
            Ok(())
        })
        .await
    }

    /// See [`super::Store::credential_by_token`].
    pub async fn credential_by_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<Credential>, StoreError> {
        let h = *token_sha256;
        self.blocking(move |s| match s.credentials_by_token.get(h)? {
            Some(id) => get(&s.credentials, &id),
            None => Ok(None),
        })
        .await
    }

    /// See [`super::Store::credentials`].
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        self.blocking(|s| s.credentials.iter().values().map(|v| decode(&v?)).collect())
            .await
    }

    /// See [`super::Store::delete_credential`]. The token index first: once it is gone
    /// the token works nowhere.
    pub async fn delete_credential(&self, id: &str) -> Result<Option<Credential>, StoreError> {
        let id = id.to_string();
        self.write(move |s| {
            let Some(c) = get::<Credential>(&s.credentials, id.as_bytes())? else {
                return Ok(None);
            };
            s.credentials_by_token.remove(c.token_sha256)?;
            s.credentials.remove(id.as_bytes())?;
            Ok(Some(c))
        })
        .await
    }

    /// See [`super::Store::put_shipment`]. Checks first, then facts, the vehicle index
    /// and the location ids (each idempotent), and the record last: the record is the
    /// commit marker, and a crash before it leaves only what the retried call writes again.
    pub async fn put_shipment(
        &self,
        rec: &ShipmentRecord,
        expected_rev: Option<u64>,
        facts: &[Fact],
        locations: &[(String, Fence)],
    ) -> Result<PutShipment, StoreError> {
        let (rec, facts, locations) = (rec.clone(), facts.to_vec(), locations.to_vec());
        self.write(move |s| s.put_shipment_blocking(&rec, expected_rev, &facts, &locations))
            .await
    }

    /// See [`super::Store::put_shipments`]: every write in one durable write call.
    pub async fn put_shipments(
        &self,
        writes: Vec<super::ShipmentWrite>,
    ) -> Result<Vec<bool>, StoreError> {
        self.write(move |s| {
            writes
                .iter()
                .map(|w| {
                    s.put_shipment_blocking(&w.rec, Some(w.expected_rev), &w.facts, &[])
                        .map(|r| r == PutShipment::Written)
                })
                .collect()
        })
        .await
    }

    fn put_shipment_blocking(
        &self,
        rec: &ShipmentRecord,
        expected_rev: Option<u64>,
        facts: &[Fact],
        locations: &[(String, Fence)],
    ) -> Result<PutShipment, StoreError> {
        let old: Option<ShipmentRecord> = json_get(&self.shipments, rec.id.as_bytes())?;
        if old.as_ref().map(|o| o.rev) != expected_rev {
            return Ok(PutShipment::Stale);
        }
        for (id, fence) in locations {
            if let Some(known) = json_get::<Fence>(&self.locations, id.as_bytes())?
                && known != *fence
            {
                return Ok(PutShipment::LocationConflict {
                    stop_id: id.clone(),
                });
            }
        }
        for (id, fence) in locations {
            self.locations
                .insert(id.as_bytes(), serde_json::to_vec(fence)?)?;
        }
        let mut new = Vec::new();
        for f in facts {
            if !self.shipment_facts.contains_key(pair_key(&rec.id, &f.id))? {
                new.push(f.clone());
            }
        }
        self.append_outbox(rec, &new, rec.updated_ms)?;
        for f in &new {
            self.shipment_facts
                .insert(pair_key(&rec.id, &f.id), serde_json::to_vec(f)?)?;
        }
        if let Some(v) = &rec.vehicle {
            self.shipments_by_vehicle
                .insert(pair_key(v, &rec.id), &[])?;
        }
        if let Some(o) = &old
            && let Some(v) = &o.vehicle
            && rec.vehicle.as_ref() != Some(v)
        {
            self.shipments_by_vehicle.remove(pair_key(v, &rec.id))?;
        }
        self.index_stops(rec)?;
        self.shipments
            .insert(rec.id.as_bytes(), serde_json::to_vec(rec)?)?;
        self.portal_pushed.store(true, Ordering::Relaxed);
        Ok(PutShipment::Written)
    }

    fn shipment_blocking(
        &self,
        id: &str,
    ) -> Result<Option<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        let Some(rec) = json_get::<ShipmentRecord>(&self.shipments, id.as_bytes())? else {
            return Ok(None);
        };
        let facts = self.facts_blocking(id)?;
        Ok(Some((rec, facts)))
    }

    fn facts_blocking(&self, id: &str) -> Result<Vec<Fact>, StoreError> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        self.shipment_facts
            .scan_prefix(&prefix)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// See [`super::Store::shipment`].
    pub async fn shipment(
        &self,
        id: &str,
    ) -> Result<Option<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        let id = id.to_string();
        self.blocking(move |s| s.shipment_blocking(&id)).await
    }

    /// See [`super::Store::shipments`]: a scan of every record (the embedded store
    /// serves one depot's shipments; PostgreSQL pages by index).
    pub async fn shipments(&self, q: &ShipmentQuery) -> Result<Vec<ShipmentRecord>, StoreError> {
        let q = q.clone();
        self.blocking(move |s| {
            let mut out = Vec::new();
            for v in s.shipments.iter().values() {
                let r: ShipmentRecord = serde_json::from_slice(&v?)?;
                if q.admits(&r) {
                    out.push(r);
                }
            }
            out.sort_by(|a, b| (a.updated_ms, &a.id).cmp(&(b.updated_ms, &b.id)));
            out.truncate(q.limit);
            Ok(out)
        })
        .await
    }

    fn open_shipments_blocking(
        &self,
        vehicle: &str,
    ) -> Result<Vec<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        let mut prefix = vehicle.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for k in self.shipments_by_vehicle.scan_prefix(&prefix).keys() {
            let k = k?;
            // The record first: a vehicle's finished shipments stay in the index, and
            // their facts need not be read.
            let id = &k[prefix.len()..];
            let Some(r) = json_get::<ShipmentRecord>(&self.shipments, id)? else {
                continue;
            };
            if r.vehicle.as_deref() == Some(vehicle) && !r.state.is_finished() {
                let facts = self.facts_blocking(&r.id)?;
                out.push((r, facts));
            }
        }
        Ok(out)
    }

    /// See [`super::Store::vehicles_shipments`].
    pub async fn vehicles_shipments(
        &self,
        vehicles: &[String],
    ) -> Result<BTreeMap<String, Vec<(ShipmentRecord, Vec<Fact>)>>, StoreError> {
        let vehicles = vehicles.to_vec();
        self.blocking(move |s| {
            let mut out = BTreeMap::new();
            for v in vehicles {
                let open = s.open_shipments_blocking(&v)?;
                if !open.is_empty() {
                    out.insert(v, open);
                }
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::shipment_vehicles`].
    pub async fn shipment_vehicles(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|s| {
            let mut out: Vec<String> = Vec::new();
            for k in s.shipments_by_vehicle.iter().keys() {
                let k = k?;
                let v = k.split(|b| *b == 0).next().unwrap_or_default();
                let v = String::from_utf8_lossy(v).into_owned();
                if out.last() != Some(&v) {
                    out.push(v);
                }
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::reviews`].
    pub async fn reviews(
        &self,
        status: Option<ReviewStatus>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        self.blocking(move |s| {
            let mut out: Vec<ReviewItem> = Vec::new();
            for v in s.reviews.iter().values() {
                let r: ReviewItem = serde_json::from_slice(&v?)?;
                if status.is_none_or(|st| r.status == st) {
                    out.push(r);
                }
            }
            out.sort_by(|a, b| (a.created_time, &a.id).cmp(&(b.created_time, &b.id)));
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::reviews_of`].
    pub async fn reviews_of(&self, shipment: &str) -> Result<Vec<ReviewItem>, StoreError> {
        let mut prefix = shipment.as_bytes().to_vec();
        prefix.push(0);
        self.blocking(move |s| {
            let mut out = Vec::new();
            for k in s.reviews_by_shipment.scan_prefix(&prefix).keys() {
                let k = k?;
                if let Some(item) = json_get(&s.reviews, &k[prefix.len()..])? {
                    out.push(item);
                }
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::positions`].
    pub async fn positions(
        &self,
        devices: &[String],
    ) -> Result<BTreeMap<String, VehiclePosition>, StoreError> {
        let devices = devices.to_vec();
        self.blocking(move |s| {
            let mut out = BTreeMap::new();
            for d in devices {
                if let Some(v) = s.positions.get(d.as_bytes())? {
                    out.insert(d, decode(&v)?);
                }
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::review`].
    pub async fn review(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        let id = id.to_string();
        self.blocking(move |s| json_get(&s.reviews, id.as_bytes()))
            .await
    }

    /// See [`super::Store::put_review`].
    pub async fn put_review(
        &self,
        item: &ReviewItem,
        expected: Option<ReviewStatus>,
    ) -> Result<bool, StoreError> {
        let item = item.clone();
        self.write(move |s| {
            let old: Option<ReviewItem> = json_get(&s.reviews, item.id.as_bytes())?;
            if old.map(|o| o.status) != expected {
                return Ok(false);
            }
            s.index_review(&item)?;
            s.reviews
                .insert(item.id.as_bytes(), serde_json::to_vec(&item)?)?;
            Ok(true)
        })
        .await
    }

    /// See [`super::Store::blob_exists`].
    pub async fn blob_exists(&self, sha256: &Sha256) -> Result<bool, StoreError> {
        let sha = *sha256;
        self.blocking(move |s| Ok(s.blobs.contains_key(sha)?)).await
    }

    /// See [`super::Store::sweep_partial_blobs`].
    pub async fn sweep_partial_blobs(&self, now_ms: u64) -> Result<SweepReport, StoreError> {
        let cutoff = now_ms.saturating_sub(self.partial_limits.ttl_ms);
        self.write(move |s| {
            let mut report = SweepReport::default();
            for kv in s.blob_uploads.iter() {
                let (k, v) = kv?;
                let rec: UploadRecord = decode(&v)?;
                if rec.updated_ms < cutoff {
                    s.drop_upload(&k)?;
                    report.expired += 1;
                } else {
                    report.uploads += 1;
                    report.bytes += rec.stored;
                }
            }
            Ok(report)
        })
        .await
    }

    /// See [`super::Store::blob`].
    pub async fn blob(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        let sha = *sha256;
        self.blocking(move |s| Ok(s.blobs.get(sha)?.map(|v| v.to_vec())))
            .await
    }

    /// See [`super::Store::put_assignment`].
    pub async fn put_assignment(
        &self,
        device: &str,
        a: &Assignment,
        now_ms: u64,
    ) -> Result<Result<(), u32>, StoreError> {
        let (device, a) = (device.to_string(), a.clone());
        self.write(move |s| {
            loop {
                let old = s.assignments.get(device.as_bytes())?;
                let prev: Option<AssignmentRecord> = match &old {
                    Some(v) => Some(decode(v)?),
                    None => None,
                };
                if let Some(p) = &prev
                    && p.assignment.version >= a.version
                {
                    return Ok(Err(p.assignment.version));
                }
                let rec = match &prev {
                    Some(_) => AssignmentRecord::new(&a, now_ms),
                    None => AssignmentRecord::new(&a, now_ms),
                };
                let new = postcard::to_stdvec(&rec)?;
                if s.assignments
                    .compare_and_swap(device.as_bytes(), old, Some(new))?
                    .is_ok()
                {
                    return Ok(Ok(()));
                }
            }
        })
        .await
    }

    /// See [`super::Store::assignment`].
    pub async fn assignment(&self, device: &str) -> Result<Option<AssignmentRecord>, StoreError> {
        let device = device.to_string();
        self.blocking(move |s| get(&s.assignments, device.as_bytes()))
            .await
    }

    /// See [`super::Store::assignments`].
    pub async fn assignments(
        &self,
        devices: &[String],
    ) -> Result<Vec<(String, AssignmentRecord)>, StoreError> {
        // Inline, not on a blocking thread: point reads of a small tree that stays in
        // sled's cache, once per ingest round (a thread hop would cost more than the reads).
        let mut out = Vec::new();
        for d in devices {
            if let Some(rec) = get(&self.assignments, d.as_bytes())? {
                out.push((d.clone(), rec));
            }
        }
        Ok(out)
    }

    /// See [`super::Store::mark_assignment_sent`].
    pub async fn mark_assignment_sent(&self, device: &str, now_ms: u64) -> Result<(), StoreError> {
        let device = device.to_string();
        self.write(move |s| {
            s.update_assignment(&device, |rec| {
                rec.sent_ms = now_ms;
                true
            })
        })
        .await
    }

    fn ack_assignment(
        &self,
        device: &str,
        id: &str,
        version: u32,
        time_ms: u64,
    ) -> Result<(), StoreError> {
        self.update_assignment(device, |rec| rec.apply_ack(id, version, time_ms))
    }

    /// Read-modify-write of the device's record (if any) until no other write raced it.
    fn update_assignment(
        &self,
        device: &str,
        mut f: impl FnMut(&mut AssignmentRecord) -> bool,
    ) -> Result<(), StoreError> {
        loop {
            let Some(old) = self.assignments.get(device.as_bytes())? else {
                return Ok(());
            };
            let mut rec: AssignmentRecord = decode(&old)?;
            if !f(&mut rec) {
                return Ok(());
            }
            let new = postcard::to_stdvec(&rec)?;
            if self
                .assignments
                .compare_and_swap(device.as_bytes(), Some(old), Some(new))?
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    fn put_quarantine(&self, q: &Quarantined) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        let mut q = q.clone();
        q.raw.truncate(MAX_QUARANTINE_RAW);
        // Index first, frame last (the order of the module note): an index entry whose
        // frame is missing is skipped and dropped with the device's oldest.
        self.quarantine_by_device
            .insert(by_device_key(&q.device, id), &[])?;
        self.quarantine
            .insert(id.to_be_bytes(), postcard::to_stdvec(&q)?)?;
        // Counted in memory: sled's len() walks the whole tree.
        self.quarantined_count.fetch_add(1, Ordering::Relaxed);
        // This device's oldest past its share.
        let mut prefix = q.device.as_bytes().to_vec();
        prefix.push(0);
        let mine: Vec<::sled::IVec> = self
            .quarantine_by_device
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()?;
        for k in mine
            .iter()
            .take(mine.len().saturating_sub(MAX_QUARANTINE_PER_DEVICE))
        {
            let old = &k[prefix.len()..];
            if self.quarantine.remove(old)?.is_some() {
                self.quarantined_count.fetch_sub(1, Ordering::Relaxed);
            }
            self.quarantine_by_device.remove(k)?;
        }
        // Everyone's oldest past the total.
        while self.quarantined_count.load(Ordering::Relaxed) > MAX_QUARANTINE {
            let Some((k, v)) = self.quarantine.pop_min()? else {
                break;
            };
            self.quarantined_count.fetch_sub(1, Ordering::Relaxed);
            if let Ok(old) = decode::<Quarantined>(&v) {
                let mut id = [0u8; 8];
                id.copy_from_slice(&k);
                self.quarantine_by_device
                    .remove(by_device_key(&old.device, u64::from_be_bytes(id)))?;
            }
        }
        Ok(id)
    }

    /// See [`super::Store::quarantined`].
    pub async fn quarantined(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.blocking(move |s| {
            let end = before.unwrap_or(u64::MAX).to_be_bytes();
            let mut out = Vec::new();
            for kv in s.quarantine.range(..end).rev().take(limit) {
                let (k, v) = kv?;
                let mut id = [0u8; 8];
                id.copy_from_slice(&k);
                out.push(QuarantineEntry::of(u64::from_be_bytes(id), decode(&v)?));
            }
            Ok(out)
        })
        .await
    }

    /// See [`super::Store::quarantined_raw`].
    pub async fn quarantined_raw(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking(move |s| {
            Ok(get::<Quarantined>(&s.quarantine, &id.to_be_bytes())?.map(|q| q.raw))
        })
        .await
    }

    fn check_not_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(
                    "an earlier sync of the store failed; restart the hub once the disk is fixed",
                ),
            });
        }
        Ok(())
    }

    /// sled is in this process: it answers unless a sync has failed.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.check_not_failed()
    }
}

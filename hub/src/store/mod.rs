//! The hub's store (sled): events deduplicated on `(device, epoch, seq)`, devices, blobs,
//! and quarantined frames.
//!
//! ```text
//! tree events:      key  device_id ++ 0x00 ++ epoch: u32 BE ++ seq: u64 BE
//!                   val  postcard(StoredEvent { recorded_ms: u64, event: Event })
//! tree devices:     key  device_id            val  postcard(DeviceRecord)
//! tree blobs:       key  sha256 (32 bytes)    val  the verified blob
//! tree blob_parts:  key  sha256 ++ offset: u32 BE   val  chunk bytes (until complete)
//! tree quarantine:  key  id: u64 BE           val  postcard(Quarantined)
//! tree assignments: key  device_id            val  postcard(AssignmentRecord)
//! ```
//!
//! Invariants: an event row is written at most once (compare-and-swap on an absent key,
//! so redelivery in any order changes nothing); [`HubStore::make_durable`] (sled flush
//! plus fsync of sled's files, which sled 0.34.7's flush does not do) runs before the
//! ingest acks anything it wrote.

mod durable;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fleetsync_protocol::{Assignment, Batch, BlobChunk, Body, Event, Health, Sha256};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Largest blob the hub assembles.
pub const MAX_BLOB_BYTES: u32 = 32 * 1024 * 1024;
/// Quarantined frames kept (oldest dropped past this).
pub const MAX_QUARANTINE: usize = 10_000;
/// Bytes kept of each quarantined frame.
pub const MAX_QUARANTINE_RAW: usize = 64 * 1024;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// fsync failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A stored row did not decode.
    #[error("corrupt row: {0}")]
    Codec(#[from] postcard::Error),
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

/// A frame that did not decode, kept for operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantined {
    /// Device the topic names.
    pub device: String,
    /// Topic it came on.
    pub topic: String,
    /// When.
    pub recorded_ms: u64,
    /// Why it was refused.
    pub error: String,
    /// The raw bytes.
    pub raw: Vec<u8>,
}

/// The assignment sent to a device and what it acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Whether the device has acknowledged the newest version.
    pub fn acknowledged(&self) -> bool {
        self.acked_version
            .is_some_and(|v| v >= self.assignment.version)
    }
}

/// Result of storing a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// New events written.
    pub inserted: u64,
    /// Events already present with the same content.
    pub duplicates: u64,
    /// Identities already taken by different content (see [`HubStore::ingest_batch`]).
    pub conflicts: u64,
}

/// Result of storing a blob chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// More chunks needed.
    Partial,
    /// The blob is complete and verified (now or earlier).
    Complete,
    /// All bytes arrived but the digest did not match; the parts were dropped.
    DigestMismatch,
    /// The chunk is inconsistent (offset/length past the total, total over the limit).
    Invalid(String),
}

/// The hub's sled store.
#[derive(Debug, Clone)]
pub struct HubStore {
    db: sled::Db,
    path: PathBuf,
    events: sled::Tree,
    devices: sled::Tree,
    blobs: sled::Tree,
    blob_parts: sled::Tree,
    quarantine: sled::Tree,
    assignments: sled::Tree,
    quarantined_count: Arc<AtomicUsize>,
    /// What the last `make_durable` synced (one round at a time).
    synced: Arc<Mutex<durable::Synced>>,
}

fn event_key(device: &str, epoch: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 13);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl HubStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let store = Self::open_trees(path)?;
        let n = store.quarantine.iter().keys().count();
        store.quarantined_count.store(n, Ordering::Relaxed);
        Ok(store)
    }

    fn open_trees(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        Ok(Self {
            events: db.open_tree("events")?,
            devices: db.open_tree("devices")?,
            blobs: db.open_tree("blobs")?,
            blob_parts: db.open_tree("blob_parts")?,
            quarantine: db.open_tree("quarantine")?,
            assignments: db.open_tree("assignments")?,
            quarantined_count: Arc::new(AtomicUsize::new(0)),
            synced: Arc::new(Mutex::new(durable::Synced::default())),
            path: path.to_path_buf(),
            db,
        })
    }

    /// Makes everything written so far durable.
    pub fn make_durable(&self) -> Result<(), StoreError> {
        // A panic in another round cannot leave the map wrong, only stale: a stale entry
        // at worst syncs a file once more.
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        Ok(durable::make_durable(&self.db, &self.path, &mut synced)?)
    }

    /// Stores a batch's events that are not yet stored; updates the device record.
    pub fn ingest_batch(
        &self,
        device: &str,
        batch: &Batch,
        recorded_ms: u64,
    ) -> Result<Ingested, StoreError> {
        let mut out = Ingested::default();
        let mut newest_health: Option<(u64, Health)> = None;
        for (i, event) in batch.events.iter().enumerate() {
            let key = event_key(device, batch.epoch, batch.first_seq + i as u64);
            let row = postcard::to_stdvec(&StoredEvent {
                recorded_ms,
                event: event.clone(),
            })?;
            match self
                .events
                .compare_and_swap(key, None as Option<&[u8]>, Some(row))?
            {
                Ok(()) => {
                    out.inserted += 1;
                    if let Body::AssignmentAck(a) = &event.body {
                        self.ack_assignment(device, &a.assignment_id, a.version, event.time_ms)?;
                    }
                    if let Body::Health(h) = &event.body
                        && newest_health
                            .as_ref()
                            .is_none_or(|(t, _)| *t <= event.time_ms)
                    {
                        newest_health = Some((event.time_ms, h.clone()));
                    }
                }
                Err(existing) => {
                    // Same identity: a redelivery, unless the content differs (a device whose
                    // store was wiped and restarted its epochs). That is counted apart so the
                    // caller keeps the frame and tells an operator; never silently "deduped".
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
        self.devices.fetch_and_update(device.as_bytes(), |old| {
            let mut rec: DeviceRecord = old
                .and_then(|b| postcard::from_bytes(b).ok())
                .unwrap_or_default();
            if rec.first_seen_ms == 0 {
                rec.first_seen_ms = recorded_ms;
            }
            rec.last_seen_ms = rec.last_seen_ms.max(recorded_ms);
            rec.epoch = rec.epoch.max(batch.epoch);
            if let Some((t, h)) = &newest_health
                && rec.last_health.as_ref().is_none_or(|(old_t, _)| old_t <= t)
            {
                rec.last_health = Some((*t, h.clone()));
            }
            postcard::to_stdvec(&rec).ok()
        })?;
        Ok(out)
    }

    /// Notes that a device was seen (a blob chunk, for instance) without events.
    pub fn touch_device(&self, device: &str, recorded_ms: u64) -> Result<(), StoreError> {
        self.devices.fetch_and_update(device.as_bytes(), |old| {
            let mut rec: DeviceRecord = old
                .and_then(|b| postcard::from_bytes(b).ok())
                .unwrap_or_default();
            if rec.first_seen_ms == 0 {
                rec.first_seen_ms = recorded_ms;
            }
            rec.last_seen_ms = rec.last_seen_ms.max(recorded_ms);
            postcard::to_stdvec(&rec).ok()
        })?;
        Ok(())
    }

    /// Every device with its record, by id.
    pub fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.devices.iter() {
            let (k, v) = kv?;
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                postcard::from_bytes(&v)?,
            ));
        }
        Ok(out)
    }

    /// One device's record.
    pub fn device(&self, device: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(match self.devices.get(device.as_bytes())? {
            Some(v) => Some(postcard::from_bytes(&v)?),
            None => None,
        })
    }

    /// Events of `device` after `(epoch, seq)` in order, at most `limit`, optionally of
    /// one kind only. Returns `(epoch, seq, stored)`.
    pub fn events(
        &self,
        device: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<Vec<(u32, u64, StoredEvent)>, StoreError> {
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
            let stored: StoredEvent = postcard::from_bytes(&v)?;
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

    /// Stores a blob chunk and assembles the blob once every byte is there.
    pub fn put_chunk(&self, chunk: &BlobChunk) -> Result<ChunkOutcome, StoreError> {
        if self.blobs.contains_key(chunk.sha256)? {
            return Ok(ChunkOutcome::Complete);
        }
        let end = u64::from(chunk.offset) + chunk.data.len() as u64;
        if chunk.total_len > MAX_BLOB_BYTES {
            return Ok(ChunkOutcome::Invalid(format!(
                "blob of {} bytes over the limit",
                chunk.total_len
            )));
        }
        if end > u64::from(chunk.total_len) || (chunk.data.is_empty() && chunk.total_len > 0) {
            return Ok(ChunkOutcome::Invalid("chunk past the blob's end".into()));
        }
        let mut key = chunk.sha256.to_vec();
        key.extend_from_slice(&chunk.offset.to_be_bytes());
        self.blob_parts.insert(key, chunk.data.as_slice())?;
        // Covered contiguously from 0?
        let mut covered = 0u64;
        let mut parts = Vec::new();
        for kv in self.blob_parts.scan_prefix(chunk.sha256) {
            let (k, v) = kv?;
            let off = u64::from(u32::from_be_bytes([k[32], k[33], k[34], k[35]]));
            if off > covered {
                break;
            }
            covered = covered.max(off + v.len() as u64);
            parts.push((off, v));
        }
        if covered < u64::from(chunk.total_len) {
            return Ok(ChunkOutcome::Partial);
        }
        let mut blob = vec![0u8; chunk.total_len as usize];
        for (off, v) in &parts {
            // Parts stored under another total length may lie past this blob's end.
            let off = *off as usize;
            if off >= blob.len() {
                continue;
            }
            let n = v.len().min(blob.len() - off);
            blob[off..off + n].copy_from_slice(&v[..n]);
        }
        let digest: Sha256 = sha2::Sha256::digest(&blob).into();
        for (off, _) in &parts {
            let mut k = chunk.sha256.to_vec();
            k.extend_from_slice(&(*off as u32).to_be_bytes());
            self.blob_parts.remove(k)?;
        }
        if digest != chunk.sha256 {
            return Ok(ChunkOutcome::DigestMismatch);
        }
        self.blobs.insert(chunk.sha256, blob)?;
        Ok(ChunkOutcome::Complete)
    }

    /// A verified blob.
    pub fn blob(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.blobs.get(sha256)?.map(|v| v.to_vec()))
    }

    /// Records `a` as the device's assignment if its version is higher than the one already
    /// sent; otherwise returns `Err(current version)`.
    pub fn put_assignment(
        &self,
        device: &str,
        a: &Assignment,
        now_ms: u64,
    ) -> Result<Result<(), u32>, StoreError> {
        loop {
            let old = self.assignments.get(device.as_bytes())?;
            let prev: Option<AssignmentRecord> = match &old {
                Some(v) => Some(postcard::from_bytes(v)?),
                None => None,
            };
            if let Some(p) = &prev
                && p.assignment.version >= a.version
            {
                return Ok(Err(p.assignment.version));
            }
            let rec = AssignmentRecord {
                assignment: a.clone(),
                sent_ms: now_ms,
                acked_version: prev.as_ref().and_then(|p| p.acked_version),
                acked_ms: prev.as_ref().and_then(|p| p.acked_ms),
            };
            let new = postcard::to_stdvec(&rec)?;
            if self
                .assignments
                .compare_and_swap(device.as_bytes(), old, Some(new))?
                .is_ok()
            {
                return Ok(Ok(()));
            }
        }
    }

    /// The device's assignment record.
    pub fn assignment(&self, device: &str) -> Result<Option<AssignmentRecord>, StoreError> {
        Ok(match self.assignments.get(device.as_bytes())? {
            Some(v) => Some(postcard::from_bytes(&v)?),
            None => None,
        })
    }

    /// Notes that the assignment was sent again.
    pub fn mark_assignment_sent(&self, device: &str, now_ms: u64) -> Result<(), StoreError> {
        self.assignments
            .fetch_and_update(device.as_bytes(), |old| {
                let mut rec: AssignmentRecord = postcard::from_bytes(old?).ok()?;
                rec.sent_ms = now_ms;
                postcard::to_stdvec(&rec).ok()
            })?;
        Ok(())
    }

    fn ack_assignment(
        &self,
        device: &str,
        id: &str,
        version: u32,
        time_ms: u64,
    ) -> Result<(), StoreError> {
        self.assignments
            .fetch_and_update(device.as_bytes(), |old| {
                let bytes = old?;
                let mut rec: AssignmentRecord = match postcard::from_bytes(bytes) {
                    Ok(r) => r,
                    Err(_) => return Some(bytes.to_vec()),
                };
                if rec.assignment.id.as_str() == id && rec.acked_version.is_none_or(|v| v < version)
                {
                    rec.acked_version = Some(version);
                    rec.acked_ms = Some(time_ms);
                }
                postcard::to_stdvec(&rec)
                    .ok()
                    .or_else(|| Some(bytes.to_vec()))
            })?;
        Ok(())
    }

    /// Keeps a refused frame for operators.
    pub fn quarantine(&self, q: &Quarantined) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        let mut q = q.clone();
        q.raw.truncate(MAX_QUARANTINE_RAW);
        self.quarantine
            .insert(id.to_be_bytes(), postcard::to_stdvec(&q)?)?;
        // Counted in memory: sled's len() walks the whole tree.
        let n = self.quarantined_count.fetch_add(1, Ordering::Relaxed) + 1;
        if n > MAX_QUARANTINE && self.quarantine.pop_min()?.is_some() {
            self.quarantined_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(id)
    }

    /// Newest quarantined frames first.
    pub fn quarantined(&self, limit: usize) -> Result<Vec<(u64, Quarantined)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.quarantine.iter().rev().take(limit) {
            let (k, v) = kv?;
            let mut id = [0u8; 8];
            id.copy_from_slice(&k);
            out.push((u64::from_be_bytes(id), postcard::from_bytes(&v)?));
        }
        Ok(out)
    }
}

//! The agent's durable event store: every captured event lives here, with its identity,
//! until the hub acknowledges it.
//!
//! # What it owns
//!
//! - **Identity.** `(epoch, seq)`: `epoch` is bumped and made durable by [`Store::open`]
//!   before any seq is handed out; `seq` is one counter per epoch, starting at 0, shared by
//!   both lanes (so each lane's seqs have holes where the other lane's events are). A seq is
//!   consumed when it is allocated, even if the write then fails, so no `(epoch, seq)` is
//!   ever given to two events, crash or not.
//! - **Lanes.** [`Body::is_critical`] decides: positions and health are telemetry,
//!   everything else (POD, geofence, trip, exception, gap, assignment ack) is critical.
//! - **Durability.** [`Store::append`] returns once the event is durable: sled `flush()` and
//!   then `fsync` of sled's files and directories (sled 0.34.7 does not fsync on Linux).
//!   One background thread does this for every write since its previous round (group
//!   commit, window [`StoreConfig::commit_interval`]); before a round it gives the previous
//!   round's writers up to that round's duration to write again, so concurrent writers
//!   share rounds instead of splitting into cohorts that take turns.
//!   [`Store::append_buffered`] (GPS fixes) is durable at the next round, which starts at
//!   most one window (plus that wait, at most 2 ms) later.
//!   An `Err` from `append` does not prove the event absent: a failed fsync leaves it
//!   stored, and it may still be delivered (with its identity, so the hub dedups).
//! - **Quota.** `quota_bytes` is the target for the store's directory on disk (every file
//!   under [`StoreConfig::path`]), which sled's working segments pass (about 2 MiB
//!   measured, more when sled cleans late under load; a target, not a hard bound; README). Files (pending POD blobs, uploads in progress) count at their length;
//!   events at [`StoreConfig::space_factor`] times their logical bytes (key + value
//!   length, kept in memory and rebuilt by a scan on open), because sled's log-structured
//!   files hold that much per live byte. So events may hold
//!   `cap = (quota - file bytes) / space_factor`; ordinary events must fit in
//!   `cap - reserve`; the reserve (`min(cap / 8, max(cap / 100, 4 KiB))`) is only for
//!   `Gap` events. When an
//!   append does not fit, the oldest telemetry is evicted (plus a little slack, so one
//!   `Gap` covers many fixes) and, in the same sled transaction, one
//!   `Gap { lane: Telemetry, reason: Quota }` per evicted epoch is written to the critical
//!   lane, before the new event, so nothing vanishes silently. Critical events are never
//!   evicted: if evicting all telemetry would not make room, the append fails with
//!   [`StoreError::QuotaFull`] and nothing is evicted. This holds for telemetry appends
//!   too (policy: the new fix is refused, not stored-then-gapped; it never got a seq, so
//!   there is no hole for the hub to explain, and the caller counts the refusal).
//! - **Ack.** [`Store::ack`] deletes exactly the acknowledged seqs present in either lane
//!   and nothing else. Deletions become durable at the next commit round or on drop; after
//!   a crash an acknowledged event may come back and be resent, which the hub ignores.
//! - **Counts.** Each lane tree holds its own count and bytes under [`COUNTS_KEY`], with
//!   the newest key they include. Eviction, discards and the POD write update them in the
//!   same sled transaction or batch. sled writes its log buffer out at every batch
//!   (measured 8 KiB instead of 4 KiB per durable fix, and its 512 KiB buffers churned),
//!   so the frequent writes do not batch: an insert writes its event, then the counts, and
//!   after a crash between the two the events past the newest counted key are counted on
//!   open; an ack writes the counts without its events, naming the key spans it removes,
//!   then removes them one by one, and open finishes a removal a crash cut short. sled recovers a prefix of its log, so counts are
//!   never ahead of the events. `open` reads the counts and that tail instead of every
//!   event: a full scan materializes every sled leaf node, and sled 0.34 keeps pulled
//!   nodes in memory whatever `cache_capacity` says (about 16 MiB for a day of 1 Hz
//!   fixes, most of the agent's peak RSS while it drains such a day). A store without
//!   counts (written before they existed) is scanned once and given them.
//! - **Corruption.** An event whose value does not decode is removed when it is read
//!   (`next_batch`, `newest`) or found by a scan on open, and declared with a
//!   `Gap { reason: Corruption }` in the critical lane.
//!
//! # On-disk layout (one sled database in [`StoreConfig::path`])
//!
//! ```text
//! tree "meta"      { b"epoch" => epoch: u32 BE }        // the last epoch handed out
//! tree "critical"  { Key => Value, COUNTS_KEY => Counts }
//! tree "telemetry" { Key => Value, COUNTS_KEY => Counts }
//! tree "pod_blobs" { sha256 (32 bytes) => len: u64 BE }    // POD blobs until the hub's BlobAck
//! pod/{sha256 hex}                                          // their bytes, one file each
//! tree "docs"      { b"assignment" => postcard(Assignment),
//!                    b"idem/" ++ key => postcard(PodStored), // POD Idempotency-Key answers
//!                    b"stop/" ++ stop id => postcard(StopPod) }
//! Key   = epoch: u32 BE ++ seq: u64 BE  (12 bytes; iteration order = (epoch, seq) order)
//! Value = postcard(Event { time_ms, body })
//! COUNTS_KEY = [0xFF; 13]   (after every Key: a 12-byte key is less at its first byte
//!                            below 0xFF, and [0xFF; 12] would be epoch u32::MAX)
//! Counts = events: u64 BE ++ bytes: u64 BE ++ through: Key   (the lane's events, their
//!          key + value bytes, the newest key included: all zeros for none)
//!          ++ (lo: Key ++ hi: Key)*   (an ack's spans being removed, if any)
//! ```

mod blobs;
mod commit;
mod docs;

pub use blobs::{BlobFile, BlobWriter};
pub use docs::{PodStored, StopPod};

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetsync_protocol::limits::MAX_BATCH_EVENTS;
use fleetsync_protocol::{Batch, Body, BoundedVec, Event, Gap, GapReason, Lane, SeqRange};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use commit::Commits;

/// Length of a stored key: epoch u32 BE ++ seq u64 BE.
pub const KEY_LEN: usize = 12;

/// Where a lane tree keeps its [`LaneStats`] (see the module note): after every event key.
pub const COUNTS_KEY: [u8; KEY_LEN + 1] = [0xFF; KEY_LEN + 1];

/// The counts record: `s`, and the newest key they include (all zeros: none).
fn encode_counts(s: LaneStats, through: &[u8; KEY_LEN]) -> [u8; 16 + KEY_LEN] {
    let mut v = [0u8; 16 + KEY_LEN];
    v[..8].copy_from_slice(&s.events.to_be_bytes());
    v[8..16].copy_from_slice(&s.bytes.to_be_bytes());
    v[16..].copy_from_slice(through);
    v
}

/// A key range `lo..=hi` an ack is removing (see [`encode_counts_removing`]).
type Span = ([u8; KEY_LEN], [u8; KEY_LEN]);

/// The counts record of an ack: the counts after it, and the spans whose events it is
/// removing (its events are removed one by one after this record: a sled batch would
/// write sled's log buffer out per ack). `open` finishes the removal a crash cut short.
fn encode_counts_removing(s: LaneStats, through: &[u8; KEY_LEN], spans: &[Span]) -> Vec<u8> {
    let mut v = encode_counts(s, through).to_vec();
    for (lo, hi) in spans {
        v.extend_from_slice(lo);
        v.extend_from_slice(hi);
    }
    v
}

/// The spans an ack record says it was removing.
fn removing(v: &[u8]) -> Vec<Span> {
    v.get(16 + KEY_LEN..)
        .unwrap_or_default()
        .chunks_exact(2 * KEY_LEN)
        .filter_map(|c| Some((c[..KEY_LEN].try_into().ok()?, c[KEY_LEN..].try_into().ok()?)))
        .collect()
}

fn decode_counts(v: &[u8]) -> Result<(LaneStats, [u8; KEY_LEN]), StoreError> {
    let bad = || {
        StoreError::Corrupt(format!(
            "lane counts of {} bytes, expected {}",
            v.len(),
            16 + KEY_LEN
        ))
    };
    let events: [u8; 8] = v.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
    let bytes: [u8; 8] = v
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let through: [u8; KEY_LEN] = v
        .get(16..16 + KEY_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    if !(v.len() - 16 - KEY_LEN).is_multiple_of(2 * KEY_LEN) {
        return Err(bad());
    }
    Ok((
        LaneStats {
            events: u64::from_be_bytes(events),
            bytes: u64::from_be_bytes(bytes),
        },
        through,
    ))
}

fn li(lane: Lane) -> usize {
    match lane {
        Lane::Critical => 0,
        Lane::Telemetry => 1,
    }
}

/// The events of a lane tree, oldest first, without its counts record.
fn events_from(tree: &sled::Tree, after: Option<EventId>) -> sled::Iter {
    let start = match after {
        Some(id) => Bound::Excluded(encode_key(id).to_vec()),
        None => Bound::Unbounded,
    };
    tree.range::<Vec<u8>, _>((start, Bound::Excluded(COUNTS_KEY.to_vec())))
}

/// The most evicted in one round beyond what the new event needs, so a single `Gap`
/// covers many fixes instead of one gap per fix.
const MAX_EVICT_SLACK: u64 = 32 * 1024;

/// Upper bound of a stored `Gap` event (key + postcard value) used while choosing what to
/// evict; the exact size is checked before anything is written.
const GAP_EVENT_MAX: u64 = KEY_LEN as u64 + 64;

/// How long `open` retries when the previous handle's background threads still hold
/// sled's file lock (sled releases it asynchronously after the last handle is dropped).
const LOCK_RETRY: Duration = Duration::from_secs(3);

/// What sled's files take on disk per live byte of events, at most, as measured: sled is
/// log-structured, keeps superseded page versions until it cleans a segment (at 50% live),
/// and grows its file in 512 KiB segments. With 2 MiB of events in 256 KiB of logical
/// bytes it measured 0.6-0.9 MiB on disk; see the README's figures.
pub const SLED_SPACE_FACTOR: u64 = 4;

/// sled's page cache: a gateway has little memory.
const CACHE_BYTES: u64 = 1024 * 1024;

/// Where and how to keep the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The sled directory (created if missing).
    pub path: PathBuf,
    /// The bound of the store directory's bytes on disk (see the module note).
    pub quota_bytes: u64,
    /// How many times its logical bytes an event counts against `quota_bytes`: sled's
    /// share of the disk per live byte. [`SLED_SPACE_FACTOR`] for a real store; 1 makes the
    /// quota a bound of logical bytes alone (the model tests).
    pub space_factor: u64,
    /// Group-commit window: how long a commit round waits for more writers to join.
    pub commit_interval: Duration,
}

/// An event's identity on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// Boot epoch.
    pub epoch: u32,
    /// Seq within the epoch (shared by both lanes).
    pub seq: u64,
}

/// Count and logical bytes of one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Stored events.
    pub events: u64,
    /// Their keys + values in bytes.
    pub bytes: u64,
}

/// A snapshot of the store's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// The current epoch.
    pub epoch: u32,
    /// The critical lane.
    pub critical: LaneStats,
    /// The telemetry lane.
    pub telemetry: LaneStats,
    /// Logical bytes of both lanes and pending blobs.
    pub used_bytes: u64,
    /// The configured quota.
    pub quota_bytes: u64,
    /// Size of the sled directory on disk (0 if it cannot be read).
    pub disk_bytes: u64,
    /// `Gap` events written since this open (quota and corruption).
    pub gaps_declared: u64,
    /// Telemetry events evicted for quota since this open.
    pub evicted: u64,
    /// POD blobs awaiting the hub's `BlobAck` (count and bytes; part of `used_bytes`).
    pub blobs: LaneStats,
    /// Group-commit rounds (flush + fsync) since this open; writes per round is the
    /// group commit's batching.
    pub commit_rounds: u64,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed.
    #[error("store database error: {0}")]
    Sled(#[from] sled::Error),
    /// A file operation on the store's directory failed.
    #[error("store i/o error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An event could not be encoded or decoded.
    #[error("store event codec error: {0}")]
    Codec(#[from] postcard::Error),
    /// No room even after evicting all telemetry: critical events fill the quota.
    #[error(
        "store quota full: {used} of {quota} bytes used by unacknowledged events and \
         {needed} more needed; critical events are never evicted, so the event is refused \
         until the hub acknowledges some"
    )]
    QuotaFull {
        /// Logical bytes in use.
        used: u64,
        /// The quota.
        quota: u64,
        /// Bytes the refused event needs.
        needed: u64,
    },
    /// The stored data is not what this module writes.
    #[error("store corrupt: {0}")]
    Corrupt(String),
    /// The group commit (flush + fsync) failed; the event may not be durable.
    #[error("store commit failed: {0}")]
    Commit(String),
    /// The store is shutting down.
    #[error("store closed")]
    Closed,
    /// An assignment is not newer than the one in force (internal: `put_assignment`
    /// answers `false`).
    #[error("assignment not newer than the one in force")]
    NotNewer,
    /// A thread panicked while holding the store's state lock.
    #[error("store state lock poisoned by a panic")]
    Poisoned,
}

/// The durable two-lane event log. Cheap to clone; all clones share one database and one
/// committer thread. Dropping the last clone blocks for one last commit round (which also
/// makes pending ack deletions durable) and joins the thread; drop it from a blocking
/// context or accept one fsync of latency.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.core.path)
            .field("epoch", &self.inner.core.epoch)
            .field("quota_bytes", &self.inner.core.quota)
            .finish_non_exhaustive()
    }
}

/// Owns the committer thread; dropping it stops and joins the thread.
struct Inner {
    core: Arc<Core>,
    committer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.core.commits.shutdown();
        if let Some(handle) = self.committer.take()
            && handle.join().is_err()
        {
            tracing::error!("store committer thread panicked");
        }
    }
}

struct Core {
    path: PathBuf,
    db: sled::Db,
    critical: sled::Tree,
    telemetry: sled::Tree,
    /// POD blobs awaiting a hub `BlobAck`: sha256 => length; the bytes are files
    /// ([`blobs`]).
    blob_records: sled::Tree,
    /// Small documents: the assignment, POD idempotency keys, PODs per stop.
    docs: sled::Tree,
    epoch: u32,
    quota: u64,
    /// Events count this many times their bytes in the quota ([`SLED_SPACE_FACTOR`]).
    space_factor: u64,
    state: Mutex<State>,
    commits: Commits,
}

/// Everything that changes with a write; writes (append, evict, ack) hold the lock.
#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    critical: LaneStats,
    telemetry: LaneStats,
    gaps_declared: u64,
    evicted: u64,
    /// Blobs awaiting upload.
    blobs: LaneStats,
    /// Bytes of POD uploads in progress, reserved in the quota ([`BlobWriter`]).
    inflight: u64,
    /// Per lane ([`li`]): the newest key its persisted counts include.
    through: [[u8; KEY_LEN]; 2],
}

impl State {
    fn used(&self) -> u64 {
        self.critical.bytes + self.telemetry.bytes + self.blobs.bytes + self.inflight
    }

    fn lane_mut(&mut self, lane: Lane) -> &mut LaneStats {
        match lane {
            Lane::Critical => &mut self.critical,
            Lane::Telemetry => &mut self.telemetry,
        }
    }

    fn alloc_seq(&mut self) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        self.next_seq = seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("seq space of the epoch exhausted".into()))?;
        Ok(seq)
    }
}

/// The lane an event body belongs to.
pub fn lane_of(body: &Body) -> Lane {
    if body.is_critical() {
        Lane::Critical
    } else {
        Lane::Telemetry
    }
}

/// The stored key of an event.
pub fn encode_key(id: EventId) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..4].copy_from_slice(&id.epoch.to_be_bytes());
    k[4..].copy_from_slice(&id.seq.to_be_bytes());
    k
}

/// Parses a stored key.
pub fn decode_key(key: &[u8]) -> Result<EventId, StoreError> {
    let bad = || StoreError::Corrupt(format!("key of {} bytes, expected {KEY_LEN}", key.len()));
    let epoch: [u8; 4] = key
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let seq: [u8; 8] = key
        .get(4..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    Ok(EventId {
        epoch: u32::from_be_bytes(epoch),
        seq: u64::from_be_bytes(seq),
    })
}

/// Stored bytes of an event (key + postcard value), as counted against the quota.
pub fn stored_len(ev: &Event) -> Result<u64, StoreError> {
    Ok((KEY_LEN + postcard::to_stdvec(ev)?.len()) as u64)
}

/// The part of `quota` reserved for `Gap` events.
pub fn gap_reserve(quota: u64) -> u64 {
    (quota / 8).min((quota / 100).max(4096))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A gap being built from evicted or discarded events of one lane and epoch.
#[derive(Debug)]
struct GapBuilder {
    gaps: Vec<Gap>,
}

impl GapBuilder {
    fn new() -> GapBuilder {
        GapBuilder { gaps: Vec::new() }
    }

    /// Adds a dropped event (called in key order per lane).
    fn add(&mut self, lane: Lane, id: EventId, reason: GapReason) {
        if let Some(g) = self.gaps.last_mut()
            && g.lane == lane
            && g.epoch == id.epoch
            && g.reason == reason
            && g.count < u32::MAX
        {
            g.last_seq = id.seq;
            g.count += 1;
            return;
        }
        self.gaps.push(Gap {
            lane,
            epoch: id.epoch,
            first_seq: id.seq,
            last_seq: id.seq,
            count: 1,
            reason,
        });
    }

    /// The gap events, encoded.
    fn encode(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let time_ms = now_ms();
        self.gaps
            .iter()
            .map(|g| {
                let ev = Event {
                    time_ms,
                    body: Body::Gap(*g),
                };
                Ok(postcard::to_stdvec(&ev)?)
            })
            .collect()
    }
}

/// Telemetry chosen for eviction.
#[derive(Debug)]
struct Eviction {
    victims: Vec<sled::IVec>,
    freed: u64,
    gaps: Vec<Vec<u8>>,
    gap_bytes: u64,
}

/// Both lanes' counts after evicting `evicted` telemetry events of `freed` bytes and
/// declaring them in `gaps` critical events of `gap_bytes`.
fn thinned(
    st: &State,
    evicted: u64,
    freed: u64,
    gaps: usize,
    gap_bytes: u64,
) -> (LaneStats, LaneStats) {
    (
        LaneStats {
            events: st.critical.events + gaps as u64,
            bytes: st.critical.bytes + gap_bytes,
        },
        LaneStats {
            events: st.telemetry.events - evicted,
            bytes: st.telemetry.bytes - freed,
        },
    )
}

fn map_tx(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        let res = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open();
        match res {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

impl Store {
    /// Opens (or creates) the store, bumps the epoch and makes it durable before returning.
    /// Scans both lanes to rebuild the byte accounting; undecodable events are removed and
    /// declared as `Gap { reason: Corruption }`.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.path).map_err(|source| StoreError::Io {
            path: cfg.path.clone(),
            source,
        })?;
        let db = open_db(&cfg.path)?;
        let meta = db.open_tree("meta")?;
        let critical = db.open_tree("critical")?;
        let telemetry = db.open_tree("telemetry")?;
        let blob_records = db.open_tree("pod_blobs")?;
        let docs = db.open_tree("docs")?;

        let mut state = State::default();
        let (count, bytes) = blobs::open(&cfg.path, &db, &blob_records)?;
        state.blobs = LaneStats {
            events: count,
            bytes,
        };
        let mut max_epoch = match meta.get(b"epoch")? {
            None => 0,
            Some(v) => u32::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt(format!("meta epoch of {} bytes, expected 4", v.len()))
            })?),
        };
        let mut discarded = GapBuilder::new();
        let mut bad_keys: Vec<(Lane, sled::IVec, Option<u64>)> = Vec::new();
        let counted = match (critical.get(COUNTS_KEY)?, telemetry.get(COUNTS_KEY)?) {
            (Some(c), Some(t)) => {
                (state.critical, state.through[0]) = decode_counts(&c)?;
                (state.telemetry, state.through[1]) = decode_counts(&t)?;
                // An ack a crash cut short: its events are no longer counted; remove them.
                for (tree, v) in [(&critical, &c), (&telemetry, &t)] {
                    for (lo, hi) in removing(v) {
                        for item in tree.range(lo..=hi) {
                            let (k, _) = item?;
                            tree.remove(k)?;
                        }
                    }
                }
                // The newest key of each lane: its epoch may be past meta's (meta's is
                // written first, but a store may come from elsewhere).
                for tree in [&critical, &telemetry] {
                    if let Some(item) = events_from(tree, None).next_back() {
                        let (k, _) = item?;
                        if let Ok(id) = decode_key(&k) {
                            max_epoch = max_epoch.max(id.epoch);
                        }
                    }
                }
                true
            }
            _ => false,
        };
        // An insert writes its event, then the lane's counts (one sled batch would force a
        // log write per insert, measured 8 KiB instead of 4 KiB per fix): a crash between
        // the two leaves events after the counts' newest key, which are counted here.
        let mut tail = false;
        for (lane, tree) in [(Lane::Critical, &critical), (Lane::Telemetry, &telemetry)] {
            if !counted {
                break;
            }
            // (A record naming an ack's spans is rewritten below without them.)
            tail |= tree
                .get(COUNTS_KEY)?
                .is_some_and(|v| v.len() > 16 + KEY_LEN);
            let from = decode_key(&state.through[li(lane)])
                .ok()
                .filter(|id| id.epoch > 0);
            for item in events_from(tree, from) {
                let (k, v) = item?;
                let Ok(id) = decode_key(&k) else {
                    bad_keys.push((lane, k, None));
                    continue;
                };
                max_epoch = max_epoch.max(id.epoch);
                if postcard::from_bytes::<Event>(&v).is_err() {
                    discarded.add(lane, id, GapReason::Corruption);
                    bad_keys.push((lane, k, None));
                    continue;
                }
                let s = state.lane_mut(lane);
                s.events += 1;
                s.bytes += (k.len() + v.len()) as u64;
                state.through[li(lane)] = encode_key(id);
                tail = true;
            }
        }
        // Without counts (a store from before them, or a crash between writing the two
        // lanes' first ones): every event is read once, and the counts written.
        for (lane, tree) in [(Lane::Critical, &critical), (Lane::Telemetry, &telemetry)] {
            if counted {
                break;
            }
            for item in events_from(tree, None) {
                let (k, v) = item?;
                let Ok(id) = decode_key(&k) else {
                    tracing::warn!(?lane, key = ?k, "store: removing malformed key");
                    bad_keys.push((lane, k, None));
                    continue;
                };
                max_epoch = max_epoch.max(id.epoch);
                if postcard::from_bytes::<Event>(&v).is_err() {
                    tracing::error!(
                        ?lane,
                        id.epoch,
                        id.seq,
                        "store: discarding undecodable event"
                    );
                    discarded.add(lane, id, GapReason::Corruption);
                    bad_keys.push((lane, k, None));
                    continue;
                }
                let s = state.lane_mut(lane);
                s.events += 1;
                s.bytes += (k.len() + v.len()) as u64;
                state.through[li(lane)] = encode_key(id);
            }
        }

        let epoch = max_epoch
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("epoch space exhausted".into()))?;
        meta.insert(b"epoch", &epoch.to_be_bytes())?;
        db.flush()?;
        commit::sync_sled_dir(&cfg.path)?;

        let core = Arc::new(Core {
            path: cfg.path,
            db,
            critical,
            telemetry,
            blob_records,
            docs,
            epoch,
            quota: cfg.quota_bytes,
            space_factor: cfg.space_factor.max(1),
            state: Mutex::new(state),
            commits: Commits::new(),
        });
        if !bad_keys.is_empty() {
            core.discard(&bad_keys, &discarded)?;
        }
        if !counted || tail {
            core.save_counts()?;
            core.make_durable()?;
        }

        let thread_core = Arc::clone(&core);
        let interval = cfg.commit_interval;
        let committer = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                let c = &thread_core;
                let mut cache = commit::SyncCache::default();
                c.commits.run(interval, || {
                    c.db.flush()?;
                    commit::sync_sled_changes(&c.path, &mut cache)
                });
            })
            .map_err(|source| StoreError::Io {
                path: core.path.clone(),
                source,
            })?;
        tracing::info!(path = %core.path.display(), epoch, "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                core,
                committer: Some(committer),
            }),
        })
    }

    /// The epoch of this open.
    pub fn epoch(&self) -> u32 {
        self.inner.core.epoch
    }

    /// Appends an event and returns once it is durable (the commit round is shared with
    /// concurrent callers). If the future is dropped early the event stays stored.
    pub async fn append(&self, ev: Event) -> Result<EventId, StoreError> {
        let (id, ticket) = self.inner.core.write(ev)?;
        self.inner.core.commits.wait(ticket).await?;
        Ok(id)
    }

    /// Appends an event that becomes durable at the next commit round (GPS fixes).
    pub fn append_buffered(&self, ev: Event) -> Result<EventId, StoreError> {
        Ok(self.inner.core.write(ev)?.0)
    }

    /// Waits until everything appended so far is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let ticket = self.inner.core.commits.current();
        self.inner.core.commits.wait(ticket).await
    }

    /// The oldest run of consecutive seqs of one epoch in `lane` strictly after `after`
    /// (`None` = from the start): at most `max_events` (capped at a batch's limit) events and
    /// at most `max_bytes` stored bytes, but always at least one event.
    pub fn next_batch(
        &self,
        lane: Lane,
        after: Option<EventId>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Option<Batch>, StoreError> {
        let tree = self.inner.core.tree(lane);
        let max_events = max_events.clamp(1, MAX_BATCH_EVENTS);
        'read: loop {
            let mut first: Option<EventId> = None;
            let mut last_seq = 0u64;
            let mut bytes = 0usize;
            let mut events: BoundedVec<Event, MAX_BATCH_EVENTS> = BoundedVec::new();
            for item in events_from(tree, after) {
                let (k, v) = item?;
                let Ok(id) = decode_key(&k) else {
                    self.inner.core.drop_corrupt(lane, k, v.len())?;
                    continue 'read;
                };
                let len = k.len() + v.len();
                if let Some(f) = first
                    && (id.epoch != f.epoch
                        || Some(id.seq) != last_seq.checked_add(1)
                        || events.len() >= max_events
                        || bytes + len > max_bytes)
                {
                    break;
                }
                let Ok(ev) = postcard::from_bytes::<Event>(&v) else {
                    self.inner.core.drop_corrupt(lane, k, v.len())?;
                    continue 'read;
                };
                first.get_or_insert(id);
                if events.push(ev).is_err() {
                    break;
                }
                last_seq = id.seq;
                bytes += len;
            }
            return Ok(first.map(|f| Batch {
                epoch: f.epoch,
                first_seq: f.seq,
                events,
            }));
        }
    }

    /// The newest event of `lane`.
    pub fn newest(&self, lane: Lane) -> Result<Option<(EventId, Event)>, StoreError> {
        loop {
            let Some(item) = events_from(self.inner.core.tree(lane), None).next_back() else {
                return Ok(None);
            };
            let (k, v) = item?;
            match (decode_key(&k), postcard::from_bytes(&v)) {
                (Ok(id), Ok(ev)) => return Ok(Some((id, ev))),
                _ => self.inner.core.drop_corrupt(lane, k, v.len())?,
            }
        }
    }

    /// Deletes the acknowledged seqs of `epoch` from both lanes; returns how many events
    /// were removed. Idempotent; ranges with `first > last` are ignored. The deletion is
    /// made durable lazily (next commit round or drop).
    pub fn ack(&self, epoch: u32, ranges: &[SeqRange]) -> Result<u64, StoreError> {
        let core = &self.inner.core;
        let mut st = core.state()?;
        let mut removed = 0;
        for lane in [Lane::Critical, Lane::Telemetry] {
            let tree = core.tree(lane);
            // A map, so overlapping ranges count each event once.
            let mut found: BTreeMap<sled::IVec, u64> = BTreeMap::new();
            for r in ranges.iter().filter(|r| r.first <= r.last) {
                let lo = encode_key(EventId {
                    epoch,
                    seq: r.first,
                });
                let hi = encode_key(EventId { epoch, seq: r.last });
                for item in tree.range(lo..=hi) {
                    let (k, v) = item?;
                    let len = (k.len() + v.len()) as u64;
                    found.insert(k, len);
                }
            }
            if found.is_empty() {
                continue;
            }
            let s = st.lane_mut(lane);
            let after = LaneStats {
                events: s.events - found.len() as u64,
                bytes: s.bytes - found.values().sum::<u64>(),
            };
            // The counts without the acked events first, naming the spans being removed,
            // then the events one by one (see `encode_counts_removing`).
            let spans: Vec<Span> = ranges
                .iter()
                .filter(|r| r.first <= r.last)
                .map(|r| {
                    (
                        encode_key(EventId {
                            epoch,
                            seq: r.first,
                        }),
                        encode_key(EventId { epoch, seq: r.last }),
                    )
                })
                .collect();
            tree.insert(
                COUNTS_KEY,
                encode_counts_removing(after, &st.through[li(lane)], &spans),
            )?;
            for k in found.keys() {
                tree.remove(k)?;
            }
            *st.lane_mut(lane) = after;
            removed += found.len() as u64;
        }
        Ok(removed)
    }

    /// Current figures.
    pub fn stats(&self) -> StoreStats {
        let core = &self.inner.core;
        let st = core.state.lock().unwrap_or_else(PoisonError::into_inner);
        StoreStats {
            epoch: core.epoch,
            critical: st.critical,
            telemetry: st.telemetry,
            used_bytes: st.used(),
            quota_bytes: core.quota,
            disk_bytes: dir_size(&core.path),
            gaps_declared: st.gaps_declared,
            evicted: st.evicted,
            blobs: st.blobs,
            commit_rounds: core.commits.rounds(),
        }
    }
}

/// Bytes of the files in `dir` and its subdirectories (sled's `blobs/`); unreadable
/// entries count as 0.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Core {
    fn tree(&self, lane: Lane) -> &sled::Tree {
        match lane {
            Lane::Critical => &self.critical,
            Lane::Telemetry => &self.telemetry,
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Poisoned)
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        commit::sync_sled_dir(&self.path)
    }

    fn key(&self, seq: u64) -> [u8; KEY_LEN] {
        encode_key(EventId {
            epoch: self.epoch,
            seq,
        })
    }

    /// Stores `ev` (evicting telemetry if needed); returns its id and commit ticket.
    fn write(&self, ev: Event) -> Result<(EventId, u64), StoreError> {
        let lane = lane_of(&ev.body);
        let value = postcard::to_stdvec(&ev)?;
        let n = (KEY_LEN + value.len()) as u64;
        let mut st = self.state()?;
        match self.plan_room(&st, n, 0)? {
            None => {
                let seq = st.alloc_seq()?;
                let mut after = *st.lane_mut(lane);
                after.events += 1;
                after.bytes += n;
                let key = self.key(seq);
                // The event, then its lane's counts (see open: not one batch).
                let tree = self.tree(lane);
                tree.insert(key, value)?;
                tree.insert(COUNTS_KEY, &encode_counts(after, &key)[..])?;
                *st.lane_mut(lane) = after;
                st.through[li(lane)] = key;
                let ticket = self.commits.register();
                Ok((
                    EventId {
                        epoch: self.epoch,
                        seq,
                    },
                    ticket,
                ))
            }
            Some(ev_plan) => {
                let mut gap_kvs = Vec::with_capacity(ev_plan.gaps.len());
                for g in &ev_plan.gaps {
                    gap_kvs.push((self.key(st.alloc_seq()?), g.as_slice()));
                }
                let seq = st.alloc_seq()?;
                let key = self.key(seq);
                let evicted = ev_plan.victims.len() as u64;
                let (mut crit_after, mut tele_after) = thinned(
                    &st,
                    evicted,
                    ev_plan.freed,
                    gap_kvs.len(),
                    ev_plan.gap_bytes,
                );
                let s = match lane {
                    Lane::Critical => &mut crit_after,
                    Lane::Telemetry => &mut tele_after,
                };
                s.events += 1;
                s.bytes += n;
                let mut through = st.through;
                if let Some((k, _)) = gap_kvs.last() {
                    through[0] = *k;
                }
                through[li(lane)] = key;
                (&self.critical, &self.telemetry)
                    .transaction(|(crit, tele)| {
                        for (k, v) in &gap_kvs {
                            crit.insert(k, *v)?;
                        }
                        for k in &ev_plan.victims {
                            tele.remove(k)?;
                        }
                        let target = match lane {
                            Lane::Critical => crit,
                            Lane::Telemetry => tele,
                        };
                        target.insert(&key, value.as_slice())?;
                        crit.insert(&COUNTS_KEY[..], &encode_counts(crit_after, &through[0])[..])?;
                        tele.insert(&COUNTS_KEY[..], &encode_counts(tele_after, &through[1])[..])?;
                        Ok::<(), ConflictableTransactionError<StoreError>>(())
                    })
                    .map_err(map_tx)?;
                st.critical = crit_after;
                st.telemetry = tele_after;
                st.through = through;
                st.evicted += evicted;
                st.gaps_declared += gap_kvs.len() as u64;
                tracing::debug!(
                    evicted,
                    freed = ev_plan.freed,
                    gaps = gap_kvs.len(),
                    "store quota: telemetry thinned"
                );
                let ticket = self.commits.register();
                Ok((
                    EventId {
                        epoch: self.epoch,
                        seq,
                    },
                    ticket,
                ))
            }
        }
    }

    /// Makes room for `n` more bytes that are not an event (an upload's reservation):
    /// thins telemetry with its `Gap` events as an append would, in one transaction.
    fn make_room(&self, st: &mut State, n: u64) -> Result<(), StoreError> {
        let Some(plan) = self.plan_room(st, 0, n)? else {
            return Ok(());
        };
        let mut gap_kvs = Vec::with_capacity(plan.gaps.len());
        for g in &plan.gaps {
            gap_kvs.push((self.key(st.alloc_seq()?), g.as_slice()));
        }
        let evicted = plan.victims.len() as u64;
        let (crit_after, tele_after) =
            thinned(st, evicted, plan.freed, gap_kvs.len(), plan.gap_bytes);
        let mut through = st.through;
        if let Some((k, _)) = gap_kvs.last() {
            through[0] = *k;
        }
        (&self.critical, &self.telemetry)
            .transaction(|(crit, tele)| {
                for (k, v) in &gap_kvs {
                    crit.insert(k, *v)?;
                }
                for k in &plan.victims {
                    tele.remove(k)?;
                }
                crit.insert(&COUNTS_KEY[..], &encode_counts(crit_after, &through[0])[..])?;
                tele.insert(&COUNTS_KEY[..], &encode_counts(tele_after, &through[1])[..])?;
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(map_tx)?;
        st.critical = crit_after;
        st.telemetry = tele_after;
        st.through = through;
        st.evicted += evicted;
        st.gaps_declared += gap_kvs.len() as u64;
        self.commits.register();
        Ok(())
    }

    /// Decides what, if anything, to evict so an event of `n` stored bytes fits.
    /// `files` more bytes of files (blobs, uploads) may come with it; files count as they
    /// are, events at [`StoreConfig::space_factor`] times their bytes.
    fn plan_room(&self, st: &State, n: u64, files: u64) -> Result<Option<Eviction>, StoreError> {
        let file_bytes = st.blobs.bytes + st.inflight + files;
        // What events may hold, and the part of it only `Gap` events may use.
        let cap = self.quota.saturating_sub(file_bytes) / self.space_factor;
        let limit = cap - gap_reserve(cap);
        let used = st.critical.bytes + st.telemetry.bytes;
        let full = || StoreError::QuotaFull {
            used: st.used(),
            quota: self.quota,
            needed: n * self.space_factor + files,
        };
        if file_bytes > self.quota {
            return Err(full());
        }
        if used + n <= limit {
            return Ok(None);
        }
        let need = used + n - limit;
        // Only thin if it can work: all telemetry must be able to make room.
        if st.telemetry.bytes < need {
            return Err(full());
        }
        let want = need + (limit / 32).min(MAX_EVICT_SLACK);
        let mut victims = Vec::new();
        let mut freed = 0u64;
        let mut gaps = GapBuilder::new();
        for item in events_from(&self.telemetry, None) {
            let (k, v) = item?;
            let id = decode_key(&k)?;
            freed += (k.len() + v.len()) as u64;
            gaps.add(Lane::Telemetry, id, GapReason::Quota);
            victims.push(k);
            let gap_est = gaps.gaps.len() as u64 * GAP_EVENT_MAX;
            if freed >= want && used - freed + n + gap_est <= cap {
                break;
            }
        }
        let encoded = gaps.encode()?;
        let gap_bytes = encoded
            .iter()
            .map(|g| (KEY_LEN + g.len()) as u64)
            .sum::<u64>();
        if freed < need || used - freed + n + gap_bytes > cap {
            return Err(full());
        }
        Ok(Some(Eviction {
            victims,
            freed,
            gaps: encoded,
            gap_bytes,
        }))
    }

    /// Removes undecodable entries (with the bytes they were counted at, if they were:
    /// a scan on open does not count them) and declares them with `gaps`, each lane in
    /// one batch with its counts.
    fn discard(
        &self,
        bad: &[(Lane, sled::IVec, Option<u64>)],
        gaps: &GapBuilder,
    ) -> Result<(), StoreError> {
        let mut st = self.state()?;
        let encoded = gaps.encode()?;
        for lane in [Lane::Critical, Lane::Telemetry] {
            let mut batch = sled::Batch::default();
            let mut after = *st.lane_mut(lane);
            let mut touched = false;
            for (_, k, counted) in bad.iter().filter(|b| b.0 == lane) {
                batch.remove(k.clone());
                touched = true;
                if let Some(len) = counted {
                    after.events = after.events.saturating_sub(1);
                    after.bytes = after.bytes.saturating_sub(*len);
                }
            }
            if lane == Lane::Critical {
                for g in &encoded {
                    let seq = st.alloc_seq()?;
                    batch.insert(&self.key(seq)[..], g.as_slice());
                    st.through[0] = self.key(seq);
                    after.events += 1;
                    after.bytes += (KEY_LEN + g.len()) as u64;
                    st.gaps_declared += 1;
                    touched = true;
                }
            }
            if touched {
                batch.insert(
                    &COUNTS_KEY[..],
                    &encode_counts(after, &st.through[li(lane)])[..],
                );
                self.tree(lane).apply_batch(batch)?;
                *st.lane_mut(lane) = after;
            }
        }
        drop(st);
        self.make_durable()
    }

    /// Removes one event that no longer decodes (found when read), declares it.
    fn drop_corrupt(&self, lane: Lane, k: sled::IVec, value_len: usize) -> Result<(), StoreError> {
        tracing::error!(?lane, key = ?k, "store: discarding an undecodable event");
        let mut gaps = GapBuilder::new();
        if let Ok(id) = decode_key(&k) {
            gaps.add(lane, id, GapReason::Corruption);
        }
        let counted = (k.len() + value_len) as u64;
        self.discard(&[(lane, k, Some(counted))], &gaps)
    }

    /// Writes both lanes' counts as they are (after a scan on open).
    fn save_counts(&self) -> Result<(), StoreError> {
        let st = self.state()?;
        self.critical.insert(
            &COUNTS_KEY[..],
            &encode_counts(st.critical, &st.through[0])[..],
        )?;
        self.telemetry.insert(
            &COUNTS_KEY[..],
            &encode_counts(st.telemetry, &st.through[1])[..],
        )?;
        Ok(())
    }
}

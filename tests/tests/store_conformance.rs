//! One conformance suite for the hub's store: every behaviour below runs against sled
//! (a temporary directory) and against PostgreSQL (a fresh database on the server of
//! `FLEETSYNC_TEST_PG_URL`), through the same `Store` interface the hub uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use fleetsync_hub::config::StoreConfig;
use fleetsync_hub::store::{
    ChunkOutcome, Item, MAX_PARTIAL_UPLOADS, MAX_QUARANTINE, MAX_QUARANTINE_PER_DEVICE,
    MAX_QUARANTINE_RAW, Outcome, QUARANTINE_HEAD, Quarantined, Store,
};
use fleetsync_protocol::{
    Assignment, AssignmentAck, Batch, BlobChunk, Body, BoundedVec, Event, Exception, Fix, Health,
};
use sha2::Digest as _;

/// A store of each backend (PostgreSQL only when the server is configured).
enum Backend {
    Sled,
    Postgres,
}

/// Opens a fresh store of `backend`; `None` if PostgreSQL is not configured here.
async fn open(backend: Backend) -> Option<(Store, Fresh)> {
    match backend {
        Backend::Sled => {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&StoreConfig::sled(dir.path().join("hub")))
                .await
                .unwrap();
            Some((store, Fresh::Sled(dir)))
        }
        Backend::Postgres => {
            let url = fleetsync_tests::fresh_pg_db(&fleetsync_tests::pg_url()?).await;
            let store = Store::open(&StoreConfig::postgres(url.clone()))
                .await
                .unwrap();
            Some((store, Fresh::Postgres(url)))
        }
    }
}

/// What it takes to open the same store again.
enum Fresh {
    Sled(tempfile::TempDir),
    Postgres(String),
}

impl Fresh {
    async fn reopen(&self, store: Store) -> Store {
        self.reopen_with(store, |_| {}).await
    }

    /// Opens the same store again with settings changed by `f`.
    async fn reopen_with(&self, store: Store, f: impl Fn(&mut StoreConfig)) -> Store {
        let mut cfg = match self {
            Fresh::Sled(dir) => StoreConfig::sled(dir.path().join("hub")),
            Fresh::Postgres(url) => StoreConfig::postgres(url.clone()),
        };
        f(&mut cfg);
        drop(store); // sled allows one handle per process
        Store::open(&cfg).await.unwrap()
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, fresh) = super::open(super::Backend::Sled).await.unwrap();
                    super::$name(store, fresh).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some((store, fresh)) = super::open(super::Backend::Postgres).await else {
                        return;
                    };
                    super::$name(store, fresh).await;
                }
            )*
        }
    };
}

conformance!(
    dedup_returns_only_new_events,
    identity_conflict_is_counted_and_keeps_the_first,
    concurrent_redelivery_stores_each_event_once,
    written_when_ingest_returns,
    cursors_kinds_and_limits,
    device_record_merges_maxima,
    blob_assembly_and_corrupt_chunks,
    blob_uploads_are_owned_bounded_and_expire,
    quarantine_is_bounded,
    assignments_versions_and_acks,
    positions_keep_the_newest_fix,
    outbox_rows_with_their_facts,
);

const T0: u64 = 1_795_773_600_000;

fn exception(n: u64) -> Event {
    Event {
        time_ms: T0 + n * 1000,
        body: Body::Exception(Exception {
            code: fleetsync_protocol::BoundedString::try_from_str("test").unwrap(),
            text: fleetsync_protocol::BoundedString::try_from_str(format!("event-{n}").as_str())
                .unwrap(),
            stop_id: None,
        }),
    }
}

fn batch(epoch: u32, first: u64, n: u64) -> Batch {
    let events: Vec<Event> = (first..first + n).map(exception).collect();
    Batch {
        epoch,
        first_seq: first,
        events: BoundedVec::try_from_slice(&events).unwrap(),
    }
}

fn item(device: &str, b: Batch) -> Item {
    Item::Batch {
        device: device.into(),
        batch: b,
    }
}

async fn ingest_one(store: &Store, device: &str, b: Batch) -> fleetsync_hub::store::Ingested {
    match store
        .ingest(vec![item(device, b)], T0)
        .await
        .unwrap()
        .remove(0)
    {
        Outcome::Batch(r) => r,
        other => panic!("unexpected outcome {other:?}"),
    }
}

async fn all_events(store: &Store, device: &str) -> Vec<(u32, u64, Event)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.events(device, after, 100, None).await.unwrap();
        let Some((e, s, _)) = page.last() else {
            return out;
        };
        after = Some((*e, *s));
        out.extend(page.into_iter().map(|(e, s, st)| (e, s, st.event)));
    }
}

async fn dedup_returns_only_new_events(store: Store, _f: Fresh) {
    let r = ingest_one(&store, "V1", batch(1, 0, 10)).await;
    assert_eq!(r.new, (0..10).collect::<Vec<_>>());
    assert_eq!((r.duplicates, r.conflicts), (0, 0));
    let again = ingest_one(&store, "V1", batch(1, 0, 10)).await;
    assert!(again.new.is_empty(), "a redelivery yields nothing new");
    assert_eq!(again.duplicates, 10);
    let overlap = ingest_one(&store, "V1", batch(1, 5, 10)).await;
    assert_eq!(overlap.new, (10..15).collect::<Vec<_>>());
    assert_eq!(overlap.duplicates, 5);
    // The same seqs in another epoch or of another device are other events.
    assert_eq!(ingest_one(&store, "V1", batch(2, 0, 3)).await.new.len(), 3);
    assert_eq!(ingest_one(&store, "V2", batch(1, 0, 3)).await.new.len(), 3);
    // One round holding the same batch twice: new once, duplicate once.
    let out = store
        .ingest(
            vec![item("V3", batch(1, 0, 4)), item("V3", batch(1, 0, 4))],
            T0,
        )
        .await
        .unwrap();
    let news: Vec<usize> = out
        .iter()
        .map(|o| match o {
            Outcome::Batch(r) => r.new.len(),
            _ => panic!(),
        })
        .collect();
    assert_eq!(news, vec![4, 0]);
    assert_eq!(all_events(&store, "V1").await.len(), 18);
}

async fn identity_conflict_is_counted_and_keeps_the_first(store: Store, _f: Fresh) {
    ingest_one(&store, "V1", batch(1, 0, 3)).await;
    let mut other = batch(1, 1, 1);
    other.events = BoundedVec::try_from_slice(&[exception(99)]).unwrap();
    let r = ingest_one(&store, "V1", other).await;
    assert_eq!((r.new.len(), r.duplicates, r.conflicts), (0, 0, 1));
    let stored = all_events(&store, "V1").await;
    assert_eq!(stored[1].2, exception(1), "the first content stays");
}

async fn concurrent_redelivery_stores_each_event_once(store: Store, _f: Fresh) {
    // 8 writers deliver overlapping windows of the same 200 events of two devices, each
    // window several times, all at once.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut new = 0usize;
            for round in 0..6u64 {
                let first = (w * 23 + round * 31) % 180;
                let items = vec![
                    item("A", batch(1, first, 20)),
                    item("B", batch(1, first, 20)),
                ];
                for o in store.ingest(items, T0).await.unwrap() {
                    if let Outcome::Batch(r) = o {
                        new += r.new.len();
                    }
                }
            }
            new
        }));
    }
    let mut total_new = 0;
    for t in tasks {
        total_new += t.await.unwrap();
    }
    let a = all_events(&store, "A").await;
    let b = all_events(&store, "B").await;
    let distinct: HashSet<u64> = a.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(distinct.len(), a.len(), "no seq stored twice");
    assert_eq!(
        total_new,
        a.len() + b.len(),
        "each stored event reported new exactly once"
    );
}

async fn written_when_ingest_returns(store: Store, fresh: Fresh) {
    ingest_one(&store, "V1", batch(1, 0, 50)).await;
    let reopened = fresh.reopen(store).await;
    assert_eq!(all_events(&reopened, "V1").await.len(), 50);
    let rec = reopened.device("V1").await.unwrap().unwrap();
    assert_eq!(rec.last_seen_ms, T0);
}

async fn cursors_kinds_and_limits(store: Store, _f: Fresh) {
    let mut b = batch(1, 0, 10);
    let mut events: Vec<Event> = b.events.iter().cloned().collect();
    events[4] = Event {
        time_ms: T0,
        body: Body::Health(health(1)),
    };
    b.events = BoundedVec::try_from_slice(&events).unwrap();
    ingest_one(&store, "V1", b).await;
    ingest_one(&store, "V1", batch(2, 0, 5)).await;
    let page = store.events("V1", None, 4, None).await.unwrap();
    assert_eq!(
        page.iter().map(|(e, s, _)| (*e, *s)).collect::<Vec<_>>(),
        vec![(1, 0), (1, 1), (1, 2), (1, 3)]
    );
    let next = store.events("V1", Some((1, 3)), 100, None).await.unwrap();
    assert_eq!(next.len(), 11, "strictly after the cursor, across epochs");
    assert_eq!((next[6].0, next[6].1), (2, 0));
    let health_only = store.events("V1", None, 100, Some("health")).await.unwrap();
    assert_eq!(health_only.len(), 1);
    assert_eq!(health_only[0].1, 4);
    assert!(
        store
            .events("nobody", None, 10, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .events("V1", Some((2, 4)), 10, None)
            .await
            .unwrap()
            .len(),
        0
    );
}

fn health(backlog: u32) -> Health {
    Health {
        backlog_critical: backlog,
        backlog_telemetry: 0,
        disk_used_bytes: 1,
        disk_quota_bytes: 2,
        uptime_s: 3,
        version: fleetsync_protocol::BoundedString::try_from_str("1.0").unwrap(),
        link: Default::default(),
    }
}

async fn device_record_merges_maxima(store: Store, _f: Fresh) {
    let hb = |epoch: u32, seq: u64, t: u64, backlog: u32| Batch {
        epoch,
        first_seq: seq,
        events: BoundedVec::try_from_slice(&[Event {
            time_ms: t,
            body: Body::Health(health(backlog)),
        }])
        .unwrap(),
    };
    store
        .ingest(vec![item("V1", hb(3, 0, T0 + 10, 7))], T0 + 100)
        .await
        .unwrap();
    // Older health, older epoch, later recording: last_seen moves, the rest stays.
    store
        .ingest(vec![item("V1", hb(2, 0, T0, 9))], T0 + 200)
        .await
        .unwrap();
    let rec = store.device("V1").await.unwrap().unwrap();
    assert_eq!(rec.first_seen_ms, T0 + 100);
    assert_eq!(rec.last_seen_ms, T0 + 200);
    assert_eq!(rec.epoch, 3);
    assert_eq!(rec.last_health.as_ref().unwrap().1.backlog_critical, 7);
    // A duplicate of a newer health does not count again; a new newer one does.
    store
        .ingest(vec![item("V1", hb(3, 1, T0 + 20, 5))], T0 + 50)
        .await
        .unwrap();
    let rec = store.device("V1").await.unwrap().unwrap();
    assert_eq!(rec.last_seen_ms, T0 + 200, "last seen never moves back");
    assert_eq!(rec.last_health.unwrap(), (T0 + 20, health(5)));
    let ids: Vec<String> = store
        .devices()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec!["V1".to_string()]);
    assert!(store.device("V9").await.unwrap().is_none());
}

fn chunks(data: &[u8], sha: [u8; 32], size: usize) -> Vec<BlobChunk> {
    data.chunks(size)
        .enumerate()
        .map(|(i, c)| BlobChunk {
            sha256: sha,
            offset: (i * size) as u32,
            total_len: data.len() as u32,
            data: BoundedVec::try_from_slice(c).unwrap(),
        })
        .collect()
}

async fn put(store: &Store, c: BlobChunk) -> ChunkOutcome {
    put_as(store, "V1", c, T0).await
}

async fn put_as(store: &Store, device: &str, c: BlobChunk, at: u64) -> ChunkOutcome {
    let item = Item::Chunk {
        device: device.into(),
        chunk: c,
    };
    match store.ingest(vec![item], at).await.unwrap().remove(0) {
        Outcome::Chunk(c) => c,
        other => panic!("unexpected {other:?}"),
    }
}

/// Puts `chunks` as `device` in rounds of 128; the evictions they caused.
async fn put_all(store: &Store, device: &str, chunks: Vec<BlobChunk>, at: u64) -> u32 {
    let mut evicted = 0;
    for round in chunks.chunks(128) {
        let items = round
            .iter()
            .map(|c| Item::Chunk {
                device: device.into(),
                chunk: c.clone(),
            })
            .collect();
        for o in store.ingest(items, at).await.unwrap() {
            match o {
                Outcome::Chunk(ChunkOutcome::Partial { evicted: n }) => evicted += n,
                Outcome::Chunk(ChunkOutcome::Complete) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    evicted
}

/// A blob of `len` bytes made from `seed`, and its digest.
fn blob(seed: u32, len: usize) -> (Vec<u8>, [u8; 32]) {
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect();
    let sha = sha2::Sha256::digest(&data).into();
    (data, sha)
}

async fn blob_uploads_are_owned_bounded_and_expire(store: Store, fresh: Fresh) {
    const MIB: usize = 1 << 20;
    let store = fresh
        .reopen_with(store, |c| {
            c.partial_blob_budget_bytes = MIB as u64;
            c.partial_blob_ttl_s = 600;
        })
        .await;
    assert_eq!(store.partial_blob_limits().budget_bytes, MIB as u64);

    // Ownership: V2 naming V1's digest (other bytes, even another length) neither spoils
    // nor completes V1's upload.
    let (photo, sha) = blob(1, 100_000);
    let mine = chunks(&photo, sha, 16 * 1024);
    let (head, tail) = mine.split_at(3);
    assert_eq!(put_all(&store, "V1", head.to_vec(), T0).await, 0);
    let forged: Vec<BlobChunk> = chunks(&vec![0xAA; 100_000], sha, 16 * 1024);
    for c in forged {
        let out = put_as(&store, "V2", c, T0).await;
        assert!(
            matches!(
                out,
                ChunkOutcome::Partial { .. } | ChunkOutcome::DigestMismatch
            ),
            "{out:?}"
        );
    }
    let other_len = BlobChunk {
        total_len: 50_000,
        ..mine[0].clone()
    };
    put_as(&store, "V2", other_len, T0).await;
    assert!(store.blob(&sha).await.unwrap().is_none());
    put_all(&store, "V1", tail.to_vec(), T0).await;
    assert_eq!(
        store.blob(&sha).await.unwrap().unwrap(),
        photo,
        "V1's upload completed intact"
    );
    // V2's leftover upload of that digest is moot once the blob exists.
    assert_eq!(
        put_as(&store, "V2", mine[0].clone(), T0).await,
        ChunkOutcome::Complete
    );

    // Budget: V3 starts three 700 KiB uploads and sends 400 KiB of each; what it holds
    // stays within 1 MiB, the oldest uploads go first, the newest finishes.
    let uploads: Vec<(Vec<u8>, [u8; 32])> = (10..13).map(|s| blob(s, 700 * 1024)).collect();
    let mut evicted = 0;
    for (i, (data, sha)) in uploads.iter().enumerate() {
        let cs = chunks(data, *sha, 16 * 1024);
        evicted += put_all(&store, "V3", cs[..25].to_vec(), T0 + i as u64).await;
    }
    assert!(
        evicted >= 1,
        "over the budget, the oldest upload was evicted"
    );
    let r = store.sweep_partial_blobs(T0 + 10).await.unwrap();
    assert_eq!(r.expired, 0);
    assert!(r.bytes <= MIB as u64, "{r:?} within the budget");
    let (data, sha) = &uploads[2];
    let cs = chunks(data, *sha, 16 * 1024);
    put_all(&store, "V3", cs[25..].to_vec(), T0 + 20).await;
    assert_eq!(store.blob(sha).await.unwrap().as_ref(), Some(data));
    let (data, sha) = &uploads[0];
    let cs = chunks(data, *sha, 16 * 1024);
    put_all(&store, "V3", cs[25..].to_vec(), T0 + 30).await;
    assert!(
        store.blob(sha).await.unwrap().is_none(),
        "the evicted upload lost its first 400 KiB"
    );

    // Count: at most MAX_PARTIAL_UPLOADS in progress per device.
    let mut evicted = 0;
    for s in 0..MAX_PARTIAL_UPLOADS as u32 + 4 {
        let (data, sha) = blob(100 + s, 20_000);
        evicted += put_all(
            &store,
            "V4",
            chunks(&data, sha, 16 * 1024)[..1].to_vec(),
            T0 + 40,
        )
        .await;
    }
    assert_eq!(evicted, 4);

    // Expiry: nothing fed for the TTL is dropped; V5's fresh upload stays and finishes.
    let (data, sha) = blob(7, 40_000);
    let cs = chunks(&data, sha, 16 * 1024);
    let later = T0 + 600_000 + 50;
    put_all(&store, "V5", cs[..1].to_vec(), later).await;
    let r = store.sweep_partial_blobs(later + 1).await.unwrap();
    assert!(r.expired >= MAX_PARTIAL_UPLOADS as u64, "{r:?}");
    assert_eq!(r.uploads, 1, "{r:?}");
    assert_eq!(r.bytes, 16 * 1024);
    let store = fresh.reopen(store).await;
    let r = store.sweep_partial_blobs(later + 2).await.unwrap();
    assert_eq!((r.expired, r.uploads), (0, 1), "the sweep is durable");
    put_all(&store, "V5", cs[1..].to_vec(), later + 3).await;
    assert_eq!(store.blob(&sha).await.unwrap().unwrap(), data);
}

async fn blob_assembly_and_corrupt_chunks(store: Store, _f: Fresh) {
    let photo: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let sha: [u8; 32] = sha2::Sha256::digest(&photo).into();
    let mut parts = chunks(&photo, sha, 16 * 1024);
    parts.reverse(); // out of order
    let last = parts.pop().unwrap();
    for p in parts.clone() {
        assert_eq!(put(&store, p).await, ChunkOutcome::Partial { evicted: 0 });
    }
    assert!(
        store.blob(&sha).await.unwrap().is_none(),
        "not before it is whole"
    );
    assert_eq!(put(&store, last.clone()).await, ChunkOutcome::Complete);
    assert_eq!(store.blob(&sha).await.unwrap().unwrap(), photo);
    assert_eq!(
        put(&store, last).await,
        ChunkOutcome::Complete,
        "resend after completion"
    );

    // Corrupt bytes: the digest does not match, nothing is stored, and a clean upload of
    // the same blob afterwards completes.
    let sig: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let sha2_: [u8; 32] = sha2::Sha256::digest(&sig).into();
    let mut bad = chunks(&sig, sha2_, 16 * 1024);
    let mut flipped = bad[0].data.to_vec();
    flipped[10] ^= 0xff;
    bad[0].data = BoundedVec::try_from_slice(&flipped).unwrap();
    assert_eq!(
        put(&store, bad[0].clone()).await,
        ChunkOutcome::Partial { evicted: 0 }
    );
    assert_eq!(
        put(&store, bad[1].clone()).await,
        ChunkOutcome::DigestMismatch
    );
    assert!(store.blob(&sha2_).await.unwrap().is_none());
    for c in chunks(&sig, sha2_, 16 * 1024) {
        put(&store, c).await;
    }
    assert_eq!(store.blob(&sha2_).await.unwrap().unwrap(), sig);

    // Inconsistent chunks are refused as such.
    let past_end = BlobChunk {
        sha256: [9; 32],
        offset: 10,
        total_len: 12,
        data: BoundedVec::try_from_slice(&[0; 5]).unwrap(),
    };
    assert!(matches!(
        put(&store, past_end).await,
        ChunkOutcome::Invalid(_)
    ));
    let too_big = BlobChunk {
        sha256: [8; 32],
        offset: 0,
        total_len: fleetsync_hub::store::MAX_BLOB_BYTES + 1,
        data: BoundedVec::try_from_slice(&[0; 5]).unwrap(),
    };
    assert!(matches!(
        put(&store, too_big).await,
        ChunkOutcome::Invalid(_)
    ));
    // Chunks that would overlap others (misaligned, or short but not the last) are
    // refused, so one upload never holds more than its blob.
    for (offset, len) in [(1u32, 16 * 1024), (16 * 1024, 100)] {
        let c = BlobChunk {
            sha256: [7; 32],
            offset,
            total_len: 100_000,
            data: BoundedVec::try_from_slice(&vec![0; len]).unwrap(),
        };
        assert!(
            matches!(put(&store, c).await, ChunkOutcome::Invalid(_)),
            "offset {offset}, {len} bytes"
        );
    }
}

async fn quarantine_is_bounded(store: Store, _f: Fresh) {
    let q = |device: &str, n: usize, len: usize| Quarantined {
        device: device.into(),
        topic: format!("/tenants/{device}/up"),
        recorded_ms: T0 + n as u64,
        error: format!("bad frame {n}"),
        raw: (0..len).map(|i| (i % 251) as u8).collect(),
    };
    let id = store
        .quarantine(q("V0", 0, MAX_QUARANTINE_RAW + 1000))
        .await
        .unwrap();
    let got = store.quarantined(10, None).await.unwrap();
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].bytes, MAX_QUARANTINE_RAW, "raw bytes are capped");
    assert_eq!(
        got[0].head.len(),
        QUARANTINE_HEAD,
        "listings carry the head only"
    );
    let raw = store.quarantined_raw(id).await.unwrap().unwrap();
    assert_eq!(
        raw,
        q("V0", 0, MAX_QUARANTINE_RAW).raw,
        "the kept bytes, whole"
    );
    assert!(store.quarantined_raw(id + 999_999).await.unwrap().is_none());

    // One device cannot push the others out: it keeps its own newest share.
    let flood: Vec<Item> = (1..=MAX_QUARANTINE_PER_DEVICE + 50)
        .map(|n| Item::Quarantine(q("V1", n, 8)))
        .collect();
    store.ingest(flood, T0).await.unwrap();
    let all = store.quarantined(MAX_QUARANTINE, None).await.unwrap();
    let v1: Vec<_> = all.iter().filter(|e| e.device == "V1").collect();
    assert_eq!(v1.len(), MAX_QUARANTINE_PER_DEVICE, "V1 past its share");
    assert_eq!(
        v1[0].error,
        format!("bad frame {}", MAX_QUARANTINE_PER_DEVICE + 50),
        "newest kept"
    );
    assert!(
        all.iter().any(|e| e.device == "V0"),
        "another device's frame pushed out"
    );

    // The total bound, over many devices; newest first, paged with `before`.
    let items: Vec<Item> = (1..=MAX_QUARANTINE + 5)
        .map(|n| Item::Quarantine(q(&format!("D{}", n % 200), n, 8)))
        .collect();
    store.ingest(items, T0).await.unwrap();
    let all = store.quarantined(MAX_QUARANTINE * 2, None).await.unwrap();
    assert_eq!(all.len(), MAX_QUARANTINE, "oldest dropped past the bound");
    assert_eq!(
        all[0].error,
        format!("bad frame {}", MAX_QUARANTINE + 5),
        "newest first"
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let page = store.quarantined(10, Some(all[9].id)).await.unwrap();
    assert_eq!(page[0].id, all[10].id, "before is exclusive");
}

fn assignment(id: &str, version: u32) -> Assignment {
    Assignment {
        id: fleetsync_protocol::BoundedString::try_from_str(id).unwrap(),
        version,
        stops: BoundedVec::new(),
    }
}

fn ack_batch(seq: u64, id: &str, version: u32) -> Batch {
    Batch {
        epoch: 1,
        first_seq: seq,
        events: BoundedVec::try_from_slice(&[Event {
            time_ms: T0 + seq,
            body: Body::AssignmentAck(AssignmentAck {
                assignment_id: fleetsync_protocol::BoundedString::try_from_str(id).unwrap(),
                version,
            }),
        }])
        .unwrap(),
    }
}

async fn assignments_versions_and_acks(store: Store, _f: Fresh) {
    assert!(store.assignment("V1").await.unwrap().is_none());
    store
        .put_assignment("V1", &assignment("job-1", 1), T0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .put_assignment("V1", &assignment("job-1", 1), T0)
            .await
            .unwrap(),
        Err(1),
        "versions count up"
    );
    let rec = store.assignment("V1").await.unwrap().unwrap();
    assert!(!rec.acknowledged());
    // An ack of another job is not an ack of this one, nor one of a version never sent
    // (a forged acknowledgement).
    ingest_one(&store, "V1", ack_batch(0, "job-0", 1)).await;
    ingest_one(&store, "V1", ack_batch(10, "job-1", u32::MAX)).await;
    let rec = store.assignment("V1").await.unwrap().unwrap();
    assert_eq!(
        rec.acked_version, None,
        "an ack of what was never sent was recorded"
    );
    ingest_one(&store, "V1", ack_batch(1, "job-1", 1)).await;
    let rec = store.assignment("V1").await.unwrap().unwrap();
    assert!(rec.acknowledged());
    assert_eq!(rec.acked_ms, Some(T0 + 1));
    // The redelivered ack event changes nothing (it is not new).
    let again = ingest_one(&store, "V1", ack_batch(1, "job-1", 1)).await;
    assert!(again.new.is_empty());
    assert_eq!(
        store.assignment("V1").await.unwrap().unwrap().acked_ms,
        Some(T0 + 1)
    );
    // A newer version starts unacknowledged and is sent.
    store
        .put_assignment("V1", &assignment("job-1", 2), T0 + 5)
        .await
        .unwrap()
        .unwrap();
    let rec = store.assignment("V1").await.unwrap().unwrap();
    assert!(!rec.acknowledged());
    assert_eq!(
        rec.acked_version, None,
        "a new version starts unacknowledged"
    );
    assert_eq!(rec.sent_ms, T0 + 5);
    // A late ack of the old version does not acknowledge the new one; its own does.
    ingest_one(&store, "V1", ack_batch(11, "job-1", 1)).await;
    let acked = |r: Option<fleetsync_hub::store::AssignmentRecord>| r.unwrap().acknowledged();
    assert!(!acked(store.assignment("V1").await.unwrap()));
    ingest_one(&store, "V1", ack_batch(12, "job-1", 2)).await;
    assert!(acked(store.assignment("V1").await.unwrap()));
    store.mark_assignment_sent("V1", T0 + 9).await.unwrap();
    assert_eq!(
        store.assignment("V1").await.unwrap().unwrap().sent_ms,
        T0 + 9
    );
    store.mark_assignment_sent("nobody", T0).await.unwrap();
    assert!(store.assignment("nobody").await.unwrap().is_none());
}

fn fixes(first: u64, times: &[u64]) -> Batch {
    let events: Vec<Event> = times
        .iter()
        .map(|&t| Event {
            time_ms: T0 + t * 1000,
            body: Body::Position(Fix {
                lat_e7: 510_000_000 + t as i32 * 1000,
                lon_e7: 50_000_000,
                speed_cmps: Some(1000),
                heading_ddeg: None,
                hdop_d: None,
                satellites: None,
            }),
        })
        .collect();
    Batch {
        epoch: 1,
        first_seq: first,
        events: BoundedVec::try_from_slice(&events).unwrap(),
    }
}

/// The ingest round folds fixes into the device's newest position: the newest by capture
/// time whatever the order in the batch; an older backlog and a redelivery change nothing.
async fn positions_keep_the_newest_fix(store: Store, fresh: Fresh) {
    let v = |s: &str| vec![s.to_string()];
    assert!(store.positions(&v("V1")).await.unwrap().is_empty());
    // Newest first (the agent's live-first catch-up), then two older ones.
    ingest_one(&store, "V1", fixes(0, &[100, 60, 70])).await;
    let p = store
        .positions(&v("V1"))
        .await
        .unwrap()
        .remove("V1")
        .unwrap();
    assert_eq!((p.time_ms, p.seq, p.lat_e7), (T0 + 100_000, 0, 510_100_000));
    assert_eq!(p.avg_speed_cmps, Some(1000.0));
    // The backlog from before, and the first batch again: nothing moves.
    ingest_one(&store, "V1", fixes(3, &[10, 20])).await;
    ingest_one(&store, "V1", fixes(0, &[100, 60, 70])).await;
    let same = store
        .positions(&v("V1"))
        .await
        .unwrap()
        .remove("V1")
        .unwrap();
    assert_eq!(same, p);
    // A newer fix, and another device, survive a reopen.
    ingest_one(&store, "V1", fixes(5, &[160])).await;
    ingest_one(&store, "V2", fixes(0, &[5])).await;
    let store = fresh.reopen(store).await;
    let all = store
        .positions(&["V1".into(), "V2".into(), "V3".into()])
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all["V1"].time_ms, all["V1"].seq), (T0 + 160_000, 5));
    assert_eq!(all["V2"].time_ms, T0 + 5_000);
}

/// A shipment of V1 with stop C1, as the ERP API writes it (rev 1), and its DISPATCHED.
fn shipment_s1() -> (
    fleetsync_hub::shipments::ShipmentRecord,
    Vec<fleetsync_hub::shipments::Fact>,
) {
    use fleetsync_hub::shipments::{Classifier, Fact, FactType, Source, State, Upsert};
    let spec = serde_json::from_value(serde_json::json!({
        "reference": "SO-1", "customer_id": "ACME", "vehicle": "V1",
        "stops": [{"id": "C1", "kind": "delivery", "name": "Bakery",
                   "location": {"lat": 51.5, "lon": 5.0}, "radius_m": 80}]}))
    .unwrap();
    let Upsert::Write { mut record, .. } =
        fleetsync_hub::shipments::plan_upsert("S1", None, spec, T0).unwrap()
    else {
        panic!("a new shipment is a write")
    };
    let dispatched = Fact {
        id: "dispatched:V1".into(),
        kind: FactType::Dispatched,
        classifier: Classifier::Actual,
        stop_id: None,
        event_time: fleetsync_protocol::json::Time(T0),
        recorded_time: fleetsync_protocol::json::Time(T0),
        source: Source::Erp {
            credential: "SAP".into(),
            version: 1,
        },
        retracts: None,
        note: None,
    };
    record.state = State::Planned;
    (record, vec![dispatched])
}

/// Each new fact a sink hears of is one outbox row per sink, written with the fact: a
/// retried write and a redelivered event add none; the ERP's own acts make none; rows
/// keep store order and survive a reopen.
async fn outbox_rows_with_their_facts(store: Store, fresh: Fresh) {
    use fleetsync_hub::shipments::{Classifier, Fact, FactType, Source};
    let sinks = ["erp-a".to_string(), "erp-b".to_string()];
    let store = fresh
        .reopen_with(store, |c| c.outbox_sinks = sinks.to_vec())
        .await;
    let (rec, facts) = shipment_s1();
    let locs = [("C1".to_string(), rec.spec.stops[0].fence())];
    store.put_shipment(&rec, None, &facts, &locs).await.unwrap();
    // The same call again (a retry after a lost answer): no second row.
    let mut again = rec.clone();
    again.rev = 2;
    store
        .put_shipment(&again, Some(1), &facts, &[])
        .await
        .unwrap();
    for sink in &sinks {
        let rows = store.outbox_pending(sink, 100).await.unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].id, format!("{sink}/S1/dispatched:V1"));
        assert_eq!(rows[0].state, fleetsync_hub::shipments::State::Planned);
        assert_eq!(
            (rows[0].reference.as_str(), rows[0].customer_id.as_str()),
            ("SO-1", "ACME")
        );
    }
    // The vehicle arrives (a device event in an ingest round), twice.
    let arrived = Event {
        time_ms: T0 + 60_000,
        body: Body::Trip(fleetsync_protocol::Trip {
            kind: fleetsync_protocol::TripKind::Arrived,
            stop_id: Some(fleetsync_protocol::BoundedString::try_from_str("C1").unwrap()),
        }),
    };
    let b = Batch {
        epoch: 1,
        first_seq: 0,
        events: BoundedVec::try_from_slice(&[arrived]).unwrap(),
    };
    ingest_one(&store, "V1", b.clone()).await;
    ingest_one(&store, "V1", b).await;
    // The ERP cancels: its own act, no row.
    let (cur, _) = store.shipment("S1").await.unwrap().unwrap();
    let mut cancelled = cur.clone();
    cancelled.rev += 1;
    let cancel = Fact {
        id: "cancelled".into(),
        kind: FactType::Cancelled,
        classifier: Classifier::Actual,
        stop_id: None,
        event_time: fleetsync_protocol::json::Time(T0 + 120_000),
        recorded_time: fleetsync_protocol::json::Time(T0 + 120_000),
        source: Source::Erp {
            credential: "SAP".into(),
            version: 1,
        },
        retracts: None,
        note: None,
    };
    store
        .put_shipment(&cancelled, Some(cur.rev), &[cancel], &[])
        .await
        .unwrap();
    let store = fresh
        .reopen_with(store, |c| c.outbox_sinks = sinks.to_vec())
        .await;
    for sink in &sinks {
        let rows = store.outbox_pending(sink, 100).await.unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                format!("{sink}/S1/dispatched:V1"),
                format!("{sink}/S1/V1:1:0"),
            ],
            "{rows:?}"
        );
        assert!(rows[0].seq < rows[1].seq, "store order");
        assert_eq!(rows[1].fact.kind, FactType::Arrived);
        assert_eq!(
            rows[1].state,
            fleetsync_hub::shipments::State::AtDestination
        );
    }
}

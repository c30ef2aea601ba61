//! The lanes' persisted counts (store module note, "Counts"): `open` takes them instead of
//! reading every event, counts the events a crash left past them, scans a store without
//! them once and gives it them; an event that no longer decodes is found when it is
//! read, removed and declared.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use fleetsync_agent::store::{
    COUNTS_KEY, EventId, SLED_SPACE_FACTOR, Store, StoreConfig, encode_key,
};
use fleetsync_protocol::{Body, BoundedString, Event, Exception, Fix, GapReason, Lane};

fn cfg(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        quota_bytes: 64 << 20,
        space_factor: SLED_SPACE_FACTOR,
        commit_interval: Duration::ZERO,
    }
}

fn fix(i: u64) -> Event {
    Event {
        time_ms: 1_700_000_000_000 + i * 1000,
        body: Body::Position(Fix {
            lat_e7: 520_000_000 + i as i32,
            lon_e7: 45_000_000,
            speed_cmps: Some(100),
            heading_ddeg: Some(900),
            hdop_d: Some(9),
            satellites: Some(8),
        }),
    }
}

fn exception() -> Event {
    Event {
        time_ms: 1_700_000_000_500,
        body: Body::Exception(Exception {
            code: BoundedString::try_from_str("delay").unwrap(),
            text: BoundedString::try_from_str("waited at the dock").unwrap(),
            stop_id: None,
        }),
    }
}

/// A store of 10 fixes and an exception, closed; its epoch.
async fn filled(path: &Path) -> u32 {
    let store = Store::open(cfg(path)).unwrap();
    for i in 0..10 {
        store.append(fix(i)).await.unwrap();
    }
    store.append(exception()).await.unwrap();
    let epoch = store.epoch();
    drop(store);
    epoch
}

/// Runs `f` on the raw sled trees of a closed store.
fn raw(path: &Path, f: impl FnOnce(&sled::Tree, &sled::Tree)) {
    // sled releases its lock once its threads notice the last handle went.
    let db = (0..150)
        .find_map(|_| match sled::Config::new().path(path).open() {
            Ok(db) => Some(db),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                None
            }
        })
        .unwrap();
    f(
        &db.open_tree("critical").unwrap(),
        &db.open_tree("telemetry").unwrap(),
    );
    db.flush().unwrap();
}

#[tokio::test]
async fn counts_survive_reopen_and_a_store_without_them_is_scanned_once() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).await;
    let mut counts = Vec::new();
    raw(dir.path(), |crit, tele| {
        counts = vec![crit.get(COUNTS_KEY).unwrap(), tele.get(COUNTS_KEY).unwrap()];
    });
    // events 1 / 10, their key + value bytes, the newest key (seq 10 / seq 9).
    let c = counts[0].as_ref().unwrap();
    let t = counts[1].as_ref().unwrap();
    assert_eq!(u64::from_be_bytes(c[..8].try_into().unwrap()), 1);
    assert_eq!(u64::from_be_bytes(t[..8].try_into().unwrap()), 10);
    assert_eq!(u64::from_be_bytes(t[20..28].try_into().unwrap()), 9);
    assert_eq!(u64::from_be_bytes(c[20..28].try_into().unwrap()), 10);

    let s = Store::open(cfg(dir.path())).unwrap().stats();
    assert_eq!((s.critical.events, s.telemetry.events), (1, 10));
    assert_eq!(
        s.telemetry.bytes,
        u64::from_be_bytes(t[8..16].try_into().unwrap())
    );
    let (crit_bytes, tele_bytes) = (s.critical.bytes, s.telemetry.bytes);

    // A store from before the counts: open scans it, finds the same, writes them.
    raw(dir.path(), |crit, tele| {
        crit.remove(COUNTS_KEY).unwrap();
        tele.remove(COUNTS_KEY).unwrap();
    });
    let store = Store::open(cfg(dir.path())).unwrap();
    let s = store.stats();
    assert_eq!(
        (
            s.critical.events,
            s.telemetry.events,
            s.critical.bytes,
            s.telemetry.bytes
        ),
        (1, 10, crit_bytes, tele_bytes)
    );
    // Acks and appends keep the counts exact across another reopen.
    let b = store
        .next_batch(Lane::Telemetry, None, 4, usize::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(b.events.len(), 4);
    store
        .ack(
            b.epoch,
            &[fleetsync_protocol::SeqRange {
                first: b.first_seq,
                last: b.first_seq + 3,
            }],
        )
        .unwrap();
    store.append(fix(99)).await.unwrap();
    let before = store.stats();
    drop(store);
    let mut present = (false, false);
    raw(dir.path(), |crit, tele| {
        present = (
            crit.get(COUNTS_KEY).unwrap().is_some(),
            tele.get(COUNTS_KEY).unwrap().is_some(),
        );
    });
    assert_eq!(present, (true, true), "written by the scan");
    let after = Store::open(cfg(dir.path())).unwrap().stats();
    assert_eq!(
        (after.telemetry, after.critical),
        (before.telemetry, before.critical)
    );
    assert_eq!(after.telemetry.events, 7);
}

#[tokio::test]
async fn an_event_that_no_longer_decodes_is_removed_and_declared_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = filled(dir.path()).await;
    // Seq 3 (a fix) rots on the flash: same length, bytes that are no Event.
    let key = encode_key(EventId { epoch, seq: 3 });
    raw(dir.path(), |_, tele| {
        let len = tele.get(key).unwrap().unwrap().len();
        tele.insert(key, vec![0xFF; len]).unwrap();
    });
    let store = Store::open(cfg(dir.path())).unwrap();
    // Open took the counts: it has not read the events, so it has not seen the rot.
    let s = store.stats();
    assert_eq!((s.telemetry.events, s.gaps_declared), (10, 0));

    let b = store
        .next_batch(Lane::Telemetry, None, 60, usize::MAX)
        .unwrap()
        .unwrap();
    // The run stops before the hole: seqs 0..=2.
    assert_eq!((b.first_seq, b.events.len()), (0, 3));
    let s = store.stats();
    assert_eq!((s.telemetry.events, s.gaps_declared), (9, 1), "{s:?}");
    assert_eq!(s.critical.events, 2);
    let gap = store
        .newest(Lane::Critical)
        .unwrap()
        .map(|(_, ev)| ev.body)
        .unwrap();
    match gap {
        Body::Gap(g) => {
            assert_eq!(g.reason, GapReason::Corruption);
            assert_eq!((g.first_seq, g.last_seq, g.count), (3, 3, 1), "{g:?}");
        }
        other => panic!("expected the gap, got {other:?}"),
    }
    let rest = store
        .next_batch(
            Lane::Telemetry,
            Some(EventId { epoch, seq: 2 }),
            60,
            usize::MAX,
        )
        .unwrap()
        .unwrap();
    assert_eq!((rest.first_seq, rest.events.len()), (4, 6));
}

#[tokio::test]
async fn events_a_crash_left_past_the_counts_are_counted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = filled(dir.path()).await;
    let before = Store::open(cfg(dir.path())).unwrap().stats();
    // The crash between an insert's event and its counts: two more fixes, counts as they
    // were (seqs 11 and 12, after the exception's 10).
    let added: Vec<(Vec<u8>, Vec<u8>)> = (11..13)
        .map(|seq| {
            (
                encode_key(EventId { epoch, seq }).to_vec(),
                postcard::to_stdvec(&fix(seq)).unwrap(),
            )
        })
        .collect();
    raw(dir.path(), |_, tele| {
        for (k, v) in &added {
            tele.insert(k.as_slice(), v.as_slice()).unwrap();
        }
    });
    let store = Store::open(cfg(dir.path())).unwrap();
    let s = store.stats();
    let bytes: u64 = added.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    assert_eq!(s.telemetry.events, before.telemetry.events + 2);
    assert_eq!(s.telemetry.bytes, before.telemetry.bytes + bytes);
    drop(store);
    // And written back: a second open agrees without a tail.
    let again = Store::open(cfg(dir.path())).unwrap().stats();
    assert_eq!(again.telemetry, s.telemetry);
}

#[tokio::test]
async fn an_ack_a_crash_cut_short_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = filled(dir.path()).await;
    // The crash after an ack of seqs 0..=2 wrote the counts without them (naming the span
    // it removes) and before it removed them.
    raw(dir.path(), |_, tele| {
        let old = tele.get(COUNTS_KEY).unwrap().unwrap();
        let mut gone = 0u64;
        for seq in 0..3 {
            let k = encode_key(EventId { epoch, seq });
            gone += (k.len() + tele.get(k).unwrap().unwrap().len()) as u64;
        }
        let events = u64::from_be_bytes(old[..8].try_into().unwrap()) - 3;
        let bytes = u64::from_be_bytes(old[8..16].try_into().unwrap()) - gone;
        let mut v = Vec::new();
        v.extend_from_slice(&events.to_be_bytes());
        v.extend_from_slice(&bytes.to_be_bytes());
        v.extend_from_slice(&old[16..28]);
        v.extend_from_slice(&encode_key(EventId { epoch, seq: 0 }));
        v.extend_from_slice(&encode_key(EventId { epoch, seq: 2 }));
        tele.insert(COUNTS_KEY, v).unwrap();
    });
    let store = Store::open(cfg(dir.path())).unwrap();
    assert_eq!(store.stats().telemetry.events, 7);
    let b = store
        .next_batch(Lane::Telemetry, None, 60, usize::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(
        (b.first_seq, b.events.len()),
        (3, 7),
        "the acked ones are gone"
    );
    drop(store);
    let mut len = 0;
    raw(dir.path(), |_, tele| {
        len = tele.get(COUNTS_KEY).unwrap().unwrap().len();
    });
    assert_eq!(len, 28, "rewritten without the span");
}

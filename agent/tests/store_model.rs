//! Model-based tests of the agent's event store: random operation sequences (appends of
//! both lanes and varying sizes under small quotas, acks, batch draining, reopen) against
//! an in-memory model, compared after every operation.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleetsync_agent::store::{
    EventId, KEY_LEN, Store, StoreConfig, StoreError, gap_reserve, lane_of, stored_len,
};
use fleetsync_protocol::{
    Body, BoundedString, Event, Exception, Fix, Gap, GapReason, Health, Lane, LinkStats, SeqRange,
};
use proptest::prelude::*;

/// Upper bound of one stored gap event (the store's own estimate).
const GAP_EVENT_MAX: u64 = KEY_LEN as u64 + 64;

fn telemetry(n: u64, health_len: Option<usize>) -> Event {
    let body = match health_len {
        None => Body::Position(Fix {
            lat_e7: n as i32,
            lon_e7: -(n as i32),
            speed_cmps: Some(n as u16),
            heading_ddeg: None,
            hdop_d: Some(9),
            satellites: Some(7),
        }),
        Some(len) => {
            let tag = format!("h{n}");
            let version = format!("{tag}{}", "v".repeat(len.saturating_sub(tag.len())));
            Body::Health(Health {
                backlog_critical: 0,
                backlog_telemetry: n as u32,
                disk_used_bytes: n,
                disk_quota_bytes: 0,
                uptime_s: 1,
                version: BoundedString::try_from_str(&version[..version.len().min(32)]).unwrap(),
                link: LinkStats::default(),
            })
        }
    };
    Event { time_ms: n, body }
}

fn critical(n: u64, text_len: usize) -> Event {
    Event {
        time_ms: n,
        body: Body::Exception(Exception {
            code: BoundedString::try_from_str(&format!("c{n}")).unwrap(),
            text: BoundedString::try_from_str(&"x".repeat(text_len)).unwrap(),
            stop_id: None,
        }),
    }
}

fn key(id: EventId) -> (u32, u64) {
    (id.epoch, id.seq)
}

/// What the store should hold.
#[derive(Debug, Default)]
struct Model {
    events: BTreeMap<(u32, u64), Event>,
    epoch: u32,
    /// Last seq handed out in the current epoch.
    last_seq: Option<u64>,
    gaps_declared: u64,
    evicted: u64,
    quota: u64,
}

impl Model {
    fn lane(&self, lane: Lane) -> impl Iterator<Item = (&(u32, u64), &Event)> {
        self.events
            .iter()
            .filter(move |(_, e)| lane_of(&e.body) == lane)
    }

    fn lane_stats(&self, lane: Lane) -> (u64, u64) {
        self.lane(lane)
            .fold((0, 0), |(n, b), (_, e)| (n + 1, b + stored_len(e).unwrap()))
    }

    fn used(&self) -> u64 {
        self.lane_stats(Lane::Critical).1 + self.lane_stats(Lane::Telemetry).1
    }

    fn limit(&self) -> u64 {
        self.quota - gap_reserve(self.quota)
    }

    /// What `next_batch` must return.
    fn batch(
        &self,
        lane: Lane,
        after: Option<(u32, u64)>,
        max_events: usize,
        max_bytes: usize,
    ) -> Option<((u32, u64), Vec<Event>)> {
        let max_events = max_events.clamp(1, 256);
        let mut it = self
            .lane(lane)
            .filter(|(k, _)| after.is_none_or(|a| **k > a))
            .peekable();
        let (&first, ev) = it.next()?;
        let mut out = vec![ev.clone()];
        let mut bytes = stored_len(ev).unwrap() as usize;
        let mut prev = first;
        for (&k, ev) in it {
            let len = stored_len(ev).unwrap() as usize;
            if k.0 != first.0
                || k.1 != prev.1 + 1
                || out.len() >= max_events
                || bytes + len > max_bytes
            {
                break;
            }
            out.push(ev.clone());
            bytes += len;
            prev = k;
        }
        Some((first, out))
    }
}

/// Reads a whole lane through `next_batch`, checking each batch on the way.
fn dump_lane(store: &Store, lane: Lane) -> BTreeMap<(u32, u64), Event> {
    let mut out = BTreeMap::new();
    let mut after: Option<EventId> = None;
    while let Some(b) = store.next_batch(lane, after, 256, usize::MAX).unwrap() {
        assert!(!b.events.is_empty(), "empty batch");
        if let Some(a) = after {
            assert!(
                (b.epoch, b.first_seq) > (a.epoch, a.seq),
                "batch not after {a:?}"
            );
        }
        for (i, ev) in b.events.iter().enumerate() {
            assert_eq!(lane_of(&ev.body), lane, "event in the wrong lane");
            out.insert((b.epoch, b.first_seq + i as u64), ev.clone());
        }
        after = Some(EventId {
            epoch: b.epoch,
            seq: b.last_seq(),
        });
    }
    out
}

fn dump(store: &Store) -> BTreeMap<(u32, u64), Event> {
    let mut all = dump_lane(store, Lane::Critical);
    for (k, v) in dump_lane(store, Lane::Telemetry) {
        assert!(all.insert(k, v).is_none(), "{k:?} in both lanes");
    }
    all
}

fn check(store: &Store, model: &Model) {
    let stored = dump(store);
    assert_eq!(stored, model.events, "store contents differ from the model");
    let s = store.stats();
    let (ce, cb) = model.lane_stats(Lane::Critical);
    let (te, tb) = model.lane_stats(Lane::Telemetry);
    assert_eq!(
        (s.critical.events, s.critical.bytes),
        (ce, cb),
        "critical stats"
    );
    assert_eq!(
        (s.telemetry.events, s.telemetry.bytes),
        (te, tb),
        "telemetry stats"
    );
    assert_eq!(s.used_bytes, cb + tb);
    assert!(s.used_bytes <= s.quota_bytes, "over quota: {s:?}");
    assert_eq!(s.epoch, model.epoch);
    assert_eq!(s.gaps_declared, model.gaps_declared);
    assert_eq!(s.evicted, model.evicted);
    assert!(s.disk_bytes > 0);
    for lane in [Lane::Critical, Lane::Telemetry] {
        let newest = store.newest(lane).unwrap().map(|(id, ev)| (key(id), ev));
        let expect = model.lane(lane).last().map(|(k, e)| (*k, e.clone()));
        assert_eq!(newest, expect, "newest {lane:?}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Telemetry {
        health_len: Option<usize>,
        buffered: bool,
    },
    Critical {
        text_len: usize,
    },
    Ack {
        epoch_back: u32,
        ranges: Vec<(u64, u64)>,
    },
    AckOldest {
        lane: Lane,
        n: usize,
    },
    Drain {
        lane: Lane,
        max_events: usize,
        max_bytes: usize,
        from: Option<usize>,
    },
    Reopen,
}

fn lane_strategy() -> impl Strategy<Value = Lane> {
    prop_oneof![Just(Lane::Critical), Just(Lane::Telemetry)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::option::of(0usize..=32), any::<bool>())
            .prop_map(|(health_len, buffered)| Op::Telemetry { health_len, buffered }),
        3 => prop_oneof![0usize..40, 0usize..300].prop_map(|text_len| Op::Critical { text_len }),
        1 => (0u32..3, prop::collection::vec((0u64..80, 0u64..20), 1..4)).prop_map(
            |(epoch_back, r)| Op::Ack {
                epoch_back,
                ranges: r.into_iter().map(|(a, l)| (a, a + l)).collect(),
            }
        ),
        1 => (lane_strategy(), 1usize..12).prop_map(|(lane, n)| Op::AckOldest { lane, n }),
        1 => (lane_strategy(), 0usize..8, 0usize..500, prop::option::of(0usize..50)).prop_map(
            |(lane, max_events, max_bytes, from)| Op::Drain { lane, max_events, max_bytes, from }
        ),
        1 => Just(Op::Reopen),
    ]
}

fn open(dir: &std::path::Path, quota: u64) -> Store {
    Store::open(StoreConfig {
        path: dir.to_path_buf(),
        quota_bytes: quota,
        space_factor: 1,
        commit_interval: Duration::ZERO,
    })
    .unwrap()
}

fn do_append(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    model: &mut Model,
    ev: Event,
    buffered: bool,
) {
    let n = stored_len(&ev).unwrap();
    let before = model.events.clone();
    let used = model.used();
    let res = if buffered {
        store.append_buffered(ev.clone())
    } else {
        rt.block_on(store.append(ev.clone()))
    };
    let stored = dump(store);
    let id = match res {
        Err(StoreError::QuotaFull {
            used: u,
            quota,
            needed,
        }) => {
            assert_eq!((u, quota, needed), (used, model.quota, n));
            let crit = model.lane_stats(Lane::Critical).1;
            let tele_epochs: BTreeSet<u32> =
                model.lane(Lane::Telemetry).map(|(k, _)| k.0).collect();
            assert!(
                crit + n > model.limit()
                    || crit + n + tele_epochs.len() as u64 * GAP_EVENT_MAX > model.quota,
                "refused although evicting telemetry would make room: crit {crit} + {n}, limit {}",
                model.limit()
            );
            assert_eq!(stored, before, "a refused append changed the store");
            return;
        }
        Err(e) => panic!("append failed: {e}"),
        Ok(id) => id,
    };
    assert_eq!(id.epoch, model.epoch);
    assert!(
        model.last_seq.is_none_or(|s| id.seq > s),
        "seq did not increase"
    );
    assert_eq!(
        stored.get(&key(id)),
        Some(&ev),
        "appended event not stored under its id"
    );

    let removed: Vec<(u32, u64)> = before
        .keys()
        .filter(|k| !stored.contains_key(k))
        .copied()
        .collect();
    let added: Vec<(u32, u64)> = stored
        .keys()
        .filter(|k| !before.contains_key(k) && **k != key(id))
        .copied()
        .collect();
    if removed.is_empty() {
        assert!(
            added.is_empty(),
            "events appeared without eviction: {added:?}"
        );
        assert!(used + n <= model.limit(), "over the limit without eviction");
    } else {
        assert!(used + n > model.limit(), "evicted although the event fit");
        // Only telemetry, oldest first.
        for k in &removed {
            assert_eq!(
                lane_of(&before[k].body),
                Lane::Telemetry,
                "critical event {k:?} evicted"
            );
        }
        let oldest_left = stored
            .iter()
            .find(|(_, e)| lane_of(&e.body) == Lane::Telemetry)
            .map(|(k, _)| *k);
        if let Some(o) = oldest_left {
            assert!(
                removed.iter().all(|k| *k < o),
                "evicted {removed:?} but kept older {o:?}"
            );
        }
        // The gaps: fresh seqs before the event, covering exactly what was evicted.
        let mut covered = BTreeSet::new();
        for k in &added {
            assert_eq!(k.0, model.epoch);
            assert!(
                model.last_seq.is_none_or(|s| k.1 > s) && k.1 < id.seq,
                "gap seq {k:?}"
            );
            let Body::Gap(Gap {
                lane,
                epoch,
                first_seq,
                last_seq,
                count,
                reason,
            }) = stored[k].body
            else {
                panic!("non-gap event {k:?} appeared");
            };
            assert_eq!((lane, reason), (Lane::Telemetry, GapReason::Quota));
            let inside: Vec<_> = removed
                .iter()
                .filter(|r| r.0 == epoch && (first_seq..=last_seq).contains(&r.1))
                .collect();
            assert_eq!(inside.len() as u32, count, "gap count");
            assert!(
                inside.iter().any(|r| r.1 == first_seq) && inside.iter().any(|r| r.1 == last_seq)
            );
            for r in inside {
                assert!(covered.insert(*r), "{r:?} in two gaps");
            }
        }
        assert_eq!(
            covered.len(),
            removed.len(),
            "evicted events not declared by a gap"
        );
        model.gaps_declared += added.len() as u64;
        model.evicted += removed.len() as u64;
    }
    for k in &removed {
        model.events.remove(k);
    }
    for k in &added {
        model.events.insert(*k, stored[k].clone());
    }
    model.events.insert(key(id), ev);
    model.last_seq = Some(id.seq);
}

fn run(quota: u64, ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut store = open(dir.path(), quota);
    let mut model = Model {
        epoch: store.epoch(),
        quota,
        ..Model::default()
    };
    assert_eq!(model.epoch, 1);
    check(&store, &model);
    let mut counter = 0u64;
    for op in ops {
        counter += 1;
        match op {
            Op::Telemetry {
                health_len,
                buffered,
            } => {
                do_append(
                    &rt,
                    &store,
                    &mut model,
                    telemetry(counter, health_len),
                    buffered,
                );
            }
            Op::Critical { text_len } => {
                do_append(&rt, &store, &mut model, critical(counter, text_len), false);
            }
            Op::Ack { epoch_back, ranges } => {
                let epoch = model.epoch.saturating_sub(epoch_back).max(1);
                let ranges: Vec<SeqRange> = ranges
                    .iter()
                    .map(|&(first, last)| SeqRange { first, last })
                    .collect();
                let doomed: BTreeSet<(u32, u64)> = model
                    .events
                    .keys()
                    .filter(|k| {
                        k.0 == epoch && ranges.iter().any(|r| (r.first..=r.last).contains(&k.1))
                    })
                    .copied()
                    .collect();
                assert_eq!(store.ack(epoch, &ranges).unwrap(), doomed.len() as u64);
                // Idempotent.
                assert_eq!(store.ack(epoch, &ranges).unwrap(), 0);
                model.events.retain(|k, _| !doomed.contains(k));
            }
            Op::AckOldest { lane, n } => {
                let ids: Vec<(u32, u64)> = model.lane(lane).take(n).map(|(k, _)| *k).collect();
                let mut removed = 0;
                for (epoch, seq) in &ids {
                    removed += store
                        .ack(
                            *epoch,
                            &[SeqRange {
                                first: *seq,
                                last: *seq,
                            }],
                        )
                        .unwrap();
                    model.events.remove(&(*epoch, *seq));
                }
                assert_eq!(removed, ids.len() as u64);
            }
            Op::Drain {
                lane,
                max_events,
                max_bytes,
                from,
            } => {
                let mut after = from.and_then(|i| model.events.keys().nth(i).copied());
                loop {
                    let got = store
                        .next_batch(
                            lane,
                            after.map(|(epoch, seq)| EventId { epoch, seq }),
                            max_events,
                            max_bytes,
                        )
                        .unwrap();
                    let expect = model.batch(lane, after, max_events, max_bytes);
                    let got = got.map(|b| ((b.epoch, b.first_seq), b.events.to_vec()));
                    assert_eq!(
                        got, expect,
                        "next_batch({lane:?}, {after:?}, {max_events}, {max_bytes})"
                    );
                    let Some(((epoch, first), evs)) = got else {
                        break;
                    };
                    after = Some((epoch, first + evs.len() as u64 - 1));
                }
            }
            Op::Reopen => {
                drop(store);
                store = open(dir.path(), quota);
                assert_eq!(store.epoch(), model.epoch + 1, "epoch not bumped by one");
                model.epoch = store.epoch();
                model.last_seq = None;
                model.gaps_declared = 0;
                model.evicted = 0;
            }
        }
        check(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(quota in 700u64..3000, ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(quota, ops);
    }
}

#[test]
fn telemetry_is_thinned_for_critical_and_quota_full_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = open(dir.path(), 3000);
    for i in 0..200 {
        store.append_buffered(telemetry(i, None)).unwrap();
    }
    let s = store.stats();
    assert!(s.evicted > 0 && s.gaps_declared > 0, "{s:?}");
    // Critical events fill the store; telemetry makes room until there is none left.
    let mut refused = None;
    for i in 0..100 {
        match rt.block_on(store.append(critical(1000 + i, 100))) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("critical appends never hit the quota");
    assert!(matches!(e, StoreError::QuotaFull { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("quota full") && msg.contains("of 3000 bytes"),
        "{msg}"
    );
    assert_eq!(store.stats().telemetry.events, 0);
    // Fill the rest with the smallest critical events; then telemetry larger than those
    // has nothing to evict and is refused too.
    while rt.block_on(store.append(critical(2000, 0))).is_ok() {}
    let big = telemetry(5000, Some(32));
    assert!(stored_len(&big).unwrap() > stored_len(&critical(2000, 0)).unwrap());
    let before = store.stats();
    assert!(matches!(
        store.append_buffered(big),
        Err(StoreError::QuotaFull { .. })
    ));
    let after = store.stats();
    assert_eq!(
        (after.critical, after.telemetry),
        (before.critical, before.telemetry)
    );
}

#[test]
fn concurrent_appends_get_unique_ids_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(StoreConfig {
        path: dir.path().to_path_buf(),
        quota_bytes: 1 << 24,
        space_factor: 1,
        commit_interval: Duration::from_millis(5),
    })
    .unwrap();
    let ids = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..40u64 {
                    let ev = if i.is_multiple_of(2) {
                        critical(t * 1000 + i, 10)
                    } else {
                        telemetry(t * 1000 + i, None)
                    };
                    ids.push(store.append(ev).await.unwrap());
                }
                ids
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let unique: BTreeSet<_> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 320);
    drop(store);
    let store = open(dir.path(), 1 << 24);
    assert_eq!(store.epoch(), 2);
    let s = store.stats();
    assert_eq!(s.critical.events + s.telemetry.events, 320);
}

fn assignment(id: &str, version: u32) -> fleetsync_protocol::Assignment {
    fleetsync_protocol::Assignment {
        id: BoundedString::try_from_str(id).unwrap(),
        version,
        stops: Default::default(),
    }
}

fn assignment_ack(id: &str, version: u32) -> Event {
    Event {
        time_ms: u64::from(version),
        body: Body::AssignmentAck(fleetsync_protocol::AssignmentAck {
            assignment_id: BoundedString::try_from_str(id).unwrap(),
            version,
        }),
    }
}

/// An assignment and its ack are stored together; a repeated or older one leaves no
/// trace (no second ack, no hole in the seqs); both survive a reopen.
#[test]
fn assignment_and_its_ack_are_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = open(dir.path(), 1 << 20);
    rt.block_on(async {
        assert!(
            store
                .put_assignment(&assignment("j1", 2), assignment_ack("j1", 2))
                .await
                .unwrap()
        );
        // The hub resends until it sees the ack; an older one arrives late.
        assert!(
            !store
                .put_assignment(&assignment("j1", 2), assignment_ack("j1", 2))
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_assignment(&assignment("j0", 1), assignment_ack("j0", 1))
                .await
                .unwrap()
        );
        store.append(critical(9, 4)).await.unwrap();
        assert!(
            store
                .put_assignment(&assignment("j2", 3), assignment_ack("j2", 3))
                .await
                .unwrap()
        );
        // Anything but an AssignmentAck is refused.
        assert!(
            store
                .put_assignment(&assignment("j3", 4), critical(1, 1))
                .await
                .is_err()
        );
    });
    drop(store);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.assignment().unwrap().unwrap().version, 3);
    let events: Vec<((u32, u64), Event)> = dump(&store).into_iter().collect();
    let seqs: Vec<u64> = events.iter().map(|((_, s), _)| *s).collect();
    assert_eq!(
        seqs,
        vec![0, 1, 2],
        "one ack per stored assignment, seqs dense"
    );
    assert_eq!(events[0].1, assignment_ack("j1", 2));
    assert_eq!(events[2].1, assignment_ack("j2", 3));
}

//! Crash harness for the agent's event store.
//!
//! `store_survives_kill_9` re-executes this test binary as a writer child
//! (`crash_child_writer`, selected with `--exact` and marked by [`CHILD_ENV`]) that appends
//! events from several tasks and prints `OK epoch seq payload` for every `append` that
//! returned `Ok` (so the event was acknowledged as durable). The parent SIGKILLs it at a
//! random moment, reopens the store and checks the delivery contract:
//!
//! - every acknowledged event is stored exactly once, under the identity it was given;
//! - no `(epoch, seq)` is used by two different events, in any round, in either lane;
//! - the epoch goes up with every open;
//! - events the parent acked between rounds never come back.
//!
//! The kill is `Child::kill`, which is `kill(pid, SIGKILL)` on Unix (the workspace forbids
//! `unsafe`, so no direct `libc::kill`). Set `STORE_CRASH_SEED` to replay a run.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetsync_agent::store::{EventId, Store, StoreConfig};
use fleetsync_protocol::{
    Body, BoundedString, Event, Exception, Health, Lane, LinkStats, SeqRange,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Marks the child process; its value is the store directory.
const CHILD_ENV: &str = "FLEETSYNC_STORE_CRASH_CHILD";
/// The round number, so payloads stay unique across rounds.
const ROUND_ENV: &str = "FLEETSYNC_STORE_CRASH_ROUND";
const CHILD_TEST: &str = "crash_child_writer";
const ROUNDS: u64 = 8;
const WRITERS: u64 = 4;
/// A child left alive by accident stops on its own after this.
const CHILD_MAX_LIFE: Duration = Duration::from_secs(15);

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        path: dir.to_path_buf(),
        quota_bytes: 64 << 20,
        space_factor: fleetsync_agent::store::SLED_SPACE_FACTOR,
        commit_interval: Duration::from_millis(2),
    }
}

fn event(payload: &str, critical: bool) -> Event {
    let body = if critical {
        Body::Exception(Exception {
            code: BoundedString::try_from_str("crash").unwrap(),
            text: BoundedString::try_from_str(payload).unwrap(),
            stop_id: None,
        })
    } else {
        Body::Health(Health {
            backlog_critical: 0,
            backlog_telemetry: 0,
            disk_used_bytes: 0,
            disk_quota_bytes: 0,
            uptime_s: 0,
            version: BoundedString::try_from_str(payload).unwrap(),
            link: LinkStats::default(),
        })
    };
    Event { time_ms: 1, body }
}

fn payload(ev: &Event) -> String {
    match &ev.body {
        Body::Exception(e) => e.text.as_str().to_owned(),
        Body::Health(h) => h.version.as_str().to_owned(),
        other => panic!("unexpected event {other:?}"),
    }
}

/// The writer. Does nothing unless started by the parent.
#[test]
#[ignore = "started by store_survives_kill_9 as a child process"]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Store::open(config(Path::new(&dir))).unwrap();
        println!("EPOCH {}", store.epoch());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while started.elapsed() < CHILD_MAX_LIFE {
                    // Unacknowledged buffered telemetry in between: stored or not, it must
                    // never share an identity with anything else.
                    if t == 0 {
                        let p = format!("b{round}t{t}i{i}");
                        store.append_buffered(event(&p, false)).unwrap();
                    }
                    let p = format!("r{round}t{t}i{i}");
                    match store.append(event(&p, (i + t).is_multiple_of(3))).await {
                        Ok(id) => println!("OK {} {} {p}", id.epoch, id.seq),
                        Err(e) => println!("ERR {p} {e}"),
                    }
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Every stored event, read through `next_batch`: id -> payload.
fn dump(store: &Store) -> BTreeMap<(u32, u64), (Lane, String)> {
    let mut out = BTreeMap::new();
    for lane in [Lane::Critical, Lane::Telemetry] {
        let mut after: Option<EventId> = None;
        while let Some(b) = store.next_batch(lane, after, 256, usize::MAX).unwrap() {
            for (i, ev) in b.events.iter().enumerate() {
                let id = (b.epoch, b.first_seq + i as u64);
                let prev = out.insert(id, (lane, payload(ev)));
                assert!(prev.is_none(), "{id:?} stored in both lanes");
            }
            after = Some(EventId {
                epoch: b.epoch,
                seq: b.last_seq(),
            });
        }
    }
    out
}

#[test]
fn store_survives_kill_9() {
    let seed: u64 = std::env::var("STORE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("STORE_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();

    let mut max_epoch = 0u32;
    // payload -> identity the child was given for it (acknowledged appends only).
    let mut confirmed: HashMap<String, (u32, u64)> = HashMap::new();
    // Every identity ever observed in the store -> its payload.
    let mut identities: HashMap<(u32, u64), String> = HashMap::new();
    let mut acked: HashSet<String> = HashSet::new();
    let started = Instant::now();

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--include-ignored"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (opened_tx, opened) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("EPOCH") {
                    let _ = opened_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // One round in four is killed at a random moment from its start (opening the
        // store included); the others at a random moment once the store is open, so a
        // slow start on a busy machine does not leave the rounds without appends.
        if rng.random_range(0..4) != 0 {
            let _ = opened.recv_timeout(Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(10..=300)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child finished before it was killed");
        let lines = reader.join().unwrap();

        let mut child_epoch = None;
        let mut oks = 0;
        for line in &lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["EPOCH", e] => child_epoch = Some(e.parse::<u32>().unwrap()),
                ["OK", e, s, p] => {
                    let id = (e.parse::<u32>().unwrap(), s.parse::<u64>().unwrap());
                    assert_eq!(Some(id.0), child_epoch, "append in a foreign epoch: {line}");
                    assert!(
                        confirmed.insert((*p).to_owned(), id).is_none(),
                        "payload confirmed twice: {line}"
                    );
                    oks += 1;
                }
                ["ERR", ..] => panic!("append failed in the child: {line}"),
                _ => {} // libtest's own lines
            }
        }
        if let Some(e) = child_epoch {
            assert!(e > max_epoch, "child epoch {e} not above {max_epoch}");
            max_epoch = e;
        }

        let store = Store::open(config(dir.path())).unwrap();
        assert!(
            store.epoch() > max_epoch,
            "epoch {} not above {max_epoch}",
            store.epoch()
        );
        max_epoch = store.epoch();
        let stored = dump(&store);
        let stats = store.stats();
        assert_eq!(
            stats.critical.events + stats.telemetry.events,
            stored.len() as u64,
            "stats after reopen"
        );

        let mut by_payload: HashMap<&str, (u32, u64)> = HashMap::new();
        for (id, (_, p)) in &stored {
            if let Some(other) = by_payload.insert(p, *id) {
                panic!("payload {p} stored twice: {other:?} and {id:?}");
            }
            match identities.get(id) {
                Some(q) => assert_eq!(q, p, "identity {id:?} reused for a different event"),
                None => {
                    identities.insert(*id, p.clone());
                }
            }
            assert!(!acked.contains(p), "acked event {p} came back at {id:?}");
        }
        for (p, id) in &confirmed {
            if acked.contains(p) {
                continue;
            }
            assert_eq!(
                by_payload.get(p.as_str()),
                Some(id),
                "acknowledged event {p} lost or moved (round {round}, seed {seed})"
            );
        }

        // Ack a random window of one stored epoch (both lanes) before the next round.
        let epochs: Vec<u32> = {
            let mut e: Vec<u32> = stored.keys().map(|k| k.0).collect();
            e.dedup();
            e
        };
        if !epochs.is_empty() {
            let epoch = epochs[rng.random_range(0..epochs.len())];
            let seqs: Vec<u64> = stored
                .keys()
                .filter(|k| k.0 == epoch)
                .map(|k| k.1)
                .collect();
            let a = seqs[rng.random_range(0..seqs.len())];
            let b = seqs[rng.random_range(0..seqs.len())];
            let range = SeqRange {
                first: a.min(b),
                last: a.max(b),
            };
            let doomed: Vec<&String> = stored
                .range((epoch, range.first)..=(epoch, range.last))
                .map(|(_, (_, p))| p)
                .collect();
            assert_eq!(store.ack(epoch, &[range]).unwrap(), doomed.len() as u64);
            acked.extend(doomed.into_iter().cloned());
        }
        eprintln!(
            "round {round}: child epoch {child_epoch:?}, {oks} acknowledged appends, \
             {} stored after reopen, {} acked so far",
            stored.len(),
            acked.len()
        );
        drop(store);
    }
    assert!(
        confirmed.len() >= 50,
        "only {} acknowledged appends in {ROUNDS} rounds: the harness tested little",
        confirmed.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "crash harness too slow"
    );
}

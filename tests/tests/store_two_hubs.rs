//! Several hubs on one PostgreSQL database: two hub store handles (each with its own
//! connection pool, as two hub processes have), four ingest paths each, deliver the same
//! fleet's batches with overlapping redeliveries in random interleavings. Afterwards every
//! event is stored exactly once, every event was reported new by exactly one round, every
//! round that returned (the hub would have acked it) is in the database, and every
//! assignment acknowledgement delivered through either hub is recorded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use fleetsync_hub::config::StoreConfig;
use fleetsync_hub::store::{Item, Outcome, Store};
use fleetsync_protocol::{
    Assignment, AssignmentAck, Batch, Body, BoundedString, BoundedVec, Event, Fix,
};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use tokio::sync::Mutex;

const DEVICES: usize = 24;
const BATCHES_PER_DEVICE: u64 = 12;
const BATCH: u64 = 25;
const PATHS_PER_HUB: usize = 4;
const T0: u64 = 1_795_773_600_000;

fn position(device: usize, seq: u64) -> Event {
    Event {
        time_ms: T0 + seq * 1000,
        body: Body::Position(Fix {
            lat_e7: 520_000_000 + (device as i32) * 1000 + seq as i32,
            lon_e7: 49_000_000,
            speed_cmps: None,
            heading_ddeg: None,
            hdop_d: None,
            satellites: None,
        }),
    }
}

fn ack(id: &str, version: u32) -> Event {
    Event {
        time_ms: T0,
        body: Body::AssignmentAck(AssignmentAck {
            assignment_id: BoundedString::try_from_str(id).unwrap(),
            version,
        }),
    }
}

/// Batch `b` of device `d`: its seq range; the first batch of each device carries the
/// device's assignment ack as its first event.
fn batch(d: usize, b: u64) -> Batch {
    let first = b * BATCH;
    let events: Vec<Event> = (first..first + BATCH)
        .map(|s| {
            if s == 0 {
                ack(&format!("job-{d}"), 1)
            } else {
                position(d, s)
            }
        })
        .collect();
    Batch {
        epoch: 1,
        first_seq: first,
        events: BoundedVec::try_from_slice(&events).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_store_each_event_once_and_lose_no_ack() {
    let Some(server) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&server).await;
    let cfg = StoreConfig::postgres(url.clone());
    let hubs = [
        Store::open(&cfg).await.unwrap(),
        Store::open(&cfg).await.unwrap(),
    ];
    for d in 0..DEVICES {
        let a = Assignment {
            id: BoundedString::try_from_str(&format!("job-{d}")).unwrap(),
            version: 1,
            stops: BoundedVec::new(),
        };
        hubs[d % 2]
            .put_assignment(&format!("V{d}"), &a, T0)
            .await
            .unwrap()
            .unwrap();
    }

    // Every batch 1-3 times (redelivery), shuffled, then cut into rounds of 1-8 batches.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut deliveries: Vec<(usize, u64)> = Vec::new();
    for d in 0..DEVICES {
        for b in 0..BATCHES_PER_DEVICE {
            for _ in 0..rng.random_range(1..=3) {
                deliveries.push((d, b));
            }
        }
    }
    deliveries.shuffle(&mut rng);
    let mut rounds: Vec<Vec<(usize, u64)>> = Vec::new();
    while !deliveries.is_empty() {
        let n = rng.random_range(1..=8).min(deliveries.len());
        rounds.push(deliveries.drain(..n).collect());
    }
    let queue = Arc::new(Mutex::new(rounds));
    let mut paths = Vec::new();
    for path in 0..2 * PATHS_PER_HUB {
        let (store, queue) = (hubs[path % 2].clone(), queue.clone());
        paths.push(tokio::spawn(async move {
            // (events reported new, batches the hub would have acked)
            let mut new: Vec<(usize, u64)> = Vec::new();
            let mut acked: Vec<(usize, u64)> = Vec::new();
            loop {
                let Some(round) = queue.lock().await.pop() else {
                    return (new, acked);
                };
                let items = round
                    .iter()
                    .map(|&(d, b)| Item::Batch {
                        device: format!("V{d}"),
                        batch: batch(d, b),
                    })
                    .collect();
                let out = store.ingest(items, T0).await.unwrap();
                for (o, &(d, b)) in out.iter().zip(&round) {
                    let Outcome::Batch(r) = o else { panic!() };
                    assert_eq!(r.conflicts, 0);
                    new.extend(r.new.iter().map(|&s| (d, s)));
                    acked.push((d, b));
                }
            }
        }));
    }
    let mut new = Vec::new();
    let mut acked = HashSet::new();
    for p in paths {
        let (n, a) = p.await.unwrap();
        new.extend(n);
        acked.extend(a);
    }

    let total = DEVICES as u64 * BATCHES_PER_DEVICE * BATCH;
    let distinct: HashSet<(usize, u64)> = new.iter().copied().collect();
    assert_eq!(distinct.len(), new.len(), "an event reported new twice");
    assert_eq!(new.len() as u64, total, "every event reported new once");
    let rows = fleetsync_tests::pg_exec(
        &url,
        "SELECT count(*), count(DISTINCT (device, epoch, seq)) FROM events",
    )
    .await;
    let (count, distinct_rows): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    assert_eq!(count as u64, total, "every event stored");
    assert_eq!(count, distinct_rows, "no event stored twice");
    // Every acked batch is in the database, read through the other hub.
    for &(d, b) in &acked {
        let first = b * BATCH;
        let after = first.checked_sub(1).map(|s| (1, s));
        let page = hubs[(d + 1) % 2]
            .events(&format!("V{d}"), after, BATCH as usize, None)
            .await
            .unwrap();
        assert_eq!(page.len() as u64, BATCH, "acked batch V{d}/{b} missing");
        assert_eq!(page[0].1, first);
    }
    // Every assignment ack arrived through one hub or the other and is recorded once.
    for d in 0..DEVICES {
        let rec = hubs[(d + 1) % 2]
            .assignment(&format!("V{d}"))
            .await
            .unwrap()
            .unwrap();
        assert!(rec.acknowledged(), "V{d}'s ack lost");
    }
}

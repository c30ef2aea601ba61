//! The outbox's due rows on PostgreSQL with two hubs (two store handles, each with its
//! own pool, as two hub processes have): only the first row of each shipment is ever
//! handed out, oldest first; a row leased by one hub is handed to neither hub again, nor
//! is any later row of its shipment, until it is settled or its lease has passed (a hub
//! killed mid-delivery), and then under the same id; two hubs asking at once never get
//! the same row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};

use fleetsync_hub::config::StoreConfig;
use fleetsync_hub::outbox::{Delivery, OutboxRow};
use fleetsync_hub::shipments::{Fact, ShipmentRecord};
use fleetsync_hub::store::{ShipmentWrite, Store};
use serde_json::json;

const SINK: &str = "erp1";
const SHIPMENTS: usize = 40;
const ROUNDS: usize = 5;
const LEASE: u64 = 1_000_000;

fn record(i: usize, rev: u64) -> ShipmentRecord {
    serde_json::from_value(json!({
        "id": format!("S{i:03}"), "version": 1, "rev": rev, "state": "PLANNED",
        "vehicle": null, "created_ms": 1, "updated_ms": rev,
        "spec": {"reference": format!("SO-{i}"), "customer_id": "C",
                 "stops": [{"id": format!("L{i}"), "kind": "delivery", "name": "Customer",
                            "location": {"lat": 52.37, "lon": 4.89}, "radius_m": 80}]}
    }))
    .unwrap()
}

fn fact(id: String, kind: &str, classifier: &str) -> Fact {
    serde_json::from_value(json!({
        "id": id, "type": kind, "classifier": classifier, "stop_id": "L1",
        "event_time": "2026-11-30T10:00:00Z", "recorded_time": "2026-11-30T10:00:00Z",
        "source": {"kind": "erp", "credential": "test", "version": 1}
    }))
    .unwrap()
}

/// Two hubs' stores on a fresh database holding, per shipment, a DISPATCHED row and then
/// `ROUNDS - 1` estimate rows, written round by round (so a shipment's rows interleave
/// with the others' in seq order).
async fn two_hubs() -> Option<(Store, Store)> {
    let base = fleetsync_tests::pg_url()?;
    let db = fleetsync_tests::fresh_pg_db(&base).await;
    let mut sc = StoreConfig::postgres(&db);
    sc.outbox_sinks = vec![SINK.into()];
    let a = Store::open(&sc).await.unwrap();
    for i in 0..SHIPMENTS {
        let f = fact(format!("dispatched:{i}"), "DISPATCHED", "ACT");
        a.put_shipment(&record(i, 1), None, &[f], &[])
            .await
            .unwrap();
    }
    for r in 0..ROUNDS - 1 {
        let rev = r as u64 + 1;
        let writes: Vec<ShipmentWrite> = (0..SHIPMENTS)
            .map(|i| ShipmentWrite {
                rec: record(i, rev + 1),
                expected_rev: rev,
                facts: vec![fact(format!("est:{i}:{r}"), "ETA", "EST")],
            })
            .collect();
        assert!(a.put_shipments(writes).await.unwrap().iter().all(|w| *w));
    }
    let b = Store::open(&sc).await.unwrap();
    Some((a, b))
}

/// The shipment's rows in order, as written.
fn order_of(i: usize) -> Vec<String> {
    let mut v = vec![format!("{SINK}/S{i:03}/dispatched:{i}")];
    v.extend((0..ROUNDS - 1).map(|r| format!("{SINK}/S{i:03}/est:{i}:{r}")));
    v
}

fn index_of(row: &OutboxRow) -> usize {
    row.shipment_id[1..].parse().unwrap()
}

#[tokio::test]
async fn only_heads_are_due_and_a_lease_holds_the_shipment() {
    let Some((a, b)) = two_hubs().await else {
        eprintln!("FLEETSYNC_TEST_PG_URL not set: skipped");
        return;
    };
    let now = 10_000;
    // Hub A takes the oldest 15 heads: the first row of shipments 0..15.
    let got_a = a.outbox_due(SINK, now, now + LEASE, 15).await.unwrap();
    let ids: Vec<&str> = got_a.iter().map(|r| r.id.as_str()).collect();
    let want: Vec<String> = (0..15).map(|i| order_of(i)[0].clone()).collect();
    assert_eq!(ids, want);
    // Hub B gets the other heads only, never a later row of a shipment A holds.
    let got_b = b.outbox_due(SINK, now, now + LEASE, 1000).await.unwrap();
    let want: Vec<String> = (15..SHIPMENTS).map(|i| order_of(i)[0].clone()).collect();
    assert_eq!(got_b.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), want);
    // Everything is leased now.
    assert!(
        a.outbox_due(SINK, now, now + LEASE, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    // A delivers its rows: their shipments' next rows become due (to either hub).
    let done: Vec<(OutboxRow, Delivery)> = got_a.into_iter().map(|r| (r, Delivery::Done)).collect();
    a.outbox_settle(done, now).await.unwrap();
    let next = b.outbox_due(SINK, now, now + LEASE, 1000).await.unwrap();
    let want: Vec<String> = (0..15).map(|i| order_of(i)[1].clone()).collect();
    assert_eq!(next.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), want);
    // A retry due later keeps its shipment waiting, and frees it when due.
    let (first, rest) = next.split_first().unwrap();
    let retry = Delivery::Retry {
        next_ms: now + 500,
        error: "HTTP 503".into(),
    };
    b.outbox_settle(vec![(first.clone(), retry)], now)
        .await
        .unwrap();
    assert!(
        a.outbox_due(SINK, now, now + LEASE, 1000)
            .await
            .unwrap()
            .is_empty()
    );
    let again = a
        .outbox_due(SINK, now + 500, now + LEASE, 1000)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, first.id);
    assert_eq!(again[0].attempts, 1);
    // Hub B dies holding its leases (and A its lease of the retried row): after the
    // lease, hub A takes the rows over under the same ids (and still only heads).
    assert_eq!(rest.len(), 14);
    let after = now + LEASE + 1;
    let taken = a
        .outbox_due(SINK, after, after + LEASE, 1000)
        .await
        .unwrap();
    let ids: HashSet<String> = taken.iter().map(|r| r.id.clone()).collect();
    let mut want: HashSet<String> = (15..SHIPMENTS).map(|i| order_of(i)[0].clone()).collect();
    want.extend((0..15).map(|i| order_of(i)[1].clone()));
    assert_eq!(ids, want);
}

#[tokio::test]
async fn two_hubs_draining_at_once_deliver_each_row_once_in_order() {
    let Some((a, b)) = two_hubs().await else {
        eprintln!("FLEETSYNC_TEST_PG_URL not set: skipped");
        return;
    };
    // Both hubs drain concurrently in small batches; each records what it was handed,
    // in the order it was handed out, and settles it.
    async fn drain(store: Store, hub: &'static str) -> Vec<(u64, &'static str, OutboxRow)> {
        let mut seen = Vec::new();
        let mut empty = 0;
        let mut tick = 0u64;
        while empty < 20 {
            tick += 1;
            let now = 10_000 + tick;
            let due = store.outbox_due(SINK, now, now + LEASE, 7).await.unwrap();
            if due.is_empty() {
                empty += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            empty = 0;
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            for r in &due {
                seen.push((at, hub, r.clone()));
            }
            let done = due.into_iter().map(|r| (r, Delivery::Done)).collect();
            store.outbox_settle(done, now).await.unwrap();
        }
        seen
    }
    let (sa, sb) = tokio::join!(
        tokio::spawn(drain(a.clone(), "a")),
        tokio::spawn(drain(b.clone(), "b"))
    );
    let mut all = sa.unwrap();
    all.extend(sb.unwrap());
    // Each row exactly once.
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, _, r) in &all {
        *count.entry(r.id.clone()).or_default() += 1;
    }
    assert_eq!(count.len(), SHIPMENTS * ROUNDS, "rows never handed out");
    assert!(count.values().all(|n| *n == 1), "a row handed out twice");
    // Per shipment, in the order written (a row is handed out only after the one
    // before it was settled, so hand-out times follow the write order).
    all.sort_by_key(|(at, _, _)| *at);
    let mut per: HashMap<usize, Vec<String>> = HashMap::new();
    for (_, _, r) in &all {
        per.entry(index_of(r)).or_default().push(r.id.clone());
    }
    for (i, ids) in per {
        assert_eq!(ids, order_of(i), "shipment {i} out of order");
    }
    assert!(a.outbox_pending(SINK, 10).await.unwrap().is_empty());
}

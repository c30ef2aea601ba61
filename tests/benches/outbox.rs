//! Outbox throughput: 100,000 rows drained into a local fake ERP that answers at once.
//!
//! `cargo bench -p fleetsync-tests --bench outbox`:
//!
//! - baseline: the fake ERP's own rate, from a plain HTTP load client in this process
//!   (`CONCURRENCY` requests in flight, the same CloudEvent bodies and headers, each
//!   Idempotency-Key once);
//! - sled: a store filled with `ROWS` outbox rows for one ERP (`SHIPMENTS` shipments, each
//!   a DISPATCHED fact and then ETA estimates, written round by round the way the estimate
//!   task writes them), then a hub started on it with an `[[erp]]` at the fake
//!   (`rate_per_s` 10000, `burst` `BURST`); deliveries/s = rows the fake applied / time
//!   from the hub's start to the last one;
//! - PostgreSQL (when `FLEETSYNC_TEST_PG_URL` names a server): the same rows in a fresh
//!   database, drained by two hubs sharing them (leases, `FOR UPDATE SKIP LOCKED`).
//!
//! Every run checks that each row was applied exactly once (the fake applies a key once).
//! The fill is not timed. Hubs, fake ERP and load client share this machine's cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_hub::config::{ErpConfig, StoreConfig};
use fleetsync_hub::shipments::{Fact, ShipmentRecord};
use fleetsync_hub::store::{ShipmentWrite, Store};
use fleetsync_sim::fake_erp::FakeErp;
use fleetsync_tests::TestHub;
use serde_json::json;

const SHIPMENTS: usize = 2_000;
const ROWS: usize = 100_000;
const BURST: u32 = 1_000;
const CONCURRENCY: usize = 256;
const SINK: &str = "bench";

fn record(i: usize, rev: u64) -> ShipmentRecord {
    serde_json::from_value(json!({
        // On no vehicle: the hub's start-up reconciliation of assignments then adds no
        // DISPATCHED fact of its own.
        "id": format!("S{i:05}"), "version": 1, "rev": rev, "state": "PLANNED",
        "vehicle": null, "created_ms": 1, "updated_ms": rev,
        "spec": {"reference": format!("SO-{i}"), "customer_id": "BENCH",
                 "stops": [{"id": format!("L{i}"), "kind": "delivery", "name": "Customer",
                            "location": {"lat": 52.37, "lon": 4.89}, "radius_m": 80}]}
    }))
    .unwrap()
}

fn fact(id: String, kind: &str, classifier: &str) -> Fact {
    serde_json::from_value(json!({
        "id": id, "type": kind, "classifier": classifier, "stop_id": "L1",
        "event_time": "2026-11-30T10:00:00Z", "recorded_time": "2026-11-30T10:00:00Z",
        "source": {"kind": "erp", "credential": "bench", "version": 1}
    }))
    .unwrap()
}

/// Fills `store` with `ROWS` rows for [`SINK`]: per shipment a DISPATCHED fact, then
/// ETA estimates round by round (one per shipment per round).
async fn fill(store: Store) {
    let store = Arc::new(store);
    // Creation: one write per shipment, 16 at a time.
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..SHIPMENTS).step_by(16) {
                let f = fact(format!("dispatched:{i}"), "DISPATCHED", "ACT");
                store
                    .put_shipment(&record(i, 1), None, &[f], &[])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rounds = ROWS / SHIPMENTS - 1;
    for r in 0..rounds {
        let rev = r as u64 + 1;
        let writes: Vec<ShipmentWrite> = (0..SHIPMENTS)
            .map(|i| ShipmentWrite {
                rec: record(i, rev + 1),
                expected_rev: rev,
                facts: vec![fact(format!("est:{i}:{r}"), "ETA", "EST")],
            })
            .collect();
        // sled: one write; PostgreSQL: one transaction each, 16 at a time.
        let chunks: Vec<Vec<ShipmentWrite>> = writes
            .chunks(SHIPMENTS / 16)
            .map(<[ShipmentWrite]>::to_vec)
            .collect();
        let mut tasks = Vec::new();
        for c in chunks {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let ok = store.put_shipments(c).await.unwrap();
                assert!(ok.iter().all(|w| *w), "a fill write was stale");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

fn erp(base_url: String) -> ErpConfig {
    ErpConfig {
        name: SINK.into(),
        base_url,
        auth_header: None,
        auth_header_env: None,
        rate_per_s: 10_000.0,
        burst: BURST,
        timeout_ms: 10_000,
        mapping_version: None,
        max_attempts: 50,
        max_age_s: 86_400,
        backoff_ms: 100,
        backoff_cap_ms: 2_000,
        breaker_failures: 50,
        breaker_open_ms: 1_000,
        ca: None,
    }
}

/// Waits until the fake has applied `n` rows; the time it took from `t0`.
async fn drained(fake: &FakeErp, n: usize, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(600);
    loop {
        if fake.applied_count() >= n {
            return t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} applied in 600 s",
            fake.applied_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake's own rate: `n` requests from a plain client, `CONCURRENCY` in flight.
async fn baseline(fake: &FakeErp, n: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let url = format!("{}/events", fake.base_url());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let key = format!("baseline/S{i}/est:{i}");
                let body = json!({"specversion": "1.0", "id": key, "source": "fleetsync-hub",
                    "type": "com.fleetsync.shipment.eta.v1", "subject": format!("S{i}"),
                    "time": "2026-11-30T10:00:00Z", "recordedtime": "2026-11-30T10:00:00Z",
                    "sequence": i.to_string(), "correlationid": format!("est:{i}"),
                    "datacontenttype": "application/json",
                    "data": {"shipment_id": format!("S{i}"), "reference": format!("SO-{i}"),
                             "customer_id": "BENCH", "milestone": "ETA", "state": "PLANNED"}});
                let r = client
                    .post(&url)
                    .header("content-type", "application/cloudevents+json")
                    .header("idempotency-key", &key)
                    .header("x-correlation-id", format!("est:{i}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// The rows [`fill`] writes, by key.
fn filled() -> std::collections::HashSet<String> {
    let mut keys = std::collections::HashSet::new();
    for i in 0..SHIPMENTS {
        keys.insert(format!("{SINK}/S{i:05}/dispatched:{i}"));
        for r in 0..ROWS / SHIPMENTS - 1 {
            keys.insert(format!("{SINK}/S{i:05}/est:{i}:{r}"));
        }
    }
    keys
}

/// Checks the fake applied every filled row, each once, and nothing else; the requests
/// it got.
fn exactly_once(fake: &FakeErp) -> usize {
    let want = filled();
    let applied = fake.applied();
    let keys: std::collections::HashSet<String> = applied.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), applied.len(), "a key applied twice");
    let missing = want.difference(&keys).count();
    let extra: Vec<&String> = keys.difference(&want).take(3).collect();
    assert!(
        missing == 0 && extra.is_empty(),
        "{missing} rows never applied; applied beyond the fill: {extra:?}"
    );
    fake.requests().len()
}

async fn run() {
    // Baseline.
    let fake = FakeErp::start().await.unwrap();
    let raw = baseline(&fake, 20_000).await;
    println!("baseline: fake ERP, plain client, {CONCURRENCY} in flight: {raw:.0} requests/s");

    // sled.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let mut sc = StoreConfig::sled(&path);
    sc.outbox_sinks = vec![SINK.into()];
    let store = Store::open(&sc).await.unwrap();
    fill(store).await;
    let fake = FakeErp::start().await.unwrap();
    let url = fake.base_url();
    let t0 = Instant::now();
    let hub = TestHub::start_with(&[], None, |c| {
        c.store = StoreConfig::sled(&path);
        c.erp = vec![erp(url)];
    })
    .await;
    let took = drained(&fake, ROWS, t0).await;
    let requests = exactly_once(&fake);
    let n = ROWS;
    let sled = n as f64 / took.as_secs_f64();
    println!(
        "sled, one hub: {n} rows in {:.1} s: {sled:.0} deliveries/s ({:.2}x the fake's own rate; {requests} requests)",
        took.as_secs_f64(),
        sled / raw
    );
    drop(hub);

    // PostgreSQL, two hubs.
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let db = fleetsync_tests::fresh_pg_db(&base).await;
    let mut sc = StoreConfig::postgres(&db);
    sc.outbox_sinks = vec![SINK.into()];
    let store = Store::open(&sc).await.unwrap();
    let f0 = Instant::now();
    fill(store).await;
    println!(
        "(PostgreSQL fill: {:.0} s, not timed)",
        f0.elapsed().as_secs_f64()
    );
    let fake = FakeErp::start().await.unwrap();
    let url = fake.base_url();
    let t0 = Instant::now();
    let a = TestHub::start_with(&[], Some(&db), |c| c.erp = vec![erp(url.clone())]).await;
    let b = TestHub::start_with(&[], Some(&db), |c| c.erp = vec![erp(url.clone())]).await;
    let took = drained(&fake, ROWS, t0).await;
    let requests = exactly_once(&fake);
    let n = ROWS;
    let pg = n as f64 / took.as_secs_f64();
    println!(
        "PostgreSQL, two hubs: {n} rows in {:.1} s: {pg:.0} deliveries/s ({:.2}x the fake's own rate; {requests} requests)",
        took.as_secs_f64(),
        pg / raw
    );
    drop((a, b));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

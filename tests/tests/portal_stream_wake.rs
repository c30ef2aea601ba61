//! The live stream's feed reads the store when a change it shows commits, not at its next
//! poll (set a minute away here, so that only the wake-up can be in time).
//!
//! On sled, one hub: a shipment released through the ERP API and a position a device
//! sends each reach an open stream within 5 s.
//!
//! Two hubs on one PostgreSQL database: a change committed through hub A reaches a
//! stream client of hub B at once (NOTIFY at A's commit, B's LISTEN wakes B's feed):
//! - a shipment released through A's ERP API reaches B's client within 5 s;
//! - a position a device sends through A (an ingest round) reaches it within 5 s;
//! - after both hubs' listening connections are killed in the database, the next change
//!   still arrives long before the poll: the connection is made again and the feed reads
//!   what it may have missed.
//!
//! On sled, many clients connecting at once (each reads its backlog, a store read per
//! shipment) do not take a thread each: the hub's store reads run on a bounded number of
//! blocking threads (a thousand clients once grew tokio's blocking pool to 512 threads).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetsync_tests::{Http, TestHub, fix, publish_batch};
use serde_json::{Value, json};

const DEPOT: (f64, f64) = (51.5601, 5.0831);
const C1: (f64, f64) = (51.5655, 5.0831);
/// Far beyond every wait below: a change that arrives in time came through the signal.
const POLL_MS: u64 = 60_000;
/// Generous for a loaded CI machine; still far from the poll.
const IN_TIME: Duration = Duration::from_secs(5);

/// A Server-Sent Events reader: the next `(event, data)` within a time.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(http: &Http) -> Sse {
        let resp = http
            .client
            .get(format!("{}/v1/portal/stream", http.base))
            .bearer_auth(&http.token)
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The first event for which `f` holds, or None after `timeout`.
    async fn until(
        &mut self,
        timeout: Duration,
        f: impl Fn(&str, &Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() {
                    continue;
                }
                let data: Value = serde_json::from_str(&data).unwrap();
                if f(&event, &data) {
                    return Some(data);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn customer_on(writer: &TestHub, reader: &TestHub) -> (Http, Http) {
    let erp = writer.http.credential("erp", "SAP prod").await;
    let (st, c) = writer
        .http
        .post(
            "/v1/ops/credentials",
            &json!({"role": "customer", "name": "ACME portal", "customer_id": "ACME"}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    (erp, reader.http.with_token(c["token"].as_str().unwrap()))
}

fn shipment(reference: &str, vehicle: Option<&str>) -> Value {
    json!({"reference": reference, "customer_id": "ACME", "vehicle": vehicle,
        "stops": [{"id": "C1", "kind": "delivery", "name": "C1", "address": "C1 street 1",
                   "location": {"lat": C1.0, "lon": C1.1}, "radius_m": 80}]})
}

/// Releases S1 for V1 through `writer` and sends a fix of V1 through it; both must
/// reach `stream` in time.
async fn shipment_and_position(writer: &TestHub, erp: &Http, stream: &mut Sse) {
    let t = Instant::now();
    let (st, body) = erp
        .put_json("/v1/erp/shipments/S1", &shipment("SO-1", Some("V1")))
        .await;
    assert_eq!(st, 201, "{body}");
    let got = stream
        .until(IN_TIME, |e, d| e == "shipment" && d["id"] == "S1")
        .await;
    assert!(
        got.is_some(),
        "S1 did not reach the stream within {IN_TIME:?}"
    );
    println!("shipment -> stream: {:?}", t.elapsed());

    let t = Instant::now();
    let fix_ms = fleetsync_agent::now_ms();
    publish_batch(writer, "V1", 1, &[fix(DEPOT, fix_ms)]).await;
    let want = fleetsync_protocol::json::Time(fix_ms).to_rfc3339();
    let got = stream
        .until(IN_TIME, |e, d| {
            e == "position" && d["shipment_id"] == "S1" && d["vehicle"]["time"] == want.as_str()
        })
        .await;
    assert!(
        got.is_some(),
        "V1's new position did not reach the stream within {IN_TIME:?}"
    );
    println!("position -> stream: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled_a_commit_wakes_the_feed() {
    let slow_poll = |c: &mut fleetsync_hub::Config| c.portal.poll_ms = POLL_MS;
    let hub = TestHub::start_with(&["V1"], None, slow_poll).await;
    let (erp, acme) = customer_on(&hub, &hub).await;
    publish_batch(
        &hub,
        "V1",
        0,
        &[fix(DEPOT, fleetsync_agent::now_ms() - 2_000)],
    )
    .await;
    let mut stream = Sse::open(&acme).await;
    shipment_and_position(&hub, &erp, &mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_hub_reaches_the_other_hubs_stream_at_once() {
    let Some(server) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&server).await;
    let slow_poll = |c: &mut fleetsync_hub::Config| c.portal.poll_ms = POLL_MS;
    let a = TestHub::start_with(&["V1"], Some(&url), slow_poll).await;
    let b = TestHub::start_with(&[], Some(&url), slow_poll).await;
    let (erp, acme_on_b) = customer_on(&a, &b).await;
    publish_batch(
        &a,
        "V1",
        0,
        &[fix(DEPOT, fleetsync_agent::now_ms() - 2_000)],
    )
    .await;
    let mut stream = Sse::open(&acme_on_b).await;
    // Through A, to B's client.
    shipment_and_position(&a, &erp, &mut stream).await;

    // Both listening connections killed: the next change still comes long before the poll.
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let killed = db
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = 'LISTEN fleetsync_portal'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 2, "one listening connection per hub");
    let t = Instant::now();
    let (st, body) = erp
        .put_json("/v1/erp/shipments/S2", &shipment("SO-2", None))
        .await;
    assert_eq!(st, 201, "{body}");
    let got = stream
        .until(Duration::from_secs(15), |e, d| {
            e == "shipment" && d["id"] == "S2"
        })
        .await;
    assert!(
        got.is_some(),
        "after the listening connections were lost, S2 did not reach hub B's stream within 15 s (the poll is {POLL_MS} ms away)"
    );
    println!("after LISTEN lost, A -> B stream: {:?}", t.elapsed());
}

/// This process's threads now.
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_at_once_do_not_take_a_thread_each() {
    const SHIPMENTS: usize = 20;
    const CLIENTS: usize = 200;
    const OTHERS: usize = 500;
    // One customer's many screens: its rate limit is not what this is about.
    let hub = TestHub::start_with(&["V1"], None, |c| {
        c.portal.burst = 1_000;
        c.portal.rate_per_s = 1_000.0;
    })
    .await;
    let (erp, acme) = customer_on(&hub, &hub).await;
    // Other customers' shipments: a backlog read on sled goes through them too, so the
    // reads take long enough to pile up.
    for i in 0..OTHERS {
        let mut body = shipment(&format!("SO-X{i}"), None);
        body["customer_id"] = json!("OTHER");
        let (st, body) = erp
            .put_json(&format!("/v1/erp/shipments/X{i}"), &body)
            .await;
        assert_eq!(st, 201, "{body}");
    }
    // Written just now: each client's backlog (the last 5 s) holds every one of them.
    for i in 0..SHIPMENTS {
        let (st, body) = erp
            .put_json(
                &format!("/v1/erp/shipments/S{i}"),
                &shipment(&format!("SO-{i}"), None),
            )
            .await;
        assert_eq!(st, 201, "{body}");
    }
    let before = threads();
    let (stop, most) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let clients = (0..CLIENTS).map(|_| {
        let acme = acme.clone();
        tokio::spawn(async move {
            let mut stream = Sse::open(&acme).await;
            let mut got = std::collections::HashSet::new();
            while got.len() < SHIPMENTS {
                let Some(d) = stream
                    .until(Duration::from_secs(60), |e, _| e == "shipment")
                    .await
                else {
                    break;
                };
                got.insert(d["id"].as_str().unwrap().to_string());
            }
            got.len()
        })
    });
    let mut counts = Vec::new();
    for c in clients.collect::<Vec<_>>() {
        counts.push(c.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(
        counts.iter().all(|n| *n == SHIPMENTS),
        "every client gets its backlog of {SHIPMENTS} shipments: {counts:?}"
    );
    let grew = most.load(Ordering::Relaxed).saturating_sub(before);
    println!("{CLIENTS} clients connecting: threads {before} -> at most {before} + {grew}");
    assert!(
        grew < 48,
        "{CLIENTS} clients connecting at once grew the process by {grew} threads ({before} before)"
    );
}

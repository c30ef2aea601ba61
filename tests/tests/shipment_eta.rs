//! Arrival estimates and timeliness with a real hub and a real agent driven by NMEA, on
//! sled and on PostgreSQL.
//!
//! The ERP releases two shipments for V1: S1 to a customer 5.6 km north with a wide
//! window, S2 to a customer 22 km north whose window closes in 5 minutes. Before any
//! fix, and while the only fixes are 11 minutes old, both are `unknown` with no ETA.
//! Then the van drives north at 10 m/s in real time: S1 gets an ETA near
//! `fix time + distance x 1.3 / 10 m/s` and is `on_time`, with exactly one EST milestone
//! (a steady van never moves its estimate by 5 minutes); S2's estimates fall after its
//! window, so it becomes `late` (after two of them) with its ETA past the window's end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_sim::route::SimFix;
use fleetsync_tests::{Http, Stack, free_port, wait_for};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const DEPOT: (f64, f64) = (51.5601, 5.0831);
/// 0.05 degree of latitude north of the depot: 5,560 m.
const NEAR: (f64, f64) = (51.6101, 5.0831);
/// 0.2 degree north: 22,240 m.
const FAR: (f64, f64) = (51.7601, 5.0831);
const SPEED_MPS: f64 = 10.0;

fn rfc3339(ms: u64) -> String {
    fleetsync_protocol::json::Time(ms).to_rfc3339()
}

fn stop(id: &str, at: (f64, f64), window: (u64, u64)) -> Value {
    json!({"id": id, "kind": "delivery", "name": format!("stop {id}"),
           "location": {"lat": at.0, "lon": at.1}, "radius_m": 100,
           "window": {"start": rfc3339(window.0), "end": rfc3339(window.1)}})
}

/// `n` fixes a second apart from `start_ms`, north from `from` at 10 m/s.
fn north(from: (f64, f64), start_ms: u64, n: usize) -> Vec<SimFix> {
    (0..n)
        .map(|i| SimFix {
            time_ms: start_ms + i as u64 * 1000,
            lat: from.0 + (i as f64 * SPEED_MPS) / 111_195.0,
            lon: from.1,
            speed_mps: SPEED_MPS,
            heading_deg: 0.0,
        })
        .collect()
}

async fn send(sock: &mut TcpStream, fixes: &[SimFix]) {
    let text: String = fixes.iter().map(fleetsync_sim::nmea::sentences).collect();
    sock.write_all(text.as_bytes()).await.unwrap();
    sock.flush().await.unwrap();
}

async fn shipment(erp: &Http, id: &str) -> Value {
    erp.get_json(&format!("/v1/erp/shipments/{id}")).await
}

fn est_facts(s: &Value) -> Vec<Value> {
    s["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["classifier"] == "EST")
        .cloned()
        .collect()
}

fn ms(v: &Value) -> u64 {
    fleetsync_protocol::json::Time::parse(v.as_str().unwrap())
        .unwrap()
        .0
}

async fn estimates(stack: Stack) {
    let mut cfg = std::fs::read_to_string(&stack.hub_cfg).unwrap();
    cfg.push_str("[shipments]\neta_interval_s = 1\n");
    std::fs::write(&stack.hub_cfg, cfg).unwrap();
    let gps_port = free_port();
    stack.add_agent_config(&format!(
        "[gps]\nsource = \"nmea+tcp://127.0.0.1:{gps_port}\"\n"
    ));
    let gps = tokio::net::TcpListener::bind(("127.0.0.1", gps_port))
        .await
        .unwrap();
    let _hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    ops.wait_device_known("V1").await;
    let erp = ops.credential("erp", "SAP prod").await;

    let now = fleetsync_agent::now_ms();
    let s1 = json!({"reference": "SO-1", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("C1", NEAR, (now, now + 7_200_000))]});
    let s2 = json!({"reference": "SO-2", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("C2", FAR, (now, now + 300_000))]});
    assert_eq!(erp.put_json("/v1/erp/shipments/S1", &s1).await.0, 201);
    assert_eq!(erp.put_json("/v1/erp/shipments/S2", &s2).await.0, 201);
    ops.wait_assignment_acked("V1", 2).await;

    let s = shipment(&erp, "S1").await;
    assert_eq!(s["timeliness"], "unknown", "no position yet: {s}");
    assert_eq!(s["stops"][0]["eta"], Value::Null, "{s}");

    // A minute of fixes that ended 11 minutes ago: a position, but a stale one.
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(20), gps.accept())
        .await
        .expect("agent did not connect to the NMEA source")
        .unwrap();
    let old = north(DEPOT, now - 720_000, 60);
    send(&mut sock, &old).await;
    let last_old = rfc3339(old[old.len() - 1].time_ms);
    wait_for(Duration::from_secs(30), || {
        let (ops, last_old) = (ops.clone(), last_old.clone());
        async move {
            let d: Value = ops.get("/v1/ops/devices").await.ok()?.json().await.ok()?;
            (d[0]["position"]["time"] == last_old.as_str()).then_some(())
        }
    })
    .await
    .expect("the hub never had the old fixes' newest position");
    // Three estimate rounds with only that position.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in ["S1", "S2"] {
        let s = shipment(&erp, id).await;
        assert_eq!(s["timeliness"], "unknown", "stale position: {s}");
        assert_eq!(
            s["stops"][0]["eta"],
            Value::Null,
            "no estimate from a stale fix: {s}"
        );
        assert!(est_facts(&s).is_empty(), "{s}");
    }

    // Now the van drives north at 10 m/s, one fix a second, in real time.
    let start = fleetsync_agent::now_ms();
    let live = north(DEPOT, start, 40);
    let driving = tokio::spawn(async move {
        for f in live.chunks(1) {
            send(&mut sock, f).await;
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        sock
    });
    let s2 = wait_for(Duration::from_secs(30), || {
        let erp = erp.clone();
        async move {
            let s = shipment(&erp, "S2").await;
            (s["timeliness"] == "late").then_some(s)
        }
    })
    .await
    .unwrap_or_else(|| panic!("S2 never became late"));
    let _sock = driving.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let s1 = shipment(&erp, "S1").await;
    assert_eq!(s1["timeliness"], "on_time", "{s1}");
    assert_eq!(s1["stops"][0]["timeliness"], "on_time", "{s1}");
    let eta = ms(&s1["stops"][0]["eta"]);
    // From the first live fix at the depot: (5,560 m - 100 m radius) x 1.3 / 10 m/s;
    // estimates from later fixes agree with it within 5 minutes, so it stays published.
    let want = start + ((5_560.0 - 100.0) * 1.3 / SPEED_MPS * 1000.0) as u64;
    assert!(
        eta.abs_diff(want) < 60_000,
        "S1's ETA {} vs about {}: {s1}",
        rfc3339(eta),
        rfc3339(want)
    );
    let est = est_facts(&s1);
    assert_eq!(est.len(), 1, "one EST milestone while the ETA holds: {s1}");
    assert_eq!(est[0]["type"], "ETA");
    assert_eq!(est[0]["stop_id"], "C1");
    assert_eq!(est[0]["source"]["device"], "V1");
    assert_eq!(
        ms(&est[0]["event_time"]),
        eta,
        "the EST milestone is the ETA"
    );

    // S2: late, its ETA after the window's end, one EST milestone for its stop.
    assert_eq!(s2["stops"][0]["timeliness"], "late", "{s2}");
    let end = ms(&s2["stops"][0]["window"]["end"]);
    assert!(ms(&s2["stops"][0]["eta"]) > end, "{s2}");
    assert_eq!(est_facts(&s2).len(), 1, "{s2}");

    assert!(
        ops.metric("fleetsync_hub_eta_facts_total").await >= 2,
        "EST milestones counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    estimates(Stack::new(64 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let stack = Stack::new(64 << 20);
    stack.use_postgres(&fleetsync_tests::fresh_pg_db(&base).await);
    estimates(stack).await;
}

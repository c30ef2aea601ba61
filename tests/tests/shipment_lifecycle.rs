//! A shipment's whole life with a real hub and a real agent driven by NMEA, on sled and on
//! PostgreSQL: the ERP releases two shipments for V1, the hub builds V1's assignment,
//! the van leaves the depot (DEPARTED) and reaches the customer's fence (ARRIVED), the
//! driver captures a POD with a signature and a photo there (DELIVERED, then POD_CONFIRMED
//! once the photo is at the hub: billing released), and a POD for the other shipment
//! captured 2 km from its stop lands in the review queue with its evidence until an
//! operator accepts it. Every fact once per source event, the timeline by event time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use fleetsync_sim::route::{Waypoint, drive};
use fleetsync_tests::{DRIVER_TOKEN, Http, Stack, free_port, wait_for};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const DEPOT: (f64, f64) = (51.5601, 5.0831);
const CUSTOMER: (f64, f64) = (51.5655, 5.0831);
const FAR: (f64, f64) = (51.5800, 5.1100);

fn stop(id: &str, kind: &str, at: (f64, f64)) -> Value {
    json!({"id": id, "kind": kind, "name": format!("stop {id}"),
           "location": {"lat": at.0, "lon": at.1}, "radius_m": 80})
}

async fn pod(driver: &Http, stop: &str, shipment: &str, photos: usize) -> Value {
    let mut form = reqwest::multipart::Form::new()
        .text("outcome", "delivered")
        .text("recipient_name", "M. de Vries")
        .text("shipment_id", shipment.to_string())
        .part(
            "signature",
            reqwest::multipart::Part::bytes(
                [&b"\x89PNG\r\n\x1a\n"[..], shipment.as_bytes()].concat(),
            )
            .file_name("sig.png"),
        );
    for i in 0..photos {
        let mut bytes = vec![0xff, 0xd8, 0xff, 0xe0];
        bytes.extend((0..40_000u32).map(|b| (b as u8) ^ (i as u8 + 1)));
        form = form.part(
            "photo",
            reqwest::multipart::Part::bytes(bytes).file_name(format!("{i}.jpg")),
        );
    }
    let r = driver
        .client
        .post(format!("{}/v1/stops/{stop}/pod", driver.base))
        .bearer_auth(DRIVER_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

async fn wait_state(erp: &Http, id: &str, state: &str) -> Value {
    let path = format!("/v1/erp/shipments/{id}");
    wait_for(Duration::from_secs(60), || {
        let (erp, path) = (erp.clone(), path.clone());
        async move {
            let s: Value = erp.get(&path).await.ok()?.json().await.ok()?;
            (s["state"] == state).then_some(s)
        }
    })
    .await
    .unwrap_or_else(|| panic!("{id} never reached {state}"))
}

fn actual(s: &Value) -> Vec<(String, String)> {
    s["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["classifier"] == "ACT")
        .map(|m| {
            (
                m["type"].as_str().unwrap().to_string(),
                m["stop_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn lifecycle(stack: Stack) {
    let gps_port = free_port();
    let ignition = stack.dir.path().join("ignition");
    std::fs::write(&ignition, "1\n").unwrap();
    stack.add_agent_config(&format!(
        "[gps]\nsource = \"nmea+tcp://127.0.0.1:{gps_port}\"\n[ignition]\npath = \"{}\"\n",
        ignition.display()
    ));
    let gps = tokio::net::TcpListener::bind(("127.0.0.1", gps_port))
        .await
        .unwrap();
    let _hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let (ops, driver) = (stack.ops(), stack.driver());
    ops.wait_device_known("V1").await;
    let erp = ops.credential("erp", "SAP prod").await;
    let operator = ops.credential("operator", "Anna (dispatch)").await;

    let s1 = json!({"reference": "SO-1", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("DEPOT", "pickup", DEPOT), stop("C1", "delivery", CUSTOMER)],
        "pod_policy": {"signature": true, "min_photos": 1}});
    let s2 = json!({"reference": "SO-2", "customer_id": "BETA", "vehicle": "V1",
        "stops": [stop("C2", "delivery", FAR)], "pod_policy": {"signature": true, "min_photos": 0}});
    assert_eq!(erp.put_json("/v1/erp/shipments/S1", &s1).await.0, 201);
    assert_eq!(erp.put_json("/v1/erp/shipments/S2", &s2).await.0, 201);
    ops.wait_assignment_acked("V1", 2).await;

    // Depot -> customer (stand there) -> onwards.
    let wps = [
        Waypoint {
            lat: DEPOT.0,
            lon: DEPOT.1,
            dwell_s: 30,
        },
        Waypoint {
            lat: CUSTOMER.0,
            lon: CUSTOMER.1,
            dwell_s: 90,
        },
        Waypoint {
            lat: 51.5700,
            lon: 5.0831,
            dwell_s: 5,
        },
    ];
    // GPS time: the route ends about now, so the POD (stamped by the agent's clock) comes
    // after the arrival and among the van's positions.
    let n = drive(&wps, 0, 10.0, 5).len() as u64;
    let start = fleetsync_agent::now_ms() - n * 1000 - 5_000;
    let fixes = drive(&wps, start, 10.0, 5);
    let at_customer = fixes
        .iter()
        .position(|f| {
            (f.lat - CUSTOMER.0).abs() < 1e-6
                && (f.lon - CUSTOMER.1).abs() < 1e-6
                && f.speed_mps == 0.0
        })
        .unwrap()
        + 60;
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(20), gps.accept())
        .await
        .expect("agent did not connect to the NMEA source")
        .unwrap();
    let send = |from: usize, to: usize| -> Vec<u8> {
        fixes[from..to]
            .iter()
            .map(fleetsync_sim::nmea::sentences)
            .collect::<String>()
            .into_bytes()
    };
    sock.write_all(&send(0, at_customer)).await.unwrap();
    wait_for(Duration::from_secs(20), || {
        let driver = driver.clone();
        async move {
            let j: Value = driver.get("/v1/jobs/C1").await.ok()?.json().await.ok()?;
            (j["state"] == "arrived").then_some(())
        }
    })
    .await
    .expect("the van never arrived at C1");
    let s = wait_state(&erp, "S1", "AT_DESTINATION").await;
    // (The route's GPS times lie before the release, so the hub's DISPATCHED, stamped
    // at release, sorts after them: the timeline goes by event time, not by arrival.)
    let moves: Vec<(String, String)> = actual(&s)
        .into_iter()
        .filter(|(t, _)| t != "DISPATCHED")
        .collect();
    let want = [
        ("ARRIVED", "DEPOT"),
        ("DEPARTED", "DEPOT"),
        ("ARRIVED", "C1"),
    ];
    assert_eq!(
        moves,
        want.map(|(t, s)| (t.to_string(), s.to_string())),
        "{s}"
    );

    // The POD at the customer, and one for S2 while the van is 2 km from S2's stop.
    pod(&driver, "C1", "S1", 1).await;
    pod(&driver, "C2", "S2", 0).await;
    sock.write_all(&send(at_customer, fixes.len()))
        .await
        .unwrap();
    sock.flush().await.unwrap();

    let s = wait_state(&erp, "S1", "POD_CONFIRMED").await;
    assert_eq!(s["status"]["releases_billing"], true, "{s}");
    let acts: Vec<(String, String)> = actual(&s)
        .into_iter()
        .filter(|(t, stop)| t != "DISPATCHED" && !(t == "DEPARTED" && stop == "C1"))
        .collect();
    let want = [
        ("ARRIVED", "DEPOT"),
        ("DEPARTED", "DEPOT"),
        ("ARRIVED", "C1"),
        ("DELIVERED", "C1"),
        ("POD_CONFIRMED", "C1"),
    ];
    assert_eq!(
        acts,
        want.map(|(t, s)| (t.to_string(), s.to_string())),
        "{s}"
    );
    let ms = s["milestones"].as_array().unwrap();
    let ids: Vec<&str> = ms.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<HashSet<_>>().len(),
        "one fact per source: {s}"
    );
    let times: Vec<&str> = ms
        .iter()
        .map(|m| m["event_time"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "timeline by event time");
    let delivered = ms.iter().find(|m| m["type"] == "DELIVERED").unwrap();
    assert_eq!(delivered["source"]["kind"], "device");
    assert_eq!(delivered["source"]["device"], "V1");

    // S2: delivered, waiting in review with its evidence.
    let s2v = wait_state(&erp, "S2", "DELIVERED").await;
    let item = wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        async move {
            let q: Value = ops
                .get("/v1/ops/review?status=open")
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            q.as_array()?
                .iter()
                .find(|i| i["shipment_id"] == "S2")
                .cloned()
        }
    })
    .await
    .unwrap_or_else(|| panic!("S2's POD never reached review: {s2v}"));
    assert_eq!(item["kind"], "pod_outside_fence", "{item}");
    assert!(
        item["detail"].as_str().unwrap().contains("outside"),
        "{item}"
    );
    assert_eq!(erp.get_json("/v1/erp/shipments/S2").await["review"], "open");
    let stuck = ops.get_json("/v1/ops/shipments/stuck?older_than_s=0").await;
    let reasons: Vec<&str> = stuck["shipments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["shipment_id"] == "S2")
        .map(|s| s["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"waiting_in_review") && reasons.contains(&"delivered_without_pod"),
        "{stuck}"
    );
    let id = item["id"].as_str().unwrap();
    let full = ops.get_json(&format!("/v1/ops/review/{id}")).await;
    assert_eq!(full["evidence"]["event"]["kind"], "pod", "{full}");
    assert_eq!(
        full["evidence"]["blob_urls"].as_array().unwrap().len(),
        1,
        "{full}"
    );
    assert!(
        !full["evidence"]["positions"].as_array().unwrap().is_empty(),
        "{full}"
    );
    let blob = ops
        .get(full["evidence"]["blob_urls"][0].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(blob.status(), 200);

    // Accepted by an operator: POD_CONFIRMED with the operator as its source.
    let (st, p) = operator
        .post(&format!("/v1/ops/review/{id}/accept"), &json!({}))
        .await;
    assert_eq!(
        (st.as_u16(), p["field"].clone()),
        (400, json!("note")),
        "a decision needs a note"
    );
    let (st, decided) = operator
        .post(
            &format!("/v1/ops/review/{id}/accept"),
            &json!({"note": "customer confirmed by phone"}),
        )
        .await;
    assert_eq!(st, 200, "{decided}");
    assert_eq!(decided["status"], "accepted");
    let s2v = wait_state(&erp, "S2", "POD_CONFIRMED").await;
    let confirmed = s2v["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["type"] == "POD_CONFIRMED")
        .unwrap()
        .clone();
    assert_eq!(confirmed["source"]["kind"], "operator", "{s2v}");
    assert!(
        confirmed["source"]["credential"]
            .as_str()
            .unwrap()
            .starts_with("Anna (dispatch)")
    );
    assert_eq!(s2v["review"], "accepted");
    let (st, _) = operator
        .post(
            &format!("/v1/ops/review/{id}/reject"),
            &json!({"note": "too late"}),
        )
        .await;
    assert_eq!(st, 409, "decided once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    lifecycle(Stack::new(64 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let stack = Stack::new(64 << 20);
    stack.use_postgres(&fleetsync_tests::fresh_pg_db(&base).await);
    lifecycle(stack).await;
}

//! The ERP's system API with a real hub process and a real agent (`V1`), on sled and on
//! PostgreSQL: shipments released with an ERP key become the vehicle's assignment (one
//! stop per ERP location, carrying every shipment that goes there), versions and 409s
//! follow the rules, errors name the field, lists page with a cursor, and cancel and
//! close take the shipment's stops off the vehicle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleetsync_tests::{Http, Stack};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn stop(id: &str, kind: &str, lat: f64, lon: f64, start: &str, end: &str) -> Value {
    json!({"id": id, "kind": kind, "name": format!("stop {id}"), "address": "Main St 1",
           "location": {"lat": lat, "lon": lon}, "radius_m": 150,
           "window": {"start": start, "end": end}})
}

fn shipment(customer: &str, vehicle: Option<&str>, stops: Vec<Value>) -> Value {
    let mut s = json!({
        "reference": "SO-1001", "customer_id": customer,
        "stops": stops,
        "pod_policy": {"signature": true, "min_photos": 1},
        "lines": [{"sku": "A-1", "description": "Pallet", "quantity": 2}]
    });
    if let Some(v) = vehicle {
        s["vehicle"] = json!(v);
    }
    s
}

fn p1() -> Value {
    stop(
        "P1",
        "pickup",
        51.5601,
        5.0831,
        "2026-11-27T08:00:00Z",
        "2026-11-27T09:00:00Z",
    )
}
fn d1() -> Value {
    stop(
        "D1",
        "delivery",
        51.5701,
        5.0931,
        "2026-11-27T10:00:00Z",
        "2026-11-27T11:00:00Z",
    )
}
fn d2() -> Value {
    stop(
        "D2",
        "delivery",
        51.5801,
        5.1031,
        "2026-11-27T12:00:00Z",
        "2026-11-27T13:00:00Z",
    )
}

/// The assignment the vehicle holds once it acknowledged `version`: its stops as
/// `(stop id, shipment ids)`.
async fn vehicle_stops(ops: &Http, driver: &Http, version: u32) -> Vec<(String, Vec<String>)> {
    ops.wait_assignment_acked("V1", version).await;
    let jobs = driver.get_json("/v1/jobs").await;
    assert_eq!(jobs["version"], version, "{jobs}");
    jobs["stops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["shipment_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string())
                .collect();
            (s["id"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn stops(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    v.iter()
        .map(|(s, ids)| (s.to_string(), ids.iter().map(|i| i.to_string()).collect()))
        .collect()
}

async fn erp_to_vehicle(stack: Stack) {
    let _hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();
    // The vehicle is known once its gateway has been heard from.
    ops.wait_device_known("V1").await;
    let erp = ops.credential("erp", "SAP prod").await;

    // Released with a vehicle: 201, planned, the vehicle's assignment has its stops.
    let s1 = shipment("ACME", Some("V1"), vec![p1(), d1()]);
    let (s, body) = erp.put_json("/v1/erp/shipments/S1", &s1).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], "PLANNED", "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["status"]["erp_status"], "RELEASED");
    assert_eq!(body["mapping_version"], "builtin-1");
    let ms = body["milestones"].as_array().unwrap();
    assert!(
        ms.iter()
            .any(|m| m["type"] == "DISPATCHED" && m["classifier"] == "ACT"),
        "{body}"
    );
    assert_eq!(
        ms.iter().filter(|m| m["classifier"] == "PLN").count(),
        2,
        "one planned arrival per stop window: {body}"
    );
    assert_eq!(
        vehicle_stops(&ops, &driver, 1).await,
        stops(&[("P1", &["S1"]), ("D1", &["S1"])])
    );

    // The same body again changes nothing.
    let (s, body) = erp.put_json("/v1/erp/shipments/S1", &s1).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["version"], 1);

    // A second shipment through the same ERP location: one stop carrying both.
    let s2 = shipment("BETA", Some("V1"), vec![p1(), d2()]);
    let (s, body) = erp.put_json("/v1/erp/shipments/S2", &s2).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(
        vehicle_stops(&ops, &driver, 2).await,
        stops(&[("P1", &["S1", "S2"]), ("D1", &["S1"]), ("D2", &["S2"])])
    );

    // The same location id somewhere else: 409 naming the stop.
    let mut moved = p1();
    moved["location"]["lat"] = json!(52.0);
    let (s, p) = erp
        .put_json(
            "/v1/erp/shipments/S3",
            &shipment("ACME", Some("V1"), vec![moved, d1()]),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");
    assert_eq!(p["field"], "stops[0].id");
    assert_eq!(
        erp.get("/v1/erp/shipments/S3").await.unwrap().status(),
        404,
        "nothing of it stored"
    );

    // A changed window: version 2, and a new assignment version for the vehicle.
    let mut later = d1();
    later["window"]["end"] = json!("2026-11-27T11:30:00Z");
    let s1b = shipment("ACME", Some("V1"), vec![p1(), later]);
    let (s, body) = erp.put_json("/v1/erp/shipments/S1", &s1b).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    vehicle_stops(&ops, &driver, 3).await;
    let jobs = driver.get_json("/v1/jobs").await;
    assert_eq!(
        jobs["stops"][1]["window"]["end"], "2026-11-27T11:30:00Z",
        "{jobs}"
    );

    // Another customer: 409.
    let (s, p) = erp
        .put_json(
            "/v1/erp/shipments/S1",
            &shipment("OTHER", Some("V1"), vec![p1(), d1()]),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(p["field"], "customer_id");

    // Bad bodies: 400 naming the field.
    let mut no_kind = d1();
    no_kind["kind"] = json!("dropoff");
    let mut bad_lat = d1();
    bad_lat["location"]["lat"] = json!(91.0);
    let mut backwards = d1();
    backwards["window"]["end"] = json!("2026-11-27T09:59:00Z");
    let many: Vec<Value> = (0..33)
        .map(|i| {
            stop(
                &format!("X{i}"),
                "delivery",
                51.0,
                5.0 + f64::from(i) / 100.0,
                "2026-11-27T10:00:00Z",
                "2026-11-27T11:00:00Z",
            )
        })
        .collect();
    for (body, field, status) in [
        (shipment("ACME", None, vec![]), "stops", 400),
        (
            shipment("ACME", None, vec![p1(), no_kind]),
            "stops[1].kind",
            400,
        ),
        (
            shipment("ACME", None, vec![p1(), bad_lat]),
            "stops[1].location.lat",
            400,
        ),
        (
            shipment("ACME", None, vec![p1(), backwards]),
            "stops[1].window.end",
            400,
        ),
        (shipment("ACME", None, many), "stops", 400),
        (
            shipment("ACME", Some("V9"), vec![p1(), d1()]),
            "vehicle",
            400,
        ),
        (
            json!({"reference": "x", "customer_id": "ACME", "stops": [], "pad": "a".repeat(300 * 1024)}),
            "body",
            413,
        ),
    ] {
        let (s, p) = erp.put_json("/v1/erp/shipments/S9", &body).await;
        assert_eq!(s.as_u16(), status, "{p}");
        assert_eq!(p["field"], field, "{p}");
        assert_eq!(p["status"], status);
    }

    // Lists page with a cursor.
    let page = erp
        .get_json("/v1/erp/shipments?state=PLANNED&limit=1")
        .await;
    assert_eq!(page["shipments"].as_array().unwrap().len(), 1, "{page}");
    let next = page["next"].as_str().unwrap().to_string();
    let page2 = erp
        .get_json(&format!(
            "/v1/erp/shipments?state=PLANNED&limit=1&cursor={next}"
        ))
        .await;
    assert_eq!(page2["shipments"].as_array().unwrap().len(), 1, "{page2}");
    assert_ne!(page["shipments"][0]["id"], page2["shipments"][0]["id"]);
    let page3 = erp
        .get_json(&format!(
            "/v1/erp/shipments?state=PLANNED&limit=1&cursor={}",
            page2["next"].as_str().unwrap()
        ))
        .await;
    assert!(page3["shipments"].as_array().unwrap().is_empty(), "{page3}");
    assert!(page3["next"].is_null());
    let (s, p) = (
        erp.get("/v1/erp/shipments?state=LOST")
            .await
            .unwrap()
            .status(),
        (),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{p:?}");

    // Roles: the ERP key cannot call the ops API; operators list and assign.
    assert_eq!(erp.get("/v1/ops/shipments").await.unwrap().status(), 403);
    let (s, body) = erp
        .put_json(
            "/v1/erp/shipments/S4",
            &shipment("ACME", None, vec![p1(), d1()]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(body["state"], "CREATED", "no vehicle yet: {body}");
    let stuck = ops.get_json("/v1/ops/shipments/stuck?older_than_s=0").await;
    assert!(
        stuck["shipments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["shipment_id"] == "S4" && s["reason"] == "released_not_dispatched"),
        "{stuck}"
    );
    let stuck = ops.get_json("/v1/ops/shipments/stuck").await;
    assert!(
        stuck["shipments"].as_array().unwrap().is_empty(),
        "nothing waits 15 minutes yet: {stuck}"
    );
    let (s, body) = ops
        .post("/v1/ops/shipments/S4/assign", &json!({"vehicle": "V1"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "PLANNED");
    assert_eq!(
        vehicle_stops(&ops, &driver, 4).await,
        stops(&[
            ("P1", &["S1", "S2", "S4"]),
            ("D1", &["S1", "S4"]),
            ("D2", &["S2"])
        ])
    );

    // Cancel takes S2 off the vehicle; close takes S1 and S4.
    let (s, body) = erp
        .post(
            "/v1/erp/shipments/S2/cancel",
            &json!({"reason": "customer called"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "CANCELLED");
    assert!(
        body["milestones"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "CANCELLED" && m["note"] == "customer called")
    );
    assert_eq!(
        vehicle_stops(&ops, &driver, 5).await,
        stops(&[("P1", &["S1", "S4"]), ("D1", &["S1", "S4"])])
    );
    let (s, p) = erp
        .post("/v1/erp/shipments/S2/cancel", &json!({"reason": ""}))
        .await;
    assert_eq!(
        (s, p["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("reason"))
    );
    for id in ["S1", "S4"] {
        let (s, body) = erp
            .post(&format!("/v1/erp/shipments/{id}/close"), &json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["state"], "CLOSED");
    }
    assert_eq!(vehicle_stops(&ops, &driver, 7).await, stops(&[]));
    let (s, p) = erp
        .put_json(
            "/v1/erp/shipments/S1",
            &shipment("ACME", Some("V1"), vec![p1(), d2()]),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a closed shipment does not change: {p}"
    );

    let m = erp.get_json("/v1/erp/mappings").await;
    assert_eq!(m["version"], "builtin-1");
    assert_eq!(m["states"].as_array().unwrap().len(), 11);
    assert!(
        m["states"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["state"] == "POD_CONFIRMED" && r["releases_billing"] == true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    erp_to_vehicle(Stack::new(64 << 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let stack = Stack::new(64 << 20);
    stack.use_postgres(&fleetsync_tests::fresh_pg_db(&base).await);
    erp_to_vehicle(stack).await;
}

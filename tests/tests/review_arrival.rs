//! An arrival at a stop of another vehicle's shipment waits in the review queue, on sled
//! and on PostgreSQL: the ERP puts S9 (stop C9) on V2; V1, which carries nothing at C9,
//! reports an arrival there (its old assignment, say). That makes no fact of S9 but one
//! review item naming S9, also when the batch comes again; V2's own arrival there is an
//! ARRIVED fact of S9 as usual; an operator's accept makes V1's arrival an ARRIVED fact
//! under the operator's name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_protocol::TripKind;
use fleetsync_tests::{TestHub, publish_batch, trip_event, wait_for};
use serde_json::{Value, json};

fn arrival(stop: &str, time_ms: u64) -> fleetsync_protocol::Event {
    trip_event(TripKind::Arrived, stop, time_ms)
}

fn facts_of(s: &Value, kind: &str) -> Vec<Value> {
    s["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == kind && m["classifier"] == "ACT")
        .cloned()
        .collect()
}

async fn open_items(ops: &fleetsync_tests::Http) -> Vec<Value> {
    let q: Value = ops.get_json("/v1/ops/review?status=open").await;
    q.as_array().unwrap().clone()
}

async fn arrival_review(hub: TestHub) {
    let ops = hub.http.clone();
    let now = fleetsync_agent::now_ms();
    // Both vehicles known to the hub (a first event each).
    publish_batch(&hub, "V1", 0, &[arrival("DEPOT", now - 60_000)]).await;
    publish_batch(&hub, "V2", 0, &[arrival("DEPOT", now - 60_000)]).await;
    let erp = ops.credential("erp", "SAP prod").await;
    let s9 = json!({"reference": "SO-9", "customer_id": "ACME", "vehicle": "V2",
        "stops": [{"id": "C9", "kind": "delivery", "name": "Bakery Jansen",
                   "location": {"lat": 51.5655, "lon": 5.0831}, "radius_m": 80}]});
    assert_eq!(erp.put_json("/v1/erp/shipments/S9", &s9).await.0, 201);

    // V1 at C9, twice (a redelivery of the same batch).
    publish_batch(&hub, "V1", 1, &[arrival("C9", now - 30_000)]).await;
    publish_batch(&hub, "V1", 1, &[arrival("C9", now - 30_000)]).await;
    let item = wait_for(Duration::from_secs(20), || {
        let ops = ops.clone();
        async move {
            open_items(&ops)
                .await
                .into_iter()
                .find(|i| i["kind"] == "arrival_not_assigned")
        }
    })
    .await
    .expect("V1's arrival at V2's stop never reached review");
    assert_eq!(item["shipment_id"], "S9", "{item}");
    assert_eq!(item["stop_id"], "C9", "{item}");
    assert_eq!(item["source"]["device"], "V1", "{item}");
    assert!(item["detail"].as_str().unwrap().contains("S9"), "{item}");
    assert_eq!(open_items(&ops).await.len(), 1, "one item per source event");
    let s = erp.get_json("/v1/erp/shipments/S9").await;
    assert!(facts_of(&s, "ARRIVED").is_empty(), "no fact from V1: {s}");
    assert_eq!(s["review"], "open", "{s}");

    // V2's own arrival: a fact, no review.
    publish_batch(&hub, "V2", 1, &[arrival("C9", now - 20_000)]).await;
    let s = erp.get_json("/v1/erp/shipments/S9").await;
    let arrived = facts_of(&s, "ARRIVED");
    assert_eq!(arrived.len(), 1, "{s}");
    assert_eq!(arrived[0]["source"]["device"], "V2");
    assert_eq!(open_items(&ops).await.len(), 1, "{s}");

    // Accepted: V1's arrival counts for S9, under the operator's name.
    let operator = ops.credential("operator", "Anna (dispatch)").await;
    let id = item["id"].as_str().unwrap();
    let (st, decided) = operator
        .post(
            &format!("/v1/ops/review/{id}/accept"),
            &json!({"note": "V1 helped out at the bakery"}),
        )
        .await;
    assert_eq!(st, 200, "{decided}");
    let s = erp.get_json("/v1/erp/shipments/S9").await;
    let arrived = facts_of(&s, "ARRIVED");
    assert_eq!(arrived.len(), 2, "{s}");
    let by_operator = arrived
        .iter()
        .find(|f| f["source"]["kind"] == "operator")
        .unwrap_or_else(|| panic!("{s}"));
    assert_eq!(by_operator["stop_id"], "C9");
    assert_eq!(
        by_operator["event_time"], item["event_time"],
        "the arrival's own time"
    );
    assert_eq!(s["review"], "accepted", "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    arrival_review(TestHub::start(&["V1", "V2"]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&base).await;
    arrival_review(TestHub::start_on(&["V1", "V2"], Some(&url)).await).await;
}

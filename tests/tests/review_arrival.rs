//! An arrival at a stop of another vehicle's shipment waits in the review queue, on sled
//! and on PostgreSQL: the ERP puts S9 (stop C9) on V2; V1, which carries nothing at C9,
//! reports an arrival there (its old assignment, say). That makes no fact of S9 but one
//! review item naming S9, also when the batch comes again; V2's own arrival there is an
//! ARRIVED fact of S9 as usual; an operator's accept makes V1's arrival an ARRIVED fact
//! under the operator's name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{
    Batch, BoundedString, BoundedVec, Downlink, Event, Trip, TripKind, Uplink, frame,
};
use fleetsync_tests::{TestHub, device_client, wait_for};
use rumqttc::{Event as MqttEvent, Packet, QoS};
use serde_json::{Value, json};

/// Publishes one batch of `device` (epoch 1, from `first_seq`) and waits for the hub's
/// ack of it.
async fn publish(hub: &TestHub, device: &str, first_seq: u64, events: &[Event]) {
    let (client, mut el) = device_client(&hub.pki, device, device, hub.running_mqtt);
    let up = Layout::Embedded
        .topic(device, Channel::Up)
        .unwrap()
        .to_string();
    let down = Layout::Embedded
        .topic(device, Channel::Down)
        .unwrap()
        .to_string();
    let frame = frame::encode(&Uplink::Batch(Batch {
        epoch: 1,
        first_seq,
        events: BoundedVec::try_from_slice(events).unwrap(),
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                client
                    .publish(up.as_str(), QoS::AtLeastOnce, false, frame.clone())
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(Downlink::Ack(a)) = frame::decode::<Downlink>(&p.payload)
                    && a.ranges
                        .iter()
                        .any(|r| r.first <= first_seq && first_seq <= r.last)
                {
                    let _ = client.disconnect().await;
                    return;
                }
            }
            Ok(Err(e)) => panic!("{device}: {e}"),
            _ => {}
        }
    }
    panic!("{device}: batch at seq {first_seq} never acked");
}

fn arrival(stop: &str, time_ms: u64) -> Event {
    Event {
        time_ms,
        body: fleetsync_protocol::Body::Trip(Trip {
            kind: TripKind::Arrived,
            stop_id: Some(BoundedString::try_from_str(stop).unwrap()),
        }),
    }
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
    publish(&hub, "V1", 0, &[arrival("DEPOT", now - 60_000)]).await;
    publish(&hub, "V2", 0, &[arrival("DEPOT", now - 60_000)]).await;
    let erp = ops.credential("erp", "SAP prod").await;
    let s9 = json!({"reference": "SO-9", "customer_id": "ACME", "vehicle": "V2",
        "stops": [{"id": "C9", "kind": "delivery", "name": "Bakery Jansen",
                   "location": {"lat": 51.5655, "lon": 5.0831}, "radius_m": 80}]});
    assert_eq!(erp.put_json("/v1/erp/shipments/S9", &s9).await.0, 201);

    // V1 at C9, twice (a redelivery of the same batch).
    publish(&hub, "V1", 1, &[arrival("C9", now - 30_000)]).await;
    publish(&hub, "V1", 1, &[arrival("C9", now - 30_000)]).await;
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
    publish(&hub, "V2", 1, &[arrival("C9", now - 20_000)]).await;
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

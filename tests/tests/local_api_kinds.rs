//! The driver's tablet cannot speak for the agent or the hub: the agent's `POST
//! /v1/events` takes only what a local client may originate (positions), and the hub
//! records an acknowledgement only for the assignment version it sent to that device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_protocol::{
    AssignmentAck, Batch, Body, BoundedString, BoundedVec, Event, Uplink, frame,
};
use fleetsync_tests::{Stack, TestHub, device_client};
use rumqttc::{Event as MqttEvent, Packet, QoS};
use serde_json::{Value, json};

fn job(version: u32) -> Value {
    json!({
        "id": "job-1", "version": version,
        "stops": [{"id": "s1", "name": "Depot", "shipment_ids": ["SO-1"],
                   "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}}]
    })
}

const T: &str = "2026-11-27T10:00:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_refuses_kinds_the_agent_records_itself() {
    let stack = Stack::new(64 << 20);
    let _hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    assert_eq!(ops.put_assignment("V1", &job(1)).await, 202);
    ops.wait_assignment_acked("V1", 1).await;

    let driver = stack.driver();
    let refused = [
        json!({"kind": "assignment_ack", "event_time": T, "assignment_id": "job-1", "version": 4294967295u32}),
        json!({"kind": "pod", "event_time": T, "pod_id": "p1", "shipment_id": "SO-1", "stop_id": "elsewhere",
               "outcome": "delivered", "recipient_name": "Nobody"}),
        json!({"kind": "geofence", "event_time": T, "fence_id": "s1", "transition": "enter"}),
        json!({"kind": "trip", "event_time": T, "trip": "arrived", "stop_id": "s1"}),
        json!({"kind": "gap", "event_time": T, "lane": "telemetry", "dropped_epoch": 1, "first_seq": 1,
               "last_seq": 9, "count": 9, "reason": "quota"}),
        json!({"kind": "health", "event_time": T, "backlog_critical": 0, "backlog_telemetry": 0,
               "disk_used_bytes": 0, "disk_quota_bytes": 1, "uptime_s": 1, "version": "x"}),
        json!({"kind": "exception", "event_time": T, "code": "other", "text": "x"}),
    ];
    for ev in &refused {
        let r = driver.post_json("/v1/events", ev).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 422, "{} was accepted: {body}", ev["kind"]);
        let msg = body["error"].as_str().unwrap();
        assert!(
            msg.contains(ev["kind"].as_str().unwrap()) && msg.contains("position"),
            "{msg}"
        );
    }
    let pos = json!({"kind": "position", "event_time": T, "lat": 52.37, "lon": 4.89});
    assert_eq!(
        driver.post_json("/v1/events", &pos).await.unwrap().status(),
        201
    );

    // The forged ack never reached the hub's record: still exactly version 1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = ops.get_json("/v1/ops/devices/V1/assignment").await;
    assert_eq!(a["acked_version"], 1, "{a}");
    // And a new version starts unacknowledged until the vehicle has it.
    assert_eq!(ops.put_assignment("V1", &job(2)).await, 202);
    let a = ops.get_json("/v1/ops/devices/V1/assignment").await;
    assert_eq!(a["acknowledged"], false, "{a}");
    ops.wait_assignment_acked("V1", 2).await;
}

/// A device (or anything holding its key) that reports an acknowledgement of a version
/// the hub never sent it: nothing is recorded, the assignment is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_records_only_acks_of_the_version_it_sent() {
    let hub = TestHub::start(&["V1"]).await;
    assert_eq!(hub.http.put_assignment("V1", &job(3)).await, 202);
    let (client, mut el) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    let (up, down) = fleetsync_tests::device_topics("V1");
    let ack = |seq: u64, version: u32| {
        frame::encode(&Uplink::Batch(Batch {
            epoch: 1,
            first_seq: seq,
            events: BoundedVec::try_from_slice(&[Event {
                time_ms: 1_795_773_600_000 + seq,
                body: Body::AssignmentAck(AssignmentAck {
                    assignment_id: BoundedString::try_from_str("job-1").unwrap(),
                    version,
                }),
            }])
            .unwrap(),
        }))
        .unwrap()
    };
    let mut batch_acks = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && batch_acks < 3 {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                // Forged (never sent), older than sent, then nothing right.
                for (seq, v) in [(0, u32::MAX), (1, 2), (2, 4)] {
                    client
                        .publish(up.as_str(), QoS::AtLeastOnce, false, ack(seq, v))
                        .await
                        .unwrap();
                }
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(fleetsync_protocol::Downlink::Ack(_)) = frame::decode(&p.payload) {
                    batch_acks += 1;
                }
            }
            Ok(Err(e)) => panic!("device connection failed: {e}"),
            _ => {}
        }
    }
    assert_eq!(batch_acks, 3, "the hub did not take the batches");
    let a = hub.http.get_json("/v1/ops/devices/V1/assignment").await;
    assert_eq!(a["acknowledged"], false, "{a}");
    assert_eq!(a["acked_version"], Value::Null, "{a}");
    // The stored events say what the device claimed; the record says what is true.
    let events = hub.http.all_events("V1").await;
    assert_eq!(events.len(), 3);
}

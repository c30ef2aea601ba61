//! Garbage, truncated and oversized frames on a device topic are counted and quarantined
//! with their raw bytes; the device's next valid batch is still ingested and acked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_protocol::{Batch, Body, BoundedVec, Downlink, Event, Fix, Uplink, frame};
use fleetsync_tests::{TestHub, device_client};
use rumqttc::{Event as MqttEvent, Packet, QoS};

fn batch(first_seq: u64, n: usize) -> Vec<u8> {
    batch_at(first_seq, n, 523_700_000)
}

fn batch_at(first_seq: u64, n: usize, lat0: i32) -> Vec<u8> {
    let events = (0..n).map(|i| Event {
        time_ms: 1_795_773_600_000 + 1000 * i as u64,
        body: Body::Position(Fix {
            lat_e7: lat0 + i as i32 * 90,
            lon_e7: 48_900_000,
            speed_cmps: Some(1000),
            heading_ddeg: None,
            hdop_d: None,
            satellites: None,
        }),
    });
    frame::encode(&Uplink::Batch(Batch {
        epoch: 2,
        first_seq,
        events: BoundedVec::try_from_iter(events).unwrap(),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_quarantined_and_ingest_goes_on() {
    let hub = TestHub::start(&["V1"]).await;
    let (client, mut el) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    let (up, down) = fleetsync_tests::device_topics("V1");

    let garbage = b"this is not a frame".to_vec();
    let good = batch(0, 30);
    let truncated = good[..good.len() / 2].to_vec();
    let mut oversized = vec![1u8, 0];
    oversized.resize(fleetsync_protocol::limits::MAX_FRAME_BYTES + 100, 0x7f);
    let bad = [garbage.clone(), truncated.clone(), oversized.clone()];

    let mut acked_seq = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && acked_seq.is_none() {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                for b in &bad {
                    client
                        .publish(up.as_str(), QoS::AtLeastOnce, false, b.clone())
                        .await
                        .unwrap();
                }
                client
                    .publish(up.as_str(), QoS::AtLeastOnce, false, batch(30, 30))
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(Downlink::Ack(a)) = frame::decode(&p.payload) {
                    acked_seq = Some((a.epoch, a.ranges[0].first, a.ranges[0].last));
                }
            }
            Ok(Err(e)) => panic!("device disconnected: {e}"),
            _ => {}
        }
    }
    assert_eq!(
        acked_seq,
        Some((2, 30, 59)),
        "the valid batch after the bad frames was not acked"
    );

    assert_eq!(
        hub.http
            .metric("fleetsync_hub_malformed_frames_total")
            .await,
        3
    );
    let q = hub.http.get_json("/v1/ops/quarantine").await;
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 3);
    // The listing names each frame; its bytes are at its own URL.
    let mut raws: Vec<String> = Vec::new();
    for e in q {
        let url = e["raw_url"].as_str().unwrap();
        let raw = hub.http.get(url).await.unwrap().bytes().await.unwrap();
        assert_eq!(raw.len() as u64, e["bytes"].as_u64().unwrap());
        raws.push(hex_of(&raw));
    }
    raws.sort();
    // The hub keeps up to 64 KiB of each frame.
    let mut want: Vec<String> = bad
        .iter()
        .map(|b| hex_of(&b[..b.len().min(64 * 1024)]))
        .collect();
    want.sort();
    assert_eq!(raws, want, "quarantine does not hold the raw bytes");
    for e in q {
        assert_eq!(e["device"], "V1");
        assert!(!e["error"].as_str().unwrap().is_empty());
    }
    // The same identities with different content (a device whose store was wiped): not
    // "deduplicated" away silently but counted and kept for an operator; stored events
    // keep their first content.
    let mut forged = None;
    // Same (epoch 2, seqs 30..59), other positions.
    let conflicting = batch_at(30, 30, 480_000_000);
    client
        .publish(up.as_str(), QoS::AtLeastOnce, false, conflicting.clone())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && forged.is_none() {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(Downlink::Ack(a)) = frame::decode(&p.payload) {
                    forged = Some(a.ranges[0].first);
                }
            }
            Ok(Err(e)) => panic!("device disconnected: {e}"),
            _ => {}
        }
    }
    assert_eq!(forged, Some(30), "the conflicting batch was not answered");
    assert!(
        hub.http
            .metric("fleetsync_hub_identity_conflicts_total")
            .await
            >= 1
    );
    let q = hub.http.get_json("/v1/ops/quarantine").await;
    assert_eq!(q.as_array().unwrap().len(), 4);
    assert!(
        q[0]["error"]
            .as_str()
            .unwrap()
            .contains("already stored with different content"),
        "{}",
        q[0]
    );
    let raw = hub
        .http
        .get(q[0]["raw_url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(hex_of(&raw), hex_of(&conflicting));

    let events = hub.http.all_events("V1").await;
    assert_eq!(events.len(), 30);
    assert_eq!(events[0]["seq"], 30);
    assert_eq!(events[0]["lat"], 52.37);
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

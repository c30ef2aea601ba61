//! Scale-out with real processes: hub replicas on one PostgreSQL database behind a real
//! Mosquitto, configured by `fleetsync-hub broker-config mosquitto`, with real agents.
//!
//! - two replicas split the devices' traffic; one is killed with SIGKILL mid-stream and
//!   the survivor acks everything: every accepted event stored exactly once;
//! - the broker is stopped and started again mid-stream: nothing lost, devices resume;
//! - device V1's certificate publishing under V2's topics: the broker refuses it, nothing
//!   is recorded for V2;
//! - an assignment made while the device is offline (and then no hub running at all)
//!   reaches it from the broker when it reconnects.
//!
//! Needs `FLEETSYNC_TEST_MOSQUITTO` and `FLEETSYNC_TEST_PG_URL` (skipped outside CI
//! without them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fleetsync_tests::replicas::Replicas;
use fleetsync_tests::{Http, device_client, wait_for};
use serde_json::{Value, json};

/// A position posted to an agent; its time makes it unique within the device.
fn position(n: usize) -> Value {
    let t = 1_795_773_600_000u64 + n as u64 * 1000;
    json!({"kind": "position", "event_time": fleetsync_protocol::json::Time(t).to_rfc3339(),
           "lat": 52.0 + n as f64 * 1e-5, "lon": 4.9})
}

/// Posts positions to one agent until `stop`; returns the times of those answered 201.
/// A post cut off (the agent busy, a timeout) is not counted and not retried.
fn poster(
    driver: Http,
    counter: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashSet<String>> {
    tokio::spawn(async move {
        let mut accepted = HashSet::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let ev = position(n);
            n += 1;
            match driver.post_json("/v1/events", &ev).await {
                Ok(r) if r.status() == 201 => {
                    accepted.insert(ev["event_time"].as_str().unwrap().to_string());
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => panic!("agent answered {} to a valid event", r.status()),
                Err(_) => tokio::time::sleep(Duration::from_millis(30)).await,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        accepted
    })
}

async fn wait_count(counter: &AtomicUsize, n: usize) {
    wait_for(Duration::from_secs(120), || async move {
        (counter.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await
    .expect("posting stalled");
}

/// Checks that `ops` holds each of `accepted` positions of `device` once, and no
/// identity twice.
async fn assert_exactly_once(ops: &Http, device: &str, accepted: &HashSet<String>) {
    let events = ops.all_events(device).await;
    let mut ids = HashSet::new();
    let mut times: HashMap<String, usize> = HashMap::new();
    for e in &events {
        assert!(
            ids.insert((e["epoch"].as_u64().unwrap(), e["seq"].as_u64().unwrap())),
            "{device}: an identity stored twice"
        );
        if e["kind"] == "position" {
            *times
                .entry(e["event_time"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for t in accepted {
        match times.get(t) {
            Some(1) => {}
            Some(n) => panic!("{device}: position at {t} stored {n} times"),
            None => panic!("{device}: accepted position at {t} never reached the hub"),
        }
    }
}

/// Which devices `ops` shows connected.
async fn connected(ops: &Http) -> HashSet<String> {
    let list = ops.get_json("/v1/ops/devices").await;
    list.as_array()
        .unwrap()
        .iter()
        .filter(|d| d["connected"] == true)
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_connected(ops: &Http, want: &[&str], who: &str) {
    let want: HashSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(Duration::from_secs(30), || {
        let (ops, want) = (ops.clone(), want.clone());
        async move { (connected(&ops).await == want).then_some(()) }
    })
    .await
    .unwrap_or_else(|| panic!("{who} does not show exactly {want:?} connected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_split_the_fleet_and_the_survivor_of_a_kill9_acks_everything() {
    let devices = ["V1", "V2", "V3", "V4"];
    let Some(r) = Replicas::new(2, &devices).await else {
        return;
    };
    let mut hub_a = r.start_hub(0).await;
    let _hub_b = r.start_hub(1).await;
    let mut agents = Vec::new();
    for i in 0..devices.len() {
        agents.push(r.start_agent(i).await);
    }
    // Presence comes from the broker: both replicas see every device.
    wait_connected(&r.ops(0), &devices, "replica a").await;
    wait_connected(&r.ops(1), &devices, "replica b").await;

    let counter = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..devices.len())
        .map(|i| poster(r.driver(i), counter.clone(), stop.clone()))
        .collect();
    wait_count(&counter, 600).await;
    // Both replicas take part in the ingest before the kill (the shared subscription).
    let (a_before, b_before) = (
        r.ops(0).metric("fleetsync_hub_events_ingested_total").await,
        r.ops(1).metric("fleetsync_hub_events_ingested_total").await,
    );
    assert!(
        a_before > 0 && b_before > 0,
        "the broker did not split the traffic: a ingested {a_before}, b {b_before}"
    );
    hub_a.kill9();
    let at_kill = counter.load(Ordering::SeqCst);
    wait_count(&counter, at_kill + 1200).await;
    stop.store(true, Ordering::SeqCst);
    let mut accepted = Vec::new();
    for p in posters {
        accepted.push(p.await.unwrap());
    }
    for (i, device) in devices.iter().enumerate() {
        assert!(
            r.driver(i).wait_drained(Duration::from_secs(90)).await,
            "{}: backlog not drained through the surviving replica\n{}",
            device,
            r.log("hub-1.log")
        );
    }
    let b = r.ops(1);
    for (d, acc) in devices.iter().zip(&accepted) {
        assert!(acc.len() > 100, "{d}: only {} accepted", acc.len());
        assert_exactly_once(&b, d, acc).await;
    }
    // A device that goes away is offline at the survivor (its last will).
    agents[0].kill9();
    wait_connected(&b, &devices[1..], "replica b after V1 left").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_nothing_and_devices_resume() {
    let devices = ["V1", "V2"];
    let Some(mut r) = Replicas::new(2, &devices).await else {
        return;
    };
    let _a = r.start_hub(0).await;
    let _b = r.start_hub(1).await;
    let _agents = [r.start_agent(0).await, r.start_agent(1).await];
    wait_connected(&r.ops(0), &devices, "replica a").await;

    let counter = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..devices.len())
        .map(|i| poster(r.driver(i), counter.clone(), stop.clone()))
        .collect();
    wait_count(&counter, 300).await;
    r.broker.stop().await;
    // Agents keep accepting events while the broker is away.
    let during = counter.load(Ordering::SeqCst);
    wait_count(&counter, during + 200).await;
    r.broker.spawn().await.unwrap();
    wait_count(&counter, counter.load(Ordering::SeqCst) + 300).await;
    stop.store(true, Ordering::SeqCst);
    let mut accepted = Vec::new();
    for p in posters {
        accepted.push(p.await.unwrap());
    }
    for (i, d) in devices.iter().enumerate() {
        assert!(
            r.driver(i).wait_drained(Duration::from_secs(90)).await,
            "{d}: backlog not drained after the broker came back\n{}",
            r.broker.log()
        );
    }
    for (d, acc) in devices.iter().zip(&accepted) {
        assert_exactly_once(&r.ops(0), d, acc).await;
    }
    // Both replicas are back on the broker and see both devices again.
    wait_connected(&r.ops(0), &devices, "replica a after the restart").await;
    wait_connected(&r.ops(1), &devices, "replica b after the restart").await;
}

/// One device connection through the broker with `cert`'s certificate: subscribes to
/// `subs`, then publishes `pubs`; runs until a hub `Ack` arrives on `cert`'s own downlink
/// topic (then sets `acked`) and `stop` is set. Returns the topics of everything it heard.
async fn device_session(
    r: &Replicas,
    cert: &str,
    client_id: &str,
    subs: Vec<String>,
    pubs: Vec<(String, Vec<u8>)>,
    acked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    use fleetsync_protocol::topic::{Channel, Layout};
    use fleetsync_protocol::{Downlink, frame};
    use rumqttc::{Event, Packet, QoS};
    let own_down = Layout::External
        .topic(cert, Channel::Down)
        .unwrap()
        .to_string();
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], r.broker.port));
    let (client, mut el) = device_client(&r.pki, cert, client_id, broker);
    let (mut subacks, mut heard) = (0, Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(acked.load(Ordering::SeqCst) && stop.load(Ordering::SeqCst)) {
        assert!(
            std::time::Instant::now() < deadline,
            "{cert}: no ack within 60 s"
        );
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                for t in &subs {
                    client
                        .subscribe(t.as_str(), QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subacks += 1;
                if subacks == subs.len() {
                    for (t, bytes) in &pubs {
                        client
                            .publish(t.as_str(), QoS::AtLeastOnce, false, bytes.clone())
                            .await
                            .unwrap();
                    }
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if p.topic == own_down
                    && matches!(frame::decode::<Downlink>(&p.payload), Ok(Downlink::Ack(_)))
                {
                    acked.store(true, Ordering::SeqCst);
                }
                heard.push(p.topic);
            }
            Ok(Err(e)) => panic!("{cert}'s connection failed: {e}"),
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_or_listen_under_another_devices_topics() {
    use fleetsync_protocol::topic::{Channel, Layout};
    use fleetsync_protocol::{Batch, BoundedVec, Uplink, frame};
    let Some(r) = Replicas::new(1, &["V1", "V2", "V3"]).await else {
        return;
    };
    let r = Arc::new(r);
    let _hub = r.start_hub(0).await;
    let batch = |seq: u64| {
        frame::encode(&Uplink::Batch(Batch {
            epoch: 1,
            first_seq: seq,
            events: BoundedVec::try_from_slice(&fleetsync_tests::drive(1_795_773_600_000, 5, 7))
                .unwrap(),
        }))
        .unwrap()
    };
    let topic = |d: &str, ch| Layout::External.topic(d, ch).unwrap().to_string();
    // V1's certificate, claiming V2's client id too (the broker takes the certificate's):
    // it listens on V3's downlinks, publishes under V2's uplink, and then its own.
    let (v1_acked, v1_stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let v1 = {
        let (r, acked, stop) = (r.clone(), v1_acked.clone(), v1_stop.clone());
        let subs = vec![topic("V3", Channel::Down), topic("V1", Channel::Down)];
        let pubs = vec![
            (topic("V2", Channel::Up), batch(1)),
            (topic("V1", Channel::Up), batch(1)),
        ];
        tokio::spawn(async move { device_session(&r, "V1", "V2", subs, pubs, acked, stop).await })
    };
    wait_for(Duration::from_secs(60), || {
        let a = v1_acked.clone();
        async move { a.load(Ordering::SeqCst).then_some(()) }
    })
    .await
    .expect("V1's own batch was never acked: the path itself is broken");
    // V3 itself, legitimately: the hub acks it on V3's downlink, where V1 listens.
    let heard_v3 = device_session(
        &r,
        "V3",
        "V3",
        vec![topic("V3", Channel::Down)],
        vec![(topic("V3", Channel::Up), batch(1))],
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(true)),
    )
    .await;
    assert!(heard_v3.contains(&topic("V3", Channel::Down)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    v1_stop.store(true, Ordering::SeqCst);
    let heard_v1 = v1.await.unwrap();
    assert!(
        heard_v1.iter().all(|t| *t == topic("V1", Channel::Down)),
        "V1 heard another device's downlinks: {heard_v1:?}"
    );

    let ops = r.ops(0);
    assert_eq!(ops.all_events("V1").await.len(), 5, "V1's own batch");
    assert_eq!(ops.all_events("V3").await.len(), 5, "V3's own batch");
    let v2 = ops.get("/v1/ops/devices/V2/events").await.unwrap();
    let v2_events = if v2.status() == 404 {
        0
    } else {
        v2.json::<Value>().await.unwrap()["events"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(v2_events, 0, "events recorded for V2 from V1's certificate");
    let known = ops.get_json("/v1/ops/devices").await;
    assert!(
        known.as_array().unwrap().iter().all(|d| d["id"] != "V2"),
        "V2 known to the hub: {known}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_sent_while_the_device_is_offline_reaches_it_on_reconnect() {
    let Some(r) = Replicas::new(2, &["V1"]).await else {
        return;
    };
    let mut a = r.start_hub(0).await;
    let mut b = r.start_hub(1).await;
    // The agent's first connection leaves its persistent session at the broker.
    let mut agent = r.start_agent(0).await;
    wait_connected(&r.ops(0), &["V1"], "replica a").await;
    agent.kill9();
    wait_connected(&r.ops(0), &[], "replica a after V1 left").await;

    let job = json!({
        "id": "job-offline", "version": 1,
        "stops": [{"id": "s1", "name": "Bakery", "shipment_ids": ["shp-1"],
                   "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}}]
    });
    assert_eq!(r.ops(1).put_assignment("V1", &job).await, 202);
    // No hub at all from now on: only the broker can hand the assignment over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill9();
    b.kill9();
    let _agent = r.start_agent(0).await;
    let driver = r.driver(0);
    let got = wait_for(Duration::from_secs(30), || {
        let driver = driver.clone();
        async move {
            let jobs: Value = driver.get("/v1/jobs").await.ok()?.json().await.ok()?;
            (jobs["id"] == "job-offline").then_some(jobs)
        }
    })
    .await;
    assert!(
        got.is_some(),
        "the assignment did not reach the device from the broker\n{}",
        r.log("agent-V1.log")
    );
    // A replica back later hears the device's acknowledgement.
    let _a = r.start_hub(0).await;
    r.ops(0).wait_assignment_acked("V1", 1).await;
}

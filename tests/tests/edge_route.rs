//! The agent at the edge, end to end: an NMEA stream (the agent's real `nmea+tcp` source)
//! drives a van along a route through two stop fences of an assignment the operator sent;
//! the driver captures a POD with a signature and two photos while the hub is down.
//! Afterwards the hub holds every position, one enter and one exit per fence, the
//! arrival/departure events, the POD and byte-identical blobs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use fleetsync_sim::route::{Waypoint, drive};
use fleetsync_tests::{DRIVER_TOKEN, Stack, free_port, wait_for};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const S1: (f64, f64) = (52.3760, 4.8950);
const S2: (f64, f64) = (52.3700, 4.9010);

fn png(n: usize) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend((0..n).map(|i| (i % 251) as u8));
    v
}

fn jpeg(n: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0xff, 0xd8, 0xff, 0xe0];
    v.extend((0..n).map(|i| (i as u8).wrapping_mul(seed)));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_through_two_fences_with_offline_pod() {
    let stack = Stack::new(64 << 20);
    let gps_port = free_port();
    let ignition = stack.dir.path().join("ignition");
    std::fs::write(&ignition, "0\n").unwrap();
    stack.add_agent_config(&format!(
        "[gps]\nsource = \"nmea+tcp://127.0.0.1:{gps_port}\"\n[ignition]\npath = \"{}\"\n",
        ignition.display()
    ));
    let gps = tokio::net::TcpListener::bind(("127.0.0.1", gps_port))
        .await
        .unwrap();

    let mut hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();

    let assignment = json!({"id": "job-1", "version": 1, "stops": [
        {"id": "s1", "name": "Bakery", "shipment_ids": ["shp-1"],
         "fence": {"type": "circle", "center": [S1.1, S1.0], "radius_m": 60}},
        {"id": "s2", "name": "Florist", "shipment_ids": ["shp-2"],
         "fence": {"type": "polygon", "coordinates": [
             [S2.1 - 0.0009, S2.0 - 0.0006], [S2.1 + 0.0009, S2.0 - 0.0006],
             [S2.1 + 0.0009, S2.0 + 0.0006], [S2.1 - 0.0009, S2.0 + 0.0006]]}}]});
    assert_eq!(ops.put_assignment("V1", &assignment).await, 202);
    ops.wait_assignment_acked("V1", 1).await;
    wait_for(Duration::from_secs(10), || {
        let driver = driver.clone();
        async move {
            driver
                .get("/v1/jobs")
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        }
    })
    .await
    .expect("agent has no job");

    // The route: outside -> s1 (stand 90 s) -> s2 (stand 90 s) -> outside.
    let wps = [
        Waypoint {
            lat: 52.3731,
            lon: 4.8897,
            dwell_s: 5,
        },
        Waypoint {
            lat: S1.0,
            lon: S1.1,
            dwell_s: 90,
        },
        Waypoint {
            lat: S2.0,
            lon: S2.1,
            dwell_s: 90,
        },
        Waypoint {
            lat: 52.3660,
            lon: 4.9080,
            dwell_s: 5,
        },
    ];
    let start = fleetsync_agent::now_ms() - 3_600_000;
    let fixes = drive(&wps, start, 10.0, 11);
    let at_s1 = fixes
        .iter()
        .position(|f| {
            (f.lat - S1.0).abs() < 1e-6 && (f.lon - S1.1).abs() < 1e-6 && f.speed_mps == 0.0
        })
        .unwrap()
        + 60;
    std::fs::write(&ignition, "1\n").unwrap();
    let (mut sock, _) = tokio::time::timeout(Duration::from_secs(20), gps.accept())
        .await
        .expect("agent did not connect to the NMEA source")
        .unwrap();
    let send = |from: usize, to: usize| {
        let text: String = fixes[from..to]
            .iter()
            .map(fleetsync_sim::nmea::sentences)
            .collect();
        text.into_bytes()
    };
    sock.write_all(&send(0, at_s1)).await.unwrap();
    // The agent has taken every fix so far and sees the van at s1.
    let status = wait_for(Duration::from_secs(20), || {
        let driver = driver.clone();
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            (s["gps"]["fixes"].as_u64()? >= at_s1 as u64).then_some(s)
        }
    })
    .await
    .expect("fixes not taken");
    assert_eq!(status["gps"]["checksum_errors"], 0);
    let job = driver.get_json("/v1/jobs/s1").await;
    assert_eq!(job["state"], "arrived", "{job}");

    // Hub down; POD at s1.
    hub.kill9();
    let (sig, p1, p2) = (png(5_000), jpeg(150_000, 3), jpeg(60_000, 7));
    let form = reqwest::multipart::Form::new()
        .text("outcome", "delivered")
        .text("recipient_name", "M. de Vries")
        .part(
            "signature",
            reqwest::multipart::Part::bytes(sig.clone()).file_name("sig.png"),
        )
        .part(
            "photo",
            reqwest::multipart::Part::bytes(p1.clone()).file_name("1.jpg"),
        )
        .part(
            "photo",
            reqwest::multipart::Part::bytes(p2.clone()).file_name("2.jpg"),
        );
    let r = driver
        .client
        .post(format!("{}/v1/stops/s1/pod", driver.base))
        .bearer_auth(DRIVER_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let pod: Value = r.json().await.unwrap();

    sock.write_all(&send(at_s1, fixes.len())).await.unwrap();
    sock.flush().await.unwrap();
    wait_for(Duration::from_secs(20), || {
        let driver = driver.clone();
        let n = fixes.len() as u64;
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            (s["gps"]["fixes"].as_u64()? >= n).then_some(())
        }
    })
    .await
    .expect("rest of the route not taken");
    std::fs::write(&ignition, "0\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _hub = stack.start_hub().await;

    // Everything arrives.
    let events = wait_for(Duration::from_secs(90), || {
        let (ops, driver) = (ops.clone(), driver.clone());
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            let b = &s["backlog"];
            let left = b["critical"]["events"].as_u64()?
                + b["telemetry"]["events"].as_u64()?
                + b["blobs"]["events"].as_u64()?;
            if left > 0 {
                return None;
            }
            Some(ops.all_events("V1").await)
        }
    })
    .await
    .expect("backlog did not drain");
    let positions = events.iter().filter(|e| e["kind"] == "position").count();
    assert_eq!(positions, fixes.len(), "every fix is a position at the hub");
    let mut fence: HashMap<(String, String), usize> = HashMap::new();
    let mut trips: HashMap<(String, String), usize> = HashMap::new();
    for e in &events {
        match e["kind"].as_str().unwrap() {
            "geofence" => {
                *fence
                    .entry((
                        e["fence_id"].as_str().unwrap().into(),
                        e["transition"].as_str().unwrap().into(),
                    ))
                    .or_default() += 1
            }
            "trip" => {
                *trips
                    .entry((
                        e["trip"].as_str().unwrap().into(),
                        e["stop_id"].as_str().unwrap_or("").into(),
                    ))
                    .or_default() += 1
            }
            _ => {}
        }
    }
    for stop in ["s1", "s2"] {
        assert_eq!(
            fence.get(&(stop.into(), "enter".into())),
            Some(&1),
            "{fence:?}"
        );
        assert_eq!(
            fence.get(&(stop.into(), "exit".into())),
            Some(&1),
            "{fence:?}"
        );
        assert_eq!(
            trips.get(&("arrived".into(), stop.into())),
            Some(&1),
            "{trips:?}"
        );
        assert_eq!(
            trips.get(&("departed".into(), stop.into())),
            Some(&1),
            "{trips:?}"
        );
    }
    // The ignition input: off at start (first reading), on for the drive, off at the end.
    assert_eq!(
        trips.get(&("ignition_on".into(), String::new())),
        Some(&1),
        "{trips:?}"
    );
    assert_eq!(
        trips.get(&("ignition_off".into(), String::new())),
        Some(&2),
        "{trips:?}"
    );
    let pods: Vec<&Value> = events.iter().filter(|e| e["kind"] == "pod").collect();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0]["pod_id"], pod["pod_id"]);
    let geo = &pods[0]["geo"];
    assert!(
        (geo["lat"].as_f64().unwrap() - S1.0).abs() < 0.0005,
        "POD geo-stamp {geo} not at s1"
    );
    for (r, bytes) in [
        (&pods[0]["signature"], &sig),
        (&pods[0]["photos"][0], &p1),
        (&pods[0]["photos"][1], &p2),
    ] {
        let got = ops
            .get(&format!("/v1/ops/blobs/{}", r["sha256"].as_str().unwrap()))
            .await
            .unwrap();
        assert_eq!(got.status(), 200);
        assert!(&got.bytes().await.unwrap().to_vec() == bytes);
    }
}

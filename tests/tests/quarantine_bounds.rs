//! A device sending garbage cannot make the quarantine expensive: it keeps at most its
//! own share of frames, a listing is bounded in bytes (whole frames one at a time from
//! their own URL), and the hub's log gets a few lines a minute from it, not one a frame.
//! Prints the largest listing and the hub's RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetsync_hub::api::MAX_QUARANTINE_PAGE_BYTES;
use fleetsync_hub::store::MAX_QUARANTINE_PER_DEVICE;
use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_tests::{
    Http, OPERATOR_TOKEN, Proc, device_client, free_port, proc_status_kib, wait_for, wait_http_ok,
};
use rumqttc::{Event as MqttEvent, Packet, QoS};
use serde_json::Value;

/// Garbage frame `n` of `device`: 60 KiB that are no frame at all.
fn garbage(device: &str, n: usize) -> Vec<u8> {
    let mut v = format!("garbage {device} {n} ").into_bytes();
    v.resize(60 * 1024, 0x7f);
    v
}

/// Publishes `n` garbage frames from `device` and waits for their PUBACKs.
async fn send_garbage(pki: &std::path::Path, mqtt: SocketAddr, device: &str, n: usize) {
    let (client, mut el) = device_client(pki, device, device, mqtt);
    let up = Layout::Embedded
        .topic(device, Channel::Up)
        .unwrap()
        .to_string();
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                let (client, up, device) = (client.clone(), up.clone(), device.to_string());
                tokio::spawn(async move {
                    for i in 0..n {
                        client
                            .publish(up.as_str(), QoS::AtLeastOnce, false, garbage(&device, i))
                            .await
                            .unwrap();
                    }
                });
            }
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Err(e)) => panic!("{device}: {e}"),
            _ => {}
        }
    }
    assert_eq!(acked, n, "{device}: not every frame reached the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_bounded_in_the_quarantine_the_listing_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleetsync_tests::pki(dir.path(), &["V1", "V2"]);
    let (mqtt, http) = (free_port(), free_port());
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        fleetsync_tests::hub_config(&pki, &dir.path().join("data"), mqtt, http),
    )
    .unwrap();
    let log = dir.path().join("hub.log");
    let hub = Proc::spawn("fleetsync-hub", &cfg, &log);
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let mqtt_addr: SocketAddr = format!("127.0.0.1:{mqtt}").parse().unwrap();
    assert!(wait_http_ok(http_addr, "/readyz", Duration::from_secs(30)).await);
    let ops = Http::new(http_addr, OPERATOR_TOKEN);

    send_garbage(&pki, mqtt_addr, "V2", 5).await;
    send_garbage(&pki, mqtt_addr, "V1", 300).await;
    // Stored once the newest frame of V1 is listed (frames are counted before their
    // round commits).
    let newest = hex::encode(b"garbage V1 299 ");
    let all_in = wait_for(Duration::from_secs(30), || {
        let (ops, newest) = (ops.clone(), newest.clone());
        async move {
            let items: Vec<Value> = ops
                .get("/v1/ops/quarantine?limit=1")
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            items.first()?["head_hex"]
                .as_str()?
                .starts_with(&newest)
                .then_some(())
        }
    })
    .await;
    assert!(
        all_in.is_some(),
        "V1's last frame never reached the quarantine"
    );
    assert_eq!(
        ops.metric("fleetsync_hub_malformed_frames_total").await,
        305
    );

    let r = ops.get("/v1/ops/quarantine?limit=1000").await.unwrap();
    assert_eq!(r.status(), 200);
    let next = r
        .headers()
        .get("x-next-before")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.bytes().await.unwrap();
    assert!(
        body.len() <= MAX_QUARANTINE_PAGE_BYTES,
        "listing of {} bytes",
        body.len()
    );
    let items: Vec<Value> = serde_json::from_slice(&body).unwrap();
    eprintln!(
        "first item: {}",
        &items[0].to_string()[..items[0].to_string().len().min(600)]
    );
    let v1 = items.iter().filter(|i| i["device"] == "V1").count();
    let v2: Vec<&Value> = items.iter().filter(|i| i["device"] == "V2").collect();
    assert_eq!(
        v1, MAX_QUARANTINE_PER_DEVICE,
        "V1 keeps its newest share only"
    );
    assert_eq!(v2.len(), 5, "V2's frames pushed out by V1's");
    assert!(
        next.is_none(),
        "a page that holds everything says there is more"
    );
    // The whole frame, from its own URL.
    let one = v2[0];
    let raw = ops
        .get(one["raw_url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(raw.len() as u64, one["bytes"].as_u64().unwrap());
    assert!(raw.starts_with(b"garbage V2 "));
    assert_eq!(hex::encode(&raw[..64]), one["head_hex"].as_str().unwrap());
    // A small page says where the next starts.
    let r = ops.get("/v1/ops/quarantine?limit=10").await.unwrap();
    let next = r
        .headers()
        .get("x-next-before")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let page: Vec<Value> = r.json().await.unwrap();
    assert_eq!(page[9]["id"].to_string(), next);

    // The log: a few lines for V1, not 300.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("frame quarantined") && l.contains("V1"))
        .count();
    assert!(lines <= 5, "{lines} log lines for V1's garbage");
    eprintln!(
        "quarantine: 305 garbage frames of 60 KiB; listing of {} items in {} bytes; hub RSS {} KiB; {} log lines for V1",
        items.len(),
        body.len(),
        proc_status_kib(hub.child.id(), "VmRSS").unwrap_or(0),
        lines
    );
}

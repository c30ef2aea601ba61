//! Large POD uploads do not cost memory in proportion to their size: five concurrent
//! 23 MB PODs (a signature and three ~7.6 MB photos each) are streamed to the agent's
//! store, uploads beyond the agent's bound are answered 503 with `Retry-After` and
//! accepted when sent again, and the agent's peak RSS stays under 64 MiB while they come
//! in and while its uplink later sends them. Every accepted POD's blobs are durable at
//! 201: after a kill -9 of the agent they reach the hub byte for byte (sha256), and the
//! agent deletes its copies once the hub has them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_tests::{Stack, proc_status_kib, wait_for};
use serde_json::{Value, json};
use sha2::Digest as _;

const PODS: usize = 5;
const PHOTO_BYTES: usize = 7_600_000;
/// The bound the issue set for five concurrent 23 MB PODs.
const MAX_RSS_KIB: u64 = 64 * 1024;

/// Incompressible-looking bytes behind an image's magic, different per seed.
fn image(magic: &[u8], n: usize, seed: u64) -> Vec<u8> {
    let mut v = magic.to_vec();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    v.extend((0..n).map(|_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s as u8
    }));
    v
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// Posts one POD until it is not refused as busy; returns the final answer and how many
/// times it was told to come back.
async fn post_until_accepted(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    files: &[Vec<u8>],
) -> (reqwest::StatusCode, Value, usize) {
    let mut busy = 0;
    loop {
        let mut form = reqwest::multipart::Form::new()
            .text("outcome", "delivered")
            .text("recipient_name", "A. Jansen")
            .part(
                "signature",
                reqwest::multipart::Part::bytes(files[0].clone()).file_name("sig.png"),
            );
        for (i, p) in files[1..].iter().enumerate() {
            form = form.part(
                "photo",
                reqwest::multipart::Part::bytes(p.clone()).file_name(format!("p{i}.jpg")),
            );
        }
        let r = client
            .post(url)
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let wait: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            busy += 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        return (status, r.json().await.unwrap(), busy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_concurrent_23mb_pods_stream_to_disk_and_reach_the_hub() {
    let stack = Stack::new(256 << 20);
    let mut hub = stack.start_hub().await;
    let mut agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();
    let job = json!({
        "id": "job-big", "version": 1,
        "stops": [{"id": "s1", "name": "Warehouse", "shipment_ids": ["shp-1"],
                   "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}}]
    });
    assert_eq!(ops.put_assignment("V1", &job).await, 202);
    ops.wait_assignment_acked("V1", 1).await;
    // Offline, as at a customer's dock: the uploads land in the store alone.
    hub.kill9();

    let pods: Vec<Vec<Vec<u8>>> = (0..PODS as u64)
        .map(|p| {
            let mut files = vec![image(b"\x89PNG\r\n\x1a\n", 100_000, p * 10)];
            for k in 1..=3 {
                files.push(image(&[0xff, 0xd8, 0xff, 0xe0], PHOTO_BYTES, p * 10 + k));
            }
            files
        })
        .collect();
    let total: usize = pods.iter().flatten().map(Vec::len).sum();
    assert!(total > PODS * 22_000_000, "{total}");

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let url = format!("{}/v1/stops/s1/pod", driver.base);
    let tasks: Vec<_> = pods
        .iter()
        .cloned()
        .map(|files| {
            let (client, url, token) = (client.clone(), url.clone(), driver.token.clone());
            tokio::spawn(async move { post_until_accepted(&client, &url, &token, &files).await })
        })
        .collect();
    let mut busy = 0;
    for t in tasks {
        let (status, body, b) = t.await.unwrap();
        assert_eq!(status, 201, "{body}");
        busy += b;
    }
    let pid = agent.child.id();
    let peak = proc_status_kib(pid, "VmHWM").unwrap();
    eprintln!("agent peak RSS with {PODS} concurrent PODs of {total} bytes: {peak} KiB");
    assert!(
        peak < MAX_RSS_KIB,
        "agent peak RSS {peak} KiB while taking {PODS} PODs of ~23 MB (bound {MAX_RSS_KIB} KiB)"
    );
    assert!(
        busy > 0,
        "five concurrent uploads against the agent's bound: some must be told to come back"
    );
    let status = driver.get_json("/v1/status").await;
    assert_eq!(status["backlog"]["blobs"]["events"], PODS * 4);

    // Accepted means durable: kill -9, then the hub comes back and a new agent process
    // sends everything from its files.
    agent.kill9();
    let _hub = stack.start_hub().await;
    let agent = stack.start_agent().await;
    let pod_events = wait_for(Duration::from_secs(120), || {
        let ops = ops.clone();
        async move {
            let page: Value = ops
                .get("/v1/ops/devices/V1/events?kind=pod")
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let evs = page["events"].as_array()?.clone();
            (evs.len() == PODS).then_some(evs)
        }
    })
    .await
    .expect("the PODs did not reach the hub");
    let mut want: Vec<String> = pods.iter().flatten().map(|f| sha_hex(f)).collect();
    want.sort();
    let mut referenced: Vec<String> = pod_events
        .iter()
        .flat_map(|p| {
            std::iter::once(&p["signature"])
                .chain(p["photos"].as_array().unwrap())
                .map(|r| r["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    referenced.sort();
    assert_eq!(
        referenced, want,
        "the PODs reference other blobs than uploaded"
    );
    let drained = wait_for(Duration::from_secs(600), || {
        let driver = driver.clone();
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            (s["backlog"]["blobs"]["events"] == 0).then_some(())
        }
    })
    .await;
    assert!(drained.is_some(), "the blobs did not all reach the hub");
    for sha in &want {
        let r = ops.get(&format!("/v1/ops/blobs/{sha}")).await.unwrap();
        assert_eq!(r.status(), 200, "blob {sha} missing at the hub");
        let got = r.bytes().await.unwrap();
        assert_eq!(&sha_hex(&got), sha, "blob {sha} differs at the hub");
    }
    let peak = proc_status_kib(agent.child.id(), "VmHWM").unwrap();
    eprintln!("agent peak RSS while sending {total} bytes of blobs: {peak} KiB");
    assert!(
        peak < MAX_RSS_KIB,
        "agent peak RSS {peak} KiB while sending the blobs (bound {MAX_RSS_KIB} KiB)"
    );
    // Its copies are gone once the hub has them.
    let pod_dir = stack.dir.path().join("agent-data").join("pod");
    let left = wait_for(Duration::from_secs(10), || {
        let n = std::fs::read_dir(&pod_dir).map(|d| d.count()).unwrap_or(0);
        async move { (n == 0).then_some(()) }
    })
    .await;
    assert!(left.is_some(), "blob files left in {}", pod_dir.display());
}

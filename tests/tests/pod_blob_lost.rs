//! A POD blob whose file is lost from the agent's store while it runs (deleted, or cut
//! short) does not hold up the others: the agent logs an error, drops that blob and sends
//! the next. A POD is taken offline with a signature and two photos; the files of the two
//! blobs the uplink would send first (digest order) are deleted and truncated; when the
//! hub returns, the POD event and the third blob arrive byte for byte and the agent's
//! blob backlog drains to zero.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_tests::{Stack, image, wait_for};
use serde_json::Value;
use sha2::Digest as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_blob_files_are_dropped_and_the_other_blobs_still_reach_the_hub() {
    let stack = Stack::new(64 << 20);
    let mut hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();
    ops.one_stop_job("job-lost").await;
    hub.kill9();

    let files = [
        image(b"\x89PNG\r\n\x1a\n", 3_000, 1),
        image(&[0xff, 0xd8, 0xff, 0xe0], 60_000, 2),
        image(&[0xff, 0xd8, 0xff, 0xe1], 50_000, 3),
    ];
    let form = reqwest::multipart::Form::new()
        .text("outcome", "delivered")
        .text("recipient_name", "A. Jansen")
        .part(
            "signature",
            reqwest::multipart::Part::bytes(files[0].clone()).file_name("sig.png"),
        )
        .part(
            "photo",
            reqwest::multipart::Part::bytes(files[1].clone()).file_name("p1.jpg"),
        )
        .part(
            "photo",
            reqwest::multipart::Part::bytes(files[2].clone()).file_name("p2.jpg"),
        );
    let r = driver
        .client
        .post(format!("{}/v1/stops/s1/pod", driver.base))
        .bearer_auth(&driver.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // The uplink takes pending blobs in digest order: damage the first two.
    let mut shas: Vec<String> = files
        .iter()
        .map(|f| hex::encode(sha2::Sha256::digest(f)))
        .collect();
    shas.sort();
    let pod_dir = stack.dir.path().join("agent-data").join("pod");
    std::fs::remove_file(pod_dir.join(&shas[0])).unwrap();
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(pod_dir.join(&shas[1]))
        .unwrap();
    cut.set_len(1_000).unwrap();
    drop(cut);

    let _hub = stack.start_hub().await;
    let arrived = wait_for(Duration::from_secs(60), || {
        let (ops, sha) = (ops.clone(), shas[2].clone());
        async move {
            let r = ops.get(&format!("/v1/ops/blobs/{sha}")).await.ok()?;
            if r.status() != 200 {
                return None;
            }
            Some(r.bytes().await.ok()?.to_vec())
        }
    })
    .await
    .expect("the intact blob never reached the hub: the lost ones held it up");
    assert_eq!(hex::encode(sha2::Sha256::digest(&arrived)), shas[2]);
    let pods: Value = ops.get_json("/v1/ops/devices/V1/events?kind=pod").await;
    assert_eq!(pods["events"].as_array().unwrap().len(), 1);
    for lost in &shas[..2] {
        let r = ops.get(&format!("/v1/ops/blobs/{lost}")).await.unwrap();
        assert_eq!(r.status(), 404, "lost blob {lost} at the hub");
    }
    let drained = wait_for(Duration::from_secs(30), || {
        let driver = driver.clone();
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            (s["backlog"]["blobs"]["events"] == 0).then_some(())
        }
    })
    .await;
    assert!(drained.is_some(), "the lost blobs' records were kept");
    let log = std::fs::read_to_string(stack.dir.path().join("agent.log")).unwrap();
    for lost in &shas[..2] {
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(lost.as_str())),
            "no error logged for lost blob {lost}"
        );
    }
}

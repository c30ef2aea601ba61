//! A POD upload whose client stalls part-way (a tablet gone off the Wi-Fi leaves a
//! half-open connection) gives everything back after `api.body_timeout_ms`: two stalled
//! uploads hold both upload places, their quota reservations and their partial files
//! (a third POD is told 503); once the timeout passes each is answered 408, the store's
//! used bytes are back where they were, no partial file is left in `pod/`, and two new
//! PODs are taken at once without a 503.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_tests::{Http, Stack, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUNDARY: &str = "stalled-boundary-7f3a";
/// Photo bytes sent before stalling: at least one 256 KiB block reaches the store's file.
const SENT_PHOTO_BYTES: usize = 600_000;
/// The timeout the agent is configured with here.
const BODY_TIMEOUT_MS: u64 = 1000;

fn jpeg(n: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0xff, 0xd8, 0xff, 0xe0];
    v.extend((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

/// Opens a POD upload on a raw connection: headers announcing a 3 MB body, the text
/// fields and the first `SENT_PHOTO_BYTES` of a photo; then sends nothing more.
async fn stalled_upload(driver: &Http, seed: u8) -> TcpStream {
    let addr = driver.base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut body = Vec::new();
    for (name, value) in [("outcome", "delivered"), ("recipient_name", "A. Jansen")] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"p.jpg\"\r\n\
             Content-Type: image/jpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&jpeg(SENT_PHOTO_BYTES, seed));
    let head = format!(
        "POST /v1/stops/s1/pod HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 3000000\r\n\r\n",
        driver.token
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    s
}

async fn post_pod(driver: &Http, seed: u8) -> reqwest::StatusCode {
    let form = reqwest::multipart::Form::new()
        .text("outcome", "delivered")
        .text("recipient_name", "A. Jansen")
        .part(
            "photo",
            reqwest::multipart::Part::bytes(jpeg(300_000, seed)).file_name("p.jpg"),
        );
    driver
        .client
        .post(format!("{}/v1/stops/s1/pod", driver.base))
        .bearer_auth(&driver.token)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .status()
}

fn partial_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_are_answered_408_and_give_back_their_place_quota_and_files() {
    let stack = Stack::new(64 << 20);
    // A short body timeout, and health events rare enough that the store's figures
    // hold still while the test compares them.
    let cfg = std::fs::read_to_string(&stack.agent_cfg).unwrap();
    let cfg = cfg
        .replace(
            "[api]\n",
            &format!("[api]\nbody_timeout_ms = {BODY_TIMEOUT_MS}\n"),
        )
        .replace("interval_s = 1\n", "interval_s = 3600\n");
    std::fs::write(&stack.agent_cfg, cfg).unwrap();
    let mut hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();
    ops.one_stop_job("job-stall").await;
    // Offline: nothing is acked (or deleted) while the figures are compared.
    hub.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let used = |s: &Value| s["disk"]["used_bytes"].as_u64().unwrap();
    let before = used(&driver.get_json("/v1/status").await);
    let pod_dir = stack.dir.path().join("agent-data").join("pod");
    assert!(partial_files(&pod_dir).is_empty());

    let mut stalled = vec![
        stalled_upload(&driver, 1).await,
        stalled_upload(&driver, 2).await,
    ];
    // Both hold an upload place, a reservation and a partial file.
    let held = wait_for(Duration::from_secs(5), || {
        let driver = driver.clone();
        let pod_dir = pod_dir.clone();
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            let reserved = used(&s).saturating_sub(before);
            (reserved >= 2 * 256 * 1024 && partial_files(&pod_dir).len() == 2).then_some(())
        }
    })
    .await;
    assert!(
        held.is_some(),
        "the stalled uploads did not reach the store: {}",
        driver.get_json("/v1/status").await
    );
    assert_eq!(
        post_pod(&driver, 3).await,
        503,
        "two uploads in progress: a third is told to come back"
    );

    // Past the body timeout each stalled client is told 408 ...
    for s in &mut stalled {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "a stalled upload was not answered within 10 s (body timeout {BODY_TIMEOUT_MS} ms)"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    // ... and its reservation and partial file are gone.
    let s = driver.get_json("/v1/status").await;
    assert_eq!(
        used(&s),
        before,
        "quota reservations of stalled uploads kept: {s}"
    );
    assert_eq!(partial_files(&pod_dir), Vec::<String>::new());

    // Both upload places are free: two PODs at once, neither told 503.
    let (a, b) = tokio::join!(post_pod(&driver, 4), post_pod(&driver, 5));
    assert_eq!((a.as_u16(), b.as_u16()), (201, 201));
    drop(stalled);
}

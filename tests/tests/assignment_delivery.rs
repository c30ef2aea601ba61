//! An assignment the operator sends while the device is offline reaches it as soon as it
//! connects and subscribes, not only at the hub's periodic resend (10 s): a van that starts
//! its shift right after dispatch gets its stops at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_tests::{Http, OPERATOR_TOKEN, Stack, wait_for};
use serde_json::{Value, json};

/// Well under the hub's periodic resend, so only delivery on subscribe can meet it.
const PROMPT: Duration = Duration::from_secs(5);

fn assignment(version: u32) -> Value {
    json!({
        "id": "job-9", "version": version,
        "stops": [{"id": "s1", "name": "Depot", "shipment_ids": [],
                   "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}}]
    })
}

async fn put(ops: &Http, version: u32) {
    let r = ops
        .client
        .put(format!("{}/v1/ops/devices/V1/assignment", ops.base))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&assignment(version))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}

/// Waits until the hub shows `version` acknowledged; returns how long that took.
async fn acked_within(ops: &Http, version: u32, since: Instant) -> Duration {
    wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        async move {
            let v: Value = ops
                .get("/v1/ops/devices/V1/assignment")
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["acknowledged"] == true && v["acked_version"] == version).then_some(())
        }
    })
    .await
    .unwrap_or_else(|| panic!("assignment v{version} never acknowledged"));
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_sent_while_offline_arrives_when_the_device_subscribes() {
    let stack = Stack::new(64 << 20);
    let _hub = stack.start_hub().await;
    let ops = stack.ops();

    // Dispatched before the van's gateway ever connected.
    put(&ops, 1).await;
    let started = Instant::now();
    let mut agent = stack.start_agent().await;
    let took = acked_within(&ops, 1, started).await;
    assert!(
        took < PROMPT,
        "first connection: v1 acknowledged after {took:?}"
    );
    let jobs = stack.driver().get_json("/v1/jobs").await;
    assert_eq!(jobs["id"], "job-9");
    assert_eq!(jobs["version"], 1);

    // A new version while the gateway is off (killed: no clean goodbye).
    agent.kill9();
    put(&ops, 2).await;
    let started = Instant::now();
    let _agent = stack.start_agent().await;
    let took = acked_within(&ops, 2, started).await;
    assert!(
        took < PROMPT,
        "reconnection: v2 acknowledged after {took:?}"
    );
    let jobs = stack.driver().get_json("/v1/jobs").await;
    assert_eq!(jobs["version"], 2);
}

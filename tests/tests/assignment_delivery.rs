//! An assignment the operator sends while the device is offline reaches it as soon as it
//! connects and subscribes, not only at the hub's periodic resend (10 s): a van that starts
//! its shift right after dispatch gets its stops at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_tests::Stack;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_sent_while_offline_arrives_when_the_device_subscribes() {
    let stack = Stack::new(64 << 20);
    let _hub = stack.start_hub().await;
    let ops = stack.ops();

    // Dispatched before the van's gateway ever connected.
    assert_eq!(ops.put_assignment("V1", &assignment(1)).await, 202);
    let started = Instant::now();
    let mut agent = stack.start_agent().await;
    ops.wait_assignment_acked("V1", 1).await;
    let took = started.elapsed();
    assert!(
        took < PROMPT,
        "first connection: v1 acknowledged after {took:?}"
    );
    let jobs = stack.driver().get_json("/v1/jobs").await;
    assert_eq!(jobs["id"], "job-9");
    assert_eq!(jobs["version"], 1);

    // A new version while the gateway is off (killed: no clean goodbye).
    agent.kill9();
    assert_eq!(ops.put_assignment("V1", &assignment(2)).await, 202);
    let started = Instant::now();
    let _agent = stack.start_agent().await;
    ops.wait_assignment_acked("V1", 2).await;
    let took = started.elapsed();
    assert!(
        took < PROMPT,
        "reconnection: v2 acknowledged after {took:?}"
    );
    let jobs = stack.driver().get_json("/v1/jobs").await;
    assert_eq!(jobs["version"], 2);
}

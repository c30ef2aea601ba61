//! Assignment down, POD up: the operator sends an assignment, the agent stores and
//! acknowledges it; with the hub down the driver captures a POD with a signature and two
//! photos; when the hub returns, the POD event and byte-identical blobs arrive. Bad POD
//! input is refused with the field named and nothing stored; a repeated Idempotency-Key
//! returns the first answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_tests::{Http, Stack, image, wait_for};
use serde_json::{Value, json};

fn assignment(version: u32) -> Value {
    json!({
        "id": "job-7", "version": version,
        "stops": [
            {"id": "depot", "name": "Depot", "shipment_ids": [],
             "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}},
            {"id": "s1", "name": "Bakery", "address": "Kade 1", "shipment_ids": ["shp-1"],
             "fence": {"type": "polygon", "coordinates": [[4.90, 52.37], [4.91, 52.37], [4.91, 52.38], [4.90, 52.38]]},
             "window": {"start": "2026-11-27T10:00:00Z", "end": "2026-11-27T12:00:00Z"}}
        ]
    })
}

async fn post_pod(
    driver: &Http,
    stop: &str,
    key: Option<&str>,
    parts: Vec<(&str, reqwest::multipart::Part)>,
) -> reqwest::Response {
    let mut form = reqwest::multipart::Form::new();
    for (name, part) in parts {
        form = form.part(name.to_string(), part);
    }
    let mut req = driver
        .client
        .post(format!("{}/v1/stops/{stop}/pod", driver.base))
        .bearer_auth(&driver.token)
        .multipart(form);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

fn text(s: &str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::text(s.to_string())
}

fn file(bytes: &[u8], name: &str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_captured_offline_arrives_with_its_blobs() {
    let stack = Stack::new(64 << 20);
    let mut hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();

    // Assignment down and acknowledged.
    assert_eq!(ops.put_assignment("V1", &assignment(1)).await, 202);
    let acked = ops.wait_assignment_acked("V1", 1).await;
    assert_eq!(acked["acked_version"], 1);
    // An older or equal version is refused with 409.
    assert_eq!(ops.put_assignment("V1", &assignment(1)).await, 409);
    let jobs = driver.get_json("/v1/jobs").await;
    assert_eq!(jobs["id"], "job-7");
    assert_eq!(jobs["stops"][1]["state"], "not_visited");
    assert_eq!(jobs["stops"][1]["shipment_ids"][0], "shp-1");

    // The hub goes down; the driver works on.
    hub.kill9();
    let signature = image(b"\x89PNG\r\n\x1a\n", 3_000, 1);
    let photo1 = image(&[0xff, 0xd8, 0xff, 0xe0], 200_000, 2);
    let photo2 = image(&[0xff, 0xd8, 0xff, 0xe1], 40_000, 3);

    // Bad input: field named, nothing stored.
    let before: Value = driver.get_json("/v1/status").await;
    type Case<'a> = (Vec<(&'a str, reqwest::multipart::Part)>, &'a str, u16);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![("outcome", text("lost")), ("recipient_name", text("A"))],
            "outcome",
            400,
        ),
        (vec![("outcome", text("refused"))], "reason_code", 400),
        (
            vec![
                ("outcome", text("delivered")),
                ("recipient_name", text("A")),
                ("photo", file(b"GIF89a....", "x.gif")),
            ],
            "photo",
            400,
        ),
        (
            vec![
                ("outcome", text("delivered")),
                ("recipient_name", text("A")),
                ("signature", file(&photo1, "s.jpg")),
            ],
            "signature",
            400,
        ),
        (
            vec![
                ("outcome", text("delivered")),
                ("recipient_name", text("A")),
                (
                    "photo",
                    file(&image(&[0xff, 0xd8, 0xff], 9 << 20, 0), "big.jpg"),
                ),
            ],
            "photo",
            400,
        ),
    ];
    for (parts, field, status) in cases {
        let r = post_pod(&driver, "s1", None, parts).await;
        assert_eq!(r.status().as_u16(), status);
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().starts_with(field), "{body}");
    }
    let r = post_pod(
        &driver,
        "nowhere",
        None,
        vec![("outcome", text("delivered"))],
    )
    .await;
    assert_eq!(r.status(), 404);
    let after: Value = driver.get_json("/v1/status").await;
    assert_eq!(
        before["backlog"]["critical"], after["backlog"]["critical"],
        "a refused POD left something behind"
    );

    let parts = || {
        vec![
            ("outcome", text("partial")),
            ("reason_code", text("short_shipped")),
            ("recipient_name", text("A. Jansen")),
            ("notes", text("2 of 3 crates")),
            ("signature", file(&signature, "sig.png")),
            ("photo", file(&photo1, "p1.jpg")),
            ("photo", file(&photo2, "p2.jpg")),
        ]
    };
    let r = post_pod(&driver, "s1", Some("tablet-42-pod-1"), parts()).await;
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    let again = post_pod(&driver, "s1", Some("tablet-42-pod-1"), parts()).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "a repeated key must return the first answer"
    );
    let clash = post_pod(
        &driver,
        "s1",
        Some("tablet-42-pod-1"),
        vec![
            ("outcome", text("delivered")),
            ("recipient_name", text("B")),
        ],
    )
    .await;
    assert_eq!(clash.status(), 422);
    let job = driver.get_json("/v1/jobs/s1").await;
    assert_eq!(job["pod"]["pod_id"], first["pod_id"]);
    let exc = driver
        .post_json(
            "/v1/exceptions",
            &json!({"code": "customer_absent", "text": "rang twice", "stop_id": "s1"}),
        )
        .await
        .unwrap();
    assert_eq!(exc.status(), 201);
    let bad = driver
        .post_json("/v1/exceptions", &json!({"code": "aliens", "text": "?"}))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The hub returns: the POD and its blobs arrive.
    let _hub = stack.start_hub().await;
    let pod = wait_for(Duration::from_secs(60), || {
        let ops = ops.clone();
        async move {
            let page: Value = ops
                .get("/v1/ops/devices/V1/events?kind=pod")
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            page["events"].as_array()?.first().cloned()
        }
    })
    .await
    .expect("POD did not reach the hub");
    assert_eq!(pod["pod_id"], first["pod_id"]);
    assert_eq!(pod["outcome"], "partial");
    assert_eq!(pod["reason_code"], "short_shipped");
    assert_eq!(pod["shipment_id"], "shp-1");
    assert_eq!(pod["photos"].as_array().unwrap().len(), 2);
    let pods = ops.get_json("/v1/ops/devices/V1/events?kind=pod").await;
    assert_eq!(
        pods["events"].as_array().unwrap().len(),
        1,
        "the replayed POD was stored twice"
    );
    let want = [
        (&pod["signature"], &signature),
        (&pod["photos"][0], &photo1),
        (&pod["photos"][1], &photo2),
    ];
    for (r, bytes) in want {
        let sha = r["sha256"].as_str().unwrap().to_string();
        let got = wait_for(Duration::from_secs(60), || {
            let (ops, sha) = (ops.clone(), sha.clone());
            async move {
                let resp = ops.get(&format!("/v1/ops/blobs/{sha}")).await.ok()?;
                if resp.status() != 200 {
                    return None;
                }
                Some(resp.bytes().await.ok()?.to_vec())
            }
        })
        .await
        .expect("blob did not arrive");
        assert!(&got == bytes, "blob {sha} differs");
    }
    // Blobs are deleted on the device once the hub has them.
    let drained = wait_for(Duration::from_secs(30), || {
        let driver = driver.clone();
        async move {
            let s: Value = driver.get("/v1/status").await.ok()?.json().await.ok()?;
            (s["backlog"]["blobs"]["events"] == 0).then_some(())
        }
    })
    .await;
    assert!(
        drained.is_some(),
        "blobs not deleted on the device after the hub's BlobAck"
    );
}

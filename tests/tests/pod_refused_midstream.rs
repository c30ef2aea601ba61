//! A POD refused part-way through its body is answered, not reset: the agent reads the
//! rest of the body before it answers, so a client that sent it all (no `100 Continue`)
//! reads the 400 naming the bad part, or the 507 of a full store, instead of a broken
//! connection; and the upload place is free again for the next POD.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleetsync_tests::{Http, Stack, image};
use serde_json::Value;

/// Posts a POD with `photos`; the status and body, or the transport error as text.
async fn post(driver: &Http, photos: &[Vec<u8>]) -> Result<(u16, Value), String> {
    let mut form = reqwest::multipart::Form::new()
        .text("outcome", "delivered")
        .text("recipient_name", "A. Jansen");
    for (i, p) in photos.iter().enumerate() {
        form = form.part(
            "photo",
            reqwest::multipart::Part::bytes(p.clone()).file_name(format!("p{i}.jpg")),
        );
    }
    let r = driver
        .client
        .post(format!("{}/v1/stops/s1/pod", driver.base))
        .bearer_auth(&driver.token)
        .multipart(form)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.map_err(|e| format!("{e:?}"))?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_refused_part_way_are_answered_and_free_their_place() {
    // 1 MiB: a 3 MB photo runs out of quota part-way.
    let stack = Stack::new(1 << 20);
    let mut hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let ops = stack.ops();
    let driver = stack.driver();
    ops.one_stop_job("job-refused").await;
    hub.kill9();

    let gif = b"GIF89a-not-a-photo".to_vec();
    let big = image(&[0xff, 0xd8, 0xff, 0xe0], 3_000_000, 1);
    let small = image(&[0xff, 0xd8, 0xff, 0xe0], 20_000, 2);
    // Several rounds: each refusal must come back as an answer, and leave both upload
    // places free (a held one would show as 503 within two rounds).
    for round in 0..4 {
        // A bad first part, then megabytes the agent no longer wants.
        let (status, body) = post(&driver, &[gif.clone(), big.clone()])
            .await
            .unwrap_or_else(|e| panic!("round {round}: 400 not read: {e}"));
        assert_eq!(status, 400, "round {round}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("photo"),
            "{body}"
        );
        // More than the quota: refused part-way with 507, the rest of the body unread.
        let (status, body) = post(&driver, &[big.clone(), big.clone()])
            .await
            .unwrap_or_else(|e| panic!("round {round}: 507 not read: {e}"));
        assert_eq!(status, 507, "round {round}: {body}");
    }
    let (status, body) = post(&driver, &[small]).await.unwrap();
    assert_eq!(status, 201, "{body}");
}

//! POD_CONFIRMED releases billing, and whoever hears of it can open its evidence, on sled
//! and on PostgreSQL: the ERP's message links the signature and the photo under
//! `/v1/erp/blobs/{sha256}`, which the ERP's own credential reads (a customer's is
//! refused, no credential is a 401); a webhook partner, which has no credential, gets
//! signed `/p/<token>` URLs scoped to that POD, which open without one until they expire,
//! and a tampered one is a 404. With `[http] public_url` set the links are absolute.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_protocol::TripKind;
use fleetsync_sim::fake_erp::{FakeErp, Request};
use fleetsync_tests::{TestHub, fix, pod_with_evidence, publish_batch, trip_event, wait_for};
use serde_json::{Value, json};

const C1: (f64, f64) = (51.5655, 5.0831);
/// The signed URLs' life in this test: long enough to read them once, short enough to
/// watch them expire.
const TTL_S: u64 = 8;

/// The first POD_CONFIRMED message among `reqs`, once one is there (30 s at most).
async fn pod_confirmed(what: &str, reqs: impl Fn() -> Vec<Request>) -> Request {
    wait_for(Duration::from_secs(30), || {
        let found = reqs()
            .into_iter()
            .find(|r| r.body["data"]["milestone"] == "POD_CONFIRMED");
        async move { found }
    })
    .await
    .unwrap_or_else(|| panic!("{what} never heard of POD_CONFIRMED"))
}

/// The evidence's (signature, photo) links of a POD_CONFIRMED message, as paths on the
/// hub: `public_url` (when the hub has one) is checked and taken off.
fn links(msg: &Value, public_url: Option<&str>) -> (String, String) {
    let ev = &msg["data"]["evidence"];
    assert_eq!(msg["data"]["billing_release"], true, "{msg}");
    assert_eq!(ev["recipient_name"], "M. de Vries", "{msg}");
    let path = |v: &Value| {
        let url = v.as_str().unwrap_or_else(|| panic!("no link: {msg}"));
        match public_url {
            Some(base) => url
                .strip_prefix(base)
                .unwrap_or_else(|| panic!("{url} is not under {base}"))
                .to_string(),
            None => {
                assert!(url.starts_with('/'), "{url}");
                url.to_string()
            }
        }
    };
    let photos = ev["photos"].as_array().unwrap();
    assert_eq!(photos.len(), 1, "{msg}");
    (path(&ev["signature"]), path(&photos[0]))
}

async fn evidence_links(fake: FakeErp, hub: TestHub, public_url: Option<&str>) {
    let ops = hub.http.clone();
    let erp = ops.credential("erp", "SAP prod").await;
    let (st, c) = ops
        .post(
            "/v1/ops/credentials",
            &json!({"role": "customer", "name": "ACME portal", "customer_id": "ACME"}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let acme = ops.with_token(c["token"].as_str().unwrap());
    let nobody = ops.with_token("");
    let r = ops
        .post_json(
            "/v1/ops/webhooks",
            &json!({"url": fake.hook_url("acme"), "customer_id": "ACME",
                    "event_types": ["shipment.pod_confirmed.v1"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sub: Value = r.json().await.unwrap();
    fake.set_hook_secrets("acme", vec![sub["secret"].as_str().unwrap().into()]);
    // The blobs first: the vehicle is known to the hub once it has connected.
    let sig = [&b"\x89PNG\r\n\x1a\n"[..], b"signature of M. de Vries"].concat();
    let photo = fleetsync_tests::image(&[0xff, 0xd8, 0xff, 0xe0], 9000, 3);
    let now = fleetsync_agent::now_ms() - 30_000;
    let pod = pod_with_evidence(&hub, "S1", "C1", C1, now + 1000, &sig, &photo).await;
    let sig_sha: [u8; 32] = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&sig).into()
    };
    let shipment = json!({"reference": "SO-1", "customer_id": "ACME", "vehicle": "V1",
        "stops": [{"id": "C1", "kind": "delivery", "name": "Bakery Jansen",
                   "location": {"lat": C1.0, "lon": C1.1}, "radius_m": 80}],
        "pod_policy": {"signature": true, "min_photos": 1}});
    let (st, v) = erp.put_json("/v1/erp/shipments/S1", &shipment).await;
    assert_eq!(st, 201, "{v}");

    publish_batch(
        &hub,
        "V1",
        0,
        &[
            fix(C1, now),
            trip_event(TripKind::Arrived, "C1", now + 500),
            pod,
        ],
    )
    .await;

    // The ERP: stable links under its own API, read with its own credential.
    let msg = pod_confirmed("the ERP", || fake.applied()).await;
    let (sig_url, photo_url) = links(&msg.body, public_url);
    assert_eq!(
        sig_url,
        format!("/v1/erp/blobs/{}", hex::encode(sig_sha)),
        "{}",
        msg.body
    );
    let r = erp.get(&sig_url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &sig[..]);
    let r = erp.get(&photo_url).await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &photo[..]);
    assert_eq!(acme.get(&sig_url).await.unwrap().status(), 403);
    assert_eq!(nobody.get(&sig_url).await.unwrap().status(), 401);
    let absent = format!("/v1/erp/blobs/{}", "ab".repeat(32));
    assert_eq!(erp.get(&absent).await.unwrap().status(), 404);
    let r = erp.get("/v1/erp/blobs/not-a-hash").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("sha256"));

    // The partner: signed links, no credential, for this POD's images only.
    let hook = pod_confirmed("the webhook", || fake.hook_applied("acme")).await;
    assert_eq!(fake.bad_signatures("acme"), 0);
    let (sig_url, photo_url) = links(&hook.body, public_url);
    assert!(sig_url.starts_with("/p/"), "{}", hook.body);
    let r = nobody.get(&sig_url).await.unwrap();
    assert_eq!(r.status(), 200, "a fresh link opens");
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &sig[..]);
    let r = nobody.get(&photo_url).await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &photo[..]);
    let mut bad = sig_url.clone();
    bad.insert(5, 'A');
    assert_eq!(nobody.get(&bad).await.unwrap().status(), 404);

    // Past its life the link is a 404, like one that never was.
    let expired_at = hook.received_ms + (TTL_S + 1) * 1000;
    let wait = expired_at.saturating_sub(fleetsync_agent::now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(nobody.get(&sig_url).await.unwrap().status(), 404);
    // The ERP's links do not expire.
    let (sig_url, _) = links(&msg.body, public_url);
    assert_eq!(erp.get(&sig_url).await.unwrap().status(), 200);
}

fn configure(c: &mut fleetsync_hub::Config, erp_url: String, public_url: Option<&str>) {
    c.erp.push(fleetsync_tests::erp_config(erp_url));
    c.webhooks.allow_insecure_targets = true;
    c.webhooks.retry_schedule_s = vec![0.0, 0.2, 0.5];
    c.webhooks.evidence_url_ttl_s = TTL_S;
    c.http.public_url = public_url.map(str::to_string);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled_with_public_url() {
    let fake = FakeErp::start().await.unwrap();
    let base = "https://hub.example.com";
    let url = fake.base_url();
    let hub = TestHub::start_with(&["V1"], None, |c| configure(c, url, Some(base))).await;
    evidence_links(fake, hub, Some(base)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(pg) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&pg).await;
    let fake = FakeErp::start().await.unwrap();
    let erp_url = fake.base_url();
    let hub = TestHub::start_with(&["V1"], Some(&url), |c| configure(c, erp_url, None)).await;
    evidence_links(fake, hub, None).await;
}

/// Links only make sense as a base address: anything else is refused when the config is
/// read, naming the key.
#[test]
fn a_bad_public_url_is_refused() {
    for bad in [
        "hub.example.com",
        "ftp://hub.example.com",
        "https://hub.example.com/?a=1",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pki = fleetsync_tests::pki(dir.path(), &["V1"]);
        let text = fleetsync_tests::hub_config(&pki, &dir.path().join("hub"), 0, 0)
            .replace("[http]\n", &format!("[http]\npublic_url = \"{bad}\"\n"));
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, text).unwrap();
        let err = fleetsync_hub::Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("public_url"), "{bad}: {err}");
    }
}

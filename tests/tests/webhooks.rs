//! Partner webhooks against fake receivers, on sled and on PostgreSQL: subscriptions
//! by customer and event type each get their milestones exactly once in effect and in
//! order, signed after Standard Webhooks (checked by the receivers, and on sled by the
//! reference verifier, PyPI `standardwebhooks`); a 500 is retried on the schedule; a
//! rotated secret signs next to the old one; a replay sends again under the same
//! `webhook-id`s; a 410 disables the subscription; bad targets are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use fleetsync_protocol::TripKind;
use fleetsync_sim::fake_erp::{FakeErp, Fault, Request, signature_valid};
use fleetsync_tests::{Http, TestHub, publish_batch, trip_event, wait_for};
use serde_json::{Value, json};

fn shipment(reference: &str, customer: &str, stop: &str) -> Value {
    json!({"reference": reference, "customer_id": customer, "vehicle": "V1",
        "stops": [{"id": stop, "kind": "delivery", "name": "Bakery Jansen",
                   "location": {"lat": 51.5655, "lon": 5.0831}, "radius_m": 80}]})
}

/// (shipment, event type) of what receiver `name` applied, in order.
fn applied(fake: &FakeErp, name: &str) -> Vec<(String, String)> {
    fake.hook_applied(name)
        .iter()
        .map(|r| {
            (
                r.body["subject"].as_str().unwrap().to_string(),
                r.body["type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn wait_applied(fake: &FakeErp, name: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let ok = wait_for(Duration::from_secs(30), || {
        let fake = fake.clone();
        let want = want.clone();
        async move {
            let mut got = applied(&fake, name);
            // Order holds per shipment; shipments interleave as they please.
            got.sort_by(|a, b| a.0.cmp(&b.0));
            (got == want).then_some(())
        }
    })
    .await;
    assert!(
        ok.is_some(),
        "{name}: applied {:?}, want {want:?}; requests {:?}",
        applied(fake, name),
        fake.hook_requests(name)
            .iter()
            .map(|r| (r.key.clone(), r.status))
            .collect::<Vec<_>>()
    );
}

async fn subscribe(ops: &Http, body: Value) -> Value {
    let r = ops.post_json("/v1/ops/webhooks", &body).await.unwrap();
    let st = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(st, 201, "{v}");
    v
}

/// Runs the reference verifier over `reqs` with `secret`; true if every one verifies.
fn reference_verifies(python: &str, secret: &str, reqs: &[Request]) -> bool {
    use base64::Engine as _;
    let lines: Vec<String> = reqs
        .iter()
        .map(|r| {
            json!({
                "id": r.key, "timestamp": r.timestamp, "signature": r.signature,
                "body": base64::engine::general_purpose::STANDARD.encode(&r.raw),
            })
            .to_string()
        })
        .collect();
    let script = r#"
import base64, json, sys
from standardwebhooks.webhooks import Webhook
wh = Webhook(sys.argv[1])
bad = 0
for line in sys.stdin:
    m = json.loads(line)
    headers = {"webhook-id": m["id"], "webhook-timestamp": m["timestamp"],
               "webhook-signature": m["signature"]}
    try:
        wh.verify(base64.b64decode(m["body"]), headers)
    except Exception as e:
        print("not verified:", m["id"], e)
        bad += 1
sys.exit(1 if bad else 0)
"#;
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(secret)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.join("\n").as_bytes()).unwrap();
    }
    child.wait().unwrap().success()
}

/// The reference verifier's Python, or `None` (a skip) outside CI.
fn python() -> Option<String> {
    match std::env::var("FLEETSYNC_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "FLEETSYNC_TEST_PYTHON is not set in CI: .ci/run must set it (.ci/webhook-deps)"
            );
            eprintln!(
                "SKIPPED: FLEETSYNC_TEST_PYTHON is not set; the reference verifier is not run"
            );
            None
        }
    }
}

async fn webhooks(fake: FakeErp, hub: TestHub, reference: bool) {
    let ops = hub.http.clone();
    let erp = ops.credential("erp", "SAP prod").await;
    let now = fleetsync_agent::now_ms();
    let started = chrono::Utc::now();
    publish_batch(
        &hub,
        "V1",
        0,
        &[trip_event(TripKind::Departed, "DEPOT", now - 60_000)],
    )
    .await;

    // Bad subscriptions are refused, naming the field.
    for (body, field) in [
        (json!({"url": "ftp://x.example/"}), "url"),
        (
            json!({"url": fake.hook_url("x"), "event_types": ["shipment.teleported.v1"]}),
            "event_types[0]",
        ),
        (
            json!({"url": fake.hook_url("x"), "colour": "red"}),
            "colour",
        ),
    ] {
        let r = ops.post_json("/v1/ops/webhooks", &body).await.unwrap();
        let st = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert!(st == 422 || st == 400, "{st} {v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }

    // A: everything; B: ACME's arrivals only.
    let a = subscribe(
        &ops,
        json!({"url": fake.hook_url("a"), "description": "all"}),
    )
    .await;
    let b = subscribe(
        &ops,
        json!({"url": fake.hook_url("b"), "customer_id": "ACME",
               "event_types": ["shipment.arrived.v1"]}),
    )
    .await;
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let a_secret = a["secret"].as_str().unwrap().to_string();
    assert!(a_secret.starts_with("whsec_"), "{a}");
    fake.set_hook_secrets("a", vec![a_secret.clone()]);
    fake.set_hook_secrets("b", vec![b["secret"].as_str().unwrap().into()]);
    let listed: Value = ops.get_json("/v1/ops/webhooks").await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        listed[0].get("secret").is_none(),
        "secrets only when made: {listed}"
    );

    // A 500 at A first: retried on the schedule.
    fake.plan_hook("a", [Fault::Status(500)]);
    for (id, reference, customer, stop) in
        [("S1", "SO-1", "ACME", "C1"), ("S2", "SO-2", "OTHER", "C2")]
    {
        let (st, v) = erp
            .put_json(
                &format!("/v1/erp/shipments/{id}"),
                &shipment(reference, customer, stop),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    publish_batch(
        &hub,
        "V1",
        1,
        &[
            trip_event(TripKind::Arrived, "C1", now - 30_000),
            trip_event(TripKind::Arrived, "C2", now - 20_000),
        ],
    )
    .await;
    wait_applied(
        &fake,
        "a",
        &[
            ("S1", "shipment.planned.v1"),
            ("S1", "shipment.arrived.v1"),
            ("S2", "shipment.planned.v1"),
            ("S2", "shipment.arrived.v1"),
        ],
    )
    .await;
    wait_applied(&fake, "b", &[("S1", "shipment.arrived.v1")]).await;
    assert_eq!(fake.bad_signatures("a") + fake.bad_signatures("b"), 0);
    let reqs = fake.hook_requests("a");
    assert_eq!(reqs[0].status, 500, "the first attempt failed");
    let first = &reqs[0];
    let retried: Vec<&Request> = reqs.iter().filter(|r| r.key == first.key).collect();
    assert_eq!(
        retried.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 200],
        "the same webhook-id again after the 500"
    );
    let s1 = reqs
        .iter()
        .find(|r| r.body["subject"] == "S1" && r.status == 200)
        .unwrap();
    assert_eq!(s1.key, format!("webhook:{a_id}/S1/dispatched:V1"));
    assert_eq!(s1.body["id"], s1.key.as_str());
    assert_eq!(s1.body["specversion"], "1.0");
    assert_eq!(s1.body["data"]["reference"], "SO-1");
    assert_eq!(s1.correlation_id.as_deref(), Some("dispatched:V1"));
    let ts: u64 = s1.timestamp.as_deref().unwrap().parse().unwrap();
    assert!(
        ts.abs_diff(now / 1000) < 120,
        "webhook-timestamp in seconds: {ts}"
    );
    if let Some(py) = reference.then(python).flatten() {
        assert!(
            reference_verifies(&py, &a_secret, &fake.hook_applied("a")),
            "the reference verifier refused the hub's signatures"
        );
    }

    // Rotation: both secrets sign during the overlap.
    let (st, rot) = ops
        .post(
            &format!("/v1/ops/webhooks/{a_id}/rotate-secret"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 200, "{rot}");
    let new_secret = rot["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, a_secret);
    assert!(rot["previous_expires"].is_string(), "{rot}");
    fake.set_hook_secrets("a", vec![new_secret.clone()]);
    let (st, v) = erp
        .put_json("/v1/erp/shipments/S3", &shipment("SO-3", "OTHER", "C3"))
        .await;
    assert_eq!(st, 201, "{v}");
    publish_batch(
        &hub,
        "V1",
        3,
        &[trip_event(TripKind::Arrived, "C3", now - 10_000)],
    )
    .await;
    let got = wait_for(Duration::from_secs(30), || {
        let fake = fake.clone();
        async move {
            let v: Vec<Request> = fake
                .hook_applied("a")
                .into_iter()
                .filter(|r| r.body["subject"] == "S3")
                .collect();
            (v.len() == 2).then_some(v)
        }
    })
    .await
    .expect("S3's milestones never reached A after the rotation");
    for r in &got {
        let sig = r.signature.as_deref().unwrap();
        assert_eq!(sig.split(' ').count(), 2, "two signatures: {sig}");
        let t = r.timestamp.as_deref().unwrap();
        assert!(signature_valid(
            std::slice::from_ref(&a_secret),
            &r.key,
            t,
            &r.raw,
            sig
        ));
        assert!(signature_valid(
            std::slice::from_ref(&new_secret),
            &r.key,
            t,
            &r.raw,
            sig
        ));
    }
    if let Some(py) = reference.then(python).flatten() {
        assert!(reference_verifies(&py, &new_secret, &got), "new secret");
        assert!(reference_verifies(&py, &a_secret, &got), "old secret");
    }

    // Replay since the start: the same webhook-ids again, in order per shipment.
    let before: Vec<String> = fake
        .hook_applied("a")
        .iter()
        .map(|r| r.key.clone())
        .collect();
    let n_requests = fake.hook_requests("a").len();
    let since = started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (st, r) = ops
        .post(
            &format!("/v1/ops/webhooks/{a_id}/replay?since={since}"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 202, "{r}");
    assert_eq!(r["replayed"], 6, "{r}");
    let again = wait_for(Duration::from_secs(30), || {
        let fake = fake.clone();
        async move {
            let v = fake.hook_requests("a");
            (v.len() >= n_requests + 6).then_some(v[n_requests..].to_vec())
        }
    })
    .await
    .expect("the replay sent nothing");
    let keys: HashSet<&str> = again.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        before.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    assert_eq!(fake.hook_applied("a").len(), 6, "applied once in effect");
    let (st, _) = ops
        .post(
            &format!("/v1/ops/webhooks/{a_id}/replay?since=yesterday"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 400);

    // 410 Gone from B: disabled, the message a dead letter; enabling it again resumes.
    fake.plan_hook("b", [Fault::Status(410)]);
    let (st, v) = erp
        .put_json("/v1/erp/shipments/S4", &shipment("SO-4", "ACME", "C4"))
        .await;
    assert_eq!(st, 201, "{v}");
    publish_batch(
        &hub,
        "V1",
        4,
        &[trip_event(TripKind::Arrived, "C4", now - 5_000)],
    )
    .await;
    let sub = wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        let id = b_id.to_string();
        async move {
            let s: Value = ops.get_json(&format!("/v1/ops/webhooks/{id}")).await;
            (s["enabled"] == false).then_some(s)
        }
    })
    .await
    .expect("a 410 did not disable the subscription");
    assert!(
        sub["disabled_reason"].as_str().unwrap().contains("410"),
        "{sub}"
    );
    // The message that got the 410 is a dead letter (recorded just after the disabling).
    let letters = wait_for(Duration::from_secs(10), || {
        let ops = ops.clone();
        let id = b_id.to_string();
        async move {
            let l: Value = ops
                .get_json(&format!("/v1/ops/deadletters?sink=webhook:{id}"))
                .await;
            (!l.as_array()?.is_empty()).then_some(l)
        }
    })
    .await
    .expect("no dead letter for the 410");
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["shipment_id"], "S4");
    let r = ops
        .patch(
            &format!("/v1/ops/webhooks/{b_id}"),
            &json!({"enabled": true}),
        )
        .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let (st, _) = ops
        .post(
            &format!("/v1/ops/webhooks/{b_id}/replay?since={since}"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 202);
    wait_applied(
        &fake,
        "b",
        &[("S1", "shipment.arrived.v1"), ("S4", "shipment.arrived.v1")],
    )
    .await;

    // Metrics per subscription; deleting one stops it.
    let delivered = ops
        .metric(&format!(
            "fleetsync_hub_outbox_delivered_total{{sink=\"webhook:{a_id}\"}}"
        ))
        .await;
    assert!(delivered >= 12, "{delivered}");
    assert_eq!(ops.delete(&format!("/v1/ops/webhooks/{a_id}")).await, 204);
    let r = ops.get(&format!("/v1/ops/webhooks/{a_id}")).await.unwrap();
    assert_eq!(r.status(), 404);
}

fn hooks_config(c: &mut fleetsync_hub::Config) {
    c.webhooks.allow_insecure_targets = true;
    c.webhooks.retry_schedule_s = vec![0.0, 0.2, 0.2, 0.2, 0.2];
    c.webhooks.timeout_ms = 2_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    let fake = FakeErp::start().await.unwrap();
    let hub = TestHub::start_with(&["V1"], None, hooks_config).await;
    webhooks(fake, hub, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let db = fleetsync_tests::fresh_pg_db(&base).await;
    let fake = FakeErp::start().await.unwrap();
    let hub = TestHub::start_with(&["V1"], Some(&db), hooks_config).await;
    webhooks(fake, hub, false).await;
}

/// Without `allow_insecure_targets`, plain HTTP and loopback targets are refused; the
/// OpenAPI document covers the webhook calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_targets_are_refused() {
    let hub = TestHub::start(&["V1"]).await;
    for url in [
        "http://hooks.example.com/x",
        "https://127.0.0.1/x",
        "https://10.0.0.7/x",
        "https://[::1]/x",
        "https://169.254.169.254/latest/meta-data",
    ] {
        let r = hub
            .http
            .post_json("/v1/ops/webhooks", &json!({ "url": url }))
            .await
            .unwrap();
        let st = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(st, 422, "{url}: {v}");
        assert_eq!(v["field"], "url", "{v}");
    }
    // The OpenAPI document has every webhook call and the delivery itself.
    let doc = hub.http.get_json("/v1/openapi.json").await;
    for (path, method) in [
        ("/v1/ops/webhooks", "get"),
        ("/v1/ops/webhooks", "post"),
        ("/v1/ops/webhooks/{id}", "get"),
        ("/v1/ops/webhooks/{id}", "patch"),
        ("/v1/ops/webhooks/{id}", "delete"),
        ("/v1/ops/webhooks/{id}/rotate-secret", "post"),
        ("/v1/ops/webhooks/{id}/replay", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert!(doc["webhooks"]["partnerEvent"]["post"].is_object());
}

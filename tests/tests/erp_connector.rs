//! The ERP connector against a fake ERP, on sled and on PostgreSQL: every milestone the
//! ERP hears of is applied exactly once and in order per shipment, through a 503 with
//! Retry-After, a timeout after the ERP applied the call (the retry's same
//! Idempotency-Key gets a 409: done), and 500s that open the circuit breaker; a 422 makes
//! a dead letter with the ERP's answer, which a replay delivers under the same id.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_hub::config::ErpConfig;
use fleetsync_protocol::TripKind;
use fleetsync_sim::fake_erp::{FakeErp, Fault};
use fleetsync_tests::{Http, TestHub, publish_batch, trip_event, wait_for};
use serde_json::{Value, json};

fn erp_config(base_url: String) -> ErpConfig {
    ErpConfig {
        auth_header: Some("Bearer erp-secret".into()),
        timeout_ms: 700,
        ..fleetsync_tests::erp_config(base_url)
    }
}

fn shipment(reference: &str, stop: &str) -> Value {
    json!({"reference": reference, "customer_id": "ACME", "vehicle": "V1",
        "stops": [{"id": stop, "kind": "delivery", "name": "Bakery Jansen",
                   "location": {"lat": 51.5655, "lon": 5.0831}, "radius_m": 80}]})
}

/// The milestones the ERP applied for `subject`, in order.
fn applied_of(erp: &FakeErp, subject: &str) -> Vec<String> {
    erp.applied()
        .iter()
        .filter(|r| r.body["subject"] == subject)
        .map(|r| r.body["data"]["milestone"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_applied(erp: &FakeErp, subject: &str, want: &[&str]) {
    let ok = wait_for(Duration::from_secs(30), || {
        let erp = erp.clone();
        async move { (applied_of(&erp, subject) == want).then_some(()) }
    })
    .await;
    assert!(
        ok.is_some(),
        "{subject}: applied {:?}, want {want:?}; requests: {:?}",
        applied_of(erp, subject),
        erp.requests()
            .iter()
            .map(|r| (r.key.clone(), r.status))
            .collect::<Vec<_>>()
    );
}

async fn metric(ops: &Http, name: &str) -> u64 {
    ops.metric(&format!("{name}{{sink=\"sap\"}}")).await
}

async fn connector(erp: FakeErp, hub: TestHub) {
    let ops = hub.http.clone();
    let now = fleetsync_agent::now_ms();
    publish_batch(
        &hub,
        "V1",
        0,
        &[trip_event(TripKind::Departed, "DEPOT", now - 60_000)],
    )
    .await;
    let erp_api = ops.credential("erp", "SAP prod").await;

    // 1. A 503 with Retry-After, then a timeout after the ERP applied the call.
    erp.plan([
        Fault::RetryAfter(503, 1),
        Fault::ApplyThenStall(Duration::from_millis(1500)),
    ]);
    assert_eq!(
        erp_api
            .put_json("/v1/erp/shipments/S1", &shipment("SO-1", "C1"))
            .await
            .0,
        201
    );
    publish_batch(
        &hub,
        "V1",
        1,
        &[trip_event(TripKind::Arrived, "C1", now - 30_000)],
    )
    .await;
    wait_applied(&erp, "S1", &["DISPATCHED", "ARRIVED"]).await;
    let reqs = erp.requests();
    let dispatched: Vec<_> = reqs
        .iter()
        .filter(|r| r.body["data"]["milestone"] == "DISPATCHED")
        .collect();
    assert_eq!(
        dispatched.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 200, 409],
        "503, applied but timed out, then 409 under the same key"
    );
    assert!(dispatched.iter().all(|r| r.key == "sap/S1/dispatched:V1"));
    let first = &dispatched[0];
    assert_eq!(first.authorization.as_deref(), Some("Bearer erp-secret"));
    assert_eq!(first.correlation_id.as_deref(), Some("dispatched:V1"));
    let tp = first.traceparent.as_deref().unwrap();
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    let b = &first.body;
    assert_eq!(b["specversion"], "1.0");
    assert_eq!(b["id"], "sap/S1/dispatched:V1");
    assert_eq!(b["type"], "com.fleetsync.shipment.dispatched.v1");
    assert_eq!(b["subject"], "S1");
    assert_eq!(b["data"]["reference"], "SO-1");
    assert_eq!(b["data"]["state"], "PLANNED");
    assert!(b["data"]["erp_status"].is_string(), "{b}");
    assert_eq!(b["data"]["mapping_version"], "builtin-1");
    let arrived = erp
        .applied()
        .into_iter()
        .find(|r| r.body["data"]["milestone"] == "ARRIVED")
        .unwrap();
    assert_eq!(arrived.body["data"]["state"], "AT_DESTINATION");
    assert_eq!(arrived.body["data"]["stop_id"], "C1");

    // 2. 500s: the breaker opens (no request while open), then a probe closes it.
    erp.plan([Fault::Status(500), Fault::Status(500), Fault::Status(500)]);
    assert_eq!(
        erp_api
            .put_json("/v1/erp/shipments/S2", &shipment("SO-2", "C2"))
            .await
            .0,
        201
    );
    let open = wait_for(Duration::from_secs(20), || {
        let ops = ops.clone();
        async move { (metric(&ops, "fleetsync_hub_outbox_breaker_state").await == 2).then_some(()) }
    })
    .await;
    assert!(open.is_some(), "the breaker never opened");
    wait_applied(&erp, "S2", &["DISPATCHED"]).await;
    let s2: Vec<u16> = erp
        .requests()
        .iter()
        .filter(|r| r.body["subject"] == "S2")
        .map(|r| r.status)
        .collect();
    assert_eq!(
        s2,
        [500, 500, 500, 200],
        "one probe after the breaker's pause"
    );
    assert!(
        wait_for(Duration::from_secs(10), || {
            let ops = ops.clone();
            async move { (metric(&ops, "fleetsync_hub_outbox_breaker_state").await == 0).then_some(()) }
        })
        .await
        .is_some(),
        "the breaker never closed"
    );

    // 3. A 422 is final: a dead letter with the ERP's answer; a replay delivers it.
    erp.plan([Fault::Status(422)]);
    assert_eq!(
        erp_api
            .put_json("/v1/erp/shipments/S3", &shipment("SO-3", "C3"))
            .await
            .0,
        201
    );
    let letter = wait_for(Duration::from_secs(20), || {
        let ops = ops.clone();
        async move {
            let l: Value = ops.get_json("/v1/ops/deadletters?sink=sap").await;
            l.as_array()?.first().cloned()
        }
    })
    .await
    .expect("no dead letter");
    assert_eq!(letter["id"], "sap/S3/dispatched:V1", "{letter}");
    assert_eq!(letter["shipment_id"], "S3");
    assert_eq!(letter["error"], "HTTP 422 Unprocessable Entity", "{letter}");
    assert_eq!(letter["response"], "fake ERP fault 422", "{letter}");
    assert!(applied_of(&erp, "S3").is_empty());
    let id = "sap%2FS3%2Fdispatched:V1";
    let (st, r) = ops
        .post(&format!("/v1/ops/deadletters/{id}/replay"), &json!({}))
        .await;
    assert_eq!(st, 200, "{r}");
    wait_applied(&erp, "S3", &["DISPATCHED"]).await;
    let (st, _) = ops
        .post(&format!("/v1/ops/deadletters/{id}/replay"), &json!({}))
        .await;
    assert_eq!(st, 404, "replayed once");
    let l: Value = ops.get_json("/v1/ops/deadletters").await;
    assert_eq!(l, json!([]));

    // Every key applied once; the counters agree.
    let applied = erp.applied();
    let keys: std::collections::HashSet<&str> = applied.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), applied.len());
    assert_eq!(applied.len(), 4);
    assert_eq!(
        metric(&ops, "fleetsync_hub_outbox_dead_letters_total").await,
        1
    );
    assert!(metric(&ops, "fleetsync_hub_outbox_delivered_total").await >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    let erp = FakeErp::start().await.unwrap();
    let url = erp.base_url();
    let hub = TestHub::start_with(&["V1"], None, |c| c.erp = vec![erp_config(url)]).await;
    connector(erp, hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let db = fleetsync_tests::fresh_pg_db(&base).await;
    let erp = FakeErp::start().await.unwrap();
    let url = erp.base_url();
    let hub = TestHub::start_with(&["V1"], Some(&db), |c| c.erp = vec![erp_config(url)]).await;
    connector(erp, hub).await;
}

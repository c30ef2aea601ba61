//! Credentials made and revoked at run time through `/v1/ops/credentials`: each role
//! reaches its own API only, a token is shown once and stored as a digest, a revoked
//! token stops at once (also on a second hub process on the same PostgreSQL database),
//! and bad requests get problem details naming the field. On sled and on PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleetsync_tests::{Http, TestHub};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn make(ops: &Http, body: Value) -> (StatusCode, Value) {
    let r = ops.post_json("/v1/ops/credentials", &body).await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

fn as_(hub: &TestHub, token: &str) -> Http {
    Http {
        token: token.to_string(),
        ..hub.http.clone()
    }
}

async fn status(h: &Http, path: &str) -> StatusCode {
    h.get(path).await.unwrap().status()
}

async fn roles_revocation_and_errors(url: Option<&str>) {
    let hub = TestHub::start_on(&[], url).await;
    let ops = hub.http.clone();

    let (s, erp) = make(&ops, json!({"role": "erp", "name": "SAP prod"})).await;
    assert_eq!(s, StatusCode::CREATED, "{erp}");
    let erp_token = erp["token"].as_str().unwrap().to_string();
    assert!(erp_token.starts_with("fs_erp_"), "{erp}");
    let (s, op) = make(&ops, json!({"role": "operator", "name": "night shift"})).await;
    assert_eq!(s, StatusCode::CREATED);
    let op_token = op["token"].as_str().unwrap().to_string();
    let (s, cust) = make(
        &ops,
        json!({"role": "customer", "name": "ACME portal", "customer_id": "ACME"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(cust["customer_id"], "ACME");

    // Listed without tokens.
    let list = ops.get_json("/v1/ops/credentials").await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    let text = serde_json::to_string(list).unwrap();
    assert!(
        !text.contains("token") && !text.contains(&erp_token[7..]),
        "{text}"
    );

    // Each role reaches its own API only.
    let operator = as_(&hub, &op_token);
    assert_eq!(status(&operator, "/v1/ops/devices").await, StatusCode::OK);
    assert_eq!(
        status(&operator, "/v1/ops/credentials").await,
        StatusCode::OK
    );
    let erp = as_(&hub, &erp_token);
    let r = erp.get("/v1/ops/devices").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "problem details"
    );
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["status"], 403);
    assert!(p["detail"].as_str().unwrap().contains("erp"), "{p}");
    let customer = as_(&hub, cust["token"].as_str().unwrap());
    assert_eq!(
        status(&customer, "/v1/ops/devices").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&as_(&hub, "fs_operator_0000"), "/v1/ops/devices").await,
        StatusCode::UNAUTHORIZED
    );

    // An operator credential can make and revoke others; revoked means at once.
    let (s, extra) = make(&operator, json!({"role": "erp", "name": "staging"})).await;
    assert_eq!(s, StatusCode::CREATED);
    let r = ops
        .client
        .delete(format!(
            "{}/v1/ops/credentials/{}",
            ops.base,
            op["id"].as_str().unwrap()
        ))
        .bearer_auth(&ops.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        status(&operator, "/v1/ops/devices").await,
        StatusCode::UNAUTHORIZED
    );
    let r = ops
        .client
        .delete(format!(
            "{}/v1/ops/credentials/{}",
            ops.base,
            op["id"].as_str().unwrap()
        ))
        .bearer_auth(&ops.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A second hub process on the same database sees what the first made and revoked.
    if let Some(url) = url {
        let other = TestHub::start_on(&[], Some(url)).await;
        let n = other.http.get_json("/v1/ops/credentials").await;
        assert_eq!(n.as_array().unwrap().len(), 3, "{n}");
        assert_eq!(
            status(&as_(&other, &op_token), "/v1/ops/devices").await,
            StatusCode::UNAUTHORIZED
        );
        let extra_http = as_(&hub, extra["token"].as_str().unwrap());
        assert_eq!(
            status(&extra_http, "/v1/ops/devices").await,
            StatusCode::FORBIDDEN
        );
        let r = other
            .http
            .client
            .delete(format!(
                "{}/v1/ops/credentials/{}",
                other.http.base,
                extra["id"].as_str().unwrap()
            ))
            .bearer_auth(&other.http.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            status(&extra_http, "/v1/ops/devices").await,
            StatusCode::UNAUTHORIZED,
            "revoked through the other hub: unknown here at once"
        );
        other.shutdown.cancel();
    }

    // Bad requests name the field.
    for (body, field) in [
        (json!({"role": "admin", "name": "x"}), "role"),
        (json!({"role": "customer", "name": "x"}), "customer_id"),
        (
            json!({"role": "erp", "name": "x", "customer_id": "ACME"}),
            "customer_id",
        ),
        (
            json!({"role": "customer", "name": "x", "customer_id": "A C"}),
            "customer_id",
        ),
        (json!({"role": "erp", "name": ""}), "name"),
        (json!({"role": "erp", "name": "x", "scope": "all"}), "scope"),
    ] {
        let (s, p) = make(&ops, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {p}");
        assert_eq!(p["field"], field, "{body}: {p}");
        assert_eq!(p["status"], 400);
    }
    hub.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    roles_revocation_and_errors(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&base).await;
    roles_revocation_and_errors(Some(&url)).await;
}

//! The experience API with a real hub (on sled and on PostgreSQL) and a device publishing
//! with its certificate: two customers, ACME and BETA, with shipments on the same van.
//!
//! - each customer lists and reads only its own shipments, in the portal's vocabulary;
//!   the other's shipment is the same 404 as one that does not exist;
//! - ACME's open stream gets S1's state change and then the van's position while it
//!   drives to S1's stop; BETA's stream gets no position (the van is not on its way to
//!   BETA's stop); a reconnect with `Last-Event-ID` gets S1 again from the store;
//! - after the POD, the portal shows it with signature and photo URLs that work without
//!   a token and only for those blobs; a tampered URL is a 404;
//! - a tracking link shows the reduced view (no vehicle id, no customer, no other stop),
//!   stops after its expiry, and a tampered or revoked link is a 404.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetsync_protocol::TripKind;
use fleetsync_tests::{Http, TestHub, fix, pod_with_evidence, publish_batch, trip_event};
use serde_json::{Value, json};

const DEPOT: (f64, f64) = (51.5601, 5.0831);
const C1: (f64, f64) = (51.5655, 5.0831);
const C2: (f64, f64) = (51.5800, 5.1100);
const KEY: &str = "portal-test-link-key-0123456789abcdef";

fn stop(id: &str, kind: &str, at: (f64, f64)) -> Value {
    json!({"id": id, "kind": kind, "name": format!("stop {id}"), "address": format!("{id} street 1"),
           "location": {"lat": at.0, "lon": at.1}, "radius_m": 80})
}

async fn customer(ops: &Http, customer: &str, name: &str) -> (Http, String) {
    let (st, c) = ops
        .post(
            "/v1/ops/credentials",
            &json!({"role": "customer", "name": name, "customer_id": customer}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    (
        ops.with_token(c["token"].as_str().unwrap()),
        c["id"].as_str().unwrap().to_string(),
    )
}

/// A Server-Sent Events reader over a streaming response.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug)]
struct SseEvent {
    event: String,
    id: String,
    data: Value,
}

impl Sse {
    async fn open(http: &Http, path: &str, last_id: Option<&str>) -> Sse {
        let mut req = http
            .client
            .get(format!("{}{path}", http.base))
            .bearer_auth(&http.token)
            .timeout(Duration::from_secs(600));
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (heartbeat comments skipped), or None after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if event.is_empty() {
                    continue;
                }
                return Some(SseEvent {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event for which `f` holds, within `timeout`.
    async fn until(&mut self, timeout: Duration, f: impl Fn(&SseEvent) -> bool) -> SseEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(e) if f(&e) => return e,
                Some(_) => continue,
                None => panic!("no such event within {timeout:?}"),
            }
        }
    }
}

async fn portal(hub: TestHub) {
    let ops = hub.http.clone();
    let erp = ops.credential("erp", "SAP prod").await;
    let (acme, _) = customer(&ops, "ACME", "ACME portal").await;
    let (beta, _) = customer(&ops, "BETA", "BETA portal").await;
    // The van is known to the hub before shipments name it.
    let now = fleetsync_agent::now_ms();
    publish_batch(&hub, "V1", 0, &[fix(DEPOT, now - 120_000)]).await;
    let s1 = json!({"reference": "SO-1", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("DEPOT", "pickup", DEPOT), stop("C1", "delivery", C1)],
        "pod_policy": {"signature": true, "min_photos": 1}});
    let s2 = json!({"reference": "SO-2", "customer_id": "BETA", "vehicle": "V1",
        "stops": [stop("C2", "delivery", C2)]});
    let s3 = json!({"reference": "SO-3", "customer_id": "ACME",
        "stops": [stop("C3", "delivery", C2)]});
    for (id, s) in [("S1", &s1), ("S2", &s2), ("S3", &s3)] {
        let (st, b) = erp.put_json(&format!("/v1/erp/shipments/{id}"), s).await;
        assert_eq!(st, 201, "{b}");
    }

    // Own shipments only, in the portal's vocabulary.
    let list = acme.get_json("/v1/portal/shipments").await;
    let ids: Vec<&str> = list["shipments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.contains(&"S1") && ids.contains(&"S3"), "{list}");
    let s3v = &list["shipments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "S3")
        .unwrap();
    assert_eq!(s3v["status"], "Order received", "{list}");
    let blist = beta.get_json("/v1/portal/shipments").await;
    assert_eq!(blist["shipments"].as_array().unwrap().len(), 1, "{blist}");
    assert_eq!(blist["shipments"][0]["id"], "S2");
    let filtered = acme
        .get_json("/v1/portal/shipments?state=Order%20received")
        .await;
    assert!(
        filtered["shipments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "Order received"),
        "{filtered}"
    );
    let bad = acme
        .get("/v1/portal/shipments?state=IN_TRANSIT")
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let p: Value = bad.json().await.unwrap();
    assert_eq!(p["field"], "state", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("On its way"), "{p}");
    let theirs = acme.get("/v1/portal/shipments/S2").await.unwrap();
    let none = acme.get("/v1/portal/shipments/NOPE").await.unwrap();
    assert_eq!(
        (theirs.status().as_u16(), none.status().as_u16()),
        (404, 404)
    );
    assert_eq!(
        theirs.text().await.unwrap(),
        none.text().await.unwrap(),
        "nothing tells another customer's shipment from none"
    );
    assert_eq!(erp.get("/v1/portal/shipments").await.unwrap().status(), 403);
    assert_eq!(ops.get("/v1/portal/shipments").await.unwrap().status(), 403);
    let anon = ops.with_token("nope");
    assert_eq!(
        anon.get("/v1/portal/shipments").await.unwrap().status(),
        401
    );

    // Live: S1 leaves the depot, then the van drives towards C1.
    let mut a_stream = Sse::open(&acme, "/v1/portal/stream", None).await;
    let mut b_stream = Sse::open(&beta, "/v1/portal/stream", None).await;
    publish_batch(
        &hub,
        "V1",
        1,
        &[
            trip_event(TripKind::Arrived, "DEPOT", now - 60_000),
            trip_event(TripKind::Departed, "DEPOT", now - 50_000),
        ],
    )
    .await;
    let e = a_stream
        .until(Duration::from_secs(20), |e| {
            e.event == "shipment" && e.data["id"] == "S1" && e.data["status"] == "On its way"
        })
        .await;
    assert!(!e.id.is_empty(), "every event has an id");
    let resume_id = e.id.clone();
    assert_eq!(
        e.data["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["classifier"] == "ACT" && m["type"] == "DEPARTED")
            .count(),
        1,
        "{}",
        e.data
    );
    let text = e.data.to_string();
    assert!(
        !text.contains("\"V1\"") && !text.contains("SAP prod"),
        "no fleet or credential data: {text}"
    );
    let mid = ((DEPOT.0 + C1.0) / 2.0, DEPOT.1);
    publish_batch(&hub, "V1", 3, &[fix(mid, now - 1000)]).await;
    let p = a_stream
        .until(Duration::from_secs(20), |e| {
            e.event == "position"
                && e.data["vehicle"]["lat"]
                    .as_f64()
                    .is_some_and(|l| (l - mid.0).abs() < 1e-5)
        })
        .await;
    assert_eq!(p.data["shipment_id"], "S1", "{:?}", p);
    assert!(p.id.contains('~'), "{}", p.id);
    let got = acme.get_json("/v1/portal/shipments/S1").await;
    assert!(got["vehicle"]["lat"].is_number(), "{got}");
    assert_eq!(got["next_stop"]["id"], "C1", "{got}");
    let theirs = beta.get_json("/v1/portal/shipments/S2").await;
    assert!(
        theirs["vehicle"].is_null(),
        "the van is not on its way to BETA: {theirs}"
    );
    // BETA's stream carries nothing of the van.
    while let Some(e) = b_stream.next(Duration::from_secs(2)).await {
        assert_ne!(e.event, "position", "{e:?}");
        assert_ne!(e.data["id"], "S1", "{e:?}");
    }
    drop(b_stream);

    // A reconnect with Last-Event-ID gets S1 again, from the store.
    let mut again = Sse::open(&acme, "/v1/portal/stream", Some(&resume_id)).await;
    let e = again
        .until(Duration::from_secs(10), |e| {
            e.event == "shipment" && e.data["id"] == "S1"
        })
        .await;
    assert_eq!(e.data["status"], "On its way");
    drop(again);

    // Tracking links.
    let (st, link) = acme
        .post("/v1/portal/shipments/S1/links", &json!({"ttl_s": 3}))
        .await;
    assert_eq!(st, 201, "{link}");
    let url = link["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("/t/"), "{link}");
    assert!(link["expires"].is_string(), "{link}");
    let (st, p) = acme
        .post("/v1/portal/shipments/S2/links", &json!({"ttl_s": 60}))
        .await;
    assert_eq!(st, 404, "no link for another customer's shipment: {p}");
    let (st, p) = acme
        .post("/v1/portal/shipments/S1/links", &json!({"ttl_s": 0}))
        .await;
    assert_eq!((st.as_u16(), p["field"].clone()), (400, json!("ttl_s")));
    let nobody = Http::new(
        hub.http.base.trim_start_matches("http://").parse().unwrap(),
        "",
    );
    let t = nobody.get_json(&format!("{url}/json")).await;
    assert_eq!(t["status"], "On its way", "{t}");
    assert_eq!(t["reference"], "SO-1", "{t}");
    assert!(
        t["vehicle"]["lat"].is_number(),
        "on its way to this stop: {t}"
    );
    let text = t.to_string();
    for secret in ["V1", "ACME", "DEPOT", "stop DEPOT", "S2", "C2"] {
        assert!(!text.contains(secret), "the link shows {secret:?}: {text}");
    }
    let tampered = format!("{}x/json", url);
    let r = nobody.get(&tampered).await.unwrap();
    assert_eq!(r.status(), 404);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = nobody.get(&format!("{url}/json")).await.unwrap();
    assert_eq!(r.status(), 404, "expired");
    let expired_body = r.text().await.unwrap();
    let r = nobody.get(&tampered).await.unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        expired_body,
        "no difference to see"
    );
    // Revoked with the credential that made it.
    let (acme2, acme2_id) = customer(&ops, "ACME", "ACME shop").await;
    let (_, link2) = acme2
        .post("/v1/portal/shipments/S1/links", &json!({"ttl_s": 600}))
        .await;
    let url2 = link2["url"].as_str().unwrap().to_string();
    assert_eq!(
        nobody.get(&format!("{url2}/json")).await.unwrap().status(),
        200
    );
    let r = ops
        .client
        .delete(format!("{}/v1/ops/credentials/{acme2_id}", ops.base))
        .bearer_auth(&ops.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        nobody.get(&format!("{url2}/json")).await.unwrap().status(),
        404
    );
    let (_, link3) = acme
        .post("/v1/portal/shipments/S1/links", &json!({"ttl_s": 600}))
        .await;
    let url3 = link3["url"].as_str().unwrap().to_string();

    // The POD: signature and photo, then arrival and delivery.
    let sig = [&b"\x89PNG\r\n\x1a\n"[..], b"signature of M. de Vries"].concat();
    let photo = fleetsync_tests::image(&[0xff, 0xd8, 0xff, 0xe0], 9000, 7);
    let pod = pod_with_evidence(&hub, "S1", "C1", C1, now + 1000, &sig, &photo).await;
    publish_batch(
        &hub,
        "V1",
        4,
        &[
            fix(C1, now),
            trip_event(TripKind::Arrived, "C1", now + 500),
            pod,
        ],
    )
    .await;
    let e = a_stream
        .until(Duration::from_secs(30), |e| {
            e.event == "shipment" && e.data["id"] == "S1" && e.data["pod"]["confirmed"] == true
        })
        .await;
    let pod = &e.data["pod"];
    assert_eq!(pod["outcome"], "delivered", "{pod}");
    assert_eq!(pod["recipient"], "M. de Vries", "{pod}");
    assert_eq!(e.data["status"], "Delivered", "{}", e.data);
    assert!(
        e.data["vehicle"].is_null(),
        "no vehicle after delivery: {}",
        e.data
    );
    let sig_url = pod["signature"]["url"].as_str().unwrap();
    let photo_url = pod["photos"][0]["url"].as_str().unwrap();
    let r = nobody.get(sig_url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &sig[..]);
    let r = nobody.get(photo_url).await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &photo[..]);
    let mut bad = sig_url.to_string();
    bad.insert(5, 'A');
    assert_eq!(nobody.get(&bad).await.unwrap().status(), 404);

    // The link after delivery: the POD summary, nothing else new.
    let t = nobody.get_json(&format!("{url3}/json")).await;
    assert_eq!(t["pod"]["outcome"], "delivered", "{t}");
    assert_eq!(t["pod"]["signed"], true, "{t}");
    assert_eq!(t["pod"]["photos"], 1, "{t}");
    assert!(t["vehicle"].is_null(), "{t}");
    let text = t.to_string();
    for secret in ["de Vries", "/p/", "POD_CONFIRMED", "V1", "ACME"] {
        assert!(!text.contains(secret), "the link shows {secret:?}: {text}");
    }
    // Its own stream starts with the shipment.
    let mut ts = Sse::open(&nobody, &format!("{url3}/stream"), Some("0-")).await;
    let e = ts
        .until(Duration::from_secs(10), |e| e.event == "shipment")
        .await;
    assert_eq!(e.data["pod"]["outcome"], "delivered", "{:?}", e);
    assert!(e.data.get("id").is_none(), "{:?}", e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sled() {
    let hub = TestHub::start_with(&["V1"], None, |c| {
        c.portal.link_keys = vec![KEY.into()];
    })
    .await;
    portal(hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(base) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&base).await;
    let hub = TestHub::start_with(&["V1"], Some(&url), |c| {
        c.portal.link_keys = vec![KEY.into()];
    })
    .await;
    portal(hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_per_credential() {
    let hub = TestHub::start_with(&[], None, |c| {
        c.portal.rate_per_s = 0.5;
        c.portal.burst = 3;
    })
    .await;
    let (acme, _) = customer(&hub.http, "ACME", "ACME portal").await;
    let (beta, _) = customer(&hub.http, "BETA", "BETA portal").await;
    for _ in 0..3 {
        assert_eq!(
            acme.get("/v1/portal/shipments").await.unwrap().status(),
            200
        );
    }
    let r = acme.get("/v1/portal/shipments").await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    let p: Value = r.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("try again"), "{p}");
    assert_eq!(
        beta.get("/v1/portal/shipments").await.unwrap().status(),
        200,
        "another customer is not slowed down"
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        acme.get("/v1/portal/shipments").await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_covers_the_portal() {
    let hub = TestHub::start(&[]).await;
    let doc = hub.http.get_json("/v1/openapi.json").await;
    for (path, method) in [
        ("/v1/portal/statuses", "get"),
        ("/v1/portal/shipments", "get"),
        ("/v1/portal/shipments/{id}", "get"),
        ("/v1/portal/shipments/{id}/links", "post"),
        ("/v1/portal/stream", "get"),
        ("/t/{token}/json", "get"),
        ("/t/{token}/stream", "get"),
        ("/p/{token}", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert!(doc["components"]["schemas"]["PortalShipment"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["customer"]["scheme"],
        "bearer"
    );
}

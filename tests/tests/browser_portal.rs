//! The portal, the tracking page and the console in a real browser (headless Chromium
//! through WebDriver), each scenario with a real hub and a device publishing with its
//! certificate:
//!
//! - a customer signs in (after a wrong token is refused) and sees only its shipments;
//!   the status filter narrows the list; another customer's shipment is "no such";
//! - a state change and positions appear on the open shipment page without a reload;
//! - a tracking link opens without signing in, shows nothing of the fleet or customer,
//!   says "no longer works" at its expiry, and is then the same 404 page as a tampered one;
//! - the POD's signature and photo render (decoded: naturalWidth > 0);
//! - an operator accepts a review item in the console (with its evidence showing), and
//!   the customer's open page shows the POD confirmed without a reload.
//!
//! Every scenario checks the browser console: no script error, no CSP violation, no
//! failed load but the ones the scenario provokes (a refused token, an expired link).
//! Screenshots at phone and desktop size go to target/screenshots/.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod browser;

use std::time::{Duration, Instant};

use browser::{Browser, chromedriver};
use fleetsync_protocol::{Body, Event, Fix, TripKind};
use fleetsync_tests::{Http, TestHub, pod_with_evidence, publish_batch, trip_event};
use serde_json::{Value, json};

const DEPOT: (f64, f64) = (51.5601, 5.0831);
const C1: (f64, f64) = (51.5655, 5.0831);
const C2: (f64, f64) = (51.5800, 5.1100);
const FAR: (f64, f64) = (51.5600, 5.1200);
const KEY: &str = "browser-test-link-key-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);

fn stop(id: &str, kind: &str, name: &str, at: (f64, f64)) -> Value {
    json!({"id": id, "kind": kind, "name": name, "address": format!("{name} street 1, Tilburg"),
           "location": {"lat": at.0, "lon": at.1}, "radius_m": 80})
}

fn fix(at: (f64, f64), time_ms: u64) -> Event {
    Event {
        time_ms,
        body: Body::Position(Fix {
            lat_e7: (at.0 * 1e7) as i32,
            lon_e7: (at.1 * 1e7) as i32,
            speed_cmps: Some(900),
            heading_ddeg: Some(0),
            hdop_d: Some(9),
            satellites: Some(9),
        }),
    }
}

/// A customer credential of `customer`: the client and its token.
async fn customer(ops: &Http, customer: &str) -> (Http, String) {
    let (st, c) = ops
        .post(
            "/v1/ops/credentials",
            &json!({"role": "customer", "name": format!("{customer} portal"), "customer_id": customer}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let token = c["token"].as_str().unwrap().to_string();
    (ops.with_token(&token), token)
}

/// A hub with the link key set, the van known to it, and an ERP credential.
async fn hub() -> (TestHub, Http) {
    let hub = TestHub::start_with(&["V1"], None, |c| {
        c.portal.link_keys = vec![KEY.into()];
    })
    .await;
    let now = fleetsync_agent::now_ms();
    publish_batch(&hub, "V1", 0, &[fix(DEPOT, now - 600_000)]).await;
    let erp = hub.http.credential("erp", "SAP prod").await;
    (hub, erp)
}

async fn put_shipment(erp: &Http, id: &str, body: Value) {
    let (st, b) = erp
        .put_json(&format!("/v1/erp/shipments/{id}"), &body)
        .await;
    assert_eq!(st, 201, "{b}");
}

/// A POD of `shipment` at `stop` with a real signature (PNG) and photo (JPEG), stamped
/// at `geo`; the blobs are published first.
async fn pod_event(
    hub: &TestHub,
    shipment: &str,
    stop: &str,
    geo: (f64, f64),
    time_ms: u64,
) -> Event {
    let sig = fleetsync_sim::images::signature_png(7);
    let photo = fleetsync_sim::images::photo_jpeg(7);
    pod_with_evidence(hub, shipment, stop, geo, time_ms, &sig, &photo).await
}

/// Fails on any console error but failed loads of URLs containing one of `expected`.
async fn assert_clean_console(b: &mut Browser, expected: &[&str]) {
    let errors: Vec<Value> = b
        .console_errors()
        .await
        .into_iter()
        .filter(|e| {
            let msg = e["message"].as_str().unwrap_or_default();
            !(e["source"] == "network" && expected.iter().any(|x| msg.contains(x)))
        })
        .collect();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
}

/// Signs in on the open portal's form with `token`.
async fn sign_in(b: &Browser, token: &str) {
    b.wait_js(
        "the sign-in form",
        WAIT,
        "return !document.getElementById('signin').hidden",
    )
    .await;
    b.js("document.getElementById('token').value = '';", vec![])
        .await;
    b.type_into("#token", token).await;
    b.click("#signin-form button[type=submit]").await;
}

/// A marker that survives only as long as the page is not reloaded.
async fn mark_page(b: &Browser) {
    b.js("window.__sameLoad = 'yes';", vec![]).await;
}

async fn assert_not_reloaded(b: &Browser) {
    assert_eq!(
        b.js("return window.__sameLoad || 'reloaded';", vec![])
            .await,
        "yes",
        "the page was reloaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_signs_in_and_sees_only_its_shipments() {
    let Some(driver) = chromedriver() else { return };
    let (hub, erp) = hub().await;
    let (_acme, acme_token) = customer(&hub.http, "ACME").await;
    customer(&hub.http, "BETA").await;
    put_shipment(&erp, "S1", json!({"reference": "SO-1001", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("DEPOT", "pickup", "Depot Tilburg", DEPOT), stop("C1", "delivery", "Bakkerij Jansen", C1)]}))
    .await;
    put_shipment(
        &erp,
        "S2",
        json!({"reference": "SO-2002", "customer_id": "BETA",
        "stops": [stop("C2", "delivery", "Bloemen Beta", C2)]}),
    )
    .await;
    put_shipment(
        &erp,
        "S3",
        json!({"reference": "SO-1003", "customer_id": "ACME",
        "stops": [stop("C3", "delivery", "Kaashandel Acme", C2)]}),
    )
    .await;

    let mut b = Browser::start(&driver).await;
    let base = hub.http.base.clone();
    b.goto(&format!("{base}/portal/")).await;
    assert_eq!(
        b.js("return document.activeElement.id", vec![]).await,
        "token",
        "the token field has the focus"
    );
    b.screenshots("portal-signin").await;

    // A wrong token is refused with a message a person can act on.
    sign_in(&b, "not-a-token").await;
    b.wait_text("#signin-error", "not accepted", WAIT).await;

    sign_in(&b, &acme_token).await;
    b.wait_text("#shipments", "SO-1001", WAIT).await;
    b.wait_text("#shipments", "SO-1003", WAIT).await;
    let list = b.text("#shipments").await;
    assert!(!list.contains("SO-2002"), "BETA's shipment shows: {list}");
    assert!(
        list.contains("Planned") || list.contains("Order received"),
        "{list}"
    );
    // The token is in this tab's sessionStorage, not in a cookie or the URL.
    assert_eq!(b.js("return document.cookie", vec![]).await, "");
    assert_eq!(
        b.js(
            "return sessionStorage.getItem('fleetsync.portal.token')",
            vec![]
        )
        .await,
        acme_token.as_str()
    );
    b.screenshots("portal-list").await;

    // The status filter (a labelled select) narrows the list.
    b.js(
        "const s = document.getElementById('f-status'); s.value = 'Order received'; s.dispatchEvent(new Event('change'));",
        vec![],
    )
    .await;
    b.wait_js(
        "only Order received",
        WAIT,
        "const rows = [...document.querySelectorAll('#shipments li:not([hidden])')]; \
         return rows.length > 0 && rows.every(r => r.innerText.includes('Order received'));",
    )
    .await;
    let shown = b
        .js(
            "return [...document.querySelectorAll('#shipments li:not([hidden]) .ref')].map(e => e.innerText)",
            vec![],
        )
        .await;
    assert_eq!(shown, json!(["SO-1003"]), "S1 is Planned (on V1)");
    assert!(
        b.js(
            "return document.querySelector('label[for=f-status]') !== null && document.querySelector('label[for=f-ref]') !== null",
            vec![]
        )
        .await
        .as_bool()
        .unwrap()
    );

    // Another customer's shipment is "no such", like one that does not exist.
    b.goto(&format!("{base}/portal/#/s/S2")).await;
    b.wait_text("#shipment", "no such shipment", WAIT).await;
    assert_clean_console(&mut b, &["/v1/portal/statuses", "/v1/portal/shipments/S2"]).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_position_appear_without_reload() {
    let Some(driver) = chromedriver() else { return };
    let (hub, erp) = hub().await;
    let (_acme, token) = customer(&hub.http, "ACME").await;
    put_shipment(&erp, "S1", json!({"reference": "SO-1001", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("DEPOT", "pickup", "Depot Tilburg", DEPOT), stop("C1", "delivery", "Bakkerij Jansen", C1)]}))
    .await;

    let mut b = Browser::start(&driver).await;
    let base = hub.http.base.clone();
    // A sign-in link: the token rides in the fragment, which no request carries.
    b.goto(&format!("{base}/portal/#token={token}")).await;
    b.wait_text("#shipments", "SO-1001", WAIT).await;
    assert_eq!(
        b.js("return location.hash", vec![]).await,
        "#/",
        "the token left the address bar"
    );
    b.click("#shipments a.row").await;
    b.wait_text("#status", "Planned", WAIT).await;
    b.wait_text("#live", "Live", WAIT).await;
    mark_page(&b).await;

    let now = fleetsync_agent::now_ms();
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
    b.wait_text("#status", "On its way", WAIT).await;
    b.wait_text("#timeline", "Left Depot Tilburg", WAIT).await;

    let p1 = (DEPOT.0 + (C1.0 - DEPOT.0) * 0.3, DEPOT.1);
    let p2 = (DEPOT.0 + (C1.0 - DEPOT.0) * 0.6, DEPOT.1);
    publish_batch(&hub, "V1", 3, &[fix(p1, now - 20_000)]).await;
    b.wait_text("#vehicle-pos", "Last position", WAIT).await;
    publish_batch(&hub, "V1", 4, &[fix(p2, now - 10_000)]).await;
    // p2 is 40% of the 600 m from the depot to C1 short of C1: the marker moved there
    // and the track joins both fixes.
    b.wait_js(
        "the vehicle moved on the map, with its track",
        WAIT,
        "const m = /([0-9]+) m from Bakkerij Jansen/.exec(document.getElementById('vehicle-pos').innerText); \
         return document.querySelector('#map circle.veh') !== null && document.querySelector('#map polyline.track') !== null \
           && m !== null && Math.abs(Number(m[1]) - 240) <= 2;",
    )
    .await;
    assert!(
        b.js(
            "return document.querySelector('#map svg').dataset.scaleM",
            vec![]
        )
        .await
        .as_str()
        .is_some_and(|s| !s.is_empty()),
        "the map has a scale bar"
    );
    assert_not_reloaded(&b).await;
    b.screenshots("portal-shipment").await;
    assert_clean_console(&mut b, &[]).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_link_opens_without_login_and_expires() {
    let Some(driver) = chromedriver() else { return };
    let (hub, erp) = hub().await;
    let (acme, _) = customer(&hub.http, "ACME").await;
    put_shipment(&erp, "S1", json!({"reference": "SO-1001", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("DEPOT", "pickup", "Depot Tilburg", DEPOT), stop("C1", "delivery", "Bakkerij Jansen", C1)]}))
    .await;
    let now = fleetsync_agent::now_ms();
    publish_batch(
        &hub,
        "V1",
        1,
        &[
            trip_event(TripKind::Departed, "DEPOT", now - 50_000),
            fix((51.563, DEPOT.1), now - 5_000),
        ],
    )
    .await;
    let ttl_s = 8;
    let (st, link) = acme
        .post("/v1/portal/shipments/S1/links", &json!({"ttl_s": ttl_s}))
        .await;
    assert_eq!(st, 201, "{link}");
    let made = Instant::now();
    let url = format!("{}{}", hub.http.base, link["url"].as_str().unwrap());

    let mut b = Browser::start(&driver).await;
    b.goto(&url).await;
    b.wait_text("#detail-title", "SO-1001", WAIT).await;
    b.wait_text("#status", "On its way", WAIT).await;
    b.wait_text("#vehicle-pos", "from Bakkerij Jansen", WAIT)
        .await;
    let page = b.text("body").await;
    for secret in ["V1", "ACME", "Depot", "SAP", "Sign in"] {
        assert!(
            !page.contains(secret),
            "the tracking page shows {secret:?}:\n{page}"
        );
    }
    b.screenshots("tracking").await;

    // At expiry the open page says so by itself ...
    let left = Duration::from_secs(ttl_s).saturating_sub(made.elapsed());
    tokio::time::sleep(left).await;
    b.wait_text("#gone", "no longer works", WAIT).await;
    // ... and the link is the 404 page, the same as a tampered one.
    let anon = reqwest::Client::new();
    let expired = anon.get(&url).send().await.unwrap();
    assert_eq!(expired.status(), 404);
    assert!(
        expired.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let expired = expired.text().await.unwrap();
    let tampered = anon.get(format!("{url}x")).send().await.unwrap();
    assert_eq!(tampered.status(), 404);
    assert_eq!(
        tampered.text().await.unwrap(),
        expired,
        "nothing tells them apart"
    );
    b.goto(&url).await;
    b.wait_text("h1", "Not found", WAIT).await;
    let page = b.text("body").await;
    assert!(!page.contains("SO-1001"), "{page}");
    b.screenshots("tracking-expired").await;
    let path = link["url"].as_str().unwrap();
    assert_clean_console(&mut b, &[path]).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_signature_and_photo_render() {
    let Some(driver) = chromedriver() else { return };
    let (hub, erp) = hub().await;
    let (_acme, token) = customer(&hub.http, "ACME").await;
    put_shipment(
        &erp,
        "S1",
        json!({"reference": "SO-1001", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("C1", "delivery", "Bakkerij Jansen", C1)],
        "pod_policy": {"signature": true, "min_photos": 1}}),
    )
    .await;
    let mut b = Browser::start(&driver).await;
    b.goto(&format!("{}/portal/#token={token}", hub.http.base))
        .await;
    b.wait_text("#shipments", "SO-1001", WAIT).await;
    b.goto(&format!("{}/portal/#/s/S1", hub.http.base)).await;
    b.wait_text("#status", "Planned", WAIT).await;
    mark_page(&b).await;

    let now = fleetsync_agent::now_ms();
    let pod = pod_event(&hub, "S1", "C1", C1, now + 1000).await;
    publish_batch(
        &hub,
        "V1",
        1,
        &[
            fix(C1, now),
            trip_event(TripKind::Arrived, "C1", now + 500),
            pod,
        ],
    )
    .await;
    b.wait_text("#pod-confirmed", "Confirmed", WAIT).await;
    b.wait_text("#pod-recipient", "M. de Vries", WAIT).await;
    b.wait_text("#status", "Delivered", WAIT).await;
    let sizes = b
        .wait_js(
            "the POD images decoded",
            WAIT,
            "const imgs = [...document.querySelectorAll('#pod img')]; \
             if (imgs.length !== 2 || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null; \
             return imgs.map(i => [i.className, i.naturalWidth, i.naturalHeight]);",
        )
        .await;
    assert_eq!(
        sizes,
        json!([["pod-signature", 160, 60], ["pod-photo", 160, 120]]),
        "the signature and the photo, decoded at their real sizes"
    );
    assert!(
        b.js(
            "return [...document.querySelectorAll('#pod img')].every(i => i.alt.length > 0)",
            vec![]
        )
        .await
        .as_bool()
        .unwrap(),
        "images have text alternatives"
    );
    assert_not_reloaded(&b).await;
    b.screenshots("portal-pod").await;
    b.screenshots_at("portal-pod-images", Some("#pod")).await;
    assert_clean_console(&mut b, &[]).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_accepts_review_and_customer_sees_it_confirmed() {
    let Some(driver) = chromedriver() else { return };
    let (hub, erp) = hub().await;
    let (_acme, token) = customer(&hub.http, "ACME").await;
    let operator = hub.http.credential("operator", "Anna (dispatch)").await;
    put_shipment(
        &erp,
        "S2",
        json!({"reference": "SO-2002", "customer_id": "ACME", "vehicle": "V1",
        "stops": [stop("C2", "delivery", "Bloemen De Tulp", C2)],
        "pod_policy": {"signature": true, "min_photos": 1}}),
    )
    .await;

    // The customer's page is open on S2.
    let mut b = Browser::start(&driver).await;
    b.goto(&format!("{}/portal/#token={token}", hub.http.base))
        .await;
    b.wait_text("#shipments", "SO-2002", WAIT).await;
    b.goto(&format!("{}/portal/#/s/S2", hub.http.base)).await;
    b.wait_text("#status", "Planned", WAIT).await;
    mark_page(&b).await;
    let customer_tab = b.driver.window().await.unwrap();

    // The POD is captured 2 km from the stop: delivered, waiting in review.
    let now = fleetsync_agent::now_ms();
    let pod = pod_event(&hub, "S2", "C2", FAR, now).await;
    publish_batch(
        &hub,
        "V1",
        1,
        &[fix(FAR, now - 30_000), fix(FAR, now - 1_000), pod],
    )
    .await;
    b.wait_text("#pod-confirmed", "Being checked", WAIT).await;

    // The operator, in another tab: the console.
    let console_tab = b.driver.new_tab().await.unwrap();
    b.driver.switch_to_window(console_tab).await.unwrap();
    b.goto(&format!("{}/console/", hub.http.base)).await;
    b.wait_js(
        "the console's sign-in form",
        WAIT,
        "return !document.getElementById('signin').hidden",
    )
    .await;
    b.type_into("#token", &operator.token).await;
    b.click("#signin-form button[type=submit]").await;
    b.wait_text("#devices", "V1", WAIT).await;
    // Stuck: waiting any time at all (the hub's default is 15 min).
    b.js(
        "const s = document.getElementById('stuck-age'); s.value = '0'; s.dispatchEvent(new Event('change'));",
        vec![],
    )
    .await;
    b.wait_text("#stuck-list", "Waiting in review", WAIT).await;
    b.wait_text("#review-list", "Shipment S2", WAIT).await;
    b.wait_text(
        "#review-list",
        "POD: delivered, received by M. de Vries",
        WAIT,
    )
    .await;
    b.wait_js(
        "the evidence images decoded",
        WAIT,
        "const imgs = [...document.querySelectorAll('#review-list .evidence img')]; \
         return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);",
    )
    .await;
    assert!(
        b.js("return document.querySelector('#review-list .evidence svg.map polyline.track') !== null", vec![])
            .await
            .as_bool()
            .unwrap(),
        "the vehicle's positions around the POD are on the evidence map"
    );
    assert!(
        b.js(
            "return document.querySelector('#fleet-map svg circle.veh') !== null",
            vec![]
        )
        .await
        .as_bool()
        .unwrap(),
        "the fleet map shows the van"
    );
    b.screenshots("console").await;
    b.js(
        "document.getElementById('review').scrollIntoView();",
        vec![],
    )
    .await;
    b.screenshots("console-review").await;

    // Accept without a note: the console asks for one; with one: accepted.
    b.click("#review-list button.accept").await;
    b.wait_text("#review-list", "Write a note first", WAIT)
        .await;
    b.type_into(
        "#review-list input[type=text]",
        "customer confirmed by phone",
    )
    .await;
    b.click("#review-list button.accept").await;
    b.wait_text("#review-list", "Accepted by Anna (dispatch)", WAIT)
        .await;

    // The customer's page, still the same load, shows it confirmed.
    b.driver.switch_to_window(customer_tab).await.unwrap();
    b.wait_text("#pod-confirmed", "Confirmed", WAIT).await;
    b.wait_text("#timeline", "Proof of delivery confirmed", WAIT)
        .await;
    assert_not_reloaded(&b).await;
    b.screenshots("portal-confirmed").await;
    assert_clean_console(&mut b, &[]).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_carry_a_content_security_policy_and_no_token_in_cookies() {
    // Without a browser: the headers every page and asset is served with.
    let hub = TestHub::start(&[]).await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in [
        "/portal/",
        "/console/",
        "/t/nope",
        "/assets/portal.js",
        "/assets/app.css",
    ] {
        let r = c
            .get(format!("{}{path}", hub.http.base))
            .send()
            .await
            .unwrap();
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{path}: {csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert!(h.get("set-cookie").is_none(), "{path}");
    }
    let r = c
        .get(format!("{}/portal", hub.http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/portal/");
    let r = c
        .get(format!("{}/assets/portal.js", hub.http.base))
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].clone();
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let again = c
        .get(format!("{}/assets/portal.js", hub.http.base))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let none = c
        .get(format!("{}/assets/nope.js", hub.http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
}

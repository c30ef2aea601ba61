//! A device certificate stops working when it expires, resumed TLS sessions included: the
//! live connection is closed at notAfter, and the reconnect (which resumes the session
//! with a ticket carrying the old certificate) is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use fleetsync_tests::{TestHub, device_client};
use rumqttc::{Event as MqttEvent, Packet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_even_through_resumption() {
    let hub = TestHub::start(&[]).await;
    let lifetime = Duration::from_secs(5);
    let expires = SystemTime::now() + lifetime;
    fleetsync_hub::pki::issue_device_until(&hub.pki, "V9", expires).unwrap();
    // One client, one TLS config: every reconnect offers the session ticket it got.
    let (_client, mut el) = device_client(&hub.pki, "V9", "V9", hub.running_mqtt);
    let start = Instant::now();
    let mut connacks_before = 0;
    let mut connacks_after = 0;
    let mut dropped_at = None;
    while start.elapsed() < lifetime + Duration::from_secs(8) {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                // notAfter has a resolution of a second: count a CONNACK as "after" only
                // once the certificate is surely expired.
                if SystemTime::now() > expires + Duration::from_secs(1) {
                    connacks_after += 1;
                } else {
                    connacks_before += 1;
                }
            }
            Ok(Err(_)) => {
                if dropped_at.is_none() && SystemTime::now() + Duration::from_secs(1) >= expires {
                    dropped_at = Some(start.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            _ => {}
        }
    }
    assert!(
        connacks_before >= 1,
        "the certificate did not work while valid"
    );
    let dropped_at = dropped_at.expect("the connection outlived its certificate");
    assert!(
        dropped_at <= lifetime + Duration::from_secs(3),
        "dropped only {dropped_at:?} after a {lifetime:?} certificate"
    );
    assert_eq!(
        connacks_after, 0,
        "an expired certificate was accepted again"
    );
    assert!(
        hub.http
            .metric("fleetsync_hub_certificate_refusals_total")
            .await
            >= 2
    );
}

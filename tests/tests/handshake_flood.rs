//! Clients that open TCP connections and never finish a TLS handshake cannot keep the
//! fleet out: handshakes have a budget of their own and a cap per source address, apart
//! from the devices' connection limit. A hub process with `max_connections = 200` under a
//! flood of 2,000 stalled connections a second from one address: a device connects during
//! the flood, the refused strangers are counted, and the hub holds no handshake state
//! after it. Prints the connect time and the hub's RSS before, during and after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetsync_tests::{
    Http, OPERATOR_TOKEN, Proc, device_client, free_port, proc_status_kib, wait_for, wait_http_ok,
};
use rumqttc::{Event as MqttEvent, Packet};

const RATE_PER_S: u64 = 2000;
const HOLD: Duration = Duration::from_secs(2);

/// Opens `RATE_PER_S` connections a second from 127.0.0.2 to `target`, each held open
/// without a byte sent for `HOLD`, until `stop`.
async fn flood(target: SocketAddr, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        for _ in 0..RATE_PER_S / 100 {
            let opened = opened.clone();
            tokio::spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                if sock.bind("127.0.0.2:0".parse().unwrap()).is_err() {
                    return;
                }
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(1), sock.connect(target)).await
                {
                    opened.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(HOLD).await;
                    drop(s);
                }
            });
        }
    }
}

/// Time from a device client's start to its CONNACK (None: not within 15 s).
async fn connect_time(pki: &std::path::Path, mqtt: SocketAddr) -> Option<Duration> {
    let (_client, mut el) = device_client(pki, "V1", "V1", mqtt);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => return Some(t.elapsed()),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_handshakes_from_strangers_do_not_keep_devices_out() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleetsync_tests::pki(dir.path(), &["V1"]);
    let (mqtt, http) = (free_port(), free_port());
    let text = fleetsync_tests::hub_config(&pki, &dir.path().join("data"), mqtt, http).replace(
        "handshake_timeout_ms = 3000",
        "handshake_timeout_ms = 3000\nmax_connections = 200\nmax_handshakes = 256\nmax_handshakes_per_source = 32",
    );
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, text).unwrap();
    let hub = Proc::spawn("fleetsync-hub", &cfg, &dir.path().join("hub.log"));
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let mqtt_addr: SocketAddr = format!("127.0.0.1:{mqtt}").parse().unwrap();
    assert!(wait_http_ok(http_addr, "/readyz", Duration::from_secs(30)).await);
    let ops = Http::new(http_addr, OPERATOR_TOKEN);
    let pid = hub.child.id();
    let rss = || proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let before = connect_time(&pki, mqtt_addr)
        .await
        .expect("no connect before the flood");
    let rss_before = rss();

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let attacker = tokio::spawn(flood(mqtt_addr, stop.clone(), opened.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = connect_time(&pki, mqtt_addr).await;
    let rss_during = rss();
    let in_progress = ops.metric("fleetsync_hub_handshakes_in_progress").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    attacker.await.unwrap();
    let refused = ops.metric("fleetsync_hub_handshakes_refused_total").await;

    let during = during.expect("a device could not connect during the flood");
    assert!(
        in_progress <= 256,
        "{in_progress} handshakes in progress past the budget"
    );
    assert!(
        refused > 1000,
        "only {refused} of the flood's connections refused"
    );
    // Afterwards nothing of the flood is held.
    let drained = wait_for(Duration::from_secs(15), || {
        let ops = ops.clone();
        async move { (ops.metric("fleetsync_hub_handshakes_in_progress").await == 0).then_some(()) }
    })
    .await;
    assert!(drained.is_some(), "handshake state left after the flood");
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "flood: {} stalled connections opened in 5 s from one address, {refused} refused at once; \
         device connect time {:.0} ms before, {:.0} ms during; hub RSS {} KiB before, {} during, {} after",
        opened.load(Ordering::Relaxed),
        before.as_secs_f64() * 1000.0,
        during.as_secs_f64() * 1000.0,
        rss_before,
        rss_during,
        rss()
    );
}

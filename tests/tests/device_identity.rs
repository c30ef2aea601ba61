//! A device is who its certificate says: V1's certificate cannot get events recorded as
//! V2's, a client without a certificate is refused, and stalled TLS handshakes do not stop
//! real devices from connecting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{Batch, Body, BoundedVec, Event, Exception, Uplink, frame};
use fleetsync_tests::{TestHub, device_client};
use rumqttc::{Event as MqttEvent, Packet, QoS};

fn one_event_batch(text: &str) -> Vec<u8> {
    let ev = Event {
        time_ms: 1_795_773_600_000,
        body: Body::Exception(Exception {
            code: fleetsync_protocol::Code::try_from_str("test").unwrap(),
            text: fleetsync_protocol::BoundedString::try_from_str(text).unwrap(),
            stop_id: None,
        }),
    };
    frame::encode(&Uplink::Batch(Batch {
        epoch: 1,
        first_seq: 0,
        events: BoundedVec::try_from_iter([ev]).unwrap(),
    }))
    .unwrap()
}

/// Drives the event loop until it errors (disconnect) or `timeout`; returns whether it
/// was disconnected.
async fn disconnected_within(el: &mut rumqttc::EventLoop, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_certificate_cannot_publish_as_v2() {
    let hub = TestHub::start(&["V1", "V2"]).await;
    let (client, mut el) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    // Wait for the connection.
    loop {
        if let MqttEvent::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let v2_up = Layout::Embedded.topic("V2", Channel::Up).unwrap();
    client
        .publish(
            v2_up.as_str(),
            QoS::AtLeastOnce,
            false,
            one_event_batch("forged"),
        )
        .await
        .unwrap();
    assert!(
        disconnected_within(&mut el, Duration::from_secs(5)).await,
        "V1 publishing on V2's topic was not disconnected"
    );

    // Nothing recorded for V2; the attempt was counted.
    let r = hub.http.get("/v1/ops/devices/V2/events").await.unwrap();
    assert_eq!(r.status(), 404, "V2 has events recorded");
    assert_eq!(
        hub.http
            .metric("fleetsync_hub_topic_violations_total")
            .await,
        1
    );

    // A V1 certificate with client id V2 is refused too.
    let (_c2, mut el2) = device_client(&hub.pki, "V1", "V2", hub.running_mqtt);
    let mut got_connack = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), el2.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => got_connack = true,
            Ok(Err(_)) => break,
            _ => {}
        }
    }
    assert!(!got_connack, "a V1 certificate connected as V2");

    // Subscribing to V2's downlink is refused as well.
    let (c3, mut el3) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    loop {
        if let MqttEvent::Incoming(Packet::ConnAck(_)) = el3.poll().await.unwrap() {
            break;
        }
    }
    let v2_down = Layout::Embedded.topic("V2", Channel::Down).unwrap();
    c3.subscribe(v2_down.as_str(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        disconnected_within(&mut el3, Duration::from_secs(5)).await,
        "subscription to V2's downlink allowed"
    );
    assert!(
        hub.http
            .metric("fleetsync_hub_topic_violations_total")
            .await
            >= 3
    );

    // A last will naming V2's topic is refused: the broker would publish it unchecked.
    let dev = hub.pki.join("devices").join("V1");
    let tls = fleetsync_agent::client_tls(
        &hub.pki.join("ca.pem"),
        &dev.join("cert.pem"),
        &dev.join("key.pem"),
    )
    .unwrap();
    let mut opts = rumqttc::MqttOptions::new("V1", "localhost", hub.running_mqtt.port());
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    opts.set_last_will(rumqttc::LastWill::new(
        Layout::Embedded.topic("V2", Channel::Up).unwrap().as_str(),
        one_event_batch("will"),
        QoS::AtLeastOnce,
        false,
    ));
    let (_c5, mut el5) = rumqttc::AsyncClient::new(opts, 8);
    let mut will_connected = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), el5.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => will_connected = true,
            Ok(Err(_)) => break,
            _ => {}
        }
    }
    assert!(
        !will_connected,
        "a CONNECT with a last will on V2's topic was let through"
    );
    let before_v1 = hub
        .http
        .metric("fleetsync_hub_topic_violations_total")
        .await;
    assert!(before_v1 >= 4);
    assert_eq!(
        hub.http
            .get("/v1/ops/devices/V2/events")
            .await
            .unwrap()
            .status(),
        404
    );

    // V1 on its own topic is fine and gets acked.
    let (c4, mut el4) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    let down = Layout::Embedded.topic("V1", Channel::Down).unwrap();
    let up = Layout::Embedded.topic("V1", Channel::Up).unwrap();
    let mut acked = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !acked {
        match tokio::time::timeout(Duration::from_millis(200), el4.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                c4.subscribe(down.as_str(), QoS::AtLeastOnce).await.unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                c4.publish(
                    up.as_str(),
                    QoS::AtLeastOnce,
                    false,
                    one_event_batch("mine"),
                )
                .await
                .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                acked = matches!(
                    frame::decode(&p.payload),
                    Ok(fleetsync_protocol::Downlink::Ack(_))
                );
            }
            Ok(Err(e)) => panic!("V1 disconnected on its own topic: {e}"),
            _ => {}
        }
    }
    assert!(acked, "V1's own batch was not acked");
    let events = hub.http.all_events("V1").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["text"], "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let hub = TestHub::start(&["V1"]).await;
    // Trusts the CA but presents no certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in fleetsync_hub::tls::load_certs(&hub.pki.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(hub.running_mqtt)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // TLS 1.3: the refusal can surface on the handshake or on the first read.
    let refused = match connector.connect(name, tcp).await {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(&[0x10, 0x00]).await;
            let mut buf = [0u8; 16];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
                Ok(Err(_)) | Ok(Ok(0))
            )
        }
    };
    assert!(refused, "a client without a certificate got a session");
    assert!(
        hub.http
            .metric("fleetsync_hub_tls_handshake_failures_total")
            .await
            >= 1
    );
    assert_eq!(hub.http.metric("fleetsync_hub_connected_devices").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_block_devices() {
    let hub = TestHub::start(&["V1"]).await;
    // 100 sockets that open TCP and never say a word, from another address than the
    // device's (from the device's own address they would meet its per-source handshake
    // cap, mqtt.max_handshakes_per_source: tests/tests/handshake_flood.rs).
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        stalled.push(sock.connect(hub.running_mqtt).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (_client, mut el) = device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    let connected = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(MqttEvent::Incoming(Packet::ConnAck(_))) = el.poll().await {
                return;
            }
        }
    })
    .await;
    assert!(
        connected.is_ok(),
        "a device could not connect within 2 s past 100 stalled sockets"
    );
    eprintln!(
        "device connected in {:?} with 100 stalled sockets open",
        started.elapsed()
    );
    assert_eq!(stalled.len(), 100);
}

/// An MQTT 3.1.1 CONNECT with a clean session and `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut p = vec![0x10, (12 + id.len()) as u8];
    p.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

/// Opens a TLS session with `cfg`, sends CONNECT as `client_id`; returns how the
/// handshake went and whether the broker answered CONNACK "accepted".
async fn tls_connect(
    hub: &TestHub,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    client_id: &str,
) -> (Option<rustls::HandshakeKind>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    let tcp = tokio::net::TcpStream::connect(hub.running_mqtt)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    let kind = s.get_ref().1.handshake_kind();
    s.write_all(&connect_packet(client_id)).await.unwrap();
    let mut buf = [0u8; 4];
    // Reading also takes in the session tickets the hub sends after the handshake.
    let accepted = matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == [0x20, 0x02, 0x00, 0x00]
    );
    let _ = s.shutdown().await;
    (kind, accepted)
}

/// A reconnect resumes the TLS session (cheap for a hub facing a reconnect storm) however
/// many devices connected in between, and is still the same device: the resumed session
/// lets V1 in as V1 and not as anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_tls_and_keep_the_device_identity() {
    let hub = TestHub::start(&["V1", "V2"]).await;
    let config = || {
        let dev = hub.pki.join("devices").join("V1");
        std::sync::Arc::new(
            fleetsync_agent::client_tls(
                &hub.pki.join("ca.pem"),
                &dev.join("cert.pem"),
                &dev.join("key.pem"),
            )
            .unwrap(),
        )
    };
    let cfg = config();
    let (first, ok) = tls_connect(&hub, &cfg, "V1").await;
    assert_eq!(first, Some(rustls::HandshakeKind::Full));
    assert!(ok, "V1 not accepted on a full handshake");
    // More sessions than a server-side session cache of rustls's default size (256) holds.
    for _ in 0..300 {
        let (kind, _) = tls_connect(&hub, &config(), "V1").await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    }
    let (again, ok) = tls_connect(&hub, &cfg, "V1").await;
    assert_eq!(again, Some(rustls::HandshakeKind::Resumed), "no resumption");
    assert!(ok, "V1 not accepted on a resumed session");
    let (kind, ok) = tls_connect(&hub, &cfg, "V2").await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    assert!(!ok, "a resumed V1 session was let in as V2");
}

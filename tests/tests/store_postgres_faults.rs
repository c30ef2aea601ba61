//! The hub on PostgreSQL when things go wrong: a database that is down at start, a URL,
//! role or schema that cannot work (one clear error each, exit 64 for what an operator
//! must fix), and a database lost while devices stream (acks stop, readyz goes red, the
//! hub reconnects and resumes with nothing lost or doubled).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fleetsync_sim::chaos::proxy::{self, Mode};
use fleetsync_tests::{Stack, bin, free_port, pg_exec, wait_for};
use serde_json::{Value, json};

/// A hub config on `url` (PKI made in `dir`).
fn pg_config(dir: &std::path::Path, store: &str) -> std::path::PathBuf {
    let pki = if dir.join("pki").exists() {
        dir.join("pki")
    } else {
        fleetsync_tests::pki(dir, &[])
    };
    let text = fleetsync_tests::hub_config(&pki, &dir.join("unused"), free_port(), free_port());
    let start = text.find("[store]").unwrap();
    let end = text.find("[auth]").unwrap();
    let text = format!("{}[store]\n{store}\n{}", &text[..start], &text[end..]);
    let path = dir.join("hub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `fleetsync-hub ARGS --config CFG` to its end (60 s at most).
fn hub(args: &[&str], cfg: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(bin("fleetsync-hub"))
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_stores_are_refused_with_one_clear_error_each() {
    let Some(server) = fleetsync_tests::pg_url() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // Down at start: says so, exits non-zero but not 64 (systemd may retry).
    let down = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let cfg = pg_config(dir.path(), &format!("url = \"{down}\""));
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("postgres unavailable"), "{out}");

    // No such database.
    let missing = fleetsync_tests::pg_url_with_db(&server, "fleetsync_no_such_db");
    let cfg = pg_config(dir.path(), &format!("url = \"{missing}\""));
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("does not exist"), "{out}");

    // A role that may not create the hub's tables.
    let url = fleetsync_tests::fresh_pg_db(&server).await;
    let role = format!("fleetsync_noperm_{}", std::process::id());
    pg_exec(&server, &format!("DROP ROLE IF EXISTS {role}")).await;
    pg_exec(&server, &format!("CREATE ROLE {role} LOGIN")).await;
    let as_role = url.replacen("postgres@", &format!("{role}@"), 1);
    let cfg = pg_config(dir.path(), &format!("url = \"{as_role}\""));
    let (code, out) = hub(&["store", "migrate"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("permission denied"), "{out}");

    // Migrate alone, then a schema from a newer hub.
    let cfg = pg_config(dir.path(), &format!("url = \"{url}\""));
    let (code, out) = hub(&["store", "migrate"], &cfg);
    assert_eq!(code, Some(0), "{out}");
    let v = fleetsync_hub::store::postgres::SCHEMA_VERSION;
    assert!(out.contains(&format!("schema at version {v}")), "{out}");
    pg_exec(&url, "INSERT INTO fleetsync_schema (version) VALUES (999)").await;
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("newer than this hub knows"), "{out}");

    // Not a PostgreSQL URL; a store path that is a file; both set.
    let cfg = pg_config(dir.path(), "url = \"mysql://db/fleet\"");
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("not a PostgreSQL URL"), "{out}");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let cfg = pg_config(dir.path(), &format!("path = \"{}\"", file.display()));
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("not a directory"), "{out}");
    let cfg = pg_config(dir.path(), &format!("path = \"x\"\nurl = \"{url}\""));
    let (code, out) = hub(&["run"], &cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("not both"), "{out}");
    pg_exec(&server, &format!("DROP ROLE IF EXISTS {role}")).await;
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    let c = reqwest::Client::new();
    let r = c
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

fn event(n: usize) -> Value {
    json!({"code": "other", "text": format!("event-{n}")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_lost_mid_stream_stops_acks_and_resumes_exactly_once() {
    let Some(server) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&server).await;
    // The hub reaches PostgreSQL through a proxy the test can cut.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let pg_addr: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let sd = tokio_util::sync::CancellationToken::new();
    let link = proxy::start(listener, pg_addr, sd.clone());
    let via_proxy = url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{proxy_port}"), 1);
    assert_ne!(
        via_proxy, url,
        "FLEETSYNC_TEST_PG_URL must name 127.0.0.1:5432 for this test"
    );

    let stack = Stack::new(256 << 20);
    stack.use_postgres(&via_proxy);
    let _hub = stack.start_hub().await;
    let _agent = stack.start_agent().await;
    let driver = stack.driver();

    // A poster that keeps the agent busy; only 201s count as accepted.
    let accepted = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (accepted, next, stop, driver) =
            (accepted.clone(), next.clone(), stop.clone(), driver.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if let Ok(r) = driver.post_json("/v1/exceptions", &event(n)).await
                    && r.status() == 201
                {
                    accepted.lock().unwrap().insert(format!("event-{n}"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let ops = stack.ops();
    let stored = |ops: fleetsync_tests::Http| async move {
        ops.metric("fleetsync_hub_events_ingested_total").await
    };
    wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        async move { (stored(ops).await > 200).then_some(()) }
    })
    .await
    .expect("events did not reach the hub");

    // Lose PostgreSQL: readyz goes red and nothing more is stored or acked.
    link.set(Mode::Cut);
    let red = wait_for(Duration::from_secs(15), || async {
        (readyz(stack.hub_addr).await == Some(503)).then_some(())
    })
    .await;
    assert!(red.is_some(), "readyz stayed green without PostgreSQL");
    let during = stored(ops.clone()).await;
    let acks = ops.metric("fleetsync_hub_acks_sent_total").await;
    let backlog_cut = driver.backlog().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stored(ops.clone()).await,
        during,
        "stored without a database?"
    );
    assert_eq!(
        ops.metric("fleetsync_hub_acks_sent_total").await,
        acks,
        "acked while the database was gone"
    );
    assert!(
        driver.backlog().await.unwrap() > backlog_cut,
        "the agent's backlog did not grow while nothing was acked"
    );
    let failures = ops.metric("fleetsync_hub_store_failures_total").await;
    assert!(failures > 0, "no failed store round counted while cut");

    // Back: the hub reconnects by itself and resumes.
    link.set(Mode::Pass);
    let green = wait_for(Duration::from_secs(30), || async {
        (readyz(stack.hub_addr).await == Some(200)).then_some(())
    })
    .await;
    assert!(green.is_some(), "readyz did not come back with PostgreSQL");
    wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        async move { (stored(ops).await > during + 100).then_some(()) }
    })
    .await
    .expect("ingest did not resume");

    // Every backend of the hub terminated mid-stream: the same once more.
    let before = stored(ops.clone()).await;
    pg_exec(
        &server,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fleetsync-hub'",
    )
    .await;
    wait_for(Duration::from_secs(30), || {
        let ops = ops.clone();
        async move { (stored(ops).await > before + 100).then_some(()) }
    })
    .await
    .expect("ingest did not resume after pg_terminate_backend");

    stop.store(true, Ordering::SeqCst);
    poster.await.unwrap();
    assert!(
        driver.wait_drained(Duration::from_secs(60)).await,
        "agent backlog did not drain"
    );

    let events = ops.all_events("V1").await;
    let mut texts = HashSet::new();
    for e in events.iter().filter(|e| e["kind"] == "exception") {
        assert!(
            texts.insert(e["text"].as_str().unwrap().to_string()),
            "stored twice: {e}"
        );
    }
    let accepted = accepted.lock().unwrap().clone();
    let missing: Vec<_> = accepted.iter().filter(|k| !texts.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} accepted events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    eprintln!(
        "accepted {}, stored {}, failed rounds while cut {failures}",
        accepted.len(),
        texts.len()
    );
    sd.cancel();
}

/// A frame the store refuses every time (here: an ack for an assignment whose stored
/// record was damaged) costs its own ack, not everyone's: the batches that shared its
/// rounds are stored and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_the_store_always_refuses_does_not_stall_the_others() {
    use fleetsync_protocol::{
        AssignmentAck, Batch, Body, BoundedString, BoundedVec, Downlink, Event, Fix, Uplink, frame,
    };
    use rumqttc::{Event as MqttEvent, Packet, QoS};

    let Some(server) = fleetsync_tests::pg_url() else {
        return;
    };
    let url = fleetsync_tests::fresh_pg_db(&server).await;
    let hub = fleetsync_tests::TestHub::start_on(&["V1"], Some(&url)).await;
    let job = json!({"id": "job-1", "version": 1, "stops": []});
    assert_eq!(hub.http.put_assignment("V1", &job).await, 202);
    pg_exec(
        &url,
        "UPDATE assignments SET record = '\\x00ff'::bytea WHERE device = 'V1'",
    )
    .await;

    let encode = |first_seq: u64, events: Vec<Event>| {
        frame::encode(&Uplink::Batch(Batch {
            epoch: 1,
            first_seq,
            events: BoundedVec::try_from_slice(&events).unwrap(),
        }))
        .unwrap()
    };
    let t0 = 1_795_773_600_000u64;
    let bad = encode(
        0,
        vec![Event {
            time_ms: t0,
            body: Body::AssignmentAck(AssignmentAck {
                assignment_id: BoundedString::try_from_str("job-1").unwrap(),
                version: 1,
            }),
        }],
    );
    let good = |k: u64| {
        encode(
            k * 10,
            (0..10)
                .map(|i| Event {
                    time_ms: t0 + (k * 10 + i) * 1000,
                    body: Body::Position(Fix {
                        lat_e7: 520_000_000 + i as i32,
                        lon_e7: 49_000_000,
                        speed_cmps: None,
                        heading_ddeg: None,
                        hdop_d: None,
                        satellites: None,
                    }),
                })
                .collect(),
        )
    };
    let (client, mut el) = fleetsync_tests::device_client(&hub.pki, "V1", "V1", hub.running_mqtt);
    let (up, down) = fleetsync_tests::device_topics("V1");
    let mut acked: HashSet<u64> = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline && (1..=10).any(|k| !acked.contains(&(k * 10))) {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                // The refused frame beside every good one, as a device resending it would.
                for k in 1..=10 {
                    for f in [bad.clone(), good(k)] {
                        client
                            .publish(up.as_str(), QoS::AtLeastOnce, false, f)
                            .await
                            .unwrap();
                    }
                }
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(Downlink::Ack(a)) = frame::decode(&p.payload) {
                    acked.extend(a.ranges.iter().map(|r| r.first));
                }
            }
            Ok(Err(e)) => panic!("device connection failed: {e}"),
            _ => {}
        }
    }
    let missing: Vec<u64> = (1..=10)
        .map(|k| k * 10)
        .filter(|s| !acked.contains(s))
        .collect();
    assert!(missing.is_empty(), "good batches never acked: {missing:?}");
    assert!(!acked.contains(&0), "the refused frame was acked");
    assert!(hub.http.metric("fleetsync_hub_store_failures_total").await > 0);
    let stored = pg_exec(&url, "SELECT count(*) FROM events WHERE device = 'V1'").await;
    assert_eq!(
        stored[0].get::<_, i64>(0),
        100,
        "the ten good batches, not the refused one"
    );
}

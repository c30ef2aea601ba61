//! The delivery contract under kill -9: a hub and an agent as processes, 10,000 events
//! pushed through the agent's API while the agent is killed five times and the hub twice.
//! Afterwards the hub holds every event that got a 201, exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleetsync_tests::{Proc, Stack, wait_for, wait_http_ok};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const TOTAL: usize = 10_000;
const POSTERS: usize = 16;

/// Event number `n` and where it is posted: every fifth an exception (critical lane,
/// `POST /v1/exceptions`), the rest positions (`POST /v1/events`); the content identifies
/// it uniquely.
fn event(n: usize) -> (&'static str, Value) {
    let t = 1_795_773_600_000u64 + n as u64 * 1000;
    let time = fleetsync_protocol::json::Time(t).to_rfc3339();
    if n.is_multiple_of(5) {
        (
            "/v1/exceptions",
            json!({"kind": "exception", "code": "other", "text": format!("event-{n}")}),
        )
    } else {
        (
            "/v1/events",
            json!({"kind": "position", "event_time": time, "lat": 52.0 + n as f64 * 1e-5, "lon": 4.9}),
        )
    }
}

fn accepted_count(a: &std::sync::Mutex<HashSet<String>>) -> usize {
    a.lock().unwrap().len()
}

fn key_of(v: &Value) -> String {
    match v["kind"].as_str().unwrap() {
        "exception" => v["text"].as_str().unwrap().to_string(),
        "position" => format!("pos-{}", v["event_time"].as_str().unwrap()),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_accepted_event_arrives_exactly_once_through_kill9() {
    let stack = Stack::new(256 << 20);
    let (hub_cfg, agent_cfg) = (&stack.hub_cfg, &stack.agent_cfg);
    let hub_log = stack.dir.path().join("hub.log");
    let agent_log = stack.dir.path().join("agent.log");
    let hub_addr = stack.hub_addr;
    let hub = Arc::new(Mutex::new(stack.start_hub().await));
    let agent = Arc::new(Mutex::new(stack.start_agent().await));

    // Posters: each post uses a fresh event number (so every attempt has unique content);
    // only a 201 counts as accepted. A post cut off by a kill may or may not have been
    // stored: it is not counted, and the poster moves on to a new number.
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let driver = stack.driver();
    let mut posters = Vec::new();
    for _ in 0..POSTERS {
        let (next, accepted, driver) = (next.clone(), accepted.clone(), driver.clone());
        posters.push(tokio::spawn(async move {
            loop {
                if accepted.lock().unwrap().len() >= TOTAL {
                    return;
                }
                let (path, ev) = event(next.fetch_add(1, Ordering::SeqCst));
                let mut body = ev.clone();
                if let Some(o) = body.as_object_mut()
                    && path == "/v1/exceptions"
                {
                    o.remove("kind");
                }
                match driver.post_json(path, &body).await {
                    Ok(r) if r.status() == 201 => {
                        accepted.lock().unwrap().insert(key_of(&ev));
                    }
                    Ok(r) => panic!("agent answered {} to a valid event", r.status()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(30)).await,
                }
            }
        }));
    }

    // Chaos: 5 agent kills and 2 hub kills spread over the run.
    let plan = ["agent", "hub", "agent", "agent", "hub", "agent", "agent"];
    for (i, who) in plan.iter().enumerate() {
        let target = (i + 1) * TOTAL / (plan.len() + 1);
        wait_for(Duration::from_secs(120), || {
            let n = accepted_count(&accepted);
            async move { (n >= target).then_some(()) }
        })
        .await
        .expect("posting stalled");
        if *who == "agent" {
            let mut a = agent.lock().await;
            a.kill9();
            *a = Proc::spawn("fleetsync-agent", agent_cfg, &agent_log);
        } else {
            let mut h = hub.lock().await;
            h.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            *h = Proc::spawn("fleetsync-hub", hub_cfg, &hub_log);
        }
    }
    for p in posters {
        p.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= TOTAL,
        "only {} events accepted",
        accepted.len()
    );

    // Drain: the agent's backlog goes to zero once the hub has acked everything.
    assert!(wait_http_ok(hub_addr, "/readyz", Duration::from_secs(30)).await);
    assert!(
        driver.wait_drained(Duration::from_secs(120)).await,
        "agent backlog did not drain"
    );

    let ops = stack.ops();
    let events = ops.all_events("V1").await;
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut ids = HashSet::new();
    for e in &events {
        assert!(
            ids.insert((e["epoch"].as_u64().unwrap(), e["seq"].as_u64().unwrap())),
            "identity stored twice"
        );
        let k = key_of(e);
        if !k.is_empty() {
            *by_key.entry(k).or_default() += 1;
        }
    }
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|k| !by_key.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} accepted events missing at the hub, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let doubled: Vec<(&String, &usize)> = by_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "{} events stored more than once, e.g. {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(5)]
    );
    // Posts cut off by a kill that the agent had stored anyway arrive too (not counted).
    let unanswered_but_stored = by_key.keys().filter(|k| !accepted.contains(*k)).count();
    let epochs: HashSet<u64> = events
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert!(
        epochs.len() >= 6,
        "agent restarts did not bump the epoch: {epochs:?}"
    );
    eprintln!(
        "accepted {}, stored {} ({} cut off by a kill but stored), epochs {}",
        accepted.len(),
        events.len(),
        unanswered_but_stored,
        epochs.len()
    );
}

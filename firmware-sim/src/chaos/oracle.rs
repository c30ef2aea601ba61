//! The end-to-end oracle: the delivery contract checked against the hub's APIs.
//!
//! - every critical event an agent accepted (201 with its `(epoch, seq)`) is at the hub
//!   exactly once, with the same content;
//! - every telemetry event an agent accepted is at the hub, or inside a declared `Gap`;
//! - every GPS fix written to an agent is at the hub (matched by GPS time), except fixes
//!   written in the moments around a kill -9 of that agent (not yet durable: the contract
//!   allows GPS group commit) and fixes a quota `Gap` accounts for: one whose dropped seq
//!   range reaches into the seqs of the positions stored within 2 s of the missing fix
//!   (and the nearest one each side; an API burst's positions take their seqs in store
//!   order, not time order), or between the seqs of the GPS fixes stored before and after
//!   it, and in all no more missing fixes than the gaps declare;
//! - no content is stored twice; every POD's blobs are at the hub byte-identical; every
//!   assignment is acknowledged; every backlog drained;
//! - the shipment the ERP released for each vehicle holds every accepted POD as exactly
//!   one DELIVERED fact keyed by its event, no fact twice, its timeline in event-time
//!   order, and a delivered state once a POD was accepted; and every delivered shipment
//!   judged once: POD_CONFIRMED (one such fact) or waiting in review for one of its PODs
//!   (the drivers capture PODs anywhere on the route, so either may be right; neither, or
//!   both, is a POD lost or judged twice);
//! - the ERP (a fake answering from a seeded plan of 503s, 429s, 500s and timeouts after
//!   applying) applied every milestone of those shipments it hears of exactly once, in
//!   the hub's order per shipment, and nothing else; no dead letter;
//! - every POD_CONFIRMED the ERP and the webhook receivers applied links its evidence, and
//!   those links open: the ERP's with the ERP's credential, a partner's (signed) with none,
//!   each serving the bytes of the POD's blob.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleetsync_protocol::json::Time;
use serde::Serialize;
use serde_json::Value;

use crate::fake_erp::Request;
use crate::route::SimFix;

/// Something an agent answered 201 to.
#[derive(Debug, Clone)]
pub enum Accepted {
    /// A critical event (exception) with its identity and unique text.
    Critical {
        /// Epoch.
        epoch: u64,
        /// Seq.
        seq: u64,
        /// Its unique text.
        text: String,
    },
    /// A position posted through the API.
    Telemetry {
        /// Epoch.
        epoch: u64,
        /// Seq.
        seq: u64,
        /// Its event time.
        time_ms: u64,
    },
    /// A POD and the bytes of its blobs.
    Pod {
        /// POD id.
        pod_id: String,
        /// Signature and photo bytes.
        blobs: Vec<Vec<u8>>,
    },
}

/// What the harness knows of one vehicle.
#[derive(Debug, Clone)]
pub struct VehicleRecord {
    /// Device id.
    pub id: String,
    /// Its route.
    pub fixes: Vec<SimFix>,
    /// Fixes written to its GPS socket (index, when).
    pub sent: Vec<(usize, Instant)>,
    /// (killed, back) of each kill -9.
    pub kill_windows: Vec<(Instant, Instant)>,
    /// What its API accepted.
    pub accepted: Vec<Accepted>,
    /// GPS clock skewed (left out of latency figures).
    pub skewed: bool,
}

/// Latency percentiles, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// The oracle's figures and verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// True when every check held.
    pub ok: bool,
    /// Every agent's backlog reached zero.
    pub drained: bool,
    /// Events accepted by agents (API 201s and GPS fixes written outside kill windows).
    pub accepted: u64,
    /// Events stored at the hub.
    pub stored: u64,
    /// Accepted but missing and not accounted for by a gap.
    pub lost: u64,
    /// Content stored more than once.
    pub duplicated: u64,
    /// `Gap` events at the hub.
    pub gap_events: u64,
    /// Events the gaps declare dropped.
    pub gapped: u64,
    /// GPS fixes written in a kill window (the contract does not promise them).
    pub fixes_in_kill_windows: u64,
    /// PODs accepted / at the hub with byte-identical blobs.
    pub pods: u64,
    /// Blobs verified byte-identical.
    pub blobs_verified: u64,
    /// Assignments acknowledged / sent.
    pub assignments_acked: u64,
    /// Accepted PODs found as exactly one DELIVERED fact of their shipment.
    pub pod_facts: u64,
    /// Delivered shipments judged: POD_CONFIRMED / waiting in review.
    pub pods_confirmed: u64,
    /// See `pods_confirmed`.
    pub pods_in_review: u64,
    /// Milestones of the chaos shipments the ERP must hear (from the hub's facts).
    pub erp_expected: u64,
    /// Of them, applied by the fake ERP (each key once by construction).
    pub erp_applied: u64,
    /// Whether every shipment's milestones were applied in the hub's order.
    pub erp_in_order: bool,
    /// Requests the fake ERP got in all (retries and redeliveries included).
    pub erp_requests: u64,
    /// Of them, answered with a planned fault.
    pub erp_faults: u64,
    /// Dead letters at the hub, any sink (the plan forces none).
    pub erp_dead_letters: u64,
    /// Milestones the webhook subscriptions must hear, summed over subscriptions.
    pub webhooks_expected: u64,
    /// Of them, applied by the fake receivers.
    pub webhooks_applied: u64,
    /// Whether every subscription heard each shipment's milestones in the hub's order.
    pub webhooks_in_order: bool,
    /// Requests the fake receivers got in all.
    pub webhook_requests: u64,
    /// Of them, answered with a planned fault.
    pub webhook_faults: u64,
    /// Requests whose signature did not verify (must be 0).
    pub webhook_bad_signatures: u64,
    /// Open review items of the chaos shipments an operator accepted before the sinks
    /// were checked (their POD_CONFIRMED must reach every sink too).
    pub reviews_accepted: u64,
    /// Evidence links of applied POD_CONFIRMED messages that opened with the right bytes
    /// (the ERP's and the webhook receivers').
    pub evidence_links_verified: u64,
    /// The customer's portal streams (two clients): shipment views they must show at the
    /// API's rev (chaos shipments x clients).
    pub portal_expected: u64,
    /// Of them, shown at that rev (and status).
    pub portal_current: u64,
    /// Connections the stream clients opened (each hub kill or replica loss ends one).
    pub portal_connects: u64,
    /// Of them, opened with a `Last-Event-ID`.
    pub portal_resumes: u64,
    /// Times the roaming client stayed away longer than the feed's slack.
    pub portal_aways: u64,
    /// Shipments written while it was away (counted at each return).
    pub portal_away_changed: u64,
    /// Of them, at the API's rev within 5 s of reconnecting with `Last-Event-ID`.
    pub portal_caught_up: u64,
    /// Shipment events they got.
    pub portal_shipment_events: u64,
    /// Position events they got.
    pub portal_position_events: u64,
    /// Capture to hub record time of critical events (skewed clocks left out).
    pub latency_ms: Latency,
    /// What failed (first 20).
    pub failures: Vec<String>,
}

/// Whether the ERP hears of a milestone (the hub's rule: ACT facts but the ERP's own
/// cancels and closes and retractions, and EST arrival estimates).
fn erp_hears(m: &Value) -> bool {
    match (m["classifier"].as_str(), m["type"].as_str()) {
        (Some("ACT"), Some(t)) => !matches!(t, "CANCELLED" | "CLOSED" | "RETRACTED"),
        (Some("EST"), Some(t)) => t == "ETA",
        _ => false,
    }
}

/// What one sink (the ERP, one webhook subscription) must have applied, by key:
/// `{sink}/{shipment}/{fact id}` of each milestone of the chaos shipments that `hears`
/// admits.
async fn expected_keys(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    sink: &str,
    shipments: &[String],
    hears: impl Fn(&Value) -> bool,
) -> HashSet<String> {
    let mut expected = HashSet::new();
    for sid in shipments {
        let Ok(r) = client
            .get(format!("{hub}/v1/ops/shipments/{sid}"))
            .bearer_auth(token)
            .send()
            .await
        else {
            continue;
        };
        let sh: Value = r.json().await.unwrap_or_default();
        for m in sh["milestones"].as_array().into_iter().flatten() {
            if hears(m)
                && let Some(id) = m["id"].as_str()
            {
                expected.insert(format!("{sink}/{sid}/{id}"));
            }
        }
    }
    expected
}

/// What the oracle found at one sink.
struct SinkVerdict {
    expected: u64,
    applied: u64,
    in_order: bool,
    requests: u64,
    faults: u64,
}

/// Checks one sink: `applied` (in order of application) is exactly `expected`, each key
/// once (the fakes apply a key once; a second key for one fact would be an unexpected
/// application), in the hub's order per shipment (the `sequence` each carries).
fn check_sink(
    label: &str,
    expected: &HashSet<String>,
    applied: &[Request],
    requests: &[Request],
    v: &mut Verdict,
) -> SinkVerdict {
    let keys: HashSet<String> = applied.iter().map(|r| r.key.clone()).collect();
    let missing: Vec<&String> = expected.difference(&keys).collect();
    let unexpected: Vec<&String> = keys.difference(expected).collect();
    if !missing.is_empty() {
        v.lost += missing.len() as u64;
        fail(
            v,
            format!(
                "{label}: {} milestones never applied, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(3)]
            ),
        );
    }
    if !unexpected.is_empty() {
        v.duplicated += unexpected.len() as u64;
        fail(
            v,
            format!(
                "{label}: {} applications of no milestone the hub holds, e.g. {:?}",
                unexpected.len(),
                &unexpected[..unexpected.len().min(3)]
            ),
        );
    }
    let mut in_order = true;
    let mut last: HashMap<String, u64> = HashMap::new();
    for r in applied {
        let subject = r.body["subject"].as_str().unwrap_or_default().to_string();
        let seq: u64 = r.body["sequence"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        if let Some(prev) = last.insert(subject.clone(), seq)
            && prev >= seq
        {
            in_order = false;
            fail(
                v,
                format!("{label}: {subject}: sequence {seq} applied after {prev}"),
            );
        }
    }
    SinkVerdict {
        expected: expected.len() as u64,
        applied: keys.intersection(expected).count() as u64,
        in_order,
        requests: requests.len() as u64,
        faults: requests
            .iter()
            .filter(|r| !matches!(r.status, 200 | 409))
            .count() as u64,
    }
}

/// A webhook subscription the chaos run made: its id, the fake receiver's name, and
/// whether it hears of arrival estimates (the other one names every other type).
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Its id at the hub.
    pub id: String,
    /// The fake receiver's name.
    pub receiver: String,
    /// Whether it hears of ETA estimates.
    pub hears_eta: bool,
}

/// The outbox reached the ERP and every webhook subscription: every milestone of the
/// chaos shipments a sink hears of was applied there exactly once, in the hub's order
/// per shipment, nothing else applied, every webhook signature valid, no dead letter.
/// Waits up to 120 s for the outbox to drain (retries back off up to 2 s, breakers pause
/// 2 s, a receiver may still be in its planned outage).
#[allow(clippy::too_many_arguments)]
pub async fn check_sinks(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    erp_token: &str,
    fake: &crate::fake_erp::FakeErp,
    erp_sink: &str,
    subs: &[Subscription],
    shipments: &[String],
    v: &mut Verdict,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let hook_sink = |id: &str| format!("webhook:{id}");
    loop {
        let erp = expected_keys(client, hub, token, erp_sink, shipments, erp_hears).await;
        let mut done = erp == fake.applied().into_iter().map(|r| r.key).collect();
        for s in subs {
            let eta = s.hears_eta;
            let want = expected_keys(client, hub, token, &hook_sink(&s.id), shipments, |m| {
                erp_hears(m) && (eta || m["type"] != "ETA")
            })
            .await;
            done &= want
                == fake
                    .hook_applied(&s.receiver)
                    .into_iter()
                    .map(|r| r.key)
                    .collect();
        }
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let expected = expected_keys(client, hub, token, erp_sink, shipments, erp_hears).await;
    let e = check_sink("ERP", &expected, &fake.applied(), &fake.requests(), v);
    v.erp_expected = e.expected;
    v.erp_applied = e.applied;
    v.erp_in_order = e.in_order;
    v.erp_requests = e.requests;
    v.erp_faults = e.faults;
    v.webhooks_in_order = true;
    for s in subs {
        let eta = s.hears_eta;
        let expected = expected_keys(client, hub, token, &hook_sink(&s.id), shipments, |m| {
            erp_hears(m) && (eta || m["type"] != "ETA")
        })
        .await;
        let label = format!("webhook {}", s.receiver);
        let w = check_sink(
            &label,
            &expected,
            &fake.hook_applied(&s.receiver),
            &fake.hook_requests(&s.receiver),
            v,
        );
        v.webhooks_expected += w.expected;
        v.webhooks_applied += w.applied;
        v.webhooks_in_order &= w.in_order;
        v.webhook_requests += w.requests;
        v.webhook_faults += w.faults;
        let bad = fake.bad_signatures(&s.receiver);
        v.webhook_bad_signatures += bad;
        if bad > 0 {
            fail(
                v,
                format!("{label}: {bad} requests with no valid signature"),
            );
        }
    }
    let erp_applied = fake.applied();
    let proven = check_evidence(client, hub, "ERP", Some(erp_token), &erp_applied, None, v).await;
    for s in subs {
        let label = format!("webhook {}", s.receiver);
        let applied = fake.hook_applied(&s.receiver);
        check_evidence(client, hub, &label, None, &applied, Some(&proven), v).await;
    }
    match client
        .get(format!("{hub}/v1/ops/deadletters"))
        .bearer_auth(token)
        .send()
        .await
    {
        Ok(r) => {
            let l: Value = r.json().await.unwrap_or_default();
            v.erp_dead_letters = l.as_array().map_or(0, |a| a.len() as u64);
            if v.erp_dead_letters > 0 {
                fail(
                    v,
                    format!(
                        "{} dead letters the fault plan did not force, e.g. {}",
                        v.erp_dead_letters, l[0]
                    ),
                );
            }
        }
        Err(e) => fail(v, format!("dead letters not readable: {e}")),
    }
    v.ok = v.failures.is_empty() && v.lost == 0 && v.duplicated == 0 && v.drained;
}

/// Checks that every POD_CONFIRMED in `applied` links its signature and photos, and that
/// each link opens (with `token`, or none) to bytes of one of the POD's blobs. The ERP's
/// links name the blob's sha256 (`.../blobs/{sha256}`): the bytes must hash to it, and
/// the hashes so proven are returned by shipment. A partner's signed links name nothing:
/// their bytes must hash to one the ERP's links proved for that shipment (`known`).
async fn check_evidence(
    client: &reqwest::Client,
    hub: &str,
    label: &str,
    token: Option<&str>,
    applied: &[Request],
    known: Option<&HashMap<String, HashSet<String>>>,
    v: &mut Verdict,
) -> HashMap<String, HashSet<String>> {
    use sha2::Digest as _;
    let mut proven: HashMap<String, HashSet<String>> = HashMap::new();
    for r in applied {
        let data = &r.body["data"];
        if data["milestone"] != "POD_CONFIRMED" {
            continue;
        }
        let subject = r.body["subject"].as_str().unwrap_or_default();
        let ev = &data["evidence"];
        let links: Vec<&str> = std::iter::once(&ev["signature"])
            .chain(ev["photos"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        if links.is_empty() {
            fail(
                v,
                format!("{label}: {subject}: POD_CONFIRMED without evidence links: {ev}"),
            );
            continue;
        }
        for link in links {
            let url = if link.starts_with('/') {
                format!("{hub}{link}")
            } else {
                link.to_string()
            };
            let mut req = client.get(&url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let got = match req.send().await {
                Ok(resp) if resp.status() == 200 => resp
                    .bytes()
                    .await
                    .ok()
                    .map(|b| hex::encode(sha2::Sha256::digest(&b))),
                _ => None,
            };
            let ok = match (&got, known) {
                (Some(sha), None) => link.rsplit('/').next() == Some(sha.as_str()),
                (Some(sha), Some(k)) => k.get(subject).is_some_and(|s| s.contains(sha)),
                (None, _) => false,
            };
            if ok {
                v.evidence_links_verified += 1;
                if let Some(sha) = got {
                    proven.entry(subject.to_string()).or_default().insert(sha);
                }
            } else {
                fail(
                    v,
                    format!(
                        "{label}: {subject}: evidence link {link} does not open to a blob of the POD"
                    ),
                );
            }
        }
    }
    proven
}

/// Notes a failure (the first 20 are kept).
fn fail(v: &mut Verdict, msg: String) {
    if v.failures.len() < 20 {
        v.failures.push(msg);
    }
}

/// Checks that delivered shipment `sid` (whose POD events are `pods`) is judged once:
/// one POD_CONFIRMED fact, or an open review item for one of its PODs, not both (the
/// hub judges every 2 s: a few tries).
async fn judged(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    sid: &str,
    pods: &[String],
    v: &mut Verdict,
) {
    let mut seen = String::new();
    for _ in 0..10 {
        let get = |path: String| async move {
            let r = client.get(path).bearer_auth(token).send().await.ok()?;
            r.json::<Value>().await.ok()
        };
        let (Some(sh), Some(open)) = (
            get(format!("{hub}/v1/ops/shipments/{sid}")).await,
            get(format!("{hub}/v1/ops/review?status=open")).await,
        ) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let confirmed = sh["milestones"].as_array().map_or(0, |m| {
            m.iter().filter(|f| f["type"] == "POD_CONFIRMED").count()
        });
        let in_review = open.as_array().map_or(0, |items| {
            items
                .iter()
                .filter(|i| {
                    i["shipment_id"] == sid
                        && i["id"]
                            .as_str()
                            .is_some_and(|id| pods.iter().any(|p| p == id))
                })
                .count()
        });
        match (confirmed, in_review) {
            (1, 0) => {
                v.pods_confirmed += 1;
                return;
            }
            (0, n) if n > 0 => {
                v.pods_in_review += 1;
                return;
            }
            (0, 0) => {
                seen = format!("{sid}: delivered, but neither confirmed nor in review");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            (c, r) => {
                v.duplicated += 1;
                fail(
                    v,
                    format!("{sid}: judged twice ({c} POD_CONFIRMED facts, {r} open review items)"),
                );
                return;
            }
        }
    }
    fail(v, seen);
}

/// A small valid-looking PNG, unique per (n, id).
pub fn png_bytes(n: u32, id: &str) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend(
        format!("sig {id} {n}")
            .bytes()
            .cycle()
            .take(2000 + n as usize),
    );
    v
}

/// A small JPEG-headed blob, unique per (n, id).
pub fn jpeg_bytes(n: u32, id: &str) -> Vec<u8> {
    let mut v = vec![0xff, 0xd8, 0xff, 0xe0];
    v.extend(
        format!("photo {id} {n}")
            .bytes()
            .cycle()
            .take(30_000 + n as usize),
    );
    v
}

/// Waits until every agent reports an empty backlog (events and blobs).
pub async fn wait_drained(
    client: &reqwest::Client,
    apis: &[SocketAddr],
    token: &str,
    deadline: Duration,
) -> bool {
    let end = Instant::now() + deadline;
    'outer: while Instant::now() < end {
        for api in apis {
            let Ok(r) = client
                .get(format!("http://{api}/v1/status"))
                .bearer_auth(token)
                .send()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue 'outer;
            };
            let Ok(s) = r.json::<Value>().await else {
                continue 'outer;
            };
            let b = &s["backlog"];
            let left = ["critical", "telemetry", "blobs"]
                .iter()
                .map(|l| b[l]["events"].as_u64().unwrap_or(1))
                .sum::<u64>();
            if left > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue 'outer;
            }
        }
        return true;
    }
    false
}

async fn all_events(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    device: &str,
) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let url = format!("{hub}/v1/ops/devices/{device}/events?limit=1000&after={after}");
        let r = client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() == 404 {
            return Ok(out);
        }
        let page: Value = r.json().await.map_err(|e| e.to_string())?;
        out.extend(page["events"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return Ok(out),
        }
    }
}

fn ms(v: &Value) -> Option<u64> {
    Time::parse(v.as_str()?).ok().map(|t| t.0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Checks the contract for every vehicle.
pub async fn check(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    vehicles: &[VehicleRecord],
    drained: bool,
) -> Verdict {
    let mut v = Verdict {
        drained,
        ..Verdict::default()
    };
    if !drained {
        fail(&mut v, "an agent's backlog did not drain".into());
    }
    let mut lat = Vec::new();
    for rec in vehicles {
        let events = match all_events(client, hub, token, &rec.id).await {
            Ok(e) => e,
            Err(e) => {
                fail(&mut v, format!("{}: events not readable: {e}", rec.id));
                continue;
            }
        };
        v.stored += events.len() as u64;
        let mut by_id: HashMap<(u64, u64), &Value> = HashMap::new();
        // (epoch, seq) of the hub's event of every POD the agent accepted.
        let mut pod_events: Vec<(u64, u64)> = Vec::new();
        let mut seen_content: HashSet<String> = HashSet::new();
        let mut position_times: HashSet<u64> = HashSet::new();
        // (GPS time, epoch, seq) of every position at the hub.
        let mut positions: Vec<(u64, u64, u64)> = Vec::new();
        // (time, epoch, seq) of the positions that came from the GPS feed.
        let mut gps_positions: Vec<(u64, u64, u64)> = Vec::new();
        // (dropped epoch, first seq, last seq) of every quota gap.
        let mut quota_gaps: Vec<(u64, u64, u64)> = Vec::new();
        let mut gaps: Vec<(u64, u64, u64)> = Vec::new();
        for e in &events {
            let id = (
                e["epoch"].as_u64().unwrap_or_default(),
                e["seq"].as_u64().unwrap_or_default(),
            );
            by_id.insert(id, e);
            // What makes an event unique apart from its identity: the same content under two
            // identities means it was stored twice.
            let content = match e["kind"].as_str().unwrap_or_default() {
                "exception" => format!("x:{}", e["text"]),
                "pod" => format!("p:{}", e["pod_id"]),
                "geofence" => format!(
                    "f:{}:{}:{}",
                    e["fence_id"], e["transition"], e["event_time"]
                ),
                "trip" => format!("t:{}:{}:{}", e["trip"], e["stop_id"], e["event_time"]),
                "health" => format!("h:{}:{}", e["event_time"], e["uptime_s"]),
                "assignment_ack" => format!(
                    "a:{}:{}:{}",
                    e["assignment_id"], e["version"], e["event_time"]
                ),
                "position" => {
                    if let Some(t) = ms(&e["event_time"]) {
                        position_times.insert(t);
                        positions.push((t, id.0, id.1));
                        // The quota bursts post positions at lon 10.0; the route's fixes
                        // are elsewhere.
                        if e["lon"].as_f64() != Some(10.0) {
                            gps_positions.push((t, id.0, id.1));
                        }
                    }
                    format!("g:{}:{}:{}", e["event_time"], e["lat"], e["lon"])
                }
                "gap" => {
                    v.gap_events += 1;
                    v.gapped += e["count"].as_u64().unwrap_or_default();
                    let range = (
                        e["dropped_epoch"].as_u64().unwrap_or_default(),
                        e["first_seq"].as_u64().unwrap_or_default(),
                        e["last_seq"].as_u64().unwrap_or_default(),
                    );
                    if e["reason"] == "quota" {
                        quota_gaps.push(range);
                    }
                    gaps.push(range);
                    continue;
                }
                _ => continue,
            };
            if !seen_content.insert(content.clone()) {
                v.duplicated += 1;
                fail(&mut v, format!("{}: stored twice: {content}", rec.id));
            }
        }
        let in_gap = |epoch: u64, seq: u64| {
            gaps.iter()
                .any(|(e, f, l)| *e == epoch && (*f..=*l).contains(&seq))
        };
        for a in &rec.accepted {
            match a {
                Accepted::Critical { epoch, seq, text } => {
                    v.accepted += 1;
                    match by_id.get(&(*epoch, *seq)) {
                        Some(e) if e["text"].as_str() == Some(text) => {
                            if !rec.skewed
                                && let (Some(c), Some(r)) =
                                    (ms(&e["event_time"]), ms(&e["recorded_time"]))
                            {
                                lat.push(r.saturating_sub(c));
                            }
                        }
                        Some(e) => {
                            v.lost += 1;
                            fail(
                                &mut v,
                                format!("{}: {epoch}-{seq} holds {e} instead of {text}", rec.id),
                            );
                        }
                        None => {
                            v.lost += 1;
                            fail(
                                &mut v,
                                format!(
                                    "{}: accepted {text} ({epoch}-{seq}) missing at the hub",
                                    rec.id
                                ),
                            );
                        }
                    }
                }
                Accepted::Telemetry {
                    epoch,
                    seq,
                    time_ms,
                } => {
                    v.accepted += 1;
                    let here = by_id
                        .get(&(*epoch, *seq))
                        .is_some_and(|e| ms(&e["event_time"]) == Some(*time_ms));
                    if !here && !in_gap(*epoch, *seq) {
                        v.lost += 1;
                        fail(
                            &mut v,
                            format!(
                                "{}: accepted position {epoch}-{seq} missing and in no gap",
                                rec.id
                            ),
                        );
                    }
                }
                Accepted::Pod { pod_id, blobs } => {
                    v.accepted += 1;
                    let pods: Vec<&&Value> = by_id
                        .values()
                        .filter(|e| e["kind"] == "pod" && e["pod_id"].as_str() == Some(pod_id))
                        .collect();
                    let Some(pod) = pods.first() else {
                        v.lost += 1;
                        fail(
                            &mut v,
                            format!("{}: POD {pod_id} missing at the hub", rec.id),
                        );
                        continue;
                    };
                    v.pods += 1;
                    pod_events.push((
                        pod["epoch"].as_u64().unwrap_or_default(),
                        pod["seq"].as_u64().unwrap_or_default(),
                    ));
                    let mut refs = vec![&pod["signature"]];
                    refs.extend(pod["photos"].as_array().into_iter().flatten());
                    if refs.len() != blobs.len() {
                        v.lost += 1;
                        fail(
                            &mut v,
                            format!(
                                "{}: POD {pod_id} lists {} blobs, {} were posted",
                                rec.id,
                                refs.len(),
                                blobs.len()
                            ),
                        );
                    }
                    for (r, want) in refs.iter().zip(blobs) {
                        let sha = r["sha256"].as_str().unwrap_or_default();
                        let got = match client
                            .get(format!("{hub}/v1/ops/blobs/{sha}"))
                            .bearer_auth(token)
                            .send()
                            .await
                        {
                            Ok(resp) if resp.status() == 200 => {
                                resp.bytes().await.ok().map(|b| b.to_vec())
                            }
                            _ => None,
                        };
                        if got.as_ref() == Some(want) {
                            v.blobs_verified += 1;
                        } else {
                            v.lost += 1;
                            fail(
                                &mut v,
                                format!("{}: POD {pod_id} blob {sha} missing or different", rec.id),
                            );
                        }
                    }
                }
            }
        }
        // GPS fixes written to the agent.
        positions.sort_unstable();
        // A missing fix's seq lies between those of the positions stored before and after
        // it (by GPS time); a quota gap must declare a range reaching into that interval.
        // Positions posted through the API in a burst get their time when posted but
        // their seq when stored, so near a burst seq order and time order differ by the
        // burst's spread: the interval is that of the positions stored within
        // `BURST_SPREAD_MS` of the fix, plus the nearest one on each side.
        const BURST_SPREAD_MS: u64 = 2_000;
        // Or by the GPS fixes around it: the feed is sequential, so a missing fix's seq
        // lies after that of the GPS fix stored before it (by time) and before that of
        // the one after it, in their epochs; a quota gap reaching into that interval
        // accounts for it.
        gps_positions.sort_unstable();
        let between_gps_fixes = |t: u64| {
            let i = gps_positions.partition_point(|p| p.0 < t);
            let before = i.checked_sub(1).map(|j| gps_positions[j]);
            let after = gps_positions.get(i).copied();
            quota_gaps
                .iter()
                .any(|&(e, first, last)| match (before, after) {
                    (Some((_, eb, sb)), Some((_, ea, sa))) if eb == ea => {
                        e == eb && last > sb && first < sa
                    }
                    (b, a) => {
                        b.is_some_and(|(_, eb, sb)| e == eb && last > sb)
                            || a.is_some_and(|(_, ea, sa)| e == ea && first < sa)
                    }
                })
        };
        let gap_covers = |t: u64| {
            if between_gps_fixes(t) {
                return true;
            }
            let lo = positions.partition_point(|p| p.0 < t.saturating_sub(BURST_SPREAD_MS));
            let hi = positions.partition_point(|p| p.0 <= t + BURST_SPREAD_MS);
            let from = lo.saturating_sub(1);
            let to = (hi + 1).min(positions.len());
            let window = &positions[from..to];
            quota_gaps.iter().any(|&(e, first, last)| {
                let seqs = window.iter().filter(|p| p.1 == e).map(|p| p.2);
                match (seqs.clone().min(), seqs.max()) {
                    (Some(min), Some(max)) => last >= min && first <= max,
                    _ => false,
                }
            })
        };
        let mut uncovered = Vec::new();
        let mut missing = 0u64;
        for (i, when) in &rec.sent {
            let exempt = rec
                .kill_windows
                .iter()
                .any(|(k, back)| *when + Duration::from_secs(2) >= *k && *when <= *back);
            if exempt {
                v.fixes_in_kill_windows += 1;
                continue;
            }
            v.accepted += 1;
            let t = rec.fixes[*i].time_ms;
            if !position_times.contains(&t) {
                missing += 1;
                if !gap_covers(t) {
                    uncovered.push(t);
                }
            }
        }
        // Fixes may only be missing where the store declared drops for quota.
        let declared: u64 = events
            .iter()
            .filter(|e| e["kind"] == "gap" && e["reason"] == "quota")
            .map(|e| e["count"].as_u64().unwrap_or_default())
            .sum();
        if !uncovered.is_empty() {
            v.lost += uncovered.len() as u64;
            fail(
                &mut v,
                format!(
                    "{}: {} GPS fixes missing where no quota gap declares a drop (GPS times {:?}...)",
                    rec.id,
                    uncovered.len(),
                    &uncovered[..uncovered.len().min(5)]
                ),
            );
        } else if missing > declared {
            v.lost += missing - declared;
            fail(
                &mut v,
                format!(
                    "{}: {missing} GPS fixes missing, gaps declare {declared}",
                    rec.id
                ),
            );
        }
        // The shipment the ERP released for this vehicle: every accepted POD is exactly
        // one DELIVERED fact of it, keyed by its event; every fact once; the timeline in
        // event-time order; the state one a delivered shipment may be in.
        let sid = super::shipment_id(&rec.id);
        match client
            .get(format!("{hub}/v1/ops/shipments/{sid}"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {
                let sh: Value = r.json().await.unwrap_or_default();
                let facts = sh["milestones"].as_array().cloned().unwrap_or_default();
                let ids: Vec<&str> = facts.iter().filter_map(|m| m["id"].as_str()).collect();
                let unique: HashSet<&&str> = ids.iter().collect();
                if unique.len() != ids.len() {
                    v.duplicated += (ids.len() - unique.len()) as u64;
                    fail(&mut v, format!("{sid}: a fact recorded twice"));
                }
                let times: Vec<u64> = facts.iter().filter_map(|m| ms(&m["event_time"])).collect();
                if times.windows(2).any(|w| w[0] > w[1]) {
                    fail(&mut v, format!("{sid}: timeline not in event-time order"));
                }
                for (epoch, seq) in &pod_events {
                    let fid = format!("{}:{epoch}:{seq}", rec.id);
                    let n = facts
                        .iter()
                        .filter(|m| m["id"] == fid.as_str() && m["type"] == "DELIVERED")
                        .count();
                    if n == 1 {
                        v.pod_facts += 1;
                    } else {
                        v.lost += u64::from(n == 0);
                        fail(
                            &mut v,
                            format!("{sid}: {n} DELIVERED facts for POD event {fid}"),
                        );
                    }
                }
                let state = sh["state"].as_str().unwrap_or_default();
                if !pod_events.is_empty() && !matches!(state, "DELIVERED" | "POD_CONFIRMED") {
                    fail(
                        &mut v,
                        format!("{sid}: state {state} after {} PODs", pod_events.len()),
                    );
                }
                if !pod_events.is_empty() {
                    let pods: Vec<String> = pod_events
                        .iter()
                        .map(|(e, s)| format!("{}:{e}:{s}", rec.id))
                        .collect();
                    judged(client, hub, token, &sid, &pods, &mut v).await;
                }
            }
            _ => fail(&mut v, format!("{sid}: shipment not readable")),
        }
        // The assignment.
        match client
            .get(format!("{hub}/v1/ops/devices/{}/assignment", rec.id))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {
                let a: Value = r.json().await.unwrap_or_default();
                if a["acknowledged"] == true {
                    v.assignments_acked += 1;
                } else {
                    fail(&mut v, format!("{}: assignment not acknowledged", rec.id));
                }
            }
            _ => fail(&mut v, format!("{}: assignment not readable", rec.id)),
        }
    }
    lat.sort_unstable();
    v.latency_ms = Latency {
        p50: percentile(&lat, 0.5),
        p90: percentile(&lat, 0.9),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
    };
    v.ok = v.failures.is_empty() && v.lost == 0 && v.duplicated == 0 && v.drained;
    v
}

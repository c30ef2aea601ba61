//! Partner webhooks after Standard Webhooks (<https://www.standardwebhooks.com>):
//! subscriptions made at `/v1/ops/webhooks`, one [`Worker`] per subscription.
//!
//! ```text
//! a fact's write ---------> staging row   sink "webhooks", one per fact (like an ERP's)
//! fan-out (one at a time: ---> one row per matching, enabled subscription
//!   a task here, a lock          sink "webhook:{subscription id}",
//!   on PostgreSQL)               id "webhook:{sub}/{shipment}/{fact id}" = webhook-id
//!                                the staging row goes in the same write
//! worker per subscription ---> POST url   webhook-id, webhook-timestamp,
//!                                         webhook-signature: v1,<base64 HMAC-SHA256 of
//!                                         "{id}.{timestamp}.{body}"> per live secret
//!   2xx                done; the row is kept `keep_delivered_s` for replays
//!   410 Gone           the subscription is disabled; the row is a dead letter
//!   429, 503           again after Retry-After, else on the schedule
//!   anything else      again on the retry schedule (immediately, 5 s, 5 min, 30 min, 2 h,
//!   (timeout too)      5 h, 10 h, 10 h by default); after the last, a dead letter
//! ```
//!
//! A subscription matches a row when it is enabled, names the row's customer or none,
//! and names the row's event type or none. The event type is the mapping table's
//! webhook type of the state the fact left the shipment in (`shipment.delivered.v1`),
//! or `shipment.eta.v1` for an arrival estimate. A subscription hears of facts fanned out
//! after it was made; rows already queued for a disabled subscription wait for it to be
//! enabled again (nothing is dropped), new ones are not queued meanwhile.
//!
//! Order per shipment holds per subscription: the fan-out keeps the staging order, the
//! worker sends a shipment's rows one after another.
//!
//! Secrets: `whsec_` + base64 of 24 random bytes. A rotation adds a new secret and
//! lets the old one sign too until `rotation_overlap_s` has passed, so a receiver can
//! switch over without losing a message (several signatures in one header, space apart,
//! as the standard allows).
//!
//! Targets: `https://` only, and not to loopback, private, link-local or other
//! non-public addresses, checked when a subscription is made or changed and again at
//! every connection (the client's resolver refuses such addresses, and redirects are not
//! followed), unless `[webhooks] allow_insecure_targets = true` (tests, a lab).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac as _};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::worker::{Answer, Gate, Target, Worker, reply};
use super::{Delivery, OutboxRow};
use crate::config::WebhooksConfig;
use crate::metrics::Metrics;
use crate::shipments::{FactType, Mappings};
use crate::store::Store;

/// The sink facts write their webhook rows to, before the fan-out.
pub const STAGING: &str = "webhooks";
/// The event type of an arrival estimate.
pub const ETA_TYPE: &str = "shipment.eta.v1";
/// Rows one fan-out step moves.
const FANOUT_BATCH: usize = 500;
/// How often the subscriptions are looked at when nothing wakes the supervisor (a
/// subscription made on another hub).
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often delivered rows older than `keep_delivered_s` are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The outbox sink of subscription `id`.
pub fn sink_of(id: &str) -> String {
    format!("webhook:{id}")
}

/// Whether `sink` is a subscription's (its delivered rows are kept for replays).
pub fn is_subscription_sink(sink: &str) -> bool {
    sink.starts_with("webhook:")
}

/// One signing secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Secret {
    /// `whsec_<base64>`.
    pub key: String,
    /// When it was made (ms).
    pub created_ms: u64,
    /// When it stops signing (ms); `None`: the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// A partner's subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// `wh_` + 20 hex digits.
    pub id: String,
    /// Where deliveries go.
    pub url: String,
    /// The event types it wants; empty: all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// The one customer whose shipments it hears of; `None`: all.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// Free text for operators.
    #[serde(default)]
    pub description: Option<String>,
    /// Whether deliveries go out.
    pub enabled: bool,
    /// Why it was disabled (by an operator, or a 410 from the target).
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// Signing secrets, newest first.
    pub secrets: Vec<Secret>,
    /// When it was made (ms).
    pub created_ms: u64,
    /// When it was last changed (ms).
    pub updated_ms: u64,
}

impl Subscription {
    /// A new, enabled subscription with a fresh id and secret.
    pub fn new(
        url: String,
        event_types: Vec<String>,
        customer_id: Option<String>,
        description: Option<String>,
        now_ms: u64,
    ) -> Self {
        let id: [u8; 10] = rand::rng().random();
        Subscription {
            id: format!("wh_{}", hex::encode(id)),
            url,
            event_types,
            customer_id,
            description,
            enabled: true,
            disabled_reason: None,
            secrets: vec![Secret {
                key: new_secret(),
                created_ms: now_ms,
                expires_ms: None,
            }],
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    /// Whether it hears of `row`, whose event type is `event_type`.
    pub fn matches(&self, row: &OutboxRow, event_type: &str) -> bool {
        self.enabled
            && self
                .customer_id
                .as_deref()
                .is_none_or(|c| c == row.customer_id)
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
    }

    /// The secrets that sign at `now_ms`.
    pub fn signing(&self, now_ms: u64) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.expires_ms.is_none_or(|e| e > now_ms))
    }

    /// Adds a new secret; the old ones sign until `now_ms + overlap_ms`. Returns the new
    /// one.
    pub fn rotate(&mut self, now_ms: u64, overlap_ms: u64) -> &Secret {
        for s in &mut self.secrets {
            let until = now_ms + overlap_ms;
            s.expires_ms = Some(s.expires_ms.map_or(until, |e| e.min(until)));
        }
        // Expired ones are of no more use.
        self.secrets
            .retain(|s| s.expires_ms.is_none_or(|e| e > now_ms));
        self.secrets.insert(
            0,
            Secret {
                key: new_secret(),
                created_ms: now_ms,
                expires_ms: None,
            },
        );
        self.updated_ms = now_ms;
        &self.secrets[0]
    }
}

/// A fresh secret: `whsec_` + base64 of 24 random bytes.
pub fn new_secret() -> String {
    let raw: [u8; 24] = rand::rng().random();
    format!("whsec_{}", B64.encode(raw))
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with `secret` (`whsec_...`).
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let key = B64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// The event type of `row` (see the module note).
pub fn event_type(row: &OutboxRow, mappings: &Mappings) -> String {
    if row.fact.kind == FactType::Eta {
        return ETA_TYPE.to_string();
    }
    mappings.of(row.state).map_or_else(
        || format!("shipment.{}.v1", row.state.as_str().to_ascii_lowercase()),
        |m| m.webhook_type.clone(),
    )
}

/// The rows a staged row makes: one per subscription in `subs` that hears of it.
pub fn fan_out(staged: &OutboxRow, subs: &[Subscription], event_type: &str) -> Vec<OutboxRow> {
    subs.iter()
        .filter(|s| s.matches(staged, event_type))
        .map(|s| {
            let sink = sink_of(&s.id);
            OutboxRow {
                id: super::row_id(&sink, &staged.shipment_id, &staged.fact.id),
                sink,
                seq: 0,
                attempts: 0,
                next_ms: 0,
                last_error: None,
                ..staged.clone()
            }
        })
        .collect()
}

/// Every event type a subscription may name.
pub fn event_types(mappings: &Mappings) -> Vec<String> {
    let mut v: Vec<String> = mappings
        .states
        .iter()
        .map(|m| m.webhook_type.clone())
        .collect();
    v.push(ETA_TYPE.to_string());
    v.sort();
    v.dedup();
    v
}

/// Whether connecting to `ip` could reach something that is not a partner's server.
pub fn non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return non_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        }
    }
}

/// Checks a target URL as a subscription is made or changed; `Err` says what is wrong.
pub async fn check_target(url: &str, allow_insecure: bool) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    match u.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        s => {
            return Err(format!(
                "scheme {s:?}: webhooks go to https:// targets only"
            ));
        }
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "no user name or password in the URL: the signature authenticates the hub".into(),
        );
    }
    let host = u.host_str().ok_or("no host")?.to_string();
    if allow_insecure {
        return Ok(());
    }
    let port = u.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("host {host:?} does not resolve ({e})"))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("host {host:?} does not resolve"));
    }
    if let Some(a) = addrs.iter().find(|a| non_public(a.ip())) {
        return Err(format!(
            "host {host:?} is at {} (loopback, private, link-local or otherwise not public); \
             such targets need [webhooks] allow_insecure_targets = true",
            a.ip()
        ));
    }
    Ok(())
}

/// The client's resolver: refuses names that resolve to non-public addresses.
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| !non_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{} resolves to no public address: not a webhook target",
                    name.as_str()
                )
                .into());
            }
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

/// The HTTP client every subscription's worker shares.
pub fn client(cfg: &WebhooksConfig) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
        // A redirect could lead anywhere, past the checks above.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fleetsync-hub/", env!("CARGO_PKG_VERSION")));
    if !cfg.allow_insecure_targets {
        b = b.https_only(true).dns_resolver(Arc::new(PublicOnly));
    }
    b.build().map_err(|e| format!("webhooks: HTTP client: {e}"))
}

/// Delivers one subscription's rows.
struct Hook {
    id: String,
    sink: String,
    store: Store,
    client: reqwest::Client,
    mappings: Mappings,
    links: super::erp::EvidenceLinks,
    cfg: WebhooksConfig,
    /// The subscription as the last gate read it.
    sub: Mutex<Option<Subscription>>,
}

impl Hook {
    fn current(&self) -> Option<Subscription> {
        self.sub.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Disables the subscription after a 410 from its target.
    async fn disable(&self, why: String) {
        let now = crate::ingest::now_ms();
        match self.store.webhook(&self.id).await {
            Ok(Some(mut s)) if s.enabled => {
                s.enabled = false;
                s.disabled_reason = Some(why);
                s.updated_ms = now;
                if let Err(e) = self.store.put_webhook(&s).await {
                    tracing::warn!(subscription = %self.id, error = %e, "could not disable the subscription");
                } else {
                    tracing::warn!(subscription = %self.id, url = %s.url, "webhook target answered 410 Gone: subscription disabled");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(subscription = %self.id, error = %e, "could not read the subscription")
            }
        }
    }
}

impl Target for Hook {
    fn sink(&self) -> &str {
        &self.sink
    }

    async fn gate(&self) -> Gate {
        match self.store.webhook(&self.id).await {
            Ok(Some(s)) => {
                let g = if s.enabled { Gate::Open } else { Gate::Paused };
                *self.sub.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                g
            }
            Ok(None) => Gate::Stop,
            Err(e) => {
                tracing::warn!(subscription = %self.id, error = %e, "could not read the subscription");
                Gate::Paused
            }
        }
    }

    async fn send(&self, row: &OutboxRow, now_ms: u64) -> Answer {
        let Some(sub) = self.current() else {
            return Answer::Later(None, "subscription not read yet".into());
        };
        let ev = if row.fact.kind == FactType::PodConfirmed {
            super::erp::evidence(&self.store, row, |sha| {
                self.links.signed(&row.shipment_id, sha, now_ms)
            })
            .await
        } else {
            None
        };
        let mut msg = super::erp::message(row, &self.mappings, ev);
        msg["type"] = serde_json::Value::String(event_type(row, &self.mappings));
        let body = match serde_json::to_vec(&msg) {
            Ok(b) => b,
            Err(e) => return Answer::Refused(format!("could not encode: {e}"), String::new()),
        };
        let ts = now_ms / 1000;
        let sigs: Vec<String> = sub
            .signing(now_ms)
            .filter_map(|s| sign(&s.key, &row.id, ts, &body))
            .collect();
        let sent = self
            .client
            .post(&sub.url)
            .header("content-type", "application/json")
            .header("webhook-id", &row.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sigs.join(" "))
            .header("x-correlation-id", &row.fact.id)
            .header("traceparent", super::erp::traceparent(&row.id))
            .body(body)
            .send()
            .await;
        let (status, after, text) = match reply(sent, now_ms, "the target").await {
            Ok(r) => r,
            Err(retry) => return retry,
        };
        if status.is_success() {
            return Answer::Applied;
        }
        match status.as_u16() {
            410 => {
                let at = chrono::DateTime::from_timestamp_millis(now_ms as i64)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                self.disable(format!("{} answered 410 Gone at {at}", sub.url))
                    .await;
                Answer::Refused("HTTP 410 Gone: subscription disabled".into(), text)
            }
            429 | 503 => Answer::Later(after, format!("HTTP {status}")),
            _ => Answer::Later(None, format!("HTTP {status}: {text}")),
        }
    }

    fn settle(&self, row: &OutboxRow, answer: Answer, now_ms: u64) -> Delivery {
        match answer {
            Answer::Applied => Delivery::Done,
            Answer::Refused(error, body) => Delivery::Dead {
                error,
                response: Some(body),
            },
            Answer::Later(after, error) => {
                let attempts = row.attempts + 1;
                let Some(wait) = schedule_ms(&self.cfg.retry_schedule_s, attempts) else {
                    return Delivery::Dead {
                        error: format!("given up after {attempts} attempts: {error}"),
                        response: None,
                    };
                };
                Delivery::Retry {
                    next_ms: now_ms + after.unwrap_or(wait).max(wait),
                    error,
                }
            }
        }
    }
}

/// The wait before attempt `attempts + 1` (0-based `attempts` made so far), with up
/// to 10% jitter; `None` once the schedule is used up.
pub fn schedule_ms(schedule_s: &[f64], attempts: u32) -> Option<u64> {
    let s = *schedule_s.get(attempts as usize)?;
    let jitter = rand::rng().random_range(0.0..=0.1);
    Some((s * (1.0 + jitter) * 1000.0) as u64)
}

/// Fan-out, workers per subscription, pruning: until `shutdown`.
pub async fn run(
    store: Store,
    cfg: WebhooksConfig,
    mappings: Mappings,
    links: super::erp::EvidenceLinks,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let client = match client(&cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks cannot be delivered");
            return;
        }
    };
    let mut wake = store.outbox_signal();
    let mut workers: HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut last_look = tokio::time::Instant::now() - LOOK_EVERY;
    let mut last_prune = tokio::time::Instant::now();
    loop {
        wake.borrow_and_update();
        let types = {
            let m = mappings.clone();
            move |row: &OutboxRow| event_type(row, &m)
        };
        loop {
            match store.webhook_fanout(FANOUT_BATCH, types.clone()).await {
                Ok(n) if n >= FANOUT_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook fan-out failed; trying again");
                    break;
                }
            }
        }
        if last_look.elapsed() >= LOOK_EVERY {
            last_look = tokio::time::Instant::now();
            match store.webhooks().await {
                Ok(subs) => {
                    let live: std::collections::HashSet<&str> =
                        subs.iter().map(|s| s.id.as_str()).collect();
                    workers.retain(|id, (stop, task)| {
                        let keep = live.contains(id.as_str()) && !task.is_finished();
                        if !keep {
                            stop.cancel();
                            metrics.drop_sink(&sink_of(id));
                        }
                        keep
                    });
                    for s in &subs {
                        if workers.contains_key(&s.id) {
                            continue;
                        }
                        let hook = Hook {
                            id: s.id.clone(),
                            sink: sink_of(&s.id),
                            store: store.clone(),
                            client: client.clone(),
                            mappings: mappings.clone(),
                            links: links.clone(),
                            cfg: cfg.clone(),
                            sub: Mutex::new(None),
                        };
                        let w = Worker::new(hook, cfg.limits(), store.clone(), &metrics);
                        let stop = shutdown.child_token();
                        let task = tokio::spawn(w.run(stop.clone()));
                        tracing::debug!(subscription = %s.id, url = %s.url, "webhook worker started");
                        workers.insert(s.id.clone(), (stop, task));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the webhook subscriptions"),
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            let before = crate::ingest::now_ms().saturating_sub(cfg.keep_delivered_s * 1000);
            if let Err(e) = store.prune_delivered(before).await {
                tracing::warn!(error = %e, "could not drop old delivered webhook rows");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = wake.changed() => {}
        }
    }
    for (_, (stop, task)) in workers {
        stop.cancel();
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, id, 1614265330, body).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(non_public(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(!non_public(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn targets_are_checked() {
        assert!(
            check_target("https://93.184.216.34/hooks", false)
                .await
                .is_ok()
        );
        let e = check_target("http://93.184.216.34/hooks", false)
            .await
            .unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = check_target("https://127.0.0.1:8443/x", false)
            .await
            .unwrap_err();
        assert!(e.contains("allow_insecure_targets"), "{e}");
        let e = check_target("https://localhost/x", false)
            .await
            .unwrap_err();
        assert!(e.contains("127.0.0.1") || e.contains("::1"), "{e}");
        assert!(check_target("http://127.0.0.1:9/x", true).await.is_ok());
        assert!(check_target("ftp://example.com/", true).await.is_err());
        assert!(
            check_target("https://user:pw@93.184.216.34/", false)
                .await
                .is_err()
        );
    }

    #[test]
    fn rotation_keeps_the_old_secret_for_the_overlap() {
        let mut s = Subscription::new("https://x".into(), vec![], None, None, 1_000);
        let old = s.secrets[0].key.clone();
        let new = s.rotate(2_000, 10_000).key.clone();
        assert_ne!(old, new);
        let now: Vec<&str> = s.signing(5_000).map(|s| s.key.as_str()).collect();
        assert_eq!(now, vec![new.as_str(), old.as_str()]);
        let later: Vec<&str> = s.signing(12_000).map(|s| s.key.as_str()).collect();
        assert_eq!(later, vec![new.as_str()]);
        // A second rotation drops what has expired and keeps the overlap bounded.
        s.rotate(20_000, 10_000);
        assert_eq!(s.secrets.len(), 2);
    }

    #[test]
    fn the_schedule_runs_out() {
        let sched = [0.0, 5.0, 300.0];
        assert_eq!(schedule_ms(&sched, 0), Some(0));
        let w = schedule_ms(&sched, 1).unwrap();
        assert!((5_000..=5_500).contains(&w), "{w}");
        assert_eq!(schedule_ms(&sched, 3), None);
    }
}

//! The ERP connector: one worker per `[[erp]]`, delivering its outbox rows as CloudEvents.
//!
//! ```text
//! loop: store.outbox_due(sink)      the first row of each shipment, due now (leased on
//!                                   PostgreSQL so two hubs never send one row at once)
//!   -> at most `burst` at once, each after a token of the bucket (rate_per_s, burst)
//!   -> POST {base_url}/events       Idempotency-Key: row id, X-Correlation-Id, traceparent
//!   -> classify                     2xx, 409: done | 429, 503: Retry-After | 5xx, timeout,
//!                                   connection: backoff with full jitter | other 4xx: dead
//!   -> store.outbox_settle(all)     one write for the batch
//! ```
//!
//! Order per shipment holds because only a shipment's first row is ever due: a later
//! milestone waits until the earlier one is done (or dead-lettered, which operators see at
//! `GET /v1/ops/deadletters`). A row is given up after `max_attempts` or `max_age_s`.
//!
//! Circuit breaker: `breaker_failures` failures in a row (retryable ones: the ERP is down
//! or drowning) open it; no request goes out for `breaker_open_ms`; then one probe
//! (half-open): success closes it, failure opens it again. Rows wait meanwhile, nothing is
//! lost and nothing counts as an attempt.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetsync_protocol::json::Time;
use rand::Rng as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Delivery, OutboxRow};
use crate::config::ErpConfig;
use crate::metrics::{Metrics, SinkMetrics};
use crate::shipments::{FactType, Mappings};
use crate::store::Store;

/// Most bytes of an ERP's answer kept with a dead letter.
const MAX_RESPONSE_KEPT: usize = 4096;
/// Pause when nothing is due, doubled while nothing stays due (each look reads the
/// sink's rows), up to [`IDLE_MAX`].
const IDLE: Duration = Duration::from_millis(200);
/// See [`IDLE`].
const IDLE_MAX: Duration = Duration::from_secs(2);

/// Breaker states as the metric shows them.
pub const BREAKER_CLOSED: u64 = 0;
/// See [`BREAKER_CLOSED`].
pub const BREAKER_HALF_OPEN: u64 = 1;
/// See [`BREAKER_CLOSED`].
pub const BREAKER_OPEN: u64 = 2;

/// A token bucket.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: u32) -> Self {
        Bucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Waits for a token.
    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
                .min(self.burst);
            self.at = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// What one request got, before the row's limits are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// 2xx or 409.
    Applied,
    /// Retry not before this many ms (Retry-After), or after the backoff if `None`.
    Later(Option<u64>, String),
    /// Never (other 4xx), with the body.
    Refused(String, String),
}

/// Parses `Retry-After`: delay-seconds or an HTTP date; ms from `now_ms`.
pub fn retry_after_ms(value: &str, now_ms: u64) -> Option<u64> {
    let v = value.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(s.saturating_mul(1000));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let at = u64::try_from(t.timestamp_millis()).ok()?;
    Some(at.saturating_sub(now_ms))
}

/// Full jitter: uniformly random in `[0, min(cap, base x 2^attempts)]`.
pub fn backoff_ms(attempts: u32, base: u64, cap: u64) -> u64 {
    let ceiling = base.saturating_mul(1u64 << attempts.min(40)).min(cap);
    rand::rng().random_range(0..=ceiling)
}

/// The CloudEvents 1.0 message for a row.
pub fn message(row: &OutboxRow, mappings: &Mappings, evidence: Option<Value>) -> Value {
    let m = mappings.of(row.state);
    let kind = row.fact.kind.as_str().to_ascii_lowercase();
    let mut data = json!({
        "shipment_id": row.shipment_id,
        "reference": row.reference,
        "customer_id": row.customer_id,
        "milestone": row.fact.kind.as_str(),
        "classifier": row.fact.classifier,
        "stop_id": row.fact.stop_id,
        "state": row.state.as_str(),
        "erp_status": m.map(|m| m.erp_status.as_str()),
        "mapping_version": mappings.version,
        "fact_id": row.fact.id,
        "source": row.fact.source,
    });
    if row.fact.kind == FactType::PodConfirmed {
        data["billing_release"] = json!(m.is_some_and(|m| m.releases_billing));
        data["evidence"] = evidence.unwrap_or(Value::Null);
    }
    if row.fact.kind == FactType::Eta {
        data["eta"] = json!(row.fact.event_time);
    }
    json!({
        "specversion": "1.0",
        "id": row.id,
        "source": "fleetsync-hub",
        "type": format!("com.fleetsync.shipment.{kind}.v1"),
        "subject": row.shipment_id,
        "time": row.fact.event_time,
        "recordedtime": row.fact.recorded_time,
        "sequence": row.seq.to_string(),
        "correlationid": row.fact.id,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// A W3C `traceparent` derived from the row id (the same for every attempt of it).
pub fn traceparent(row_id: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(row_id.as_bytes());
    format!(
        "00-{}-{}-01",
        hex::encode(&h[..16]),
        hex::encode(&h[16..24])
    )
}

/// The POD evidence of a POD_CONFIRMED row: the POD event's blobs, as hub URLs.
async fn evidence(store: &Store, row: &OutboxRow) -> Option<Value> {
    // POD_CONFIRMED ids begin with the POD event's `device:epoch:seq`.
    let mut parts = row.fact.id.splitn(4, ':');
    let (device, epoch, seq) = (parts.next()?, parts.next()?, parts.next()?);
    let (epoch, seq) = (epoch.parse::<u32>().ok()?, seq.parse::<u64>().ok()?);
    let after = seq.checked_sub(1).map(|s| (epoch, s));
    let page = store.events(device, after, 1, None).await.ok()?;
    let (e, s, stored) = page.into_iter().next()?;
    if (e, s) != (epoch, seq) {
        return None;
    }
    let fleetsync_protocol::Body::Pod(p) = &stored.event.body else {
        return None;
    };
    let url = |sha: &[u8; 32]| format!("/v1/ops/blobs/{}", hex::encode(sha));
    Some(json!({
        "pod_id": p.pod_id.as_str(),
        "recipient_name": p.recipient_name.as_str(),
        "signature": p.signature.as_ref().map(|b| url(&b.sha256)),
        "photos": p.photos.iter().map(|b| url(&b.sha256)).collect::<Vec<_>>(),
        "captured": Time(stored.event.time_ms),
    }))
}

/// One ERP's worker.
pub struct Connector {
    cfg: ErpConfig,
    auth: Option<String>,
    client: reqwest::Client,
    store: Store,
    mappings: Mappings,
    metrics: Arc<SinkMetrics>,
}

impl std::fmt::Debug for Connector {
    // Not the config: it may hold the ERP's credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("erp", &self.cfg.name)
            .field("base_url", &self.cfg.base_url)
            .finish()
    }
}

impl Connector {
    /// A connector for `cfg` (its client built now: a bad CA file is an error at start).
    pub fn new(
        cfg: ErpConfig,
        store: Store,
        mappings: Mappings,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let auth = cfg.authorization().map_err(|e| e.to_string())?;
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(10_000)))
            .pool_max_idle_per_host(cfg.burst as usize);
        if let Some(ca) = &cfg.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("erp {:?}: ca {}: {e}", cfg.name, ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("erp {:?}: ca {}: {e}", cfg.name, ca.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b
            .build()
            .map_err(|e| format!("erp {:?}: HTTP client: {e}", cfg.name))?;
        let metrics = metrics.sink(&cfg.name);
        Ok(Connector {
            cfg,
            auth,
            client,
            store,
            mappings,
            metrics,
        })
    }

    /// Sends one row and says what the ERP answered.
    async fn send(&self, row: &OutboxRow, now_ms: u64) -> Answer {
        let ev = if row.fact.kind == FactType::PodConfirmed {
            evidence(&self.store, row).await
        } else {
            None
        };
        let body = message(row, &self.mappings, ev);
        let url = format!("{}/events", self.cfg.base_url.trim_end_matches('/'));
        let mut req = self
            .client
            .post(&url)
            .header("content-type", "application/cloudevents+json")
            .header("idempotency-key", &row.id)
            .header("x-correlation-id", &row.fact.id)
            .header("traceparent", traceparent(&row.id))
            .json(&body);
        if let Some(a) = &self.auth {
            req = req.header("authorization", a);
        }
        let started = Instant::now();
        let res = req.send().await;
        self.metrics.observe_latency(started.elapsed());
        let resp = match res {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Answer::Later(None, "timed out".into()),
            Err(e) => return Answer::Later(None, format!("could not reach the ERP: {e}")),
        };
        let status = resp.status();
        if status.is_success() || status.as_u16() == 409 {
            return Answer::Applied;
        }
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_ms(v, now_ms));
        let mut text = resp.text().await.unwrap_or_default();
        let mut cut = text.len().min(MAX_RESPONSE_KEPT);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        match status.as_u16() {
            429 | 503 => Answer::Later(after, format!("HTTP {status}")),
            500..=599 => Answer::Later(None, format!("HTTP {status}: {text}")),
            _ => Answer::Refused(format!("HTTP {status}"), text),
        }
    }

    /// What an answer does to the row, given its limits.
    fn settle(&self, row: &OutboxRow, answer: Answer, now_ms: u64) -> Delivery {
        match answer {
            Answer::Applied => Delivery::Done,
            Answer::Refused(error, body) => Delivery::Dead {
                error,
                response: Some(body),
            },
            Answer::Later(after, error) => {
                let attempts = row.attempts + 1;
                let age_ms = now_ms.saturating_sub(row.created_ms);
                if attempts >= self.cfg.max_attempts || age_ms >= self.cfg.max_age_s * 1000 {
                    return Delivery::Dead {
                        error: format!("given up after {attempts} attempts: {error}"),
                        response: None,
                    };
                }
                let wait = after.unwrap_or_else(|| {
                    backoff_ms(row.attempts, self.cfg.backoff_ms, self.cfg.backoff_cap_ms)
                });
                Delivery::Retry {
                    next_ms: now_ms + wait,
                    error,
                }
            }
        }
    }

    /// Delivers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut bucket = Bucket::new(this.cfg.rate_per_s, this.cfg.burst);
        let mut failures = 0u32;
        let mut open_until: Option<Instant> = None;
        let mut last_depth = Instant::now() - Duration::from_secs(60);
        let mut idle = IDLE;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if last_depth.elapsed() >= Duration::from_secs(5) {
                last_depth = Instant::now();
                if let Ok((n, oldest)) = this.store.outbox_depth(&this.cfg.name).await {
                    this.metrics.depth.store(n, Ordering::Relaxed);
                    let age = oldest.map_or(0, |t| crate::ingest::now_ms().saturating_sub(t));
                    this.metrics.oldest_age_ms.store(age, Ordering::Relaxed);
                }
            }
            // Breaker: open -> wait; then half-open: one probe.
            let mut limit = this.cfg.burst as usize;
            if let Some(until) = open_until {
                if Instant::now() < until {
                    this.metrics.breaker.store(BREAKER_OPEN, Ordering::Relaxed);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                    continue;
                }
                this.metrics
                    .breaker
                    .store(BREAKER_HALF_OPEN, Ordering::Relaxed);
                limit = 1;
            }
            let now = crate::ingest::now_ms();
            let lease = now + 2 * this.cfg.timeout_ms + 30_000;
            let due = match this
                .store
                .outbox_due(&this.cfg.name, now, lease, limit)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(erp = %this.cfg.name, error = %e, "could not read the outbox");
                    Vec::new()
                }
            };
            if due.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(idle) => {}
                }
                idle = (idle * 2).min(IDLE_MAX);
                continue;
            }
            idle = IDLE;
            let mut sends = tokio::task::JoinSet::new();
            for row in due {
                bucket.take().await;
                let c = this.clone();
                sends.spawn(async move {
                    let answer = c.send(&row, crate::ingest::now_ms()).await;
                    (row, answer)
                });
            }
            let mut results = Vec::new();
            while let Some(done) = sends.join_next().await {
                let Ok((row, answer)) = done else { continue };
                let now = crate::ingest::now_ms();
                let failed = matches!(answer, Answer::Later(..));
                failures = if failed { failures + 1 } else { 0 };
                let d = this.settle(&row, answer, now);
                match &d {
                    Delivery::Done => Metrics::add(&this.metrics.delivered, 1),
                    Delivery::Retry { error, .. } => {
                        Metrics::add(&this.metrics.retried, 1);
                        tracing::debug!(erp = %this.cfg.name, row = %row.id, %error, "delivery will be retried");
                    }
                    Delivery::Dead { error, .. } => {
                        Metrics::add(&this.metrics.dead, 1);
                        tracing::warn!(erp = %this.cfg.name, row = %row.id, %error, "delivery given up: dead letter");
                    }
                }
                results.push((row, d));
            }
            if failures >= this.cfg.breaker_failures {
                if open_until.is_none() || failures == this.cfg.breaker_failures {
                    tracing::warn!(erp = %this.cfg.name, failures, "circuit breaker open");
                }
                open_until = Some(Instant::now() + Duration::from_millis(this.cfg.breaker_open_ms));
            } else if failures == 0 {
                if open_until.is_some() {
                    tracing::info!(erp = %this.cfg.name, "circuit breaker closed");
                }
                open_until = None;
                this.metrics
                    .breaker
                    .store(BREAKER_CLOSED, Ordering::Relaxed);
            }
            if let Err(e) = this
                .store
                .outbox_settle(results, crate::ingest::now_ms())
                .await
            {
                // The rows stay as they were (leased on PostgreSQL until the lease ends):
                // sent again, with the same Idempotency-Key.
                tracing::warn!(erp = %this.cfg.name, error = %e, "could not record deliveries");
                tokio::time::sleep(IDLE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after_ms("120", 0), Some(120_000));
        let now = 1_445_412_480_000; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            retry_after_ms("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(30_000)
        );
        assert_eq!(retry_after_ms("soon", now), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        for attempts in 0..20 {
            let ceiling = (1000u64 << attempts).min(60_000);
            for _ in 0..50 {
                assert!(backoff_ms(attempts, 1000, 60_000) <= ceiling);
            }
        }
        // Spread, not a fixed delay.
        let v: std::collections::HashSet<u64> =
            (0..50).map(|_| backoff_ms(5, 1000, 60_000)).collect();
        assert!(v.len() > 10);
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_stable() {
        let t = traceparent("sap/S1/V1:1:7");
        assert_eq!(t, traceparent("sap/S1/V1:1:7"));
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}

//! The delivery loop every sink shares (an ERP, one partner webhook subscription): what
//! differs between them (the request, what an answer means) is a [`Target`].
//!
//! ```text
//! loop: target.gate()               deliver | pause (a disabled subscription) | stop
//!   store.outbox_due(sink)          the first row of each shipment, due now (leased on
//!                                   PostgreSQL so two hubs never send one row at once)
//!   -> at most `burst` at once, each after a token of the bucket (rate_per_s, burst)
//!   -> target.send(row)             one request, inside a span with the correlation id
//!   -> target.settle(row, answer)   done | retry at | dead letter
//!   -> store.outbox_settle(all)     one write for the batch
//! idle: wait for the store's outbox signal (a row was written in this process), or a
//!       poll (another hub on the same database wrote one), whichever comes first
//! ```
//!
//! Order per shipment holds because only a shipment's first row is ever due: a later
//! milestone waits until the earlier one is done (or dead-lettered, which operators see at
//! `GET /v1/ops/deadletters`).
//!
//! Circuit breaker: `breaker_failures` retryable failures in a row (the sink is down or
//! drowning) open it; no request goes out for `breaker_open_ms`; then one probe
//! (half-open): success closes it, failure opens it again. Rows wait meanwhile, nothing
//! is lost and nothing counts as an attempt.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Delivery, OutboxRow};
use crate::metrics::{Metrics, SinkMetrics};
use crate::store::Store;

/// Pause when nothing is due, doubled while nothing stays due, up to [`IDLE_MAX`]; a
/// row written by this process wakes the worker at once.
const IDLE: Duration = Duration::from_millis(200);
/// See [`IDLE`]: the longest a row written by another hub waits to be seen.
const IDLE_MAX: Duration = Duration::from_secs(2);
/// How often the depth gauges are refreshed.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Breaker states as the metric shows them.
pub const BREAKER_CLOSED: u64 = 0;
/// See [`BREAKER_CLOSED`].
pub const BREAKER_HALF_OPEN: u64 = 1;
/// See [`BREAKER_CLOSED`].
pub const BREAKER_OPEN: u64 = 2;

/// What one request got, before the row's limits are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Applied (2xx, or 409 for an ERP that had it).
    Applied,
    /// Retry not before this many ms (Retry-After), or on the sink's schedule if `None`.
    Later(Option<u64>, String),
    /// Never (the sink refused it), with its answer's body.
    Refused(String, String),
}

/// Whether a worker delivers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Deliver.
    Open,
    /// Not now (a disabled subscription): rows wait.
    Paused,
    /// Never again (a deleted subscription): the worker ends.
    Stop,
}

/// One sink's rate and breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Token bucket: requests a second ...
    pub rate_per_s: f64,
    /// ... and at once (also the most in flight).
    pub burst: u32,
    /// Each request's deadline (the lease on a row outlives two of them).
    pub timeout_ms: u64,
    /// Failures in a row that open the breaker ...
    pub breaker_failures: u32,
    /// ... for this long.
    pub breaker_open_ms: u64,
}

/// What a sink does with a row.
pub trait Target: Send + Sync + 'static {
    /// The sink's name (outbox rows, metrics).
    fn sink(&self) -> &str;
    /// Whether to deliver now (asked before each batch).
    fn gate(&self) -> impl Future<Output = Gate> + Send;
    /// Sends one row.
    fn send(&self, row: &OutboxRow, now_ms: u64) -> impl Future<Output = Answer> + Send;
    /// What an answer does to the row, given the sink's limits.
    fn settle(&self, row: &OutboxRow, answer: Answer, now_ms: u64) -> Delivery;
}

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

/// Full jitter: uniformly random in `[0, min(cap, base x 2^attempts)]`.
pub fn backoff_ms(attempts: u32, base: u64, cap: u64) -> u64 {
    use rand::Rng as _;
    let ceiling = base.saturating_mul(1u64 << attempts.min(40)).min(cap);
    rand::rng().random_range(0..=ceiling)
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

/// Most bytes of a sink's answer kept with a dead letter or a retry's error.
pub const MAX_RESPONSE_KEPT: usize = 4096;

/// Reads at most [`MAX_RESPONSE_KEPT`] bytes of an answer's body.
pub async fn response_text(resp: reqwest::Response) -> String {
    let mut text = resp.text().await.unwrap_or_default();
    let mut cut = text.len().min(MAX_RESPONSE_KEPT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

/// What a sink answered to a request: its status, its `Retry-After` (ms from `now_ms`)
/// and the start of its body. `Err`: no answer came (a timeout, no connection), and the
/// retry that makes (`who` names the sink in the error).
pub async fn reply(
    sent: Result<reqwest::Response, reqwest::Error>,
    now_ms: u64,
    who: &str,
) -> Result<(reqwest::StatusCode, Option<u64>, String), Answer> {
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err(Answer::Later(None, "timed out".into())),
        Err(e) => return Err(Answer::Later(None, format!("could not reach {who}: {e}"))),
    };
    let status = resp.status();
    let after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after_ms(v, now_ms));
    Ok((status, after, response_text(resp).await))
}

/// A sink's delivery loop.
pub struct Worker<T> {
    target: Arc<T>,
    limits: Limits,
    store: Store,
    metrics: Arc<SinkMetrics>,
    wake: watch::Receiver<u64>,
}

impl<T: Target> std::fmt::Debug for Worker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("sink", &self.target.sink())
            .field("limits", &self.limits)
            .finish()
    }
}

impl<T: Target> Worker<T> {
    /// A worker delivering `target`'s rows from `store`.
    pub fn new(target: T, limits: Limits, store: Store, metrics: &Metrics) -> Self {
        let metrics = metrics.sink(target.sink());
        let wake = store.outbox_signal();
        Worker {
            target: Arc::new(target),
            limits,
            store,
            metrics,
            wake,
        }
    }

    /// Waits `idle`, or less if a row is written in this process meanwhile.
    async fn pause(&mut self, idle: Duration, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(idle) => true,
            _ = self.wake.changed() => true,
        }
    }

    /// Delivers until `shutdown` (or until the target says stop).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let sink = self.target.sink().to_string();
        let mut bucket = Bucket::new(self.limits.rate_per_s, self.limits.burst);
        let mut failures = 0u32;
        let mut open_until: Option<Instant> = None;
        let mut last_depth = Instant::now() - DEPTH_EVERY;
        let mut idle = IDLE;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if last_depth.elapsed() >= DEPTH_EVERY {
                last_depth = Instant::now();
                if let Ok((n, oldest)) = self.store.outbox_depth(&sink).await {
                    self.metrics.depth.store(n, Ordering::Relaxed);
                    let age = oldest.map_or(0, |t| crate::ingest::now_ms().saturating_sub(t));
                    self.metrics.oldest_age_ms.store(age, Ordering::Relaxed);
                }
            }
            match self.target.gate().await {
                Gate::Open => {}
                Gate::Paused => {
                    if !self.pause(IDLE_MAX, &shutdown).await {
                        return;
                    }
                    continue;
                }
                Gate::Stop => return,
            }
            // Breaker: open -> wait; then half-open: one probe.
            let mut limit = self.limits.burst as usize;
            if let Some(until) = open_until {
                if Instant::now() < until {
                    self.metrics.breaker.store(BREAKER_OPEN, Ordering::Relaxed);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                    continue;
                }
                self.metrics
                    .breaker
                    .store(BREAKER_HALF_OPEN, Ordering::Relaxed);
                limit = 1;
            }
            // Mark what has been seen before reading, so a row written after the read
            // wakes the next pause.
            self.wake.borrow_and_update();
            let now = crate::ingest::now_ms();
            let lease = now + 2 * self.limits.timeout_ms + 30_000;
            let due = match self.store.outbox_due(&sink, now, lease, limit).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(%sink, error = %e, "could not read the outbox");
                    Vec::new()
                }
            };
            if due.is_empty() {
                if !self.pause(idle, &shutdown).await {
                    return;
                }
                idle = (idle * 2).min(IDLE_MAX);
                continue;
            }
            idle = IDLE;
            let mut sends = tokio::task::JoinSet::new();
            for row in due {
                bucket.take().await;
                let (t, m) = (self.target.clone(), self.metrics.clone());
                let span = tracing::debug_span!("outbox.deliver", sink = %sink, row = %row.id,
                    correlation_id = %row.fact.id, attempt = row.attempts + 1);
                sends.spawn(
                    async move {
                        let started = Instant::now();
                        let answer = t.send(&row, crate::ingest::now_ms()).await;
                        m.observe_latency(started.elapsed());
                        (row, answer)
                    }
                    .instrument(span),
                );
            }
            let mut results = Vec::new();
            while let Some(done) = sends.join_next().await {
                let Ok((row, answer)) = done else { continue };
                let now = crate::ingest::now_ms();
                let failed = matches!(answer, Answer::Later(..));
                failures = if failed { failures + 1 } else { 0 };
                let d = self.target.settle(&row, answer, now);
                match &d {
                    Delivery::Done => Metrics::add(&self.metrics.delivered, 1),
                    Delivery::Retry { error, .. } => {
                        Metrics::add(&self.metrics.retried, 1);
                        tracing::debug!(%sink, row = %row.id, correlation_id = %row.fact.id, %error, "delivery will be retried");
                    }
                    Delivery::Dead { error, .. } => {
                        Metrics::add(&self.metrics.dead, 1);
                        tracing::warn!(%sink, row = %row.id, correlation_id = %row.fact.id, %error, "delivery given up: dead letter");
                    }
                }
                results.push((row, d));
            }
            if failures >= self.limits.breaker_failures {
                if open_until.is_none() || failures == self.limits.breaker_failures {
                    tracing::warn!(%sink, failures, "circuit breaker open");
                }
                open_until =
                    Some(Instant::now() + Duration::from_millis(self.limits.breaker_open_ms));
            } else if failures == 0 {
                if open_until.is_some() {
                    tracing::info!(%sink, "circuit breaker closed");
                }
                open_until = None;
                self.metrics
                    .breaker
                    .store(BREAKER_CLOSED, Ordering::Relaxed);
            }
            if let Err(e) = self
                .store
                .outbox_settle(results, crate::ingest::now_ms())
                .await
            {
                // The rows stay as they were (leased on PostgreSQL until the lease ends):
                // sent again, with the same key.
                tracing::warn!(%sink, error = %e, "could not record deliveries");
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
}

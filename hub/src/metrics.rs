//! The hub's counters and their Prometheus text form. Per hub process (no global
//! recorder), so several hubs in one test process do not mix their figures. Counters are
//! this process's work: with several hub processes on one database, Prometheus sums them
//! across instances (each scrape target is one process); nothing here is fleet state,
//! which lives in the store.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the ingest-lag histogram buckets.
const LAG_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 3600.0];

/// Counters; every field is monotonic except where noted.
#[derive(Debug, Default)]
pub struct Metrics {
    /// New events stored.
    pub events_ingested: AtomicU64,
    /// Events received again and dropped by dedup.
    pub duplicates_dropped: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
    /// Frames that did not decode (quarantined).
    pub malformed_frames: AtomicU64,
    /// Acks published to devices.
    pub acks_sent: AtomicU64,
    /// Blob chunks received.
    pub blob_chunks: AtomicU64,
    /// Blobs completed and verified.
    pub blobs_completed: AtomicU64,
    /// Publishes or subscriptions outside a device's own prefix.
    pub topic_violations: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Events whose identity was already stored with different content (quarantined).
    pub identity_conflicts: AtomicU64,
    /// Device connections refused or closed because the certificate is no longer valid
    /// (a resumed session after expiry, a live connection at expiry).
    pub certificate_refusals: AtomicU64,
    /// Store rounds that failed (nothing of them acked).
    pub store_failures: AtomicU64,
    /// Connections closed at once because the handshake budget (total or per source) was
    /// full.
    pub handshakes_refused: AtomicU64,
    /// Gauge: TLS handshakes in progress.
    pub handshakes_in_progress: AtomicU64,
    /// Gauge: devices with an open connection.
    pub connected_devices: AtomicU64,
    /// Unfinished blob uploads a device's newer upload evicted (its own, for room).
    pub blob_uploads_evicted: AtomicU64,
    /// Unfinished blob uploads dropped after getting no chunk for the configured time.
    pub blob_uploads_expired: AtomicU64,
    /// Gauge (at the last sweep): unfinished blob uploads in the store.
    pub blob_uploads_in_progress: AtomicU64,
    /// Gauge (at the last sweep): bytes of their parts.
    pub blob_upload_bytes: AtomicU64,
    /// Gauges: stuck shipments by reason (released_not_dispatched,
    /// dispatched_not_acknowledged, delivered_without_pod, waiting_in_review).
    pub shipments_stuck: [AtomicU64; 4],
    /// Gauge: open review items.
    pub review_open: AtomicU64,
    /// EST milestones recorded (an arrival estimate moved by more than 5 minutes).
    pub eta_facts: AtomicU64,
    /// Estimate rounds finished.
    pub eta_rounds: AtomicU64,
    /// Gauge (at the last round): vehicles with open shipments and a fresh position.
    pub eta_vehicles: AtomicU64,
    lag_buckets: [AtomicU64; LAG_BUCKETS.len()],
    lag_count: AtomicU64,
    lag_sum_ms: AtomicU64,
    /// Per outbox sink, by name.
    sinks: std::sync::Mutex<std::collections::BTreeMap<String, std::sync::Arc<SinkMetrics>>>,
}

/// One outbox sink's metrics.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    /// Gauge: rows waiting.
    pub depth: AtomicU64,
    /// Gauge: age of the oldest waiting row (ms).
    pub oldest_age_ms: AtomicU64,
    /// Rows delivered (2xx, 409).
    pub delivered: AtomicU64,
    /// Attempts to be retried.
    pub retried: AtomicU64,
    /// Rows given up (dead letters).
    pub dead: AtomicU64,
    /// Gauge: 0 closed, 1 half-open, 2 open.
    pub breaker: AtomicU64,
    /// Requests timed, and their time in all (ms).
    pub requests: AtomicU64,
    /// See `requests`.
    pub request_ms_sum: AtomicU64,
}

impl SinkMetrics {
    /// Records one request's time.
    pub fn observe_latency(&self, d: std::time::Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.request_ms_sum
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The metrics of sink `name` (made on first use).
    pub fn sink(&self, name: &str) -> std::sync::Arc<SinkMetrics> {
        let mut m = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    /// Forgets sink `name` (a deleted webhook subscription).
    pub fn drop_sink(&self, name: &str) {
        self.sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one event's ingest lag (record time minus capture time).
    pub fn observe_lag_ms(&self, lag_ms: u64) {
        let secs = lag_ms as f64 / 1000.0;
        for (i, le) in LAG_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.lag_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.lag_count.fetch_add(1, Ordering::Relaxed);
        self.lag_sum_ms.fetch_add(lag_ms, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let counters: [(&str, &str, &AtomicU64); 18] = [
            (
                "fleetsync_hub_blob_uploads_evicted_total",
                "Unfinished blob uploads dropped to make room for the same device's newer one.",
                &self.blob_uploads_evicted,
            ),
            (
                "fleetsync_hub_blob_uploads_expired_total",
                "Unfinished blob uploads dropped after getting no chunk for store.partial_blob_ttl_s.",
                &self.blob_uploads_expired,
            ),
            (
                "fleetsync_hub_handshakes_refused_total",
                "Connections closed at once: the TLS handshake budget (total or per source) was full.",
                &self.handshakes_refused,
            ),
            (
                "fleetsync_hub_certificate_refusals_total",
                "Device connections refused or closed because the certificate is no longer valid.",
                &self.certificate_refusals,
            ),
            (
                "fleetsync_hub_store_failures_total",
                "Store rounds that failed; nothing of them was acked.",
                &self.store_failures,
            ),
            (
                "fleetsync_hub_events_ingested_total",
                "New events stored.",
                &self.events_ingested,
            ),
            (
                "fleetsync_hub_duplicates_dropped_total",
                "Redelivered events dropped by dedup.",
                &self.duplicates_dropped,
            ),
            (
                "fleetsync_hub_batches_total",
                "Event batches processed.",
                &self.batches,
            ),
            (
                "fleetsync_hub_malformed_frames_total",
                "Frames that did not decode (quarantined).",
                &self.malformed_frames,
            ),
            (
                "fleetsync_hub_acks_sent_total",
                "Acks published to devices.",
                &self.acks_sent,
            ),
            (
                "fleetsync_hub_blob_chunks_total",
                "Blob chunks received.",
                &self.blob_chunks,
            ),
            (
                "fleetsync_hub_blobs_completed_total",
                "Blobs assembled and verified.",
                &self.blobs_completed,
            ),
            (
                "fleetsync_hub_topic_violations_total",
                "Publishes or subscriptions outside the device's prefix.",
                &self.topic_violations,
            ),
            (
                "fleetsync_hub_tls_handshake_failures_total",
                "Device TLS handshakes failed or timed out.",
                &self.tls_handshake_failures,
            ),
            (
                "fleetsync_hub_connections_refused_total",
                "Device connections refused at the limit.",
                &self.connections_refused,
            ),
            (
                "fleetsync_hub_identity_conflicts_total",
                "Events reusing a stored (epoch, seq) with other content (quarantined).",
                &self.identity_conflicts,
            ),
            (
                "fleetsync_hub_eta_facts_total",
                "EST milestones recorded (an arrival estimate moved by more than 5 minutes).",
                &self.eta_facts,
            ),
            (
                "fleetsync_hub_eta_rounds_total",
                "Rounds of arrival estimates finished.",
                &self.eta_rounds,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleetsync_hub_connected_devices Devices with an open connection.\n# TYPE fleetsync_hub_connected_devices gauge\nfleetsync_hub_connected_devices {}",
            g(&self.connected_devices)
        );
        let _ = writeln!(
            out,
            "# HELP fleetsync_hub_handshakes_in_progress TLS handshakes in progress.\n# TYPE fleetsync_hub_handshakes_in_progress gauge\nfleetsync_hub_handshakes_in_progress {}",
            g(&self.handshakes_in_progress)
        );
        for (name, help, c) in [
            (
                "fleetsync_hub_blob_uploads_in_progress",
                "Unfinished blob uploads in the store (at the last sweep).",
                &self.blob_uploads_in_progress,
            ),
            (
                "fleetsync_hub_blob_upload_bytes",
                "Bytes of unfinished blob uploads in the store (at the last sweep).",
                &self.blob_upload_bytes,
            ),
            (
                "fleetsync_hub_eta_vehicles",
                "Vehicles with open shipments and a position from the last 10 minutes (at the last estimate round).",
                &self.eta_vehicles,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                g(c)
            );
        }
        let name = "fleetsync_hub_shipments_stuck";
        let _ = writeln!(
            out,
            "# HELP {name} Shipments waiting past shipments.stuck_after_s, by reason (at the last check).\n# TYPE {name} gauge"
        );
        for (reason, c) in crate::shipments::service::STUCK_REASONS
            .iter()
            .zip(&self.shipments_stuck)
        {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", reason.as_str(), g(c));
        }
        let _ = writeln!(
            out,
            "# HELP fleetsync_hub_review_open Open items in the review queue.\n# TYPE fleetsync_hub_review_open gauge\nfleetsync_hub_review_open {}",
            g(&self.review_open)
        );
        let name = "fleetsync_hub_ingest_lag_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Capture to hub record time of new events.\n# TYPE {name} histogram"
        );
        for (i, le) in LAG_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                g(&self.lag_buckets[i])
            );
        }
        let count = g(&self.lag_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", g(&self.lag_sum_ms) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {count}");
        let sinks: Vec<(String, std::sync::Arc<SinkMetrics>)> = self
            .sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        type Family = (
            &'static str,
            &'static str,
            &'static str,
            fn(&SinkMetrics) -> f64,
        );
        let families: [Family; 8] = [
            (
                "fleetsync_hub_outbox_depth",
                "gauge",
                "Outbox rows waiting, per sink.",
                |m| m.depth.load(Ordering::Relaxed) as f64,
            ),
            (
                "fleetsync_hub_outbox_oldest_age_seconds",
                "gauge",
                "Age of the oldest waiting outbox row, per sink.",
                |m| m.oldest_age_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            (
                "fleetsync_hub_outbox_delivered_total",
                "counter",
                "Outbox rows delivered (2xx or 409), per sink.",
                |m| m.delivered.load(Ordering::Relaxed) as f64,
            ),
            (
                "fleetsync_hub_outbox_retried_total",
                "counter",
                "Delivery attempts to be retried, per sink.",
                |m| m.retried.load(Ordering::Relaxed) as f64,
            ),
            (
                "fleetsync_hub_outbox_dead_letters_total",
                "counter",
                "Outbox rows given up (dead letters), per sink.",
                |m| m.dead.load(Ordering::Relaxed) as f64,
            ),
            (
                "fleetsync_hub_outbox_breaker_state",
                "gauge",
                "Circuit breaker per sink: 0 closed, 1 half-open, 2 open.",
                |m| m.breaker.load(Ordering::Relaxed) as f64,
            ),
            (
                "fleetsync_hub_outbox_request_seconds_sum",
                "counter",
                "Time spent in requests to the sink.",
                |m| m.request_ms_sum.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            (
                "fleetsync_hub_outbox_requests_total",
                "counter",
                "Requests to the sink.",
                |m| m.requests.load(Ordering::Relaxed) as f64,
            ),
        ];
        if !sinks.is_empty() {
            for (name, kind, help, f) in families {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (sink, m) in &sinks {
                    let _ = writeln!(out, "{name}{{sink=\"{sink}\"}} {}", f(m));
                }
            }
        }
        out
    }
}

//! The local API for the driver's tablet (axum, bearer token).
//!
//! - `GET /v1/status`: link, epoch, backlog per lane, last ack, disk use, GPS counters
//!   (`gps.rejected`: NMEA cycles rejected per validity rule).
//! - `POST /v1/events`: one event in the shared JSON shape, of the kinds a local client
//!   may originate ([`LOCAL_KINDS`]: positions, from an external GPS app); 201 `{epoch,
//!   seq}` only once it is durable (fsynced); 400 naming the bad field; 422 for a kind the
//!   agent records itself (geofence, trip, health, gap, assignment_ack: the hub trusts
//!   them as the device's own word) or that has its own endpoint with its own rules
//!   (pod: `POST /v1/stops/{stop}/pod`, exception: `POST /v1/exceptions`); 507 when the
//!   store is full of undelivered critical events.
//!
//! - the driver's jobs, POD and exception endpoints ([`driver`]).
//!
//! Errors are JSON `{"error": "..."}`.

mod driver;
pub mod serve;

pub use driver::{
    EXCEPTION_CODES, MAX_FILE_BYTES, MAX_POD_BYTES, MAX_POD_UPLOADS, MAX_UPLOAD_TIME,
    UPLOAD_RETRY_AFTER_S, sniff,
};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetsync_protocol::json::{EventJson, Time};
use serde::Serialize;
use tokio::sync::Notify;

use crate::store::{Store, StoreError};
use crate::uplink::LinkState;

/// The event kinds `POST /v1/events` accepts: what a client on the gateway's LAN may
/// originate. Everything else the agent records itself or takes through an endpoint
/// that checks it.
pub const LOCAL_KINDS: [&str; 1] = ["position"];

/// Largest request body of `POST /v1/events`.
pub const MAX_EVENT_BODY: usize = 64 * 1024;

/// Handler state.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// This device.
    pub device_id: Arc<str>,
    /// The store.
    pub store: Store,
    /// Uplink state.
    pub link: Arc<LinkState>,
    /// Wakes the uplink after an append.
    pub wake: Arc<Notify>,
    /// Bearer token.
    pub token: Arc<str>,
    /// The assignment in force.
    pub assignment: crate::jobs::Current,
    /// Last fix and stop states.
    pub edge: Arc<crate::edge::Edge>,
    /// GPS input counters.
    pub gps: Arc<crate::gps::GpsStats>,
    /// Serialises POD creation (idempotency keys).
    pub pod_lock: Arc<tokio::sync::Mutex<()>>,
    /// POD uploads in progress ([`MAX_POD_UPLOADS`] permits).
    pub pod_uploads: Arc<tokio::sync::Semaphore>,
    /// Longest wait for the next bytes of a POD upload's body (then 408).
    pub body_timeout: std::time::Duration,
}

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// 400.
    BadRequest(String),
    /// 401.
    Unauthorized,
    /// 404.
    NotFound(String),
    /// 422.
    Unprocessable(String),
    /// 408: the request's body stalled; the connection is closed after the answer.
    Timeout(String),
    /// 507: the store is full.
    Full(String),
    /// 503 with `Retry-After`: a bounded resource is busy; the client sends it again.
    Busy {
        /// What is busy and when to come back.
        message: String,
        /// Seconds to wait.
        retry_after_s: u32,
    },
    /// 500, logged.
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QuotaFull { .. } => ApiError::Full(format!(
                "{e}; the event was not stored. Undelivered events fill the store: check the link to the hub"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.as_str()),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "missing or wrong bearer token"),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m.as_str()),
            ApiError::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, m.as_str()),
            ApiError::Full(m) => (StatusCode::INSUFFICIENT_STORAGE, m.as_str()),
            ApiError::Timeout(m) => {
                let mut r =
                    (StatusCode::REQUEST_TIMEOUT, Json(ErrorBody { error: m })).into_response();
                // The rest of the body is not read: the connection cannot be reused.
                r.headers_mut().insert(
                    header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return r;
            }
            ApiError::Busy {
                message,
                retry_after_s,
            } => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(ErrorBody { error: message }),
                )
                    .into_response();
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from(*retry_after_s),
                );
                return r;
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "local API internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the agent's log",
                )
            }
        };
        (status, Json(ErrorBody { error: msg })).into_response()
    }
}

fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| secret_eq(t.trim().as_bytes(), st.token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// The router.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/events",
            post(post_event).layer(DefaultBodyLimit::max(MAX_EVENT_BODY)),
        )
        .route("/v1/jobs", get(driver::jobs))
        .route("/v1/jobs/{stop}", get(driver::job_stop))
        .route(
            "/v1/stops/{stop}/pod",
            post(driver::pod).layer(DefaultBodyLimit::max(MAX_POD_BYTES + 64 * 1024)),
        )
        .route(
            "/v1/exceptions",
            post(driver::exception).layer(DefaultBodyLimit::max(MAX_EVENT_BODY)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Serialize)]
struct LaneOut {
    events: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct BacklogOut {
    critical: LaneOut,
    telemetry: LaneOut,
    /// POD blobs not yet stored at the hub.
    blobs: LaneOut,
}

#[derive(Serialize)]
struct DiskOut {
    used_bytes: u64,
    quota_bytes: u64,
    on_disk_bytes: u64,
}

#[derive(Serialize)]
struct StatusOut {
    device_id: String,
    connected: bool,
    epoch: u32,
    backlog: BacklogOut,
    last_ack_time: Option<Time>,
    disk: DiskOut,
    gaps_declared: u64,
    link: fleetsync_protocol::LinkStats,
    gps: crate::gps::GpsStatsSnapshot,
}

async fn status(State(st): State<ApiState>) -> Json<StatusOut> {
    let s = st.store.stats();
    let last_ack = st.link.last_ack_ms.load(Ordering::Relaxed);
    Json(StatusOut {
        device_id: st.device_id.to_string(),
        connected: st.link.connected.load(Ordering::Relaxed),
        epoch: s.epoch,
        backlog: BacklogOut {
            critical: LaneOut {
                events: s.critical.events,
                bytes: s.critical.bytes,
            },
            telemetry: LaneOut {
                events: s.telemetry.events,
                bytes: s.telemetry.bytes,
            },
            blobs: LaneOut {
                events: s.blobs.events,
                bytes: s.blobs.bytes,
            },
        },
        last_ack_time: (last_ack > 0).then_some(Time(last_ack)),
        disk: DiskOut {
            used_bytes: s.used_bytes,
            quota_bytes: s.quota_bytes,
            on_disk_bytes: s.disk_bytes,
        },
        gaps_declared: s.gaps_declared,
        link: st.link.stats(),
        gps: st.gps.snapshot(),
    })
}

#[derive(Serialize)]
struct Created {
    epoch: u32,
    seq: u64,
}

async fn post_event(State(st): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let json: EventJson =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let event = json
        .to_event()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let kind = event.body.kind();
    if !LOCAL_KINDS.contains(&kind) {
        let instead = match kind {
            "pod" => "; POD goes to POST /v1/stops/{stop}/pod",
            "exception" => "; exceptions go to POST /v1/exceptions",
            _ => "; the agent records it itself",
        };
        return Err(ApiError::Unprocessable(format!(
            "kind: {kind:?} cannot be posted here (accepted: {}){instead}",
            LOCAL_KINDS.join(", ")
        )));
    }
    let id = st.store.append(event).await?;
    st.wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(Created {
            epoch: id.epoch,
            seq: id.seq,
        }),
    )
        .into_response())
}

async fn metrics(State(st): State<ApiState>) -> Response {
    use std::fmt::Write as _;
    let s = st.store.stats();
    let l = st.link.stats();
    let g = st.gps.snapshot();
    let mut out = String::with_capacity(2048);
    let mut m = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    m(
        "fleetsync_agent_backlog_events",
        "gauge",
        "Events awaiting a hub ack.",
        &[
            ("{lane=\"critical\"}", s.critical.events),
            ("{lane=\"telemetry\"}", s.telemetry.events),
            ("{lane=\"blobs\"}", s.blobs.events),
        ],
    );
    m(
        "fleetsync_agent_backlog_bytes",
        "gauge",
        "Stored bytes awaiting a hub ack.",
        &[
            ("{lane=\"critical\"}", s.critical.bytes),
            ("{lane=\"telemetry\"}", s.telemetry.bytes),
            ("{lane=\"blobs\"}", s.blobs.bytes),
        ],
    );
    m(
        "fleetsync_agent_store_used_bytes",
        "gauge",
        "Logical bytes in the store.",
        &[("", s.used_bytes)],
    );
    m(
        "fleetsync_agent_store_quota_bytes",
        "gauge",
        "The store's quota.",
        &[("", s.quota_bytes)],
    );
    m(
        "fleetsync_agent_gaps_declared_total",
        "counter",
        "Gap events written since start.",
        &[("", s.gaps_declared)],
    );
    m(
        "fleetsync_agent_connected",
        "gauge",
        "1 when connected to the hub.",
        &[("", u64::from(st.link.connected.load(Ordering::Relaxed)))],
    );
    m(
        "fleetsync_agent_batches_sent_total",
        "counter",
        "Batches published.",
        &[("", u64::from(l.batches_sent))],
    );
    m(
        "fleetsync_agent_resends_total",
        "counter",
        "Batches resent after an ack timeout or reconnect.",
        &[("", u64::from(l.resends))],
    );
    m(
        "fleetsync_agent_connects_total",
        "counter",
        "Connections to the hub.",
        &[("", u64::from(l.connects))],
    );
    m(
        "fleetsync_agent_gps_sentences_total",
        "counter",
        "GPS sentences or reports read.",
        &[("", g.sentences)],
    );
    m(
        "fleetsync_agent_gps_fixes_total",
        "counter",
        "GPS fixes taken.",
        &[("", g.fixes)],
    );
    m(
        "fleetsync_agent_gps_no_fix_total",
        "counter",
        "GPS reporting cycles (NMEA) or reports (gpsd) without a valid fix.",
        &[("", g.no_fix)],
    );
    let rejected: Vec<(String, u64)> = crate::gps::Reject::ALL
        .into_iter()
        .map(|r| (format!("{{reason=\"{}\"}}", r.as_str()), g.rejected.get(r)))
        .collect();
    let rejected: Vec<(&str, u64)> = rejected.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    m(
        "fleetsync_agent_gps_rejected_total",
        "counter",
        "NMEA reporting cycles rejected, by the first validity rule they broke.",
        &rejected,
    );
    m(
        "fleetsync_agent_gps_checksum_errors_total",
        "counter",
        "NMEA sentences with a bad checksum.",
        &[("", g.checksum_errors)],
    );
    m(
        "fleetsync_agent_gps_garbage_total",
        "counter",
        "GPS input lines that were not NMEA/JSON.",
        &[("", g.garbage)],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn sentence(body: &str) -> String {
        let cs = body.bytes().fold(0u8, |x, c| x ^ c);
        format!("${body}*{cs:02X}")
    }

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        let req = Request::get(path)
            .header(header::AUTHORIZATION, "Bearer t0ken")
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn gps_rejections_by_reason_show_in_status_and_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(crate::store::StoreConfig {
            path: dir.path().join("store"),
            quota_bytes: 8 << 20,
            space_factor: crate::store::SLED_SPACE_FACTOR,
            commit_interval: std::time::Duration::ZERO,
        })
        .unwrap();
        let gps = Arc::new(crate::gps::GpsStats::default());
        // What the GPS task counts: a valid cycle, an RMC with status V beside a GGA
        // that claims a fix, two cycles whose GSA says no fix.
        let mut merger = crate::gps::NmeaMerger::with_clock(gps.clone(), || 0);
        for (t, st, gsa) in [
            ("100000", 'A', 3),
            ("100001", 'V', 3),
            ("100002", 'A', 1),
            ("100003", 'A', 1),
        ] {
            for body in [
                format!("GPGGA,{t}.000,5200.000,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,"),
                format!("GPGSA,A,{gsa},05,07,13,15,,,,,,,,,1.6,0.9,1.3"),
                format!("GPRMC,{t}.000,{st},5200.000,N,00430.000,E,0.1,45.0,200525,,,A"),
            ] {
                merger.push_line(sentence(&body));
            }
        }
        merger.flush();
        let (_, current) = crate::jobs::current(&store);
        let app = app(ApiState {
            device_id: "V1".into(),
            store,
            link: Arc::new(LinkState::default()),
            wake: Arc::new(Notify::new()),
            token: "t0ken".into(),
            assignment: current,
            edge: Arc::new(crate::edge::Edge::new(Default::default())),
            gps,
            pod_lock: Arc::new(tokio::sync::Mutex::new(())),
            pod_uploads: Arc::new(tokio::sync::Semaphore::new(MAX_POD_UPLOADS)),
            body_timeout: std::time::Duration::from_secs(5),
        });

        let (code, body) = get(&app, "/v1/status").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let g = &status["gps"];
        assert_eq!(
            (g["fixes"].as_u64(), g["no_fix"].as_u64()),
            (Some(1), Some(3)),
            "{g}"
        );
        assert_eq!(g["rejected"]["status_invalid"], 1, "{g}");
        assert_eq!(g["rejected"]["gsa_no_fix"], 2, "{g}");
        assert_eq!(g["rejected"]["time_mismatch"], 0, "{g}");
        let named: Vec<&String> = g["rejected"].as_object().unwrap().keys().collect();
        assert_eq!(
            named.len(),
            crate::gps::Reject::ALL.len(),
            "every reason named: {g}"
        );

        let (code, text) = get(&app, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        for (reason, n) in [
            ("status_invalid", 1),
            ("gsa_no_fix", 2),
            ("hdop_out_of_range", 0),
        ] {
            let line = format!("fleetsync_agent_gps_rejected_total{{reason=\"{reason}\"}} {n}");
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(text.contains("# TYPE fleetsync_agent_gps_rejected_total counter"));
        assert!(
            text.lines()
                .any(|l| l == "fleetsync_agent_gps_no_fix_total 3")
        );
    }
}

//! HTTP: the operator API under `/v1/ops`, `/healthz`, `/readyz`, `/metrics`, and the
//! OpenAPI document at `/v1/openapi.json`. Every `/v1` call carries
//! `Authorization: Bearer <token>`, checked against the role its prefix needs
//! ([`crate::auth`]): 401 for no or an unknown token, 403 for a token of another role.
//!
//! Errors are RFC 9457 problem details (`application/problem+json`): `type`, `title`,
//! `status`, `detail`, `field` when one input field is wrong, and `error` (the same text
//! as `detail`, for clients of the first API version). 4xx says which parameter is wrong
//! and what was expected; 5xx is logged and answered with a generic message.

pub mod credentials;
pub mod erp;
pub mod outbox;
pub mod portal;
pub mod serve;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fleetsync_protocol::json::{AssignmentJson, EventJson, Time, parse_sha256, sha256_hex};
use serde::{Deserialize, Serialize};

use crate::auth::{self, Principal, Role};
use crate::dispatch::{AssignError, Dispatch};
use crate::metrics::Metrics;
use crate::presence::Registry;
use crate::store::{Store, StoreError};

/// The OpenAPI document (kept beside the code it describes).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Connected devices.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Operator bearer token.
    pub operator_token: Arc<str>,
    /// Broker up and ingest subscribed.
    pub ready: Arc<AtomicBool>,
    /// Assignments to devices.
    pub dispatch: Dispatch,
    /// Shipment use cases.
    pub shipments: crate::shipments::service::Shipments,
    /// Age after which a waiting shipment counts as stuck.
    pub stuck_after_ms: u64,
    /// How partner webhooks are delivered (target checks, limits).
    pub webhooks: Arc<crate::config::WebhooksConfig>,
    /// The experience layer (portal API, tracking links, stream).
    pub portal: crate::portal::Portal,
}

/// An API error.
#[derive(Debug)]
pub enum ApiError {
    /// 400 with a message.
    BadRequest(String),
    /// 400 (or another 4xx) naming the input field that is wrong.
    Field {
        /// The status.
        status: StatusCode,
        /// The field, as a JSON path into the request (`stops[1].location.lat`).
        field: String,
        /// What is wrong and what was expected.
        detail: String,
    },
    /// 401.
    Unauthorized,
    /// 403 with a message.
    Forbidden(String),
    /// 404 with a message.
    NotFound(String),
    /// 409 with a message.
    Conflict(String),
    /// 503 with a message.
    Unavailable(String),
    /// 500, logged.
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ApiError::Unavailable("the store is not reachable now; try again shortly".into())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> ApiError {
        ApiError::Field {
            status: StatusCode::BAD_REQUEST,
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Parses a JSON body of at most `max` bytes; an error names the field it is about
/// (`stops[1].location.lat`, or `body` for the whole).
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], max: usize) -> Result<T, ApiError> {
    if body.len() > max {
        return Err(ApiError::Field {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            field: "body".into(),
            detail: format!("{} bytes, larger than the limit of {max}", body.len()),
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at its parent: name the field itself.
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(m)) => m.to_string(),
            (p, Some(m)) => format!("{p}.{m}"),
            (".", None) => "body".to_string(),
            (p, None) => p.to_string(),
        };
        ApiError::field(field, inner)
    })
}

/// RFC 9457 problem details, with the message also as `error`.
#[derive(Serialize)]
struct Problem<'a> {
    r#type: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.as_str()),
            ApiError::Field { status, detail, .. } => (*status, detail.as_str()),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token (Authorization: Bearer <token>)",
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m.as_str()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m.as_str()),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m.as_str()),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m.as_str()),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error in operator API");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the hub's log",
                )
            }
        };
        let field = match &self {
            ApiError::Field { field, .. } => Some(field.as_str()),
            _ => None,
        };
        let problem = Problem {
            r#type: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: msg,
            field,
            error: msg,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Constant-time comparison of secrets.
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller of a request: the bootstrap token or a stored credential.
pub async fn authenticate(
    st: &AppState,
    headers: &header::HeaderMap,
) -> Result<Principal, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    if secret_eq(token.as_bytes(), st.operator_token.as_bytes()) {
        return Ok(Principal::Bootstrap);
    }
    match st
        .store
        .credential_by_token(&auth::token_sha256(token))
        .await?
    {
        Some(c) => Ok(Principal::Credential(c)),
        None => Err(ApiError::Unauthorized),
    }
}

/// Lets the request through if its caller has `role`; the caller goes into the
/// request's extensions for the handler.
async fn require(st: AppState, role: Role, mut req: Request, next: Next) -> Response {
    let who = match authenticate(&st, req.headers()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !who.has(role) {
        let has = match &who {
            Principal::Bootstrap => "operator",
            Principal::Credential(c) => c.role.as_str(),
        };
        return ApiError::Forbidden(format!(
            "this credential's role is {has}; this API needs the {} role",
            role.as_str()
        ))
        .into_response();
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

async fn require_operator(State(st): State<AppState>, req: Request, next: Next) -> Response {
    require(st, Role::Operator, req, next).await
}

async fn require_erp(State(st): State<AppState>, req: Request, next: Next) -> Response {
    require(st, Role::Erp, req, next).await
}

/// The router.
pub fn app(state: AppState) -> Router {
    let ops = Router::new()
        .route("/devices", get(devices))
        .route("/devices/{id}/events", get(device_events))
        .route(
            "/devices/{id}/assignment",
            get(get_assignment).put(put_assignment),
        )
        .route("/blobs/{sha256}", get(blob))
        .route("/quarantine", get(quarantine))
        .route("/quarantine/{id}/raw", get(quarantine_raw))
        .route(
            "/credentials",
            get(credentials::list).post(credentials::create),
        )
        .route("/credentials/{id}", delete(credentials::revoke))
        .route("/shipments", get(erp::list))
        .route("/shipments/stuck", get(erp::stuck))
        .route("/shipments/{id}", get(erp::get_shipment))
        .route("/shipments/{id}/assign", post(erp::assign))
        .route("/review", get(erp::reviews))
        .route("/review/{id}", get(erp::review))
        .route("/review/{id}/accept", post(erp::accept))
        .route("/review/{id}/reject", post(erp::reject))
        .route("/deadletters", get(outbox::list))
        .route("/deadletters/replay", post(outbox::replay_many))
        .route("/deadletters/{id}/replay", post(outbox::replay))
        .route("/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/webhooks/{id}",
            get(webhooks::get)
                .patch(webhooks::patch)
                .delete(webhooks::delete),
        )
        .route("/webhooks/{id}/rotate-secret", post(webhooks::rotate))
        .route("/webhooks/{id}/replay", post(webhooks::replay))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_operator,
        ));
    let erp = Router::new()
        .route("/shipments", get(erp::list))
        .route(
            "/shipments/{id}",
            get(erp::get_shipment).put(erp::put_shipment),
        )
        .route("/shipments/{id}/cancel", post(erp::cancel))
        .route("/shipments/{id}/close", post(erp::close))
        .route("/mappings", get(erp::mappings))
        .route("/blobs/{sha256}", get(blob))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_erp));
    Router::new()
        .nest("/v1/ops", ops)
        .nest("/v1/erp", erp)
        .merge(portal::routes(state.clone()))
        .merge(crate::web::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .with_state(state)
}

async fn readyz(State(st): State<AppState>) -> Response {
    if !st.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker or ingest not up\n",
        )
            .into_response();
    }
    match st.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: store ({}) not answering: {e}\n",
                st.store.backend()
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct HealthOut {
    event_time: Time,
    backlog_critical: u32,
    backlog_telemetry: u32,
    disk_used_bytes: u64,
    disk_quota_bytes: u64,
    uptime_s: u32,
    version: String,
}

#[derive(Serialize)]
struct PositionOut {
    /// The fix's capture time.
    time: Time,
    lat: f64,
    lon: f64,
    /// Its ground speed (m/s).
    speed_mps: Option<f64>,
    /// The vehicle's average speed over about 5 minutes (m/s).
    avg_speed_mps: Option<f64>,
}

#[derive(Serialize)]
struct DeviceOut {
    id: String,
    connected: bool,
    last_seen: Option<Time>,
    epoch: u32,
    health: Option<HealthOut>,
    /// The newest fix the device reported.
    position: Option<PositionOut>,
}

async fn devices(State(st): State<AppState>) -> Result<Json<Vec<DeviceOut>>, ApiError> {
    let rows = st.store.devices().await?;
    let ids: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    let mut positions = st.store.positions(&ids).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(id, r)| DeviceOut {
                position: positions.remove(&id).map(|p| PositionOut {
                    time: Time(p.time_ms),
                    lat: f64::from(p.lat_e7) / 1e7,
                    lon: f64::from(p.lon_e7) / 1e7,
                    speed_mps: p.speed_cmps.map(|v| f64::from(v) / 100.0),
                    avg_speed_mps: p.avg_speed_cmps.map(|v| v.round() / 100.0),
                }),
                connected: st.registry.is_connected(&id),
                last_seen: (r.last_seen_ms > 0).then_some(Time(r.last_seen_ms)),
                epoch: r.epoch,
                health: r.last_health.map(|(t, h)| HealthOut {
                    event_time: Time(t),
                    backlog_critical: h.backlog_critical,
                    backlog_telemetry: h.backlog_telemetry,
                    disk_used_bytes: h.disk_used_bytes,
                    disk_quota_bytes: h.disk_quota_bytes,
                    uptime_s: h.uptime_s,
                    version: h.version.to_string(),
                }),
                id,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<String>,
    limit: Option<String>,
    kind: Option<String>,
}

#[derive(Serialize)]
struct EventOut {
    epoch: u32,
    seq: u64,
    recorded_time: Time,
    #[serde(flatten)]
    event: EventJson,
}

#[derive(Serialize)]
struct EventsPage {
    events: Vec<EventOut>,
    /// Cursor for the next page, or null at the end.
    next: Option<String>,
}

const KINDS: [&str; 8] = [
    "position",
    "geofence",
    "trip",
    "pod",
    "exception",
    "health",
    "gap",
    "assignment_ack",
];
/// Largest page of events.
pub const MAX_PAGE: usize = 1000;

fn parse_cursor(s: &str) -> Option<(u32, u64)> {
    let (e, q) = s.split_once('-')?;
    Some((e.parse().ok()?, q.parse().ok()?))
}

async fn device_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "after: {c:?} is not a cursor; use a page's `next` value, like 3-120"
            ))
        })?),
    };
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit: expected a number from 1 to {MAX_PAGE}, got {l:?}"
                )));
            }
        },
    };
    if let Some(k) = q.kind.as_deref()
        && !KINDS.contains(&k)
    {
        return Err(ApiError::BadRequest(format!(
            "kind: {k:?} is not one of {}",
            KINDS.join(", ")
        )));
    }
    let known = st.store.device(&id).await?.is_some();
    let rows = st
        .store
        .events(&id, after, limit, q.kind.as_deref())
        .await?;
    if !known {
        return Err(ApiError::NotFound(format!(
            "no device {id:?} has sent anything to this hub"
        )));
    }
    let next = if rows.len() == limit {
        rows.last().map(|(e, s, _)| format!("{e}-{s}"))
    } else {
        None
    };
    let events = rows
        .into_iter()
        .map(|(epoch, seq, st)| EventOut {
            epoch,
            seq,
            recorded_time: Time(st.recorded_ms),
            event: EventJson::from_event(&st.event),
        })
        .collect();
    Ok(Json(EventsPage { events, next }))
}

/// `GET /v1/ops/blobs/{sha256}` and `GET /v1/erp/blobs/{sha256}`: a POD image's bytes.
async fn blob(State(st): State<AppState>, Path(sha): Path<String>) -> Result<Response, ApiError> {
    let digest = parse_sha256(&sha.to_ascii_lowercase()).ok_or_else(|| {
        ApiError::BadRequest(format!("sha256: expected 64 hex digits, got {sha:?}"))
    })?;
    let blob = st.store.blob(&digest).await?;
    match blob {
        Some(bytes) => Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::NotFound(format!("no complete blob {sha}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

#[derive(Serialize)]
struct QuarantineOut {
    id: u64,
    device: String,
    topic: String,
    recorded_time: Time,
    error: String,
    bytes: usize,
    /// The first bytes of the frame (hex); the whole frame is at `raw_url`.
    head_hex: String,
    raw_url: String,
}

/// Largest body of a quarantine listing: a page ends early rather than pass it.
pub const MAX_QUARANTINE_PAGE_BYTES: usize = 1 << 20;

async fn quarantine(
    State(st): State<AppState>,
    Query(q): Query<QuarantineQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let rows = st.store.quarantined(limit, q.before).await?;
    let full_page = rows.len() == limit;
    let mut cut = false;
    let mut out = Vec::with_capacity(rows.len());
    // The body is built item by item and stops before it would pass the byte bound, so
    // a listing never costs more memory than that, whatever the frames hold.
    let mut body = Vec::with_capacity(4096);
    body.push(b'[');
    for r in rows {
        let item = QuarantineOut {
            raw_url: format!("/v1/ops/quarantine/{}/raw", r.id),
            id: r.id,
            device: r.device,
            topic: r.topic,
            recorded_time: Time(r.recorded_ms),
            error: r.error,
            bytes: r.bytes,
            head_hex: hex::encode(&r.head),
        };
        let json = serde_json::to_vec(&item).map_err(|e| ApiError::Internal(e.to_string()))?;
        if body.len() + json.len() + 2 > MAX_QUARANTINE_PAGE_BYTES {
            cut = true;
            break;
        }
        if !out.is_empty() {
            body.push(b',');
        }
        body.extend_from_slice(&json);
        out.push(item.id);
    }
    body.push(b']');
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    // Where the next page starts (the id to pass as `before`), when there may be one.
    if (full_page || cut)
        && let Some(last) = out.last()
        && let Ok(v) = header::HeaderValue::from_str(&last.to_string())
    {
        resp.headers_mut().insert("x-next-before", v);
    }
    Ok(resp)
}

async fn quarantine_raw(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("id: expected a number, got {id:?}")))?;
    match st.store.quarantined_raw(id).await? {
        Some(raw) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], raw).into_response())
        }
        None => Err(ApiError::NotFound(format!(
            "no quarantined frame {id} (dropped past the quarantine's bounds, or never there)"
        ))),
    }
}

/// Hex of a digest (re-exported for callers building blob URLs).
pub fn blob_path(sha: &[u8; 32]) -> String {
    format!("/v1/ops/blobs/{}", sha256_hex(sha))
}

/// Largest assignment body.
pub const MAX_ASSIGNMENT_BODY: usize = 256 * 1024;

#[derive(Serialize)]
struct AssignmentOut {
    assignment: AssignmentJson,
    sent_time: Time,
    acknowledged: bool,
    acked_version: Option<u32>,
    acked_time: Option<Time>,
}

async fn put_assignment(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    fleetsync_protocol::topic::validate_device_id(&id)
        .map_err(|e| ApiError::BadRequest(format!("device id {id:?}: {e}")))?;
    if body.len() > MAX_ASSIGNMENT_BODY {
        return Err(ApiError::BadRequest(format!(
            "body: larger than {MAX_ASSIGNMENT_BODY} bytes"
        )));
    }
    let json: AssignmentJson =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let a = json
        .to_assignment()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    match st.dispatch.assign(&id, &a, crate::ingest::now_ms()).await {
        Ok(()) => {}
        Err(AssignError::Invalid(m)) => return Err(ApiError::BadRequest(m)),
        Err(AssignError::Stale { offered, current }) => {
            return Err(ApiError::Conflict(format!(
                "version: {offered} is not newer than version {current} already sent to {id}; versions count up per device"
            )));
        }
        Err(AssignError::Store(e)) => return Err(e.into()),
    }
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"device": id, "id": a.id.as_str(), "version": a.version, "status": "sent"})))
        .into_response())
}

async fn get_assignment(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AssignmentOut>, ApiError> {
    let rec = st.store.assignment(&id).await?;
    let rec = rec.ok_or_else(|| ApiError::NotFound(format!("no assignment was sent to {id:?}")))?;
    Ok(Json(AssignmentOut {
        assignment: AssignmentJson::from_assignment(&rec.assignment),
        sent_time: Time(rec.sent_ms),
        acknowledged: rec.acknowledged(),
        acked_version: rec.acked_version,
        acked_time: rec.acked_ms.map(Time),
    }))
}

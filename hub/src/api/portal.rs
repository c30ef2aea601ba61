//! The experience API: `/v1/portal` for customers (role `customer`, their own shipments
//! only), tracking links `/t/{token}` for consignees without an account, and the POD
//! image URLs `/p/{token}` both hand out ([`crate::portal`]).
//!
//! Another customer's shipment, a shipment that does not exist, and a tracking link that
//! is expired, tampered with or revoked all answer the same 404: nothing confirms that a
//! shipment exists to someone who may not see it. Every call takes a token from its
//! caller's bucket (the credential, or the link); an empty bucket is a 429 with
//! `Retry-After`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::{Time, parse_sha256};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{ApiError, AppState, MAX_PAGE, json_body};
use crate::auth::{Principal, Role};
use crate::portal::Portal;
use crate::portal::feed::{self, Change};
use crate::portal::links::{LinkClaims, MAX_TOKEN_LEN};
use crate::portal::view::{self, PortalShipment};
use crate::shipments::{ShipmentRecord, State as ShipState};
use crate::store::ShipmentQuery;

/// The customer a portal call is for (from its credential).
#[derive(Debug, Clone)]
pub(super) struct Customer {
    id: String,
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn too_many(wait: Duration, who: &str) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let detail = format!("too many requests for this {who}; try again in {secs} s");
    let body = serde_json::json!({
        "type": "about:blank", "title": "Too Many Requests", "status": 429,
        "detail": detail, "error": detail,
    });
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Lets a customer credential through within its rate; the customer goes into the
/// request's extensions.
pub(super) async fn require_customer(
    State(st): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let who = match super::authenticate(&st, req.headers()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (id, customer) = match (&who, who.customer()) {
        (Principal::Credential(c), Some(customer)) if who.has(Role::Customer) => {
            (c.id.clone(), customer.to_string())
        }
        _ => {
            let has = match &who {
                Principal::Bootstrap => "operator",
                Principal::Credential(c) => c.role.as_str(),
            };
            return ApiError::Forbidden(format!(
                "this credential's role is {has}; the portal API needs a customer credential"
            ))
            .into_response();
        }
    };
    if let Err(wait) = st.portal.limiter.check(&format!("cred:{id}")) {
        return too_many(wait, "credential");
    }
    req.extensions_mut().insert(Customer { id: customer });
    req.extensions_mut().insert(who);
    next.run(req).await
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such shipment".into())
}

/// The customer's shipment `id`, or 404 (also for another customer's).
async fn own(
    st: &AppState,
    customer: &str,
    id: &str,
) -> Result<(ShipmentRecord, Vec<crate::shipments::Fact>), ApiError> {
    match st.store.shipment(id).await? {
        Some((r, f)) if r.spec.customer_id == customer => Ok((r, f)),
        _ => Err(not_found()),
    }
}

async fn full_view(
    p: &Portal,
    rec: ShipmentRecord,
    facts: Vec<crate::shipments::Fact>,
) -> Result<PortalShipment, ApiError> {
    let loaded = view::load(&p.store, rec, facts).await?;
    Ok(view::customer_view(p.ctx(crate::ingest::now_ms()), &loaded))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize)]
struct Summary {
    id: String,
    reference: String,
    status: String,
    rev: u64,
    updated: Time,
    /// The earliest open stop's ETA window.
    eta_window: Option<view::EtaWindow>,
}

#[derive(Serialize)]
struct Page {
    shipments: Vec<Summary>,
    /// Pass as `cursor` for the next page; null at the end. A page may hold fewer than
    /// `limit` shipments (a status filter) and still have a next one.
    next: Option<String>,
}

/// Pages read at most for one filtered page.
const MAX_SCAN_PAGES: usize = 5;

/// The canonical states a portal status stands for.
fn states_of(st: &AppState, status: &str) -> Result<Vec<ShipState>, ApiError> {
    let m = &st.portal.mappings;
    let states: Vec<ShipState> = m
        .states
        .iter()
        .filter(|r| r.portal_status.eq_ignore_ascii_case(status))
        .map(|r| r.state)
        .collect();
    if states.is_empty() {
        return Err(ApiError::field(
            "state",
            format!(
                "{status:?} is not a portal status; one of {}",
                statuses(m).join(", ")
            ),
        ));
    }
    Ok(states)
}

fn statuses(m: &crate::shipments::Mappings) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in &m.states {
        if !out.contains(&r.portal_status) {
            out.push(r.portal_status.clone());
        }
    }
    out
}

/// `GET /v1/portal/statuses`: the portal statuses, in the mapping table's order.
pub(super) async fn list_statuses(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({
        "mapping_version": st.portal.mappings.version,
        "statuses": statuses(&st.portal.mappings),
    }))
    .into_response()
}

/// `GET /v1/portal/shipments?state=&cursor=&limit=`
pub(super) async fn list(
    State(st): State<AppState>,
    Extension(me): Extension<Customer>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let states = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(states_of(&st, s)?),
    };
    let mut after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.split_once(':')
                .and_then(|(t, id)| Some((t.parse::<u64>().ok()?, id.to_string())))
                .ok_or_else(|| {
                    ApiError::field("cursor", format!("{c:?}: use a page's `next` value"))
                })?,
        ),
    };
    let limit = match q.limit.as_deref() {
        None => 50,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::field(
                    "limit",
                    format!("{l:?}: a number from 1 to {MAX_PAGE}"),
                ));
            }
        },
    };
    // One state: the store filters. A status of several states: filtered here, over
    // at most MAX_SCAN_PAGES store pages.
    let one = states.as_ref().filter(|s| s.len() == 1).map(|s| s[0]);
    let now = crate::ingest::now_ms();
    let mut out = Vec::new();
    let mut next = None;
    for _ in 0..MAX_SCAN_PAGES {
        let rows = st
            .store
            .shipments(&ShipmentQuery {
                state: one,
                customer_id: Some(me.id.clone()),
                after: after.clone(),
                limit,
                ..Default::default()
            })
            .await?;
        let full = rows.len() == limit;
        for r in rows {
            after = Some((r.updated_ms, r.id.clone()));
            if states.as_ref().is_some_and(|s| !s.contains(&r.state)) {
                continue;
            }
            out.push(Summary {
                eta_window: r
                    .estimates
                    .values()
                    .map(|e| e.eta_ms)
                    .min()
                    .filter(|_| !r.state.is_finished())
                    .map(|e| view::eta_window(e, now)),
                status: view::portal_status(&st.portal.mappings, r.state),
                id: r.id,
                reference: r.spec.reference,
                rev: r.rev,
                updated: Time(r.updated_ms),
            });
            if out.len() == limit {
                break;
            }
        }
        next = full
            .then(|| after.as_ref().map(|(t, id)| format!("{t}:{id}")))
            .flatten();
        if out.len() == limit || next.is_none() {
            break;
        }
    }
    Ok(Json(Page {
        shipments: out,
        next,
    })
    .into_response())
}

/// `GET /v1/portal/shipments/{id}`
pub(super) async fn get_one(
    State(st): State<AppState>,
    Extension(me): Extension<Customer>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (rec, facts) = own(&st, &me.id, &id).await?;
    Ok(Json(full_view(&st.portal, rec, facts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LinkIn {
    ttl_s: u64,
}

/// `POST /v1/portal/shipments/{id}/links`
pub(super) async fn create_link(
    State(st): State<AppState>,
    Extension(me): Extension<Customer>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: LinkIn = json_body(&body, 1024)?;
    let max = st.portal.cfg.max_link_ttl_s;
    if !(1..=max).contains(&req.ttl_s) {
        return Err(ApiError::field(
            "ttl_s",
            format!("{}: seconds from 1 to {max}", req.ttl_s),
        ));
    }
    own(&st, &me.id, &id).await?;
    let Principal::Credential(cred) = &who else {
        return Err(ApiError::Forbidden(
            "a customer credential makes links".into(),
        ));
    };
    let now_s = crate::ingest::now_ms() / 1000;
    let nonce: [u8; 8] = rand::random();
    let claims = LinkClaims {
        shipment_id: id.clone(),
        exp_s: now_s + req.ttl_s,
        credential_id: cred.id.clone(),
        nonce: hex::encode(nonce),
    };
    let token = st.portal.signer.link(&claims);
    tracing::info!(shipment = %id, credential = %cred.id, ttl_s = req.ttl_s, "tracking link made");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "url": format!("/t/{token}"),
            "expires": Time(claims.exp_s * 1000),
        })),
    )
        .into_response())
}

/// A stream's place among the hub's open streams; gives it back when dropped.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    fn take(p: &Portal) -> Result<StreamSlot, ApiError> {
        let n = p.streams.fetch_add(1, Ordering::SeqCst);
        let slot = StreamSlot(p.streams.clone());
        if n >= p.cfg.max_streams {
            return Err(ApiError::Unavailable(format!(
                "{n} live streams are open, the most this hub serves; try again shortly"
            )));
        }
        Ok(slot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which view a stream sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Audience {
    Customer,
    Tracking,
}

struct Live {
    /// Shipment ids; each view is built as the stream gets to it.
    backlog: VecDeque<String>,
    portal: Portal,
    customer: String,
    rx: broadcast::Receiver<Arc<Change>>,
    last: (u64, String),
    only: Option<String>,
    audience: Audience,
    until: Option<tokio::time::Instant>,
    shutdown: tokio_util::sync::CancellationToken,
    _slot: StreamSlot,
}

/// The JSON of a change, made once by the first of a customer's clients to send it
/// (`None` if it cannot be made: the change is skipped).
fn shared<'a>(
    json: &'a OnceLock<String>,
    make: impl FnOnce() -> serde_json::Result<String>,
) -> Option<Cow<'a, str>> {
    let s = json.get_or_init(|| make().unwrap_or_default());
    (!s.is_empty()).then_some(Cow::Borrowed(s.as_str()))
}

impl Live {
    fn event(&mut self, c: &Change) -> Option<Event> {
        if self.only.as_deref().is_some_and(|id| id != c.shipment_id()) {
            return None;
        }
        // A customer's clients share one serialization of each change; a tracking link's
        // reduced view is its own.
        let (name, id, data) = match c {
            Change::Shipment { cursor, view, json } => {
                if *cursor > self.last {
                    self.last = cursor.clone();
                }
                let data = match self.audience {
                    Audience::Customer => shared(json, || serde_json::to_string(&**view))?,
                    Audience::Tracking => {
                        Cow::Owned(serde_json::to_string(&view::tracking_view(view)).ok()?)
                    }
                };
                ("shipment", feed::event_id(&self.last, None), data)
            }
            Change::Position {
                shipment_id,
                vehicle,
                json,
            } => {
                let data = match self.audience {
                    Audience::Customer => shared(json, || {
                        serde_json::to_string(
                            &serde_json::json!({"shipment_id": shipment_id, "vehicle": vehicle}),
                        )
                    })?,
                    Audience::Tracking => Cow::Owned(
                        serde_json::to_string(&serde_json::json!({"vehicle": vehicle})).ok()?,
                    ),
                };
                (
                    "position",
                    feed::event_id(&self.last, Some(vehicle.time.0)),
                    data,
                )
            }
        };
        Some(Event::default().event(name).id(id).data(data))
    }

    async fn next(mut self) -> Option<(Result<Event, std::convert::Infallible>, Live)> {
        loop {
            let change = match self.backlog.pop_front() {
                Some(id) => {
                    let now = crate::ingest::now_ms();
                    match feed::backlog_change(&self.portal, &id, now).await {
                        Ok(Some((customer, c))) if customer == self.customer => c,
                        Ok(_) => continue,
                        Err(e) => {
                            // The client comes back with its Last-Event-ID and resumes.
                            tracing::warn!(error = %e, "portal stream: backlog read failed; stream closed");
                            return None;
                        }
                    }
                }
                None => {
                    let until = self.until;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = async move {
                            match until {
                                Some(t) => tokio::time::sleep_until(t).await,
                                None => std::future::pending().await,
                            }
                        } => return None,
                        r = self.rx.recv() => match r {
                            Ok(c) => c,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::debug!(missed = n, "portal stream client too slow; dropped");
                                return None;
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    }
                }
            };
            if let Some(e) = self.event(&change) {
                return Some((Ok(e), self));
            }
        }
    }
}

async fn open_stream(
    p: &Portal,
    headers: &HeaderMap,
    customer: &str,
    only: Option<String>,
    audience: Audience,
    until: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let slot = StreamSlot::take(p)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(feed::parse_event_id);
    let now = crate::ingest::now_ms();
    let from = resume.unwrap_or(now).saturating_sub(feed::SLACK_MS);
    // Subscribe before reading the backlog, so nothing falls between them.
    let rx = p.channels.subscribe(customer, p.cfg.stream_buffer);
    let backlog = feed::backlog(p, customer, only.as_deref(), from).await?;
    let live = Live {
        backlog: backlog.into(),
        portal: p.clone(),
        customer: customer.to_string(),
        rx,
        last: (from, String::new()),
        only,
        audience,
        until,
        shutdown: p.shutdown.clone(),
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(live, Live::next);
    let mut r = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(p.cfg.heartbeat_s))
                .text("heartbeat"),
        )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// `GET /v1/portal/stream`
pub(super) async fn stream(
    State(st): State<AppState>,
    Extension(me): Extension<Customer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    open_stream(&st.portal, &headers, &me.id, None, Audience::Customer, None).await
}

/// The shipment a tracking link names, if the link is genuine, unexpired, its credential
/// not revoked, and the shipment still its customer's; the same `None` for every failure.
pub(crate) async fn link_target(
    st: &AppState,
    token: &str,
) -> Result<Option<(LinkClaims, ShipmentRecord, Vec<crate::shipments::Fact>)>, ApiError> {
    if token.len() > MAX_TOKEN_LEN {
        return Ok(None);
    }
    let now_s = crate::ingest::now_ms() / 1000;
    let Some(claims) = st.portal.signer.open_link(token, now_s) else {
        return Ok(None);
    };
    let creds = st.store.credentials().await?;
    let Some(cred) = creds.iter().find(|c| c.id == claims.credential_id) else {
        return Ok(None);
    };
    let Some((rec, facts)) = st.store.shipment(&claims.shipment_id).await? else {
        return Ok(None);
    };
    if cred.role != Role::Customer || cred.customer_id.as_deref() != Some(&rec.spec.customer_id) {
        return Ok(None);
    }
    Ok(Some((claims, rec, facts)))
}

fn link_not_found() -> ApiError {
    ApiError::NotFound("no such tracking link (it may have expired)".into())
}

/// The rate check of a tracking link (keyed by its nonce).
pub(crate) fn link_rate(st: &AppState, c: &LinkClaims) -> Option<Response> {
    st.portal
        .limiter
        .check(&format!("link:{}", c.nonce))
        .err()
        .map(|w| too_many(w, "tracking link"))
}

/// `GET /t/{token}/json`
pub(super) async fn tracking_json(
    State(st): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let Some((claims, rec, facts)) = link_target(&st, &token).await? else {
        return Err(link_not_found());
    };
    if let Some(r) = link_rate(&st, &claims) {
        return Ok(r);
    }
    let v = full_view(&st.portal, rec, facts).await?;
    let mut out = serde_json::to_value(view::tracking_view(&v))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    out["expires"] = serde_json::json!(Time(claims.exp_s * 1000));
    let mut r = Json(out).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /t/{token}/stream`
pub(super) async fn tracking_stream(
    State(st): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some((claims, rec, _)) = link_target(&st, &token).await? else {
        return Err(link_not_found());
    };
    if let Some(r) = link_rate(&st, &claims) {
        return Ok(r);
    }
    let left_ms = (claims.exp_s * 1000).saturating_sub(crate::ingest::now_ms());
    let until = tokio::time::Instant::now() + Duration::from_millis(left_ms);
    open_stream(
        &st.portal,
        &headers,
        &rec.spec.customer_id,
        Some(rec.id),
        Audience::Tracking,
        Some(until),
    )
    .await
}

/// `GET /p/{token}`: one POD image, while its URL is valid.
pub(super) async fn pod_blob(
    State(st): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let gone = || ApiError::NotFound("no such image (its link may have expired)".into());
    let now_s = crate::ingest::now_ms() / 1000;
    let claims = st.portal.signer.open_blob(&token, now_s).ok_or_else(gone)?;
    let sha = parse_sha256(&claims.sha256_hex).ok_or_else(gone)?;
    let (_, facts) = st
        .store
        .shipment(&claims.shipment_id)
        .await?
        .ok_or_else(gone)?;
    // Scoped to the shipment's PODs: the blob must be one of a standing POD's (a
    // rejected one's evidence is no longer shown).
    let media = view::pod_blob_media(&st.store, &facts, &sha)
        .await?
        .ok_or_else(gone)?;
    let bytes = st.store.blob(&sha).await?.ok_or_else(gone)?;
    Ok((
        [
            (header::CONTENT_TYPE, media),
            (header::CACHE_CONTROL, "private, max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // An SVG signature must not run anything in the hub's origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; sandbox",
            ),
        ],
        bytes,
    )
        .into_response())
}

/// The portal's routes: `/v1/portal` (customer credentials), `/t/{token}` and `/p/{token}`.
pub(super) fn routes(state: AppState) -> axum::Router<AppState> {
    use axum::routing::{get, post};
    let api = axum::Router::new()
        .route("/statuses", get(list_statuses))
        .route("/shipments", get(list))
        .route("/shipments/{id}", get(get_one))
        .route("/shipments/{id}/links", post(create_link))
        .route("/stream", get(stream))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            require_customer,
        ));
    axum::Router::new()
        .nest("/v1/portal", api)
        .route("/t/{token}/json", get(tracking_json))
        .route("/t/{token}/stream", get(tracking_stream))
        .route("/p/{token}", get(pod_blob))
}

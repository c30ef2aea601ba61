//! The ERP's system API (`/v1/erp`, role `erp`) and the operators' shipment calls
//! (`/v1/ops/shipments`, role `operator`), over [`crate::shipments::service`].

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, MAX_PAGE, json_body};
use crate::auth::Principal;
use crate::shipments::correlate::{ReviewItem, ReviewStatus};
use crate::shipments::eta;
use crate::shipments::facts::{self, Fact, Mapping, Source};
use crate::shipments::service::ShipmentError;
use crate::shipments::spec::{FieldError, Line, PodPolicy, StopSpec};
use crate::shipments::{
    ShipmentRecord, ShipmentSpec, State as ShipState, completed_stops, planned,
};
use crate::store::ShipmentQuery;

/// Largest shipment body.
pub const MAX_SHIPMENT_BODY: usize = 256 * 1024;

impl From<ShipmentError> for ApiError {
    fn from(e: ShipmentError) -> Self {
        let f = |status, e: FieldError| ApiError::Field {
            status,
            field: e.field,
            detail: e.detail,
        };
        match e {
            ShipmentError::Invalid(e) => f(StatusCode::BAD_REQUEST, e),
            ShipmentError::Conflict(e) => f(StatusCode::CONFLICT, e),
            ShipmentError::NotFound => ApiError::NotFound("no such shipment".into()),
            ShipmentError::Store(e) => e.into(),
        }
    }
}

/// A stop as answered: what the ERP sent, whether the vehicle is done there, its ETA.
#[derive(Serialize)]
struct StopOut<'a> {
    #[serde(flatten)]
    stop: &'a StopSpec,
    completed: bool,
    /// Estimated arrival; null until the hub estimates it, and once the vehicle is there.
    eta: Option<Time>,
    /// unknown | on_time | at_risk | late.
    timeliness: &'static str,
}

/// A shipment as answered.
#[derive(Serialize)]
struct ShipmentOut<'a> {
    id: &'a str,
    reference: &'a str,
    customer_id: &'a str,
    vehicle: Option<&'a str>,
    version: u32,
    state: &'static str,
    /// The mapping row of the state (ERP and portal status, webhook type).
    status: Option<&'a Mapping>,
    mapping_version: &'a str,
    /// unknown | on_time | at_risk | late.
    timeliness: &'static str,
    /// none | open | accepted | rejected.
    review: &'static str,
    created: Time,
    updated: Time,
    stops: Vec<StopOut<'a>>,
    pod_policy: &'a PodPolicy,
    lines: &'a [Line],
    /// Planned (PLN), estimated (EST) and actual (ACT) milestones by event time.
    milestones: Vec<Fact>,
}

/// The shipment's review status: open if any item is open, else the latest decision.
async fn review_of(st: &AppState, id: &str) -> Result<&'static str, ApiError> {
    let mine = st.store.reviews_of(id).await?;
    Ok(if mine.iter().any(|i| i.status == ReviewStatus::Open) {
        "open"
    } else if let Some(last) = mine.iter().max_by_key(|i| i.decided_time) {
        last.status.as_str()
    } else {
        "none"
    })
}

/// A shipment as answered, with its review status, timeliness and estimates.
async fn shipment_view<'a>(
    st: &'a AppState,
    r: &'a ShipmentRecord,
    facts: &[Fact],
) -> Result<ShipmentOut<'a>, ApiError> {
    let position_ms = match &r.vehicle {
        Some(v) => st
            .store
            .positions(std::slice::from_ref(v))
            .await?
            .get(v)
            .map(|p| p.time_ms),
        None => None,
    };
    let mut out = shipment_out(st, r, facts, position_ms, crate::ingest::now_ms());
    out.review = review_of(st, &r.id).await?;
    Ok(out)
}

fn shipment_out<'a>(
    st: &'a AppState,
    r: &'a ShipmentRecord,
    facts: &[Fact],
    position_ms: Option<u64>,
    now_ms: u64,
) -> ShipmentOut<'a> {
    let done = completed_stops(facts);
    let (timeliness, per_stop) = eta::of_shipment(r, facts, position_ms, now_ms);
    let finished = r.state.is_finished();
    let mut all = planned(r);
    all.extend_from_slice(facts);
    let m = st.shipments.mappings();
    ShipmentOut {
        id: &r.id,
        reference: &r.spec.reference,
        customer_id: &r.spec.customer_id,
        vehicle: r.vehicle.as_deref(),
        version: r.version,
        state: r.state.as_str(),
        status: m.of(r.state),
        mapping_version: &m.version,
        timeliness: timeliness.as_str(),
        review: "none",
        created: Time(r.created_ms),
        updated: Time(r.updated_ms),
        stops: r
            .spec
            .stops
            .iter()
            .map(|s| StopOut {
                completed: done.contains(&s.id),
                eta: r
                    .estimates
                    .get(&s.id)
                    .filter(|_| !finished)
                    .map(|e| Time(e.eta_ms)),
                timeliness: per_stop
                    .get(s.id.as_str())
                    .map_or("unknown", |t| t.as_str()),
                stop: s,
            })
            .collect(),
        pod_policy: &r.spec.pod_policy,
        lines: &r.spec.lines,
        milestones: facts::timeline(&all),
    }
}

/// `PUT /v1/erp/shipments/{id}`
pub(super) async fn put_shipment(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: ShipmentSpec = json_body(&body, MAX_SHIPMENT_BODY)?;
    let done = st
        .shipments
        .upsert(&id, spec, &who.name(), crate::ingest::now_ms())
        .await?;
    let facts = st
        .store
        .shipment(&id)
        .await?
        .map(|(_, f)| f)
        .unwrap_or_default();
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let out = shipment_view(&st, &done.record, &facts).await?;
    Ok((status, Json(out)).into_response())
}

/// `GET /v1/erp/shipments/{id}` and `GET /v1/ops/shipments/{id}`
pub(super) async fn get_shipment(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (r, facts) = st
        .store
        .shipment(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no shipment {id:?}")))?;
    Ok(Json(shipment_view(&st, &r, &facts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelIn {
    reason: String,
}

/// `POST /v1/erp/shipments/{id}/cancel`
pub(super) async fn cancel(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CancelIn = json_body(&body, 4096)?;
    if req.reason.trim().is_empty() || req.reason.chars().count() > 500 {
        return Err(ApiError::field("reason", "1 to 500 characters"));
    }
    st.shipments
        .cancel(&id, req.reason, &who.name(), crate::ingest::now_ms())
        .await?;
    get_shipment(State(st), Path(id)).await
}

/// `POST /v1/erp/shipments/{id}/close`
pub(super) async fn close(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.shipments
        .close(&id, &who.name(), crate::ingest::now_ms())
        .await?;
    get_shipment(State(st), Path(id)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AssignIn {
    vehicle: String,
}

/// `POST /v1/ops/shipments/{id}/assign`
pub(super) async fn assign(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: AssignIn = json_body(&body, 4096)?;
    st.shipments
        .assign(&id, &req.vehicle, &who.name(), crate::ingest::now_ms())
        .await?;
    get_shipment(State(st), Path(id)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    state: Option<String>,
    updated_after: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize)]
struct Summary<'a> {
    id: &'a str,
    reference: &'a str,
    customer_id: &'a str,
    vehicle: Option<&'a str>,
    version: u32,
    state: &'static str,
    updated: Time,
}

#[derive(Serialize)]
struct Page<'a> {
    shipments: Vec<Summary<'a>>,
    /// Pass as `cursor` for the next page; null at the end.
    next: Option<String>,
}

/// `GET /v1/erp/shipments` and `GET /v1/ops/shipments`
pub(super) async fn list(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(ShipState::parse(s).ok_or_else(|| {
            ApiError::field(
                "state",
                format!(
                    "{s:?} is not a state; one of {}",
                    facts::STATES.map(|s| s.as_str()).join(", ")
                ),
            )
        })?),
    };
    let updated_after = match q.updated_after.as_deref() {
        None | Some("") => None,
        Some(t) => Some(
            Time::parse(t)
                .map_err(|e| {
                    ApiError::field("updated_after", format!("{t:?}: {e}; an RFC 3339 time"))
                })?
                .0,
        ),
    };
    let after = match q.cursor.as_deref() {
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
        None => 100,
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
    let rows = st
        .store
        .shipments(&ShipmentQuery {
            state,
            updated_after,
            customer_id: None,
            after,
            limit,
        })
        .await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| format!("{}:{}", r.updated_ms, r.id)))
        .flatten();
    let page = Page {
        shipments: rows
            .iter()
            .map(|r| Summary {
                id: &r.id,
                reference: &r.spec.reference,
                customer_id: &r.spec.customer_id,
                vehicle: r.vehicle.as_deref(),
                version: r.version,
                state: r.state.as_str(),
                updated: Time(r.updated_ms),
            })
            .collect(),
        next,
    };
    Ok(Json(page).into_response())
}

/// `GET /v1/erp/mappings`
pub(super) async fn mappings(State(st): State<AppState>) -> Response {
    Json(st.shipments.mappings()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReviewQuery {
    status: Option<String>,
    limit: Option<usize>,
}

fn parse_status(s: &str) -> Result<ReviewStatus, ApiError> {
    match s {
        "open" => Ok(ReviewStatus::Open),
        "accepted" => Ok(ReviewStatus::Accepted),
        "rejected" => Ok(ReviewStatus::Rejected),
        other => Err(ApiError::field(
            "status",
            format!("{other:?}: one of open, accepted, rejected"),
        )),
    }
}

#[derive(Serialize)]
struct ReviewOut<'a> {
    #[serde(flatten)]
    item: &'a ReviewItem,
    rule: &'static str,
}

/// `GET /v1/ops/review?status=`
pub(super) async fn reviews(
    State(st): State<AppState>,
    Query(q): Query<ReviewQuery>,
) -> Result<Response, ApiError> {
    let status = q.status.as_deref().map(parse_status).transpose()?;
    let items = st
        .store
        .reviews(status, q.limit.unwrap_or(100).clamp(1, MAX_PAGE))
        .await?;
    let out: Vec<ReviewOut<'_>> = items
        .iter()
        .map(|item| ReviewOut {
            rule: item.kind.rule(),
            item,
        })
        .collect();
    Ok(Json(out).into_response())
}

/// Evidence of a review item: the event, its blobs, the vehicle's positions around it.
#[derive(Serialize)]
struct Evidence {
    event: Option<fleetsync_protocol::json::EventJson>,
    blob_urls: Vec<String>,
    /// The vehicle's positions from 10 minutes before to 10 minutes after the event.
    positions: Vec<fleetsync_protocol::json::EventJson>,
}

/// `GET /v1/ops/review/{id}`
pub(super) async fn review(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let item = st
        .store
        .review(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no review item {id:?}")))?;
    let mut evidence = Evidence {
        event: None,
        blob_urls: Vec::new(),
        positions: Vec::new(),
    };
    if let Source::Device { device, epoch, seq } = &item.source {
        let rows = st
            .store
            .events(device, seq.checked_sub(1).map(|s| (*epoch, s)), 1, None)
            .await?;
        if let Some((_, _, stored)) = rows.first() {
            if let fleetsync_protocol::Body::Pod(p) = &stored.event.body {
                evidence.blob_urls = p
                    .signature
                    .iter()
                    .chain(p.photos.iter())
                    .map(|b| super::blob_path(&b.sha256))
                    .collect();
            }
            evidence.event = Some(fleetsync_protocol::json::EventJson::from_event(
                &stored.event,
            ));
        }
        let (from, to) = (
            item.event_time.0.saturating_sub(600_000),
            item.event_time.0 + 600_000,
        );
        let mut after = None;
        'pages: loop {
            let page = st
                .store
                .events(device, after, MAX_PAGE, Some("position"))
                .await?;
            let full = page.len() == MAX_PAGE;
            for (e, s, ev) in &page {
                after = Some((*e, *s));
                if (from..=to).contains(&ev.event.time_ms) {
                    evidence
                        .positions
                        .push(fleetsync_protocol::json::EventJson::from_event(&ev.event));
                    if evidence.positions.len() >= 1200 {
                        break 'pages;
                    }
                }
            }
            if !full {
                break;
            }
        }
    }
    Ok(Json(serde_json::json!({
        "item": ReviewOut { rule: item.kind.rule(), item: &item },
        "evidence": evidence,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DecisionIn {
    note: String,
}

async fn decide(
    st: AppState,
    who: Principal,
    id: String,
    body: Bytes,
    accept: bool,
) -> Result<Response, ApiError> {
    let req: DecisionIn = json_body(&body, 4096)?;
    if req.note.trim().is_empty() || req.note.chars().count() > 1000 {
        return Err(ApiError::field("note", "1 to 1000 characters: why"));
    }
    let item = st
        .shipments
        .decide_review(&id, accept, req.note, &who.name(), crate::ingest::now_ms())
        .await?;
    Ok(Json(ReviewOut {
        rule: item.kind.rule(),
        item: &item,
    })
    .into_response())
}

/// `POST /v1/ops/review/{id}/accept`
pub(super) async fn accept(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    decide(st, who, id, body, true).await
}

/// `POST /v1/ops/review/{id}/reject`
pub(super) async fn reject(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    decide(st, who, id, body, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StuckQuery {
    older_than_s: Option<u64>,
}

/// `GET /v1/ops/shipments/stuck?older_than_s=`
pub(super) async fn stuck(
    State(st): State<AppState>,
    Query(q): Query<StuckQuery>,
) -> Result<Response, ApiError> {
    let age = q
        .older_than_s
        .map_or(st.stuck_after_ms, |s| s.saturating_mul(1000));
    let list = st.shipments.stuck(crate::ingest::now_ms(), age).await?;
    Ok(Json(serde_json::json!({
        "older_than_s": age / 1000,
        "shipments": list,
    }))
    .into_response())
}

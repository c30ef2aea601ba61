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
use crate::shipments::facts::{self, Fact, Mapping};
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
    /// Estimated arrival; null until the hub estimates it.
    eta: Option<Time>,
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

fn shipment_out<'a>(st: &'a AppState, r: &'a ShipmentRecord, facts: &[Fact]) -> ShipmentOut<'a> {
    let done = completed_stops(facts);
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
        timeliness: "unknown",
        review: "none",
        created: Time(r.created_ms),
        updated: Time(r.updated_ms),
        stops: r
            .spec
            .stops
            .iter()
            .map(|s| StopOut {
                completed: done.contains(&s.id),
                stop: s,
                eta: None,
            })
            .collect(),
        pod_policy: &r.spec.pod_policy,
        lines: &r.spec.lines,
        milestones: facts::timeline(&all),
    }
}

fn caller(who: &Principal) -> String {
    who.name()
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
        .upsert(&id, spec, &caller(&who), crate::ingest::now_ms())
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
    Ok((status, Json(shipment_out(&st, &done.record, &facts))).into_response())
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
    Ok(Json(shipment_out(&st, &r, &facts)).into_response())
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
        .cancel(&id, req.reason, &caller(&who), crate::ingest::now_ms())
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
        .close(&id, &caller(&who), crate::ingest::now_ms())
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
        .assign(&id, &req.vehicle, &caller(&who), crate::ingest::now_ms())
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

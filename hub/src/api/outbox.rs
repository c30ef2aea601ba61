//! Dead letters of the outbox (`/v1/ops/deadletters`, role `operator`): list, replay one,
//! replay many. A replay puts the row back at the end of its sink's outbox under the same
//! id, so a sink that did apply it answers 409 and nothing happens twice.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, MAX_PAGE, json_body};
use crate::outbox::{DeadLetter, OutboxRow};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Filter {
    sink: Option<String>,
    shipment_id: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct LetterOut<'a> {
    /// The row id (also its Idempotency-Key); percent-encode it in a URL.
    id: &'a str,
    sink: &'a str,
    shipment_id: &'a str,
    milestone: &'static str,
    fact_id: &'a str,
    attempts: u32,
    error: &'a str,
    response: Option<&'a str>,
    created: Time,
    dead: Time,
}

fn out(d: &DeadLetter) -> LetterOut<'_> {
    LetterOut {
        id: &d.row.id,
        sink: &d.row.sink,
        shipment_id: &d.row.shipment_id,
        milestone: d.row.fact.kind.as_str(),
        fact_id: &d.row.fact.id,
        attempts: d.row.attempts,
        error: &d.error,
        response: d.response.as_deref(),
        created: Time(d.row.created_ms),
        dead: Time(d.dead_ms),
    }
}

/// `GET /v1/ops/deadletters?sink=&shipment_id=&limit=`
pub(super) async fn list(
    State(st): State<AppState>,
    Query(q): Query<Filter>,
) -> Result<Response, ApiError> {
    let letters = st
        .store
        .deadletters(
            q.sink,
            q.shipment_id,
            q.limit.unwrap_or(100).clamp(1, MAX_PAGE),
        )
        .await?;
    Ok(Json(letters.iter().map(out).collect::<Vec<_>>()).into_response())
}

#[derive(Serialize)]
struct Replayed<'a> {
    replayed: Vec<&'a str>,
}

/// `POST /v1/ops/deadletters/{id}/replay`
pub(super) async fn replay(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row: OutboxRow = st
        .store
        .replay_deadletter(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id:?}")))?;
    tracing::info!(row = %row.id, sink = %row.sink, "dead letter replayed");
    Ok(Json(Replayed {
        replayed: vec![&row.id],
    })
    .into_response())
}

/// Most dead letters one bulk replay takes (call it again for more).
const MAX_BULK: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BulkIn {
    sink: Option<String>,
    shipment_id: Option<String>,
}

/// `POST /v1/ops/deadletters/replay` `{"sink":..., "shipment_id":...}` (both optional):
/// every matching dead letter, oldest first.
pub(super) async fn replay_many(
    State(st): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let f: BulkIn = json_body(&body, 4096)?;
    // The letters as they are now (a replayed row that fails again is not replayed twice).
    let letters = st
        .store
        .deadletters(f.sink.clone(), f.shipment_id.clone(), MAX_BULK)
        .await?;
    let mut done = Vec::new();
    for d in letters {
        if let Some(row) = st.store.replay_deadletter(&d.row.id).await? {
            done.push(row.id);
        }
    }
    tracing::info!(n = done.len(), "dead letters replayed");
    Ok(Json(Replayed {
        replayed: done.iter().map(String::as_str).collect(),
    })
    .into_response())
}

//! Partner webhook subscriptions (`/v1/ops/webhooks`, role `operator`): make, list,
//! change, delete, rotate the secret, replay. Delivery is [`crate::outbox::webhooks`].

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, json_body};
use crate::outbox::webhooks::{self, Subscription};

/// Largest request body.
const MAX_BODY: usize = 16 * 1024;
/// Longest target URL.
const MAX_URL: usize = 2048;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewSubscription {
    url: String,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Change {
    url: Option<String>,
    event_types: Option<Vec<String>>,
    /// `null` clears it (all customers).
    #[serde(default, with = "double_option")]
    customer_id: Option<Option<String>>,
    description: Option<String>,
    enabled: Option<bool>,
}

/// `Option<Option<T>>` telling an absent field from a `null` one.
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[derive(Serialize)]
struct SubscriptionOut<'a> {
    id: &'a str,
    url: &'a str,
    event_types: &'a [String],
    customer_id: Option<&'a str>,
    description: Option<&'a str>,
    enabled: bool,
    disabled_reason: Option<&'a str>,
    /// Secrets signing now (the newest first; two during a rotation's overlap).
    signing_secrets: usize,
    created: Time,
    updated: Time,
    /// Only when made and when rotated: the secret to verify with.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<&'a str>,
}

fn out<'a>(s: &'a Subscription, secret: Option<&'a str>) -> SubscriptionOut<'a> {
    SubscriptionOut {
        id: &s.id,
        url: &s.url,
        event_types: &s.event_types,
        customer_id: s.customer_id.as_deref(),
        description: s.description.as_deref(),
        enabled: s.enabled,
        disabled_reason: s.disabled_reason.as_deref(),
        signing_secrets: s.signing(crate::ingest::now_ms()).count(),
        created: Time(s.created_ms),
        updated: Time(s.updated_ms),
        secret,
    }
}

fn field(field: &str, detail: String) -> ApiError {
    ApiError::Field {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        field: field.into(),
        detail,
    }
}

/// Checks what a subscription names (URL, event types, customer).
async fn check(
    st: &AppState,
    url: &str,
    types: &[String],
    customer: Option<&str>,
) -> Result<(), ApiError> {
    if url.len() > MAX_URL {
        return Err(field("url", format!("longer than {MAX_URL} bytes")));
    }
    webhooks::check_target(url, st.webhooks.allow_insecure_targets)
        .await
        .map_err(|e| field("url", e))?;
    let known = webhooks::event_types(st.shipments.mappings());
    for (i, t) in types.iter().enumerate() {
        if !known.contains(t) {
            return Err(field(
                &format!("event_types[{i}]"),
                format!("unknown event type {t:?}; known: {}", known.join(", ")),
            ));
        }
    }
    if let Some(c) = customer
        && (c.is_empty() || c.len() > 128)
    {
        return Err(field("customer_id", "1 to 128 characters".into()));
    }
    Ok(())
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no webhook subscription {id:?}"))
}

/// `POST /v1/ops/webhooks`
pub(super) async fn create(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let n: NewSubscription = json_body(&body, MAX_BODY)?;
    check(&st, &n.url, &n.event_types, n.customer_id.as_deref()).await?;
    if st.store.webhooks().await?.len() >= st.webhooks.max_subscriptions {
        return Err(ApiError::Conflict(format!(
            "already {} subscriptions, the most [webhooks] max_subscriptions allows; delete one first",
            st.webhooks.max_subscriptions
        )));
    }
    let sub = Subscription::new(
        n.url,
        n.event_types,
        n.customer_id,
        n.description,
        crate::ingest::now_ms(),
    );
    st.store.put_webhook(&sub).await?;
    tracing::info!(subscription = %sub.id, url = %sub.url, "webhook subscription made");
    let secret = sub.secrets[0].key.as_str();
    Ok((StatusCode::CREATED, Json(out(&sub, Some(secret)))).into_response())
}

/// `GET /v1/ops/webhooks`
pub(super) async fn list(State(st): State<AppState>) -> Result<Response, ApiError> {
    let subs = st.store.webhooks().await?;
    Ok(Json(subs.iter().map(|s| out(s, None)).collect::<Vec<_>>()).into_response())
}

/// `GET /v1/ops/webhooks/{id}`
pub(super) async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sub = st.store.webhook(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(out(&sub, None)).into_response())
}

/// `PATCH /v1/ops/webhooks/{id}`
pub(super) async fn patch(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let c: Change = json_body(&body, MAX_BODY)?;
    let mut sub = st.store.webhook(&id).await?.ok_or_else(|| not_found(&id))?;
    if let Some(url) = c.url {
        sub.url = url;
    }
    if let Some(t) = c.event_types {
        sub.event_types = t;
    }
    if let Some(customer) = c.customer_id {
        sub.customer_id = customer;
    }
    if let Some(d) = c.description {
        sub.description = Some(d);
    }
    check(&st, &sub.url, &sub.event_types, sub.customer_id.as_deref()).await?;
    if let Some(on) = c.enabled {
        sub.enabled = on;
        sub.disabled_reason = (!on).then(|| "disabled by an operator".to_string());
    }
    sub.updated_ms = crate::ingest::now_ms();
    st.store.put_webhook(&sub).await?;
    tracing::info!(subscription = %sub.id, enabled = sub.enabled, "webhook subscription changed");
    Ok(Json(out(&sub, None)).into_response())
}

/// `DELETE /v1/ops/webhooks/{id}`: with its waiting messages and dead letters.
pub(super) async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.store
        .delete_webhook(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    tracing::info!(subscription = %id, "webhook subscription deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
struct Rotated<'a> {
    secret: &'a str,
    /// Until when the previous secret still signs.
    previous_expires: Option<Time>,
}

/// `POST /v1/ops/webhooks/{id}/rotate-secret`
pub(super) async fn rotate(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut sub = st.store.webhook(&id).await?.ok_or_else(|| not_found(&id))?;
    let now = crate::ingest::now_ms();
    let secret = sub
        .rotate(now, st.webhooks.rotation_overlap_s * 1000)
        .key
        .clone();
    st.store.put_webhook(&sub).await?;
    tracing::info!(subscription = %id, "webhook secret rotated");
    let previous = sub.secrets.get(1).and_then(|s| s.expires_ms).map(Time);
    Ok(Json(Rotated {
        secret: &secret,
        previous_expires: previous,
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Since {
    since: Option<String>,
}

/// `POST /v1/ops/webhooks/{id}/replay?since=RFC3339`: sends again, under the same
/// `webhook-id`s, what the hub recorded for this subscription at or after `since` and
/// still keeps (delivered within `[webhooks] keep_delivered_s`, or dead-lettered).
pub(super) async fn replay(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> Result<Response, ApiError> {
    let Some(since) = q.since else {
        return Err(ApiError::Field {
            status: StatusCode::BAD_REQUEST,
            field: "since".into(),
            detail: "missing: an RFC 3339 time, e.g. ?since=2026-11-30T08:00:00Z".into(),
        });
    };
    let since_ms = chrono::DateTime::parse_from_rfc3339(&since)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .ok_or_else(|| ApiError::Field {
            status: StatusCode::BAD_REQUEST,
            field: "since".into(),
            detail: format!("{since:?} is not an RFC 3339 time (e.g. 2026-11-30T08:00:00Z)"),
        })?;
    st.store.webhook(&id).await?.ok_or_else(|| not_found(&id))?;
    let n = st.store.webhook_replay(&id, since_ms).await?;
    tracing::info!(subscription = %id, n, "webhook messages replayed");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "replayed": n })),
    )
        .into_response())
}

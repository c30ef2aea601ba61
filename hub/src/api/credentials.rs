//! `/v1/ops/credentials`: credentials of the ERP, operators and customers, made and
//! revoked at run time ([`crate::auth`]).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::auth::{self, Credential, Principal, Role};

/// Largest body of a credential request.
const MAX_BODY: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    role: Role,
    name: String,
    #[serde(default)]
    customer_id: Option<String>,
}

/// A credential as listed (never its token).
#[derive(Serialize)]
struct CredentialOut {
    id: String,
    role: Role,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<String>,
    created: Time,
}

impl From<&Credential> for CredentialOut {
    fn from(c: &Credential) -> Self {
        CredentialOut {
            id: c.id.clone(),
            role: c.role,
            name: c.name.clone(),
            customer_id: c.customer_id.clone(),
            created: Time(c.created_ms),
        }
    }
}

#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    credential: CredentialOut,
    /// Shown this once; the hub keeps only its digest.
    token: String,
}

/// `POST /v1/ops/credentials`
pub(super) async fn create(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateIn = super::json_body(&body, MAX_BODY)?;
    let (cred, token) = auth::issue(
        req.role,
        &req.name,
        req.customer_id.as_deref(),
        crate::ingest::now_ms(),
    )
    .map_err(|e| {
        let field = e.split(':').next().unwrap_or("body").to_string();
        ApiError::field(field, e)
    })?;
    st.store.put_credential(&cred).await?;
    tracing::info!(id = %cred.id, role = cred.role.as_str(), name = %cred.name, by = %who.name(), "credential made");
    Ok((
        StatusCode::CREATED,
        Json(Created {
            credential: CredentialOut::from(&cred),
            token,
        }),
    )
        .into_response())
}

/// `GET /v1/ops/credentials`
pub(super) async fn list(State(st): State<AppState>) -> Result<Response, ApiError> {
    let all = st.store.credentials().await?;
    Ok(Json(all.iter().map(CredentialOut::from).collect::<Vec<_>>()).into_response())
}

/// `DELETE /v1/ops/credentials/{id}`
pub(super) async fn revoke(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match st.store.delete_credential(&id).await? {
        Some(c) => {
            tracing::info!(id = %c.id, role = c.role.as_str(), name = %c.name, by = %who.name(), "credential revoked");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(ApiError::NotFound(format!("no credential {id:?}"))),
    }
}

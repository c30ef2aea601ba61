//! A fake ERP and fake webhook receivers for tests and the simulator, on one HTTP server.
//!
//! ```text
//! POST /events          the ERP: applies each Idempotency-Key once (the same key
//!                       again answers 409, as a careful ERP does)
//! POST /hooks/{name}    a partner's webhook receiver: checks the Standard Webhooks
//!                       signature with the secrets it was given (a bad one answers 401
//!                       and is counted), applies each webhook-id once (again: 200)
//! ```
//!
//! Each endpoint records every request on the wire and every application in order, and
//! answers from its own fault plan first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac as _};
use serde_json::Value;

/// The ERP's endpoint name in [`FakeErp`]'s records.
const ERP: &str = "";

/// How an endpoint answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Apply (or 409 / 200 if applied already) and answer at once.
    Ok,
    /// Answer this status without applying.
    Status(u16),
    /// Answer this status with `Retry-After: secs`, without applying.
    RetryAfter(u16, u64),
    /// Apply, then answer only after this long (the hub times out first).
    ApplyThenStall(Duration),
    /// Apply, and answer normally after this long (slow, within the hub's deadline).
    Slow(Duration),
    /// Down for this long from this request on: every request answers 503 (no
    /// Retry-After) without applying; an hour-long outage, compressed in time.
    Down(Duration),
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// `Idempotency-Key` (ERP) or `webhook-id` (webhooks).
    pub key: String,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `X-Correlation-Id`.
    pub correlation_id: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `webhook-timestamp`.
    pub timestamp: Option<String>,
    /// `webhook-signature`.
    pub signature: Option<String>,
    /// The body as sent.
    pub raw: Bytes,
    /// The body.
    pub body: Value,
    /// What it got.
    pub status: u16,
    /// When it arrived (ms since the epoch).
    pub received_ms: u64,
}

#[derive(Default)]
struct Endpoint {
    plan: VecDeque<Fault>,
    down_until: Option<Instant>,
    requests: Vec<Request>,
    applied: Vec<Request>,
    keys: HashSet<String>,
    /// Webhooks: the secrets a signature may be made with.
    secrets: Vec<String>,
    bad_signatures: u64,
}

type Endpoints = Arc<Mutex<HashMap<String, Endpoint>>>;

/// A running fake ERP (with webhook receivers).
#[derive(Clone)]
pub struct FakeErp {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Endpoints,
}

impl std::fmt::Debug for FakeErp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeErp").field("addr", &self.addr).finish()
    }
}

impl FakeErp {
    /// Starts one on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<FakeErp> {
        let inner: Endpoints = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/events", post(events))
            .route("/hooks/{name}", post(hook))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeErp { addr, inner })
    }

    /// Its base URL (the ERP's).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the ERP's next requests with `faults`, in order, then normally.
    pub fn plan(&self, faults: impl IntoIterator<Item = Fault>) {
        self.with(ERP, |e| e.plan.extend(faults));
    }

    /// Every ERP request, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.with(ERP, |e| e.requests.clone())
    }

    /// Every ERP application (a key's first 2xx), in order.
    pub fn applied(&self) -> Vec<Request> {
        self.with(ERP, |e| e.applied.clone())
    }

    /// How many ERP applications so far (cheaper than [`FakeErp::applied`]).
    pub fn applied_count(&self) -> usize {
        self.with(ERP, |e| e.applied.len())
    }

    /// The URL of webhook receiver `name`.
    pub fn hook_url(&self, name: &str) -> String {
        format!("http://{}/hooks/{name}", self.addr)
    }

    /// The secrets receiver `name` accepts signatures of (`whsec_...`), replacing the
    /// ones it had.
    pub fn set_hook_secrets(&self, name: &str, secrets: Vec<String>) {
        self.with(name, |e| e.secrets = secrets);
    }

    /// The secrets receiver `name` accepts.
    pub fn hook_secrets(&self, name: &str) -> Vec<String> {
        self.with(name, |e| e.secrets.clone())
    }

    /// Answers receiver `name`'s next requests with `faults`, in order, then normally.
    pub fn plan_hook(&self, name: &str, faults: impl IntoIterator<Item = Fault>) {
        self.with(name, |e| e.plan.extend(faults));
    }

    /// Every request to receiver `name`, in arrival order.
    pub fn hook_requests(&self, name: &str) -> Vec<Request> {
        self.with(name, |e| e.requests.clone())
    }

    /// Every application at receiver `name` (a webhook-id's first 2xx), in order.
    pub fn hook_applied(&self, name: &str) -> Vec<Request> {
        self.with(name, |e| e.applied.clone())
    }

    /// Requests to receiver `name` whose signature did not verify.
    pub fn bad_signatures(&self, name: &str) -> u64 {
        self.with(name, |e| e.bad_signatures)
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Endpoint) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(g.entry(name.to_string()).or_default())
    }
}

/// Whether `header` (`v1,<sig> v1,<sig>...`) holds a valid signature of
/// `{id}.{timestamp}.{body}` by one of `secrets` (Standard Webhooks).
pub fn signature_valid(
    secrets: &[String],
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    secrets.iter().any(|secret| {
        let Ok(key) = B64.decode(secret.strip_prefix("whsec_").unwrap_or(secret)) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else {
            return false;
        };
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let want = B64.encode(mac.finalize().into_bytes());
        header
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .any(|sig| sig == want)
    })
}

async fn events(State(inner): State<Endpoints>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&inner, ERP, &headers, body).await
}

async fn hook(
    State(inner): State<Endpoints>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&inner, &name, &headers, body).await
}

async fn answer(inner: &Endpoints, name: &str, headers: &HeaderMap, raw: Bytes) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let webhook = name != ERP;
    let key = if webhook {
        h("webhook-id")
    } else {
        h("idempotency-key")
    };
    let Some(key) = key else {
        return (StatusCode::BAD_REQUEST, "no Idempotency-Key / webhook-id").into_response();
    };
    let body: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not JSON: {e}")).into_response(),
    };
    let mut req = Request {
        key: key.clone(),
        traceparent: h("traceparent"),
        correlation_id: h("x-correlation-id"),
        authorization: h("authorization"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        raw,
        body,
        status: 0,
        received_ms: fleetsync_agent::now_ms(),
    };
    let (fault, status) = {
        let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.entry(name.to_string()).or_default();
        if webhook {
            let ok = signature_valid(
                &e.secrets,
                &key,
                req.timestamp.as_deref().unwrap_or(""),
                &req.raw,
                req.signature.as_deref().unwrap_or(""),
            );
            if !ok {
                e.bad_signatures += 1;
                req.status = 401;
                e.requests.push(req);
                return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
            }
        }
        let down = e.down_until.is_some_and(|t| Instant::now() < t);
        let fault = if down {
            Fault::Status(503)
        } else {
            match e.plan.pop_front().unwrap_or(Fault::Ok) {
                Fault::Down(d) => {
                    e.down_until = Some(Instant::now() + d);
                    Fault::Status(503)
                }
                f => f,
            }
        };
        let status = match &fault {
            Fault::Ok | Fault::ApplyThenStall(_) | Fault::Slow(_) => {
                if e.keys.insert(key) {
                    req.status = 200;
                    e.applied.push(req.clone());
                    200
                } else if webhook {
                    200
                } else {
                    409
                }
            }
            Fault::Status(s) | Fault::RetryAfter(s, _) => *s,
            Fault::Down(_) => 503,
        };
        req.status = status;
        e.requests.push(req);
        (fault, status)
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match fault {
        Fault::ApplyThenStall(d) | Fault::Slow(d) => {
            tokio::time::sleep(d).await;
            code.into_response()
        }
        Fault::RetryAfter(_, secs) => {
            (code, [("retry-after", secs.to_string())], "slow down").into_response()
        }
        Fault::Status(_) | Fault::Down(_) => (
            code,
            format!(
                "fake {} fault {status}",
                if webhook { "receiver" } else { "ERP" }
            ),
        )
            .into_response(),
        Fault::Ok => code.into_response(),
    }
}

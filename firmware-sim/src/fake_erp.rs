//! A fake ERP for tests and the simulator: `POST /events` applies each Idempotency-Key
//! once (the same key again answers 409, as a careful ERP does), records every request
//! on the wire and every application in order, and answers from a fault plan first.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

/// How the fake ERP answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Apply (or 409 if applied already) and answer 200.
    Ok,
    /// Answer this status without applying.
    Status(u16),
    /// Answer this status with `Retry-After: secs`, without applying.
    RetryAfter(u16, u64),
    /// Apply, then answer only after this long (the hub times out first).
    ApplyThenStall(Duration),
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// `Idempotency-Key`.
    pub key: String,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `X-Correlation-Id`.
    pub correlation_id: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// The body.
    pub body: Value,
    /// What it got.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    plan: VecDeque<Fault>,
    requests: Vec<Request>,
    applied: Vec<Request>,
    keys: HashSet<String>,
}

/// A running fake ERP.
#[derive(Clone)]
pub struct FakeErp {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for FakeErp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeErp").field("addr", &self.addr).finish()
    }
}

impl FakeErp {
    /// Starts one on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<FakeErp> {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/events", post(events))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeErp { addr, inner })
    }

    /// Its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next requests with `faults`, in order, then normally.
    pub fn plan(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().plan.extend(faults);
    }

    /// Every request, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Every application (a key's first 2xx), in order.
    pub fn applied(&self) -> Vec<Request> {
        self.lock().applied.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn events(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(key) = h("idempotency-key") else {
        return (StatusCode::BAD_REQUEST, "no Idempotency-Key").into_response();
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not JSON: {e}")).into_response(),
    };
    let mut req = Request {
        key: key.clone(),
        traceparent: h("traceparent"),
        correlation_id: h("x-correlation-id"),
        authorization: h("authorization"),
        body,
        status: 0,
    };
    let (fault, status) = {
        let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
        let fault = g.plan.pop_front().unwrap_or(Fault::Ok);
        let status = match &fault {
            Fault::Ok | Fault::ApplyThenStall(_) => {
                if g.keys.insert(key) {
                    req.status = 200;
                    g.applied.push(req.clone());
                    200
                } else {
                    409
                }
            }
            Fault::Status(s) | Fault::RetryAfter(s, _) => *s,
        };
        req.status = status;
        g.requests.push(req);
        (fault, status)
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match fault {
        Fault::ApplyThenStall(d) => {
            tokio::time::sleep(d).await;
            code.into_response()
        }
        Fault::RetryAfter(_, secs) => {
            (code, [("retry-after", secs.to_string())], "slow down").into_response()
        }
        Fault::Status(_) => (code, format!("fake ERP fault {status}")).into_response(),
        Fault::Ok => code.into_response(),
    }
}

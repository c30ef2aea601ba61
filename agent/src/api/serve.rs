//! The HTTP server loop: axum's router behind a bounded, deadline-guarded accept loop.
//!
//! `axum::serve` never times out a client that does not finish its request headers (its
//! hyper builder has no timer) and takes every connection offered. Here:
//!
//! ```text
//! accept (only with a free connection place, else the client waits in the kernel's
//!         backlog and costs this process no file descriptor); TCP keepalive on, so a
//!         peer gone without a word (a tablet off the Wi-Fi) errors the connection
//!         within about KEEPALIVE_IDLE + KEEPALIVE_RETRIES x KEEPALIVE_INTERVAL
//!   -> HTTP/1.1 connection: headers within HEADER_TIMEOUT of the connection's start or
//!      of the previous response (an idle keep-alive client is closed the same way)
//!   -> the router; on shutdown: graceful close, GRACE at most
//! ```
//!
//! The agent and the hub each keep a copy of this file (one small helper per crate);
//! both copies behave the same and each crate tests its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a finishing connection is waited for at shutdown.
const GRACE: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Idle time of a connection before the kernel probes its peer.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between unanswered probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the connection is reset.
const KEEPALIVE_RETRIES: u32 = 3;

/// Turns on TCP keepalive with this module's timings: a request (or a POD body) from a
/// peer that vanished then fails instead of waiting forever on a half-open connection.
fn keepalive(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&ka)
}

/// Limits of the server loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = places.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = keepalive(&tcp) {
            tracing::debug!(%peer, error = %e, "TCP keepalive not set");
        }
        let (app, sd) = (app.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _place = place;
            let svc = TowerToHyperService::new(app);
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = b.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HTTP connection closed");
                    }
                }
                _ = sd.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GRACE, conn).await;
                }
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(GRACE, tasks.wait()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn server(limits: ServeLimits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let sd = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, sd.clone()));
        (addr, sd)
    }

    /// Reads until the server closes; how long that took.
    async fn closed_after(s: &mut tokio::net::TcpStream) -> Duration {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 256];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
        }
        t.elapsed()
    }

    /// The same cases as the hub's `api::serve` tests: a client that never finishes its
    /// headers is closed at the deadline; past the connection bound a client waits, and
    /// is served once a place frees.
    #[tokio::test]
    async fn stalled_clients_are_closed_and_connections_are_bounded() {
        let limits = ServeLimits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
        };
        let (addr, sd) = server(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let waited = closed_after(&mut slow).await;
        assert!(
            waited < Duration::from_secs(2),
            "stalled client kept {waited:?}"
        );

        let mut idle: Vec<_> = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = std::time::Instant::now();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        // Served only once an idle client's deadline freed a place.
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "served past the bound: {:?}",
            t.elapsed()
        );
        sd.cancel();
    }

    #[tokio::test]
    async fn keepalive_is_set_with_its_timings() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        keepalive(&tcp).unwrap();
        let s = socket2::SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        drop(c);
    }
}

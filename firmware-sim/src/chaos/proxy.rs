//! A loopback TCP proxy between one agent and the hub that the chaos harness controls:
//! pass traffic, cut the link (close every connection and refuse new ones), black-hole
//! the hub-to-agent direction (acks lost: the agent will resend, so the hub sees
//! duplicates), or delay every chunk.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Closed: connections dropped, new ones refused.
    Cut,
    /// Agent-to-hub passes; hub-to-agent bytes are dropped.
    Blackhole,
    /// Every chunk waits this long.
    Delay(Duration),
}

/// Handle to change a proxy's mode.
#[derive(Debug, Clone)]
pub struct Link {
    tx: watch::Sender<Mode>,
}

impl Link {
    /// Switches the link; `Cut` also ends current connections.
    pub fn set(&self, mode: Mode) {
        self.tx.send_replace(mode);
    }
}

/// Starts a proxy from `listener` to `target`; returns its handle.
pub fn start(listener: TcpListener, target: SocketAddr, shutdown: CancellationToken) -> Link {
    let (tx, rx) = watch::channel(Mode::Pass);
    tokio::spawn(async move {
        loop {
            let (conn, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            if *rx.borrow() == Mode::Cut {
                drop(conn);
                continue;
            }
            let (rx, shutdown) = (rx.clone(), shutdown.clone());
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = conn.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (ar, aw) = conn.into_split();
                let (hr, hw) = up.into_split();
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = pump(ar, hw, rx.clone(), false) => {}
                    _ = pump(hr, aw, rx.clone(), true) => {}
                    _ = cut_watch(rx) => {}
                }
            });
        }
    });
    Link { tx }
}

async fn cut_watch(mut rx: watch::Receiver<Mode>) {
    loop {
        if *rx.borrow() == Mode::Cut {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rx: watch::Receiver<Mode>,
    downstream: bool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mode = *rx.borrow();
        match mode {
            Mode::Cut => return,
            Mode::Blackhole if downstream => continue,
            Mode::Delay(d) => tokio::time::sleep(d).await,
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

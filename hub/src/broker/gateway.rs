//! The device gateway: terminates TLS in front of the embedded broker and enforces that a
//! device only publishes and subscribes under its own prefix.
//!
//! Why it exists: rumqttd awaits each TLS handshake inline in its accept loop with no
//! timeout, so one client that opens TCP and never finishes the handshake would block every
//! new device. Here each connection is handled by its own task: the accept loop never waits
//! on a client, a handshake has a deadline, and the connection count is bounded.
//!
//! Per connection:
//!
//! ```text
//! device --TLS 1.3, client cert--> gateway --plain MQTT, loopback--> rumqttd
//!   device id = O field of the verified client certificate
//!   CONNECT     client id must equal the device id, no last will (rumqttd would publish
//!               it unchecked); rewritten to log in as
//!               (device id, broker secret) so only the gateway can speak for a device
//!   PUBLISH     topic must be /tenants/{id}/up or /tenants/{id}/blob
//!   SUBSCRIBE   every filter must start with /tenants/{id}/
//!   UNSUBSCRIBE same
//!   anything else passes through; broker -> device bytes pass through untouched
//! ```
//!
//! A violation is counted (`topic_violations`), logged with the certificate's id and the
//! id the topic names, and the connection is closed before the packet reaches the broker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use fleetsync_protocol::topic::{Channel, Layout};
use rumqttc::mqttbytes::v4::{Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::presence::Registry;

/// Largest read from the broker towards a device at once.
const DOWNSTREAM_READ: usize = 16 * 1024;

/// Open files a device's connection takes: its TLS socket, the gateway's loopback
/// connection to the broker, and the broker's end of that one.
pub const FILES_PER_DEVICE: usize = 3;

/// How many of `wanted` device connections fit in this process's open-file limit, with
/// `reserve` files kept for everything else (HTTP connections, the store, outbound
/// clients). The soft limit is raised first, up to the hard limit, if `wanted` needs it.
/// `None`: no limit (or it cannot be read on this platform).
///
/// Why: past the limit the broker's accept loop fails with EMFILE and retries at once, on
/// the thread that also carries every device's traffic, so all devices stall; refusing
/// the devices that do not fit keeps the others running.
pub fn devices_within_file_limit(wanted: usize, reserve: usize) -> Option<usize> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let need = wanted
            .saturating_mul(FILES_PER_DEVICE)
            .saturating_add(reserve) as u64;
        let mut limit = getrlimit(Resource::Nofile);
        let mut soft = limit.current?;
        if soft < need {
            let raised = limit.maximum.map_or(need, |hard| hard.min(need));
            limit.current = Some(raised);
            if setrlimit(Resource::Nofile, limit).is_ok() {
                soft = raised;
            }
        }
        let fit = usize::try_from(soft.saturating_sub(reserve as u64)).unwrap_or(usize::MAX)
            / FILES_PER_DEVICE;
        Some(fit.min(wanted))
    }
    #[cfg(not(unix))]
    {
        let _ = (wanted, reserve);
        None
    }
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Most device connections at once (verified devices).
    pub max_connections: usize,
    /// Most TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Most TLS handshakes in progress from one source address (IPv4) or /64 (IPv6).
    pub max_handshakes_per_source: usize,
    /// Largest MQTT packet from a device.
    pub max_packet_bytes: usize,
    /// The broker's loopback address.
    pub upstream: SocketAddr,
    /// The broker login secret.
    pub secret: String,
    /// Told the id of every device whose downlink subscription the broker has just
    /// confirmed (its SUBACK went by): from then on a downlink publish reaches it, so
    /// whatever it has not acknowledged can be sent at once instead of at the next resend.
    pub listening: mpsc::Sender<String>,
    /// The device certificate verifier of the TLS config, run again on resumed sessions.
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// TLS handshakes in progress: a budget of their own, apart from the devices'
/// connections (a client holds a device slot only once its certificate is verified), and
/// a cap per source address (an IPv4 address, an IPv6 /64), so clients that connect and
/// never finish their handshake delay strangers from their own address, not the fleet.
/// Full: the new connection is closed at once (counted in `handshakes_refused`).
#[derive(Debug)]
struct Handshakes {
    total: Arc<Semaphore>,
    per_source: std::sync::Mutex<std::collections::HashMap<[u8; 8], usize>>,
    per_source_max: usize,
    in_progress: Arc<Metrics>,
}

/// One handshake's place in [`Handshakes`]; gives it back when dropped.
#[derive(Debug)]
struct HandshakeSlot {
    gate: Arc<Handshakes>,
    source: [u8; 8],
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn source_key(ip: std::net::IpAddr) -> [u8; 8] {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut k = [0u8; 8];
            k[4..].copy_from_slice(&v4.octets());
            k
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => source_key(std::net::IpAddr::V4(v4)),
            None => {
                let mut k = [0u8; 8];
                k.copy_from_slice(&v6.octets()[..8]);
                k[0] |= 0x80; // apart from every IPv4 key
                k
            }
        },
    }
}

impl Handshakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 8], usize>> {
        // Single increments and decrements: a panic cannot leave the map inconsistent.
        self.per_source.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<HandshakeSlot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        let source = source_key(ip);
        let mut map = self.lock();
        let n = map.entry(source).or_default();
        if *n >= self.per_source_max {
            return None;
        }
        *n += 1;
        drop(map);
        Metrics::add(&self.in_progress.handshakes_in_progress, 1);
        Some(HandshakeSlot {
            gate: self.clone(),
            source,
            _permit: permit,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut map = self.gate.lock();
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
        self.gate
            .in_progress
            .handshakes_in_progress
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs the accept loop until `shutdown`.
pub async fn run(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    cfg: GatewayConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let handshakes = Arc::new(Handshakes {
        total: Arc::new(Semaphore::new(cfg.max_handshakes)),
        per_source: Default::default(),
        per_source_max: cfg.max_handshakes_per_source,
        in_progress: metrics.clone(),
    });
    let cfg = Arc::new(cfg);
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Every device slot taken: no handshake could end in a connection, so none is
        // started (a full handshake costs far more than this refusal). A slot that frees
        // up later is taken by whichever device connects next.
        if permits.available_permits() == 0 {
            Metrics::add(&metrics.connections_refused, 1);
            debug!(%peer, "device connection limit reached; refused before the handshake");
            continue;
        }
        let Some(slot) = handshakes.try_enter(peer.ip()) else {
            Metrics::add(&metrics.handshakes_refused, 1);
            debug!(%peer, "handshake budget (total or this source's) full; refused");
            continue;
        };
        let (acceptor, cfg, registry, metrics, shutdown, permits) = (
            acceptor.clone(),
            cfg.clone(),
            registry.clone(),
            metrics.clone(),
            shutdown.clone(),
            permits.clone(),
        );
        tasks.spawn(async move {
            let admit = Admission { slot, permits };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(tcp, peer, acceptor, admit, &cfg, &registry, &metrics) => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// What lets a connection in: its handshake slot, then a device slot once verified.
struct Admission {
    slot: HandshakeSlot,
    permits: Arc<Semaphore>,
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    admit: Admission,
    cfg: &GatewayConfig,
    registry: &Registry,
    metrics: &Metrics,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Metrics::add(&metrics.tls_handshake_failures, 1);
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            Metrics::add(&metrics.tls_handshake_failures, 1);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let session = tls.get_ref().1;
    let chain = session.peer_certificates().unwrap_or_default();
    let device = chain.first().and_then(crate::tls::device_id_of);
    let Some(device) = device else {
        Metrics::add(&metrics.tls_handshake_failures, 1);
        warn!(%peer, "client certificate has no usable device id in its O field");
        return;
    };
    // rustls verified the certificate on a full handshake; a resumed session brings the
    // certificate its ticket was issued with, so it is checked again now: an expired
    // (or otherwise no longer valid) identity stops at once, not when tickets run out.
    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && let Err(e) = cfg.verifier.verify_client_cert(
            &chain[0],
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
        )
    {
        Metrics::add(&metrics.certificate_refusals, 1);
        warn!(%device, %peer, error = %e, "resumed session with a certificate no longer valid; refused");
        return;
    }
    let expires = chain.first().and_then(crate::tls::not_after);
    // Verified: the handshake's slot goes back, a device's slot is taken.
    let Admission { slot, permits } = admit;
    drop(slot);
    let Ok(_permit) = permits.try_acquire_owned() else {
        Metrics::add(&metrics.connections_refused, 1);
        warn!(%device, "device connection limit (mqtt.max_connections) reached; refused");
        return;
    };
    let upstream = match TcpStream::connect(cfg.upstream).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%device, error = %e, "embedded broker unreachable");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    registry.opened(&device);
    metrics
        .connected_devices
        .store(registry.count() as u64, Ordering::Relaxed);
    debug!(%device, %peer, "device connected");
    // A connection lives no longer than its certificate.
    let result = tokio::select! {
        r = proxy(tls, upstream, &device, cfg) => r,
        _ = wall_clock_reaches(expires) => {
            Metrics::add(&metrics.certificate_refusals, 1);
            info!(%device, "device certificate expired; disconnected");
            Ok(())
        }
    };
    registry.closed(&device);
    metrics
        .connected_devices
        .store(registry.count() as u64, Ordering::Relaxed);
    match result {
        Ok(()) => debug!(%device, "device disconnected"),
        Err(GuardError::Violation { topic, other }) => {
            Metrics::add(&metrics.topic_violations, 1);
            warn!(%device, other_device = %other, %topic, "device used another device's topic; disconnected");
        }
        Err(e) => debug!(%device, error = %e, "device connection closed"),
    }
}

/// Returns once the wall clock is at or past `t` (never for `None`). Sleeps at most a
/// minute at a time, so a clock set forward (NTP after a cold boot) counts, and no timer
/// is armed years ahead.
async fn wall_clock_reaches(t: Option<std::time::SystemTime>) {
    let Some(t) = t else {
        return std::future::pending().await;
    };
    loop {
        match t.duration_since(std::time::SystemTime::now()) {
            Ok(left) if !left.is_zero() => {
                tokio::time::sleep(left.min(Duration::from_secs(60))).await;
            }
            _ => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("topic {topic} is outside the device's prefix (names {other})")]
    Violation { topic: String, other: String },
}

/// Parses an MQTT fixed header: (packet type, header length, remaining length).
fn fixed_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize, usize)>, GuardError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(GuardError::Protocol(format!(
                    "packet of {len} bytes exceeds {max}"
                )));
            }
            return Ok(Some((b0 >> 4, 2 + i, len)));
        }
    }
    Err(GuardError::Protocol("bad remaining length".into()))
}

fn other_device(topic: &str) -> String {
    for layout in [Layout::Embedded, Layout::External] {
        if let Ok((id, _)) = layout.parse(topic) {
            return id.to_string();
        }
    }
    "-".to_string()
}

async fn proxy<S>(
    tls: S,
    upstream: TcpStream,
    device: &str,
    cfg: &GatewayConfig,
) -> Result<(), GuardError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut dev_r, mut dev_w) = tokio::io::split(tls);
    let (up_r, mut up_w) = upstream.into_split();
    let prefix = Layout::Embedded
        .device_prefix(device)
        .map_err(|e| GuardError::Protocol(e.to_string()))?;
    let up_topic = Layout::Embedded
        .topic(device, Channel::Up)
        .map_err(|e| GuardError::Protocol(e.to_string()))?;
    let blob_topic = Layout::Embedded
        .topic(device, Channel::Blob)
        .map_err(|e| GuardError::Protocol(e.to_string()))?;
    let down_topic = Layout::Embedded
        .topic(device, Channel::Down)
        .map_err(|e| GuardError::Protocol(e.to_string()))?;
    let max = cfg.max_packet_bytes;
    // Packet id of the device's SUBSCRIBE that covers its downlink topic, plus one (0: none).
    let down_sub = AtomicU32::new(0);

    let downstream = async {
        // broker -> device: bytes pass as they come; a side scanner only watches for the
        // SUBACK of the downlink subscription.
        let mut watch = SubackWatch::new(max + 1024);
        let r = loop {
            // No buffer is held while waiting: most devices hear nothing for seconds at a
            // time, and each idle connection held its own (about 6 KiB of it resident per
            // device, measured at 1,000 and 3,000 devices).
            if let Err(e) = up_r.readable().await {
                break Err(e);
            }
            let mut buf = Vec::with_capacity(DOWNSTREAM_READ);
            let n = match up_r.try_read_buf(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => break Err(e),
            };
            // rumqttd leaves Nagle on for its sockets: its PUBACK to a device sits unacked
            // under our delayed ACK, and the hub's `Ack` that follows a few ms later waits
            // behind it for the delayed-ACK timer (40 ms: every batch's round trip was
            // 45 ms). Acking at once lets the broker's next write go out as it is made.
            #[cfg(target_os = "linux")]
            let _ = up_r.as_ref().set_quickack(true);
            // Flushed every time: under backpressure the TLS writer keeps records it could
            // not send yet, and nothing else would push them out before the broker's next
            // bytes (`tokio::io::copy` flushes when its reader waits; so must we).
            if let Err(e) = dev_w.write_all(&buf[..n]).await {
                break Err(e);
            }
            if let Err(e) = dev_w.flush().await {
                break Err(e);
            }
            let want = down_sub.load(Ordering::Relaxed);
            if want != 0 && watch.feed(&buf[..n], want - 1) {
                down_sub.store(0, Ordering::Relaxed);
                let _ = cfg.listening.try_send(device.to_string());
            }
        };
        let _ = dev_w.shutdown().await;
        r
    };
    let upstream_dir = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut connected = false;
        loop {
            while let Some((kind, hlen, rlen)) = fixed_header(&buf, max)? {
                let total = hlen + rlen;
                if buf.len() < total {
                    buf.reserve(total - buf.len());
                    break;
                }
                let mut frame = buf.split_to(total);
                match kind {
                    1 => {
                        // CONNECT: the client id must be the certificate's device id.
                        let packet = Packet::read(&mut frame, max)
                            .map_err(|e| GuardError::Protocol(e.to_string()))?;
                        let Packet::Connect(mut connect) = packet else {
                            return Err(GuardError::Protocol("bad CONNECT".into()));
                        };
                        if connected {
                            return Err(GuardError::Protocol("second CONNECT".into()));
                        }
                        if connect.client_id != device {
                            return Err(GuardError::Violation {
                                topic: format!("client id {}", connect.client_id),
                                other: connect.client_id.clone(),
                            });
                        }
                        if let Some(will) = &connect.last_will {
                            // rumqttd publishes a will without any prefix check, and agents
                            // do not use one: a will is refused outright.
                            return Err(GuardError::Violation {
                                topic: format!("last will on {}", will.topic),
                                other: other_device(&will.topic),
                            });
                        }
                        connect.login = Some(Login::new(device, cfg.secret.clone()));
                        let mut out = BytesMut::new();
                        Packet::Connect(connect)
                            .write(&mut out, max)
                            .map_err(|e| GuardError::Protocol(e.to_string()))?;
                        up_w.write_all(&out).await?;
                        connected = true;
                        continue;
                    }
                    _ if !connected => {
                        return Err(GuardError::Protocol("packet before CONNECT".into()));
                    }
                    3 => {
                        // PUBLISH: topic is the first field of the variable header.
                        let body = &frame[hlen..];
                        if body.len() < 2 {
                            return Err(GuardError::Protocol("short PUBLISH".into()));
                        }
                        let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                        let topic = body
                            .get(2..2 + tlen)
                            .and_then(|t| std::str::from_utf8(t).ok())
                            .ok_or_else(|| GuardError::Protocol("bad PUBLISH topic".into()))?;
                        if topic != up_topic.as_str() && topic != blob_topic.as_str() {
                            return Err(GuardError::Violation {
                                topic: topic.to_string(),
                                other: other_device(topic),
                            });
                        }
                    }
                    8 | 10 => {
                        // SUBSCRIBE / UNSUBSCRIBE: every filter under the device's prefix.
                        let mut copy = frame.clone();
                        let filters: Vec<String> = match Packet::read(&mut copy, max)
                            .map_err(|e| GuardError::Protocol(e.to_string()))?
                        {
                            Packet::Subscribe(s) => {
                                if s.filters.iter().any(|f| f.path == down_topic.as_str()) {
                                    down_sub.store(u32::from(s.pkid) + 1, Ordering::Relaxed);
                                }
                                s.filters.into_iter().map(|f| f.path).collect()
                            }
                            Packet::Unsubscribe(u) => u.topics,
                            _ => return Err(GuardError::Protocol("bad SUBSCRIBE".into())),
                        };
                        if let Some(bad) = filters.iter().find(|f| !f.starts_with(prefix.as_str()))
                        {
                            return Err(GuardError::Violation {
                                topic: bad.clone(),
                                other: other_device(bad),
                            });
                        }
                    }
                    _ => {}
                }
                up_w.write_all(&frame).await?;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            let n = dev_r.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok::<(), GuardError>(());
            }
            if buf.len() > max + 8 && fixed_header(&buf, max)?.is_none() {
                return Err(GuardError::Protocol("unparseable stream".into()));
            }
        }
    };
    // Whichever side ends first ends the connection.
    tokio::select! {
        r = upstream_dir => r,
        r = downstream => r.map_err(GuardError::from),
    }
}

/// Follows the broker-to-device byte stream packet by packet without holding on to it,
/// to spot the SUBACK of one packet id. Only packet headers (and a SUBACK's id) are kept.
struct SubackWatch {
    max: usize,
    /// Bytes of the packet being read, until its header (or a whole SUBACK) is in.
    head: Vec<u8>,
    /// Bytes still to pass of a packet that is not a SUBACK.
    skip: usize,
    /// The stream could not be followed (never happens with a sound broker): stop looking.
    lost: bool,
}

impl SubackWatch {
    fn new(max: usize) -> Self {
        SubackWatch {
            max,
            head: Vec::new(),
            skip: 0,
            lost: false,
        }
    }

    /// Feeds the next bytes; true if they complete a successful SUBACK for `pkid`.
    fn feed(&mut self, mut data: &[u8], pkid: u32) -> bool {
        let mut seen = false;
        while !self.lost && !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            // At most one packet header plus a SUBACK body is ever held.
            let take = data.len().min(16);
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
            loop {
                let (kind, hlen, rlen) = match fixed_header(&self.head, self.max) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(_) => {
                        self.lost = true;
                        break;
                    }
                };
                let total = hlen + rlen;
                if kind == 9 {
                    if self.head.len() < total.min(hlen + 3) {
                        break;
                    }
                    // SUBACK: packet id, then one return code per filter (0x80 = refused).
                    let id = self
                        .head
                        .get(hlen..hlen + 2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]));
                    let code = self.head.get(hlen + 2).copied();
                    if id.map(u32::from) == Some(pkid) && code.is_some_and(|c| c != 0x80) {
                        seen = true;
                    }
                }
                if self.head.len() >= total {
                    self.head.drain(..total);
                } else {
                    self.skip = total - self.head.len();
                    self.head.clear();
                    break;
                }
            }
        }
        seen
    }
}

/// Logs the gateway's start.
pub fn log_listening(addr: SocketAddr) {
    info!(%addr, "device gateway listening (TLS 1.3, client certificates required)");
}

#[cfg(test)]
mod tests {
    use super::{SubackWatch, devices_within_file_limit};

    #[test]
    fn the_open_file_limit_bounds_the_devices() {
        // A fleet of this size never fits: the answer is what does (or no limit at all).
        let wanted = usize::MAX / 8;
        assert!(devices_within_file_limit(wanted, 64).is_none_or(|fit| fit < wanted));
        // A small one does.
        assert!(devices_within_file_limit(10, 64).is_none_or(|fit| fit == 10));
    }

    fn publish(len: usize) -> Vec<u8> {
        // Remaining length as a varint, then that many bytes.
        let mut v = vec![0x30];
        let mut n = len;
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            v.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        v.extend(std::iter::repeat_n(0xAA, len));
        v
    }

    fn stream(pkid: u16, code: u8) -> Vec<u8> {
        let mut s = publish(300_000);
        s.extend([0x90, 3]);
        s.extend(pkid.to_be_bytes());
        s.push(code);
        s.extend([0xd0, 0]); // PINGRESP
        s.extend(publish(5));
        s
    }

    #[test]
    fn spots_the_suback_however_the_stream_is_cut() {
        for cut in [1usize, 2, 3, 7, 16, 1000, 16 * 1024, usize::MAX] {
            let bytes = stream(7, 1);
            let mut w = SubackWatch::new(1 << 20);
            // Every chunk is fed (no short circuit): the watch must follow the whole stream.
            let mut seen = false;
            for c in bytes.chunks(cut.min(bytes.len())) {
                seen |= w.feed(c, 7);
            }
            assert!(seen, "cut {cut}");
            assert!(
                w.head.is_empty() && w.skip == 0,
                "cut {cut}: stream not followed"
            );
        }
    }

    #[test]
    fn ignores_other_ids_and_refusals() {
        let mut w = SubackWatch::new(1 << 20);
        assert!(!w.feed(&stream(8, 1), 7));
        assert!(!w.feed(&stream(7, 0x80), 7));
        assert!(w.feed(&stream(7, 0), 7));
    }
}

//! Uplink: stored events to the hub over MQTT/TLS, deleted only on the hub's `Ack`.
//!
//! ```text
//! pump task:   rumqttc event loop; reconnects with backoff + jitter; forwards downlink
//!              frames and connection changes to the sender over a bounded channel
//! sender task: keeps up to `max_inflight` batches awaiting a hub ack
//!              order: critical lane first; after (re)connecting the newest position
//!              alone, then the telemetry backlog oldest-first
//!              Ack -> store.ack (delete) -> refill; no ack within ack_timeout -> resend
//!              everything unacked (the hub deduplicates)
//! ```
//!
//! A batch is a run of consecutive seqs of one lane (`Store::next_batch`). Partly filled
//! telemetry batches wait up to `batch_max_delay` so a 1 Hz stream travels in full batches;
//! critical events go at once. Publishing never blocks the sender (`try_publish`, with the
//! client queue larger than the in-flight window), so pump and sender cannot deadlock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetsync_protocol::limits::MAX_CHUNK_BYTES;
use fleetsync_protocol::topic::{Channel, Layout, STATUS_OFFLINE, STATUS_ONLINE};
use fleetsync_protocol::{
    Assignment, Batch, BlobChunk, BoundedVec, Downlink, Lane, LinkStats, Sha256, Uplink, frame,
};
use rand::Rng as _;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{EventId, Store};

/// Largest MQTT packet either way (batches and blob chunks fit well under it).
pub const MAX_PACKET_BYTES: usize = 256 * 1024;
/// Stored bytes per batch (the frame limit is 128 KiB; positions shrink on the wire).
const BATCH_MAX_BYTES: usize = 96 * 1024;
/// Requests queued towards the MQTT client: more than the event window plus a round of
/// blob chunks, so `try_publish` only fails when the link is really backed up.
const CLIENT_QUEUE: usize = 256;
/// Blob chunks queued per round (the rest follow on the next wake-up).
const CHUNKS_PER_ROUND: usize = 64;

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Device id (MQTT client id; must match the certificate).
    pub device_id: String,
    /// Hub host.
    pub host: String,
    /// Hub port.
    pub port: u16,
    /// TLS client config (CA + device certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Resend deadline.
    pub ack_timeout: Duration,
    /// Events per batch.
    pub batch_max_events: usize,
    /// Batches in flight.
    pub max_inflight: usize,
    /// Longest a partial telemetry batch waits.
    pub batch_max_delay: Duration,
    /// Topic layout.
    pub layout: Layout,
    /// Where assignments from the hub go (the agent's assignment task).
    pub assignments: mpsc::Sender<Assignment>,
}

/// Live link state, shared with the local API and health events.
#[derive(Debug, Default)]
pub struct LinkState {
    /// Connected to the hub right now.
    pub connected: AtomicBool,
    /// Last hub ack (ms since the Unix epoch; 0 = never).
    pub last_ack_ms: AtomicU64,
    /// Connections made.
    pub connects: AtomicU32,
    /// Connections lost.
    pub disconnects: AtomicU32,
    /// Batches published.
    pub batches_sent: AtomicU32,
    /// Resends after an ack timeout or reconnect.
    pub resends: AtomicU32,
    /// Round trip of the last acked batch.
    pub last_rtt_ms: AtomicU32,
}

impl LinkState {
    /// Statistics for a health event.
    pub fn stats(&self) -> LinkStats {
        let rtt = self.last_rtt_ms.load(Ordering::Relaxed);
        LinkStats {
            connects: self.connects.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            batches_sent: self.batches_sent.load(Ordering::Relaxed),
            resends: self.resends.load(Ordering::Relaxed),
            last_ack_rtt_ms: (rtt > 0).then_some(rtt),
        }
    }
}

enum FromPump {
    Connected,
    Disconnected,
    Down(Vec<u8>),
}

/// Runs the uplink until `shutdown`. `wake` is notified by every append.
pub async fn run(
    cfg: UplinkConfig,
    store: Store,
    link: Arc<LinkState>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut opts = MqttOptions::new(cfg.device_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    // An external broker keeps this device's session (its downlink subscription, and the
    // acks and assignments sent while it was away) until it is back; its `status` is
    // `offline` (the will) until it says `online` again. The embedded broker's gateway
    // knows presence itself and allows no will.
    let status = match cfg.layout {
        Layout::External => match cfg.layout.topic(&cfg.device_id, Channel::Status) {
            Ok(t) => Some(t.to_string()),
            Err(e) => {
                warn!(error = %e, "bad device id; uplink not started");
                return;
            }
        },
        Layout::Embedded => None,
    };
    opts.set_clean_session(status.is_none());
    if let Some(topic) = &status {
        opts.set_last_will(rumqttc::LastWill::new(
            topic.clone(),
            STATUS_OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    }
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        cfg.tls.clone(),
    )));
    // The client queue is larger than the in-flight window: `try_publish` never finds it full
    // in normal operation.
    let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
    // Batches and acks are small and latency-bound: no Nagle delay (rumqttc's default).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::channel(256);
    let down = match cfg.layout.topic(&cfg.device_id, Channel::Down) {
        Ok(t) => t.to_string(),
        Err(e) => {
            warn!(error = %e, "bad device id; uplink not started");
            return;
        }
    };
    let pump = tokio::spawn(pump(
        eventloop,
        client.clone(),
        Topics { down, status },
        tx,
        link.clone(),
        shutdown.clone(),
    ));
    sender(cfg, client, store, link, wake, rx, shutdown).await;
    let _ = pump.await;
}

/// The topics the pump subscribes and announces on.
struct Topics {
    /// This device's downlinks.
    down: String,
    /// Its presence (external broker only).
    status: Option<String>,
}

async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topics: Topics,
    tx: mpsc::Sender<FromPump>,
    link: Arc<LinkState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                link.connected.store(true, Ordering::SeqCst);
                link.connects.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = client.try_subscribe(topics.down.clone(), QoS::AtLeastOnce) {
                    warn!(error = %e, "subscribe request failed");
                }
                info!("connected to hub");
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // Only now can acks reach us: say so to every hub replica (which sends
                // what this device has not acknowledged at once), and start (re)sending.
                if let Some(status) = &topics.status
                    && let Err(e) =
                        client.try_publish(status.clone(), QoS::AtLeastOnce, true, STATUS_ONLINE)
                {
                    warn!(error = %e, "presence not published");
                }
                if tx.send(FromPump::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(FromPump::Down(p.payload.to_vec())).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if link.connected.swap(false, Ordering::SeqCst) {
                    link.disconnects.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "lost the hub; backlog kept until it acks");
                    if tx.send(FromPump::Disconnected).await.is_err() {
                        return;
                    }
                } else {
                    debug!(error = %e, "hub not reachable");
                }
                // Exponential backoff with full jitter, capped at 30 s.
                let sleep = rand::rng().random_range(backoff / 2..=backoff);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(sleep) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

struct InFlight {
    epoch: u32,
    last_seq: u64,
    sent: Instant,
}

struct Sender {
    cfg: UplinkConfig,
    client: AsyncClient,
    store: Store,
    link: Arc<LinkState>,
    up_topic: String,
    online: bool,
    /// Keyed by (epoch, first_seq).
    inflight: BTreeMap<(u32, u64), InFlight>,
    /// Last event handed out per lane (None: from the oldest unacked).
    cursor_critical: Option<EventId>,
    cursor_telemetry: Option<EventId>,
    /// The newest position sent first after a reconnect (skipped in the backlog pass).
    sent_first: Option<EventId>,
    blob_topic: String,
    /// The blob being uploaded: digest, next offset, when its last chunk went out.
    blob: Option<BlobUpload>,
    /// Blobs whose file could not be read (an I/O error, not a lost file): passed over
    /// until every other pending blob was tried, or the next (re)connect. At most the
    /// pending blobs.
    blob_failed: BTreeSet<Sha256>,
}

/// A blob being uploaded: read from its file one chunk at a time, never whole.
struct BlobUpload {
    sha256: Sha256,
    file: std::fs::File,
    total: usize,
    next: usize,
    finished: Option<Instant>,
}

async fn sender(
    cfg: UplinkConfig,
    client: AsyncClient,
    store: Store,
    link: Arc<LinkState>,
    wake: Arc<Notify>,
    mut rx: mpsc::Receiver<FromPump>,
    shutdown: CancellationToken,
) {
    let up_topic = match cfg.layout.topic(&cfg.device_id, Channel::Up) {
        Ok(t) => t.to_string(),
        Err(_) => return,
    };
    let delay = cfg.batch_max_delay;
    let blob_topic = match cfg.layout.topic(&cfg.device_id, Channel::Blob) {
        Ok(t) => t.to_string(),
        Err(_) => return,
    };
    let mut s = Sender {
        blob_topic,
        blob: None,
        blob_failed: BTreeSet::new(),
        cfg,
        client,
        store,
        link,
        up_topic,
        online: false,
        inflight: BTreeMap::new(),
        cursor_critical: None,
        cursor_telemetry: None,
        sent_first: None,
    };
    let mut tick = tokio::time::interval(delay.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush_partial = tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = rx.recv() => {
                match msg {
                    None => return,
                    Some(FromPump::Connected) => s.connected(),
                    Some(FromPump::Disconnected) => s.online = false,
                    Some(FromPump::Down(bytes)) => s.downlink(&bytes).await,
                }
                false
            }
            _ = wake.notified() => false,
            _ = tick.tick() => {
                s.check_timeouts();
                true
            }
        };
        if s.online {
            s.fill(flush_partial);
            s.send_blobs();
        }
    }
}

impl Sender {
    fn reset(&mut self) {
        if !self.inflight.is_empty() {
            self.link
                .resends
                .fetch_add(self.inflight.len() as u32, Ordering::Relaxed);
        }
        self.inflight.clear();
        self.cursor_critical = None;
        self.cursor_telemetry = None;
        self.blob = None;
        self.blob_failed.clear();
        self.sent_first = None;
    }

    fn connected(&mut self) {
        self.online = true;
        self.reset();
        // Live first: the newest position alone, so the portal shows where the vehicle is now.
        self.sent_first = None;
        if let Ok(Some((id, _))) = self.store.newest(Lane::Telemetry)
            && let Ok(Some(batch)) = self.store.next_batch(
                Lane::Telemetry,
                Some(EventId {
                    epoch: id.epoch,
                    seq: id.seq.wrapping_sub(1),
                })
                .filter(|_| id.seq > 0),
                1,
                BATCH_MAX_BYTES,
            )
            && batch.epoch == id.epoch
            && batch.first_seq == id.seq
            && self.publish(&batch)
        {
            self.sent_first = Some(id);
        }
    }

    fn check_timeouts(&mut self) {
        let timeout = self.cfg.ack_timeout;
        if self.inflight.values().any(|f| f.sent.elapsed() > timeout) {
            debug!(
                inflight = self.inflight.len(),
                "no hub ack in time; resending the unacked backlog"
            );
            self.reset();
        }
    }

    async fn downlink(&mut self, bytes: &[u8]) {
        match frame::decode::<Downlink>(bytes) {
            Ok(Downlink::Ack(ack)) => {
                let store = self.store.clone();
                let ranges = ack.ranges.clone();
                let epoch = ack.epoch;
                let res = tokio::task::spawn_blocking(move || store.ack(epoch, &ranges)).await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "could not delete acked events"),
                    Err(e) => warn!(error = %e, "ack task failed"),
                }
                let now_ms = crate::now_ms();
                self.link.last_ack_ms.store(now_ms, Ordering::Relaxed);
                for r in ack.ranges.iter().filter(|r| r.first <= r.last) {
                    let done: Vec<(u32, u64)> = self
                        .inflight
                        .range((ack.epoch, r.first)..=(ack.epoch, r.last))
                        .filter(|(_, f)| f.epoch == ack.epoch && f.last_seq <= r.last)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in done {
                        if let Some(f) = self.inflight.remove(&k) {
                            let rtt = f.sent.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
                            self.link.last_rtt_ms.store(rtt.max(1), Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(Downlink::BlobAck(b)) => {
                let store = self.store.clone();
                let sha = b.sha256;
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || store.remove_blob(&sha)).await
                {
                    warn!(error = %e, "could not delete an uploaded blob");
                }
                if self.blob.as_ref().is_some_and(|u| u.sha256 == b.sha256) {
                    self.blob = None;
                }
            }
            Ok(Downlink::Assignment(a)) => {
                if self.cfg.assignments.try_send(a).is_err() {
                    // The hub sends it again until the device acknowledges it.
                    warn!("assignment task busy; the hub will resend");
                }
            }
            Ok(other) => debug!(?other, "downlink message not handled by the uplink"),
            Err(e) => warn!(error = %e, "undecodable downlink frame ignored"),
        }
    }

    /// Sends batches until the window is full or nothing is left to send.
    fn fill(&mut self, flush_partial: bool) {
        while self.inflight.len() < self.cfg.max_inflight {
            let next = match self.store.next_batch(
                Lane::Critical,
                self.cursor_critical,
                self.cfg.batch_max_events,
                BATCH_MAX_BYTES,
            ) {
                Ok(Some(b)) => Some((Lane::Critical, b)),
                Ok(None) => match self.store.next_batch(
                    Lane::Telemetry,
                    self.cursor_telemetry,
                    self.cfg.batch_max_events,
                    BATCH_MAX_BYTES,
                ) {
                    Ok(Some(b)) => Some((Lane::Telemetry, b)),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(error = %e, "store read failed");
                        None
                    }
                },
                Err(e) => {
                    warn!(error = %e, "store read failed");
                    None
                }
            };
            let Some((lane, batch)) = next else { return };
            let last = EventId {
                epoch: batch.epoch,
                seq: batch.last_seq(),
            };
            if lane == Lane::Telemetry {
                // Skip the live-first fix when it comes round again on its own.
                if batch.events.len() == 1
                    && self.sent_first
                        == Some(EventId {
                            epoch: batch.epoch,
                            seq: batch.first_seq,
                        })
                {
                    self.cursor_telemetry = Some(last);
                    continue;
                }
                // A short batch waits to fill only when it ends at the newest fix; one cut
                // short by a seq hole (a critical event took that seq) goes at once.
                let at_head =
                    matches!(self.store.newest(Lane::Telemetry), Ok(Some((id, _))) if id == last);
                if batch.events.len() < self.cfg.batch_max_events && !flush_partial && at_head {
                    return;
                }
            }
            if !self.publish(&batch) {
                return;
            }
            match lane {
                Lane::Critical => self.cursor_critical = Some(last),
                Lane::Telemetry => self.cursor_telemetry = Some(last),
            }
        }
    }

    /// Uploads POD blobs one at a time, in chunks, once no critical event is waiting (so a
    /// POD's event reaches the hub before its pictures). No `BlobAck` within three ack
    /// timeouts of the last chunk: the blob is sent again.
    fn send_blobs(&mut self) {
        if let Some(u) = &self.blob
            && let Some(done) = u.finished
        {
            if done.elapsed() < self.cfg.ack_timeout * 3 {
                return;
            }
            debug!(sha256 = %hex::encode(u.sha256), "no blob ack; sending the blob again");
            self.link.resends.fetch_add(1, Ordering::Relaxed);
            self.blob = None;
        }
        if self.blob.is_none() {
            if !matches!(
                self.store
                    .next_batch(Lane::Critical, None, 1, BATCH_MAX_BYTES),
                Ok(None)
            ) {
                return;
            }
            let Ok(pending) = self.store.pending_blobs() else {
                return;
            };
            self.blob = self.open_next_blob(&pending);
        }
        let Some(u) = self.blob.as_mut() else { return };
        let total = u.total;
        let mut buf = vec![0u8; MAX_CHUNK_BYTES];
        for _ in 0..CHUNKS_PER_ROUND {
            if u.finished.is_some() {
                return;
            }
            let end = (u.next + MAX_CHUNK_BYTES).min(total);
            let part = &mut buf[..end - u.next];
            if let Err(e) = std::os::unix::fs::FileExt::read_exact_at(&u.file, part, u.next as u64)
            {
                let sha = u.sha256;
                self.blob = None;
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    // Shorter than its record: bytes lost, no retry brings them back.
                    let why = format!("its file ends before byte {end} of {total}");
                    if let Err(e) = self.store.drop_lost_blob(&sha, &why) {
                        warn!(error = %e, sha256 = %hex::encode(sha), "could not drop a lost blob");
                    }
                } else {
                    warn!(error = %e, sha256 = %hex::encode(sha),
                        "cannot read a POD blob; sending the others first");
                    self.blob_failed.insert(sha);
                }
                return;
            }
            let chunk = BlobChunk {
                sha256: u.sha256,
                offset: u.next as u32,
                total_len: total as u32,
                data: BoundedVec::try_from_slice(part).unwrap_or_default(),
            };
            let Ok(frame) = frame::encode(&Uplink::BlobChunk(chunk)) else {
                return;
            };
            if self
                .client
                .try_publish(self.blob_topic.clone(), QoS::AtLeastOnce, false, frame)
                .is_err()
            {
                return;
            }
            u.next = end;
            if u.next >= total {
                u.finished = Some(Instant::now());
            }
        }
    }

    /// Opens the first of `pending` that can be read, in digest order: one the store finds
    /// lost is dropped there (an ERROR) and one that fails to open is passed over
    /// (`blob_failed`), so neither holds up the blobs after it.
    fn open_next_blob(&mut self, pending: &[(Sha256, u64)]) -> Option<BlobUpload> {
        if pending
            .iter()
            .all(|(sha, _)| self.blob_failed.contains(sha))
        {
            // Everything left has failed: try them all again.
            self.blob_failed.clear();
        }
        for (sha, _) in pending {
            if self.blob_failed.contains(sha) {
                continue;
            }
            match self.store.open_blob(sha) {
                Ok(Some((file, len))) => {
                    if let Ok(total) = usize::try_from(len) {
                        return Some(BlobUpload {
                            sha256: *sha,
                            file,
                            total,
                            next: 0,
                            finished: None,
                        });
                    }
                    self.blob_failed.insert(*sha);
                }
                // Acknowledged meanwhile, or lost and dropped by the store.
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, sha256 = %hex::encode(sha),
                        "cannot open a POD blob; sending the others first");
                    self.blob_failed.insert(*sha);
                }
            }
        }
        None
    }

    fn publish(&mut self, batch: &Batch) -> bool {
        let msg = Uplink::Batch(batch.clone());
        let bytes = match frame::encode(&msg) {
            Ok(b) => b,
            Err(e) => {
                // Stored bytes per batch are capped well under the frame limit, and the wire
                // form of an event is never larger than its stored form.
                tracing::error!(error = %e, n = batch.events.len(), "batch does not encode; not sent");
                return false;
            }
        };
        match self
            .client
            .try_publish(self.up_topic.clone(), QoS::AtLeastOnce, false, bytes)
        {
            Ok(()) => {
                self.link.batches_sent.fetch_add(1, Ordering::Relaxed);
                self.inflight.insert(
                    (batch.epoch, batch.first_seq),
                    InFlight {
                        epoch: batch.epoch,
                        last_seq: batch.last_seq(),
                        sent: Instant::now(),
                    },
                );
                true
            }
            Err(e) => {
                debug!(error = %e, "client queue full; will retry");
                false
            }
        }
    }
}

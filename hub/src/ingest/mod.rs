//! Ingest: device frames from the broker to the store, then acks back to the devices.
//!
//! ```text
//! rumqttc event loop --(bounded channel, INGEST_QUEUE)--> worker
//!   embedded broker: MQTT 3.1.1 on loopback, this process's only subscriber
//!   external broker: MQTT 5 over TLS, a shared subscription with the other replicas
//!                    (`external`), presence from the devices' status messages
//! worker: take up to GROUP frames -> decode (size-limited) -> identity from the topic
//!         -> ONE store round (dedup + write, durable when it returns) -> publish acks
//! ```
//!
//! Invariants: an `Ack` (or `BlobAck`) is published only after the store round that
//! wrote what it covers returned Ok. A frame that does not decode is counted,
//! quarantined with its raw bytes (in the same round), and skipped; the worker never stops
//! for bad input. If the store fails, nothing of that group is acked, so devices resend
//! it, and the worker backs off (100 ms doubling to 5 s) before its next round.
//!
//! The event loop must never wait on the worker while the worker waits on the event
//! loop: acks are queued with `try_publish`, and what does not fit stays in the worker's
//! pending list until the next round.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{Ack, BlobAck, BoundedVec, Downlink, SeqRange, Uplink, frame};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dispatch::{Dispatch, DownlinkRx, RESEND_MS};

mod external;
use crate::metrics::Metrics;
use crate::store::{ChunkOutcome, Item, Outcome, Quarantined, Store, StoreError, chunk_invalid};

/// Frames buffered between the MQTT event loop and the worker.
const INGEST_QUEUE: usize = 4096;
/// Most frames committed in one store round.
const GROUP: usize = 512;
/// Requests (acks) queued towards the broker.
const CLIENT_QUEUE: usize = 8192;
/// Back-off after a failed store round: first and longest.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the ingest reaches the broker.
#[derive(Debug, Clone)]
pub enum Link {
    /// The embedded broker on loopback, logged in as the hub (MQTT 3.1.1).
    Embedded {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// Login.
        username: String,
        /// Password.
        password: String,
    },
    /// An external broker (MQTT 5 over TLS, the hub's client certificate), shared with the
    /// other replicas.
    External(ExternalLink),
}

/// An external broker link: the replicas of `group` split the devices' `up` and `blob`
/// traffic (a shared subscription); every replica reads every device's `status`.
#[derive(Debug, Clone)]
pub struct ExternalLink {
    /// Broker host (also the TLS server name).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS: the broker's CA and this hub's client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// The shared subscription group.
    pub group: String,
    /// This replica's MQTT client id (unique per replica and start).
    pub client_id: String,
    /// Presence, from the devices' retained `status` messages.
    pub presence: Arc<crate::presence::Registry>,
    /// Told the id of every device that just came online (a live `online` status: it has
    /// subscribed to its downlinks), as the gateway does in the embedded layout.
    pub listening: mpsc::Sender<String>,
}

/// Where the ingest connects.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The broker.
    pub link: Link,
    /// Topic layout.
    pub layout: Layout,
    /// Largest packet.
    pub max_packet_bytes: usize,
}

/// A device frame as the broker delivered it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Its topic (names the device).
    pub topic: String,
    /// Its bytes.
    pub payload: bytes::Bytes,
}

/// The broker client the worker publishes acks and downlinks with.
#[derive(Clone)]
enum Client {
    V4(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish; false when the client's queue is full.
    fn try_publish(&self, topic: &str, bytes: &[u8]) -> bool {
        match self {
            Client::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, false, bytes.to_vec())
                .is_ok(),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    bytes.to_vec(),
                )
                .is_ok(),
        }
    }
}

/// Wall clock in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the ingest is told to send besides acks.
#[derive(Debug)]
pub struct DownlinkInputs {
    /// Frames queued by [`Dispatch`] (assignments).
    pub queued: DownlinkRx,
    /// Devices whose downlink subscription was just confirmed (the gateway, or the
    /// external link's status messages).
    pub listening: mpsc::Receiver<String>,
}

/// Runs the ingest until `shutdown`. Sets `ready` once the subscriptions are in place.
pub async fn run(
    cfg: IngestConfig,
    store: Store,
    dispatch: Dispatch,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    downlinks: DownlinkInputs,
    shutdown: CancellationToken,
) {
    let (tx, rx) = mpsc::channel(INGEST_QUEUE);
    let layout = cfg.layout;
    let packet = cfg.max_packet_bytes + 1024;
    let (client, pump) = match cfg.link {
        Link::Embedded {
            host,
            port,
            username,
            password,
        } => {
            let mut opts = MqttOptions::new(
                format!("fleetsync-hub-ingest-{}", std::process::id()),
                host,
                port,
            );
            opts.set_credentials(username, password);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_max_packet_size(packet, packet);
            opts.set_inflight(1000);
            let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
            // Acks are small and latency-bound: no Nagle delay (rumqttc's default).
            let mut net = rumqttc::NetworkOptions::new();
            net.set_tcp_nodelay(true);
            eventloop.set_network_options(net);
            let pump = tokio::spawn(pump(
                eventloop,
                client.clone(),
                layout,
                tx,
                ready,
                shutdown.clone(),
            ));
            (Client::V4(client), pump)
        }
        Link::External(link) => {
            let (client, eventloop) = external::connect(&link, packet, CLIENT_QUEUE);
            let pump = tokio::spawn(external::pump(
                eventloop,
                client.clone(),
                link,
                tx,
                ready,
                metrics.clone(),
                shutdown.clone(),
            ));
            (Client::V5(client), pump)
        }
    };
    let inputs = Inputs {
        frames: rx,
        downlinks: downlinks.queued,
        listening: downlinks.listening,
    };
    worker(inputs, client, layout, store, dispatch, metrics, shutdown).await;
    let _ = pump.await;
}

async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    layout: Layout,
    tx: mpsc::Sender<Frame>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let frame = Frame {
                    topic: p.topic,
                    payload: p.payload,
                };
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!("ingest connected to broker; subscribing");
                // One SUBSCRIBE for both filters: one SubAck means both are in place.
                let filters = [Channel::Up, Channel::Blob].map(|ch| {
                    rumqttc::SubscribeFilter::new(
                        layout.hub_filter(ch).to_string(),
                        QoS::AtLeastOnce,
                    )
                });
                if let Err(e) = client.try_subscribe_many(filters) {
                    warn!(error = %e, "subscribe request failed; reconnecting");
                    let _ = client.try_disconnect();
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                ready.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                ready.store(false, Ordering::SeqCst);
                warn!(error = %e, "ingest lost the broker; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What the worker waits on.
struct Inputs {
    /// Device frames from the broker.
    frames: mpsc::Receiver<Frame>,
    /// Frames the API wants sent.
    downlinks: DownlinkRx,
    /// Devices whose downlink subscription was just confirmed.
    listening: mpsc::Receiver<String>,
}

async fn worker(
    inputs: Inputs,
    client: Client,
    layout: Layout,
    store: Store,
    dispatch: Dispatch,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let Inputs {
        frames: mut rx,
        mut downlinks,
        mut listening,
    } = inputs;
    let mut pending: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    let mut backoff = BACKOFF_MIN;
    let mut qlog = QuarantineLog::default();
    loop {
        let mut group = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => group.push(p),
                None => return,
            },
            Some(d) = downlinks.recv() => pending.push_back(d),
            Some(device) = listening.recv() => {
                if let Some(d) = dispatch.on_listening(&device, now_ms()).await {
                    debug!(%device, "device listening again; sending its unacknowledged assignment");
                    pending.push_back(d);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)), if !pending.is_empty() => {}
        }
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            match commit(&store, &dispatch, &metrics, &mut qlog, layout, &group).await {
                Ok(acks) => {
                    pending.extend(acks);
                    backoff = BACKOFF_MIN;
                }
                Err(e) if group.len() > 1 && persistent(&e) => {
                    // Something in the round that will fail every time (a row that does
                    // not decode, a value the database refuses): frame by frame, so one
                    // bad frame costs its own ack and not every device's.
                    Metrics::add(&metrics.store_failures, 1);
                    warn!(error = %e, frames = group.len(), "store round failed; retrying its frames one by one");
                    for p in &group {
                        match commit(
                            &store,
                            &dispatch,
                            &metrics,
                            &mut qlog,
                            layout,
                            std::slice::from_ref(p),
                        )
                        .await
                        {
                            Ok(acks) => pending.extend(acks),
                            Err(e) => {
                                Metrics::add(&metrics.store_failures, 1);
                                tracing::error!(topic = %p.topic, error = %e,
                                    "the store refuses this frame; not acked, the device will resend it (operator action needed)");
                            }
                        }
                    }
                }
                Err(e) => {
                    Metrics::add(&metrics.store_failures, 1);
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64,
                        "store round failed; nothing of it acked, devices will resend");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        while let Some((topic, bytes)) = pending.pop_front() {
            if client.try_publish(&topic, &bytes) {
                Metrics::add(&metrics.acks_sent, 1);
            } else {
                pending.push_front((topic, bytes));
                break;
            }
        }
    }
}

/// Quarantine log lines per device and minute; past it, frames are counted (the
/// metric and the quarantine itself hold them) but not logged, and the next line says
/// how many went unlogged.
const QUARANTINE_LOG_PER_MINUTE: u32 = 5;
/// Devices tracked by the log limiter before windows that ended are dropped.
const QUARANTINE_LOG_DEVICES: usize = 10_000;

/// One WARN line per quarantined frame would let one device fill the hub's log (10,000
/// garbage frames: 2.4 MB); this keeps at most [`QUARANTINE_LOG_PER_MINUTE`] a device.
#[derive(Debug, Default)]
struct QuarantineLog {
    /// Per device: (window start ms, lines logged in it, frames not logged since the
    /// last line).
    windows: std::collections::HashMap<String, (u64, u32, u64)>,
}

impl QuarantineLog {
    /// `Some(frames not logged since the last line)` if this one may be logged now.
    fn admit(&mut self, device: &str, now_ms: u64) -> Option<u64> {
        if self.windows.len() >= QUARANTINE_LOG_DEVICES && !self.windows.contains_key(device) {
            self.windows
                .retain(|_, (start, _, _)| now_ms.saturating_sub(*start) < 60_000);
        }
        let w = self
            .windows
            .entry(device.to_string())
            .or_insert((now_ms, 0, 0));
        if now_ms.saturating_sub(w.0) >= 60_000 {
            w.0 = now_ms;
            w.1 = 0;
        }
        if w.1 < QUARANTINE_LOG_PER_MINUTE {
            w.1 += 1;
            Some(std::mem::take(&mut w.2))
        } else {
            w.2 += 1;
            None
        }
    }
}

/// The `Ack` of seqs `first..=last` of `epoch`.
fn ack_frame(epoch: u32, first: u64, last: u64) -> Option<Vec<u8>> {
    let mut ranges = BoundedVec::new();
    ranges.push(SeqRange { first, last }).ok()?;
    frame::encode(&Downlink::Ack(Ack { epoch, ranges })).ok()
}

/// Whether a failed round would fail the same way again whatever happens to the
/// database or disk (as opposed to an unreachable database or a failed sync).
fn persistent(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Postgres(_) | StoreError::Codec(_) | StoreError::Task(_)
    )
}

/// What the worker needs of a frame once its round has committed.
struct Reply {
    device: String,
    /// The device's downlink topic.
    down: String,
    /// The frame's topic and bytes, kept for an operator if the round refuses it.
    topic: String,
    raw: bytes::Bytes,
    kind: ReplyKind,
}

enum ReplyKind {
    /// Ack the batch's seqs `first..=last` of `epoch`.
    Batch { epoch: u32, first: u64, last: u64 },
    /// A batch kept whole in the quarantine instead of stored: acked, so the device is not
    /// stuck resending what the hub cannot store.
    Quarantined { epoch: u32, first: u64, last: u64 },
    /// BlobAck for this digest once the blob is complete.
    Chunk { sha256: [u8; 32] },
    /// Nothing to send (a quarantined frame).
    None,
}

/// Writes a group of frames as one store round and returns the acks to send.
async fn commit(
    store: &Store,
    dispatch: &Dispatch,
    metrics: &Metrics,
    qlog: &mut QuarantineLog,
    layout: Layout,
    group: &[Frame],
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let now = now_ms();
    let mut items = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut heard: Vec<String> = Vec::new();
    for p in group {
        let Ok((device, channel)) = layout.parse(&p.topic) else {
            warn!(topic = %p.topic, "frame on a topic outside the fleet layout; ignored");
            continue;
        };
        let Ok(down) = layout.topic(device, Channel::Down) else {
            continue;
        };
        let down = down.to_string();
        if !heard.iter().any(|d| d == device) {
            heard.push(device.to_string());
        }
        let mut quarantine = |error: String| {
            Metrics::add(&metrics.malformed_frames, 1);
            if let Some(suppressed) = qlog.admit(device, now) {
                warn!(%device, topic = %p.topic, %error, bytes = p.payload.len(), suppressed,
                    "frame quarantined");
            }
            Item::Quarantine(Quarantined {
                device: device.to_string(),
                topic: p.topic.clone(),
                recorded_ms: now,
                error,
                raw: p.payload.to_vec(),
            })
        };
        let (item, kind) = match (frame::decode::<Uplink>(&p.payload), channel) {
            // Identities are (epoch, seq) with seq below 2^63 (both stores index it so);
            // no agent counts that far.
            (Ok(Uplink::Batch(batch)), Channel::Up) if batch.last_seq() > i64::MAX as u64 => {
                let kind = ReplyKind::Quarantined {
                    epoch: batch.epoch,
                    first: batch.first_seq,
                    last: batch.last_seq(),
                };
                (quarantine("seq numbers beyond 2^63-1".into()), kind)
            }
            (Ok(Uplink::Batch(batch)), Channel::Up) => {
                let kind = ReplyKind::Batch {
                    epoch: batch.epoch,
                    first: batch.first_seq,
                    last: batch.last_seq(),
                };
                let item = Item::Batch {
                    device: device.to_string(),
                    batch,
                };
                (item, kind)
            }
            (Ok(Uplink::BlobChunk(chunk)), Channel::Blob) => {
                Metrics::add(&metrics.blob_chunks, 1);
                match chunk_invalid(&chunk) {
                    Some(why) => (quarantine(why), ReplyKind::None),
                    None => {
                        let kind = ReplyKind::Chunk {
                            sha256: chunk.sha256,
                        };
                        let item = Item::Chunk {
                            device: device.to_string(),
                            chunk,
                        };
                        (item, kind)
                    }
                }
            }
            (Ok(_), ch) => (
                quarantine(format!(
                    "message kind does not belong on the {} topic",
                    ch.as_str()
                )),
                ReplyKind::None,
            ),
            (Err(e), _) => (quarantine(e.to_string()), ReplyKind::None),
        };
        items.push(item);
        replies.push(Reply {
            device: device.to_string(),
            down,
            topic: p.topic.clone(),
            raw: p.payload.clone(),
            kind,
        });
    }
    // Capture times, for the lag histogram once the round says what was new: one flat
    // list, each item's share by its end offset.
    let mut times = Vec::new();
    let mut ends = Vec::with_capacity(items.len());
    for it in &items {
        if let Item::Batch { batch, .. } = it {
            times.extend(batch.events.iter().map(|e| e.time_ms));
        }
        ends.push(times.len());
    }
    let outcomes = store.ingest(items, now).await?;

    let mut acks = Vec::new();
    let mut start = 0;
    for ((outcome, reply), end) in outcomes.into_iter().zip(replies).zip(ends) {
        let item_times = &times[start..end];
        start = end;
        let Reply {
            device,
            down,
            topic,
            raw,
            kind,
        } = reply;
        // A frame the round stored but that an operator must see: kept before any ack.
        let keep = |error: String| Quarantined {
            device: device.clone(),
            topic: topic.clone(),
            recorded_ms: now,
            error,
            raw: raw.to_vec(),
        };
        match (outcome, kind) {
            (Outcome::Batch(r), ReplyKind::Batch { epoch, first, last }) => {
                Metrics::add(&metrics.batches, 1);
                Metrics::add(&metrics.events_ingested, r.inserted());
                Metrics::add(&metrics.duplicates_dropped, r.duplicates);
                if r.conflicts > 0 {
                    // The device reused identities for different events (its store was
                    // wiped?). The frame is kept whole for an operator; the batch is
                    // still acked so the device is not stuck resending it.
                    Metrics::add(&metrics.identity_conflicts, r.conflicts);
                    Metrics::add(&metrics.malformed_frames, 1);
                    tracing::error!(%device, epoch, first, conflicts = r.conflicts,
                        "device reused event identities with different content; frame quarantined, operator action needed");
                    store
                        .quarantine(keep(format!(
                            "{} events reuse an (epoch, seq) already stored with different content",
                            r.conflicts
                        )))
                        .await?;
                }
                if !r.new.is_empty() {
                    for t in item_times {
                        metrics.observe_lag_ms(now.saturating_sub(*t));
                    }
                }
                debug!(%device, epoch, first, new = r.new.len(), dup = r.duplicates, "batch stored");
                if let Some(bytes) = ack_frame(epoch, first, last) {
                    acks.push((down, bytes));
                }
            }
            (Outcome::Quarantined(_), ReplyKind::Quarantined { epoch, first, last }) => {
                if let Some(bytes) = ack_frame(epoch, first, last) {
                    acks.push((down, bytes));
                }
            }
            (Outcome::Chunk(c), ReplyKind::Chunk { sha256 }) => match c {
                ChunkOutcome::Complete => {
                    Metrics::add(&metrics.blobs_completed, 1);
                    if let Ok(bytes) = frame::encode(&Downlink::BlobAck(BlobAck { sha256 })) {
                        acks.push((down, bytes));
                    }
                }
                ChunkOutcome::Partial { evicted } => {
                    if evicted > 0 {
                        Metrics::add(&metrics.blob_uploads_evicted, u64::from(evicted));
                        debug!(%device, evicted, "unfinished blob uploads evicted for a newer one");
                    }
                }
                ChunkOutcome::DigestMismatch | ChunkOutcome::Invalid(_) => {
                    let why = match c {
                        ChunkOutcome::Invalid(why) => why,
                        _ => "blob bytes do not match their sha256".into(),
                    };
                    Metrics::add(&metrics.malformed_frames, 1);
                    if let Some(suppressed) = qlog.admit(&device, now) {
                        warn!(%device, error = %why, suppressed, "blob chunk quarantined");
                    }
                    store.quarantine(keep(why)).await?;
                }
            },
            _ => {}
        }
    }
    // A device we hear from that has not acknowledged its assignment gets it again.
    let resends = dispatch.resend_due(&heard, now, RESEND_MS).await;
    if !resends.is_empty() {
        debug!(
            n = resends.len(),
            "assignments not acknowledged yet; sending them again"
        );
    }
    acks.extend(resends);
    Ok(acks)
}

/// Drops unfinished blob uploads idle past the store's limit, every half of that limit
/// (at most a minute), and keeps the upload gauges current.
pub async fn sweep_uploads(store: Store, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let ttl = Duration::from_millis(store.partial_blob_limits().ttl_ms);
    let every = (ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep_partial_blobs(now_ms()).await {
            Ok(r) => {
                Metrics::add(&metrics.blob_uploads_expired, r.expired);
                metrics
                    .blob_uploads_in_progress
                    .store(r.uploads, Ordering::Relaxed);
                metrics.blob_upload_bytes.store(r.bytes, Ordering::Relaxed);
                if r.expired > 0 {
                    info!(
                        expired = r.expired,
                        left = r.uploads,
                        "unfinished blob uploads expired"
                    );
                }
            }
            Err(e) => {
                warn!(error = %e, "could not sweep unfinished blob uploads; trying again later")
            }
        }
    }
}

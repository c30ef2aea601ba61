//! Ingest: device frames from the broker to the store, then acks back to the devices.
//!
//! ```text
//! rumqttc event loop --(bounded channel, INGEST_QUEUE)--> worker
//! worker: take up to GROUP frames -> decode (size-limited) -> identity from the topic
//!         -> dedup + write (store) -> ONE make_durable (flush + fsync) -> publish acks
//! ```
//!
//! Invariants: an `Ack` (or `BlobAck`) is published only after `make_durable` returned Ok
//! for everything it covers. A frame that does not decode is counted, quarantined with its
//! raw bytes, and skipped; the worker never stops for bad input. If the store fails,
//! nothing of that group is acked, so devices resend it.
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
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::store::{ChunkOutcome, HubStore, Quarantined};

/// Frames buffered between the MQTT event loop and the worker.
const INGEST_QUEUE: usize = 4096;
/// Most frames committed with one fsync.
const GROUP: usize = 512;
/// Requests (acks) queued towards the broker.
const CLIENT_QUEUE: usize = 8192;

/// Frames the API asks to send to devices (topic, frame), e.g. assignments.
pub type DownlinkTx = mpsc::Sender<(String, Vec<u8>)>;
/// The receiving side, owned by the ingest worker.
pub type DownlinkRx = mpsc::Receiver<(String, Vec<u8>)>;
/// Downlink frames queued from the API.
pub const DOWNLINK_QUEUE: usize = 1024;
/// An unacknowledged assignment is sent again when its device is heard from, at most
/// this often.
const ASSIGNMENT_RESEND_MS: u64 = 10_000;

/// Where the ingest connects.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Login.
    pub username: String,
    /// Password.
    pub password: String,
    /// Topic layout.
    pub layout: Layout,
    /// Largest packet.
    pub max_packet_bytes: usize,
}

/// Wall clock in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the ingest until `shutdown`. Sets `ready` once the subscriptions are in place.
pub async fn run(
    cfg: IngestConfig,
    store: HubStore,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    downlinks: DownlinkRx,
    listening: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut opts = MqttOptions::new(
        format!("fleetsync-hub-ingest-{}", std::process::id()),
        cfg.host.clone(),
        cfg.port,
    );
    opts.set_credentials(cfg.username.clone(), cfg.password.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(cfg.max_packet_bytes + 1024, cfg.max_packet_bytes + 1024);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
    // Acks are small and latency-bound: no Nagle delay (rumqttc's default).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::channel(INGEST_QUEUE);
    let layout = cfg.layout;
    let pump = tokio::spawn(pump(
        eventloop,
        client.clone(),
        layout,
        tx,
        ready,
        shutdown.clone(),
    ));
    let inputs = Inputs {
        frames: rx,
        downlinks,
        listening,
    };
    worker(inputs, client, layout, store, metrics, shutdown).await;
    let _ = pump.await;
}

async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    layout: Layout,
    tx: mpsc::Sender<Publish>,
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
                if tx.send(p).await.is_err() {
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
    frames: mpsc::Receiver<Publish>,
    /// Frames the API wants sent.
    downlinks: DownlinkRx,
    /// Devices whose downlink subscription was just confirmed.
    listening: mpsc::Receiver<String>,
}

async fn worker(
    inputs: Inputs,
    client: AsyncClient,
    layout: Layout,
    store: HubStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let Inputs {
        frames: mut rx,
        mut downlinks,
        mut listening,
    } = inputs;
    let mut pending: VecDeque<(String, Vec<u8>)> = VecDeque::new();
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
                // A (re)connected device: what it has not acknowledged goes now.
                if let Some(d) = unacked_assignment(&store, layout, &device, now_ms(), 0) {
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
            let (store, metrics) = (store.clone(), metrics.clone());
            match tokio::task::spawn_blocking(move || commit(&store, &metrics, layout, group)).await
            {
                Ok(acks) => pending.extend(acks),
                Err(e) => warn!(error = %e, "ingest commit task failed"),
            }
        }
        while let Some((topic, bytes)) = pending.pop_front() {
            match client.try_publish(topic.clone(), QoS::AtLeastOnce, false, bytes.clone()) {
                Ok(()) => Metrics::add(&metrics.acks_sent, 1),
                Err(_) => {
                    pending.push_front((topic, bytes));
                    break;
                }
            }
        }
    }
}

/// Writes a group of frames, makes them durable, and returns the acks to send.
fn commit(
    store: &HubStore,
    metrics: &Metrics,
    layout: Layout,
    group: Vec<Publish>,
) -> Vec<(String, Vec<u8>)> {
    let now = now_ms();
    let mut acks = Vec::new();
    let mut heard: Vec<String> = Vec::new();
    for p in group {
        let Ok((device, channel)) = layout.parse(&p.topic) else {
            warn!(topic = %p.topic, "frame on a topic outside the fleet layout; ignored");
            continue;
        };
        let Ok(down) = layout.topic(device, Channel::Down) else {
            continue;
        };
        if !heard.iter().any(|d| d == device) {
            heard.push(device.to_string());
        }
        let quarantine = |error: String| {
            Metrics::add(&metrics.malformed_frames, 1);
            warn!(%device, topic = %p.topic, %error, bytes = p.payload.len(), "frame quarantined");
            let q = Quarantined {
                device: device.to_string(),
                topic: p.topic.clone(),
                recorded_ms: now,
                error,
                raw: p.payload.to_vec(),
            };
            if let Err(e) = store.quarantine(&q) {
                warn!(%device, error = %e, "quarantine write failed");
            }
        };
        match (frame::decode::<Uplink>(&p.payload), channel) {
            (Ok(Uplink::Batch(batch)), Channel::Up) => {
                match store.ingest_batch(device, &batch, now) {
                    Ok(r) => {
                        Metrics::add(&metrics.batches, 1);
                        Metrics::add(&metrics.events_ingested, r.inserted);
                        Metrics::add(&metrics.duplicates_dropped, r.duplicates);
                        if r.conflicts > 0 {
                            // The device reused identities for different events (its store
                            // was wiped?). The frame is kept whole for an operator; the batch
                            // is still acked so the device is not stuck resending it.
                            Metrics::add(&metrics.identity_conflicts, r.conflicts);
                            tracing::error!(%device, epoch = batch.epoch, first = batch.first_seq, conflicts = r.conflicts,
                                "device reused event identities with different content; frame quarantined, operator action needed");
                            quarantine(format!(
                                "{} events reuse an (epoch, seq) already stored with different content",
                                r.conflicts
                            ));
                        }
                        if r.inserted > 0 {
                            for ev in batch.events.iter() {
                                metrics.observe_lag_ms(now.saturating_sub(ev.time_ms));
                            }
                        }
                        debug!(%device, epoch = batch.epoch, first = batch.first_seq, n = batch.events.len(), dup = r.duplicates, "batch stored");
                        let mut ranges = BoundedVec::new();
                        let _ = ranges.push(SeqRange {
                            first: batch.first_seq,
                            last: batch.last_seq(),
                        });
                        let ack = Downlink::Ack(Ack {
                            epoch: batch.epoch,
                            ranges,
                        });
                        if let Ok(bytes) = frame::encode(&ack) {
                            acks.push((down.to_string(), bytes));
                        }
                    }
                    Err(e) => warn!(%device, error = %e, "store write failed; batch not acked"),
                }
            }
            (Ok(Uplink::BlobChunk(chunk)), Channel::Blob) => {
                Metrics::add(&metrics.blob_chunks, 1);
                let _ = store.touch_device(device, now);
                match store.put_chunk(&chunk) {
                    Ok(ChunkOutcome::Complete) => {
                        Metrics::add(&metrics.blobs_completed, 1);
                        let ack = Downlink::BlobAck(BlobAck {
                            sha256: chunk.sha256,
                        });
                        if let Ok(bytes) = frame::encode(&ack) {
                            acks.push((down.to_string(), bytes));
                        }
                    }
                    Ok(ChunkOutcome::Partial) => {}
                    Ok(ChunkOutcome::DigestMismatch) => {
                        quarantine("blob bytes do not match their sha256".into())
                    }
                    Ok(ChunkOutcome::Invalid(why)) => quarantine(why),
                    Err(e) => warn!(%device, error = %e, "blob write failed"),
                }
            }
            (Ok(_), ch) => quarantine(format!(
                "message kind does not belong on the {} topic",
                ch.as_str()
            )),
            (Err(e), _) => quarantine(e.to_string()),
        }
    }
    if let Err(e) = store.make_durable() {
        warn!(error = %e, "store fsync failed; acks withheld, devices will resend");
        return Vec::new();
    }
    // A device we hear from that has not acknowledged its assignment gets it again.
    for device in heard {
        if let Some(d) = unacked_assignment(store, layout, &device, now, ASSIGNMENT_RESEND_MS) {
            debug!(%device, "assignment not acknowledged yet; sending it again");
            acks.push(d);
        }
    }
    acks
}

/// The device's assignment as a downlink frame if the device has not acknowledged it and
/// it was last sent at least `min_gap_ms` ago; marks it sent.
fn unacked_assignment(
    store: &HubStore,
    layout: Layout,
    device: &str,
    now: u64,
    min_gap_ms: u64,
) -> Option<(String, Vec<u8>)> {
    let rec = store.assignment(device).ok().flatten()?;
    if rec.acknowledged() || now.saturating_sub(rec.sent_ms) < min_gap_ms {
        return None;
    }
    let down = layout.topic(device, Channel::Down).ok()?;
    let bytes = frame::encode(&Downlink::Assignment(rec.assignment)).ok()?;
    let _ = store.mark_assignment_sent(device, now);
    Some((down.to_string(), bytes))
}

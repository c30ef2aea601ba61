//! Hub ingest throughput: 100 devices with real certificates over TLS against an
//! in-process hub, against the raw rate of the same publishes into the embedded broker.
//!
//! `cargo bench -p fleetsync-tests --bench ingest`:
//!
//! - baseline: `fleetsync_hub::broker::embedded` alone, one subscriber on `/tenants/+/up`
//!   counting messages, 100 plain-TCP (no TLS) publishers sending the same 60-fix `Batch`
//!   frames with QoS 1, up to 8 unacked (PUBACK) each; events/s = publishes received/s x 60;
//! - hub: `TestHub` (gateway with mTLS, broker, ingest with dedup + fsync, acks); each device
//!   subscribes to its down topic and keeps up to 8 batches awaiting the hub's `Ack`;
//!   events/s = events acked by the hub per second.
//! - hub on PostgreSQL (when `FLEETSYNC_TEST_PG_URL` names a server): the same, the hub's
//!   store a fresh database on it; acked after `COMMIT`.
//! - PostgreSQL baseline: the same rows (device, epoch, seq, recorded_ms, kind, postcard
//!   body) written straight into the same table by one client, in transactions of the
//!   size of a full ingest round (512 batches of 60), as one multi-row `INSERT ... SELECT
//!   FROM UNNEST ... ON CONFLICT DO NOTHING` and as binary `COPY`: the physical rate.
//!
//! Each side runs `WARMUP` and is then measured for `WINDOW`; clients, broker and hub share
//! this machine's cores.
//!
//! `cargo bench -p fleetsync-tests --bench ingest -- shipments`: the cost of shipments on
//! the sled hub, in one run: 1,000 devices (the same frames, fixes stamped from a minute
//! ago onwards so they count as fresh positions), without shipments, then on a new hub
//! where the ERP API first released one open shipment per device (a delivery stop with a
//! window, so every estimate round estimates every vehicle), with estimate rounds every
//! 5 s (the default is 30 s) in both rows. Both rows send for 30 s (the release's time)
//! before the warm-up, so both windows write into a store of the same size. The fixes'
//! times run about 100 times faster than real time here, so every round moves every
//! estimate by more than 5 minutes and writes every shipment with an EST milestone: far
//! more estimate writes than a fleet at 1 Hz makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{Batch, BoundedVec, Downlink, Event, Uplink, frame};
use fleetsync_tests::{TestHub, device_client, drive};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 100;
const BATCH: usize = 60;
const INFLIGHT: usize = 8;
const WARMUP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(20);
const MAX_PACKET: usize = 256 * 1024;
/// The shipments rows: sending before the window (the release of 1,000 shipments fits).
const SETTLE: Duration = Duration::from_secs(30);

/// Counters shared by every client of one side.
#[derive(Default)]
struct Counters {
    /// Events acked by the hub (hub side) or PUBACKed by the broker (baseline).
    acked_events: AtomicU64,
    /// Messages the baseline subscriber received.
    received: AtomicU64,
    /// Devices subscribed (hub side) or connected (baseline).
    ready: AtomicUsize,
    /// `acked_events` during the measured window.
    acked_in_window: AtomicU64,
    /// Connection errors seen by clients.
    errors: AtomicU64,
}

/// A device's batch source: the drive's fixes in frames of 60 with consecutive seqs.
struct Frames {
    fixes: Arc<Vec<Event>>,
    next: u64,
}

impl Frames {
    fn next_frame(&mut self) -> Vec<u8> {
        let n = self.fixes.len() / BATCH;
        let chunk = (self.next as usize) % n;
        let events = BoundedVec::try_from_slice(&self.fixes[chunk * BATCH..(chunk + 1) * BATCH])
            .expect("60 fit in a batch");
        let msg = Uplink::Batch(Batch {
            epoch: 1,
            first_seq: self.next * BATCH as u64,
            events,
        });
        self.next += 1;
        frame::encode(&msg).expect("encodes")
    }
}

/// One simulated device against the hub: subscribe, then keep `INFLIGHT` batches awaiting
/// the hub's `Ack`.
async fn hub_device(
    id: String,
    client: AsyncClient,
    mut el: EventLoop,
    mut frames: Frames,
    c: Arc<Counters>,
    sending: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let up = Layout::Embedded
        .topic(&id, Channel::Up)
        .unwrap()
        .to_string();
    let down = Layout::Embedded
        .topic(&id, Channel::Down)
        .unwrap()
        .to_string();
    let mut inflight = 0usize;
    let mut counted_ready = false;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                // (Re)connected: whatever was in flight is lost with the session.
                inflight = 0;
                client
                    .try_subscribe(down.clone(), QoS::AtLeastOnce)
                    .unwrap();
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                if !counted_ready {
                    counted_ready = true;
                    c.ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                match frame::decode::<Downlink>(&p.payload) {
                    Ok(Downlink::Ack(a)) if a.epoch == 1 => {
                        let n: u64 = a.ranges.iter().map(|r| r.last - r.first + 1).sum();
                        c.acked_events.fetch_add(n, Ordering::Relaxed);
                        inflight = inflight.saturating_sub(1);
                    }
                    Ok(Downlink::Assignment(a)) => {
                        // As an agent does: acknowledge it (epoch 2, apart from the fixes).
                        let ack = Uplink::Batch(Batch {
                            epoch: 2,
                            first_seq: u64::from(a.version),
                            events: BoundedVec::try_from_slice(&[Event {
                                time_ms: fleetsync_agent::now_ms(),
                                body: fleetsync_protocol::Body::AssignmentAck(
                                    fleetsync_protocol::AssignmentAck {
                                        assignment_id: a.id.clone(),
                                        version: a.version,
                                    },
                                ),
                            }])
                            .expect("one fits"),
                        });
                        let _ = client.try_publish(
                            up.clone(),
                            QoS::AtLeastOnce,
                            false,
                            frame::encode(&ack).expect("encodes"),
                        );
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        while counted_ready && sending.load(Ordering::Relaxed) && inflight < INFLIGHT {
            if client
                .try_publish(up.clone(), QoS::AtLeastOnce, false, frames.next_frame())
                .is_err()
            {
                break;
            }
            inflight += 1;
        }
    }
    let _ = client.try_disconnect();
}

/// One plain-TCP publisher straight into the broker: up to `INFLIGHT` unacked publishes.
async fn raw_publisher(
    id: String,
    client: AsyncClient,
    mut el: EventLoop,
    mut frames: Frames,
    c: Arc<Counters>,
    sending: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let up = Layout::Embedded
        .topic(&id, Channel::Up)
        .unwrap()
        .to_string();
    let mut inflight = 0usize;
    let mut connected = false;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                inflight = 0;
                if !connected {
                    connected = true;
                    c.ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                c.acked_events.fetch_add(BATCH as u64, Ordering::Relaxed);
                inflight = inflight.saturating_sub(1);
            }
            Ok(_) => {}
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        while connected && sending.load(Ordering::Relaxed) && inflight < INFLIGHT {
            if client
                .try_publish(up.clone(), QoS::AtLeastOnce, false, frames.next_frame())
                .is_err()
            {
                break;
            }
            inflight += 1;
        }
    }
    let _ = client.try_disconnect();
}

/// The baseline's subscriber: counts what the broker delivers on `/tenants/+/up`.
async fn raw_subscriber(
    client: AsyncClient,
    mut el: EventLoop,
    c: Arc<Counters>,
    subscribed: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                client
                    .try_subscribe(Layout::Embedded.hub_filter(Channel::Up), QoS::AtLeastOnce)
                    .unwrap();
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => subscribed.store(true, Ordering::SeqCst),
            Ok(MqttEvent::Incoming(Packet::Publish(_))) => {
                c.received.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Waits for `ready` clients, lets them send for the warm-up, measures `counter` over the
/// window, then stops new sends; returns (per second, window actually measured).
async fn measure(
    c: &Counters,
    sending: &AtomicBool,
    counter: impl Fn(&Counters) -> u64,
    ready: usize,
) -> Option<(f64, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.ready.load(Ordering::Relaxed) < ready {
        if Instant::now() > deadline {
            println!(
                "  only {} of {ready} clients ready after 60 s",
                c.ready.load(Ordering::Relaxed)
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(WARMUP).await;
    let (n0, a0, t0) = (
        counter(c),
        c.acked_events.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(WINDOW).await;
    let (n1, a1, el) = (
        counter(c),
        c.acked_events.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    c.acked_in_window.store(a1 - a0, Ordering::Relaxed);
    sending.store(false, Ordering::Relaxed);
    Some(((n1 - n0) as f64 / el.as_secs_f64(), el))
}

async fn baseline(fixes: &Arc<Vec<Event>>) -> Option<(f64, f64)> {
    let broker = tokio::task::spawn_blocking(|| {
        fleetsync_hub::broker::embedded::start(MAX_PACKET, DEVICES + 16)
    })
    .await
    .unwrap()
    .expect("embedded broker starts");
    let addr: SocketAddr = broker.addr;
    let c = Arc::new(Counters::default());
    // Clients send as soon as they are up (an idle `EventLoop::poll` cannot be woken
    // safely: it is not cancel-safe mid-write); the window starts once all are up.
    let sending = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();
    let opts = |id: &str| {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_credentials(id, broker.secret.clone());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(MAX_PACKET + 1024, MAX_PACKET + 1024);
        o
    };
    let mut tasks = Vec::new();
    let subscribed = Arc::new(AtomicBool::new(false));
    let mut sub_opts = opts("bench-subscriber");
    sub_opts.set_inflight(1000);
    let (client, el) = AsyncClient::new(sub_opts, 1024);
    tasks.push(tokio::spawn(raw_subscriber(
        client,
        el,
        c.clone(),
        subscribed.clone(),
        stop.clone(),
    )));
    while !subscribed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..DEVICES {
        let id = format!("D{i:03}");
        let (client, el) = AsyncClient::new(opts(&id), 64);
        let frames = Frames {
            fixes: fixes.clone(),
            next: 0,
        };
        tasks.push(tokio::spawn(raw_publisher(
            id,
            client,
            el,
            frames,
            c.clone(),
            sending.clone(),
            stop.clone(),
        )));
    }
    let res = measure(
        &c,
        &sending,
        |c| c.received.load(Ordering::Relaxed),
        DEVICES,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (per_s, el) = res?;
    let pubacks = c.acked_in_window.load(Ordering::Relaxed) as f64 / BATCH as f64;
    println!(
        "  baseline: {:.0} publishes/s received by the subscriber over {:.1} s; the publishers \
         got {:.0} PUBACKs/s ({:.1}x that: rumqttd acks from memory, a lagging subscriber \
         misses the rest); {} client errors",
        per_s,
        el.as_secs_f64(),
        pubacks / el.as_secs_f64(),
        pubacks / el.as_secs_f64() / per_s,
        c.errors.load(Ordering::Relaxed)
    );
    // The broker's threads live until the process exits (rumqttd has no stop).
    Some((per_s, per_s * BATCH as f64))
}

async fn through_hub(fixes: &Arc<Vec<Event>>, pg: Option<&str>) -> Option<f64> {
    through_hub_with(fixes, pg, DEVICES, false).await
}

/// Releases one open shipment per device through the ERP API, once every device is
/// known to the hub (its first batch is stored).
async fn release_shipments(http: &fleetsync_tests::Http, ids: &[String]) -> Option<()> {
    let t = Instant::now();
    let known = fleetsync_tests::wait_for(Duration::from_secs(120), || {
        let http = http.clone();
        async move {
            let d: serde_json::Value = http.get("/v1/ops/devices").await.ok()?.json().await.ok()?;
            (d.as_array()?.len() >= ids.len()).then_some(())
        }
    })
    .await;
    if known.is_none() {
        println!("  not every device known to the hub after 120 s");
        return None;
    }
    let erp = http.credential("erp", "bench").await;
    let now = fleetsync_agent::now_ms();
    let window = serde_json::json!({
        "start": fleetsync_protocol::json::Time(now).to_rfc3339(),
        "end": fleetsync_protocol::json::Time(now + 4 * 3_600_000).to_rfc3339(),
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut puts = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (erp, gate) = (erp.clone(), gate.clone());
        let body = serde_json::json!({
            "reference": format!("SO-{i}"), "customer_id": "BENCH", "vehicle": id,
            "stops": [{"id": format!("C{i}"), "kind": "delivery", "name": "customer",
                       "location": {"lat": 52.37 + (i % 50) as f64 * 0.002,
                                    "lon": 4.90 + (i / 50) as f64 * 0.002},
                       "radius_m": 100, "window": window.clone()}]});
        puts.spawn(async move {
            let _slot = gate.acquire().await;
            erp.put_json(&format!("/v1/erp/shipments/S{i}"), &body)
                .await
                .0
        });
    }
    let mut created = 0;
    while let Some(status) = puts.join_next().await {
        created += usize::from(status.is_ok_and(|s| s == 201));
    }
    println!(
        "  {created} shipments released through the ERP API in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    (created == ids.len()).then_some(())
}

async fn through_hub_with(
    fixes: &Arc<Vec<Event>>,
    pg: Option<&str>,
    devices: usize,
    shipments: bool,
) -> Option<f64> {
    let ids: Vec<String> = (0..devices).map(|i| format!("D{i:04}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let setup = Instant::now();
    let hub = TestHub::start_with(&id_refs, pg, |cfg| {
        cfg.shipments.eta_interval_s = 5;
        if let Some(m) = cfg.mqtt.as_mut() {
            m.max_connections = devices + 64;
        }
    })
    .await;
    println!(
        "  hub started with {devices} device certificates in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    let c = Arc::new(Counters::default());
    // Clients send as soon as they are up (an idle `EventLoop::poll` cannot be woken
    // safely: it is not cancel-safe mid-write); the window starts once all are up.
    let sending = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for id in &ids {
        let (client, el) = device_client(&hub.pki, id, id, hub.running_mqtt);
        let frames = Frames {
            fixes: fixes.clone(),
            next: 0,
        };
        tasks.push(tokio::spawn(hub_device(
            id.clone(),
            client,
            el,
            frames,
            c.clone(),
            sending.clone(),
            stop.clone(),
        )));
    }
    if devices != DEVICES {
        // The shipments rows: both send for the same time before the window (the release
        // takes about 20 s), so both measure a store of the same size.
        let deadline = Instant::now() + Duration::from_secs(120);
        while c.ready.load(Ordering::Relaxed) < devices && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = Instant::now();
        if shipments {
            release_shipments(&hub.http, &ids).await?;
        }
        match SETTLE.checked_sub(before.elapsed()) {
            Some(rest) => tokio::time::sleep(rest).await,
            None => println!(
                "  (the release took longer than the {}s both rows send before their window)",
                SETTLE.as_secs()
            ),
        }
    }
    let res = measure(
        &c,
        &sending,
        |c| c.acked_events.load(Ordering::Relaxed),
        devices,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if shipments {
        println!(
            "  estimates: {} rounds, {} EST milestones, {} vehicles in the last round",
            hub.http.metric("fleetsync_hub_eta_rounds_total").await,
            hub.http.metric("fleetsync_hub_eta_facts_total").await,
            hub.http.metric("fleetsync_hub_eta_vehicles").await,
        );
    }
    let ingested = hub.http.metric("fleetsync_hub_events_ingested_total").await;
    let dups = hub
        .http
        .metric("fleetsync_hub_duplicates_dropped_total")
        .await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (per_s, el) = res?;
    println!(
        "  hub on {}: {:.0} events/s acked over {:.1} s ({} events ingested in all, {} duplicates, {} client errors)",
        if pg.is_some() { "PostgreSQL" } else { "sled" },
        per_s,
        el.as_secs_f64(),
        ingested,
        dups,
        c.errors.load(Ordering::Relaxed)
    );
    // Cancels the hub; its temp dir goes with it.
    drop(hub);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Some(per_s)
}

/// The shipments rows: 1,000 devices on sled, without and with one open shipment each.
async fn run_shipments() -> bool {
    const VEHICLES: usize = 1000;
    let fixes = Arc::new(drive(fleetsync_agent::now_ms() - 60_000, 3600, 5));
    println!(
        "ingest with shipments: {VEHICLES} devices, {BATCH}-fix Batch frames, up to {INFLIGHT} in flight each; {}s warm-up, {}s window",
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );
    // Alternately, twice each: one pair says little on a shared 2-core machine.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let Some(a) = through_hub_with(&fixes, None, VEHICLES, false).await else {
            println!("  FAILED: the row without shipments did not run");
            return false;
        };
        without.push(a);
        let Some(b) = through_hub_with(&fixes, None, VEHICLES, true).await else {
            println!("  FAILED: the row with shipments did not run");
            return false;
        };
        with.push(b);
    }
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "  WITHOUT    {:>10} events/s acked ({VEHICLES} devices, no shipments)",
        list(&without)
    );
    println!(
        "  WITH       {:>10} events/s acked (one open shipment per device, estimates every 5 s)",
        list(&with)
    );
    println!(
        "  RATIO      {:10.2}x of the means (target: at least 0.90x, correlation costing at most 10%)",
        mean(&with) / mean(&without)
    );
    true
}

async fn run() -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if std::env::args().any(|a| a == "shipments") {
        return run_shipments().await;
    }
    let fixes = Arc::new(drive(1_795_773_600_000, 3600, 5));
    let sample = frame::encode(&Uplink::Batch(Batch {
        epoch: 1,
        first_seq: 0,
        events: BoundedVec::try_from_slice(&fixes[..BATCH]).unwrap(),
    }))
    .unwrap();
    println!(
        "ingest: {DEVICES} devices, {BATCH}-fix Batch frames (~{} bytes), up to {INFLIGHT} in flight each; {}s warm-up, {}s window",
        sample.len(),
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );
    let Some((_, base)) = baseline(&fixes).await else {
        println!("  FAILED: baseline did not run");
        return false;
    };
    let Some(hub) = through_hub(&fixes, None).await else {
        println!("  FAILED: hub side did not run");
        return false;
    };
    let pg = match fleetsync_tests::pg_url() {
        Some(server) => {
            let url = fleetsync_tests::fresh_pg_db(&server).await;
            let Some(on_pg) = through_hub(&fixes, Some(&url)).await else {
                println!("  FAILED: hub on PostgreSQL did not run");
                return false;
            };
            let raw = pg_baseline(&fixes, &fleetsync_tests::fresh_pg_db(&server).await).await;
            Some((on_pg, raw))
        }
        None => None,
    };
    println!(
        "  HUB        {hub:10.0} events/s acked (mTLS gateway + broker + ingest: decode, dedup, sled, fsync, Ack)"
    );
    println!(
        "  BASELINE   {base:10.0} events/s (raw publishes into the embedded broker x {BATCH}; NO TLS, no hub)"
    );
    println!("  RATIO      {:10.2}x of the raw broker rate", hub / base);
    if let Some((on_pg, (insert, copy))) = pg {
        println!(
            "  HUB-PG     {on_pg:10.0} events/s acked (the same, store on PostgreSQL: one transaction per round)"
        );
        println!(
            "  PG-INSERT  {insert:10.0} rows/s (UNNEST insert of the same rows, round-sized transactions)"
        );
        println!(
            "  PG-COPY    {copy:10.0} rows/s (binary COPY of the same rows, round-sized transactions)"
        );
        println!(
            "  RATIOS     hub on PostgreSQL = {:.2}x the sled row, {:.2}x the faster physical baseline",
            on_pg / hub,
            on_pg / insert.max(copy)
        );
    }
    true
}

/// The physical rate of PostgreSQL for the hub's rows: (insert rows/s, copy rows/s).
async fn pg_baseline(fixes: &Arc<Vec<Event>>, url: &str) -> (f64, f64) {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    // The hub's own schema, made by opening a store on the database.
    let cfg = fleetsync_hub::config::StoreConfig::postgres(url);
    drop(fleetsync_hub::store::Store::open(&cfg).await.unwrap());
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    const ROUND_BATCHES: usize = 512;
    const ROUNDS: usize = 12;
    let bodies: Vec<Vec<u8>> = fixes
        .iter()
        .map(|e| postcard::to_stdvec(e).unwrap())
        .collect();
    let round = |r: usize, tag: &str| {
        let (mut d, mut e, mut s, mut k, mut b) = (vec![], vec![], vec![], vec![], vec![]);
        for i in 0..ROUND_BATCHES * BATCH {
            let n = r * ROUND_BATCHES * BATCH + i;
            d.push(format!("{tag}{:03}", n % DEVICES));
            e.push(1i64);
            s.push((n / DEVICES) as i64);
            k.push("position".to_string());
            b.push(bodies[n % bodies.len()].clone());
        }
        (d, e, s, k, b)
    };
    let t = Instant::now();
    let mut rows = 0usize;
    for r in 0..ROUNDS {
        let (d, e, s, k, b) = round(r, "I");
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO events (device, epoch, seq, recorded_ms, kind, body) \
             SELECT d, e, s, 0, k, b FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::bytea[]) AS t(d, e, s, k, b) \
             ON CONFLICT DO NOTHING",
            &[&d, &e, &s, &k, &b],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        rows += d.len();
    }
    let insert = rows as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut rows = 0usize;
    for r in 0..ROUNDS {
        let (d, e, s, k, b) = round(r, "C");
        let tx = client.transaction().await.unwrap();
        let sink = tx
            .copy_in("COPY events (device, epoch, seq, recorded_ms, kind, body) FROM STDIN BINARY")
            .await
            .unwrap();
        let w = BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::INT8,
                Type::INT8,
                Type::INT8,
                Type::TEXT,
                Type::BYTEA,
            ],
        );
        let mut w = std::pin::pin!(w);
        for i in 0..d.len() {
            w.as_mut()
                .write(&[&d[i], &e[i], &s[i], &0i64, &k[i], &b[i]])
                .await
                .unwrap();
        }
        w.finish().await.unwrap();
        tx.commit().await.unwrap();
        rows += d.len();
    }
    let copy = rows as f64 / t.elapsed().as_secs_f64();
    println!(
        "  PostgreSQL baseline: {ROUNDS} rounds of {} rows each way",
        ROUND_BATCHES * BATCH
    );
    (insert, copy)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if !rt.block_on(run()) {
        std::process::exit(1);
    }
}

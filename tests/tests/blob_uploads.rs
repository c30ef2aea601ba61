//! Unfinished blob uploads cannot grow the hub without bound: a device that floods the hub
//! with chunks of blobs it never finishes keeps at most its budget (its own oldest uploads
//! make room), another device's upload of a digest it names is untouched, and what is
//! left expires. Prints the hub's RSS and store size before, at the peak and after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetsync_protocol::topic::{Channel, Layout};
use fleetsync_protocol::{BlobChunk, BoundedVec, Downlink, Uplink, frame};
use fleetsync_tests::{
    Http, OPERATOR_TOKEN, Proc, device_client, device_topics, free_port, proc_status_kib, wait_for,
    wait_http_ok,
};
use rumqttc::{Event as MqttEvent, Packet, QoS};
use sha2::Digest as _;

const CHUNK: usize = 16 * 1024;
const BUDGET: u64 = 32 << 20;
const TTL_S: u64 = 30;

fn chunk(sha: [u8; 32], offset: usize, total_len: usize, data: &[u8]) -> Vec<u8> {
    frame::encode(&Uplink::BlobChunk(BlobChunk {
        sha256: sha,
        offset: offset as u32,
        total_len: total_len as u32,
        data: BoundedVec::try_from_slice(data).unwrap(),
    }))
    .unwrap()
}

/// Publishes `frames` on `device`'s blob topic; returns once the broker acked them all
/// and, if `wait_ack` names a digest, its `BlobAck` came down (or a minute passed).
/// Returns the `BlobAck`s received.
async fn publish(
    pki: &Path,
    mqtt: SocketAddr,
    device: &str,
    frames: Vec<Vec<u8>>,
    wait_ack: Option<[u8; 32]>,
) -> Vec<[u8; 32]> {
    let (client, mut el) = device_client(pki, device, device, mqtt);
    let topic = Layout::Embedded
        .topic(device, Channel::Blob)
        .unwrap()
        .to_string();
    let (_, down) = device_topics(device);
    let n = frames.len();
    let (mut acked, mut blob_acks) = (0, Vec::new());
    let mut frames = Some(frames);
    let deadline = Instant::now() + Duration::from_secs(60);
    let done =
        |acked: usize, got: &[[u8; 32]]| acked == n && wait_ack.is_none_or(|s| got.contains(&s));
    while Instant::now() < deadline && !done(acked, &blob_acks) {
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
                let (client, topic) = (client.clone(), topic.clone());
                let frames = frames.take().expect("one connection");
                tokio::spawn(async move {
                    for f in frames {
                        client
                            .publish(topic.as_str(), QoS::AtLeastOnce, false, f)
                            .await
                            .unwrap();
                    }
                });
            }
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p)))) => {
                if let Ok(Downlink::BlobAck(a)) = frame::decode::<Downlink>(&p.payload) {
                    blob_acks.push(a.sha256);
                }
            }
            Ok(Err(e)) => panic!("{device}: {e}"),
            _ => {}
        }
    }
    assert_eq!(acked, n, "{device}: not every chunk reached the broker");
    blob_acks
}

/// 12 uploads of 3.2 MiB that are never finished (38 MiB in 2,400 chunks).
fn flood(seed: u8) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for u in 0..12u8 {
        let fake = [u ^ seed; 32];
        for c in 0..200 {
            out.push(chunk(fake, c * CHUNK, 4 << 20, &[u; CHUNK]));
        }
    }
    out
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_uploads_are_owned_bounded_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let pki = fleetsync_tests::pki(dir.path(), &["V1", "V2"]);
    let (mqtt, http) = (free_port(), free_port());
    let data = dir.path().join("data");
    let cfg = dir.path().join("hub.toml");
    let text = fleetsync_tests::hub_config(&pki, &data, mqtt, http).replace(
        "[store]\n",
        &format!("[store]\npartial_blob_budget_bytes = {BUDGET}\npartial_blob_ttl_s = {TTL_S}\n"),
    );
    std::fs::write(&cfg, text).unwrap();
    let hub = Proc::spawn("fleetsync-hub", &cfg, &dir.path().join("hub.log"));
    let pid = hub.child.id();
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let mqtt_addr: SocketAddr = format!("127.0.0.1:{mqtt}").parse().unwrap();
    assert!(wait_http_ok(http_addr, "/readyz", Duration::from_secs(30)).await);
    let ops = Http::new(http_addr, OPERATOR_TOKEN);
    let rss = || proc_status_kib(pid, "VmRSS").unwrap_or(0) / 1024;
    let before = (rss(), dir_bytes(&data) >> 20);

    // V2's photo; V1 first claims its digest with other bytes.
    let photo: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let sha: [u8; 32] = sha2::Sha256::digest(&photo).into();
    let forged = vec![chunk(sha, 0, photo.len(), &[0xAA; CHUNK])];
    publish(&pki, mqtt_addr, "V1", forged, None).await;

    let started = Instant::now();
    publish(&pki, mqtt_addr, "V1", flood(0), None).await;
    eprintln!("flood of 2,400 chunks sent in {:?}", started.elapsed());

    // V2 uploads its photo whole and gets its BlobAck; the bytes are V2's.
    let real: Vec<Vec<u8>> = photo
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| chunk(sha, i * CHUNK, photo.len(), c))
        .collect();
    let started = Instant::now();
    let acks = publish(&pki, mqtt_addr, "V2", real, Some(sha)).await;
    eprintln!("V2's photo acknowledged after {:?}", started.elapsed());
    assert!(
        acks.contains(&sha),
        "V2's upload completed despite V1's claim"
    );
    let r = ops
        .get(&format!("/v1/ops/blobs/{}", hex::encode(sha)))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), photo);

    // Every flood chunk is processed once V1's uploads were evicted for room.
    let evicted = wait_for(Duration::from_secs(60), || {
        let ops = ops.clone();
        async move {
            let n = ops.metric("fleetsync_hub_blob_chunks_total").await;
            (n >= 2_401 + 13).then_some(())?;
            Some(ops.metric("fleetsync_hub_blob_uploads_evicted_total").await)
        }
    })
    .await
    .expect("the hub processed every chunk");
    // 13 uploads of V1 (the flood's 12 and the forged one) against 8 per device: the
    // five least recently fed made room.
    assert_eq!(evicted, 5);
    // A sweep (every TTL/2) reports what is held: the flood's newest 8 uploads, not the
    // 38 MiB sent.
    let want = (8, 8 * 200 * CHUNK as u64);
    let held = wait_for(Duration::from_secs(TTL_S), || {
        let ops = ops.clone();
        async move {
            let n = ops.metric("fleetsync_hub_blob_uploads_in_progress").await;
            let b = ops.metric("fleetsync_hub_blob_upload_bytes").await;
            ((n, b) == want).then_some((n, b))
        }
    })
    .await;
    assert_eq!(held, Some(want), "a sweep reported what V1 holds");
    let held = want;
    let peak = (rss(), dir_bytes(&data) >> 20);

    // Nothing more comes: they expire.
    let expired = wait_for(Duration::from_secs(3 * TTL_S), || {
        let ops = ops.clone();
        async move {
            (ops.metric("fleetsync_hub_blob_uploads_in_progress").await == 0).then_some(())?;
            Some(ops.metric("fleetsync_hub_blob_uploads_expired_total").await)
        }
    })
    .await
    .expect("the unfinished uploads expired");
    assert!(expired >= held.0, "{expired} expired of {held:?}");
    assert_eq!(ops.metric("fleetsync_hub_blob_upload_bytes").await, 0);
    let after = (rss(), dir_bytes(&data) >> 20);
    // A second flood costs no more than the first.
    publish(&pki, mqtt_addr, "V1", flood(0x80), None).await;
    wait_for(Duration::from_secs(60), || {
        let ops = ops.clone();
        async move {
            (ops.metric("fleetsync_hub_blob_chunks_total").await >= 2 * 2_400 + 14).then_some(())
        }
    })
    .await
    .expect("the hub processed the second flood");
    let second = (rss(), dir_bytes(&data) >> 20);
    eprintln!(
        "hub RSS / store MiB: before {before:?}, with the flood held {peak:?}, after expiry {after:?}, \
         after a second flood {second:?}; \
         held {} uploads of {} MiB, evicted {evicted}, expired {expired}",
        held.0,
        held.1 >> 20
    );
}

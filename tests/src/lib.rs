//! Fixtures for the end-to-end tests: a PKI, real `fleetsync-hub` and `fleetsync-agent`
//! processes (or an in-process hub), free ports, HTTP helpers, and an MQTT device client
//! with a real certificate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub,
    missing_debug_implementations
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod replicas;

pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0123456789";
pub const DRIVER_TOKEN: &str = "driver-token-for-tests-0123456789";

/// A free loopback port for a process to bind (outside the kernel's ephemeral range, see
/// `fleetsync_sim::ports`).
pub fn free_port() -> u16 {
    fleetsync_sim::ports::unused_port().unwrap()
}

/// Builds the hub and agent binaries with `profile_args` (once per `once`) and returns the
/// path of `name` beside the running test or bench executable's directory.
fn built_bin(once: &Once, profile_args: &[&str], name: &str) -> PathBuf {
    once.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet"])
            .args(profile_args)
            .args(["-p", "fleetsync-hub", "-p", "fleetsync-agent", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the binaries failed");
    });
    // target/<profile dir>/deps/<test> -> target/<profile dir>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

/// Path of a workspace debug binary, built once per test process.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    built_bin(&BUILD, &[], name)
}

/// A picture-looking file: `magic` (a PNG or JPEG header), then `n` bytes from `seed`.
pub fn image(magic: &[u8], n: usize, seed: u8) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.extend((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

/// A fresh PKI with a CA, hub certificate, and the given devices.
pub fn pki(dir: &Path, devices: &[&str]) -> PathBuf {
    let p = dir.join("pki");
    fleetsync_hub::pki::init(&p, &[]).unwrap();
    for d in devices {
        fleetsync_hub::pki::issue_device(&p, d).unwrap();
    }
    p
}

/// Hub config text for the given ports.
pub fn hub_config(pki: &Path, data: &Path, mqtt: u16, http: u16) -> String {
    format!(
        r#"
[mqtt]
listen = "127.0.0.1:{mqtt}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
handshake_timeout_ms = 3000
[http]
listen = "127.0.0.1:{http}"
[store]
path = "{data}"
[auth]
operator_token = "{OPERATOR_TOKEN}"
"#,
        ca = pki.join("ca.pem").display(),
        cert = pki.join("hub.pem").display(),
        key = pki.join("hub-key.pem").display(),
        data = data.display(),
    )
}

/// Agent config text.
pub fn agent_config(
    device: &str,
    pki: &Path,
    data: &Path,
    mqtt: u16,
    api: u16,
    quota: u64,
) -> String {
    let dev = pki.join("devices").join(device);
    format!(
        r#"
device_id = "{device}"
[hub]
url = "mqtts://localhost:{mqtt}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
ack_timeout_ms = 3000
[store]
path = "{data}"
quota_bytes = {quota}
[api]
listen = "127.0.0.1:{api}"
token = "{DRIVER_TOKEN}"
[health]
interval_s = 1
[uplink]
batch_max_delay_ms = 200
"#,
        ca = pki.join("ca.pem").display(),
        cert = dev.join("cert.pem").display(),
        key = dev.join("key.pem").display(),
        data = data.display(),
    )
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(bin_name: &str, config: &Path, log: &Path) -> Proc {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin(bin_name))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Proc {
            child,
            name: bin_name.into(),
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP client with a bearer token.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(addr: SocketAddr, token: &str) -> Http {
        Http {
            base: format!("http://{addr}"),
            token: token.into(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
    }

    /// `PUT path` with a JSON body; the status and the JSON answer (null if none).
    pub async fn put_json(&self, path: &str, body: &Value) -> (reqwest::StatusCode, Value) {
        let r = self
            .client
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `PATCH path` with a JSON body; the status and the JSON answer (null if none).
    pub async fn patch(&self, path: &str, body: &Value) -> (reqwest::StatusCode, Value) {
        let r = self
            .client
            .patch(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `DELETE path`; the status.
    pub async fn delete(&self, path: &str) -> reqwest::StatusCode {
        self.client
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// `POST path` with a JSON body; the status and the JSON answer (null if none).
    pub async fn post(&self, path: &str, body: &Value) -> (reqwest::StatusCode, Value) {
        let r = self.post_json(path, body).await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits (30 s at most) until the hub knows `device`: it has been heard from.
    pub async fn wait_device_known(&self, device: &str) {
        wait_for(Duration::from_secs(30), || {
            let ops = self.clone();
            async move {
                let d: Value = ops.get("/v1/ops/devices").await.ok()?.json().await.ok()?;
                d.as_array()?
                    .iter()
                    .any(|d| d["id"] == device)
                    .then_some(())
            }
        })
        .await
        .unwrap_or_else(|| panic!("{device} never reached the hub"));
    }

    /// Makes a credential of `role` named `name` (as this operator) and returns a client
    /// that uses its token.
    pub async fn credential(&self, role: &str, name: &str) -> Http {
        let (status, c) = self
            .post(
                "/v1/ops/credentials",
                &serde_json::json!({"role": role, "name": name}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{c}");
        self.with_token(c["token"].as_str().unwrap())
    }

    /// The same client with another bearer token.
    pub fn with_token(&self, token: &str) -> Http {
        Http {
            token: token.to_string(),
            ..self.clone()
        }
    }

    /// Sends `V1` a job `job_id` of one stop (`s1`, shipment `shp-1`) through the
    /// operator API and waits until the agent acknowledged it.
    pub async fn one_stop_job(&self, job_id: &str) {
        let job = serde_json::json!({
            "id": job_id, "version": 1,
            "stops": [{"id": "s1", "name": "Bakery", "shipment_ids": ["shp-1"],
                       "fence": {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 80}}]
        });
        assert_eq!(self.put_assignment("V1", &job).await, 202);
        self.wait_assignment_acked("V1", 1).await;
    }

    /// `PUT /v1/ops/devices/{device}/assignment`; returns the status.
    pub async fn put_assignment(&self, device: &str, body: &Value) -> reqwest::StatusCode {
        let r = self
            .client
            .put(format!("{}/v1/ops/devices/{device}/assignment", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        r.status()
    }

    /// Waits (30 s at most) until the hub shows `version` of `device`'s assignment
    /// acknowledged; returns what `GET .../assignment` answered then.
    pub async fn wait_assignment_acked(&self, device: &str, version: u32) -> Value {
        let path = format!("/v1/ops/devices/{device}/assignment");
        wait_for(Duration::from_secs(30), || {
            let (ops, path) = (self.clone(), path.clone());
            async move {
                let v: Value = ops.get(&path).await.ok()?.json().await.ok()?;
                (v["acknowledged"] == true && v["acked_version"] == version).then_some(v)
            }
        })
        .await
        .unwrap_or_else(|| panic!("{device}: assignment v{version} never acknowledged"))
    }

    /// The agent's undelivered events (both lanes), from its `/v1/status`.
    pub async fn backlog(&self) -> Option<u64> {
        let s: Value = self.get("/v1/status").await.ok()?.json().await.ok()?;
        Some(
            s["backlog"]["critical"]["events"].as_u64()?
                + s["backlog"]["telemetry"]["events"].as_u64()?,
        )
    }

    /// Waits (`timeout` at most) until the agent's backlog is empty; whether it was.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        wait_for(timeout, || {
            let agent = self.clone();
            async move { (agent.backlog().await? == 0).then_some(()) }
        })
        .await
        .is_some()
    }

    /// Every event of `device` at the hub, following `next` cursors.
    pub async fn all_events(&self, device: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self
                .get_json(&format!(
                    "/v1/ops/devices/{device}/events?limit=1000&after={after}"
                ))
                .await;
            out.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(n) => after = n.to_string(),
                None => return out,
            }
        }
    }

    /// Reads a counter from /metrics.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics").await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the HTTP server at `addr` answers `path` with 200.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let http = Http::new(addr, "");
    wait_for(timeout, || {
        let http = http.clone();
        async move {
            http.get(path)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await
    .is_some()
}

/// An in-process hub with its own PKI and data dir.
pub struct TestHub {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub running_mqtt: SocketAddr,
    pub http: Http,
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl TestHub {
    pub async fn start(devices: &[&str]) -> TestHub {
        Self::start_on(devices, None).await
    }

    /// A hub on PostgreSQL at `url` (sled in its temp dir when `None`).
    pub async fn start_on(devices: &[&str], url: Option<&str>) -> TestHub {
        Self::start_with(devices, url, |_| {}).await
    }

    /// The same, with the config changed by `f` first.
    pub async fn start_with(
        devices: &[&str],
        url: Option<&str>,
        f: impl FnOnce(&mut fleetsync_hub::Config),
    ) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), devices);
        let text = hub_config(&pki, &dir.path().join("hub"), 0, 0);
        let mut cfg = fleetsync_hub::Config::parse(&text).unwrap();
        f(&mut cfg);
        if let Some(url) = url {
            cfg.store = fleetsync_hub::config::StoreConfig::postgres(url);
        }
        cfg.resolve_paths(dir.path());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = fleetsync_hub::start(cfg, shutdown.clone()).await.unwrap();
        TestHub {
            running_mqtt: running.mqtt_addr,
            http: Http::new(running.http_addr, OPERATOR_TOKEN),
            pki,
            dir,
            shutdown,
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The embedded layout's (up, down) topics of `device`.
pub fn device_topics(device: &str) -> (String, String) {
    use fleetsync_protocol::topic::{Channel, Layout};
    let t = |ch| Layout::Embedded.topic(device, ch).unwrap().to_string();
    (t(Channel::Up), t(Channel::Down))
}

/// An MQTT device client using `device`'s certificate from `pki`.
pub fn device_client(
    pki: &Path,
    cert_device: &str,
    client_id: &str,
    hub: SocketAddr,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let dev = pki.join("devices").join(cert_device);
    let tls = fleetsync_agent::client_tls(
        &pki.join("ca.pem"),
        &dev.join("cert.pem"),
        &dev.join("key.pem"),
    )
    .unwrap();
    let mut opts = rumqttc::MqttOptions::new(client_id, "localhost", hub.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    rumqttc::AsyncClient::new(opts, 64)
}

/// Publishes one batch of `device` (epoch 1, from `first_seq`) with its certificate, as a
/// device would, and waits for the hub's ack of it (30 s at most).
pub async fn publish_batch(
    hub: &TestHub,
    device: &str,
    first_seq: u64,
    events: &[fleetsync_protocol::Event],
) {
    use fleetsync_protocol::topic::Channel;
    use fleetsync_protocol::{Batch, BoundedVec, Downlink, Uplink, frame};
    let frame = frame::encode(&Uplink::Batch(Batch {
        epoch: 1,
        first_seq,
        events: BoundedVec::try_from_slice(events).unwrap(),
    }))
    .unwrap();
    let acked = |d: &Downlink| matches!(d, Downlink::Ack(a) if a.ranges.iter().any(|r| r.first <= first_seq && first_seq <= r.last));
    publish_until(
        hub,
        device,
        Channel::Up,
        frame,
        acked,
        &format!("batch at seq {first_seq}"),
    )
    .await;
}

/// Publishes one blob of at most 16 KiB as a single chunk, as `device`, and waits for its
/// `BlobAck` (30 s at most); its sha256.
pub async fn publish_blob(hub: &TestHub, device: &str, data: &[u8]) -> [u8; 32] {
    use fleetsync_protocol::topic::Channel;
    use fleetsync_protocol::{BlobChunk, BoundedVec, Downlink, Uplink, frame};
    use sha2::Digest;
    let sha: [u8; 32] = sha2::Sha256::digest(data).into();
    let frame = frame::encode(&Uplink::BlobChunk(BlobChunk {
        sha256: sha,
        offset: 0,
        total_len: data.len() as u32,
        data: BoundedVec::try_from_slice(data).unwrap(),
    }))
    .unwrap();
    let acked = |d: &Downlink| matches!(d, Downlink::BlobAck(a) if a.sha256 == sha);
    publish_until(hub, device, Channel::Blob, frame, acked, "blob").await;
    sha
}

/// Publishes `frame` on `device`'s `channel` with its certificate, as a device would,
/// until the hub sends a downlink `acked` says is its ack (30 s at most).
async fn publish_until(
    hub: &TestHub,
    device: &str,
    channel: fleetsync_protocol::topic::Channel,
    frame: Vec<u8>,
    acked: impl Fn(&fleetsync_protocol::Downlink) -> bool,
    what: &str,
) {
    use fleetsync_protocol::topic::{Channel, Layout};
    use fleetsync_protocol::{Downlink, frame};
    use rumqttc::{Event as MqttEvent, Packet, QoS};
    let (client, mut el) = device_client(&hub.pki, device, device, hub.running_mqtt);
    let topic = |ch| Layout::Embedded.topic(device, ch).unwrap().to_string();
    let (up, down) = (topic(channel), topic(Channel::Down));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), el.poll()).await {
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(down.as_str(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::SubAck(_)))) => {
                client
                    .publish(up.as_str(), QoS::AtLeastOnce, false, frame.clone())
                    .await
                    .unwrap();
            }
            Ok(Ok(MqttEvent::Incoming(Packet::Publish(p))))
                if frame::decode::<Downlink>(&p.payload).is_ok_and(|d| acked(&d)) =>
            {
                let _ = client.disconnect().await;
                return;
            }
            Ok(Err(e)) => panic!("{device}: {e}"),
            _ => {}
        }
    }
    panic!("{device}: {what} never acked");
}

/// An `[[erp]]` named "sap" at `base_url` with a test's quick retries (backoff 50 to
/// 400 ms, the breaker open 1.5 s after 3 failures) and no authorization header.
pub fn erp_config(base_url: String) -> fleetsync_hub::config::ErpConfig {
    fleetsync_hub::config::ErpConfig {
        name: "sap".into(),
        base_url,
        auth_header: None,
        auth_header_env: None,
        rate_per_s: 50.0,
        burst: 4,
        timeout_ms: 2000,
        mapping_version: None,
        max_attempts: 50,
        max_age_s: 3600,
        backoff_ms: 50,
        backoff_cap_ms: 400,
        breaker_failures: 3,
        breaker_open_ms: 1500,
        ca: None,
    }
}

/// A delivered POD of `shipment` at `stop` by V1's driver, received by "M. de Vries",
/// geo-stamped at `geo`, with `signature` (PNG) and one `photo` (JPEG), which are
/// published to the hub as V1's blobs first.
#[allow(clippy::too_many_arguments)]
pub async fn pod_with_evidence(
    hub: &TestHub,
    shipment: &str,
    stop: &str,
    geo: (f64, f64),
    time_ms: u64,
    signature: &[u8],
    photo: &[u8],
) -> fleetsync_protocol::Event {
    use fleetsync_protocol::{
        BlobRef, Body, BoundedString, BoundedVec, Event, MediaType, Outcome, Pod, Point,
    };
    let sig_sha = publish_blob(hub, "V1", signature).await;
    let photo_sha = publish_blob(hub, "V1", photo).await;
    let id = |s: &str| BoundedString::try_from_str(s).unwrap();
    Event {
        time_ms,
        body: Body::Pod(Pod {
            pod_id: id(&format!("pod-{shipment}")),
            shipment_id: id(shipment),
            stop_id: id(stop),
            outcome: Outcome::Delivered,
            reason_code: None,
            recipient_name: BoundedString::try_from_str("M. de Vries").unwrap(),
            notes: None,
            signature: Some(BlobRef {
                sha256: sig_sha,
                len: signature.len() as u32,
                media: MediaType::Png,
            }),
            photos: BoundedVec::try_from_slice(&[BlobRef {
                sha256: photo_sha,
                len: photo.len() as u32,
                media: MediaType::Jpeg,
            }])
            .unwrap(),
            geo: Some(Point {
                lat_e7: (geo.0 * 1e7) as i32,
                lon_e7: (geo.1 * 1e7) as i32,
            }),
        }),
    }
}

/// A good GPS fix at `at` (lat, lon) at `time_ms`, driving (10 m/s, 9 satellites).
pub fn fix(at: (f64, f64), time_ms: u64) -> fleetsync_protocol::Event {
    use fleetsync_protocol::{Body, Event, Fix};
    Event {
        time_ms,
        body: Body::Position(Fix {
            lat_e7: (at.0 * 1e7) as i32,
            lon_e7: (at.1 * 1e7) as i32,
            speed_cmps: Some(1000),
            heading_ddeg: Some(0),
            hdop_d: Some(9),
            satellites: Some(9),
        }),
    }
}

/// A trip event (arrival, departure) at `stop`.
pub fn trip_event(
    kind: fleetsync_protocol::TripKind,
    stop: &str,
    time_ms: u64,
) -> fleetsync_protocol::Event {
    fleetsync_protocol::Event {
        time_ms,
        body: fleetsync_protocol::Body::Trip(fleetsync_protocol::Trip {
            kind,
            stop_id: Some(fleetsync_protocol::BoundedString::try_from_str(stop).unwrap()),
        }),
    }
}

/// Directory-qualified path of an optimised workspace binary (the `bench` profile: the
/// release settings, not stripped), built once per process. Benchmarks use this: debug
/// binaries say nothing about speed or memory.
pub fn release_bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    built_bin(&BUILD, &["--profile", "bench"], name)
}

impl Proc {
    /// Like [`Proc::spawn`], with an explicit executable.
    pub fn spawn_exe(exe: &Path, config: &Path, log: &Path) -> Proc {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=off")
            // As deploy/systemd sets it for the agent: one malloc arena keeps a gateway's
            // RSS down (the hub allocates with jemalloc, which ignores it).
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Proc {
            child,
            name: exe.display().to_string(),
        }
    }
}

/// A `kB` field of `/proc/PID/status` (`VmHWM` = peak RSS, `VmRSS` = current), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// A deterministic 1 Hz drive starting at `start_ms`: town blocks with turns and traffic
/// lights, then highway; speed changes and receiver noise (as in the protocol's codec
/// benchmark).
pub fn drive(start_ms: u64, seconds: usize, seed: u64) -> Vec<fleetsync_protocol::Event> {
    use fleetsync_protocol::{Body, Event, Fix};
    // xorshift64*
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut unit = move || (next() >> 11) as f64 / (1u64 << 53) as f64;
    let (mut lat, mut lon) = (52.370_216_f64, 4.895_168_f64);
    let (mut heading, mut speed, mut target) = (90.0f64, 0.0f64, 13.0f64);
    let (mut stopped_for, mut to_turn, mut turning) = (0u32, 250.0f64, 0.0f64);
    let (mut hdop, mut sats) = (0.9f64, 10u8);
    let mut out = Vec::with_capacity(seconds);
    for i in 0..seconds {
        let mut gauss = || (0..6).map(|_| unit()).sum::<f64>() - 3.0;
        let g = [gauss(), gauss(), gauss(), gauss()];
        let highway = (i / 3600) % 2 == 1;
        let cruise = |u: f64| {
            if highway {
                26.0 + 7.0 * u
            } else {
                7.0 + 7.0 * u
            }
        };
        if stopped_for > 0 {
            stopped_for -= 1;
            target = if stopped_for == 0 {
                cruise(unit())
            } else {
                0.0
            };
        } else if !highway && unit() < 1.0 / 90.0 {
            stopped_for = (15.0 + 45.0 * unit()) as u32;
        } else if unit() < 0.05 {
            target = cruise(unit());
        }
        speed = (speed + (target - speed).clamp(-3.0, 2.0) + 0.05 * g[0]).max(0.0);
        if speed < 0.3 && target == 0.0 {
            speed = 0.0;
        }
        to_turn -= speed;
        if to_turn <= 0.0 {
            let u = unit();
            turning = if highway {
                -2.0 + 4.0 * u
            } else {
                [-90.0, 90.0, 0.0][((u * 3.0) as usize).min(2)]
            };
            to_turn = if highway {
                800.0 + 2200.0 * unit()
            } else {
                120.0 + 280.0 * unit()
            };
        }
        if speed > 0.5 {
            let step = turning.clamp(-15.0, 15.0);
            heading = (heading + step + 0.5 * g[1]).rem_euclid(360.0);
            turning -= step;
        }
        lat += speed * heading.to_radians().cos() / 111_320.0;
        lon += speed * heading.to_radians().sin() / (111_320.0 * lat.to_radians().cos());
        if unit() < 0.02 {
            hdop = 0.7 + 0.9 * unit();
        }
        if unit() < 0.01 {
            sats = (i32::from(sats) + if unit() < 0.5 { -1 } else { 1 }).clamp(4, 16) as u8;
        }
        out.push(Event {
            time_ms: start_ms + i as u64 * 1000,
            body: Body::Position(Fix {
                lat_e7: ((lat + 0.3 * g[2] / 111_320.0) * 1e7).round() as i32,
                lon_e7: ((lon + 0.3 * g[3] / 111_320.0) * 1e7).round() as i32,
                speed_cmps: Some((speed * 100.0).round() as u16),
                heading_ddeg: Some((heading * 10.0).round() as u16 % 3600),
                hdop_d: Some((hdop * 10.0).round() as u16),
                satellites: Some(sats),
            }),
        });
    }
    out
}

/// One hub and one agent (`V1`) as processes-to-be: a temporary directory with a PKI, both
/// configs on free ports, and where their logs go. Tests start, kill and restart them.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub hub_cfg: PathBuf,
    pub agent_cfg: PathBuf,
    pub hub_addr: SocketAddr,
    pub api_addr: SocketAddr,
}

impl Stack {
    /// Writes the configs; the agent's store gets `quota` bytes.
    pub fn new(quota: u64) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), &["V1"]);
        let (mqtt, http, api) = (free_port(), free_port(), free_port());
        let hub_cfg = dir.path().join("hub.toml");
        std::fs::write(
            &hub_cfg,
            hub_config(&pki, &dir.path().join("hub-data"), mqtt, http),
        )
        .unwrap();
        let agent_cfg = dir.path().join("agent.toml");
        let agent = agent_config("V1", &pki, &dir.path().join("agent-data"), mqtt, api, quota);
        std::fs::write(&agent_cfg, agent).unwrap();
        Stack {
            hub_addr: SocketAddr::from(([127, 0, 0, 1], http)),
            api_addr: SocketAddr::from(([127, 0, 0, 1], api)),
            pki,
            hub_cfg,
            agent_cfg,
            dir,
        }
    }

    /// Puts the hub on PostgreSQL at `url` instead of its sled directory.
    pub fn use_postgres(&self, url: &str) {
        let text = std::fs::read_to_string(&self.hub_cfg).unwrap();
        let start = text.find("[store]\npath = ").unwrap();
        let end = start + text[start..].find("\n[auth]").unwrap();
        let text = format!("{}[store]\nurl = \"{url}\"{}", &text[..start], &text[end..]);
        std::fs::write(&self.hub_cfg, text).unwrap();
    }

    /// Appends sections to the agent's config (before the agent starts).
    pub fn add_agent_config(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.agent_cfg).unwrap();
        text.push_str(toml);
        std::fs::write(&self.agent_cfg, text).unwrap();
    }

    /// Starts the hub process and waits until it is ready.
    pub async fn start_hub(&self) -> Proc {
        self.start(
            "fleetsync-hub",
            &self.hub_cfg,
            "hub.log",
            self.hub_addr,
            "/readyz",
        )
        .await
    }

    /// Starts the agent process and waits until its API answers.
    pub async fn start_agent(&self) -> Proc {
        self.start(
            "fleetsync-agent",
            &self.agent_cfg,
            "agent.log",
            self.api_addr,
            "/healthz",
        )
        .await
    }

    /// Starts `bin` with `config`, logging to `log` beside the configs, and waits (30 s at
    /// most) until `addr` answers `path` with success.
    async fn start(
        &self,
        bin: &str,
        config: &Path,
        log: &str,
        addr: SocketAddr,
        path: &str,
    ) -> Proc {
        let log = self.dir.path().join(log);
        let p = Proc::spawn(bin, config, &log);
        assert!(
            wait_http_ok(addr, path, Duration::from_secs(30)).await,
            "{bin} did not start (log: {})",
            log.display()
        );
        p
    }

    /// The operator API.
    pub fn ops(&self) -> Http {
        Http::new(self.hub_addr, OPERATOR_TOKEN)
    }

    /// The agent's local API with the driver's token.
    pub fn driver(&self) -> Http {
        Http::new(self.api_addr, DRIVER_TOKEN)
    }
}

/// The PostgreSQL server the PostgreSQL tests use: `FLEETSYNC_TEST_PG_URL` (a URL of any
/// database on it, e.g. `postgres://postgres@127.0.0.1:5432/postgres`). Unset: `None`
/// with a note on stderr, so a developer without PostgreSQL can run the rest; in CI
/// (`CI` set) unset is a failure, never a silent skip.
pub fn pg_url() -> Option<String> {
    match std::env::var("FLEETSYNC_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "FLEETSYNC_TEST_PG_URL is not set in CI: .ci/run must set it"
            );
            eprintln!("SKIPPED: FLEETSYNC_TEST_PG_URL is not set; PostgreSQL tests not run");
            None
        }
    }
}

/// `url` with its database name replaced by `db`.
pub fn pg_url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Creates a fresh, empty database on the server of `url` and returns its URL. Names are
/// unique per process and call, so tests running in parallel never share one.
pub async fn fresh_pg_db(url: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let name = format!("fleetsync_t{}_{n}_{nanos}", std::process::id());
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to FLEETSYNC_TEST_PG_URL {url}: {e}"));
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    pg_url_with_db(url, &name)
}

/// Runs SQL on `url` (for tests that look at or disturb the database directly).
pub async fn pg_exec(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let rows = client.query(sql, &[]).await.unwrap();
    drop(client);
    let _ = task.await;
    rows
}

//! Flash wear: what the agent writes to the device per GPS fix at 1 Hz, with the link up
//! and while offline, against the payload bytes per fix.
//!
//! `cargo bench -p fleetsync-tests --bench wear` (`FLEETSYNC_WEAR_SECONDS`, default 600):
//!
//! Side by side in one run (the same disk, the same moment), each fed one fix per
//! wall-clock second of a realistic drive, GPS time = wall time (real 1 Hz, not
//! compressed: the agent commits each fix on its own round at 1 Hz, and a faster feed
//! would share rounds and write less per fix):
//! - `online`: an agent process whose hub is up: each fix is read from its NMEA stream
//!   (nmea+tcp, RMC + GGA), stored, sent in a batch, acked and deleted;
//! - `offline`: an agent process whose hub address does not answer: fixes pile up;
//! - `baseline`: a thread of this bench appending each fix's stored record (the same
//!   12-byte key + postcard value the agent's store holds) to a plain file, `fdatasync`
//!   after each: the least any log that makes each fix durable on its own writes.
//!
//! Bytes written are `write_bytes` of `/proc/PID/io` (`/proc/thread-self/io` for the
//! baseline): bytes the process dirtied in the page cache, so whole 4 KiB pages, without
//! the ext4 journal's own writes. They are taken over the measured window (after a 20 s
//! warm-up) per fix the agent took (its `/v1/status` `gps.fixes`), and per agent thread
//! (`/proc/PID/task/TID/io`, by thread name), to say who writes.
//! Payload per fix: the wire bytes of 60-fix batches of the same drive (postcard frames,
//! as the uplink sends them) and the stored bytes per fix (key + value).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetsync_protocol::{Batch, Body, BoundedVec, Event, Uplink};
use fleetsync_sim::route::SimFix;
use fleetsync_tests::{
    DRIVER_TOKEN, Http, Proc, drive, free_port, hub_config, pki, release_bin, wait_http_ok,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const WARMUP_S: u64 = 20;
const BATCH: usize = 60;

fn seconds() -> u64 {
    std::env::var("FLEETSYNC_WEAR_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// `write_bytes` of a `/proc/.../io` file.
fn write_bytes(io_path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(io_path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes written per thread name of `pid` (threads alive now).
fn by_thread(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let Some(w) = write_bytes(&p.join("io").display().to_string()) {
            *out.entry(name).or_default() += w;
        }
    }
    out
}

/// An agent config: the agent's own defaults (health every 60 s, its batching, the
/// example's 64 MiB quota), an NMEA GPS stream, the hub at `mqtt`.
fn agent_config(device: &str, pki: &Path, data: &Path, mqtt: u16, api: u16, gps: u16) -> String {
    let dev = pki.join("devices").join(device);
    format!(
        r#"
device_id = "{device}"
[hub]
url = "mqtts://localhost:{mqtt}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[store]
path = "{data}"
quota_bytes = 67108864
[api]
listen = "127.0.0.1:{api}"
token = "{DRIVER_TOKEN}"
[gps]
source = "nmea+tcp://127.0.0.1:{gps}"
"#,
        ca = pki.join("ca.pem").display(),
        cert = dev.join("cert.pem").display(),
        key = dev.join("key.pem").display(),
        data = data.display(),
    )
}

struct Agent {
    name: &'static str,
    proc: Proc,
    api: Http,
    gps: TcpListener,
    sock: Option<TcpStream>,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    fn io(&self) -> u64 {
        write_bytes(&format!("/proc/{}/io", self.pid())).unwrap_or(0)
    }

    async fn fixes(&self) -> u64 {
        self.api.get_json("/v1/status").await["gps"]["fixes"]
            .as_u64()
            .unwrap_or(0)
    }

    async fn status(&self) -> serde_json::Value {
        self.api.get_json("/v1/status").await
    }
}

fn sim_fix(ev: &Event, time_ms: u64) -> SimFix {
    let Body::Position(f) = &ev.body else {
        panic!("drive() makes positions")
    };
    SimFix {
        time_ms,
        lat: f64::from(f.lat_e7) / 1e7,
        lon: f64::from(f.lon_e7) / 1e7,
        speed_mps: f64::from(f.speed_cmps.unwrap_or(0)) / 100.0,
        heading_deg: f64::from(f.heading_ddeg.unwrap_or(0)) / 10.0,
    }
}

/// The stored record of a fix: the agent's key (epoch u32 BE ++ seq u64 BE) and value
/// (postcard of the event).
fn record(seq: u64, ev: &Event) -> Vec<u8> {
    let mut r = Vec::with_capacity(48);
    r.extend_from_slice(&1u32.to_be_bytes());
    r.extend_from_slice(&seq.to_be_bytes());
    r.extend_from_slice(&postcard::to_allocvec(ev).unwrap());
    r
}

/// Wire bytes per fix of 60-fix batches of `events` (postcard frames of `Uplink::Batch`).
fn wire_bytes_per_fix(events: &[Event]) -> f64 {
    let mut bytes = 0usize;
    let mut fixes = 0usize;
    for (k, chunk) in events.chunks(BATCH).enumerate() {
        let mut evs: BoundedVec<Event, { fleetsync_protocol::limits::MAX_BATCH_EVENTS }> =
            BoundedVec::new();
        for e in chunk {
            evs.push(e.clone()).unwrap();
        }
        let b = Uplink::Batch(Batch {
            epoch: 1,
            first_seq: (k * BATCH) as u64,
            events: evs,
        });
        bytes += fleetsync_protocol::frame::encode(&b).unwrap().len();
        fixes += chunk.len();
    }
    bytes as f64 / fixes as f64
}

/// The baseline writer: one record per tick, `fdatasync` after each, until `stop`.
/// Returns (bytes written in the window, records in the window, record bytes).
fn baseline(
    path: &Path,
    records: Vec<Vec<u8>>,
    start: Instant,
    window: (Duration, Duration),
) -> (u64, u64, u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let io = || write_bytes("/proc/thread-self/io").unwrap();
    let (mut at_start, mut n, mut payload) = (None, 0u64, 0u64);
    for (i, r) in records.iter().enumerate() {
        let due = start + Duration::from_secs(i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = start.elapsed();
        if t >= window.1 {
            return (io() - at_start.unwrap_or(0), n, payload);
        }
        if t >= window.0 && at_start.is_none() {
            at_start = Some(io());
        }
        f.write_all(r).unwrap();
        f.sync_data().unwrap();
        if at_start.is_some() {
            n += 1;
            payload += r.len() as u64;
        }
    }
    (io() - at_start.unwrap_or(0), n, payload)
}

async fn run() -> bool {
    let secs = seconds();
    println!(
        "wear: two agents fed 1 fix/s for {WARMUP_S} s warm-up + {secs} s measured \
         (real 1 Hz), one with its hub up, one offline, and a plain fdatasync-per-fix log"
    );
    let hub_exe = release_bin("fleetsync-hub");
    let agent_exe = release_bin("fleetsync-agent");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let pki = pki(dir.path(), &["V1", "V2"]);
    let (mqtt, http_port) = (free_port(), free_port());
    let hub_cfg = dir.path().join("hub.toml");
    std::fs::write(
        &hub_cfg,
        hub_config(&pki, &dir.path().join("hub-data"), mqtt, http_port),
    )
    .unwrap();
    let hub = Proc::spawn_exe(&hub_exe, &hub_cfg, &dir.path().join("hub.log"));
    let hub_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    if !wait_http_ok(hub_addr, "/readyz", Duration::from_secs(30)).await {
        println!("  FAILED: hub did not become ready");
        return false;
    }
    let dead_port = free_port(); // nothing listens there: the offline agent's hub
    let mut agents = Vec::new();
    for (name, device, port) in [("online", "V1", mqtt), ("offline", "V2", dead_port)] {
        let gps = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gps_port = gps.local_addr().unwrap().port();
        let api = free_port();
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            agent_config(
                device,
                &pki,
                &dir.path().join(format!("{name}-data")),
                port,
                api,
                gps_port,
            ),
        )
        .unwrap();
        let proc = Proc::spawn_exe(&agent_exe, &cfg, &dir.path().join(format!("{name}.log")));
        let api_addr: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
        agents.push(Agent {
            name,
            proc,
            api: Http::new(api_addr, DRIVER_TOKEN),
            gps,
            sock: None,
        });
    }
    for a in &mut agents {
        let Ok(accepted) = tokio::time::timeout(Duration::from_secs(60), a.gps.accept()).await
        else {
            let log = std::fs::read_to_string(dir.path().join(format!("{}.log", a.name)))
                .unwrap_or_default();
            println!(
                "  FAILED: the {} agent did not connect to its GPS stream in 60 s; its log:\n{log}",
                a.name
            );
            return false;
        };
        let (s, _) = accepted.unwrap();
        s.set_nodelay(true).unwrap();
        a.sock = Some(s);
    }

    let total = WARMUP_S + secs + 2;
    let start_ms = fleetsync_agent::now_ms();
    let day = drive(start_ms, total as usize, 11);
    let wire = wire_bytes_per_fix(&day);
    let stored: Vec<Vec<u8>> = day
        .iter()
        .enumerate()
        .map(|(i, e)| record(i as u64, e))
        .collect();
    let stored_per_fix = stored.iter().map(|r| r.len() as f64).sum::<f64>() / stored.len() as f64;

    let start = Instant::now();
    let window = (
        Duration::from_secs(WARMUP_S),
        Duration::from_secs(WARMUP_S + secs),
    );
    let base_path = dir.path().join("baseline.log");
    let base = std::thread::spawn(move || baseline(&base_path, stored, start, window));

    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(start),
        Duration::from_secs(1),
    );
    let mut at_start: Vec<(u64, u64, BTreeMap<String, u64>)> = Vec::new();
    let mut at_end: Vec<(u64, u64, BTreeMap<String, u64>)> = Vec::new();
    let mut used_start = Vec::new();
    for (i, ev) in day.iter().enumerate() {
        tick.tick().await;
        let t = start.elapsed();
        if t >= window.0 && at_start.is_empty() {
            for a in &agents {
                at_start.push((a.io(), a.fixes().await, by_thread(a.pid())));
                used_start.push(a.status().await["disk"]["used_bytes"].as_u64().unwrap_or(0));
            }
        }
        if t >= window.1 {
            break;
        }
        // GPS time = wall time: the fix's time is now.
        let now = fleetsync_agent::now_ms();
        let text = fleetsync_sim::nmea::sentences(&sim_fix(ev, now));
        for a in &mut agents {
            a.sock
                .as_mut()
                .unwrap()
                .write_all(text.as_bytes())
                .await
                .unwrap();
        }
        if i % 60 == 0 {
            print!(".");
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    // The last fix is taken once the next arrives or the stream idles (1.5 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut statuses = Vec::new();
    for a in &agents {
        at_end.push((a.io(), a.fixes().await, by_thread(a.pid())));
        statuses.push(a.status().await);
    }
    let (base_bytes, base_n, base_payload) = base.join().unwrap();
    let base_per_fix = base_bytes as f64 / base_n.max(1) as f64;

    println!(
        "  payload per fix: {wire:.1} B on the wire (60-fix batches, delta-encoded), \
         {stored_per_fix:.1} B stored (key + value)"
    );
    println!(
        "  BASELINE  plain log, fdatasync per fix: {base_per_fix:8.0} B written per fix \
         ({base_n} fixes, {:.1} B payload each): {:.0}x the stored bytes",
        base_payload as f64 / base_n.max(1) as f64,
        base_per_fix / stored_per_fix
    );
    let mut ok = true;
    for (k, a) in agents.iter().enumerate() {
        let (io0, fix0, thr0) = &at_start[k];
        let (io1, fix1, thr1) = &at_end[k];
        let fixes = fix1 - fix0;
        if fixes == 0 {
            println!("  FAILED: {} took no fixes", a.name);
            ok = false;
            continue;
        }
        let per_fix = (io1 - io0) as f64 / fixes as f64;
        let s = &statuses[k];
        let used = s["disk"]["used_bytes"].as_u64().unwrap_or(0);
        println!(
            "  {:<8}  agent: {per_fix:8.0} B written per fix ({fixes} fixes, {:.2} MiB in {secs} s; \
             {:.0} MiB per hour at 1 Hz) = {:.0}x the wire payload, {:.0}x the stored bytes, \
             {:.2}x the baseline; store {} -> {} logical bytes, backlog {}, connected {}",
            a.name,
            (io1 - io0) as f64 / 1048576.0,
            per_fix * 3600.0 / 1048576.0,
            per_fix / wire,
            per_fix / stored_per_fix,
            per_fix / base_per_fix,
            used_start[k],
            used,
            s["backlog"]["telemetry"]["events"],
            s["connected"],
        );
        // Who wrote: per thread name, over the window (threads alive at both ends).
        let mut rows: Vec<(String, u64)> = thr1
            .iter()
            .map(|(name, w)| {
                (
                    name.clone(),
                    w - thr0.get(name).copied().unwrap_or(0).min(*w),
                )
            })
            .filter(|(_, w)| *w > 0)
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        let listed: u64 = rows.iter().map(|r| r.1).sum();
        let mut parts: Vec<String> = rows
            .iter()
            .map(|(n, w)| format!("{n} {:.0} B/fix", *w as f64 / fixes as f64))
            .collect();
        let rest = (io1 - io0).saturating_sub(listed);
        if rest > 0 {
            parts.push(format!(
                "threads gone since {:.0} B/fix",
                rest as f64 / fixes as f64
            ));
        }
        println!("            by thread: {}", parts.join(", "));
    }
    drop(agents);
    drop(hub);
    ok
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if !rt.block_on(run()) {
        std::process::exit(1);
    }
}

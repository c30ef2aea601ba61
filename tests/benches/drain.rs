//! A day offline at 1 Hz, then the link comes back: how fast does the agent drain its
//! backlog to the hub, and how much memory do both need?
//!
//! `cargo bench -p fleetsync-tests --bench drain`:
//!
//! 1. builds the hub and agent binaries with the `bench` profile (release settings);
//! 2. pre-fills an agent store with 86,400 fixes of a realistic drive (yesterday, 1 Hz) and
//!    500 exceptions, through the `Store` library (the agent's own on-disk format);
//! 3. starts a hub and then the agent as processes, and times agent start -> its
//!    `GET /v1/status` backlog is 0 (every event acked by the hub), sampling `VmHWM`;
//! 4. checks the hub holds every pre-filled event exactly once (plus health events).
//!
//! It does this twice in one run, on two copies of the pre-filled store: first without
//! the lanes' counts (as every store was before them: the agent's open reads every event,
//! which leaves sled holding every leaf node), then as written (open takes the counts),
//! and reports the agent's peak RSS of both and their ratio.
//!
//! Targets: drain < 10 s, agent peak RSS < 24 MiB (was 32 MiB; 29.4 MiB measured before
//! the counts). Exits non-zero if a drain does not finish within `DRAIN_LIMIT` or the
//! hub's events do not match.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetsync_agent::store::{Store, StoreConfig};
use fleetsync_protocol::{Body, BoundedString, Event, Exception};
use fleetsync_tests::{
    DRIVER_TOKEN, Http, OPERATOR_TOKEN, Proc, agent_config, drive, free_port, hub_config, pki,
    proc_status_kib, release_bin, wait_http_ok,
};

const POSITIONS: usize = 86_400;
/// Exceptions in the day; `FLEETSYNC_BENCH_EXCEPTIONS=0` isolates the positions (a
/// diagnosis aid: critical events split the telemetry lane's seq runs).
fn exceptions() -> usize {
    std::env::var("FLEETSYNC_BENCH_EXCEPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}
/// The agent's default quota (config example): 64 MiB.
const QUOTA: u64 = 64 << 20;
/// Give up (and fail) after this long.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);
const DRAIN_TARGET_S: f64 = 10.0;
const AGENT_RSS_TARGET_MIB: f64 = 24.0;

/// The run's directory: removed at the end unless FLEETSYNC_BENCH_DIR asked to keep it.
struct Dir(std::path::PathBuf, bool);

impl Dir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if self.1 {
            println!("  kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Yesterday's day of driving with an exception about every 173 fixes, in capture order.
fn day(start_ms: u64) -> Vec<Event> {
    let exc = exceptions();
    let fixes = drive(start_ms, POSITIONS, 11);
    let mut out = Vec::with_capacity(POSITIONS + exc);
    let mut next_exc = 0usize;
    for (i, fix) in fixes.into_iter().enumerate() {
        let t = fix.time_ms;
        out.push(fix);
        // Exception k goes after fix floor((k + 0.5) * POSITIONS / exc).
        while next_exc < exc && (2 * next_exc + 1) * POSITIONS / (2 * exc) == i {
            out.push(Event {
                time_ms: t + 500,
                body: Body::Exception(Exception {
                    code: BoundedString::try_from_str("delay").unwrap(),
                    text: BoundedString::try_from_str(&format!(
                        "exception-{next_exc}: waited for the loading dock"
                    ))
                    .unwrap(),
                    stop_id: Some(
                        BoundedString::try_from_str(&format!("S-{}", next_exc / 10)).unwrap(),
                    ),
                }),
            });
            next_exc += 1;
        }
    }
    assert_eq!(out.len(), POSITIONS + exc);
    out
}

async fn prefill(path: &Path, events: Vec<Event>) -> (u32, Duration) {
    let started = Instant::now();
    let cfg = StoreConfig {
        path: path.to_path_buf(),
        quota_bytes: QUOTA,
        space_factor: fleetsync_agent::store::SLED_SPACE_FACTOR,
        commit_interval: Duration::from_millis(2),
    };
    let store = tokio::task::spawn_blocking(move || Store::open(cfg))
        .await
        .unwrap()
        .unwrap();
    let epoch = store.epoch();
    for ev in events {
        store.append_buffered(ev).unwrap();
    }
    store.sync().await.unwrap();
    let s = store.stats();
    assert_eq!(s.critical.events, exceptions() as u64);
    assert_eq!(s.telemetry.events, POSITIONS as u64);
    println!(
        "  pre-filled store: {} events, {:.1} MiB logical, {:.1} MiB on disk",
        s.critical.events + s.telemetry.events,
        s.used_bytes as f64 / 1048576.0,
        s.disk_bytes as f64 / 1048576.0
    );
    // Dropping the last handle does a final commit round and joins the committer.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    (epoch, started.elapsed())
}

/// Peak (VmHWM) and largest sampled VmRSS of a process, in KiB.
#[derive(Default)]
struct Mem {
    hwm: AtomicU64,
    rss: AtomicU64,
    /// Of the largest sampled VmRSS: anonymous (heap, stacks) and file-backed (the
    /// binary's pages) KiB.
    anon: AtomicU64,
    file: AtomicU64,
    /// Most threads seen.
    threads: AtomicU64,
}

impl Mem {
    fn sample(&self, pid: u32) {
        if let Some(h) = proc_status_kib(pid, "VmHWM") {
            self.hwm.fetch_max(h, Ordering::Relaxed);
        }
        if let Some(r) = proc_status_kib(pid, "VmRSS")
            && r > self.rss.fetch_max(r, Ordering::Relaxed)
        {
            let kib = |f| proc_status_kib(pid, f).unwrap_or(0);
            self.anon.store(kib("RssAnon"), Ordering::Relaxed);
            self.file.store(kib("RssFile"), Ordering::Relaxed);
        }
        if let Some(t) = proc_status_count(pid, "Threads") {
            self.threads.fetch_max(t, Ordering::Relaxed);
        }
    }
}

/// A plain number field of `/proc/PID/status`.
fn proc_status_count(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

fn backlog(status: &serde_json::Value) -> Option<u64> {
    let b = &status["backlog"];
    Some(b["critical"]["events"].as_u64()? + b["telemetry"]["events"].as_u64()?)
}

async fn run() -> bool {
    let exc = exceptions();
    println!(
        "drain: a day offline at 1 Hz ({POSITIONS} fixes + {exc} exceptions), then the hub comes back"
    );
    let built = Instant::now();
    let hub_exe = release_bin("fleetsync-hub");
    let agent_exe = release_bin("fleetsync-agent");
    println!(
        "  binaries: {} and {} (bench profile = release settings, not stripped; build/check took {:.1} s)",
        hub_exe.display(),
        agent_exe.display(),
        built.elapsed().as_secs_f64()
    );

    // FLEETSYNC_BENCH_DIR keeps the run's files (PKI, configs, stores, logs) for a look
    // afterwards, e.g. to run the agent on the pre-filled store under a profiler.
    let kept = std::env::var_os("FLEETSYNC_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = match &kept {
        Some(d) => {
            std::fs::create_dir_all(d).unwrap();
            assert!(
                std::fs::read_dir(d).unwrap().next().is_none(),
                "FLEETSYNC_BENCH_DIR {} must be empty",
                d.display()
            );
            tempfile::TempDir::with_prefix_in("drain-", d)
                .unwrap()
                .keep()
        }
        None => tempfile::tempdir().unwrap().keep(),
    };
    let dir = Dir(dir, kept.is_some());
    let pki = pki(dir.path(), &["V1"]);
    let start_ms = fleetsync_agent::now_ms() - 2 * 86_400_000;
    let (epoch, took) = prefill(&dir.path().join("agent-data"), day(start_ms)).await;
    println!(
        "  pre-fill took {:.1} s (epoch {epoch})",
        took.as_secs_f64()
    );
    // The baseline of the same run: the same store without its lanes' counts, as every
    // store was before them, so the agent's open reads every event (and writes the
    // counts); then the store as it is, whose counts open takes.
    let copy = |from: &str, to: &str| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.path().join(from))
            .arg(dir.path().join(to))
            .status()
            .unwrap();
        assert!(status.success());
    };
    copy("agent-data", "agent-data-scan");
    if dir.1 {
        // A copy of the pre-filled store, to open again by hand.
        copy("agent-data", "agent-data.prefilled");
    }
    strip_counts(&dir.path().join("agent-data-scan"));
    let mut peaks = Vec::new();
    let mut ok = true;
    for (label, data) in [
        ("before (open reads every event)", "agent-data-scan"),
        ("after (open takes the lanes' counts)", "agent-data"),
    ] {
        println!("  -- {label}");
        let (run_ok, hwm) = drain_once(&dir, &pki, &hub_exe, &agent_exe, data, epoch).await;
        ok &= run_ok;
        peaks.push(hwm);
    }
    let (before, after) = (mib(peaks[0]), mib(peaks[1]));
    println!(
        "  AGENT PEAK RSS  {after:.1} MiB, {before:.1} MiB before: {:.2}x   (target < {AGENT_RSS_TARGET_MIB} MiB: {})",
        after / before,
        if after < AGENT_RSS_TARGET_MIB {
            "met"
        } else {
            "MISSED"
        }
    );
    ok
}

/// Removes both lanes' counts from a closed store.
fn strip_counts(path: &Path) {
    let db = (0..150)
        .find_map(|_| match sled::Config::new().path(path).open() {
            Ok(db) => Some(db),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                None
            }
        })
        .expect("the pre-filled store opens");
    for lane in ["critical", "telemetry"] {
        let t = db.open_tree(lane).unwrap();
        assert!(
            t.remove(fleetsync_agent::store::COUNTS_KEY)
                .unwrap()
                .is_some()
        );
    }
    db.flush().unwrap();
}

/// Starts a hub and the agent on `data` (a store in `dir`), times the drain, samples the
/// agent's memory, checks the hub holds every pre-filled event once. Returns whether all
/// held and the agent's VmHWM (KiB).
async fn drain_once(
    dir: &Dir,
    pki: &Path,
    hub_exe: &Path,
    agent_exe: &Path,
    data: &str,
    epoch: u32,
) -> (bool, u64) {
    let exc = exceptions();
    let (mqtt, http_port, api) = (free_port(), free_port(), free_port());
    let hub_cfg = dir.path().join(format!("hub-{data}.toml"));
    std::fs::write(
        &hub_cfg,
        hub_config(
            pki,
            &dir.path().join(format!("hub-{data}")),
            mqtt,
            http_port,
        ),
    )
    .unwrap();
    let agent_cfg = dir.path().join(format!("{data}.toml"));
    std::fs::write(
        &agent_cfg,
        agent_config("V1", pki, &dir.path().join(data), mqtt, api, QUOTA),
    )
    .unwrap();
    let hub_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let api_addr: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();

    let hub = Proc::spawn_exe(
        hub_exe,
        &hub_cfg,
        &dir.path().join(format!("hub-{data}.log")),
    );
    if !wait_http_ok(hub_addr, "/readyz", Duration::from_secs(30)).await {
        println!("  FAILED: hub did not become ready");
        return (false, 0);
    }
    let hub_pid = hub.child.id();
    let hub_mem = Arc::new(Mem::default());
    hub_mem.sample(hub_pid);
    let hub_idle_hwm = hub_mem.hwm.load(Ordering::Relaxed);

    let started = Instant::now();
    let agent = Proc::spawn_exe(
        agent_exe,
        &agent_cfg,
        &dir.path().join(format!("{data}.log")),
    );
    let agent_pid = agent.child.id();
    let agent_mem = Arc::new(Mem::default());

    // Memory sampler: every 20 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, hub_mem, agent_mem) = (stop.clone(), hub_mem.clone(), agent_mem.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                agent_mem.sample(agent_pid);
                hub_mem.sample(hub_pid);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let status_http = Http::new(api_addr, DRIVER_TOKEN);
    let hub_http = Http::new(hub_addr, OPERATOR_TOKEN);
    let mut api_up: Option<Duration> = None;
    let mut rss_at_api_up = 0u64;
    // The agent's round trip of its last acked batch, as seen by each status poll.
    let mut rtts: Vec<u64> = Vec::new();
    let mut connected: Option<Duration> = None;
    let mut first_progress: Option<Duration> = None;
    let mut drained: Option<Duration> = None;
    let mut last_backlog = None;
    while started.elapsed() < DRAIN_LIMIT {
        if let Ok(r) = status_http.get("/v1/status").await
            && r.status().is_success()
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            let at = started.elapsed();
            if api_up.is_none() {
                api_up = Some(at);
                rss_at_api_up = proc_status_kib(agent_pid, "VmRSS").unwrap_or(0);
            }
            if v["connected"].as_bool() == Some(true) {
                connected.get_or_insert(at);
            }
            if let Some(rtt) = v["link"]["last_ack_rtt_ms"].as_u64() {
                rtts.push(rtt);
            }
            if let Some(b) = backlog(&v) {
                if b < (POSITIONS + exc) as u64 {
                    first_progress.get_or_insert(at);
                }
                last_backlog = Some(b);
                if b == 0 {
                    drained = Some(at);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent_mem.sample(agent_pid);
    hub_mem.sample(hub_pid);
    let agent_hwm = agent_mem.hwm.load(Ordering::Relaxed);
    let hub_hwm_drain = hub_mem.hwm.load(Ordering::Relaxed);
    let link = status_http.get_json("/v1/status").await["link"].clone();

    let ms =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "  timeline from agent start: local API up {}, connected {}, first ack {}, backlog 0 {}",
        ms(api_up),
        ms(connected),
        ms(first_progress),
        ms(drained)
    );
    rtts.sort_unstable();
    let pct = |p: usize| rtts.get(rtts.len() * p / 100).copied().unwrap_or(0);
    println!(
        "  uplink: batches sent {}, resends {}, disconnects {}; batch->ack round trip \
         (sampled every 20 ms) median {} ms, p90 {} ms, max {} ms",
        link["batches_sent"],
        link["resends"],
        link["disconnects"],
        pct(50),
        pct(90),
        rtts.last().copied().unwrap_or(0)
    );
    let total = (POSITIONS + exc) as f64;
    let mut ok = true;
    match drained {
        Some(d) => {
            let s = d.as_secs_f64();
            println!(
                "  DRAIN      {:8.2} s  = {:8.0} events/s   (target < {DRAIN_TARGET_S} s: {})",
                s,
                total / s,
                if s < DRAIN_TARGET_S { "met" } else { "MISSED" }
            );
        }
        None => {
            println!(
                "  DRAIN      did not finish within {} s (backlog still {last_backlog:?})  MISSED",
                DRAIN_LIMIT.as_secs()
            );
            ok = false;
        }
    }
    println!(
        "  AGENT RSS  {:8.1} MiB peak (VmHWM; largest sampled VmRSS {:.1} MiB, {:.1} MiB when its API first answered)   (target < {AGENT_RSS_TARGET_MIB} MiB: {})",
        mib(agent_hwm),
        mib(agent_mem.rss.load(Ordering::Relaxed)),
        mib(rss_at_api_up),
        if mib(agent_hwm) < AGENT_RSS_TARGET_MIB {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "             at the largest VmRSS: {:.1} MiB anonymous (heap, stacks), {:.1} MiB file-backed (the binary); {} threads at most",
        mib(agent_mem.anon.load(Ordering::Relaxed)),
        mib(agent_mem.file.load(Ordering::Relaxed)),
        agent_mem.threads.load(Ordering::Relaxed)
    );
    println!(
        "  HUB RSS    {:8.1} MiB peak during the drain (VmHWM; {:.1} MiB when idle before the agent started)",
        mib(hub_hwm_drain),
        mib(hub_idle_hwm)
    );

    // The oracle: every pre-filled event at the hub exactly once, plus health events.
    let verified = Instant::now();
    let events = hub_http.all_events("V1").await;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let mut ids = HashSet::new();
    let mut dup = 0usize;
    let mut prefilled = 0usize;
    for e in &events {
        *kinds
            .entry(e["kind"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        let id = (e["epoch"].as_u64().unwrap(), e["seq"].as_u64().unwrap());
        if !ids.insert(id) {
            dup += 1;
        }
        if id.0 == u64::from(epoch) && id.1 < total as u64 {
            prefilled += 1;
        }
    }
    let count = |k: &str| kinds.get(k).copied().unwrap_or(0);
    hub_mem.sample(hub_pid);
    println!(
        "  hub holds {} events of V1: {} positions, {} exceptions, {} health, {} other; \
         {prefilled} of {} pre-filled (epoch {epoch}, seq 0..{}) present, {dup} duplicates \
         (read back in {:.1} s; hub VmHWM after that {:.1} MiB)",
        events.len(),
        count("position"),
        count("exception"),
        count("health"),
        events.len() - count("position") - count("exception") - count("health"),
        total as u64,
        total as u64 - 1,
        verified.elapsed().as_secs_f64(),
        mib(hub_mem.hwm.load(Ordering::Relaxed))
    );
    if count("position") != POSITIONS
        || count("exception") != exc
        || prefilled != total as usize
        || dup != 0
    {
        println!("  FAILED: the hub does not hold exactly the pre-filled events");
        ok = false;
    } else {
        println!(
            "  verified: {} = {POSITIONS} + {exc} + {} health events",
            events.len(),
            count("health")
        );
    }

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    // SIGKILL and reap both (Proc's drop).
    drop(agent);
    drop(hub);
    (ok, agent_hwm)
}

fn main() {
    // `cargo bench` passes `--bench`; this benchmark takes no options.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if !rt.block_on(run()) {
        std::process::exit(1);
    }
}

//! The `gpsd://` source against a real gpsd, fed a real receiver log by gpsfake
//! (Debian: gpsd + gpsd-clients, installed by .ci/gps-deps). The fixes must be the ones
//! the independent decoder (pynmea2) found in the log, and the source must pick up again
//! when gpsd is restarted.
//!
//! Without gpsfake: fails when `CI` is set, skips loudly otherwise.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fleetsync_agent::gps::{self, GpsFix, GpsSource, GpsStats};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LOG: &str = "ublox-neo-m9n";
const MS_PER_DAY: u64 = 86_400_000;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nmea")
        .join(name)
}

/// (ms since epoch, lat e7, lon e7) per fix of the oracle CSV (this log has dates).
fn oracle() -> Vec<(u64, i64, i64)> {
    let text = std::fs::read_to_string(data(&format!("{LOG}.expected.csv"))).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let d = chrono::NaiveDate::parse_from_str(f[0], "%Y-%m-%d").unwrap();
            let days = d
                .signed_duration_since(chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
                .num_days() as u64;
            let tod: u64 = f[1].parse().unwrap();
            let e7 = |s: &str| (s.parse::<f64>().unwrap() * 1e7).round() as i64;
            (days * MS_PER_DAY + tod, e7(f[2]), e7(f[3]))
        })
        .collect()
}

/// gpsd lives in /usr/sbin, which a CI environment may leave out of PATH.
fn path_env() -> String {
    format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn gpsfake_available() -> bool {
    std::process::Command::new("gpsfake")
        .arg("-h")
        .env("PATH", path_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("gpsd")
            .arg("-V")
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// gpsfake in its own process group (so that stopping it also stops its gpsd), feeding
/// the log once, starting at once (-n), one sentence every 30 ms.
fn gpsfake(port: u16) -> Child {
    Command::new("gpsfake")
        .args(["-1", "-n", "-q", "-c", "0.03", "-P", &port.to_string()])
        .arg(data(&format!("{LOG}.log")))
        .env("PATH", path_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Stops gpsfake and its gpsd (the whole process group; gpsfake does not always exit
/// on SIGTERM) and reaps gpsfake.
async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.kill().await;
}

async fn receive(rx: &mut mpsc::Receiver<GpsFix>, want: usize, stats: &GpsStats) -> Vec<GpsFix> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while out.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(f)) => out.push(f),
            Ok(None) => panic!("gps task ended: {:?}", stats.snapshot()),
            Err(_) => break,
        }
    }
    out
}

fn check(phase: &str, fixes: &[GpsFix], oracle: &[(u64, i64, i64)]) {
    // gpsd needs an epoch or two to recognise the receiver, and gpsfake starts feeding
    // before the client is connected: most fixes, not all, arrive.
    assert!(
        fixes.len() * 2 >= oracle.len(),
        "{phase}: only {} of {} fixes via gpsd: {fixes:?}",
        fixes.len(),
        oracle.len()
    );
    for f in fixes {
        let Some(&(_, lat, lon)) = oracle.iter().find(|o| o.0 == f.time_ms) else {
            panic!(
                "{phase}: gpsd fix at {} is not in the log: {f:?}",
                f.time_ms
            );
        };
        assert!(
            (i64::from(f.lat_e7) - lat).abs() <= 1 && (i64::from(f.lon_e7) - lon).abs() <= 1,
            "{phase}: {f:?} vs oracle ({lat}, {lon})"
        );
    }
    // HDOP and satellites come from SKY reports, which gpsd sends after the first TPV.
    for f in &fixes[1..] {
        assert!(
            f.hdop_d.is_some() && f.satellites.is_some(),
            "{phase}: {f:?}"
        );
    }
    let mut times: Vec<u64> = fixes.iter().map(|f| f.time_ms).collect();
    times.dedup();
    assert_eq!(times.len(), fixes.len(), "{phase}: one fix per epoch");
}

#[tokio::test]
async fn gpsd_source_reads_gpsfake_and_survives_a_gpsd_restart() {
    if !gpsfake_available() {
        if std::env::var_os("CI").is_some() {
            panic!("gpsfake/gpsd not installed: .ci/gps-deps must install gpsd and gpsd-clients");
        }
        eprintln!(
            "\n\n*** SKIPPED gpsd_source test: gpsfake or gpsd not installed \
             (apt-get install gpsd gpsd-clients python3-gps) ***\n\n"
        );
        return;
    }
    let oracle = oracle();
    let port = free_port();
    let stats = Arc::new(GpsStats::default());
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();

    // The agent starts first and keeps trying until gpsd is up.
    let task = tokio::spawn(gps::run(
        GpsSource::Gpsd {
            host: "127.0.0.1".into(),
            port,
        },
        tx,
        stats.clone(),
        shutdown.clone(),
    ));
    let fake = gpsfake(port);
    let first = receive(&mut rx, oracle.len() - 2, &stats).await;
    stop(fake).await;
    eprintln!("gpsd run 1: {} fixes, {:?}", first.len(), stats.snapshot());
    check("first gpsd", &first, &oracle);

    // gpsd restarts on the same port: the source reconnects and fixes flow again.
    let before = stats.snapshot().reconnects;
    let fake = gpsfake(port);
    let second = receive(&mut rx, oracle.len() - 2, &stats).await;
    stop(fake).await;
    let s = stats.snapshot();
    eprintln!("gpsd run 2: {} fixes, {s:?}", second.len());
    check("restarted gpsd", &second, &oracle);
    assert!(s.reconnects > before, "{s:?}");
    assert_eq!(s.garbage, 0, "{s:?}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run ends on shutdown")
        .unwrap()
        .unwrap();
}

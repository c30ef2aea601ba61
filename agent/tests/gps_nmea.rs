//! NMEA input against real receiver logs (tests/data/nmea, see its README): the merger
//! checked against an independent decoder's output (pynmea2, committed CSVs), the
//! `nmea+file` source at both paces, `nmea+tcp` against a local listener, and bad input
//! counted, never fatal.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_agent::gps::{self, GpsFix, GpsSource, GpsStats, NmeaMerger, Pace};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LOGS: &[&str] = &[
    "ublox-neo-m9n",
    "sirf-trig-beidou",
    "sirfstarv",
    "ch-4711-glonass",
    "telit-he910",
    "trimble-rtk-fuzzy",
];
const MS_PER_DAY: u64 = 86_400_000;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nmea")
        .join(name)
}

/// One row of an oracle CSV.
#[derive(Debug)]
struct Expected {
    /// Days since 1970-01-01, when the log had given a date.
    day: Option<u64>,
    tod_ms: u64,
    lat_e7: i64,
    lon_e7: i64,
}

fn expected(log: &str) -> Vec<Expected> {
    let text = std::fs::read_to_string(data(&format!("{log}.expected.csv"))).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let day = (!f[0].is_empty()).then(|| {
                let d = chrono::NaiveDate::parse_from_str(f[0], "%Y-%m-%d").unwrap();
                d.signed_duration_since(chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
                    .num_days() as u64
            });
            Expected {
                day,
                tod_ms: f[1].parse().unwrap(),
                lat_e7: (f[2].parse::<f64>().unwrap() * 1e7).round() as i64,
                lon_e7: (f[3].parse::<f64>().unwrap() * 1e7).round() as i64,
            }
        })
        .collect()
}

fn check_against_oracle(log: &str, fixes: &[GpsFix]) {
    let want = expected(log);
    assert!(!want.is_empty(), "{log}: oracle has no fixes");
    assert_eq!(
        fixes.len(),
        want.len(),
        "{log}: fix count differs from pynmea2's\nours: {fixes:#?}\noracle: {want:#?}"
    );
    for (i, (got, want)) in fixes.iter().zip(&want).enumerate() {
        assert_eq!(
            got.time_ms % MS_PER_DAY,
            want.tod_ms,
            "{log} fix {i}: time of day"
        );
        if let Some(day) = want.day {
            assert_eq!(got.time_ms / MS_PER_DAY, day, "{log} fix {i}: date");
        }
        // Both sides round degrees to 1e-7; allow one unit for the float paths.
        assert!(
            (i64::from(got.lat_e7) - want.lat_e7).abs() <= 1
                && (i64::from(got.lon_e7) - want.lon_e7).abs() <= 1,
            "{log} fix {i}: ours {got:?}, oracle {want:?}"
        );
    }
}

fn merge_file(log: &str, stats: &Arc<GpsStats>) -> Vec<GpsFix> {
    let bytes = std::fs::read(data(&format!("{log}.log"))).unwrap();
    // A fixed clock: logs without a date get "today" from it; the oracle then only
    // checks the time of day.
    let mut m = NmeaMerger::with_clock(stats.clone(), || 1_700_000_000_000);
    let mut out: Vec<GpsFix> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b"#"))
        .filter_map(|l| m.push_line(l))
        .collect();
    out.extend(m.flush());
    out
}

#[test]
fn real_receiver_logs_match_pynmea2() {
    for log in LOGS {
        let stats = Arc::new(GpsStats::default());
        let fixes = merge_file(log, &stats);
        let s = stats.snapshot();
        eprintln!("{log}: {} fixes, {s:?}", fixes.len());
        check_against_oracle(log, &fixes);
        assert_eq!(s.fixes, fixes.len() as u64);
        assert_eq!(s.checksum_errors, 0, "{log}: these captures are clean");
        // Every sentence of them decodes (SiRF TriG's GSA has a fourth DOP, ...).
        assert_eq!(s.garbage, 0, "{log}: {s:?}");
        // Their no-fix cycles say so in every sentence: no position, or status V.
        assert_eq!(s.no_fix, s.rejected.total(), "{log}: {s:?}");
        assert!(s.sentences > fixes.len() as u64, "{log}: {s:?}");
        // Every fix is fully merged: the GGA/GNS of its epoch gave the HDOP and
        // satellites, RMC/VTG the speed.
        for f in &fixes {
            assert!(
                f.hdop_d.is_some() || *log == "sirfstarv",
                "{log}: no hdop in {f:?}"
            );
            assert!(f.satellites.is_some(), "{log}: no satellites in {f:?}");
        }
    }
}

#[test]
fn telit_log_counts_its_no_fix_start() {
    // The capture starts with the receiver searching: GGA quality 0 / RMC status V,
    // without a time. None of it may become a position.
    let stats = Arc::new(GpsStats::default());
    let fixes = merge_file("telit-he910", &stats);
    let s = stats.snapshot();
    // Untimed no-fix epochs are told apart by the RMC that starts each of them.
    let searching = std::fs::read_to_string(data("telit-he910.log"))
        .unwrap()
        .matches("$GPRMC,,V")
        .count() as u64;
    assert!(searching >= 5);
    assert_eq!(s.no_fix, searching, "{s:?}");
    assert_eq!(
        fixes[0].time_ms, 1_552_387_913_710,
        "2019-03-12T10:51:53.710Z"
    );
    assert_eq!(
        fixes[0].speed_cmps,
        Some(7),
        "0.14 kn from the RMC of the epoch"
    );
    assert_eq!(fixes[0].heading_ddeg, Some(3036));
}

#[test]
fn corrupted_copy_counts_every_bad_line_and_keeps_the_rest() {
    let text = std::fs::read_to_string(data("ublox-neo-m9n.log")).unwrap();
    let mut corrupted = String::new();
    let (mut flipped, mut junk) = (0u64, 0u64);
    for (i, line) in text.lines().enumerate() {
        if line.get(3..6) == Some("GSV") && i % 3 == 0 {
            // Flip one data character: the checksum no longer matches.
            let mut l = line.to_owned().into_bytes();
            l[10] = if l[10] == b'1' { b'2' } else { b'1' };
            corrupted.push_str(std::str::from_utf8(&l).unwrap());
            flipped += 1;
        } else {
            corrupted.push_str(line);
        }
        corrupted.push('\n');
        if i % 40 == 7 {
            corrupted.push_str("\u{fffd}garbage \u{1}\u{2}\n$GNGGA,truncated\n");
            junk += 2;
        }
    }
    assert!(flipped > 5 && junk > 5);
    let stats = Arc::new(GpsStats::default());
    let mut m = NmeaMerger::new(stats.clone());
    let mut fixes: Vec<GpsFix> = corrupted
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| m.push_line(l))
        .collect();
    fixes.extend(m.flush());
    let s = stats.snapshot();
    assert_eq!(s.checksum_errors, flipped, "{s:?}");
    assert_eq!(s.garbage, junk, "{s:?}");
    // GSV carry no position: every fix survives.
    check_against_oracle("ublox-neo-m9n", &fixes);
}

async fn collect(source: GpsSource) -> (Vec<GpsFix>, Arc<GpsStats>) {
    let (tx, mut rx) = mpsc::channel(4);
    let stats = Arc::new(GpsStats::default());
    let task = tokio::spawn(gps::run(
        source,
        tx,
        stats.clone(),
        CancellationToken::new(),
    ));
    let mut out = Vec::new();
    while let Some(f) = rx.recv().await {
        out.push(f);
    }
    task.await.unwrap().unwrap();
    (out, stats)
}

#[tokio::test]
async fn file_source_pace_max_replays_every_log() {
    for log in LOGS {
        let path = data(&format!("{log}.log"));
        let started = Instant::now();
        let (fixes, stats) = collect(GpsSource::NmeaFile {
            path,
            pace: Pace::Max,
        })
        .await;
        // Telit's clock is fine; for logs without a date at the start the wall clock
        // fills it in, which the oracle check tolerates.
        check_against_oracle(log, &fixes);
        assert_eq!(stats.snapshot().fixes, fixes.len() as u64);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{log}: not max pace"
        );
    }
}

#[tokio::test]
async fn file_source_pace_realtime_follows_the_sentence_times() {
    // SiRF TriG log: five fixes one second apart (07:41:55.799 .. 07:41:59.799).
    let started = Instant::now();
    let (fixes, _) = collect(
        "nmea+file://PATH?pace=realtime"
            .replace("PATH", data("sirf-trig-beidou.log").to_str().unwrap())
            .parse()
            .unwrap(),
    )
    .await;
    let elapsed = started.elapsed();
    check_against_oracle("sirf-trig-beidou", &fixes);
    assert_eq!(fixes.len(), 5);
    assert!(
        elapsed >= Duration::from_millis(3900) && elapsed < Duration::from_secs(8),
        "4 s of fixes replayed in {elapsed:?}"
    );
}

#[tokio::test]
async fn file_source_missing_file_is_an_error_naming_it() {
    let (tx, _rx) = mpsc::channel(1);
    let err = gps::run(
        GpsSource::NmeaFile {
            path: "/nonexistent/route.nmea".into(),
            pace: Pace::Max,
        },
        tx,
        Arc::new(GpsStats::default()),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/route.nmea"), "{err}");
}

#[tokio::test]
async fn tcp_source_reads_reconnects_and_counts_bad_lines() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: String = std::fs::read_to_string(data("ch-4711-glonass.log"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\r\n"))
        .collect();
    // Cut at a line end so each connection carries whole sentences.
    let cut = log[..log.len() / 2].rfind('\n').unwrap() + 1;
    let (first, second) = (
        log.as_bytes()[..cut].to_vec(),
        log.as_bytes()[cut..].to_vec(),
    );
    let server = tokio::spawn(async move {
        // First connection: half the log, a checksum error, garbage, then a hang-up.
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&first).await.unwrap();
        s.write_all(
            b"$GPGGA,135651.997,5543.0328,N,03724.7198,E,1,06,01.8,165.6,M,14.6,M,,*00\r\n",
        )
        .await
        .unwrap();
        s.write_all(b"\x00\xff\xfe binary noise\r\n").await.unwrap();
        drop(s);
        // Second connection (the agent reconnects): the rest.
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&second).await.unwrap();
        s.flush().await.unwrap();
        // Keep it open: the idle flush must deliver the last epoch.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let (tx, mut rx) = mpsc::channel(4);
    let stats = Arc::new(GpsStats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gps::run(
        format!("nmea+tcp://127.0.0.1:{port}").parse().unwrap(),
        tx,
        stats.clone(),
        shutdown.clone(),
    ));
    let want = expected("ch-4711-glonass").len();
    let mut fixes = Vec::new();
    while fixes.len() < want {
        let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {want} fixes: {:?}",
                    fixes.len(),
                    stats.snapshot()
                )
            })
            .unwrap();
        fixes.push(f);
    }
    check_against_oracle("ch-4711-glonass", &fixes);
    let s = stats.snapshot();
    assert_eq!(s.checksum_errors, 1, "{s:?}");
    assert_eq!(s.garbage, 1, "{s:?}");
    assert!(s.reconnects >= 1, "{s:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run ends on shutdown")
        .unwrap()
        .unwrap();
    server.abort();
}

/// `nmea+serial` against a pseudo-terminal: python3 opens a pty pair, prints the
/// device name, and writes a real log into it (a serial GPS receiver as the kernel's
/// tty layer presents it).
#[tokio::test]
async fn serial_source_reads_a_pty() {
    let script = r#"
import os, pty, sys, time, tty
master, slave = pty.openpty()
tty.setraw(slave)
print(os.ttyname(slave), flush=True)
data = open(sys.argv[1], 'rb').read()
time.sleep(1.0)
for line in data.splitlines(True):
    if not line.startswith(b'#'):
        os.write(master, line.replace(b'\n', b'\r\n'))
time.sleep(20)
"#;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script])
        .arg(data("ch-4711-glonass.log"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut dev = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut dev)
        .await
        .unwrap();
    let source: GpsSource = format!("nmea+serial://{}?baud=4800", dev.trim())
        .parse()
        .unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let stats = Arc::new(GpsStats::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gps::run(source, tx, stats.clone(), shutdown.clone()));
    let want = expected("ch-4711-glonass").len();
    let mut fixes = Vec::new();
    while fixes.len() < want {
        let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {want} fixes: {:?}",
                    fixes.len(),
                    stats.snapshot()
                )
            })
            .unwrap();
        fixes.push(f);
    }
    check_against_oracle("ch-4711-glonass", &fixes);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run ends on shutdown")
        .unwrap()
        .unwrap();
    let _ = child.kill().await;
}

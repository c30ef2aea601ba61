//! Load in its short mode: protocol-level vehicles over real TLS against a hub process;
//! every event sent is at the hub exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn load_short_run_passes_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("load.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetsync-sim"))
        .args([
            "load",
            "--vehicles",
            "30",
            "--rate",
            "2",
            "--duration",
            "10",
            "--report",
        ])
        .arg(&report)
        .output()
        .unwrap();
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    // 30 vehicles x 2 Hz: the hub keeps up with what is offered.
    let rate = r["acked_per_s"].as_f64().unwrap();
    assert!(rate > 40.0, "acked {rate} events/s of 60 offered");
    assert!(
        r["hub_peak_rss_mib"].as_f64().unwrap() > 1.0,
        "hub RSS not measured"
    );
    // The hub's part of the latency is measured and is part of the whole.
    let (whole, hub) = (&r["latency_ms"], &r["hub_latency_ms"]);
    assert!(hub["max"].as_u64().unwrap() > 0, "{hub}");
    assert!(
        hub["max"].as_u64().unwrap() <= whole["max"].as_u64().unwrap(),
        "{hub} vs {whole}"
    );
}

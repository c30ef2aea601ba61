//! Chaos in its short mode: real agent and hub processes (this crate's binary), faults,
//! and the oracle. The run fails if the oracle finds anything lost or duplicated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn chaos_short_run_passes_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("chaos.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetsync-sim"))
        .args([
            "chaos",
            "--vehicles",
            "5",
            "--duration",
            "40",
            "--seed",
            "11",
            "--report",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let o = &r["oracle"];
    assert!(out.status.success(), "chaos failed: {o}");
    assert_eq!(o["ok"], true);
    assert_eq!(o["lost"], 0);
    assert_eq!(o["duplicated"], 0);
    assert_eq!(
        o["pod_facts"], o["pods"],
        "every accepted POD is one DELIVERED fact of its shipment: {o}"
    );
    assert!(o["pods"].as_u64().unwrap() > 0, "no POD accepted: {o}");
    assert!(
        o["accepted"].as_u64().unwrap() > 100,
        "too little traffic to mean anything: {o}"
    );
    let f = &r["faults"];
    let injected: u64 = [
        "agent_kills",
        "hub_kills",
        "link_cuts",
        "ack_blackholes",
        "link_delays",
        "quota_bursts",
    ]
    .iter()
    .map(|k| f[k].as_u64().unwrap())
    .sum();
    assert!(injected >= 5, "too few faults: {f}");
    assert!(
        f["hub_kills"].as_u64().unwrap() >= 1,
        "the hub was never killed: {f}"
    );
}

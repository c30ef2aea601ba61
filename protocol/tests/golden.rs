//! Golden bytes: one instance of every message kind, pinned as hex. A failure here means
//! the wire format changed: old agents in the field would no longer be understood. Append
//! new kinds instead; never edit a line here to make a change pass.
#![allow(clippy::unwrap_used)]

mod common;

use common::{downlink_samples, uplink_samples};
use fleetsync_protocol::frame;
use fleetsync_protocol::{Downlink, Uplink};

const UPLINK: &[(&str, &str)] = &[
    (
        "positions",
        "0100030a03003f80c494c7c368c09cb8f303c09ed12ed20f8a0e14180003d00f880e000006001414",
    ),
    ("geofence", "0100030d010180c494c7c3680673746f702d3100"),
    ("trip", "0100030e010280c494c7c36803010673746f702d31"),
    (
        "pod",
        "0100030f010380c494c7c36805706f642d31057368702d390673746f702d3103010573686f727409412e204a616e73656e010c32206f66203320626f78657301aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaad2090001bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbd2090201c09cb8f303c09ed12e",
    ),
    (
        "exception",
        "01000310010480c494c7c3680b726f61645f636c6f7365640962726964676520757000",
    ),
    (
        "health",
        "01000311010580c494c7c36802ac0280804080808020901c05302e312e30010005010128",
    ),
    ("gap", "01000312010680c494c7c368010301090700"),
    ("assignment_ack", "01000313010780c494c7c368056a6f622d3102"),
    (
        "blob_chunk",
        "0101aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa000303010203",
    ),
];

const DOWNLINK: &[(&str, &str)] = &[
    ("ack", "01000302013c3e3e"),
    (
        "assignment",
        "0101056a6f622d3102020673746f702d31054465706f74064b616465203101057368702d3900c09cb8f303c09ed12e4b0180a2cae3a13480ffa5e5a1340673746f702d320453686f700000010300001400141400",
    ),
    ("config", "010201013c00"),
    ("command", "010305636d642d3101"),
    (
        "blob_ack",
        "0104aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ),
];

#[test]
fn every_uplink_kind_is_pinned() {
    let samples = uplink_samples();
    assert_eq!(samples.len(), UPLINK.len(), "a sample without golden bytes");
    for ((name, msg), (gname, hex)) in samples.iter().zip(UPLINK) {
        assert_eq!(name, gname);
        let mut buf = [0u8; 4096];
        let bytes = frame::encode_into(msg, &mut buf).unwrap();
        assert_eq!(hex::encode(&bytes), *hex, "{name} encodes differently");
        let back: Uplink = frame::decode(&hex::decode(hex).unwrap()).unwrap();
        assert_eq!(&back, msg, "{name} decodes differently");
    }
}

#[test]
fn every_downlink_kind_is_pinned() {
    let samples = downlink_samples();
    assert_eq!(
        samples.len(),
        DOWNLINK.len(),
        "a sample without golden bytes"
    );
    for ((name, msg), (gname, hex)) in samples.iter().zip(DOWNLINK) {
        assert_eq!(name, gname);
        let mut buf = [0u8; 4096];
        let bytes = frame::encode_into(msg, &mut buf).unwrap();
        assert_eq!(hex::encode(&bytes), *hex, "{name} encodes differently");
        let back: Downlink = frame::decode(&hex::decode(hex).unwrap()).unwrap();
        assert_eq!(&back, msg, "{name} decodes differently");
    }
}

#[test]
fn print_golden() {
    // `FLEETSYNC_PRINT_GOLDEN=1 cargo test -p fleetsync-protocol --test golden print_golden -- --nocapture`
    // prints the current bytes (for adding a new kind).
    if std::env::var_os("FLEETSYNC_PRINT_GOLDEN").is_none() {
        return;
    }
    let mut buf = [0u8; 4096];
    for (name, msg) in uplink_samples() {
        println!(
            "    (\"{name}\", \"{}\"),",
            hex::encode(frame::encode_into(&msg, &mut buf).unwrap())
        );
    }
    for (name, msg) in downlink_samples() {
        println!(
            "    (\"{name}\", \"{}\"),",
            hex::encode(frame::encode_into(&msg, &mut buf).unwrap())
        );
    }
}

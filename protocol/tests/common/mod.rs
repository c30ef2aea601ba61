//! Sample messages shared by the golden and round-trip tests.
#![allow(dead_code, unreachable_pub)]
#![allow(clippy::unwrap_used)]

use fleetsync_protocol::*;

pub fn id(s: &str) -> Id {
    Id::try_from_str(s).unwrap()
}

pub fn fix(lat_e7: i32, lon_e7: i32, speed: u16) -> Body {
    Body::Position(Fix {
        lat_e7,
        lon_e7,
        speed_cmps: Some(speed),
        heading_ddeg: Some(900),
        hdop_d: Some(9),
        satellites: Some(11),
    })
}

pub const T0: u64 = 1_795_773_600_000; // 2026-11-27T10:00:00Z

pub fn ev(offset_ms: u64, body: Body) -> Event {
    Event {
        time_ms: T0 + offset_ms,
        body,
    }
}

pub fn batch(first_seq: u64, events: Vec<Event>) -> Uplink {
    Uplink::Batch(Batch {
        epoch: 3,
        first_seq,
        events: BoundedVec::try_from_iter(events).unwrap(),
    })
}

pub fn blob_ref(b: u8, media: MediaType) -> BlobRef {
    BlobRef {
        sha256: [b; 32],
        len: 1234,
        media,
    }
}

/// One instance of every event kind, each in a batch of its own (positions: three fixes).
pub fn uplink_samples() -> Vec<(&'static str, Uplink)> {
    vec![
        (
            "positions",
            batch(
                10,
                vec![
                    ev(0, fix(523_700_000, 48_900_000, 1000)),
                    ev(1000, fix(523_700_900, 48_900_000, 1000)),
                    ev(2000, fix(523_701_800, 48_900_010, 1010)),
                ],
            ),
        ),
        (
            "geofence",
            batch(
                13,
                vec![ev(
                    0,
                    Body::Geofence(Geofence {
                        fence_id: id("stop-1"),
                        transition: Transition::Enter,
                    }),
                )],
            ),
        ),
        (
            "trip",
            batch(
                14,
                vec![ev(
                    0,
                    Body::Trip(Trip {
                        kind: TripKind::Arrived,
                        stop_id: Some(id("stop-1")),
                    }),
                )],
            ),
        ),
        (
            "pod",
            batch(
                15,
                vec![ev(
                    0,
                    Body::Pod(Pod {
                        pod_id: id("pod-1"),
                        shipment_id: id("shp-9"),
                        stop_id: id("stop-1"),
                        outcome: Outcome::Partial,
                        reason_code: Some(Code::try_from_str("short").unwrap()),
                        recipient_name: BoundedString::try_from_str("A. Jansen").unwrap(),
                        notes: Some(BoundedString::try_from_str("2 of 3 boxes").unwrap()),
                        signature: Some(blob_ref(0xaa, MediaType::Png)),
                        photos: BoundedVec::try_from_iter([blob_ref(0xbb, MediaType::Jpeg)])
                            .unwrap(),
                        geo: Some(Point {
                            lat_e7: 523_700_000,
                            lon_e7: 48_900_000,
                        }),
                    }),
                )],
            ),
        ),
        (
            "exception",
            batch(
                16,
                vec![ev(
                    0,
                    Body::Exception(Exception {
                        code: Code::try_from_str("road_closed").unwrap(),
                        text: BoundedString::try_from_str("bridge up").unwrap(),
                        stop_id: None,
                    }),
                )],
            ),
        ),
        (
            "health",
            batch(
                17,
                vec![ev(
                    0,
                    Body::Health(Health {
                        backlog_critical: 2,
                        backlog_telemetry: 300,
                        disk_used_bytes: 1 << 20,
                        disk_quota_bytes: 64 << 20,
                        uptime_s: 3600,
                        version: BoundedString::try_from_str("0.1.0").unwrap(),
                        link: LinkStats {
                            connects: 1,
                            disconnects: 0,
                            batches_sent: 5,
                            resends: 1,
                            last_ack_rtt_ms: Some(40),
                        },
                    }),
                )],
            ),
        ),
        (
            "gap",
            batch(
                18,
                vec![ev(
                    0,
                    Body::Gap(Gap {
                        lane: Lane::Telemetry,
                        epoch: 3,
                        first_seq: 1,
                        last_seq: 9,
                        count: 7,
                        reason: GapReason::Quota,
                    }),
                )],
            ),
        ),
        (
            "assignment_ack",
            batch(
                19,
                vec![ev(
                    0,
                    Body::AssignmentAck(AssignmentAck {
                        assignment_id: id("job-1"),
                        version: 2,
                    }),
                )],
            ),
        ),
        (
            "blob_chunk",
            Uplink::BlobChunk(BlobChunk {
                sha256: [0xaa; 32],
                offset: 0,
                total_len: 3,
                data: BoundedVec::try_from_slice(&[1, 2, 3]).unwrap(),
            }),
        ),
    ]
}

pub fn downlink_samples() -> Vec<(&'static str, Downlink)> {
    vec![
        (
            "ack",
            Downlink::Ack(Ack {
                epoch: 3,
                ranges: BoundedVec::try_from_slice(&[
                    SeqRange { first: 1, last: 60 },
                    SeqRange {
                        first: 62,
                        last: 62,
                    },
                ])
                .unwrap(),
            }),
        ),
        (
            "assignment",
            Downlink::Assignment(Assignment {
                id: id("job-1"),
                version: 2,
                stops: BoundedVec::try_from_iter([
                    Stop {
                        id: id("stop-1"),
                        name: BoundedString::try_from_str("Depot").unwrap(),
                        address: BoundedString::try_from_str("Kade 1").unwrap(),
                        shipment_ids: BoundedVec::try_from_iter([id("shp-9")]).unwrap(),
                        fence: Fence::Circle {
                            center: Point {
                                lat_e7: 523_700_000,
                                lon_e7: 48_900_000,
                            },
                            radius_m: 75,
                        },
                        window: Some(Window {
                            start_ms: T0,
                            end_ms: T0 + 3_600_000,
                        }),
                    },
                    Stop {
                        id: id("stop-2"),
                        name: BoundedString::try_from_str("Shop").unwrap(),
                        address: BoundedString::new(),
                        shipment_ids: BoundedVec::new(),
                        fence: Fence::Polygon {
                            points: BoundedVec::try_from_slice(&[
                                Point {
                                    lat_e7: 0,
                                    lon_e7: 0,
                                },
                                Point {
                                    lat_e7: 10,
                                    lon_e7: 0,
                                },
                                Point {
                                    lat_e7: 10,
                                    lon_e7: 10,
                                },
                            ])
                            .unwrap(),
                        },
                        window: None,
                    },
                ])
                .unwrap(),
            }),
        ),
        (
            "config",
            Downlink::Config(Config {
                version: 1,
                health_interval_s: Some(60),
                batch_max_delay_ms: None,
            }),
        ),
        (
            "command",
            Downlink::Command(Command {
                id: id("cmd-1"),
                kind: CommandKind::Resync,
            }),
        ),
        (
            "blob_ack",
            Downlink::BlobAck(BlobAck { sha256: [0xaa; 32] }),
        ),
    ]
}

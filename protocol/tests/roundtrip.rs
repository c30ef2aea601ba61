//! Round-trip property tests: every generated message decodes to exactly what was
//! encoded, and no byte string makes the decoder panic.
#![allow(clippy::unwrap_used)]

mod common;

use fleetsync_protocol::frame;
use fleetsync_protocol::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn text<const N: usize>() -> impl Strategy<Value = BoundedString<N>> {
    // Multi-byte characters included; trimmed to the byte limit on a char boundary.
    "\\PC{0,40}".prop_map(|s: String| {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        BoundedString::try_from_str(&s[..end]).unwrap()
    })
}

fn fix() -> impl Strategy<Value = Fix> {
    (
        -900_000_000i32..=900_000_000,
        -1_800_000_000i32..=1_800_000_000,
        option::of(any::<u16>()),
        option::of(0u16..3600),
        option::of(any::<u16>()),
        option::of(any::<u8>()),
    )
        .prop_map(
            |(lat_e7, lon_e7, speed_cmps, heading_ddeg, hdop_d, satellites)| Fix {
                lat_e7,
                lon_e7,
                speed_cmps,
                heading_ddeg,
                hdop_d,
                satellites,
            },
        )
}

fn point() -> impl Strategy<Value = Point> {
    (any::<i32>(), any::<i32>()).prop_map(|(lat_e7, lon_e7)| Point { lat_e7, lon_e7 })
}

fn blob_ref() -> impl Strategy<Value = BlobRef> {
    (
        any::<[u8; 32]>(),
        any::<u32>(),
        prop_oneof![
            Just(MediaType::Png),
            Just(MediaType::Svg),
            Just(MediaType::Jpeg),
            Just(MediaType::Heic)
        ],
    )
        .prop_map(|(sha256, len, media)| BlobRef { sha256, len, media })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => fix().prop_map(Body::Position),
        1 => (text(), prop_oneof![Just(Transition::Enter), Just(Transition::Exit), Just(Transition::Dwell)])
            .prop_map(|(fence_id, transition)| Body::Geofence(Geofence { fence_id, transition })),
        1 => (0usize..6, option::of(text())).prop_map(|(k, stop_id)| Body::Trip(Trip {
            kind: [TripKind::IgnitionOn, TripKind::IgnitionOff, TripKind::Departed, TripKind::Arrived, TripKind::Stationary, TripKind::Moving][k],
            stop_id,
        })),
        1 => (text(), text(), text(), 0usize..4, option::of(text()), text(), option::of(text()), option::of(blob_ref()), vec(blob_ref(), 0..=8), option::of(point()))
            .prop_map(|(pod_id, shipment_id, stop_id, o, reason_code, recipient_name, notes, signature, photos, geo)| Body::Pod(Pod {
                pod_id, shipment_id, stop_id,
                outcome: [Outcome::Delivered, Outcome::Refused, Outcome::Damaged, Outcome::Partial][o],
                reason_code, recipient_name, notes, signature,
                photos: BoundedVec::try_from_iter(photos).unwrap(),
                geo,
            })),
        1 => (text(), text(), option::of(text())).prop_map(|(code, text, stop_id)| Body::Exception(Exception { code, text, stop_id })),
        1 => (any::<(u32, u32, u64, u64, u32)>(), text(), any::<(u32, u32, u32, u32, Option<u32>)>()).prop_map(|(a, version, l)| Body::Health(Health {
            backlog_critical: a.0, backlog_telemetry: a.1, disk_used_bytes: a.2, disk_quota_bytes: a.3, uptime_s: a.4, version,
            link: LinkStats { connects: l.0, disconnects: l.1, batches_sent: l.2, resends: l.3, last_ack_rtt_ms: l.4 },
        })),
        1 => (any::<bool>(), any::<(u32, u64, u64, u32)>(), any::<bool>()).prop_map(|(crit, g, q)| Body::Gap(Gap {
            lane: if crit { Lane::Critical } else { Lane::Telemetry }, epoch: g.0, first_seq: g.1, last_seq: g.2, count: g.3,
            reason: if q { GapReason::Quota } else { GapReason::Corruption },
        })),
        1 => (text(), any::<u32>()).prop_map(|(assignment_id, version)| Body::AssignmentAck(AssignmentAck { assignment_id, version })),
    ]
}

/// Event times that look like a drive (mostly 1 s apart) and sometimes jump anywhere.
fn events() -> impl Strategy<Value = Vec<Event>> {
    (
        any::<u64>(),
        vec(
            (
                prop_oneof![8 => Just(1000u64), 1 => 0u64..5000, 1 => any::<u64>()],
                body(),
            ),
            1..80,
        ),
    )
        .prop_map(|(start, items)| {
            let mut t = start;
            items
                .into_iter()
                .map(|(step, body)| {
                    t = t.wrapping_add(step);
                    Event { time_ms: t, body }
                })
                .collect()
        })
}

fn uplink() -> impl Strategy<Value = Uplink> {
    prop_oneof![
        4 => (any::<u32>(), 0u64..u64::MAX / 2, events()).prop_map(|(epoch, first_seq, ev)| Uplink::Batch(Batch {
            epoch, first_seq, events: BoundedVec::try_from_iter(ev).unwrap(),
        })),
        1 => (any::<[u8; 32]>(), any::<u32>(), any::<u32>(), vec(any::<u8>(), 0..2000)).prop_map(|(sha256, offset, total_len, data)| {
            Uplink::BlobChunk(BlobChunk { sha256, offset, total_len, data: BoundedVec::try_from_iter(data).unwrap() })
        }),
    ]
}

fn downlink() -> impl Strategy<Value = Downlink> {
    let fence = prop_oneof![
        (point(), any::<u32>()).prop_map(|(center, radius_m)| Fence::Circle { center, radius_m }),
        vec(point(), 3..32).prop_map(|p| Fence::Polygon {
            points: BoundedVec::try_from_iter(p).unwrap()
        }),
    ];
    let stop = (
        text(),
        text(),
        text(),
        vec(text(), 0..4),
        fence,
        option::of(any::<(u64, u64)>()),
    )
        .prop_map(|(id, name, address, ships, fence, w)| Stop {
            id,
            name,
            address,
            shipment_ids: BoundedVec::try_from_iter(ships).unwrap(),
            fence,
            window: w.map(|(start_ms, end_ms)| Window { start_ms, end_ms }),
        });
    prop_oneof![
        (any::<u32>(), vec(any::<(u64, u64)>(), 0..64)).prop_map(|(epoch, r)| Downlink::Ack(Ack {
            epoch,
            ranges: BoundedVec::try_from_iter(
                r.into_iter().map(|(first, last)| SeqRange { first, last })
            )
            .unwrap(),
        })),
        (text(), any::<u32>(), vec(stop, 0..6)).prop_map(|(id, version, stops)| {
            Downlink::Assignment(Assignment {
                id,
                version,
                stops: BoundedVec::try_from_iter(stops).unwrap(),
            })
        }),
        any::<(u32, Option<u32>, Option<u32>)>().prop_map(
            |(version, health_interval_s, batch_max_delay_ms)| Downlink::Config(Config {
                version,
                health_interval_s,
                batch_max_delay_ms,
            })
        ),
        (text(), any::<bool>()).prop_map(|(id, r)| Downlink::Command(Command {
            id,
            kind: if r {
                CommandKind::Resync
            } else {
                CommandKind::SendHealth
            }
        })),
        any::<[u8; 32]>().prop_map(|sha256| Downlink::BlobAck(BlobAck { sha256 })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn uplink_round_trips(msg in uplink()) {
        let bytes = frame::encode(&msg).unwrap();
        let mut buf = vec![0u8; bytes.len()];
        prop_assert_eq!(&*frame::encode_into(&msg, &mut buf).unwrap(), &bytes[..]);
        prop_assert_eq!(frame::decode::<Uplink>(&bytes).unwrap(), msg);
    }

    #[test]
    fn downlink_round_trips(msg in downlink()) {
        let bytes = frame::encode(&msg).unwrap();
        prop_assert_eq!(frame::decode::<Downlink>(&bytes).unwrap(), msg);
    }

    #[test]
    fn any_bytes_decode_without_panic(bytes in vec(any::<u8>(), 0..512)) {
        let _ = frame::decode::<Uplink>(&bytes);
        let _ = frame::decode::<Downlink>(&bytes);
    }

    #[test]
    fn corrupted_frames_never_panic(msg in uplink(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = frame::encode(&msg).unwrap();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v | 1;
        }
        let _ = frame::decode::<Uplink>(&bytes);
        // Every proper prefix is refused (a frame is never half-read).
        let cut = bytes.len() / 2;
        prop_assert!(frame::decode::<Uplink>(&frame::encode(&msg).unwrap()[..cut]).is_err());
    }
}

#[test]
fn typed_errors() {
    use fleetsync_protocol::Error;
    assert_eq!(frame::decode::<Uplink>(&[]), Err(Error::Empty));
    assert_eq!(
        frame::decode::<Uplink>(&[9, 0]),
        Err(Error::UnsupportedVersion(9))
    );
    let big = vec![1u8; limits::MAX_FRAME_BYTES + 1];
    assert!(matches!(
        frame::decode::<Uplink>(&big),
        Err(Error::TooLarge { .. })
    ));
    let (_, ack) = common::downlink_samples().remove(0);
    let mut bytes = frame::encode(&ack).unwrap();
    bytes.push(0);
    assert_eq!(
        frame::decode::<Downlink>(&bytes),
        Err(Error::TrailingBytes(1))
    );
    // A length prefix claiming a huge sequence is refused without allocating it.
    let hostile = [1u8, 0, 3, 10, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(matches!(
        frame::decode::<Uplink>(&hostile),
        Err(Error::Malformed(_))
    ));
    // Reserved position flags are refused.
    let reserved = [1u8, 0, 3, 10, 1, 0, 0x40];
    assert!(matches!(
        frame::decode::<Uplink>(&reserved),
        Err(Error::Malformed(_))
    ));
}

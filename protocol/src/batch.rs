//! `Batch`: events with consecutive seqs, and their compact wire form.
//!
//! The event at index `i` has identity `(device, epoch, first_seq + i)`.
//!
//! Wire layout (postcard: varints are LEB128, signed ones zigzag):
//!
//! ```text
//! Batch   { epoch: varint u32, first_seq: varint u64, count: varint, events: [Wire; count] }
//! Wire    = tag: varint (the Body variant index), then
//!   tag 0 (position):  flags: u8, then only the fields whose flag is set:
//!       bit0  ddt:   i64   second difference of time (ms)      dt  = t - t_prev_fix
//!       bit1  ddlat: i64, ddlon: i64  second difference of lat/lon (1e-7 deg)
//!       bit2  dspeed: i32  bit3 dheading: i32  bit4 dhdop: i32  bit5 dsats: i32
//!             (each optional field as o = 0 for None, value + 1 for Some, delta to previous)
//!       bits 6..7 are reserved and must be 0.
//!   other tags:        dtime: i64 (time minus the previous event's time), then the body.
//! ```
//!
//! The state before the first fix of a batch is all zero, so a batch decodes on its own;
//! the first fix leaves no velocity behind (its time and position are absolute).
//! A vehicle at steady speed on a straight road costs tag + flags (2 bytes) per fix; the
//! benchmark in `benches/codec.rs` measures a realistic drive.

use core::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bounded::BoundedVec;
use crate::limits::MAX_BATCH_EVENTS;
use crate::message::{
    AssignmentAck, Body, Event, Exception, Fix, Gap, Geofence, Health, Pod, Trip,
};

/// Events with consecutive seqs `first_seq..first_seq + events.len()` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The device's boot epoch.
    pub epoch: u32,
    /// Seq of the first event.
    pub first_seq: u64,
    /// The events.
    pub events: BoundedVec<Event, MAX_BATCH_EVENTS>,
}

impl Batch {
    /// The seq of the last event (`first_seq` for an empty batch, which the decoder refuses).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + (self.events.len() as u64).saturating_sub(1)
    }
}

const F_TIME: u8 = 1;
const F_MOVE: u8 = 1 << 1;
const F_SPEED: u8 = 1 << 2;
const F_HEADING: u8 = 1 << 3;
const F_HDOP: u8 = 1 << 4;
const F_SATS: u8 = 1 << 5;
const F_RESERVED: u8 = 0b1100_0000;

/// Running state of the delta coder.
#[derive(Default, Clone, Copy)]
struct State {
    /// A fix has been coded: until then the first fix is coded absolute and leaves no
    /// velocity behind (so the second fix of a batch codes a plain first difference).
    has_fix: bool,
    last_time: u64,
    fix_time: u64,
    fix_dt: i64,
    lat: i32,
    lon: i32,
    dlat: i64,
    dlon: i64,
    speed: u32,
    heading: u32,
    hdop: u32,
    sats: u32,
}

fn opt16(v: Option<u16>) -> u32 {
    v.map_or(0, |v| u32::from(v) + 1)
}

fn opt8(v: Option<u8>) -> u32 {
    v.map_or(0, |v| u32::from(v) + 1)
}

fn delta(new: u32, old: u32) -> i32 {
    // Both are at most u16::MAX + 1, so the difference fits.
    (i64::from(new) - i64::from(old)) as i32
}

/// The position record on the wire (see the module note).
#[derive(Default, Clone, Copy)]
struct FixDelta {
    flags: u8,
    ddt: i64,
    ddlat: i64,
    ddlon: i64,
    dspeed: i32,
    dheading: i32,
    dhdop: i32,
    dsats: i32,
}

impl State {
    fn encode_fix(&mut self, time: u64, fix: &Fix) -> FixDelta {
        let dt = time.wrapping_sub(self.fix_time) as i64;
        let dlat = i64::from(fix.lat_e7) - i64::from(self.lat);
        let dlon = i64::from(fix.lon_e7) - i64::from(self.lon);
        let (speed, heading, hdop, sats) = (
            opt16(fix.speed_cmps),
            opt16(fix.heading_ddeg),
            opt16(fix.hdop_d),
            opt8(fix.satellites),
        );
        let mut d = FixDelta {
            ddt: dt.wrapping_sub(self.fix_dt),
            ddlat: dlat - self.dlat,
            ddlon: dlon - self.dlon,
            dspeed: delta(speed, self.speed),
            dheading: delta(heading, self.heading),
            dhdop: delta(hdop, self.hdop),
            dsats: delta(sats, self.sats),
            ..FixDelta::default()
        };
        for (set, bit) in [
            (d.ddt != 0, F_TIME),
            (d.ddlat != 0 || d.ddlon != 0, F_MOVE),
            (d.dspeed != 0, F_SPEED),
            (d.dheading != 0, F_HEADING),
            (d.dhdop != 0, F_HDOP),
            (d.dsats != 0, F_SATS),
        ] {
            if set {
                d.flags |= bit;
            }
        }
        let first = !self.has_fix;
        *self = State {
            has_fix: true,
            last_time: time,
            fix_time: time,
            fix_dt: if first { 0 } else { dt },
            lat: fix.lat_e7,
            lon: fix.lon_e7,
            dlat: if first { 0 } else { dlat },
            dlon: if first { 0 } else { dlon },
            speed,
            heading,
            hdop,
            sats,
        };
        d
    }

    fn decode_fix(&mut self, d: &FixDelta) -> Option<(u64, Fix)> {
        let dt = self.fix_dt.wrapping_add(d.ddt);
        let time = self.fix_time.wrapping_add(dt as u64);
        let dlat = self.dlat.checked_add(d.ddlat)?;
        let dlon = self.dlon.checked_add(d.ddlon)?;
        let lat = i32::try_from(i64::from(self.lat).checked_add(dlat)?).ok()?;
        let lon = i32::try_from(i64::from(self.lon).checked_add(dlon)?).ok()?;
        let apply = |old: u32, d: i32, max: u32| -> Option<u32> {
            let v = i64::from(old) + i64::from(d);
            (0..=i64::from(max)).contains(&v).then_some(v as u32)
        };
        let speed = apply(self.speed, d.dspeed, u32::from(u16::MAX) + 1)?;
        let heading = apply(self.heading, d.dheading, u32::from(u16::MAX) + 1)?;
        let hdop = apply(self.hdop, d.dhdop, u32::from(u16::MAX) + 1)?;
        let sats = apply(self.sats, d.dsats, u32::from(u8::MAX) + 1)?;
        let un16 = |o: u32| o.checked_sub(1).map(|v| v as u16);
        let fix = Fix {
            lat_e7: lat,
            lon_e7: lon,
            speed_cmps: un16(speed),
            heading_ddeg: un16(heading),
            hdop_d: un16(hdop),
            satellites: sats.checked_sub(1).map(|v| v as u8),
        };
        let first = !self.has_fix;
        *self = State {
            has_fix: true,
            last_time: time,
            fix_time: time,
            fix_dt: if first { 0 } else { dt },
            lat,
            lon,
            dlat: if first { 0 } else { dlat },
            dlon: if first { 0 } else { dlon },
            speed,
            heading,
            hdop,
            sats,
        };
        Some((time, fix))
    }
}

impl Serialize for FixDelta {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let f = self.flags;
        let n = 1
            + usize::from(f & F_TIME != 0)
            + 2 * usize::from(f & F_MOVE != 0)
            + [F_SPEED, F_HEADING, F_HDOP, F_SATS]
                .iter()
                .filter(|b| f & **b != 0)
                .count();
        let mut t = serializer.serialize_tuple(n)?;
        t.serialize_element(&f)?;
        if f & F_TIME != 0 {
            t.serialize_element(&self.ddt)?;
        }
        if f & F_MOVE != 0 {
            t.serialize_element(&self.ddlat)?;
            t.serialize_element(&self.ddlon)?;
        }
        for (bit, v) in [
            (F_SPEED, self.dspeed),
            (F_HEADING, self.dheading),
            (F_HDOP, self.dhdop),
            (F_SATS, self.dsats),
        ] {
            if f & bit != 0 {
                t.serialize_element(&v)?;
            }
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for FixDelta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FixDelta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a delta-coded position")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FixDelta, A::Error> {
                fn next<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
                    seq: &mut A,
                ) -> Result<T, A::Error> {
                    seq.next_element()?
                        .ok_or_else(|| de::Error::custom("truncated position"))
                }
                let mut d = FixDelta {
                    flags: next(&mut seq)?,
                    ..FixDelta::default()
                };
                if d.flags & F_RESERVED != 0 {
                    return Err(de::Error::custom("reserved position flag set"));
                }
                if d.flags & F_TIME != 0 {
                    d.ddt = next(&mut seq)?;
                }
                if d.flags & F_MOVE != 0 {
                    d.ddlat = next(&mut seq)?;
                    d.ddlon = next(&mut seq)?;
                }
                if d.flags & F_SPEED != 0 {
                    d.dspeed = next(&mut seq)?;
                }
                if d.flags & F_HEADING != 0 {
                    d.dheading = next(&mut seq)?;
                }
                if d.flags & F_HDOP != 0 {
                    d.dhdop = next(&mut seq)?;
                }
                if d.flags & F_SATS != 0 {
                    d.dsats = next(&mut seq)?;
                }
                Ok(d)
            }
        }
        // postcard reads tuple elements on demand, so the visitor takes only the fields
        // the flags announce; 8 is the most there can be.
        deserializer.deserialize_tuple(8, V)
    }
}

/// An event as it goes on the wire (borrowing the event). Variant order = `Body`.
#[derive(Serialize)]
enum WireRef<'a> {
    Position(FixDelta),
    Geofence(i64, &'a Geofence),
    Trip(i64, &'a Trip),
    Pod(i64, &'a Pod),
    Exception(i64, &'a Exception),
    Health(i64, &'a Health),
    Gap(i64, &'a Gap),
    AssignmentAck(i64, &'a AssignmentAck),
}

/// An event as it comes off the wire. Variant order = `Body`.
#[derive(Deserialize)]
// Without an allocator there is no Box: variants are stored inline on purpose.
#[allow(clippy::large_enum_variant)]
enum WireOwned {
    Position(FixDelta),
    Geofence(i64, Geofence),
    Trip(i64, Trip),
    Pod(i64, Pod),
    Exception(i64, Exception),
    Health(i64, Health),
    Gap(i64, Gap),
    AssignmentAck(i64, AssignmentAck),
}

struct EventsRef<'a>(&'a [Event]);

impl Serialize for EventsRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut state = State::default();
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for ev in self.0 {
            let dt = ev.time_ms.wrapping_sub(state.last_time) as i64;
            let wire = match &ev.body {
                Body::Position(fix) => WireRef::Position(state.encode_fix(ev.time_ms, fix)),
                Body::Geofence(b) => WireRef::Geofence(dt, b),
                Body::Trip(b) => WireRef::Trip(dt, b),
                Body::Pod(b) => WireRef::Pod(dt, b),
                Body::Exception(b) => WireRef::Exception(dt, b),
                Body::Health(b) => WireRef::Health(dt, b),
                Body::Gap(b) => WireRef::Gap(dt, b),
                Body::AssignmentAck(b) => WireRef::AssignmentAck(dt, b),
            };
            state.last_time = ev.time_ms;
            seq.serialize_element(&wire)?;
        }
        seq.end()
    }
}

struct EventsOwned(BoundedVec<Event, MAX_BATCH_EVENTS>);

impl<'de> Deserialize<'de> for EventsOwned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EventsOwned;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX_BATCH_EVENTS} events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EventsOwned, A::Error> {
                if seq.size_hint().is_some_and(|n| n > MAX_BATCH_EVENTS) {
                    return Err(de::Error::custom("too many events in batch"));
                }
                let mut state = State::default();
                let mut out = BoundedVec::new();
                while let Some(wire) = seq.next_element::<WireOwned>()? {
                    let (time_ms, body) = match wire {
                        WireOwned::Position(d) => {
                            let (t, fix) = state
                                .decode_fix(&d)
                                .ok_or_else(|| de::Error::custom("position out of range"))?;
                            (t, Body::Position(fix))
                        }
                        WireOwned::Geofence(dt, b) => (dt, Body::Geofence(b)).into_abs(&state),
                        WireOwned::Trip(dt, b) => (dt, Body::Trip(b)).into_abs(&state),
                        WireOwned::Pod(dt, b) => (dt, Body::Pod(b)).into_abs(&state),
                        WireOwned::Exception(dt, b) => (dt, Body::Exception(b)).into_abs(&state),
                        WireOwned::Health(dt, b) => (dt, Body::Health(b)).into_abs(&state),
                        WireOwned::Gap(dt, b) => (dt, Body::Gap(b)).into_abs(&state),
                        WireOwned::AssignmentAck(dt, b) => {
                            (dt, Body::AssignmentAck(b)).into_abs(&state)
                        }
                    };
                    state.last_time = time_ms;
                    if out.push(Event { time_ms, body }).is_err() {
                        return Err(de::Error::custom("too many events in batch"));
                    }
                }
                Ok(EventsOwned(out))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

trait IntoAbs {
    fn into_abs(self, state: &State) -> (u64, Body);
}

impl IntoAbs for (i64, Body) {
    fn into_abs(self, state: &State) -> (u64, Body) {
        (state.last_time.wrapping_add(self.0 as u64), self.1)
    }
}

impl Serialize for Batch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(3)?;
        t.serialize_element(&self.epoch)?;
        t.serialize_element(&self.first_seq)?;
        t.serialize_element(&EventsRef(&self.events))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Batch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a batch")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Batch, A::Error> {
                let missing = || de::Error::custom("truncated batch");
                let epoch = seq.next_element()?.ok_or_else(missing)?;
                let first_seq: u64 = seq.next_element()?.ok_or_else(missing)?;
                let events: EventsOwned = seq.next_element()?.ok_or_else(missing)?;
                if events.0.is_empty() {
                    return Err(de::Error::custom("empty batch"));
                }
                if first_seq.checked_add(events.0.len() as u64).is_none() {
                    return Err(de::Error::custom("seq overflow"));
                }
                Ok(Batch {
                    epoch,
                    first_seq,
                    events: events.0,
                })
            }
        }
        deserializer.deserialize_tuple(3, V)
    }
}

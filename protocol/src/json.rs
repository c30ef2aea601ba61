//! The one JSON shape of an event, shared by the agent's `POST /v1/events` and the hub's
//! events API (feature `json`).
//!
//! ```text
//! { "kind": "position", "event_time": "2026-11-27T10:00:00Z", "lat": 52.37, "lon": 4.89,
//!   "speed_mps"?: 13.9, "heading_deg"?: 181.5, "hdop"?: 0.9, "satellites"?: 9 }
//! ```
//!
//! `kind` is snake_case, `event_time` RFC 3339 (kept to the millisecond, written in UTC),
//! then the kind's fields (see [`EventJson`]). Precision on the wire, and so after a round
//! trip: lat/lon 1e-7 degree, speed 0.01 m/s, heading 0.1 degree, hdop 0.1. Values outside
//! a field's range are refused with the field named, never clamped.

use std::fmt;
use std::string::{String, ToString};
use std::vec::Vec;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bounded::{BoundedString, BoundedVec};
use crate::message::{
    AssignmentAck, BlobRef, Body, Event, Exception, Fix, Gap, GapReason, Geofence, Health, Lane,
    LinkStats, MediaType, Outcome, Pod, Point, Sha256, Transition, Trip, TripKind,
};

/// A capture or record time: ms since the Unix epoch, RFC 3339 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub u64);

impl Time {
    /// RFC 3339 in UTC with milliseconds when they are not zero.
    pub fn to_rfc3339(self) -> String {
        let ms = i64::try_from(self.0).unwrap_or(i64::MAX);
        match DateTime::<Utc>::from_timestamp_millis(ms) {
            Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            None => "invalid".to_string(),
        }
    }

    /// Parses RFC 3339 (any offset); sub-millisecond digits are truncated.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = DateTime::parse_from_rfc3339(s)
            .map_err(|e| format!("expected an RFC 3339 time like 2026-11-27T10:00:00Z ({e})"))?;
        u64::try_from(t.timestamp_millis())
            .map(Time)
            .map_err(|_| "time before 1970 is not accepted".to_string())
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Time::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A blob reference in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobJson {
    /// Lower-case hex sha256.
    pub sha256: String,
    /// Length in bytes.
    pub len: u32,
    /// `image/png`, `image/svg+xml`, `image/jpeg` or `image/heic`.
    pub media_type: MediaType,
}

/// A point in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointJson {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

/// An event in JSON, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)]
pub enum EventJson {
    Position {
        event_time: Time,
        lat: f64,
        lon: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed_mps: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heading_deg: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hdop: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        satellites: Option<u8>,
    },
    Geofence {
        event_time: Time,
        fence_id: String,
        transition: Transition,
    },
    Trip {
        event_time: Time,
        trip: TripKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_id: Option<String>,
    },
    Pod {
        event_time: Time,
        pod_id: String,
        shipment_id: String,
        stop_id: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
        recipient_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notes: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<BlobJson>,
        #[serde(default)]
        photos: Vec<BlobJson>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        geo: Option<PointJson>,
    },
    Exception {
        event_time: Time,
        code: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_id: Option<String>,
    },
    Health {
        event_time: Time,
        backlog_critical: u32,
        backlog_telemetry: u32,
        disk_used_bytes: u64,
        disk_quota_bytes: u64,
        uptime_s: u32,
        version: String,
        #[serde(default)]
        link: LinkStats,
    },
    Gap {
        event_time: Time,
        lane: Lane,
        /// The epoch of the dropped events. Named apart from the `epoch` of the event's
        /// own identity, which the hub's events API puts beside it.
        #[serde(rename = "dropped_epoch")]
        epoch: u32,
        first_seq: u64,
        last_seq: u64,
        count: u32,
        reason: GapReason,
    },
    AssignmentAck {
        event_time: Time,
        assignment_id: String,
        version: u32,
    },
}

/// A JSON event that does not fit the wire format: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field.
    pub field: &'static str,
    /// What was expected.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

fn err(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        reason: reason.into(),
    }
}

/// Converts degrees to 1e-7 degree, refusing values outside `-limit..=limit`.
pub fn deg_to_e7(field: &'static str, v: f64, limit: f64) -> Result<i32, FieldError> {
    if !v.is_finite() || v < -limit || v > limit {
        return Err(err(
            field,
            format!("must be a number between -{limit} and {limit}"),
        ));
    }
    Ok((v * 1e7).round() as i32)
}

/// 1e-7 degree to degrees.
pub fn e7_to_deg(v: i32) -> f64 {
    f64::from(v) / 1e7
}

fn scaled(
    field: &'static str,
    v: Option<f64>,
    scale: f64,
    max: f64,
) -> Result<Option<u16>, FieldError> {
    let Some(v) = v else { return Ok(None) };
    if !v.is_finite() || v < 0.0 || v > max {
        return Err(err(field, format!("must be a number between 0 and {max}")));
    }
    Ok(Some((v * scale).round() as u16))
}

fn unscaled(v: Option<u16>, scale: f64) -> Option<f64> {
    v.map(|v| f64::from(v) / scale)
}

fn text<const N: usize>(field: &'static str, v: &str) -> Result<BoundedString<N>, FieldError> {
    BoundedString::try_from_str(v).map_err(|_| err(field, format!("longer than {N} bytes")))
}

fn id<const N: usize>(field: &'static str, v: &str) -> Result<BoundedString<N>, FieldError> {
    if v.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    text(field, v)
}

fn opt_text<const N: usize>(
    field: &'static str,
    v: &Option<String>,
) -> Result<Option<BoundedString<N>>, FieldError> {
    v.as_deref().map(|v| text(field, v)).transpose()
}

fn blob(field: &'static str, b: &BlobJson) -> Result<BlobRef, FieldError> {
    Ok(BlobRef {
        sha256: parse_sha256(&b.sha256)
            .ok_or_else(|| err(field, "sha256 must be 64 hex digits"))?,
        len: b.len,
        media: b.media_type,
    })
}

fn blob_json(b: &BlobRef) -> BlobJson {
    BlobJson {
        sha256: sha256_hex(&b.sha256),
        len: b.len,
        media_type: b.media,
    }
}

/// Lower-case hex of a digest.
pub fn sha256_hex(h: &Sha256) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(64);
    for b in h {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 64 hex digits.
pub fn parse_sha256(s: &str) -> Option<Sha256> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl EventJson {
    /// The capture time.
    pub fn event_time(&self) -> Time {
        match self {
            EventJson::Position { event_time, .. }
            | EventJson::Geofence { event_time, .. }
            | EventJson::Trip { event_time, .. }
            | EventJson::Pod { event_time, .. }
            | EventJson::Exception { event_time, .. }
            | EventJson::Health { event_time, .. }
            | EventJson::Gap { event_time, .. }
            | EventJson::AssignmentAck { event_time, .. } => *event_time,
        }
    }

    /// Converts to the wire event, checking every field against the wire's limits.
    pub fn to_event(&self) -> Result<Event, FieldError> {
        let body = match self {
            EventJson::Position {
                lat,
                lon,
                speed_mps,
                heading_deg,
                hdop,
                satellites,
                ..
            } => Body::Position(Fix {
                lat_e7: deg_to_e7("lat", *lat, 90.0)?,
                lon_e7: deg_to_e7("lon", *lon, 180.0)?,
                speed_cmps: scaled("speed_mps", *speed_mps, 100.0, 655.35)?,
                heading_ddeg: scaled("heading_deg", *heading_deg, 10.0, 360.0)?.map(|h| h % 3600),
                hdop_d: scaled("hdop", *hdop, 10.0, 6553.5)?,
                satellites: *satellites,
            }),
            EventJson::Geofence {
                fence_id,
                transition,
                ..
            } => Body::Geofence(Geofence {
                fence_id: id("fence_id", fence_id)?,
                transition: *transition,
            }),
            EventJson::Trip { trip, stop_id, .. } => Body::Trip(Trip {
                kind: *trip,
                stop_id: opt_text("stop_id", stop_id)?,
            }),
            EventJson::Pod {
                pod_id,
                shipment_id,
                stop_id,
                outcome,
                reason_code,
                recipient_name,
                notes,
                signature,
                photos,
                geo,
                ..
            } => {
                if *outcome != Outcome::Delivered
                    && reason_code.as_deref().is_none_or(str::is_empty)
                {
                    return Err(err(
                        "reason_code",
                        "required unless the outcome is delivered",
                    ));
                }
                let photos: Vec<BlobRef> = photos
                    .iter()
                    .map(|p| blob("photos", p))
                    .collect::<Result<_, _>>()?;
                Body::Pod(Pod {
                    pod_id: id("pod_id", pod_id)?,
                    shipment_id: id("shipment_id", shipment_id)?,
                    stop_id: id("stop_id", stop_id)?,
                    outcome: *outcome,
                    reason_code: opt_text("reason_code", reason_code)?,
                    recipient_name: text("recipient_name", recipient_name)?,
                    notes: opt_text("notes", notes)?,
                    signature: signature
                        .as_ref()
                        .map(|s| blob("signature", s))
                        .transpose()?,
                    photos: BoundedVec::try_from_slice(&photos)
                        .map_err(|_| err("photos", "too many photos"))?,
                    geo: geo
                        .map(|g| {
                            Ok::<_, FieldError>(Point {
                                lat_e7: deg_to_e7("geo.lat", g.lat, 90.0)?,
                                lon_e7: deg_to_e7("geo.lon", g.lon, 180.0)?,
                            })
                        })
                        .transpose()?,
                })
            }
            EventJson::Exception {
                code,
                text: t,
                stop_id,
                ..
            } => Body::Exception(Exception {
                code: id("code", code)?,
                text: text("text", t)?,
                stop_id: opt_text("stop_id", stop_id)?,
            }),
            EventJson::Health {
                backlog_critical,
                backlog_telemetry,
                disk_used_bytes,
                disk_quota_bytes,
                uptime_s,
                version,
                link,
                ..
            } => Body::Health(Health {
                backlog_critical: *backlog_critical,
                backlog_telemetry: *backlog_telemetry,
                disk_used_bytes: *disk_used_bytes,
                disk_quota_bytes: *disk_quota_bytes,
                uptime_s: *uptime_s,
                version: text("version", version)?,
                link: *link,
            }),
            EventJson::Gap {
                lane,
                epoch,
                first_seq,
                last_seq,
                count,
                reason,
                ..
            } => {
                if last_seq < first_seq {
                    return Err(err("last_seq", "must not be below first_seq"));
                }
                Body::Gap(Gap {
                    lane: *lane,
                    epoch: *epoch,
                    first_seq: *first_seq,
                    last_seq: *last_seq,
                    count: *count,
                    reason: *reason,
                })
            }
            EventJson::AssignmentAck {
                assignment_id,
                version,
                ..
            } => Body::AssignmentAck(AssignmentAck {
                assignment_id: id("assignment_id", assignment_id)?,
                version: *version,
            }),
        };
        Ok(Event {
            time_ms: self.event_time().0,
            body,
        })
    }

    /// The JSON form of a wire event.
    pub fn from_event(ev: &Event) -> Self {
        let event_time = Time(ev.time_ms);
        let s = |v: &str| v.to_string();
        match &ev.body {
            Body::Position(f) => EventJson::Position {
                event_time,
                lat: e7_to_deg(f.lat_e7),
                lon: e7_to_deg(f.lon_e7),
                speed_mps: unscaled(f.speed_cmps, 100.0),
                heading_deg: unscaled(f.heading_ddeg, 10.0),
                hdop: unscaled(f.hdop_d, 10.0),
                satellites: f.satellites,
            },
            Body::Geofence(g) => EventJson::Geofence {
                event_time,
                fence_id: s(&g.fence_id),
                transition: g.transition,
            },
            Body::Trip(t) => EventJson::Trip {
                event_time,
                trip: t.kind,
                stop_id: t.stop_id.as_deref().map(s),
            },
            Body::Pod(p) => EventJson::Pod {
                event_time,
                pod_id: s(&p.pod_id),
                shipment_id: s(&p.shipment_id),
                stop_id: s(&p.stop_id),
                outcome: p.outcome,
                reason_code: p.reason_code.as_deref().map(s),
                recipient_name: s(&p.recipient_name),
                notes: p.notes.as_deref().map(s),
                signature: p.signature.as_ref().map(blob_json),
                photos: p.photos.iter().map(blob_json).collect(),
                geo: p.geo.map(|g| PointJson {
                    lat: e7_to_deg(g.lat_e7),
                    lon: e7_to_deg(g.lon_e7),
                }),
            },
            Body::Exception(e) => EventJson::Exception {
                event_time,
                code: s(&e.code),
                text: s(&e.text),
                stop_id: e.stop_id.as_deref().map(s),
            },
            Body::Health(h) => EventJson::Health {
                event_time,
                backlog_critical: h.backlog_critical,
                backlog_telemetry: h.backlog_telemetry,
                disk_used_bytes: h.disk_used_bytes,
                disk_quota_bytes: h.disk_quota_bytes,
                uptime_s: h.uptime_s,
                version: s(&h.version),
                link: h.link,
            },
            Body::Gap(g) => EventJson::Gap {
                event_time,
                lane: g.lane,
                epoch: g.epoch,
                first_seq: g.first_seq,
                last_seq: g.last_seq,
                count: g.count,
                reason: g.reason,
            },
            Body::AssignmentAck(a) => EventJson::AssignmentAck {
                event_time,
                assignment_id: s(&a.assignment_id),
                version: a.version,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_in_is_position_out() {
        let input =
            r#"{"kind":"position","event_time":"2026-11-27T10:00:00Z","lat":52.37,"lon":4.89}"#;
        let j: EventJson = serde_json::from_str(input).unwrap();
        let ev = j.to_event().unwrap();
        let out = serde_json::to_string(&EventJson::from_event(&ev)).unwrap();
        assert_eq!(out, input);

        let precise = r#"{"kind":"position","event_time":"2026-11-27T10:00:00.123Z","lat":-33.8688197,"lon":151.2092955,"speed_mps":13.89,"heading_deg":181.5,"hdop":0.9,"satellites":9}"#;
        let ev = serde_json::from_str::<EventJson>(precise)
            .unwrap()
            .to_event()
            .unwrap();
        assert_eq!(
            serde_json::to_string(&EventJson::from_event(&ev)).unwrap(),
            precise
        );
    }

    #[test]
    fn a_gap_names_its_epoch_apart_from_the_event_identity() {
        let json = r#"{"kind":"gap","event_time":"2026-11-27T10:00:00Z","lane":"telemetry","dropped_epoch":3,"first_seq":10,"last_seq":19,"count":7,"reason":"quota"}"#;
        let ev: EventJson = serde_json::from_str(json).unwrap();
        let body = ev.to_event().unwrap().body;
        let Body::Gap(g) = &body else {
            panic!("not a gap: {body:?}");
        };
        assert_eq!((g.epoch, g.first_seq, g.last_seq, g.count), (3, 10, 19, 7));
        let out = serde_json::to_value(EventJson::from_event(&Event { time_ms: 0, body })).unwrap();
        assert_eq!(out["dropped_epoch"], 3);
        assert!(out.get("epoch").is_none(), "{out}");
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = r#"{"kind":"position","event_time":"2026-11-27T10:00:00Z","lat":91,"lon":4.89}"#;
        let e = serde_json::from_str::<EventJson>(bad)
            .unwrap()
            .to_event()
            .unwrap_err();
        assert_eq!(e.field, "lat");
        let e = serde_json::from_str::<EventJson>(
            r#"{"kind":"position","event_time":"yesterday","lat":1,"lon":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        let e = serde_json::from_str::<EventJson>(
            r#"{"kind":"teleport","event_time":"2026-11-27T10:00:00Z"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("teleport"), "{e}");
        let e = serde_json::from_str::<EventJson>(
            r#"{"kind":"exception","event_time":"2026-11-27T10:00:00Z","code":"x","text":"y","colour":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}

/// A fence in JSON, GeoJSON-style: coordinates are `[lon, lat]` in degrees.
///
/// ```text
/// {"type": "circle", "center": [4.8897, 52.3731], "radius_m": 75}
/// {"type": "polygon", "coordinates": [[4.88, 52.37], [4.89, 52.37], [4.89, 52.38]]}  // one ring, 3..=32 points
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)]
pub enum FenceJson {
    Circle { center: [f64; 2], radius_m: u32 },
    Polygon { coordinates: Vec<[f64; 2]> },
}

/// A delivery window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowJson {
    /// Opens.
    pub start: Time,
    /// Closes.
    pub end: Time,
}

/// A stop in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopJson {
    /// Stop id (also its fence id).
    pub id: String,
    /// Name shown to the driver.
    pub name: String,
    /// Address shown to the driver.
    #[serde(default)]
    pub address: String,
    /// Shipments handed over here.
    #[serde(default)]
    pub shipment_ids: Vec<String>,
    /// The stop's fence.
    pub fence: FenceJson,
    /// Delivery window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowJson>,
}

/// An assignment in JSON: the operator API's `PUT .../assignment` body and the driver
/// API's job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentJson {
    /// Job id.
    pub id: String,
    /// Version; must count up per device.
    pub version: u32,
    /// Stops in order.
    pub stops: Vec<StopJson>,
}

fn point_of(field: &'static str, c: [f64; 2]) -> Result<Point, FieldError> {
    Ok(Point {
        lon_e7: deg_to_e7(field, c[0], 180.0)?,
        lat_e7: deg_to_e7(field, c[1], 90.0)?,
    })
}

impl AssignmentJson {
    /// Converts to the wire form, checking every limit.
    pub fn to_assignment(&self) -> Result<crate::Assignment, FieldError> {
        use crate::limits::{MAX_POLYGON_POINTS, MAX_STOP_SHIPMENTS, MAX_STOPS};
        if self.stops.len() > MAX_STOPS {
            return Err(err("stops", format!("at most {MAX_STOPS} stops")));
        }
        let mut seen = std::collections::HashSet::new();
        let mut stops = BoundedVec::new();
        for s in &self.stops {
            if !seen.insert(s.id.as_str()) {
                return Err(err("stops.id", format!("stop id {:?} appears twice", s.id)));
            }
            if s.shipment_ids.len() > MAX_STOP_SHIPMENTS {
                return Err(err(
                    "stops.shipment_ids",
                    format!("at most {MAX_STOP_SHIPMENTS} per stop"),
                ));
            }
            let fence = match &s.fence {
                FenceJson::Circle { center, radius_m } => {
                    if !(1..=100_000).contains(radius_m) {
                        return Err(err("stops.fence.radius_m", "must be 1 to 100000 metres"));
                    }
                    crate::Fence::Circle {
                        center: point_of("stops.fence.center", *center)?,
                        radius_m: *radius_m,
                    }
                }
                FenceJson::Polygon { coordinates } => {
                    if !(3..=MAX_POLYGON_POINTS).contains(&coordinates.len()) {
                        return Err(err(
                            "stops.fence.coordinates",
                            format!("a polygon needs 3 to {MAX_POLYGON_POINTS} [lon, lat] points"),
                        ));
                    }
                    let pts: Vec<Point> = coordinates
                        .iter()
                        .map(|c| point_of("stops.fence.coordinates", *c))
                        .collect::<Result<_, _>>()?;
                    crate::Fence::Polygon {
                        points: BoundedVec::try_from_slice(&pts)
                            .map_err(|_| err("stops.fence.coordinates", "too many points"))?,
                    }
                }
            };
            if let Some(w) = s.window
                && w.end < w.start
            {
                return Err(err("stops.window", "end is before start"));
            }
            let ships: Vec<crate::Id> = s
                .shipment_ids
                .iter()
                .map(|i| id("stops.shipment_ids", i))
                .collect::<Result<_, _>>()?;
            let stop = crate::Stop {
                id: id("stops.id", &s.id)?,
                name: text("stops.name", &s.name)?,
                address: text("stops.address", &s.address)?,
                shipment_ids: BoundedVec::try_from_slice(&ships)
                    .map_err(|_| err("stops.shipment_ids", "too many"))?,
                fence,
                window: s.window.map(|w| crate::Window {
                    start_ms: w.start.0,
                    end_ms: w.end.0,
                }),
            };
            if stops.push(stop).is_err() {
                return Err(err("stops", format!("at most {MAX_STOPS} stops")));
            }
        }
        Ok(crate::Assignment {
            id: id("id", &self.id)?,
            version: self.version,
            stops,
        })
    }

    /// The JSON form of a wire assignment.
    pub fn from_assignment(a: &crate::Assignment) -> Self {
        let c = |p: &Point| [e7_to_deg(p.lon_e7), e7_to_deg(p.lat_e7)];
        AssignmentJson {
            id: a.id.to_string(),
            version: a.version,
            stops: a
                .stops
                .iter()
                .map(|s| StopJson {
                    id: s.id.to_string(),
                    name: s.name.to_string(),
                    address: s.address.to_string(),
                    shipment_ids: s.shipment_ids.iter().map(|i| i.to_string()).collect(),
                    fence: match &s.fence {
                        crate::Fence::Circle { center, radius_m } => FenceJson::Circle {
                            center: c(center),
                            radius_m: *radius_m,
                        },
                        crate::Fence::Polygon { points } => FenceJson::Polygon {
                            coordinates: points.iter().map(c).collect(),
                        },
                    },
                    window: s.window.map(|w| WindowJson {
                        start: Time(w.start_ms),
                        end: Time(w.end_ms),
                    }),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod assignment_tests {
    use super::*;

    #[test]
    fn assignment_round_trips_and_refuses_bad_fences() {
        let text = r#"{"id":"job-1","version":2,"stops":[
            {"id":"s1","name":"Depot","address":"Kade 1","shipment_ids":["shp-1"],
             "fence":{"type":"circle","center":[4.8897,52.3731],"radius_m":75},
             "window":{"start":"2026-11-27T10:00:00Z","end":"2026-11-27T12:00:00Z"}},
            {"id":"s2","name":"Shop","fence":{"type":"polygon","coordinates":[[4.88,52.37],[4.89,52.37],[4.89,52.38]]}}]}"#;
        let j: AssignmentJson = serde_json::from_str(text).unwrap();
        let a = j.to_assignment().unwrap();
        assert_eq!(AssignmentJson::from_assignment(&a), j);
        let bad = text.replace("\"radius_m\":75", "\"radius_m\":0");
        let e = serde_json::from_str::<AssignmentJson>(&bad)
            .unwrap()
            .to_assignment()
            .unwrap_err();
        assert_eq!(e.field, "stops.fence.radius_m");
        let bad = text.replace(
            "[[4.88,52.37],[4.89,52.37],[4.89,52.38]]",
            "[[4.88,52.37],[4.89,52.37]]",
        );
        let e = serde_json::from_str::<AssignmentJson>(&bad)
            .unwrap()
            .to_assignment()
            .unwrap_err();
        assert_eq!(e.field, "stops.fence.coordinates");
        let bad = text.replace("\"id\":\"s2\"", "\"id\":\"s1\"");
        let e = serde_json::from_str::<AssignmentJson>(&bad)
            .unwrap()
            .to_assignment()
            .unwrap_err();
        assert_eq!(e.field, "stops.id");
    }
}

//! What the ERP sends for a shipment (`PUT /v1/erp/shipments/{id}`), checked field by
//! field so an error names the field (`stops[1].location.lat`).

use fleetsync_protocol::json::Time;
use fleetsync_protocol::limits::{
    MAX_ID_LEN, MAX_NAME_LEN, MAX_PHOTOS, MAX_POLYGON_POINTS, MAX_STOPS, MAX_TEXT_LEN,
};
use serde::{Deserialize, Serialize};

/// Most order lines of a shipment.
pub const MAX_LINES: usize = 500;
/// Default fence radius of a stop given as a point.
pub const DEFAULT_RADIUS_M: u32 = 150;

/// A shipment as the ERP describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipmentSpec {
    /// The ERP's order reference.
    pub reference: String,
    /// The customer (portal credentials are per customer).
    pub customer_id: String,
    /// The vehicle (device id) to carry it; an operator may assign it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<String>,
    /// Stops in planned order.
    pub stops: Vec<StopSpec>,
    /// What a POD needs to be confirmed without review.
    #[serde(default)]
    pub pod_policy: PodPolicy,
    /// Order lines.
    #[serde(default)]
    pub lines: Vec<Line>,
}

/// A stop: an ERP location, its fence and window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopSpec {
    /// The ERP's location id: the same id in two shipments is the same place.
    pub id: String,
    /// Pickup or delivery.
    pub kind: StopKind,
    /// Shown to the driver.
    pub name: String,
    /// Shown to the driver.
    #[serde(default)]
    pub address: String,
    /// Centre of a circular fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<LatLon>,
    /// Radius of the circular fence (default 150 m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<u32>,
    /// A polygon fence instead: `[[lat, lon], ...]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polygon: Option<Vec<[f64; 2]>>,
    /// The time window agreed with the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
}

/// Pickup or delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopKind {
    /// Goods are loaded here.
    Pickup,
    /// Goods are handed over here.
    Delivery,
}

/// A point in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatLon {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

/// A time window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Opens.
    pub start: Time,
    /// Closes.
    pub end: Time,
}

/// What a POD must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodPolicy {
    /// A signature is required.
    #[serde(default)]
    pub signature: bool,
    /// At least this many photos.
    #[serde(default)]
    pub min_photos: u8,
}

/// An order line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// Article.
    pub sku: String,
    /// Shown to people.
    #[serde(default)]
    pub description: String,
    /// How many.
    pub quantity: f64,
}

/// A field that is wrong: its path and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path (`stops[1].window.end`).
    pub field: String,
    /// What is wrong.
    pub detail: String,
}

fn bad(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        detail: detail.into(),
    }
}

/// An id the ERP gives (shipments, stops): 1 to 64 printable ASCII characters without
/// spaces or `/`.
pub fn check_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(bad(
            field,
            format!("{id:?}: 1 to {MAX_ID_LEN} printable ASCII characters, no spaces or '/'"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, s: &str, min: usize, max: usize) -> Result<(), FieldError> {
    let n = s.chars().count();
    if n < min || n > max || s.chars().any(char::is_control) {
        return Err(bad(
            field,
            format!("{min} to {max} characters without control characters"),
        ));
    }
    Ok(())
}

fn check_lat_lon(field: &str, lat: f64, lon: f64) -> Result<(), FieldError> {
    if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
        return Err(bad(
            format!("{field}.lat"),
            format!("{lat}: a latitude from -90 to 90"),
        ));
    }
    if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
        return Err(bad(
            format!("{field}.lon"),
            format!("{lon}: a longitude from -180 to 180"),
        ));
    }
    Ok(())
}

impl ShipmentSpec {
    /// Checks every field; the first wrong one is named.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text("reference", &self.reference, 1, MAX_NAME_LEN)?;
        crate::auth::validate_customer_id(&self.customer_id).map_err(|e| bad("customer_id", e))?;
        if let Some(v) = &self.vehicle {
            fleetsync_protocol::topic::validate_device_id(v)
                .map_err(|e| bad("vehicle", format!("{v:?}: {e}")))?;
        }
        if self.stops.is_empty() {
            return Err(bad("stops", "at least one stop"));
        }
        if self.stops.len() > MAX_STOPS {
            return Err(bad(
                "stops",
                format!(
                    "{} stops; an assignment carries at most {MAX_STOPS}",
                    self.stops.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.stops.iter().enumerate() {
            let f = format!("stops[{i}]");
            check_id(&format!("{f}.id"), &s.id)?;
            if !seen.insert(s.id.as_str()) {
                return Err(bad(format!("{f}.id"), format!("{:?} appears twice", s.id)));
            }
            check_text(&format!("{f}.name"), &s.name, 1, MAX_NAME_LEN)?;
            check_text(&format!("{f}.address"), &s.address, 0, MAX_TEXT_LEN)?;
            match (&s.location, &s.polygon) {
                (Some(p), None) => {
                    check_lat_lon(&format!("{f}.location"), p.lat, p.lon)?;
                    if let Some(r) = s.radius_m
                        && !(10..=100_000).contains(&r)
                    {
                        return Err(bad(
                            format!("{f}.radius_m"),
                            format!("{r}: 10 to 100000 metres"),
                        ));
                    }
                }
                (None, Some(poly)) => {
                    if s.radius_m.is_some() {
                        return Err(bad(
                            format!("{f}.radius_m"),
                            "only with location, not with polygon",
                        ));
                    }
                    if poly.len() < 3 || poly.len() > MAX_POLYGON_POINTS {
                        return Err(bad(
                            format!("{f}.polygon"),
                            format!("{} points; 3 to {MAX_POLYGON_POINTS}", poly.len()),
                        ));
                    }
                    for (j, p) in poly.iter().enumerate() {
                        check_lat_lon(&format!("{f}.polygon[{j}]"), p[0], p[1])?;
                    }
                }
                (Some(_), Some(_)) => {
                    return Err(bad(
                        format!("{f}.polygon"),
                        "either location (with radius_m) or polygon, not both",
                    ));
                }
                (None, None) => {
                    return Err(bad(
                        format!("{f}.location"),
                        "a location {\"lat\",\"lon\"} or a polygon [[lat,lon],...] is required",
                    ));
                }
            }
            if let Some(w) = &s.window
                && w.end <= w.start
            {
                return Err(bad(
                    format!("{f}.window.end"),
                    format!(
                        "{} is not after the start {}",
                        w.end.to_rfc3339(),
                        w.start.to_rfc3339()
                    ),
                ));
            }
        }
        if !self.stops.iter().any(|s| s.kind == StopKind::Delivery) {
            return Err(bad("stops", "at least one stop of kind delivery"));
        }
        if usize::from(self.pod_policy.min_photos) > MAX_PHOTOS {
            return Err(bad(
                "pod_policy.min_photos",
                format!(
                    "{}: at most {MAX_PHOTOS} (a POD carries at most that many)",
                    self.pod_policy.min_photos
                ),
            ));
        }
        if self.lines.len() > MAX_LINES {
            return Err(bad(
                "lines",
                format!("{} lines; at most {MAX_LINES}", self.lines.len()),
            ));
        }
        for (i, l) in self.lines.iter().enumerate() {
            check_text(&format!("lines[{i}].sku"), &l.sku, 1, MAX_ID_LEN)?;
            check_text(
                &format!("lines[{i}].description"),
                &l.description,
                0,
                MAX_TEXT_LEN,
            )?;
            if !l.quantity.is_finite() || l.quantity <= 0.0 {
                return Err(bad(
                    format!("lines[{i}].quantity"),
                    format!("{}: a positive number", l.quantity),
                ));
            }
        }
        Ok(())
    }
}

impl StopSpec {
    /// The stop's fence in the wire form.
    pub fn fence(&self) -> fleetsync_protocol::Fence {
        use fleetsync_protocol::{BoundedVec, Fence, Point};
        let pt = |lat: f64, lon: f64| Point {
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
        };
        match (&self.location, &self.polygon) {
            (_, Some(poly)) => {
                let mut points = BoundedVec::new();
                for p in poly.iter().take(MAX_POLYGON_POINTS) {
                    let _ = points.push(pt(p[0], p[1]));
                }
                Fence::Polygon { points }
            }
            (Some(c), None) => Fence::Circle {
                center: pt(c.lat, c.lon),
                radius_m: self.radius_m.unwrap_or(DEFAULT_RADIUS_M),
            },
            (None, None) => Fence::Circle {
                center: pt(0.0, 0.0),
                radius_m: DEFAULT_RADIUS_M,
            },
        }
    }
}

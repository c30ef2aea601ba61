//! Fence geometry: circles and simple polygons on the WGS84 sphere, measured in metres.
//!
//! Every shape answers one question, [`Shape::signed_distance_m`]: how far a point is from
//! the fence's edge, negative inside and positive outside. The engine's hysteresis is built
//! on that single number.
//!
//! ```text
//! circle   haversine(center, p) - radius            (spherical, exact to the mm at fence scale)
//! polygon  ray casting + distance to the nearest edge, both in a local equirectangular
//!          projection centred on the vertices' mean: x = R * dlon * cos(mid lat), y = R * dlat.
//!          Scaling each point by the cosine of its mid latitude keeps the error second order:
//!          well under 1 m for fences a few kilometres across, at any latitude below ~80 deg.
//! ```
//!
//! Invariants: a fence that cannot be evaluated (a coordinate out of range, a polygon with
//! fewer than three vertices) is [`Shape::Empty`] and is infinitely far from every point, so
//! it is never entered. Longitude differences are wrapped to [-180, 180) so fences across the
//! antimeridian work.

use fleetsync_protocol::{Fence, Point};

/// Mean Earth radius (IUGG), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A position in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLon {
    /// Latitude, degrees, -90..=90.
    pub lat_deg: f64,
    /// Longitude, degrees, -180..=180.
    pub lon_deg: f64,
}

impl LatLon {
    /// From the wire's 1e-7 degree integers; `None` if out of range.
    pub fn from_e7(lat_e7: i32, lon_e7: i32) -> Option<Self> {
        let lat_deg = f64::from(lat_e7) / 1e7;
        let lon_deg = f64::from(lon_e7) / 1e7;
        ((-90.0..=90.0).contains(&lat_deg) && (-180.0..=180.0).contains(&lon_deg))
            .then_some(LatLon { lat_deg, lon_deg })
    }

    /// From a wire [`Point`].
    pub fn from_point(p: &Point) -> Option<Self> {
        Self::from_e7(p.lat_e7, p.lon_e7)
    }
}

/// `d` wrapped to [-180, 180).
fn wrap_deg(d: f64) -> f64 {
    (d + 180.0).rem_euclid(360.0) - 180.0
}

/// Great-circle distance in metres.
pub fn haversine_m(a: LatLon, b: LatLon) -> f64 {
    let (la, lb) = (a.lat_deg.to_radians(), b.lat_deg.to_radians());
    let dlat = lb - la;
    let dlon = wrap_deg(b.lon_deg - a.lon_deg).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la.cos() * lb.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// A local equirectangular projection (metres east, metres north of the origin).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Projection {
    origin: LatLon,
}

impl Projection {
    /// A projection centred on `origin`.
    pub fn new(origin: LatLon) -> Self {
        Projection { origin }
    }

    /// `p` in metres (east, north) from the origin.
    pub fn project(&self, p: LatLon) -> (f64, f64) {
        let mid = ((p.lat_deg + self.origin.lat_deg) / 2.0).to_radians();
        let x = EARTH_RADIUS_M * wrap_deg(p.lon_deg - self.origin.lon_deg).to_radians() * mid.cos();
        let y = EARTH_RADIUS_M * (p.lat_deg - self.origin.lat_deg).to_radians();
        (x, y)
    }
}

/// A fence ready for evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A circle.
    Circle {
        /// Centre.
        center: LatLon,
        /// Radius, metres.
        radius_m: f64,
    },
    /// A simple polygon, vertices projected once.
    Polygon {
        /// The projection the ring is in.
        proj: Projection,
        /// Vertices in metres, implicitly closed.
        ring: Vec<(f64, f64)>,
    },
    /// A fence that cannot be evaluated: never entered.
    Empty,
}

impl Shape {
    /// Prepares a wire fence.
    pub fn from_fence(fence: &Fence) -> Shape {
        match fence {
            Fence::Circle { center, radius_m } => match LatLon::from_point(center) {
                Some(center) => Shape::Circle {
                    center,
                    radius_m: f64::from(*radius_m),
                },
                None => Shape::Empty,
            },
            Fence::Polygon { points } => {
                let Some(pts) = points
                    .iter()
                    .map(LatLon::from_point)
                    .collect::<Option<Vec<_>>>()
                else {
                    return Shape::Empty;
                };
                if pts.len() < 3 {
                    return Shape::Empty;
                }
                // Origin at the vertices' mean (longitudes relative to the first, so a
                // ring across the antimeridian averages correctly).
                let n = pts.len() as f64;
                let lon0 = pts[0].lon_deg;
                let lat = pts.iter().map(|p| p.lat_deg).sum::<f64>() / n;
                let dlon = pts.iter().map(|p| wrap_deg(p.lon_deg - lon0)).sum::<f64>() / n;
                let proj = Projection::new(LatLon {
                    lat_deg: lat,
                    lon_deg: wrap_deg(lon0 + dlon),
                });
                let ring = pts.iter().map(|p| proj.project(*p)).collect();
                Shape::Polygon { proj, ring }
            }
        }
    }

    /// Distance from `p` to the fence's edge in metres: negative inside, positive outside,
    /// `f64::INFINITY` for [`Shape::Empty`].
    pub fn signed_distance_m(&self, p: LatLon) -> f64 {
        match self {
            Shape::Circle { center, radius_m } => haversine_m(*center, p) - radius_m,
            Shape::Polygon { proj, ring } => {
                let q = proj.project(p);
                let d = edge_distance(ring, q);
                if contains(ring, q) { -d } else { d }
            }
            Shape::Empty => f64::INFINITY,
        }
    }
}

/// Even-odd ray casting (a ray towards +x). Works for concave rings.
pub fn contains(ring: &[(f64, f64)], (x, y): (f64, f64)) -> bool {
    let mut inside = false;
    let mut j = ring.len().wrapping_sub(1);
    for (i, &(xi, yi)) in ring.iter().enumerate() {
        let (xj, yj) = ring[j];
        if (yi > y) != (yj > y) {
            let xc = xi + (y - yi) * (xj - xi) / (yj - yi);
            if x < xc {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}

/// Distance from `q` to the nearest edge of the closed ring.
pub fn edge_distance(ring: &[(f64, f64)], q: (f64, f64)) -> f64 {
    let mut best = f64::INFINITY;
    let mut j = ring.len().wrapping_sub(1);
    for (i, &a) in ring.iter().enumerate() {
        best = best.min(segment_distance(ring[j], a, q));
        j = i;
    }
    best
}

fn segment_distance(a: (f64, f64), b: (f64, f64), q: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((q.0 - a.0) * dx + (q.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (px, py) = (a.0 + t * dx, a.1 + t * dy);
    ((q.0 - px).powi(2) + (q.1 - py).powi(2)).sqrt()
}

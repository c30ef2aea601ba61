//! A vehicle's round: 3 or 4 customer stops around the depot, each 300 to 800 m from the
//! previous point, with a 60 m circle fence, a dwell of 40 to 60 s and one shipment;
//! reproducible from `(seed, vehicle, round)`.
//!
//! Stops are placed so the van never crosses another stop's fence on its way (every leg,
//! including the way back to the depot, keeps [`CLEARANCE_M`] from the other stops), so
//! each fence sees exactly one enter and one exit per round.

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// The depot: central Amsterdam.
pub const DEPOT: (f64, f64) = (52.373_1, 4.892_2);
/// Stop fence radius.
pub const FENCE_RADIUS_M: u32 = 60;
/// Least distance of a leg from any other stop's centre (fence 60 m + exit margin 25 m +
/// room for GPS jitter).
pub const CLEARANCE_M: f64 = 150.0;

const M_PER_DEG: f64 = 111_320.0;

const CUSTOMERS: [&str; 12] = [
    "Bakkerij Jordaan",
    "Bloemen De Tulp",
    "Fietsenmaker Oost",
    "Kaashandel Dam",
    "Boekhandel Spui",
    "Apotheek Pijp",
    "Koffiebar Noord",
    "Slagerij West",
    "Wijnhuis Centrum",
    "Drogisterij Zuid",
    "Brouwerij IJ",
    "Atelier Plantage",
];

const STREETS: [&str; 8] = [
    "Prinsengracht",
    "Keizersgracht",
    "Herengracht",
    "Damrak",
    "Rokin",
    "Utrechtsestraat",
    "Haarlemmerstraat",
    "Nieuwmarkt",
];

/// One customer stop.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStop {
    /// Stop id (also its fence id).
    pub id: String,
    /// Customer name.
    pub name: String,
    /// Street address.
    pub address: String,
    /// The shipment handed over here.
    pub shipment_id: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Seconds the van stands at the stop (GPS time).
    pub dwell_s: u32,
}

/// A round: depot -> stops in order -> depot.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Assignment (job) id.
    pub job_id: String,
    /// Where the van starts and ends.
    pub depot: (f64, f64),
    /// The stops in order.
    pub stops: Vec<PlannedStop>,
    /// Seed of the drive between the stops.
    pub drive_seed: u64,
    /// On a replayed track: the index of each stop's point in the track (empty otherwise).
    pub track_idx: Vec<usize>,
}

/// Distance in metres (equirectangular; fine at city scale).
pub fn dist_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let dy = (b.0 - a.0) * M_PER_DEG;
    let dx = (b.1 - a.1) * M_PER_DEG * a.0.to_radians().cos();
    (dx * dx + dy * dy).sqrt()
}

/// Distance in metres from `p` to the segment `a`-`b`.
fn dist_to_segment_m(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let k = a.0.to_radians().cos();
    let xy = |q: (f64, f64)| ((q.1 - a.1) * M_PER_DEG * k, (q.0 - a.0) * M_PER_DEG);
    let (px, py) = xy(p);
    let (bx, by) = xy(b);
    let len2 = bx * bx + by * by;
    let t = if len2 == 0.0 {
        0.0
    } else {
        ((px * bx + py * by) / len2).clamp(0.0, 1.0)
    };
    let (dx, dy) = (px - t * bx, py - t * by);
    (dx * dx + dy * dy).sqrt()
}

fn offset(from: (f64, f64), bearing_deg: f64, dist: f64) -> (f64, f64) {
    let b = bearing_deg.to_radians();
    (
        from.0 + dist * b.cos() / M_PER_DEG,
        from.1 + dist * b.sin() / (M_PER_DEG * from.0.to_radians().cos()),
    )
}

/// Whether the path `points` (depot, stops..., depot) keeps clear of every stop it is not
/// driving to or from.
fn clear(points: &[(f64, f64)], stops: &[(f64, f64)]) -> bool {
    points.windows(2).all(|leg| {
        stops
            .iter()
            .filter(|s| **s != leg[0] && **s != leg[1])
            .all(|s| dist_to_segment_m(*s, leg[0], leg[1]) >= CLEARANCE_M)
    })
}

/// The plan of `vehicle`'s round `round` (1-based), reproducible from `seed`.
pub fn round(seed: u64, vehicle: &str, vehicle_index: usize, round: u32) -> Round {
    let mix = seed
        ^ (vehicle_index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(round).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix);
    let n = rng.random_range(3..=4);
    let depot = DEPOT;
    let mut best: Vec<(f64, f64)> = Vec::new();
    for _attempt in 0..500 {
        let mut pts: Vec<(f64, f64)> = Vec::with_capacity(n);
        let mut prev = depot;
        let mut ok = true;
        for _ in 0..n {
            let mut placed = None;
            for _try in 0..50 {
                let c = offset(
                    prev,
                    rng.random_range(0.0..360.0),
                    rng.random_range(300.0..800.0),
                );
                let far = dist_m(c, depot) >= 250.0 && pts.iter().all(|p| dist_m(c, *p) >= 300.0);
                if far {
                    placed = Some(c);
                    break;
                }
            }
            match placed {
                Some(c) => {
                    pts.push(c);
                    prev = c;
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        let mut path = vec![depot];
        path.extend(pts.iter().copied());
        path.push(depot);
        best = pts;
        if clear(&path, &best) {
            break;
        }
    }
    let stops = best
        .iter()
        .enumerate()
        .map(|(k, &(lat, lon))| PlannedStop {
            id: format!("{vehicle}-r{round}-s{}", k + 1),
            name: CUSTOMERS[rng.random_range(0..CUSTOMERS.len())].to_string(),
            address: format!(
                "{} {}, Amsterdam",
                STREETS[rng.random_range(0..STREETS.len())],
                rng.random_range(1..400)
            ),
            shipment_id: format!("SHP-{vehicle}-r{round}-{}", k + 1),
            lat,
            lon,
            dwell_s: rng.random_range(40..=60),
        })
        .collect();
    Round {
        job_id: format!("job-{vehicle}-r{round}"),
        depot,
        stops,
        drive_seed: rng.random(),
        track_idx: Vec::new(),
    }
}

/// A round on a replayed track (`--route FILE`): the van follows the recording from its
/// first point; 3 stops sit at evenly spaced points of it (a quarter, half and three
/// quarters of the way), reproducible from `seed`.
pub fn round_on_track(
    track: &[crate::route::SimFix],
    seed: u64,
    vehicle: &str,
    vehicle_index: usize,
    round: u32,
) -> Round {
    let mut base = self::round(seed, vehicle, vehicle_index, round);
    let n = track.len();
    let idx: Vec<usize> = [n / 4, n / 2, 3 * n / 4]
        .into_iter()
        .filter(|i| *i > 0 && *i < n)
        .collect();
    base.stops.truncate(idx.len());
    for (s, i) in base.stops.iter_mut().zip(&idx) {
        s.lat = track[*i].lat;
        s.lon = track[*i].lon;
    }
    base.depot = (track[0].lat, track[0].lon);
    base.track_idx = idx;
    base
}

impl Round {
    /// The ERP's shipment body for stop `k` of this round, on `vehicle`: one delivery at
    /// the stop's fence, a POD with a signature and a photo.
    pub fn shipment(&self, k: usize, vehicle: &str) -> Value {
        let s = &self.stops[k];
        json!({
            "reference": format!("SO-{}", s.shipment_id.trim_start_matches("SHP-")),
            // The business at the stop is the customer: "Bakkerij Jordaan" -> BAKKERIJ-JORDAAN.
            "customer_id": s
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '-' })
                .collect::<String>(),
            "vehicle": vehicle,
            "stops": [{
                "id": s.id, "kind": "delivery", "name": s.name, "address": s.address,
                "location": {"lat": s.lat, "lon": s.lon}, "radius_m": FENCE_RADIUS_M,
            }],
            "pod_policy": {"signature": true, "min_photos": 1},
            "lines": [{"sku": "BOX-1", "description": "Parcel", "quantity": 1}],
        })
    }

    /// The operator API's assignment body for this round.
    pub fn assignment(&self, version: u32) -> Value {
        let stops: Vec<Value> = self
            .stops
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "name": s.name,
                    "address": s.address,
                    "shipment_ids": [s.shipment_id],
                    "fence": {"type": "circle", "center": [s.lon, s.lat], "radius_m": FENCE_RADIUS_M},
                })
            })
            .collect();
        json!({"id": self.job_id, "version": version, "stops": stops})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_reproducible_spaced_and_clear() {
        for v in 0..20 {
            for r in 1..4 {
                let a = round(42, "van-01", v, r);
                assert_eq!(a, round(42, "van-01", v, r));
                assert!((3..=4).contains(&a.stops.len()));
                let mut prev = a.depot;
                let pts: Vec<(f64, f64)> = a.stops.iter().map(|s| (s.lat, s.lon)).collect();
                for s in &a.stops {
                    let d = dist_m(prev, (s.lat, s.lon));
                    assert!((290.0..=810.0).contains(&d), "{d}");
                    assert!((40..=60).contains(&s.dwell_s));
                    prev = (s.lat, s.lon);
                }
                let mut path = vec![a.depot];
                path.extend(pts.iter().copied());
                path.push(a.depot);
                assert!(clear(&path, &pts), "vehicle {v} round {r}");
            }
        }
        assert_ne!(round(42, "van-01", 0, 1), round(43, "van-01", 0, 1));
    }
}

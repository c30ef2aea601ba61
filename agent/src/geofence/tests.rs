#![allow(clippy::unwrap_used)]

use fleetsync_protocol::{
    Assignment, Body, BoundedString, BoundedVec, Fence, Fix, Point, Stop, Transition, TripKind,
};

use super::geo::{self, EARTH_RADIUS_M, LatLon, Shape};
use super::{Engine, GeofenceConfig, StopState};

const BASE: (f64, f64) = (52.52, 13.405);

/// The point `dx` m east and `dy` m north of `base`.
fn offset(base: (f64, f64), dx: f64, dy: f64) -> Point {
    let lat = base.0 + (dy / EARTH_RADIUS_M).to_degrees();
    let lon = base.1 + (dx / (EARTH_RADIUS_M * base.0.to_radians().cos())).to_degrees();
    Point {
        lat_e7: (lat * 1e7).round() as i32,
        lon_e7: (lon * 1e7).round() as i32,
    }
}

fn fix(p: Point, speed_mps: Option<f64>) -> Fix {
    Fix {
        lat_e7: p.lat_e7,
        lon_e7: p.lon_e7,
        speed_cmps: speed_mps.map(|s| (s * 100.0).round() as u16),
        heading_ddeg: None,
        hdop_d: None,
        satellites: None,
    }
}

fn ll(p: Point) -> LatLon {
    LatLon::from_point(&p).unwrap()
}

fn stop(id: &str, fence: Fence) -> Stop {
    Stop {
        id: BoundedString::try_from_str(id).unwrap(),
        name: BoundedString::try_from_str(id).unwrap(),
        address: BoundedString::default(),
        shipment_ids: BoundedVec::default(),
        fence,
        window: None,
    }
}

fn assignment(version: u32, stops: Vec<Stop>) -> Assignment {
    Assignment {
        id: BoundedString::try_from_str("job-1").unwrap(),
        version,
        stops: BoundedVec::try_from_iter(stops).map_err(|_| ()).unwrap(),
    }
}

fn circle(dx: f64, dy: f64, r: u32) -> Fence {
    Fence::Circle {
        center: offset(BASE, dx, dy),
        radius_m: r,
    }
}

fn polygon(pts: &[(f64, f64)]) -> Fence {
    Fence::Polygon {
        points: BoundedVec::try_from_iter(pts.iter().map(|&(x, y)| offset(BASE, x, y)))
            .map_err(|_| ())
            .unwrap(),
    }
}

/// A U opening north: 300 x 300 m with a 100 m wide, 200 m deep notch.
fn u_shape() -> Fence {
    polygon(&[
        (0.0, 0.0),
        (300.0, 0.0),
        (300.0, 300.0),
        (200.0, 300.0),
        (200.0, 100.0),
        (100.0, 100.0),
        (100.0, 300.0),
        (0.0, 300.0),
    ])
}

/// Short names for the events, for readable assertions.
fn names(evs: &[Body]) -> Vec<String> {
    evs.iter()
        .map(|b| match b {
            Body::Geofence(g) => format!("{:?}:{}", g.transition, g.fence_id),
            Body::Trip(t) => match &t.stop_id {
                Some(s) => format!("{:?}:{s}", t.kind),
                None => format!("{:?}", t.kind),
            },
            other => other.kind().to_owned(),
        })
        .collect()
}

/// Runs `(t_ms, dx, dy)` fixes; returns the event names.
fn run(e: &mut Engine, track: &[(u64, f64, f64)]) -> Vec<String> {
    let mut out = Vec::new();
    for &(t, x, y) in track {
        out.extend(names(&e.on_fix(t, &fix(offset(BASE, x, y), None))));
    }
    out
}

fn engine_with(fences: Vec<(&str, Fence)>) -> Engine {
    let mut e = Engine::new(GeofenceConfig::default());
    e.set_assignment(&assignment(
        1,
        fences.into_iter().map(|(id, f)| stop(id, f)).collect(),
    ));
    e
}

#[test]
fn haversine_matches_a_known_distance() {
    // One degree of latitude on the mean sphere.
    let d = geo::haversine_m(
        LatLon {
            lat_deg: 10.0,
            lon_deg: 20.0,
        },
        LatLon {
            lat_deg: 11.0,
            lon_deg: 20.0,
        },
    );
    assert!(
        (d - EARTH_RADIUS_M.mul_add(1f64.to_radians(), 0.0)).abs() < 1e-6,
        "{d}"
    );
    // Across the antimeridian.
    let d = geo::haversine_m(
        LatLon {
            lat_deg: 0.0,
            lon_deg: 179.9995,
        },
        LatLon {
            lat_deg: 0.0,
            lon_deg: -179.9995,
        },
    );
    assert!((d - 111.195).abs() < 0.01, "{d}");
}

#[test]
fn projection_is_within_a_metre_of_haversine_at_fence_scale() {
    for lat in [0.0, 45.0, 60.0, 75.0, -70.0] {
        let o = LatLon {
            lat_deg: lat,
            lon_deg: 10.0,
        };
        let proj = geo::Projection::new(o);
        for (dx, dy) in [
            (2000.0, 0.0),
            (0.0, 2000.0),
            (1500.0, -1500.0),
            (-2000.0, 2000.0),
        ] {
            let p = offset((lat, 10.0), dx, dy);
            let (x, y) = proj.project(ll(p));
            let flat = (x * x + y * y).sqrt();
            let sphere = geo::haversine_m(o, ll(p));
            assert!((flat - sphere).abs() < 1.0, "lat {lat}: {flat} vs {sphere}");
        }
    }
}

#[test]
fn circle_signed_distance() {
    let s = Shape::from_fence(&circle(0.0, 0.0, 100));
    let at = |x, y| s.signed_distance_m(ll(offset(BASE, x, y)));
    assert!((at(0.0, 0.0) + 100.0).abs() < 0.05);
    assert!((at(150.0, 0.0) - 50.0).abs() < 0.05);
    assert!((at(0.0, -90.0) + 10.0).abs() < 0.05);
}

#[test]
fn concave_polygon_contains_and_distance() {
    let s = Shape::from_fence(&u_shape());
    let at = |x, y| s.signed_distance_m(ll(offset(BASE, x, y)));
    // In an arm, in the base, in the notch, outside.
    assert!((at(50.0, 200.0) + 50.0).abs() < 0.1, "{}", at(50.0, 200.0));
    assert!((at(150.0, 50.0) + 50.0).abs() < 0.1);
    assert!(
        (at(150.0, 200.0) - 50.0).abs() < 0.1,
        "notch {}",
        at(150.0, 200.0)
    );
    assert!((at(150.0, 120.0) - 20.0).abs() < 0.1);
    assert!((at(-30.0, 150.0) - 30.0).abs() < 0.1);
    // A GeoJSON ring that repeats its first point works the same.
    let closed = polygon(&[
        (0.0, 0.0),
        (100.0, 0.0),
        (100.0, 100.0),
        (0.0, 100.0),
        (0.0, 0.0),
    ]);
    let s = Shape::from_fence(&closed);
    assert!(s.signed_distance_m(ll(offset(BASE, 50.0, 50.0))) < -49.0);
    assert!(s.signed_distance_m(ll(offset(BASE, 150.0, 50.0))) > 49.0);
}

#[test]
fn degenerate_fences_are_never_entered() {
    let two = polygon(&[(0.0, 0.0), (100.0, 0.0)]);
    assert_eq!(Shape::from_fence(&two), Shape::Empty);
    let bad = Fence::Circle {
        center: Point {
            lat_e7: 950_000_000,
            lon_e7: 0,
        },
        radius_m: 100,
    };
    assert_eq!(Shape::from_fence(&bad), Shape::Empty);
    let mut e = engine_with(vec![("a", two), ("b", bad)]);
    let track: Vec<_> = (0..100).map(|i| (i * 1000, 50.0, 0.0)).collect();
    assert!(run(&mut e, &track).is_empty());
}

#[test]
fn enter_needs_the_debounce_and_exit_needs_the_margin() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    // 9 s inside: not yet.
    let t: Vec<_> = (0..10).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert!(run(&mut e, &t).is_empty());
    assert_eq!(e.stop_state("s1"), StopState::NotVisited);
    // 10 s: Enter + Arrived.
    assert_eq!(
        run(&mut e, &[(10_000, 0.0, 0.0)]),
        ["Enter:s1", "Arrived:s1"]
    );
    assert_eq!(e.stop_state("s1"), StopState::Arrived { at_ms: 10_000 });
    assert_eq!(e.inside(), ["s1"]);
    // 20 m outside (within the margin) for a minute: nothing.
    let t: Vec<_> = (11..71).map(|i| (i * 1000, 120.0, 0.0)).collect();
    assert!(run(&mut e, &t).is_empty());
    // 30 m outside: Exit after 10 s.
    let t: Vec<_> = (71..81).map(|i| (i * 1000, 130.0, 0.0)).collect();
    assert!(run(&mut e, &t).is_empty());
    assert_eq!(
        run(&mut e, &[(81_000, 130.0, 0.0)]),
        ["Exit:s1", "Departed:s1"]
    );
    assert_eq!(e.stop_state("s1"), StopState::Departed { at_ms: 81_000 });
    assert!(e.inside().is_empty());
}

#[test]
fn a_fix_in_the_band_breaks_a_pending_run() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    let mut t: Vec<_> = (0..9).map(|i| (i * 1000, 0.0, 0.0)).collect();
    t.push((9_000, 105.0, 0.0));
    // The run restarts at 10 s.
    t.extend((10..20).map(|i| (i * 1000, 0.0, 0.0)));
    assert!(run(&mut e, &t).is_empty());
    assert_eq!(
        run(&mut e, &[(20_000, 0.0, 0.0)]),
        ["Enter:s1", "Arrived:s1"]
    );
}

#[test]
fn dwell_once_per_visit() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    let inside: Vec<_> = (0..=700).map(|i| (i * 1000, 10.0, 0.0)).collect();
    let ev = run(&mut e, &inside);
    assert_eq!(ev, ["Enter:s1", "Arrived:s1", "Dwell:s1"]);
    let mut e2 = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    let all: Vec<_> = (0..=700).map(|i| (i * 1000, 10.0, 0.0)).collect();
    let evs: Vec<_> = all
        .iter()
        .flat_map(|&(t, x, y)| {
            let out = e2.on_fix(t, &fix(offset(BASE, x, y), None));
            names(&out).into_iter().map(move |n| (t, n))
        })
        .collect();
    // Dwell exactly dwell_ms after the Enter.
    assert_eq!(evs[2], (310_000, "Dwell:s1".to_owned()));
    // Leave and come back: a second visit, a second Dwell.
    let out: Vec<_> = (701..=720).map(|i| (i * 1000, 500.0, 0.0)).collect();
    assert_eq!(run(&mut e, &out), ["Exit:s1", "Departed:s1"]);
    let back: Vec<_> = (721..=1100).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert_eq!(run(&mut e, &back), ["Enter:s1", "Arrived:s1", "Dwell:s1"]);
}

#[test]
fn no_dwell_while_leaving() {
    let cfg = GeofenceConfig {
        dwell_ms: 20_000,
        ..GeofenceConfig::default()
    };
    let mut e = Engine::new(cfg);
    e.set_assignment(&assignment(1, vec![stop("s1", circle(0.0, 0.0, 100))]));
    let mut t: Vec<_> = (0..=10).map(|i| (i * 1000, 0.0, 0.0)).collect();
    t.extend((11..=25).map(|i| (i * 1000, 400.0, 0.0)));
    assert_eq!(
        run(&mut e, &t),
        ["Enter:s1", "Arrived:s1", "Exit:s1", "Departed:s1"]
    );
}

#[test]
fn zero_debounce_acts_on_the_first_fix() {
    let cfg = GeofenceConfig {
        enter_debounce_ms: 0,
        exit_debounce_ms: 0,
        dwell_ms: 0,
        ..GeofenceConfig::default()
    };
    let mut e = Engine::new(cfg);
    e.set_assignment(&assignment(1, vec![stop("s1", circle(0.0, 0.0, 100))]));
    assert_eq!(
        run(&mut e, &[(5, 0.0, 0.0)]),
        ["Enter:s1", "Arrived:s1", "Dwell:s1"]
    );
    assert_eq!(run(&mut e, &[(6, 200.0, 0.0)]), ["Exit:s1", "Departed:s1"]);
}

#[test]
fn u_shape_notch_is_outside() {
    let mut e = engine_with(vec![("u", u_shape())]);
    // Down into the notch and back out, slowly.
    let mut t = Vec::new();
    for i in 0..300u64 {
        let y = 500.0 - (i as f64) * (380.0 / 300.0);
        t.push((i * 1000, 150.0, y));
    }
    assert!(run(&mut e, &t).is_empty());
    // Across the base: enter, then leave.
    let t: Vec<_> = (0..100u64)
        .map(|i| (400_000 + i * 1000, -100.0 + i as f64 * 5.0, 50.0))
        .collect();
    assert_eq!(
        run(&mut e, &t),
        ["Enter:u", "Arrived:u", "Exit:u", "Departed:u"]
    );
}

#[test]
fn events_in_stop_order_and_origin_is_the_first_stop() {
    // Two overlapping fences: both entered on the same fix, in stop order.
    let mut e = engine_with(vec![
        ("depot", circle(0.0, 0.0, 100)),
        ("s2", circle(50.0, 0.0, 100)),
    ]);
    assert_eq!(e.origin(), Some("depot"));
    let t: Vec<_> = (0..=10).map(|i| (i * 1000, 25.0, 0.0)).collect();
    assert_eq!(
        run(&mut e, &t),
        ["Enter:depot", "Arrived:depot", "Enter:s2", "Arrived:s2"]
    );
    let t: Vec<_> = (11..=21).map(|i| (i * 1000, 2000.0, 0.0)).collect();
    assert_eq!(
        run(&mut e, &t),
        ["Exit:depot", "Departed:depot", "Exit:s2", "Departed:s2"]
    );
}

#[test]
fn old_and_invalid_fixes_are_ignored() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    assert!(run(&mut e, &[(50_000, 0.0, 0.0)]).is_empty());
    // Older than the last fix: would otherwise complete the debounce run... backwards.
    assert!(run(&mut e, &[(1_000, 0.0, 0.0)]).is_empty());
    let bad = Fix {
        lat_e7: 910_000_000,
        ..fix(offset(BASE, 0.0, 0.0), None)
    };
    assert!(e.on_fix(70_000, &bad).is_empty());
    // The run started at 50 s is still going.
    assert_eq!(
        run(&mut e, &[(60_000, 0.0, 0.0)]),
        ["Enter:s1", "Arrived:s1"]
    );
}

#[test]
fn assignment_update_keeps_persisting_stops() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    let t: Vec<_> = (0..=10).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert_eq!(run(&mut e, &t), ["Enter:s1", "Arrived:s1"]);
    // v2: same s1, a new s2 at the same place.
    e.set_assignment(&assignment(
        2,
        vec![
            stop("s1", circle(0.0, 0.0, 100)),
            stop("s2", circle(0.0, 0.0, 50)),
        ],
    ));
    assert_eq!(e.stop_state("s1"), StopState::Arrived { at_ms: 10_000 });
    let t: Vec<_> = (11..=21).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert_eq!(run(&mut e, &t), ["Enter:s2", "Arrived:s2"]);
    // v3: s1's fence moves 1 km away: the visit ends through the normal exit debounce.
    e.set_assignment(&assignment(
        3,
        vec![
            stop("s1", circle(1000.0, 0.0, 100)),
            stop("s2", circle(0.0, 0.0, 50)),
        ],
    ));
    assert_eq!(e.inside(), ["s1", "s2"]);
    let t: Vec<_> = (22..=32).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert_eq!(run(&mut e, &t), ["Exit:s1", "Departed:s1"]);
    // v4: s2 withdrawn, duplicate s1 ignored after the first.
    e.set_assignment(&assignment(
        4,
        vec![
            stop("s1", circle(1000.0, 0.0, 100)),
            stop("s1", circle(0.0, 0.0, 100)),
        ],
    ));
    assert!(e.inside().is_empty());
    assert_eq!(e.stop_state("s2"), StopState::NotVisited);
    let t: Vec<_> = (33..=60).map(|i| (i * 1000, 0.0, 0.0)).collect();
    assert!(run(&mut e, &t).is_empty());
}

#[test]
fn motion_hysteresis() {
    let mut e = Engine::new(GeofenceConfig::default());
    let p = offset(BASE, 0.0, 0.0);
    let mut go = |t: u64, v: Option<f64>| names(&e.on_fix(t, &fix(p, v)));
    assert!(go(0, Some(1.0)).is_empty());
    assert_eq!(go(1000, Some(2.0)), ["Moving"]);
    assert!(go(2000, Some(10.0)).is_empty());
    // Slow for 29 s, then a crawl resets the run.
    for i in 0..30 {
        assert!(go(3000 + i * 1000, Some(0.3)).is_empty());
    }
    assert!(go(33_000, Some(1.0)).is_empty());
    for i in 0..30 {
        assert!(go(34_000 + i * 1000, Some(0.0)).is_empty());
    }
    // Fixes without speed do not matter.
    assert!(go(63_500, None).is_empty());
    assert_eq!(go(64_000, Some(0.5)), ["Stationary"]);
    assert!(go(100_000, Some(0.0)).is_empty());
    assert!(go(101_000, Some(1.9)).is_empty());
    assert_eq!(go(102_000, Some(2.5)), ["Moving"]);
}

#[test]
fn ignition_reports_changes_only() {
    let mut e = Engine::new(GeofenceConfig::default());
    assert_eq!(names(&e.on_ignition(0, false)), ["IgnitionOff"]);
    assert!(e.on_ignition(1, false).is_empty());
    assert_eq!(names(&e.on_ignition(2, true)), ["IgnitionOn"]);
    assert!(e.on_ignition(3, true).is_empty());
    assert_eq!(names(&e.on_ignition(4, false)), ["IgnitionOff"]);
    let ev = e.on_ignition(5, true);
    assert!(
        matches!(&ev[..], [Body::Trip(t)] if t.kind == TripKind::IgnitionOn && t.stop_id.is_none())
    );
}

#[test]
fn config_validation_and_toml_shape() {
    assert!(GeofenceConfig::default().validate().is_ok());
    let bad = GeofenceConfig {
        margin_m: -1.0,
        ..GeofenceConfig::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("margin_m"));
    let bad = GeofenceConfig {
        moving_speed_mps: 0.5,
        ..GeofenceConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("moving_speed_mps")
    );
    let c: GeofenceConfig = toml::from_str("margin_m = 40.0\ndwell_ms = 60000\n").unwrap();
    assert_eq!(c.margin_m, 40.0);
    assert_eq!(c.enter_debounce_ms, 10_000);
    assert!(toml::from_str::<GeofenceConfig>("margn_m = 1.0").is_err());
}

#[test]
fn transitions_are_the_protocol_ones() {
    let mut e = engine_with(vec![("s1", circle(0.0, 0.0, 100))]);
    let mut evs = Vec::new();
    for i in 0..=10 {
        evs.extend(e.on_fix(i * 1000, &fix(offset(BASE, 0.0, 0.0), None)));
    }
    match &evs[0] {
        Body::Geofence(g) => {
            assert_eq!(g.transition, Transition::Enter);
            assert_eq!(g.fence_id.as_str(), "s1");
        }
        other => panic!("{other:?}"),
    }
}

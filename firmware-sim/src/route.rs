//! Routes: 1 Hz fixes of a vehicle driving between waypoints like a delivery van in town
//! (accelerates, cruises, slows for corners and traffic lights, stands at stops), with a
//! seed for reproducibility.

use rand::{Rng, SeedableRng};

/// One simulated fix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimFix {
    /// GPS time, ms since the Unix epoch.
    pub time_ms: u64,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Speed over ground.
    pub speed_mps: f64,
    /// Course over ground, degrees.
    pub heading_deg: f64,
}

/// A point to drive to and how long to stand there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waypoint {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Seconds standing at the waypoint.
    pub dwell_s: u32,
}

const M_PER_DEG: f64 = 111_320.0;

fn dist_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let dy = (b.0 - a.0) * M_PER_DEG;
    let dx = (b.1 - a.1) * M_PER_DEG * a.0.to_radians().cos();
    (dx * dx + dy * dy).sqrt()
}

fn bearing_deg(a: (f64, f64), b: (f64, f64)) -> f64 {
    let dy = b.0 - a.0;
    let dx = (b.1 - a.1) * a.0.to_radians().cos();
    dx.atan2(dy).to_degrees().rem_euclid(360.0)
}

/// Drives `waypoints` in order from `start_ms`, one fix per second. `cruise_mps` is the
/// town speed; each leg has a traffic light with probability `lights`.
pub fn drive(waypoints: &[Waypoint], start_ms: u64, cruise_mps: f64, seed: u64) -> Vec<SimFix> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let Some(first) = waypoints.first() else {
        return out;
    };
    let mut pos = (first.lat, first.lon);
    let mut t = start_ms;
    let mut heading = 0.0;
    let mut push = |t: &mut u64, pos: (f64, f64), speed: f64, heading: f64| {
        out.push(SimFix {
            time_ms: *t,
            lat: pos.0,
            lon: pos.1,
            speed_mps: speed,
            heading_deg: heading,
        });
        *t += 1000;
    };
    for _ in 0..first.dwell_s {
        push(&mut t, pos, 0.0, heading);
    }
    for wp in &waypoints[1..] {
        let target = (wp.lat, wp.lon);
        let cruise = cruise_mps * rng.random_range(0.85..1.15);
        let light_at = if rng.random_bool(0.5) {
            Some(rng.random_range(0.3..0.7))
        } else {
            None
        };
        let total = dist_m(pos, target).max(1.0);
        let mut speed: f64 = 0.0;
        let mut light_done = false;
        loop {
            let left = dist_m(pos, target);
            if left < 1.5 {
                pos = target;
                break;
            }
            heading = bearing_deg(pos, target);
            // Brake to stop at the waypoint (and at a red light) at about 1.5 m/s^2.
            let stop_in = left.min(match light_at {
                Some(f) if !light_done => (left - total * (1.0 - f)).max(0.0),
                _ => f64::MAX,
            });
            let brake_speed = (2.0 * 1.5 * stop_in).sqrt();
            let want = cruise.min(brake_speed).max(1.0);
            speed = if want > speed {
                (speed + 1.2).min(want)
            } else {
                want
            };
            speed = (speed + rng.random_range(-0.1..0.1)).max(0.5);
            let step = speed.min(left);
            let b = heading.to_radians();
            pos.0 += step * b.cos() / M_PER_DEG;
            pos.1 += step * b.sin() / (M_PER_DEG * pos.0.to_radians().cos());
            push(&mut t, pos, speed, heading);
            if light_at.is_some() && !light_done && stop_in < 2.0 {
                light_done = true;
                for _ in 0..rng.random_range(10..40) {
                    push(&mut t, pos, 0.0, heading);
                }
                speed = 0.0;
            }
        }
        for _ in 0..wp.dwell_s.max(1) {
            push(&mut t, pos, 0.0, heading);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_to_every_waypoint_at_town_speeds() {
        let wps = [
            Waypoint {
                lat: 52.3731,
                lon: 4.8897,
                dwell_s: 5,
            },
            Waypoint {
                lat: 52.3760,
                lon: 4.8950,
                dwell_s: 60,
            },
            Waypoint {
                lat: 52.3700,
                lon: 4.9010,
                dwell_s: 30,
            },
        ];
        let fixes = drive(&wps, 0, 11.0, 7);
        assert_eq!(fixes, drive(&wps, 0, 11.0, 7), "not reproducible");
        for wp in &wps {
            assert!(
                fixes
                    .iter()
                    .any(|f| dist_m((f.lat, f.lon), (wp.lat, wp.lon)) < 2.0)
            );
        }
        assert!(fixes.iter().all(|f| f.speed_mps <= 14.0));
        for w in fixes.windows(2) {
            assert_eq!(w[1].time_ms - w[0].time_ms, 1000);
            assert!(dist_m((w[0].lat, w[0].lon), (w[1].lat, w[1].lon)) <= 14.0);
        }
        let last = fixes.last().unwrap();
        assert!(dist_m((last.lat, last.lon), (wps[2].lat, wps[2].lon)) < 1.0);
    }
}

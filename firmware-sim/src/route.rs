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

/// A recorded track to replay: a GPX file (`.gpx`: `trkpt` points with optional `time`)
/// or an NMEA 0183 log (anything else, parsed by the agent's own NMEA reader). Speed and
/// heading come from the file where it has them, else from consecutive points; times are
/// taken as 1 s apart when the file has none.
pub fn load_track(path: &std::path::Path) -> Result<Vec<SimFix>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let is_gpx = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gpx"));
    let mut fixes = if is_gpx {
        parse_gpx(&text)?
    } else {
        parse_nmea(&text)
    };
    if fixes.len() < 2 {
        return Err(format!(
            "{}: fewer than 2 positions in the track",
            path.display()
        ));
    }
    for i in 1..fixes.len() {
        let (a, b) = (fixes[i - 1], fixes[i]);
        let dt = (b.time_ms.saturating_sub(a.time_ms)).max(1) as f64 / 1000.0;
        if b.speed_mps == 0.0 && (a.lat, a.lon) != (b.lat, b.lon) {
            fixes[i].speed_mps = dist_m((a.lat, a.lon), (b.lat, b.lon)) / dt;
            fixes[i].heading_deg = bearing_deg((a.lat, a.lon), (b.lat, b.lon));
        }
    }
    Ok(fixes)
}

fn attr(tag: &str, name: &str) -> Option<f64> {
    let at = tag.find(&format!("{name}=\""))? + name.len() + 2;
    tag[at..].split('"').next()?.parse().ok()
}

fn parse_gpx(text: &str) -> Result<Vec<SimFix>, String> {
    let mut out = Vec::new();
    for (n, part) in text.split("<trkpt").skip(1).enumerate() {
        let tag = part.split('>').next().unwrap_or_default();
        let (Some(lat), Some(lon)) = (attr(tag, "lat"), attr(tag, "lon")) else {
            return Err(format!("trkpt {n}: lat and lon attributes expected"));
        };
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(format!("trkpt {n}: lat {lat} lon {lon} out of range"));
        }
        let body = part.split("</trkpt>").next().unwrap_or_default();
        let time_ms = body
            .split("<time>")
            .nth(1)
            .and_then(|t| t.split("</time>").next())
            .and_then(|t| fleetsync_protocol::json::Time::parse(t.trim()).ok())
            .map(|t| t.0)
            .unwrap_or(n as u64 * 1000);
        out.push(SimFix {
            time_ms,
            lat,
            lon,
            speed_mps: 0.0,
            heading_deg: 0.0,
        });
    }
    Ok(out)
}

fn parse_nmea(text: &str) -> Vec<SimFix> {
    let stats = std::sync::Arc::new(fleetsync_agent::gps::GpsStats::default());
    let mut merger = fleetsync_agent::gps::NmeaMerger::new(stats);
    let mut out = Vec::new();
    let mut take = |f: fleetsync_agent::gps::GpsFix| {
        out.push(SimFix {
            time_ms: f.time_ms,
            lat: f64::from(f.lat_e7) / 1e7,
            lon: f64::from(f.lon_e7) / 1e7,
            speed_mps: f.speed_cmps.map_or(0.0, |s| f64::from(s) / 100.0),
            heading_deg: f.heading_ddeg.map_or(0.0, |h| f64::from(h) / 10.0),
        })
    };
    for line in text.lines() {
        if let Some(f) = merger.push_line(line.as_bytes()) {
            take(f);
        }
    }
    if let Some(f) = merger.flush() {
        take(f);
    }
    out
}

#[cfg(test)]
mod track_tests {
    use super::*;

    #[test]
    fn gpx_and_nmea_tracks_load() {
        let dir = tempfile::tempdir().unwrap();
        let gpx = dir.path().join("t.gpx");
        std::fs::write(
            &gpx,
            r#"<?xml version="1.0"?><gpx><trk><trkseg>
            <trkpt lat="52.3731" lon="4.8897"><time>2026-11-27T10:00:00Z</time></trkpt>
            <trkpt lat="52.3732" lon="4.8897"><time>2026-11-27T10:00:01Z</time></trkpt>
            <trkpt lat="52.3733" lon="4.8898"><time>2026-11-27T10:00:02Z</time></trkpt>
            </trkseg></trk></gpx>"#,
        )
        .unwrap();
        let t = load_track(&gpx).unwrap();
        assert_eq!(t.len(), 3);
        assert!((t[1].speed_mps - 11.1).abs() < 0.2, "{}", t[1].speed_mps);
        assert!(t[1].heading_deg.abs() < 1.0);

        let fixes = drive(
            &[
                Waypoint {
                    lat: 52.37,
                    lon: 4.89,
                    dwell_s: 0,
                },
                Waypoint {
                    lat: 52.372,
                    lon: 4.89,
                    dwell_s: 1,
                },
            ],
            1_795_773_600_000,
            10.0,
            1,
        );
        let nmea = dir.path().join("t.nmea");
        std::fs::write(
            &nmea,
            fixes.iter().map(crate::nmea::sentences).collect::<String>(),
        )
        .unwrap();
        let t = load_track(&nmea).unwrap();
        assert_eq!(t.len(), fixes.len());
        assert_eq!(t[5].time_ms, fixes[5].time_ms);
        assert!((t[5].lat - fixes[5].lat).abs() < 1e-5);

        std::fs::write(&gpx, "<gpx><trkpt lon=\"4\"></trkpt></gpx>").unwrap();
        assert!(load_track(&gpx).unwrap_err().contains("lat and lon"));
    }
}

//! NMEA 0183 output: what a GPS receiver would print for a simulated fix (RMC + GGA per
//! second, GP talker, checksums), so agents are fed through their real NMEA path.

use std::fmt::Write as _;

use crate::route::SimFix;

fn checksum(body: &str) -> u8 {
    body.bytes().fold(0u8, |a, b| a ^ b)
}

fn sentence(body: &str) -> String {
    format!("${body}*{:02X}\r\n", checksum(body))
}

fn lat_field(lat: f64) -> (String, char) {
    let hemi = if lat < 0.0 { 'S' } else { 'N' };
    let a = lat.abs();
    let deg = a.trunc();
    (format!("{:02}{:07.4}", deg as u32, (a - deg) * 60.0), hemi)
}

fn lon_field(lon: f64) -> (String, char) {
    let hemi = if lon < 0.0 { 'W' } else { 'E' };
    let a = lon.abs();
    let deg = a.trunc();
    (format!("{:03}{:07.4}", deg as u32, (a - deg) * 60.0), hemi)
}

/// RMC and GGA sentences for one fix.
pub fn sentences(fix: &SimFix) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(fix.time_ms as i64)
        .unwrap_or_default();
    let hms = t.format("%H%M%S%.3f").to_string();
    let dmy = t.format("%d%m%y").to_string();
    let (la, ns) = lat_field(fix.lat);
    let (lo, ew) = lon_field(fix.lon);
    let knots = fix.speed_mps * 1.943_844_5;
    let mut out = String::new();
    let _ = write!(
        out,
        "{}",
        sentence(&format!(
            "GPRMC,{hms},A,{la},{ns},{lo},{ew},{knots:.2},{:.1},{dmy},,,A",
            fix.heading_deg
        ))
    );
    let _ = write!(
        out,
        "{}",
        sentence(&format!(
            "GPGGA,{hms},{la},{ns},{lo},{ew},1,09,0.9,12.0,M,46.9,M,,"
        ))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_carry_valid_checksums_and_coordinates() {
        let f = SimFix {
            time_ms: 1_795_773_600_000,
            lat: 52.373_1,
            lon: -4.889_7,
            speed_mps: 10.0,
            heading_deg: 90.0,
        };
        let s = sentences(&f);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("$GPRMC,100000.000,A,5222.3860,N,00453.3820,W,19.44,90.0,271126"),
            "{}",
            lines[0]
        );
        for l in lines {
            let (body, cs) = l.trim_start_matches('$').split_once('*').unwrap();
            assert_eq!(u8::from_str_radix(cs, 16).unwrap(), checksum(body));
        }
    }
}

//! gpsd's JSON protocol: the client (watch, read, reconnect) and a pure decoder.
//!
//! ```text
//! agent -> gpsd  ?WATCH={"enable":true,"json":true}\n
//! gpsd  -> agent one JSON object per line:
//!   {"class":"TPV","mode":3,"time":"2020-07-11T22:37:45.000Z","lat":38.1,"lon":-122.6,
//!    "speed":0.02,"track":12.5,...}   -> a fix when mode >= 2 and lat/lon are present
//!   {"class":"SKY","hdop":0.54,"uSat":12,"satellites":[{"used":true},...],...}
//!                                    -> hdop/satellites for the following TPVs
//!   VERSION, DEVICES, WATCH, ...     -> counted as sentences, ignored
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::io::{Backoff, Flow, LineSplitter, NMEA_IDLE_FLUSH, read_chunk};
use super::{GpsError, GpsFix, GpsStats};

/// What the agent sends after connecting.
pub const WATCH: &[u8] = b"?WATCH={\"enable\":true,\"json\":true}\n";
/// Longest JSON line accepted (SKY reports with many satellites run to a few KiB).
pub const MAX_GPSD_LINE: usize = 64 * 1024;
/// A connection silent this long is considered dead (gpsd sends at least a SKY or TPV
/// per second while a receiver is attached; with none attached it may stay silent, and
/// a reconnect is then cheap).
pub const GPSD_IDLE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns gpsd report lines into fixes. Pure.
///
/// gpsd may send several TPVs for one epoch (one per NMEA sentence while it learns the
/// receiver's cycle), each more complete: the latest TPV of an epoch is held and handed
/// on when a report for another time arrives or on [`flush`](Self::flush), with the HDOP
/// and satellites of the latest SKY.
#[derive(Debug, Default)]
pub struct GpsdDecoder {
    hdop: Option<f64>,
    satellites: Option<u32>,
    pending: Option<GpsFix>,
    last_time: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
struct Report {
    class: String,
    mode: Option<u8>,
    time: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    speed: Option<f64>,
    track: Option<f64>,
    hdop: Option<f64>,
    uSat: Option<u32>,
    satellites: Option<Vec<Sat>>,
}

#[derive(Debug, Deserialize)]
struct Sat {
    used: Option<bool>,
}

impl GpsdDecoder {
    /// Decodes one line, counting it in `stats`. Returns the fix of an epoch this line
    /// closed.
    pub fn push_line(&mut self, line: &[u8], stats: &GpsStats) -> Option<GpsFix> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return None;
        }
        let Ok(r) = serde_json::from_slice::<Report>(line) else {
            stats.garbage.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        stats.sentences.fetch_add(1, Ordering::Relaxed);
        match r.class.as_str() {
            "SKY" => {
                if r.hdop.is_some() {
                    self.hdop = r.hdop;
                }
                let used = r.uSat.or_else(|| {
                    r.satellites
                        .as_ref()
                        .map(|s| s.iter().filter(|s| s.used == Some(true)).count() as u32)
                });
                if used.is_some() {
                    self.satellites = used;
                }
                None
            }
            "TPV" => {
                let time = tpv_time(&r);
                let same_epoch = time.is_some() && time == self.last_time;
                let closed = if same_epoch {
                    None
                } else {
                    self.flush_into(stats)
                };
                match self.tpv(&r, time) {
                    Some(fix) => self.pending = Some(fix),
                    None if !same_epoch => {
                        stats.no_fix.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
                self.last_time = time;
                closed
            }
            _ => None,
        }
    }

    /// Hands on the epoch held back (the receiver went quiet, or the connection ended).
    pub fn flush(&mut self, stats: &GpsStats) -> Option<GpsFix> {
        self.flush_into(stats)
    }

    fn flush_into(&mut self, stats: &GpsStats) -> Option<GpsFix> {
        let mut fix = self.pending.take()?;
        let u16_of = |v: f64| (v.is_finite() && v >= 0.0).then(|| v.round().min(65535.0) as u16);
        fix.hdop_d = self.hdop.and_then(|h| u16_of(h * 10.0));
        fix.satellites = self.satellites.map(|n| n.min(255) as u8);
        stats.fixes.fetch_add(1, Ordering::Relaxed);
        Some(fix)
    }

    fn tpv(&self, r: &Report, time: Option<u64>) -> Option<GpsFix> {
        if r.mode.unwrap_or(0) < 2 {
            return None;
        }
        let (lat, lon) = (r.lat?, r.lon?);
        if !(lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0) {
            return None;
        }
        let u16_of = |v: f64| (v.is_finite() && v >= 0.0).then(|| v.round().min(65535.0) as u16);
        Some(GpsFix {
            time_ms: time.unwrap_or_else(crate::now_ms),
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
            speed_cmps: r.speed.and_then(|s| u16_of(s * 100.0)),
            heading_ddeg: r
                .track
                .and_then(|t| u16_of(t.rem_euclid(360.0) * 10.0))
                .map(|d| if d >= 3600 { 0 } else { d }),
            hdop_d: None,
            satellites: None,
        })
    }
}

fn tpv_time(r: &Report) -> Option<u64> {
    r.time
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
}

/// Reads `host:port` until `shutdown`, reconnecting with backoff whenever gpsd goes away.
pub(super) async fn run(
    host: &str,
    port: u16,
    tx: &mpsc::Sender<GpsFix>,
    stats: &Arc<GpsStats>,
    shutdown: &CancellationToken,
) -> Result<(), GpsError> {
    let mut backoff = Backoff::default();
    let mut first = true;
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let delay = backoff.next_delay();
            debug!(host, port, ?delay, "gpsd: reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)));
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = connect => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => { debug!(host, port, error = %e, "gpsd: connect failed"); continue; }
                Err(_) => { debug!(host, port, "gpsd: connect timed out"); continue; }
            },
        };
        if let Err(e) = stream.write_all(WATCH).await {
            debug!(host, port, error = %e, "gpsd: WATCH not sent");
            continue;
        }
        info!(host, port, "gpsd: connected");
        let mut decoder = GpsdDecoder::default();
        let mut lines = LineSplitter::new(MAX_GPSD_LINE);
        let mut buf = vec![0u8; 8192];
        let mut silent = Duration::ZERO;
        loop {
            let mut fixes = Vec::new();
            let r = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(NMEA_IDLE_FLUSH, read_chunk(&mut stream, &mut buf)) => r,
            };
            let connection_over = match r {
                Ok(Ok(0)) => {
                    warn!(host, port, "gpsd: connection closed");
                    true
                }
                Ok(Ok(n)) => {
                    silent = Duration::ZERO;
                    lines.push(&buf[..n], |line| match line {
                        Ok(l) => fixes.extend(decoder.push_line(l, stats)),
                        Err(_too_long) => {
                            stats.garbage.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    false
                }
                Ok(Err(e)) => {
                    warn!(host, port, error = %e, "gpsd: read failed");
                    true
                }
                Err(_) => {
                    silent += NMEA_IDLE_FLUSH;
                    if silent >= GPSD_IDLE {
                        warn!(host, port, "gpsd: silent, reconnecting");
                    }
                    fixes.extend(decoder.flush(stats));
                    silent >= GPSD_IDLE
                }
            };
            if connection_over {
                fixes.extend(decoder.flush(stats));
            }
            if !fixes.is_empty() {
                backoff.reset();
            }
            for fix in fixes {
                if super::io::send(tx, fix, shutdown).await == Flow::Stop {
                    return Ok(());
                }
            }
            if connection_over {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tpv_with_sky_makes_a_fix() {
        let stats = GpsStats::default();
        let mut d = GpsdDecoder::default();
        let lines: &[&str] = &[
            r#"{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}"#,
            r#"{"class":"SKY","device":"/dev/pts/1","hdop":0.54,"satellites":[{"PRN":1,"used":true},{"PRN":2,"used":false},{"PRN":3,"used":true}]}"#,
            r#"{"class":"TPV","device":"/dev/pts/1","mode":1,"time":"2020-07-11T22:37:44.000Z"}"#,
            r#"{"class":"TPV","device":"/dev/pts/1","mode":3,"time":"2020-07-11T22:37:45.000Z","lat":38.110494000,"lon":-122.626897000,"track":359.99,"speed":0.021}"#,
            // gpsd refines the same epoch: one fix, the latest TPV, the latest SKY.
            r#"{"class":"TPV","device":"/dev/pts/1","mode":3,"time":"2020-07-11T22:37:45.000Z","lat":38.110494000,"lon":-122.626897000,"track":359.99,"speed":0.051}"#,
            r#"{"class":"SKY","device":"/dev/pts/1","hdop":0.71,"uSat":7}"#,
            "not json",
        ];
        let mut fixes: Vec<_> = lines
            .iter()
            .filter_map(|l| d.push_line(l.as_bytes(), &stats))
            .collect();
        fixes.extend(d.flush(&stats));
        assert_eq!(fixes.len(), 1);
        let f = fixes[0];
        assert_eq!(f.time_ms, 1_594_507_065_000);
        assert_eq!((f.lat_e7, f.lon_e7), (381_104_940, -1_226_268_970));
        assert_eq!(f.speed_cmps, Some(5));
        assert_eq!(f.heading_ddeg, Some(0), "3599.9 rounds to 3600 = north");
        assert_eq!(f.hdop_d, Some(7));
        assert_eq!(f.satellites, Some(7));
        let s = stats.snapshot();
        assert_eq!((s.sentences, s.fixes, s.no_fix, s.garbage), (6, 1, 1, 1));
    }
}

//! NMEA 0183 lines in, one [`GpsFix`] per fix epoch out. Pure: no I/O, no clock except
//! the injected one (used only when a receiver has not sent a date yet).
//!
//! Sentences are decoded by the `nmea` crate; this file owns framing checks, counting
//! and the merge of an epoch:
//!
//! ```text
//! epoch = the run of sentences that carry the same UTC time (GGA, RMC, GNS, GLL, ZDA),
//!         plus the untimed VTG that follow them; it ends when a sentence with another
//!         time arrives, when a timed sentence type repeats from the same talker, or on
//!         flush() (end of input, idle line).
//! fix   = position of the first sentence of the epoch that reports a valid fix
//!         (GGA quality 1..=5, RMC/GLL status A, GNS mode other than N),
//!         date from RMC/ZDA (else the last date seen, +1 day after a midnight wrap),
//!         speed/course from RMC or VTG, HDOP from GGA/GNS, satellites the largest count
//!         any sentence of the epoch reports.
//! ```
//!
//! Every non-empty line lands in exactly one counter: `sentences` (framed, checksum
//! right, decoded or deliberately ignored), `checksum_errors`, or `garbage` (not NMEA, or
//! a position sentence the crate cannot decode). Epochs with position sentences but no
//! valid fix count in `no_fix`; emitted epochs in `fixes`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{NaiveDate, NaiveTime, TimeDelta, Timelike};
use nmea::sentences::FixType;
use nmea::sentences::rmc::RmcStatusOfFix;
use nmea::{NmeaSentence, SentenceType};

use super::{GpsFix, GpsStats};

/// Longest line the merger looks at (NMEA 0183 allows 82 bytes; some receivers send
/// longer proprietary sentences). Longer lines are garbage.
pub const MAX_NMEA_LINE: usize = 512;

const KNOT_CMPS: f64 = 51.444_444; // 1852 m / 3600 s, in cm/s
const MS_PER_DAY: i64 = 86_400_000;

/// Merges NMEA sentences into fixes. See the module note.
#[derive(Debug)]
pub struct NmeaMerger {
    stats: Arc<GpsStats>,
    clock: fn() -> u64,
    epoch: Option<Epoch>,
    /// Time of the last epoch closed, so that a late straggler of an epoch already
    /// flushed (after an idle gap) does not produce a second fix for the same time.
    last_closed: Option<NaiveTime>,
    /// Last UTC date the receiver sent, and the time of day it belongs to.
    date: Option<(NaiveDate, NaiveTime)>,
}

#[derive(Debug, Default)]
struct Epoch {
    time: Option<NaiveTime>,
    /// Timed sentence types seen, as (talker, type), to split epochs of receivers that
    /// send no time.
    seen: Vec<([u8; 2], SentenceType)>,
    had_position_sentence: bool,
    position: Option<(f64, f64)>,
    date: Option<NaiveDate>,
    speed_knots: Option<f32>,
    course_deg: Option<f32>,
    hdop: Option<f32>,
    satellites: Option<u32>,
}

/// What one line was, for the caller's curiosity (the counters are already updated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// Blank line: ignored, not counted.
    Empty,
    /// A well-formed sentence.
    Sentence,
    /// Framed like NMEA but the checksum is wrong.
    ChecksumError,
    /// Anything else.
    Garbage,
}

impl Default for NmeaMerger {
    fn default() -> Self {
        Self::new(Arc::new(GpsStats::default()))
    }
}

impl NmeaMerger {
    /// A merger counting into `stats`, using the wall clock for receivers without a date.
    pub fn new(stats: Arc<GpsStats>) -> Self {
        Self::with_clock(stats, crate::now_ms)
    }

    /// Same, with the clock injected (ms since the Unix epoch). The clock only supplies
    /// the date when the receiver has sent none yet.
    pub fn with_clock(stats: Arc<GpsStats>, clock: fn() -> u64) -> Self {
        Self {
            stats,
            clock,
            epoch: None,
            last_closed: None,
            date: None,
        }
    }

    /// The counters this merger updates.
    pub fn stats(&self) -> &Arc<GpsStats> {
        &self.stats
    }

    /// Feeds one line (with or without its CR/LF). Returns the fix of the epoch this line
    /// closed, if that epoch had one.
    pub fn push_line(&mut self, line: impl AsRef<[u8]>) -> Option<GpsFix> {
        self.push_line_kind(line).1
    }

    /// Like [`push_line`](Self::push_line), also saying how the line was classified.
    pub fn push_line_kind(&mut self, line: impl AsRef<[u8]>) -> (LineKind, Option<GpsFix>) {
        let bytes = line.as_ref();
        let Ok(text) = std::str::from_utf8(bytes) else {
            return (self.count(LineKind::Garbage), None);
        };
        // Serial lines pick up NULs and spaces around a sentence; a sentence is from its
        // `$` to its checksum.
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if text.is_empty() {
            return (LineKind::Empty, None);
        }
        if text.len() > MAX_NMEA_LINE {
            return (self.count(LineKind::Garbage), None);
        }
        match frame(text) {
            Framing::Ok => {}
            Framing::Checksum => return (self.count(LineKind::ChecksumError), None),
            Framing::Garbage => return (self.count(LineKind::Garbage), None),
        }
        // Proprietary ($P...) and AIS (!...) sentences are well-formed but not ours.
        if text.starts_with("$P") || text.starts_with('!') {
            return (self.count(LineKind::Sentence), None);
        }
        let Ok(sentence) = nmea::parse_nmea_sentence(text) else {
            // Framed and checksummed, but a type the crate does not know (e.g. a new
            // standard sentence): well-formed, ignored.
            return (self.count(LineKind::Sentence), None);
        };
        match self.decode(sentence) {
            Ok(fix) => (self.count(LineKind::Sentence), fix),
            Err(()) => (self.count(LineKind::Garbage), None),
        }
    }

    /// Ends the current epoch (end of input, or the receiver went quiet) and returns its
    /// fix if it had one.
    pub fn flush(&mut self) -> Option<GpsFix> {
        let epoch = self.epoch.take()?;
        self.close(epoch)
    }

    fn count(&self, kind: LineKind) -> LineKind {
        let c = match kind {
            LineKind::Empty => return kind,
            LineKind::Sentence => &self.stats.sentences,
            LineKind::ChecksumError => &self.stats.checksum_errors,
            LineKind::Garbage => &self.stats.garbage,
        };
        c.fetch_add(1, Ordering::Relaxed);
        kind
    }

    /// Decodes one framed sentence into the current epoch. `Err` = a position sentence
    /// the crate could not decode.
    fn decode(&mut self, s: NmeaSentence<'_>) -> Result<Option<GpsFix>, ()> {
        let talker = talker_key(s.talker_id);
        let kind = s.message_id;
        match kind {
            SentenceType::GGA => {
                let d = nmea::sentences::parse_gga(s).map_err(|_| ())?;
                let valid = d.fix_type.is_some_and(FixType::is_valid);
                Ok(self.with_epoch(d.fix_time, talker, kind, |e| {
                    e.position_sentence(valid, d.latitude.zip(d.longitude));
                    e.hdop = e.hdop.or(d.hdop);
                    e.sats(d.fix_satellites);
                }))
            }
            SentenceType::RMC => {
                let d = nmea::sentences::parse_rmc(s).map_err(|_| ())?;
                let valid = !matches!(d.status_of_fix, RmcStatusOfFix::Invalid);
                Ok(self.with_epoch(d.fix_time, talker, kind, |e| {
                    e.position_sentence(valid, d.lat.zip(d.lon));
                    e.date = e.date.or(d.fix_date);
                    if valid {
                        e.speed_knots = e.speed_knots.or(d.speed_over_ground);
                        e.course_deg = e.course_deg.or(d.true_course);
                    }
                }))
            }
            SentenceType::GNS => {
                // nmea 0.8 decodes at most two mode characters (GPS, GLONASS); NMEA 4.x
                // receivers send one per constellation ("ANNA", "NDD"). Keep the first
                // one that is not N: the fix is valid if any constellation has one.
                let normalized = gns_one_mode(s.data);
                let s = match &normalized {
                    Some(data) => NmeaSentence { data, ..s },
                    None => s,
                };
                let d = nmea::sentences::parse_gns(s).map_err(|_| ())?;
                let valid = FixType::from(d.faa_modes).is_valid();
                Ok(self.with_epoch(d.fix_time, talker, kind, |e| {
                    e.position_sentence(valid, d.lat.zip(d.lon));
                    e.hdop = e.hdop.or(d.hdop);
                    e.sats(Some(u32::from(d.nsattelites)));
                }))
            }
            SentenceType::GLL => {
                let d = nmea::sentences::parse_gll(s).map_err(|_| ())?;
                Ok(self.with_epoch(d.fix_time, talker, kind, |e| {
                    e.position_sentence(d.valid, d.latitude.zip(d.longitude));
                }))
            }
            SentenceType::ZDA => {
                let d = nmea::sentences::parse_zda(s).map_err(|_| ())?;
                let date = d.utc_date();
                Ok(self.with_epoch(d.utc_time, talker, kind, |e| {
                    e.date = e.date.or(date);
                }))
            }
            SentenceType::VTG => {
                let d = nmea::sentences::parse_vtg(s).map_err(|_| ())?;
                // VTG carries no time: it belongs to the epoch in progress.
                if let Some(e) = self.epoch.as_mut() {
                    e.speed_knots = e.speed_knots.or(d.speed_over_ground);
                    e.course_deg = e.course_deg.or(d.true_course);
                }
                Ok(None)
            }
            // GSA, GSV, TXT, ...: well-formed, nothing we merge.
            _ => Ok(None),
        }
    }

    /// Runs `f` on the epoch `time` belongs to, closing the current one first if `time`
    /// starts a new epoch. Returns the closed epoch's fix.
    fn with_epoch(
        &mut self,
        time: Option<NaiveTime>,
        talker: [u8; 2],
        kind: SentenceType,
        f: impl FnOnce(&mut Epoch),
    ) -> Option<GpsFix> {
        let mut closed = None;
        let new_epoch = match &self.epoch {
            None => true,
            Some(e) => e.time != time || e.seen.contains(&(talker, kind)),
        };
        if new_epoch {
            if let Some(old) = self.epoch.take() {
                closed = self.close(old);
            }
            if time.is_some() && time == self.last_closed {
                // A straggler of an epoch already flushed: dropped, never a second fix.
                return closed;
            }
            self.epoch = Some(Epoch {
                time,
                ..Epoch::default()
            });
        }
        if let Some(e) = self.epoch.as_mut() {
            e.seen.push((talker, kind));
            f(e);
        }
        closed
    }

    fn close(&mut self, e: Epoch) -> Option<GpsFix> {
        self.last_closed = e.time;
        // Date bookkeeping happens for every timed epoch, fix or not, so that a later
        // GGA-only epoch still gets the right day.
        let date = match (e.time, e.date) {
            (Some(t), Some(d)) => {
                self.date = Some((d, t));
                Some(d)
            }
            (Some(t), None) => match self.date {
                Some((d, prev)) => {
                    // Midnight wrap: the time of day went back by more than 12 h.
                    let wrapped = prev > t && (prev - t) > TimeDelta::hours(12);
                    let d = if wrapped {
                        d.succ_opt().unwrap_or(d)
                    } else {
                        d
                    };
                    self.date = Some((d, t));
                    Some(d)
                }
                None => None,
            },
            (None, _) => None,
        };
        if !e.had_position_sentence {
            return None;
        }
        let Some((lat, lon)) = e.position else {
            self.stats.no_fix.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let (Some(lat_e7), Some(lon_e7)) = (deg_e7(lat, 90.0), deg_e7(lon, 180.0)) else {
            self.stats.no_fix.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let time_ms = match (e.time, date) {
            (Some(t), Some(d)) => ms_since_epoch(d, t),
            (Some(t), None) => Some(nearest_to_now(t, (self.clock)())),
            (None, _) => None,
        }
        .unwrap_or_else(self.clock);
        self.stats.fixes.fetch_add(1, Ordering::Relaxed);
        Some(GpsFix {
            time_ms,
            lat_e7,
            lon_e7,
            speed_cmps: e
                .speed_knots
                .and_then(|k| scaled_u16(f64::from(k) * KNOT_CMPS)),
            heading_ddeg: e.course_deg.and_then(|c| {
                let c = f64::from(c).rem_euclid(360.0);
                scaled_u16(c * 10.0).map(|d| if d >= 3600 { 0 } else { d })
            }),
            hdop_d: e.hdop.and_then(|h| scaled_u16(f64::from(h) * 10.0)),
            satellites: e.satellites.map(|n| n.min(u32::from(u8::MAX)) as u8),
        })
    }
}

impl Epoch {
    fn position_sentence(&mut self, valid: bool, pos: Option<(f64, f64)>) {
        self.had_position_sentence = true;
        if valid && self.position.is_none() {
            self.position = pos;
        }
    }

    fn sats(&mut self, n: Option<u32>) {
        if let Some(n) = n {
            self.satellites = Some(self.satellites.map_or(n, |m| m.max(n)));
        }
    }
}

enum Framing {
    Ok,
    Checksum,
    Garbage,
}

/// `$` or `!`, printable ASCII, `*HH` at the end, XOR of the bytes between matching HH.
fn frame(text: &str) -> Framing {
    let b = text.as_bytes();
    if !(b[0] == b'$' || b[0] == b'!') || b.len() < 7 {
        return Framing::Garbage;
    }
    if !b.iter().all(|c| (0x20..0x7f).contains(c)) {
        return Framing::Garbage;
    }
    let star = b.len() - 3;
    if b[star] != b'*' {
        return Framing::Garbage;
    }
    let Ok(want) = u8::from_str_radix(&text[star + 1..], 16) else {
        return Framing::Garbage;
    };
    let body = &b[1..star];
    if body.contains(&b'*') || body.contains(&b'$') {
        // Two sentences run together (a dropped newline).
        return Framing::Garbage;
    }
    let got = body.iter().fold(0u8, |x, c| x ^ c);
    if got == want {
        Framing::Ok
    } else {
        Framing::Checksum
    }
}

fn talker_key(t: &str) -> [u8; 2] {
    let b = t.as_bytes();
    [
        b.first().copied().unwrap_or(0),
        b.get(1).copied().unwrap_or(0),
    ]
}

/// GNS data with the mode field (6th) cut to one character, or None if it already has
/// at most two.
fn gns_one_mode(data: &str) -> Option<String> {
    let fields: Vec<&str> = data.split(',').collect();
    let mode = fields.get(5)?;
    if mode.len() <= 2 {
        return None;
    }
    let best = mode.chars().find(|c| *c != 'N').unwrap_or('N');
    let mut out = String::with_capacity(data.len());
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if i == 5 {
            out.push(best);
        } else {
            out.push_str(f);
        }
    }
    Some(out)
}

/// Degrees to 1e-7 degrees, rounded; None outside ±limit or not finite.
fn deg_e7(deg: f64, limit: f64) -> Option<i32> {
    if !deg.is_finite() || deg.abs() > limit {
        return None;
    }
    Some((deg * 1e7).round() as i32)
}

fn scaled_u16(v: f64) -> Option<u16> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some(v.round().min(f64::from(u16::MAX)) as u16)
}

fn ms_since_epoch(d: NaiveDate, t: NaiveTime) -> Option<u64> {
    u64::try_from(d.and_time(t).and_utc().timestamp_millis()).ok()
}

/// The instant with time of day `t` closest to `now_ms` (yesterday, today or tomorrow).
fn nearest_to_now(t: NaiveTime, now_ms: u64) -> u64 {
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let tod = i64::from(t.num_seconds_from_midnight()) * 1000
        + i64::from(t.nanosecond() / 1_000_000).min(999);
    let today = now - now.rem_euclid(MS_PER_DAY);
    [today - MS_PER_DAY, today, today + MS_PER_DAY]
        .into_iter()
        .map(|day| day + tod)
        .min_by_key(|c| (c - now).abs())
        .and_then(|c| u64::try_from(c).ok())
        .unwrap_or(now_ms)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn merge(lines: &[&str]) -> (Vec<GpsFix>, Arc<GpsStats>) {
        let stats = Arc::new(GpsStats::default());
        let mut m = NmeaMerger::with_clock(stats.clone(), || 1_600_000_000_000);
        let mut out: Vec<GpsFix> = lines.iter().filter_map(|l| m.push_line(l)).collect();
        out.extend(m.flush());
        (out, stats)
    }

    #[test]
    fn merges_gga_and_rmc_of_one_epoch() {
        // From gpsd's test/daemon/telit-he910.log (see tests/data/nmea/README.md).
        let (fixes, stats) = merge(&[
            "$GPGGA,105339.408,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*7D",
            "$GPGLL,5050.4120,N,00420.8244,E,105339.408,A,A*53",
            "$GPGSA,A,3,13,15,17,19,24,28,,,,,,,2.50,1.50,2.00*07",
            "$GPRMC,105339.408,A,5050.4120,N,00420.8244,E,0.03,329.56,120319,,,A*64",
            "$GPVTG,329.56,T,,M,0.03,N,0.07,K,A*32",
        ]);
        assert_eq!(fixes.len(), 1);
        let f = fixes[0];
        // 2019-03-12T10:53:39.408Z
        assert_eq!(f.time_ms, 1_552_388_019_408);
        assert_eq!(f.lat_e7, 508_402_000);
        assert_eq!(f.lon_e7, 43_470_733);
        assert_eq!(f.speed_cmps, Some(2)); // 0.03 kn = 1.5 cm/s
        assert_eq!(f.heading_ddeg, Some(3296));
        assert_eq!(f.hdop_d, Some(15));
        assert_eq!(f.satellites, Some(6));
        assert_eq!(stats.snapshot().sentences, 5);
        assert_eq!(stats.snapshot().fixes, 1);
    }

    #[test]
    fn no_fix_sentences_give_no_position() {
        let (fixes, stats) = merge(&[
            "$GNGGA,074150.799,,,,,0,00,,,M,0.0,M,,0000,*64",
            "$GNGNS,074150.799,,,,,NNNN,00,,,0.0,,0000*63",
            "$GNRMC,074150.799,V,,,,,,,250215,,,N*52",
            "$GPGGA,,,,,,0,,,,M,,M,,*66",
            "$GPRMC,,V,,,,,,,,,,N*53",
            "$GPGGA,,,,,,0,,,,M,,M,,*66",
            "$GPRMC,,V,,,,,,,,,,N*53",
        ]);
        assert!(fixes.is_empty());
        let s = stats.snapshot();
        assert_eq!(s.no_fix, 3, "{s:?}");
        assert_eq!(s.garbage, 0, "{s:?}");
        assert_eq!(s.sentences, 7);
    }

    #[test]
    fn multi_constellation_gns_mode_is_understood() {
        let (fixes, stats) = merge(&[
            "$GNGNS,074155.799,3114.8770,N,12135.2463,E,ANNA,05,1.3,156.9,8.3,,0000*52",
            "$GNRMC,074155.799,A,3114.8770,N,12135.2463,E,0.30,4.94,250215,,,A*76",
        ]);
        assert_eq!(fixes.len(), 1, "{:?}", stats.snapshot());
        assert_eq!(fixes[0].satellites, Some(5));
        assert_eq!(fixes[0].hdop_d, Some(13));
        assert_eq!(stats.snapshot().garbage, 0);
    }

    #[test]
    fn checksum_errors_and_garbage_are_counted_not_fatal() {
        let (fixes, stats) = merge(&[
            "$GPRMC,105339.408,A,5050.4120,N,00420.8244,E,0.03,329.56,120319,,,A*65",
            "hello",
            "$GPGGA,105339.408,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000",
            "\u{0}\u{0}",
            "$GPGGA,105339.408,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*7D",
            "",
        ]);
        assert_eq!(fixes.len(), 1);
        let s = stats.snapshot();
        assert_eq!((s.checksum_errors, s.garbage, s.sentences), (1, 2, 1));
        assert_eq!(
            fixes[0].speed_cmps, None,
            "the corrupt RMC contributed nothing"
        );
    }

    #[test]
    fn straggler_after_flush_does_not_make_a_second_fix() {
        let stats = Arc::new(GpsStats::default());
        let mut m = NmeaMerger::with_clock(stats, || 0);
        assert!(
            m.push_line("$GPGGA,105339.408,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*7D")
                .is_none()
        );
        assert!(m.flush().is_some());
        assert!(
            m.push_line("$GPRMC,105339.408,A,5050.4120,N,00420.8244,E,0.03,329.56,120319,,,A*64")
                .is_none()
        );
        assert!(m.flush().is_none());
    }

    #[test]
    fn date_carries_over_midnight_for_gga_only_epochs() {
        let (fixes, _) = merge(&[
            "$GPRMC,235959.000,A,5050.4120,N,00420.8244,E,0.03,329.56,120319,,,A*64",
            "$GPGGA,000000.000,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*7C",
        ]);
        assert_eq!(fixes.len(), 2);
        assert_eq!(fixes[1].time_ms - fixes[0].time_ms, 1000);
    }

    #[test]
    fn without_a_date_the_clock_supplies_the_day() {
        // Clock: 2020-09-13T12:26:40Z. GGA at 12:26:39 -> same day.
        let (fixes, _) =
            merge(&["$GPGGA,122639.000,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*71"]);
        assert_eq!(fixes[0].time_ms, 1_599_999_999_000);
    }
}

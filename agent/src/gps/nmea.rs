//! NMEA 0183 lines in, at most one [`GpsFix`] per reporting cycle out. Pure: no I/O, no
//! clock except the injected one (used only when a receiver has not sent a date yet).
//!
//! Sentences are decoded by the `nmea` crate; this file owns framing checks, counting,
//! the grouping of sentences into reporting cycles and the verdict on each cycle.
//!
//! # Reporting cycles
//!
//! A receiver prints a burst of sentences per epoch (u-blox: RMC VTG GGA GSA.. GSV.. GLL;
//! SiRF: GGA GSA GSV.. RMC; Telit: GGA GLL GSA RMC VTG; some only GGA, some only RMC).
//! Validity is decided for the whole cycle, never per sentence, as gpsd groups them:
//!
//! ```text
//! cycle = the timed sentences (GGA, RMC, GNS, GLL, ZDA) whose UTC times agree within
//!         10 ms, plus the untimed ones (GSA, VTG) that follow them. The next cycle starts
//!         with a timed sentence that is later, or that repeats a (talker, type) already
//!         in the cycle, or on flush() (end of input, idle line). Receivers that send no
//!         time at all (searching) have untimed cycles, split where a type repeats.
//! fix   = when the cycle passes every rule below: the first in-range latitude/longitude
//!         of its position sentences; date from a valid RMC or ZDA (else the last date
//!         seen, +1 day after a midnight wrap, else the wall clock's nearest day: logs
//!         start without a date until the first RMC or ZDA); speed/course from RMC or
//!         VTG; HDOP from GGA/GNS/GSA; satellites = the cycle's count (below).
//! ```
//!
//! # The rules
//!
//! A cycle with at least one position sentence (GGA, RMC, GNS, GLL) gives a fix only if
//! no sentence of it says otherwise. A rejected cycle is counted once, in `no_fix` and
//! under the first [`Reject`] reason it meets, in this order:
//!
//! 1. `time_mismatch`: the times disagree. A timed sentence earlier than the cycle's
//!    time, of a type the cycle has not had yet (a stale sentence in the burst), rejects
//!    the cycle; a burst that repeats the time of the cycle just closed (a receiver whose
//!    clock stopped: the Trimble Placer keeps printing GGA and GSA with a frozen time) is
//!    a cycle of its own and is rejected. A burst whose time steps back as a whole (its
//!    first type was already in the cycle: Telit HE910 after a resync) is a new cycle.
//! 2. `no_position`: no position sentence carries an in-range latitude/longitude (the
//!    receiver is searching).
//! 3. `status_invalid`: RMC status V (anything but A or D), GLL status V.
//! 4. `mode_invalid`: the mode indicator of RMC or GLL, or every mode character of GNS
//!    (one per constellation), is not a fix: N (not valid), E (estimated), M (manual),
//!    S (simulator), C or U (Quectel's caution, unsafe); or GNS navigation status U or V.
//! 5. `gga_quality`: GGA fix quality 0 (invalid), 6 (estimated), 7 (manual) or 8
//!    (simulator).
//! 6. `gsa_no_fix`: any GSA says fix mode 1 (no fix).
//! 7. `few_satellites`: the receiver has not settled: the cycle has GGA or GNS and uses
//!    fewer than [`MIN_SATELLITES`] satellites. Per-constellation GGAs (SiRFstarV:
//!    GPGGA 08 + GLGGA 02) are summed; a GN count stands for all; the cycle's count is
//!    the larger of the two; an empty count is none (as gpsd reads it).
//! 8. `hdop_out_of_range`: the receiver has not settled: some HDOP of the cycle (GGA,
//!    GNS, GSA) is not in (0, [`MAX_HDOP`]] (u-blox prints 99.99 before its first fix,
//!    others 0.0).
//!
//! Talker ids do not matter (GP, GN, GL, GA, BD, GB, ...): a GLONASS-only or
//! Galileo-only receiver is judged the same way. VTG carries no validity the crate
//! decodes, and proprietary sentences are ignored. Untimed sentences belong to the cycle
//! in progress: receivers are taken to print GSA and VTG after a timed sentence of their
//! epoch, as all of the above do.
//!
//! Against gpsd 3.22 (`agent/tests/gps_rules.rs` replays the rule logs through gpsfake):
//! gpsd groups a cycle by time too, but reports it from the sentence that ends its
//! learned cycle (or from each sentence until it has learned one), taking the mode
//! mostly from whether that sentence carries a position. So it rejects with the agent
//! where that sentence is an RMC or GLL with status V, a GLL with mode N, or a GGA
//! without a position or with fewer than 3 satellites; a GSA saying no fix, an RMC mode
//! N, a GNS `NNNN`, a GGA of quality 0 or 6 that has a position, a stale or frozen time
//! and an HDOP of 99.99 it reports as 2D/3D fixes. On those logs the agent reports a
//! position for every cycle gpsd reports one for except these, and for no other.
//!
//! # Counting
//!
//! Every non-empty line lands in exactly one of `sentences` (framed, checksum right,
//! decoded or deliberately ignored), `checksum_errors`, or `garbage` (not NMEA, or a
//! GGA/RMC/GNS/GLL/ZDA/VTG/GSA the crate cannot decode). Every cycle with a position
//! sentence lands in `fixes` or in `no_fix` (and then in one `rejected` reason).

use std::sync::Arc;

use chrono::{NaiveDate, NaiveTime, TimeDelta, Timelike};
use nmea::sentences::gns::NavigationStatus;
use nmea::sentences::gsa::GsaMode2;
use nmea::sentences::rmc::RmcStatusOfFix;
use nmea::sentences::{FaaMode, FixType};
use nmea::{NmeaSentence, SentenceType};
use serde::Serialize;

use super::{GpsFix, GpsStats};

/// Longest line the merger looks at (NMEA 0183 allows 82 bytes; some receivers send
/// longer proprietary sentences). Longer lines are garbage.
pub const MAX_NMEA_LINE: usize = 512;
/// Fewest satellites a cycle must use (rule 7): a 2D fix needs three.
pub const MIN_SATELLITES: u32 = 3;
/// Largest HDOP a cycle may report (rule 8). HDOP 20 is already "poor" (tens of metres);
/// 50 and above are a receiver's placeholders (99.99) or a fix no geofence can use.
pub const MAX_HDOP: f32 = 50.0;
/// Timed sentences within this much of each other belong to one epoch (gpsd uses the
/// same: receivers print the time of one epoch with different precisions).
const SAME_EPOCH_MS: i64 = 10;

const KNOT_CMPS: f64 = 51.444_444; // 1852 m / 3600 s, in cm/s
const MS_PER_DAY: i64 = 86_400_000;

/// Why a reporting cycle gave no position: the rules of the module note, in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Rule 1: a stale or repeated time in the cycle.
    TimeMismatch,
    /// Rule 2: no sentence carried a usable position.
    NoPosition,
    /// Rule 3: RMC or GLL status V.
    StatusInvalid,
    /// Rule 4: RMC/GLL/GNS mode indicator N (or E, M, S, C, U); GNS navigation status.
    ModeInvalid,
    /// Rule 5: GGA quality 0, 6, 7 or 8.
    GgaQuality,
    /// Rule 6: GSA fix mode 1.
    GsaNoFix,
    /// Rule 7: fewer than [`MIN_SATELLITES`] satellites used.
    FewSatellites,
    /// Rule 8: HDOP not in (0, [`MAX_HDOP`]].
    HdopOutOfRange,
}

impl Reject {
    /// Every reason, in the order the rules apply.
    pub const ALL: [Reject; 8] = [
        Reject::TimeMismatch,
        Reject::NoPosition,
        Reject::StatusInvalid,
        Reject::ModeInvalid,
        Reject::GgaQuality,
        Reject::GsaNoFix,
        Reject::FewSatellites,
        Reject::HdopOutOfRange,
    ];

    /// The name used in `/v1/status` and as the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TimeMismatch => "time_mismatch",
            Reject::NoPosition => "no_position",
            Reject::StatusInvalid => "status_invalid",
            Reject::ModeInvalid => "mode_invalid",
            Reject::GgaQuality => "gga_quality",
            Reject::GsaNoFix => "gsa_no_fix",
            Reject::FewSatellites => "few_satellites",
            Reject::HdopOutOfRange => "hdop_out_of_range",
        }
    }

    /// The reason with this name.
    pub fn from_name(name: &str) -> Option<Reject> {
        Reject::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// Rejected cycles per reason (a point-in-time copy, for `/v1/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RejectCounts {
    /// See [`Reject::TimeMismatch`].
    pub time_mismatch: u64,
    /// See [`Reject::NoPosition`].
    pub no_position: u64,
    /// See [`Reject::StatusInvalid`].
    pub status_invalid: u64,
    /// See [`Reject::ModeInvalid`].
    pub mode_invalid: u64,
    /// See [`Reject::GgaQuality`].
    pub gga_quality: u64,
    /// See [`Reject::GsaNoFix`].
    pub gsa_no_fix: u64,
    /// See [`Reject::FewSatellites`].
    pub few_satellites: u64,
    /// See [`Reject::HdopOutOfRange`].
    pub hdop_out_of_range: u64,
}

impl RejectCounts {
    /// The count of one reason.
    pub fn get(&self, r: Reject) -> u64 {
        match r {
            Reject::TimeMismatch => self.time_mismatch,
            Reject::NoPosition => self.no_position,
            Reject::StatusInvalid => self.status_invalid,
            Reject::ModeInvalid => self.mode_invalid,
            Reject::GgaQuality => self.gga_quality,
            Reject::GsaNoFix => self.gsa_no_fix,
            Reject::FewSatellites => self.few_satellites,
            Reject::HdopOutOfRange => self.hdop_out_of_range,
        }
    }

    pub(super) fn set(&mut self, r: Reject, v: u64) {
        let slot = match r {
            Reject::TimeMismatch => &mut self.time_mismatch,
            Reject::NoPosition => &mut self.no_position,
            Reject::StatusInvalid => &mut self.status_invalid,
            Reject::ModeInvalid => &mut self.mode_invalid,
            Reject::GgaQuality => &mut self.gga_quality,
            Reject::GsaNoFix => &mut self.gsa_no_fix,
            Reject::FewSatellites => &mut self.few_satellites,
            Reject::HdopOutOfRange => &mut self.hdop_out_of_range,
        };
        *slot = v;
    }

    /// All reasons together.
    pub fn total(&self) -> u64 {
        Reject::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Merges NMEA sentences into fixes. See the module note.
#[derive(Debug)]
pub struct NmeaMerger {
    stats: Arc<GpsStats>,
    clock: fn() -> u64,
    cycle: Option<Cycle>,
    /// Time of the last cycle closed: a burst repeating it is a frozen receiver clock or a
    /// late straggler of a cycle already flushed (rule 1), never a second fix.
    last_closed: Option<NaiveTime>,
    /// Last UTC date the receiver sent, and the time of day it belongs to.
    date: Option<(NaiveDate, NaiveTime)>,
}

#[derive(Debug, Default)]
struct Cycle {
    time: Option<NaiveTime>,
    /// Timed sentence types seen, as (talker, type): a repeat starts the next cycle.
    seen: Vec<([u8; 2], SentenceType)>,
    /// A GGA, RMC, GNS or GLL was part of it: the cycle gets a verdict.
    judged: bool,
    /// Rules broken so far (one bit per [`Reject`]).
    vetoes: u16,
    position: Option<(i32, i32)>,
    date: Option<NaiveDate>,
    speed_knots: Option<f32>,
    course_deg: Option<f32>,
    hdop: Option<f32>,
    /// Satellites used, per talker (largest count of its GGA/GNS).
    satellites: Vec<([u8; 2], u32)>,
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

/// Where a timed sentence goes.
enum Place {
    /// Into the cycle in progress.
    Join,
    /// Into the cycle in progress, which it rejects (rule 1).
    Stale,
    /// Into a new cycle.
    New,
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
            cycle: None,
            last_closed: None,
            date: None,
        }
    }

    /// The counters this merger updates.
    pub fn stats(&self) -> &Arc<GpsStats> {
        &self.stats
    }

    /// Feeds one line (with or without its CR/LF). Returns the fix of the cycle this line
    /// closed, if that cycle had one.
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

    /// Ends the current cycle (end of input, or the receiver went quiet) and returns its
    /// fix if it had one.
    pub fn flush(&mut self) -> Option<GpsFix> {
        let cycle = self.cycle.take()?;
        self.close(cycle)
    }

    fn count(&self, kind: LineKind) -> LineKind {
        let c = match kind {
            LineKind::Empty => return kind,
            LineKind::Sentence => &self.stats.sentences,
            LineKind::ChecksumError => &self.stats.checksum_errors,
            LineKind::Garbage => &self.stats.garbage,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        kind
    }

    /// Decodes one framed sentence into the current cycle. `Err` = a sentence we merge
    /// that the crate could not decode.
    fn decode(&mut self, s: NmeaSentence<'_>) -> Result<Option<GpsFix>, ()> {
        let talker = talker_key(s.talker_id);
        let kind = s.message_id;
        match kind {
            SentenceType::GGA => {
                let d = nmea::sentences::parse_gga(s).map_err(|_| ())?;
                Ok(self.with_cycle(d.fix_time, talker, kind, |c| {
                    c.judged = true;
                    if !d.fix_type.is_some_and(FixType::is_valid) {
                        c.veto(Reject::GgaQuality);
                    }
                    c.position(d.latitude.zip(d.longitude));
                    c.hdop(d.hdop);
                    // An empty count is none, as gpsd reads it.
                    c.sats(talker, d.fix_satellites.unwrap_or(0));
                }))
            }
            SentenceType::RMC => {
                let d = nmea::sentences::parse_rmc(s).map_err(|_| ())?;
                let valid = !matches!(d.status_of_fix, RmcStatusOfFix::Invalid);
                Ok(self.with_cycle(d.fix_time, talker, kind, |c| {
                    c.judged = true;
                    if !valid {
                        c.veto(Reject::StatusInvalid);
                    }
                    if d.faa_mode.is_some_and(|m| !mode_is_fix(m)) {
                        c.veto(Reject::ModeInvalid);
                    }
                    c.position(d.lat.zip(d.lon));
                    // A receiver without a fix may print its RTC's idea of the date
                    // (MediaTek, Royaltek): only a valid RMC dates the cycle.
                    if valid {
                        c.date = c.date.or(d.fix_date);
                    }
                    c.speed_knots = c.speed_knots.or(d.speed_over_ground);
                    c.course_deg = c.course_deg.or(d.true_course);
                }))
            }
            SentenceType::GNS => {
                // nmea 0.8 decodes at most two mode characters (GPS, GLONASS); NMEA 4.x
                // receivers send one per constellation ("ANNA", "NDD"). Keep the first
                // one that is a fix: the cycle has a fix if any constellation has one.
                let normalized = gns_one_mode(s.data);
                let s = match &normalized {
                    Some(data) => NmeaSentence { data, ..s },
                    None => s,
                };
                let d = nmea::sentences::parse_gns(s).map_err(|_| ())?;
                let fix = FixType::from(d.faa_modes).is_valid()
                    && !matches!(
                        d.nav_status,
                        Some(NavigationStatus::Unsafe | NavigationStatus::NotValidForNavigation)
                    );
                Ok(self.with_cycle(d.fix_time, talker, kind, |c| {
                    c.judged = true;
                    if !fix {
                        c.veto(Reject::ModeInvalid);
                    }
                    c.position(d.lat.zip(d.lon));
                    c.hdop(d.hdop);
                    c.sats(talker, u32::from(d.nsattelites));
                }))
            }
            SentenceType::GLL => {
                let d = nmea::sentences::parse_gll(s).map_err(|_| ())?;
                Ok(self.with_cycle(d.fix_time, talker, kind, |c| {
                    c.judged = true;
                    if !d.valid {
                        c.veto(Reject::StatusInvalid);
                    }
                    if d.faa_mode.is_some_and(|m| !mode_is_fix(m)) {
                        c.veto(Reject::ModeInvalid);
                    }
                    c.position(d.latitude.zip(d.longitude));
                }))
            }
            SentenceType::ZDA => {
                let d = nmea::sentences::parse_zda(s).map_err(|_| ())?;
                let date = d.utc_date();
                Ok(self.with_cycle(d.utc_time, talker, kind, |c| {
                    c.date = c.date.or(date);
                }))
            }
            SentenceType::VTG => {
                let d = nmea::sentences::parse_vtg(s).map_err(|_| ())?;
                // VTG carries no time: it belongs to the cycle in progress.
                if let Some(c) = self.cycle.as_mut() {
                    c.speed_knots = c.speed_knots.or(d.speed_over_ground);
                    c.course_deg = c.course_deg.or(d.true_course);
                }
                Ok(None)
            }
            SentenceType::GSA => {
                // SiRF TriG adds a fourth DOP after the VDOP ("2.1,1.1,1.8,1.2"), which
                // the crate takes for an NMEA 4.1 system id and refuses: without it.
                let s = match gsa_without_extra_field(s.data) {
                    Some(data) => NmeaSentence { data, ..s },
                    None => s,
                };
                let d = nmea::sentences::parse_gsa(s).map_err(|_| ())?;
                // GSA carries no time: it belongs to the cycle in progress.
                if let Some(c) = self.cycle.as_mut() {
                    if d.mode2 == GsaMode2::NoFix {
                        c.veto(Reject::GsaNoFix);
                    }
                    c.hdop(d.hdop);
                }
                Ok(None)
            }
            // GSV, TXT, GST, GBS, ...: well-formed, nothing we merge.
            _ => Ok(None),
        }
    }

    /// Runs `f` on the cycle a timed sentence belongs to (see the module note), closing
    /// the current one first if it starts a new cycle. Returns the closed cycle's fix.
    fn with_cycle(
        &mut self,
        time: Option<NaiveTime>,
        talker: [u8; 2],
        kind: SentenceType,
        f: impl FnOnce(&mut Cycle),
    ) -> Option<GpsFix> {
        let key = (talker, kind);
        let place = match &self.cycle {
            None => Place::New,
            Some(c) => {
                let seen = c.seen.contains(&key);
                match (time, c.time) {
                    (Some(t), Some(ct)) => match compare(t, ct) {
                        std::cmp::Ordering::Equal if !seen => Place::Join,
                        std::cmp::Ordering::Less if !seen => Place::Stale,
                        // Later; a repeated type (same time: rule 1 below; earlier: the
                        // receiver's clock stepped back between bursts).
                        _ => Place::New,
                    },
                    (None, None) if !seen => Place::Join,
                    _ => Place::New,
                }
            }
        };
        let mut closed = None;
        if let Place::New = place {
            if let Some(old) = self.cycle.take() {
                closed = self.close(old);
            }
            let mut cycle = Cycle {
                time,
                ..Cycle::default()
            };
            if let (Some(t), Some(last)) = (time, self.last_closed)
                && compare(t, last) == std::cmp::Ordering::Equal
            {
                cycle.veto(Reject::TimeMismatch);
            }
            self.cycle = Some(cycle);
        }
        if let Some(c) = self.cycle.as_mut() {
            if let Place::Stale = place {
                c.veto(Reject::TimeMismatch);
            }
            c.seen.push(key);
            f(c);
        }
        closed
    }

    fn close(&mut self, c: Cycle) -> Option<GpsFix> {
        self.last_closed = c.time;
        // Date bookkeeping happens for every timed cycle, fix or not, so that a later
        // GGA-only cycle still gets the right day.
        let date = match (c.time, c.date) {
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
        if !c.judged {
            return None;
        }
        let used = c.satellites_used();
        let mut vetoes = c.vetoes;
        if c.position.is_none() {
            vetoes |= Reject::NoPosition.bit();
        }
        if used.is_some_and(|n| n < MIN_SATELLITES) {
            vetoes |= Reject::FewSatellites.bit();
        }
        if let Some(r) = Reject::ALL.into_iter().find(|r| vetoes & r.bit() != 0) {
            self.stats.reject(r);
            return None;
        }
        let (lat_e7, lon_e7) = c.position?;
        let time_ms = match (c.time, date) {
            (Some(t), Some(d)) => ms_since_epoch(d, t),
            (Some(t), None) => Some(nearest_to_now(t, (self.clock)())),
            (None, _) => None,
        }
        .unwrap_or_else(self.clock);
        self.stats
            .fixes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(GpsFix {
            time_ms,
            lat_e7,
            lon_e7,
            speed_cmps: c
                .speed_knots
                .and_then(|k| scaled_u16(f64::from(k) * KNOT_CMPS)),
            heading_ddeg: c.course_deg.and_then(|d| {
                let d = f64::from(d).rem_euclid(360.0);
                scaled_u16(d * 10.0).map(|d| if d >= 3600 { 0 } else { d })
            }),
            hdop_d: c.hdop.and_then(|h| scaled_u16(f64::from(h) * 10.0)),
            satellites: used.map(|n| n.min(u32::from(u8::MAX)) as u8),
        })
    }
}

impl Cycle {
    fn veto(&mut self, r: Reject) {
        self.vetoes |= r.bit();
    }

    /// Keeps the first in-range position.
    fn position(&mut self, pos: Option<(f64, f64)>) {
        if self.position.is_none()
            && let Some((lat, lon)) = pos
            && let (Some(lat), Some(lon)) = (deg_e7(lat, 90.0), deg_e7(lon, 180.0))
        {
            self.position = Some((lat, lon));
        }
    }

    /// Keeps the first HDOP for the fix; any out of range rejects the cycle (rule 8).
    fn hdop(&mut self, hdop: Option<f32>) {
        let Some(h) = hdop else { return };
        if !(h > 0.0 && h <= MAX_HDOP) {
            self.veto(Reject::HdopOutOfRange);
        }
        self.hdop = self.hdop.or(Some(h));
    }

    fn sats(&mut self, talker: [u8; 2], n: u32) {
        match self.satellites.iter_mut().find(|(t, _)| *t == talker) {
            Some((_, m)) => *m = (*m).max(n),
            None => self.satellites.push((talker, n)),
        }
    }

    /// Satellites used in the cycle's fix (rule 7), if a GGA or GNS said.
    fn satellites_used(&self) -> Option<u32> {
        if self.satellites.is_empty() {
            return None;
        }
        let all = self
            .satellites
            .iter()
            .filter(|(t, _)| t == b"GN")
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let per_system: u32 = self
            .satellites
            .iter()
            .filter(|(t, _)| t != b"GN")
            .map(|(_, n)| *n)
            .sum();
        Some(all.max(per_system))
    }
}

/// Whether an FAA mode indicator says the position is a satellite fix.
fn mode_is_fix(m: FaaMode) -> bool {
    FixType::from(m).is_valid()
}

/// `t` against `of`, as times of day within one epoch's tolerance; a difference of more
/// than 12 h is taken across midnight (23:59:59 -> 00:00:00 is later).
fn compare(t: NaiveTime, of: NaiveTime) -> std::cmp::Ordering {
    let mut ms = (t - of).num_milliseconds();
    if ms > MS_PER_DAY / 2 {
        ms -= MS_PER_DAY;
    } else if ms <= -MS_PER_DAY / 2 {
        ms += MS_PER_DAY;
    }
    if ms.abs() < SAME_EPOCH_MS {
        std::cmp::Ordering::Equal
    } else {
        ms.cmp(&0)
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
/// at most two (the crate reads two). The character kept is the first that is a fix
/// (A, D, P, R, F: the modes `FixType::is_valid` accepts), else the first one.
fn gns_one_mode(data: &str) -> Option<String> {
    let fields: Vec<&str> = data.split(',').collect();
    let mode = fields.get(5)?;
    if mode.len() <= 2 {
        return None;
    }
    let best = mode
        .chars()
        .find(|c| matches!(c, 'A' | 'D' | 'P' | 'R' | 'F'))
        .or_else(|| mode.chars().next())
        .unwrap_or('N');
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

/// GSA data cut before an 18th field that is not an NMEA 4.1 system id (a number), or
/// None if there is none.
fn gsa_without_extra_field(data: &str) -> Option<&str> {
    let (cut, _) = data.match_indices(',').nth(16)?;
    let extra = data[cut + 1..].split(',').next().unwrap_or("");
    (!extra.bytes().all(|b| b.is_ascii_digit())).then(|| &data[..cut])
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

    /// A sentence with its checksum.
    fn s(body: &str) -> String {
        let cs = body.bytes().fold(0u8, |x, c| x ^ c);
        format!("${body}*{cs:02X}")
    }

    fn merge_bodies(bodies: &[&str]) -> (Vec<GpsFix>, Arc<GpsStats>) {
        let lines: Vec<String> = bodies.iter().map(|b| s(b)).collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        merge(&refs)
    }

    /// One valid u-blox-style cycle (RMC VTG GGA GSA) at `hms`, latitude 52°00.0`m`'.
    fn good(hms: &str, m: &str) -> Vec<String> {
        vec![
            format!("GNRMC,{hms},A,5200.{m},N,00430.000,E,0.10,45.0,200525,,,A"),
            "GNVTG,45.0,T,,M,0.10,N,0.19,K,A".to_string(),
            format!("GNGGA,{hms},5200.{m},N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,"),
            "GNGSA,A,3,05,07,13,15,17,19,24,28,,,,,1.6,0.9,1.3".to_string(),
        ]
    }

    fn rejected(stats: &GpsStats) -> Vec<(&'static str, u64)> {
        let r = stats.snapshot().rejected;
        Reject::ALL
            .into_iter()
            .filter(|x| r.get(*x) > 0)
            .map(|x| (x.as_str(), r.get(x)))
            .collect()
    }

    #[test]
    fn a_cycle_is_judged_whole_not_by_its_first_valid_sentence() {
        // RMC says A with a position; the GGA of the same epoch says quality 0. The
        // merger before issue 14 took the RMC's position.
        let mut b = good("100000.000", "000");
        b.extend([
            "GNRMC,100001.000,A,5200.006,N,00430.000,E,0.10,45.0,200525,,,A".to_string(),
            "GNGGA,100001.000,,,,,0,00,,,M,,M,,".to_string(),
            "GNGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99".to_string(),
        ]);
        b.extend(good("100002.000", "012"));
        let bodies: Vec<&str> = b.iter().map(String::as_str).collect();
        let (fixes, stats) = merge_bodies(&bodies);
        assert_eq!(
            fixes.iter().map(|f| f.lat_e7).collect::<Vec<_>>(),
            [520_000_000, 520_002_000]
        );
        // Three rules broken; counted once, under the first (quality 0 comes before
        // GSA no fix, too few satellites and the 99.99 HDOP).
        assert_eq!(rejected(&stats), [("gga_quality", 1)]);
        assert_eq!(stats.snapshot().no_fix, 1);
    }

    #[test]
    fn every_rule_rejects_on_its_own() {
        let base = |edit: &dyn Fn(&mut Vec<String>)| {
            let mut b = good("100000.000", "000");
            let mut c = good("100001.000", "006");
            edit(&mut c);
            b.extend(c);
            let bodies: Vec<&str> = b.iter().map(String::as_str).collect();
            let (fixes, stats) = merge_bodies(&bodies);
            let r = rejected(&stats);
            assert_eq!(fixes.len() + r.len(), 2, "{b:?}");
            r
        };
        let set = |i: usize, v: &str| {
            let v = v.to_string();
            move |c: &mut Vec<String>| c[i] = v.clone()
        };
        assert_eq!(
            base(&set(
                0,
                "GNRMC,100001.000,V,5200.006,N,00430.000,E,0.10,45.0,200525,,,A"
            )),
            [("status_invalid", 1)]
        );
        assert_eq!(
            base(&set(
                0,
                "GNRMC,100001.000,A,5200.006,N,00430.000,E,0.10,45.0,200525,,,N"
            )),
            [("mode_invalid", 1)]
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100001.000,5200.006,N,00430.000,E,6,08,0.9,12.0,M,46.9,M,,"
            )),
            [("gga_quality", 1)]
        );
        assert_eq!(
            base(&set(3, "GNGSA,A,1,,,,,,,,,,,,,1.6,0.9,1.3")),
            [("gsa_no_fix", 1)]
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100001.000,5200.006,N,00430.000,E,1,02,0.9,12.0,M,46.9,M,,"
            )),
            [("few_satellites", 1)]
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100001.000,5200.006,N,00430.000,E,1,08,,12.0,M,46.9,M,,"
            )),
            [],
            "an empty HDOP is unknown"
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100001.000,5200.006,N,00430.000,E,1,,0.9,12.0,M,46.9,M,,"
            )),
            [("few_satellites", 1)],
            "an empty satellite count is none (as gpsd reads it)"
        );
        assert_eq!(
            base(&set(3, "GNGSA,A,3,05,07,13,15,,,,,,,,,99.99,99.99,99.99")),
            [("hdop_out_of_range", 1)]
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100001.000,5200.006,N,00430.000,E,1,08,0.0,12.0,M,46.9,M,,"
            )),
            [("hdop_out_of_range", 1)]
        );
        assert_eq!(
            base(&set(
                2,
                "GNGGA,100000.000,5200.006,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,"
            )),
            [("time_mismatch", 1)],
            "a stale GGA in the burst"
        );
        assert_eq!(
            base(&|c: &mut Vec<String>| {
                c[0] = "GNRMC,100001.000,V,,,,,,,200525,,,N".into();
                c[2] = "GNGGA,100001.000,,,,,0,00,,,M,,M,,".into();
            }),
            [("no_position", 1)]
        );
        // A GLL, and a GNS of NMEA 4.x.
        assert_eq!(
            base(
                &|c: &mut Vec<String>| c.push("GNGLL,5200.006,N,00430.000,E,100001.000,V,N".into())
            ),
            [("status_invalid", 1)]
        );
        assert_eq!(
            base(
                &|c: &mut Vec<String>| c.push("GNGLL,5200.006,N,00430.000,E,100001.000,A,N".into())
            ),
            [("mode_invalid", 1)]
        );
        assert_eq!(
            base(&|c: &mut Vec<String>| c
                .push("GNGNS,100001.000,5200.006,N,00430.000,E,NNNN,08,0.9,12.0,46.9,,,S".into())),
            [("mode_invalid", 1)]
        );
        assert_eq!(
            base(&|c: &mut Vec<String>| c
                .push("GNGNS,100001.000,5200.006,N,00430.000,E,ANNN,08,0.9,12.0,46.9,,,V".into())),
            [("mode_invalid", 1)],
            "navigation status V: not valid for navigation"
        );
    }

    #[test]
    fn a_gns_fix_of_any_constellation_is_a_fix() {
        // GPS none, GLONASS autonomous (NMEA 4.x: one character per constellation).
        let (fixes, stats) = merge_bodies(&[
            "GNGGA,100000.000,5200.000,N,00430.000,E,1,06,1.1,12.0,M,46.9,M,,",
            "GNGNS,100000.000,5200.000,N,00430.000,E,NANN,06,1.1,12.0,46.9,,,S",
            "GNRMC,100000.000,A,5200.000,N,00430.000,E,0.10,45.0,200525,,,A",
            "GNGNS,100001.000,5200.006,N,00430.000,E,EANN,06,1.1,12.0,46.9,,,S",
        ]);
        assert_eq!(fixes.len(), 2, "{:?}", rejected(&stats));
    }

    #[test]
    fn per_constellation_gga_counts_add_up() {
        // SiRFstarV: GPGGA and GLGGA of one epoch, each with its own count.
        let cycle = |hms: &str, gp: &str, gl: &str| {
            [
                format!("GPGGA,{hms},5200.000,N,00430.000,E,1,{gp},0.9,12.0,M,46.9,M,,"),
                format!("GLGGA,{hms},5200.000,N,00430.000,E,1,{gl},0.9,12.0,M,46.9,M,,"),
                format!("GNRMC,{hms},A,5200.000,N,00430.000,E,0.10,45.0,200525,,,A"),
            ]
        };
        let mut b = Vec::new();
        b.extend(cycle("100000.000", "08", "02"));
        b.extend(cycle("100001.000", "02", "02"));
        b.extend(cycle("100002.000", "01", "01"));
        let bodies: Vec<&str> = b.iter().map(String::as_str).collect();
        let (fixes, stats) = merge_bodies(&bodies);
        assert_eq!(
            fixes.iter().map(|f| f.satellites).collect::<Vec<_>>(),
            [Some(10), Some(4)]
        );
        assert_eq!(rejected(&stats), [("few_satellites", 1)]);
    }

    #[test]
    fn a_burst_stepping_back_whole_is_a_cycle_a_frozen_clock_is_not() {
        let mut b = good("100000.000", "000");
        b.extend(good("100001.000", "006"));
        // Telit after a resync: the whole next burst 300 ms earlier.
        b.extend(good("100000.700", "012"));
        b.extend(good("100001.700", "018"));
        // Then the clock stops: two more bursts with the same time.
        b.extend(good("100001.700", "024"));
        b.extend(good("100001.700", "030"));
        b.extend(good("100002.700", "036"));
        let bodies: Vec<&str> = b.iter().map(String::as_str).collect();
        let (fixes, stats) = merge_bodies(&bodies);
        let lats: Vec<i32> = fixes.iter().map(|f| f.lat_e7).collect();
        assert_eq!(
            lats,
            [
                520_000_000,
                520_001_000,
                520_002_000,
                520_003_000,
                520_006_000
            ]
        );
        assert_eq!(rejected(&stats), [("time_mismatch", 2)]);
    }

    #[test]
    fn times_within_10_ms_are_one_epoch_and_midnight_is_later() {
        // Centiseconds in GGA, milliseconds in RMC: one epoch, one fix.
        let (fixes, _) = merge_bodies(&[
            "GPGGA,235959.99,5200.000,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,",
            "GPRMC,235959.995,A,5200.000,N,00430.000,E,0.10,45.0,200525,,,A",
            "GPGGA,000000.10,5200.006,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,",
        ]);
        assert_eq!(fixes.len(), 2);
        assert_eq!(fixes[1].time_ms - fixes[0].time_ms, 110, "the next day");
        assert_eq!(
            compare(
                NaiveTime::from_hms_opt(0, 0, 0).unwrap(),
                NaiveTime::from_hms_opt(23, 59, 59).unwrap()
            ),
            std::cmp::Ordering::Greater
        );
    }

    #[test]
    fn only_a_valid_rmc_or_a_zda_gives_the_date() {
        // A searching MediaTek prints its RTC's date (1980-01-06) with status V.
        let (fixes, _) = merge_bodies(&[
            "GPRMC,100000.000,V,,,,,,,060180,,,N",
            "GPGGA,100001.000,5200.000,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,",
            "GPZDA,100002.000,20,05,2025,00,00",
            "GPGGA,100002.000,5200.006,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,",
            "GPGGA,100003.000,5200.012,N,00430.000,E,1,08,0.9,12.0,M,46.9,M,,",
        ]);
        // The clock (2020-09-13T12:26:40Z) dates the first; ZDA the others.
        assert_eq!(fixes[0].time_ms, 1_599_991_201_000);
        assert_eq!(fixes[1].time_ms, 1_747_735_202_000);
        assert_eq!(fixes[2].time_ms, 1_747_735_203_000);
    }

    #[test]
    fn without_a_date_the_clock_supplies_the_day() {
        // Clock: 2020-09-13T12:26:40Z. GGA at 12:26:39 -> same day.
        let (fixes, _) =
            merge(&["$GPGGA,122639.000,5050.4120,N,00420.8244,E,1,06,1.50,106.0,M,,M,,0000*71"]);
        assert_eq!(fixes[0].time_ms, 1_599_999_999_000);
    }
}

//! GPS input: one task that reads a receiver and hands on one [`GpsFix`] per fix epoch.
//!
//! Owns: the `[gps] source` URL ([`GpsSource`]), the readers (gpsd JSON over TCP; NMEA
//! 0183 over a serial port, TCP or a replayed file), the NMEA reporting-cycle merge and
//! its validity rules ([`NmeaMerger`], pure; the rules are in [`nmea`]'s note) and the
//! counters ([`GpsStats`]) shown in `/v1/status` (`gps`) and `/metrics`
//! (`fleetsync_agent_gps_*`, rejections as `fleetsync_agent_gps_rejected_total{reason}`).
//!
//! ```text
//! gpsd://host:port            --JSON lines--> GpsdDecoder --+
//! nmea+serial:///dev/tty?baud --bytes--> LineSplitter      |
//! nmea+tcp://host:port        --bytes--> LineSplitter  ----+--> NmeaMerger --> mpsc<GpsFix>
//! nmea+file:///log?pace       --bytes--> LineSplitter      |     (pace=realtime sleeps
//!                                                               until each fix's GPS time)
//! ```
//!
//! Invariants:
//! - At most one fix per reporting cycle (one receiver epoch), and only when no sentence
//!   of the cycle says the fix is invalid or unsettled (NMEA), or gpsd reports mode 2 or
//!   3 (gpsd); rejected cycles are counted (`no_fix`, and per reason for NMEA), never
//!   sent.
//! - A fix's `time_ms` is the receiver's UTC date and time; the wall clock only fills in
//!   the date for receivers that have not sent one (GGA-only output), picking the day
//!   that puts the fix nearest to now.
//! - Bad input is counted (`checksum_errors`, `garbage`) and skipped, never fatal. Lines
//!   are bounded ([`MAX_NMEA_LINE`], [`gpsd::MAX_GPSD_LINE`]).
//! - Live sources (gpsd, serial, TCP) reconnect forever with backoff (250 ms doubling to
//!   10 s, `reconnects` counted); only a file source ends on its own (end of file).
//! - Full output channel: the reader waits (backpressure); positions are not dropped
//!   here. A closed channel or `shutdown` ends [`run`] with `Ok`.

pub mod gpsd;
mod io;
pub mod nmea;
mod source;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use gpsd::GpsdDecoder;
pub use io::{MAX_REPLAY_GAP, NMEA_IDLE_FLUSH, NMEA_TCP_DEAD};
pub use nmea::{
    LineKind, MAX_HDOP, MAX_NMEA_LINE, MIN_SATELLITES, NmeaMerger, Reject, RejectCounts,
};
pub use source::{DEFAULT_BAUD, GPSD_DEFAULT_PORT, GpsSource, Pace, ParseSourceError};

/// One position from the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpsFix {
    /// UTC time of the fix, ms since the Unix epoch.
    pub time_ms: u64,
    /// Latitude in 1e-7 degree.
    pub lat_e7: i32,
    /// Longitude in 1e-7 degree.
    pub lon_e7: i32,
    /// Ground speed in 0.01 m/s.
    pub speed_cmps: Option<u16>,
    /// Course over ground in 0.1 degree (0..3600).
    pub heading_ddeg: Option<u16>,
    /// Horizontal dilution of precision in 0.1.
    pub hdop_d: Option<u16>,
    /// Satellites used in the fix.
    pub satellites: Option<u8>,
}

impl GpsFix {
    /// The wire form (the time travels as the event's time).
    pub fn to_fix(&self) -> fleetsync_protocol::Fix {
        fleetsync_protocol::Fix {
            lat_e7: self.lat_e7,
            lon_e7: self.lon_e7,
            speed_cmps: self.speed_cmps,
            heading_ddeg: self.heading_ddeg,
            hdop_d: self.hdop_d,
            satellites: self.satellites,
        }
    }
}

/// Counters of the GPS input, shared with the status API and metrics.
#[derive(Debug, Default)]
pub struct GpsStats {
    /// Well-formed sentences (NMEA) or reports (gpsd JSON) read.
    pub sentences: AtomicU64,
    /// Fixes handed on.
    pub fixes: AtomicU64,
    /// Reporting cycles (NMEA) or TPV reports (gpsd) without a valid fix.
    pub no_fix: AtomicU64,
    /// NMEA cycles rejected, per [`Reject`] reason (indexed by `Reject as usize`); they
    /// add up to the NMEA part of `no_fix`. gpsd gives no reason: its no-fix reports
    /// count in `no_fix` only.
    pub rejected: [AtomicU64; Reject::ALL.len()],
    /// NMEA sentences whose checksum did not match.
    pub checksum_errors: AtomicU64,
    /// Lines that were neither: not NMEA / not JSON, too long, undecodable.
    pub garbage: AtomicU64,
    /// Connection or device re-attempts after a failure.
    pub reconnects: AtomicU64,
}

/// A point-in-time copy of [`GpsStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GpsStatsSnapshot {
    /// See [`GpsStats::sentences`].
    pub sentences: u64,
    /// See [`GpsStats::fixes`].
    pub fixes: u64,
    /// See [`GpsStats::no_fix`].
    pub no_fix: u64,
    /// See [`GpsStats::rejected`].
    pub rejected: RejectCounts,
    /// See [`GpsStats::checksum_errors`].
    pub checksum_errors: u64,
    /// See [`GpsStats::garbage`].
    pub garbage: u64,
    /// See [`GpsStats::reconnects`].
    pub reconnects: u64,
}

impl GpsStats {
    /// Current values.
    pub fn snapshot(&self) -> GpsStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GpsStatsSnapshot {
            sentences: g(&self.sentences),
            fixes: g(&self.fixes),
            no_fix: g(&self.no_fix),
            rejected: {
                let mut r = RejectCounts::default();
                for reason in Reject::ALL {
                    r.set(reason, g(&self.rejected[reason as usize]));
                }
                r
            },
            checksum_errors: g(&self.checksum_errors),
            garbage: g(&self.garbage),
            reconnects: g(&self.reconnects),
        }
    }

    /// Counts one NMEA cycle rejected for `reason`.
    pub fn reject(&self, reason: Reject) {
        self.no_fix.fetch_add(1, Ordering::Relaxed);
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the GPS task stopped on its own. Live sources never return an error: they retry.
#[derive(Debug, thiserror::Error)]
pub enum GpsError {
    /// The replay file could not be opened.
    #[error("gps source: cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading the replay file failed.
    #[error("gps source: reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads `source` until `shutdown`, the end of a replayed file, or `tx` closing.
pub async fn run(
    source: GpsSource,
    tx: mpsc::Sender<GpsFix>,
    stats: Arc<GpsStats>,
    shutdown: CancellationToken,
) -> Result<(), GpsError> {
    match &source {
        GpsSource::Gpsd { host, port } => gpsd::run(host, *port, &tx, &stats, &shutdown).await,
        GpsSource::NmeaTcp { host, port } => io::run_tcp(host, *port, &tx, &stats, &shutdown).await,
        GpsSource::NmeaFile { path, pace } => {
            io::run_file(path, *pace, &tx, &stats, &shutdown).await
        }
        GpsSource::NmeaSerial { path, baud } => {
            io::run_serial(path, *baud, &tx, &stats, &shutdown).await
        }
    }
}

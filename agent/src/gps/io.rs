//! The byte side of the NMEA sources: line splitting, TCP/file/serial readers, replay
//! pacing, reconnect backoff. Every reader feeds the same [`NmeaMerger`].

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::nmea::{MAX_NMEA_LINE, NmeaMerger};
use super::{GpsError, GpsFix, GpsStats, Pace};

/// A live receiver silent this long has its pending epoch flushed (the fix of the last
/// epoch before a pause is not held back until the next one).
pub const NMEA_IDLE_FLUSH: Duration = Duration::from_millis(1500);
/// A TCP NMEA feed silent this long is dropped and reconnected.
pub const NMEA_TCP_DEAD: Duration = Duration::from_secs(30);
/// Realtime replay never sleeps longer than this between two fixes (a log with a gap of
/// hours replays the gap as this pause).
pub const MAX_REPLAY_GAP: Duration = Duration::from_secs(10);
/// Lines buffered between the serial reader thread and the merger.
const SERIAL_LINE_QUEUE: usize = 64;
/// How often the serial thread wakes to check for shutdown.
const SERIAL_POLL: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether to keep going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// Shutdown, or nobody listens any more.
    Stop,
}

/// A line longer than the limit (its bytes were dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooLong;

/// Splits a byte stream into lines of at most `max` bytes. CR, LF and CRLF end lines.
#[derive(Debug)]
pub(super) struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    overflow: bool,
}

impl LineSplitter {
    pub(super) fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max.min(4096)),
            max,
            overflow: false,
        }
    }

    /// Feeds bytes; calls `out` for every complete line.
    pub(super) fn push(&mut self, mut bytes: &[u8], mut out: impl FnMut(Result<&[u8], TooLong>)) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.take(&bytes[..i]);
            self.emit(&mut out);
            bytes = &bytes[i + 1..];
        }
        self.take(bytes);
    }

    /// The unterminated last line, at end of input.
    pub(super) fn finish(&mut self, mut out: impl FnMut(Result<&[u8], TooLong>)) {
        self.emit(&mut out);
    }

    fn take(&mut self, part: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + part.len() > self.max {
            self.overflow = true;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn emit(&mut self, out: &mut impl FnMut(Result<&[u8], TooLong>)) {
        if self.overflow {
            out(Err(TooLong));
        } else if !self.buf.is_empty() {
            out(Ok(&self.buf));
        }
        self.buf.clear();
        self.overflow = false;
    }
}

/// Reconnect delays: 250 ms doubling to 10 s, reset after data flowed.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);

    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

pub(super) async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    r.read(buf).await
}

/// Hands a fix on, waiting while the channel is full (the consumer sets the pace; a
/// replay must not drop positions). Stops on shutdown or when the receiver is gone.
pub(super) async fn send(
    tx: &mpsc::Sender<GpsFix>,
    fix: GpsFix,
    shutdown: &CancellationToken,
) -> Flow {
    tokio::select! {
        _ = shutdown.cancelled() => Flow::Stop,
        r = tx.send(fix) => if r.is_ok() { Flow::Continue } else { Flow::Stop },
    }
}

/// Merger + output, shared by the NMEA readers.
struct Pipeline<'a> {
    merger: NmeaMerger,
    lines: LineSplitter,
    tx: &'a mpsc::Sender<GpsFix>,
    shutdown: &'a CancellationToken,
    pacer: Option<Pacer>,
    /// Captured logs (gpsd's test logs, `gpspipe -R` output) carry `#` comment lines.
    skip_comments: bool,
    out: Vec<GpsFix>,
}

impl<'a> Pipeline<'a> {
    fn new(
        stats: &Arc<GpsStats>,
        tx: &'a mpsc::Sender<GpsFix>,
        shutdown: &'a CancellationToken,
        pace: Pace,
    ) -> Self {
        Self {
            merger: NmeaMerger::new(stats.clone()),
            lines: LineSplitter::new(MAX_NMEA_LINE),
            tx,
            shutdown,
            pacer: (pace == Pace::Realtime).then(Pacer::default),
            skip_comments: false,
            out: Vec::new(),
        }
    }

    /// A new connection: a partial line of the old one is dropped, the epoch in
    /// progress stays (a reconnect within an epoch must not give it two fixes).
    fn reconnected(&mut self) {
        self.lines = LineSplitter::new(MAX_NMEA_LINE);
    }

    async fn bytes(&mut self, bytes: &[u8]) -> Flow {
        let (merger, out, skip) = (&mut self.merger, &mut self.out, self.skip_comments);
        self.lines.push(bytes, |line| match line {
            Ok(l) if skip && l.first() == Some(&b'#') => {}
            Ok(l) => out.extend(merger.push_line(l)),
            Err(TooLong) => {
                merger.stats().garbage.fetch_add(1, Ordering::Relaxed);
            }
        });
        self.drain().await
    }

    async fn line(&mut self, line: &[u8]) -> Flow {
        self.out.extend(self.merger.push_line(line));
        self.drain().await
    }

    /// End of input or idle: the pending epoch is complete.
    async fn flush(&mut self) -> Flow {
        let (merger, out) = (&mut self.merger, &mut self.out);
        self.lines.finish(|line| match line {
            Ok(l) => out.extend(merger.push_line(l)),
            Err(TooLong) => {
                merger.stats().garbage.fetch_add(1, Ordering::Relaxed);
            }
        });
        self.out.extend(self.merger.flush());
        self.drain().await
    }

    async fn drain(&mut self) -> Flow {
        for fix in std::mem::take(&mut self.out) {
            if let Some(p) = self.pacer.as_mut() {
                let until = p.due(Instant::now(), fix.time_ms);
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Flow::Stop,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            if send(self.tx, fix, self.shutdown).await == Flow::Stop {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }
}

/// Replays fixes at the pace of their GPS times: fix N is due at
/// `start + (time_N - time_0)`. A backwards step or a gap over [`MAX_REPLAY_GAP`]
/// re-bases instead of stalling.
#[derive(Debug, Default)]
struct Pacer {
    base: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
}

impl Pacer {
    fn due(&mut self, now: Instant, time_ms: u64) -> Instant {
        let due = match (self.base, self.last) {
            (Some((i0, t0)), Some((il, tl))) if time_ms >= tl => {
                let step = Duration::from_millis(time_ms - tl);
                if step > MAX_REPLAY_GAP {
                    let d = il + MAX_REPLAY_GAP;
                    self.base = Some((d, time_ms));
                    d
                } else {
                    i0 + Duration::from_millis(time_ms - t0)
                }
            }
            (Some(_), Some((il, _))) => {
                // Time went backwards (receiver glitch, or a log restarted): go on from
                // where we are.
                self.base = Some((il, time_ms));
                il
            }
            _ => {
                self.base = Some((now, time_ms));
                now
            }
        };
        self.last = Some((due, time_ms));
        due
    }
}

/// `nmea+file`: replays the file once; end of file ends the source.
pub(super) async fn run_file(
    path: &Path,
    pace: Pace,
    tx: &mpsc::Sender<GpsFix>,
    stats: &Arc<GpsStats>,
    shutdown: &CancellationToken,
) -> Result<(), GpsError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| GpsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    info!(path = %path.display(), ?pace, "gps: replaying NMEA log");
    let mut p = Pipeline::new(stats, tx, shutdown, pace);
    p.skip_comments = true;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = file.read(&mut buf) => r.map_err(|source| GpsError::Read { path: path.to_path_buf(), source })?,
        };
        if n == 0 {
            p.flush().await;
            info!(path = %path.display(), "gps: end of NMEA log");
            return Ok(());
        }
        if p.bytes(&buf[..n]).await == Flow::Stop {
            return Ok(());
        }
    }
}

/// `nmea+tcp`: reads until shutdown, reconnecting with backoff.
pub(super) async fn run_tcp(
    host: &str,
    port: u16,
    tx: &mpsc::Sender<GpsFix>,
    stats: &Arc<GpsStats>,
    shutdown: &CancellationToken,
) -> Result<(), GpsError> {
    let mut backoff = Backoff::default();
    let mut first = true;
    let mut p = Pipeline::new(stats, tx, shutdown, Pace::Max);
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let delay = backoff.next_delay();
            debug!(host, port, ?delay, "nmea+tcp: reconnecting");
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
                Ok(Err(e)) => { debug!(host, port, error = %e, "nmea+tcp: connect failed"); continue; }
                Err(_) => { debug!(host, port, "nmea+tcp: connect timed out"); continue; }
            },
        };
        info!(host, port, "nmea+tcp: connected");
        p.reconnected();
        let mut buf = vec![0u8; 4096];
        let mut idle = Duration::ZERO;
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(NMEA_IDLE_FLUSH, stream.read(&mut buf)) => r,
            };
            let flow = match r {
                Ok(Ok(0)) => {
                    warn!(host, port, "nmea+tcp: connection closed");
                    if p.flush().await == Flow::Stop {
                        return Ok(());
                    }
                    break;
                }
                Ok(Ok(n)) => {
                    idle = Duration::ZERO;
                    backoff.reset();
                    p.bytes(&buf[..n]).await
                }
                Ok(Err(e)) => {
                    warn!(host, port, error = %e, "nmea+tcp: read failed");
                    if p.flush().await == Flow::Stop {
                        return Ok(());
                    }
                    break;
                }
                Err(_) => {
                    idle += NMEA_IDLE_FLUSH;
                    if idle >= NMEA_TCP_DEAD {
                        warn!(host, port, "nmea+tcp: silent, reconnecting");
                        break;
                    }
                    p.flush().await
                }
            };
            if flow == Flow::Stop {
                return Ok(());
            }
        }
    }
}

/// `nmea+serial`: a blocking reader thread per open port (serial ports have no async
/// API in `serialport`), lines handed over a bounded queue; reopened with backoff when
/// the device disappears (USB receivers get unplugged).
pub(super) async fn run_serial(
    path: &Path,
    baud: u32,
    tx: &mpsc::Sender<GpsFix>,
    stats: &Arc<GpsStats>,
    shutdown: &CancellationToken,
) -> Result<(), GpsError> {
    let mut backoff = Backoff::default();
    let mut first = true;
    let mut p = Pipeline::new(stats, tx, shutdown, Pace::Max);
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        let (line_tx, mut line_rx) = mpsc::channel::<Result<Vec<u8>, TooLong>>(SERIAL_LINE_QUEUE);
        let stop = shutdown.child_token();
        let thread_stop = stop.clone();
        let dev = path.to_string_lossy().into_owned();
        let reader =
            tokio::task::spawn_blocking(move || serial_thread(&dev, baud, &line_tx, &thread_stop));
        let mut stopped = false;
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => { stopped = true; break; }
                r = tokio::time::timeout(NMEA_IDLE_FLUSH, line_rx.recv()) => r,
            };
            let flow = match r {
                Ok(Some(Ok(line))) => {
                    backoff.reset();
                    p.line(&line).await
                }
                Ok(Some(Err(TooLong))) => {
                    stats.garbage.fetch_add(1, Ordering::Relaxed);
                    Flow::Continue
                }
                Ok(None) => break, // thread ended: device gone or failed to open
                Err(_) => p.flush().await,
            };
            if flow == Flow::Stop {
                stopped = true;
                break;
            }
        }
        stop.cancel();
        drop(line_rx);
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(path = %path.display(), error = %e, "nmea+serial: port failed"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "nmea+serial: reader thread failed")
            }
        }
        if stopped {
            return Ok(());
        }
        if p.flush().await == Flow::Stop {
            return Ok(());
        }
    }
}

fn serial_thread(
    dev: &str,
    baud: u32,
    out: &mpsc::Sender<Result<Vec<u8>, TooLong>>,
    stop: &CancellationToken,
) -> Result<(), serialport::Error> {
    let mut port = serialport::new(dev, baud).timeout(SERIAL_POLL).open()?;
    info!(path = dev, baud, "nmea+serial: opened");
    let mut lines = LineSplitter::new(MAX_NMEA_LINE);
    let mut buf = [0u8; 1024];
    while !stop.is_cancelled() {
        let n = match port.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let mut closed = false;
        lines.push(&buf[..n], |l| {
            if !closed && out.blocking_send(l.map(<[u8]>::to_vec)).is_err() {
                closed = true;
            }
        });
        if closed {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<Result<Vec<u8>, TooLong>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.map(<[u8]>::to_vec)));
        }
        s.finish(|l| out.push(l.map(<[u8]>::to_vec)));
        out
    }

    #[test]
    fn splitter_handles_crlf_chunks_and_overlong_lines() {
        let out = split(
            &[b"$A*00\r", b"\n$B", b"C*00\n", b"xxxxxxxxxxxx", b"x\nlast"],
            8,
        );
        assert_eq!(
            out,
            vec![
                Ok(b"$A*00".to_vec()),
                Ok(b"$BC*00".to_vec()),
                Err(TooLong),
                Ok(b"last".to_vec())
            ]
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let d: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 250);
    }

    #[test]
    fn pacer_follows_gps_time_and_caps_gaps() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        assert_eq!(p.due(t0, 1_000), t0);
        assert_eq!(p.due(t0, 2_000) - t0, Duration::from_secs(1));
        assert_eq!(p.due(t0, 3_500) - t0, Duration::from_millis(2500));
        // A gap of an hour replays as MAX_REPLAY_GAP.
        assert_eq!(
            p.due(t0, 3_603_500) - t0,
            Duration::from_millis(2500) + MAX_REPLAY_GAP
        );
        // Backwards: no wait beyond the last due time.
        assert_eq!(
            p.due(t0, 0) - t0,
            Duration::from_millis(2500) + MAX_REPLAY_GAP
        );
    }
}

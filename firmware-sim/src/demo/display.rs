//! The live progress display: one line per vehicle, redrawn every second in place (plain
//! ANSI) on a terminal; on anything else (a pipe, a CI log) a block of plain lines every
//! [`PLAIN_EVERY`].

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::vehicle::VehicleState;

/// Redraw period on a terminal.
const REDRAW: Duration = Duration::from_secs(1);
/// Period of plain output when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// What one line shows.
#[derive(Debug)]
pub struct Row {
    /// Device id.
    pub id: String,
    /// The vehicle's progress.
    pub state: Arc<VehicleState>,
    /// The agent's store (backlog).
    pub store: fleetsync_agent::store::Store,
    /// The agent's link (connected).
    pub link: Arc<fleetsync_agent::uplink::LinkState>,
}

/// One vehicle's line.
pub fn line(row: &Row) -> String {
    let p = row.state.progress();
    let s = row.store.stats();
    let backlog = s.critical.events + s.telemetry.events;
    let stop = if p.stop_k == 0 {
        "  -/-".to_string()
    } else {
        format!("{:>3}/{}", p.stop_k, p.stop_n)
    };
    format!(
        "{:<8} round {:<3} stop {stop}  {:<10} {:>3.0} km/h  {:<9} backlog {:>5}  PODs {:>3}{}",
        row.id,
        p.round,
        if p.phase.is_empty() {
            "starting"
        } else {
            p.phase
        },
        p.speed_mps * 3.6,
        if row.link.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "offline"
        },
        backlog,
        p.pods_posted,
        if p.pods_failed > 0 {
            format!(" ({} failed)", p.pods_failed)
        } else {
            String::new()
        }
    )
}

/// Draws until `stop`.
pub async fn run(rows: Vec<Row>, stop: CancellationToken) {
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut tick = tokio::time::interval(if tty { REDRAW } else { PLAIN_EVERY });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drawn = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lines: Vec<String> = rows.iter().map(line).collect();
        let mut out = String::new();
        if tty {
            if drawn {
                out.push_str(&format!("\x1b[{}A", lines.len()));
            }
            for l in &lines {
                out.push_str("\x1b[2K");
                out.push_str(l);
                out.push('\n');
            }
        } else {
            let t = start.elapsed().as_secs();
            for l in &lines {
                out.push_str(&format!("[{t:>5} s] {l}\n"));
            }
        }
        drawn = true;
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
    }
}

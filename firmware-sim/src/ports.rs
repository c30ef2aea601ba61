//! Ports for processes the simulator and the tests start and restart: hubs and agents get
//! their listen addresses in config files, so a port is chosen here, released, and bound
//! by the child later, again after every restart.
//!
//! A port from `bind(127.0.0.1:0)` comes from the kernel's ephemeral range, which every
//! outgoing connection and every other `:0` bind on the machine also draws from: in the
//! gap before the child binds it (or while a killed child is down) it can be handed to
//! someone else, and the child fails to start. So ports come from below the ephemeral
//! range instead, picked at random, checked free, and never handed out twice by this
//! process.

use std::collections::BTreeSet;
use std::io;
use std::net::TcpListener;
use std::sync::Mutex;

/// Lowest port used.
const FLOOR: u16 = 10_000;

/// Ports this process handed out.
static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The kernel's ephemeral range (Linux), else IANA's dynamic range.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((49_152, 65_535))
}

/// A loopback TCP port that is free now, outside the ephemeral range, and not handed out
/// before by this process.
pub fn unused_port() -> io::Result<u16> {
    let (lo, hi) = ephemeral_range();
    // The larger of the two stretches outside the ephemeral range.
    let (first, last) = if lo.saturating_sub(FLOOR) >= u16::MAX - hi {
        (FLOOR, lo.saturating_sub(1))
    } else {
        (hi.saturating_add(1), u16::MAX)
    };
    if last <= first {
        return ephemeral();
    }
    let span = u64::from(last - first) + 1;
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = first + (x % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    ephemeral()
}

fn ephemeral() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_distinct() {
        let (lo, hi) = ephemeral_range();
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let p = unused_port().unwrap();
            assert!(p < lo || p > hi, "{p} in the ephemeral range {lo}-{hi}");
            assert!(seen.insert(p), "{p} handed out twice");
            // Free: the caller can bind it.
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}

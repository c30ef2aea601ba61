//! Request rate limits per caller (a customer credential, or a tracking link): a token
//! bucket each, `rate_per_s` refilled up to `burst`. A request that finds the bucket
//! empty is refused with the time until a token is back (429 + `Retry-After`), so one
//! customer's polling costs the others and the ingest path nothing.
//!
//! At most [`MAX_BUCKETS`] callers are tracked. When the map is full, buckets that
//! would be full anyway (idle for `burst / rate` seconds) are dropped, which changes
//! nobody's allowance; if that frees nothing the new caller is refused for a second
//! (the hub is under more distinct callers than it tracks: fail closed, bounded).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most callers tracked at once.
pub const MAX_BUCKETS: usize = 100_000;

/// Token buckets by caller.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    /// `rate_per_s` tokens a second, at most `burst` saved up.
    pub fn new(rate_per_s: f64, burst: u32) -> Limiter {
        Limiter {
            rate: rate_per_s.max(0.001),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `key` at `now`; `Err(wait)` if there is none.
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= MAX_BUCKETS {
            let idle = Duration::from_secs_f64(self.burst / self.rate);
            map.retain(|_, (_, last)| now.saturating_duration_since(*last) < idle);
            if map.len() >= MAX_BUCKETS {
                return Err(Duration::from_secs(1));
            }
        }
        let (tokens, last) = map.entry(key.to_string()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }

    /// [`Limiter::check_at`] now.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_caller() {
        let l = Limiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at("a", t0).is_ok());
        }
        let wait = l.check_at("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert!(
            l.check_at("b", t0).is_ok(),
            "another caller is not affected"
        );
        assert!(l.check_at("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check_at("a", t0 + Duration::from_millis(500)).is_err());
    }
}

//! The rate limiter of `speed` and `block-job-set-speed`: a token bucket in virtual time.
//!
//! A job accounts the bytes it just transferred with [`RateLimiter::account`], which returns
//! how long to wait before the next transfer. The bucket's clock (`next`) advances by
//! `bytes / rate` per transfer; a job that is slower than the rate may catch up by at most
//! [`RateLimiter::BURST`], so the average over any interval longer than a few transfers stays
//! within a fraction of a percent of the rate (QEMU's slice-based limiter allows a whole
//! 100 ms slice of burst).
//!
//! ```
//! use block_jobs::ratelimit::RateLimiter;
//! use std::time::{Duration, Instant};
//!
//! let t0 = Instant::now();
//! let mut rl = RateLimiter::new(1_000_000); // 1 MB/s
//! assert_eq!(rl.account_at(500_000, t0), Duration::from_millis(500));
//! // 500 ms later, the next 500 kB are due another 500 ms on.
//! let t1 = t0 + Duration::from_millis(500);
//! assert_eq!(rl.account_at(500_000, t1), Duration::from_millis(500));
//! // Unlimited: never waits.
//! let mut free = RateLimiter::new(0);
//! assert_eq!(free.account_at(1 << 30, t0), Duration::ZERO);
//! ```

use std::time::{Duration, Instant};

/// A token bucket limiting a byte rate.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: u64,
    next: Option<Instant>,
}

impl RateLimiter {
    /// How far a slow job may fall behind and catch up at full speed.
    pub const BURST: Duration = Duration::from_millis(50);

    /// A limiter of `rate` bytes per second (0: unlimited).
    pub fn new(rate: u64) -> Self {
        RateLimiter { rate, next: None }
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate; the bucket starts afresh.
    pub fn set_rate(&mut self, rate: u64) {
        self.rate = rate;
        self.next = None;
    }

    /// Accounts `bytes` transferred now; returns the time to wait before the next transfer.
    pub fn account(&mut self, bytes: u64) -> Duration {
        self.account_at(bytes, Instant::now())
    }

    /// [`RateLimiter::account`] at time `now`.
    pub fn account_at(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let floor = now.checked_sub(Self::BURST).unwrap_or(now);
        let start = match self.next {
            Some(n) if n > floor => n,
            Some(_) => floor,
            None => now,
        };
        let cost_ns = (bytes as u128 * 1_000_000_000u128) / self.rate as u128;
        let cost = Duration::from_nanos(cost_ns.min(u64::MAX as u128) as u64);
        let next = start.checked_add(cost).unwrap_or(start);
        self.next = Some(next);
        next.saturating_duration_since(now)
    }

    /// A transfer size that keeps the limiter smooth: about a tenth of a second of data,
    /// between 64 KiB and `max` (and `max` when unlimited).
    pub fn chunk_size(&self, max: u64) -> u64 {
        if self.rate == 0 {
            return max;
        }
        (self.rate / 10).clamp(64 * 1024, max.max(64 * 1024)) & !511
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulated transfers that take no time: the total time matches bytes / rate.
    #[test]
    fn exact_over_time_when_transfers_are_free() {
        for &(rate, chunk) in &[
            (1_000_000u64, 65536u64),
            (100 << 20, 1 << 20),
            (12345, 4096),
        ] {
            let mut rl = RateLimiter::new(rate);
            let t0 = Instant::now();
            let mut now = t0;
            let mut bytes = 0u64;
            for _ in 0..1000 {
                bytes += chunk;
                now += rl.account_at(chunk, now);
            }
            let secs = (now - t0).as_secs_f64();
            let measured = bytes as f64 / secs;
            let err = (measured - rate as f64).abs() / rate as f64;
            assert!(err < 0.001, "rate {rate}: measured {measured} ({err})");
        }
    }

    /// Transfers that take time themselves: the limiter only adds what is missing, and a
    /// job slower than the rate never bursts by more than BURST.
    #[test]
    fn slow_transfers_do_not_burst() {
        let rate = 10_000_000u64;
        let chunk = 100_000u64; // 10 ms at the rate
        let mut rl = RateLimiter::new(rate);
        let t0 = Instant::now();
        let mut now = t0;
        // The first 50 transfers take 30 ms each (slower than the rate).
        for i in 0..50 {
            now += Duration::from_millis(30);
            let d = rl.account_at(chunk, now);
            // Only the first transfer (whose start the limiter did not see) waits.
            assert_eq!(d.is_zero(), i > 0, "{i}: {d:?}");
        }
        // Then they become instant: at most BURST of catch-up.
        let fast_start = now;
        let mut bytes = 0;
        for _ in 0..100 {
            bytes += chunk;
            now += rl.account_at(chunk, now);
        }
        let secs = (now - fast_start).as_secs_f64() + RateLimiter::BURST.as_secs_f64();
        let measured = bytes as f64 / secs;
        assert!(
            (measured - rate as f64).abs() / (rate as f64) < 0.02,
            "{measured}"
        );
    }

    #[test]
    fn real_clock_never_faster_than_the_rate() {
        // 2 MB/s for 0.5 s of 32 KiB transfers, with real sleeps. A loaded machine
        // oversleeps, which only makes the transfer slower (the simulated clock above
        // checks the accuracy): the limiter's own promise is never to let it go faster
        // than the rate, beyond one burst.
        let rate = 2_000_000u64;
        let mut rl = RateLimiter::new(rate);
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while t0.elapsed() < Duration::from_millis(500) {
            bytes += 32768;
            std::thread::sleep(rl.account(32768));
        }
        let allowed = t0.elapsed() + RateLimiter::BURST;
        let measured = bytes as f64 / allowed.as_secs_f64();
        assert!(measured <= rate as f64 * 1.01, "{measured}");
    }

    #[test]
    fn set_rate_restarts_and_chunk_sizes() {
        let mut rl = RateLimiter::new(1000);
        let t = Instant::now();
        assert_eq!(rl.account_at(1000, t), Duration::from_secs(1));
        rl.set_rate(0);
        assert_eq!(rl.account_at(1 << 40, t), Duration::ZERO);
        rl.set_rate(2000);
        assert_eq!(rl.account_at(1000, t), Duration::from_millis(500));
        assert_eq!(RateLimiter::new(0).chunk_size(4 << 20), 4 << 20);
        assert_eq!(RateLimiter::new(1000).chunk_size(4 << 20), 65536);
        assert_eq!(RateLimiter::new(100 << 20).chunk_size(4 << 20), 4 << 20);
        assert_eq!(
            RateLimiter::new(5 << 20).chunk_size(4 << 20),
            ((5 << 20) / 10) & !511
        );
    }
}

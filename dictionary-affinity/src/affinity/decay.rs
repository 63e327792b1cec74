//! Exponential decay with a cluster-wide half-life: how a saving fades once it is no longer
//! renewed (the savings ledger's entries, and the engine's view of every member's advertised
//! savings).

use std::time::{Duration, Instant};

/// Exponential decay with a half-life: the weight of something `elapsed` ago.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decay {
    half_life: Duration,
}

impl Decay {
    /// Decay that halves a value every `half_life` (zero: only the present counts).
    pub fn new(half_life: Duration) -> Self {
        Decay { half_life }
    }

    /// The half-life.
    pub fn half_life(&self) -> Duration {
        self.half_life
    }

    /// `2^(-elapsed / half_life)`.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed.is_zero() {
            1.0
        } else if self.half_life.is_zero() {
            0.0
        } else {
            (-(elapsed.as_secs_f64() / self.half_life.as_secs_f64())).exp2()
        }
    }
}

/// A byte count whose past contributions decay: `sum(bytes_i * 2^(-(now - t_i) / half_life))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecayedBytes {
    value: f64,
    at: Instant,
}

impl DecayedBytes {
    /// Zero, as of `now`.
    pub fn new(now: Instant) -> Self {
        DecayedBytes { value: 0.0, at: now }
    }

    /// Adds `bytes` at `now`; an earlier `now` than the last update adds the bytes already decayed,
    /// so the sum does not depend on the order of the additions.
    pub fn add(&mut self, decay: &Decay, now: Instant, bytes: f64) {
        if now >= self.at {
            self.value = self.value * decay.factor(now - self.at) + bytes;
            self.at = now;
        } else {
            self.value += bytes * decay.factor(self.at - now);
        }
    }

    /// The value at `now` (a time before the last update reads as the last update).
    pub fn value_at(&self, decay: &Decay, now: Instant) -> f64 {
        self.value * decay.factor(now.saturating_duration_since(self.at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_halves_per_half_life_and_sums_in_any_order() {
        let d = Decay::new(Duration::from_secs(10));
        assert_eq!(d.factor(Duration::ZERO), 1.0);
        assert!((d.factor(Duration::from_secs(10)) - 0.5).abs() < 1e-12);
        assert!((d.factor(Duration::from_secs(30)) - 0.125).abs() < 1e-12);
        assert_eq!(Decay::new(Duration::ZERO).factor(Duration::from_nanos(1)), 0.0);
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        let mut a = DecayedBytes::new(t0);
        a.add(&d, t(0), 1000.0);
        a.add(&d, t(10), 1000.0);
        assert!((a.value_at(&d, t(10)) - 1500.0).abs() < 1e-9);
        assert!((a.value_at(&d, t(20)) - 750.0).abs() < 1e-9);
        let mut b = DecayedBytes::new(t0);
        b.add(&d, t(10), 1000.0);
        b.add(&d, t(0), 1000.0);
        assert!((a.value_at(&d, t(20)) - b.value_at(&d, t(20))).abs() < 1e-9);
    }
}

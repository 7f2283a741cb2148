//! Jittered exponential backoff, for waiting on stores that cannot push.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `first` up to `cap`, each drawn at random from
/// the upper half of the current step ("equal jitter"), so that waiters that
/// collided once do not collide again in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    cap: Duration,
}

impl Backoff {
    /// Delays from `first`, doubling up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff { step: first, cap }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(64));
        let mut step = Duration::from_millis(2);
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside {step:?}"
            );
            step = (step * 2).min(Duration::from_millis(64));
        }
    }
}

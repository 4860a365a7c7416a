//! When the agent dials again: the jittered backoff after a lost tunnel, and the pause before
//! replacing a pooled connection a stream just took (data connections to the relay, warm
//! connections to a target).
use std::time::Duration;

/// Full jitter between half the backoff and the backoff, so agents do not reconnect in lockstep
/// after a relay restart.
pub fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + backoff.mul_f64(rand::random::<f64>() * 0.5)
}

/// Pause before a slot dials the replacement for a connection it just handed over, while at
/// least half the pool is still waiting: the stream just handed over, and the next few, get
/// through their setup before the replacement's handshake competes with them for the CPU.
const CALM_REPLENISH: Duration = Duration::from_millis(60);
/// The pause when the pool runs low (a burst): replace almost at once.
const QUICK_REPLENISH: Duration = Duration::from_millis(6);

/// How long to wait before replacing a connection just handed over, given how many of the
/// pool's `size` still wait for a stream. Jittered (between half and all of the pause): a fixed
/// pause would land every replacement on the same phase of a periodic load, e.g. exactly on
/// the fifth next connection of a steady 100/s.
pub fn replenish_delay(idle: usize, size: usize) -> Duration {
    let pause = if idle * 2 >= size {
        CALM_REPLENISH
    } else {
        QUICK_REPLENISH
    };
    jitter(pause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_full_backoff() {
        let backoff = Duration::from_secs(4);
        for _ in 0..1000 {
            let d = jitter(backoff);
            assert!(d >= Duration::from_secs(2) && d <= backoff, "{d:?}");
        }
    }

    #[test]
    fn replacements_wait_longer_while_the_pool_is_well_stocked() {
        for _ in 0..100 {
            let calm = replenish_delay(4, 4);
            assert!(calm >= CALM_REPLENISH / 2 && calm <= CALM_REPLENISH, "{calm:?}");
            let quick = replenish_delay(1, 4);
            assert!(
                quick >= QUICK_REPLENISH / 2 && quick <= QUICK_REPLENISH,
                "{quick:?}"
            );
        }
    }
}

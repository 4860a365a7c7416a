//! The heartbeat both ends of a control connection keep: a ping every interval, and the peer
//! counted as gone once it has been silent for [`MISSED_HEARTBEATS`] intervals. Any frame from
//! the peer counts as a sign of life.
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Missed heartbeats after which a silent peer is considered gone.
pub const MISSED_HEARTBEATS: u32 = 3;

/// What the next beat calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Send a ping with this sequence number.
    Ping(u64),
    /// The peer has said nothing for this long: give up on it.
    Silent(Duration),
}

/// One end's heartbeat state: when to ping next, and when the peer was last heard.
pub struct Heartbeat {
    every: Duration,
    ticker: Interval,
    last_heard: Instant,
    seq: u64,
}

impl Heartbeat {
    /// A heartbeat every `every`, counting the peer as heard from now. The first beat comes at
    /// once (a tokio interval's first tick).
    pub fn new(every: Duration) -> Self {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            every,
            ticker,
            last_heard: Instant::now(),
            seq: 0,
        }
    }

    /// The interval between beats.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// The peer just sent something.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Waits for the next beat. Cancel-safe (for use in `select!`).
    pub async fn beat(&mut self) -> Beat {
        self.ticker.tick().await;
        let silent = self.last_heard.elapsed();
        if silent > self.every * MISSED_HEARTBEATS {
            return Beat::Silent(silent);
        }
        self.seq += 1;
        Beat::Ping(self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_while_heard_and_gives_up_after_missed_beats() {
        let mut heartbeat = Heartbeat::new(Duration::from_secs(1));
        assert_eq!(heartbeat.beat().await, Beat::Ping(1));
        heartbeat.heard();
        for seq in 2..=4 {
            assert_eq!(heartbeat.beat().await, Beat::Ping(seq));
        }
        // Heard at t=0 after the first tick; at t=4 s the peer has been silent for 4 s > 3 beats.
        assert!(matches!(heartbeat.beat().await, Beat::Silent(d) if d > Duration::from_secs(3)));
    }
}

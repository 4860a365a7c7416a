//! How many refusal log lines the edge writes: a scan or a flood is thousands of refusals a
//! second, and a log line for each would cost more than the refusal and fill the disk. The
//! budget allows a burst of lines per second; the first line after lines were left out says how
//! many (the rejection counters have them all).
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A fixed budget of log lines per second.
pub struct LogBudget {
    per_second: u32,
    state: Mutex<Window>,
}

struct Window {
    start: Instant,
    written: u32,
    left_out: u64,
}

/// Whether to write a line now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; this many lines were left out since the last one written.
    Write {
        /// Lines left out before this one.
        left_out: u64,
    },
    /// Leave it out (it is counted).
    LeaveOut,
}

impl LogBudget {
    /// At most `per_second` lines in each second.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new(Window {
                start: Instant::now(),
                written: 0,
                left_out: 0,
            }),
        }
    }

    /// Whether a line may be written at `now`.
    pub fn check(&self, now: Instant) -> Verdict {
        let mut window = self.state.lock().expect("log budget lock");
        if now.saturating_duration_since(window.start) >= Duration::from_secs(1) {
            window.start = now;
            window.written = 0;
        }
        if window.written >= self.per_second {
            window.left_out += 1;
            return Verdict::LeaveOut;
        }
        window.written += 1;
        Verdict::Write {
            left_out: std::mem::take(&mut window.left_out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_burst_per_second_and_then_says_how_many_were_left_out() {
        let budget = LogBudget::new(3);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(budget.check(now), Verdict::Write { left_out: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(budget.check(now), Verdict::LeaveOut);
        }
        let next_second = now + Duration::from_secs(1);
        assert_eq!(budget.check(next_second), Verdict::Write { left_out: 1000 });
        assert_eq!(budget.check(next_second), Verdict::Write { left_out: 0 });
    }
}

//! What the fuzz targets share: how an input carries its knobs (a size limit and how its stream
//! is cut into reads) ahead of the bytes under test, the cut points and prefix samples the
//! split-independence checks walk, and the fixed plain-TCP session the `tcp_data` target and
//! its seeds both seal headers with.
//!
//! Every target in `fuzz_targets/` says in its `//!` which properties it checks; the helpers
//! here only decide *where* to look, never what must hold.

use std::ops::Range;

use sluice::wire::tcp_data::{Nonces, StreamKey};

/// The two knob bytes that open every input of a target taking a limit or cuts, and the bytes
/// under test after them. Knobs are ordinary input bytes, so the fuzzer mutates limits and cut
/// points along with the data, and a crash file replays exactly.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// Picks the parser's size limit ([`Knobs::limit`]).
    pub limit: u8,
    /// Seeds the cut points ([`cuts`]).
    pub cuts: u8,
}

impl Knobs {
    /// Knobs for an unlimited parser fed the stream in one read: what the seed corpus uses.
    pub const WHOLE: Knobs = Knobs { limit: 0, cuts: 0 };

    /// Splits an input into its knobs and the bytes under test; `None` for an input too short
    /// to carry knobs.
    pub fn split(data: &[u8]) -> Option<(Knobs, &[u8])> {
        match data {
            [limit, cuts, rest @ ..] => Some((
                Knobs {
                    limit: *limit,
                    cuts: *cuts,
                },
                rest,
            )),
            _ => None,
        }
    }

    /// The input bytes for `stream` behind these knobs (for writing seeds).
    pub fn prepend(self, stream: &[u8]) -> Vec<u8> {
        let mut input = vec![self.limit, self.cuts];
        input.extend_from_slice(stream);
        input
    }

    /// A size limit: none (`usize::MAX`) for half the selector values, so that complete
    /// messages are common, and `step` times 0..128 for the other half, so that every limit
    /// check is reached, including limits of zero and limits inside a message.
    pub fn limit(self, step: usize) -> usize {
        match self.limit {
            0..=127 => usize::MAX,
            selector => usize::from(selector - 128) * step,
        }
    }
}

/// Where to cut `len` bytes into reads: ascending ends of the pieces, the last one `len`.
///
/// Seed 0 is one read, seed 1 one byte per read; other seeds give pieces of 1 to `seed % 64 + 1`
/// bytes from a small xorshift generator, so that cuts land inside every field of a message.
pub fn cuts(seed: u8, len: usize) -> Vec<usize> {
    match seed {
        // An empty stream is still read once.
        _ if len == 0 => vec![0],
        0 => vec![len],
        1 => (1..=len).collect(),
        _ => {
            let max_piece = u64::from(seed % 64) + 1;
            let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(seed);
            let mut ends = Vec::new();
            let mut end = 0;
            while end < len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // The piece is at most 64 bytes, so the cast cannot truncate.
                let piece = (state % max_piece + 1) as usize;
                end = (end + piece).min(len);
                ends.push(end);
            }
            ends
        }
    }
}

/// Cuts `len` bytes into consecutive ranges at [`cuts`]`(seed, len)`.
pub fn pieces(seed: u8, len: usize) -> Vec<Range<usize>> {
    let mut start = 0;
    cuts(seed, len)
        .into_iter()
        .map(|end| {
            let piece = start..end;
            start = end;
            piece
        })
        .collect()
}

/// Prefix lengths to check, ascending, ending at `len`: all of them for short inputs, and for
/// long ones the first and last `EDGE` and an even spread between, so that a parser costing
/// O(n) per call is not checked at O(n^2) per input.
pub fn prefix_sample(len: usize) -> Vec<usize> {
    const EDGE: usize = 256;
    const MIDDLE: usize = 256;
    if len <= 2 * EDGE + MIDDLE {
        return (0..=len).collect();
    }
    let mut ends: Vec<usize> = (0..EDGE).collect();
    let span = len - 2 * EDGE;
    ends.extend((0..MIDDLE).map(|i| EDGE + i * span / MIDDLE));
    ends.extend(len - EDGE..=len);
    ends.dedup();
    ends
}

/// The session credential of the plain-TCP connection whose sealed headers the `tcp_data`
/// target opens; its seeds are sealed with the same key, so the fuzzer starts from headers
/// that open and mutates them.
pub const TCP_CREDENTIAL: &str = "fuzz-session-credential";
/// The session id of that connection.
pub const TCP_AGENT_ID: &str = "acme/fuzz-agent/0001";
/// Its nonces (fixed: a fuzz input must replay exactly).
pub const TCP_NONCES: Nonces = Nonces {
    agent: [0xa5; 32],
    relay: [0x5a; 32],
};

/// The stream key both ends of that connection derive.
pub fn tcp_stream_key() -> StreamKey {
    StreamKey::derive(TCP_CREDENTIAL, TCP_AGENT_ID, &TCP_NONCES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_cover_the_input_in_ascending_pieces() {
        for seed in 0..=255u8 {
            for len in [0, 1, 2, 63, 64, 65, 1000] {
                let ends = cuts(seed, len);
                assert_eq!(ends.last(), Some(&len), "seed {seed} len {len}");
                assert!(ends.windows(2).all(|w| w[0] < w[1]), "seed {seed} len {len}");
                let covered: usize = pieces(seed, len).iter().map(ExactSizeIterator::len).sum();
                assert_eq!(covered, len);
            }
        }
        assert_eq!(cuts(1, 3), vec![1, 2, 3]);
        assert_eq!(cuts(0, 3), vec![3]);
    }

    #[test]
    fn prefix_samples_ascend_and_end_at_the_input() {
        for len in [0, 5, 768, 769, 4096, 70_000] {
            let ends = prefix_sample(len);
            assert_eq!(ends.first(), Some(&0));
            assert_eq!(ends.last(), Some(&len));
            assert!(ends.windows(2).all(|w| w[0] < w[1]), "{len}");
        }
        assert_eq!(prefix_sample(768).len(), 769);
    }

    #[test]
    fn limits_are_unlimited_for_half_the_selectors() {
        assert_eq!(Knobs { limit: 5, cuts: 0 }.limit(16), usize::MAX);
        assert_eq!(Knobs { limit: 128, cuts: 0 }.limit(16), 0);
        assert_eq!(Knobs { limit: 255, cuts: 0 }.limit(16), 127 * 16);
    }
}

//! Ban events from the kernel: the program writes a `BanEvent` into the `BAN_EVENTS` ring
//! buffer each time it bans a source (a network, see [`super::prefix`]); this module decodes
//! them, and [`BanEvents::run`] is the relay's reader task (tokio `AsyncFd` on the ring
//! buffer's fd) that logs and counts each one.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use proxy_common::{BanEvent, FAMILY_V4, Reason};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::clock;
use crate::prefix::SourcePrefix;

/// One ban the kernel decided, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanNotice {
    /// The banned source network.
    pub source: SourcePrefix,
    /// The over-limit drop that crossed the threshold.
    pub reason: Option<Reason>,
    /// Kernel clock (ns) when the ban ends.
    pub until_ns: u64,
}

impl BanNotice {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<BanEvent>() {
            return None;
        }
        // SAFETY: length checked; BanEvent is plain data valid for any bit pattern.
        let event: BanEvent = unsafe { bytes.as_ptr().cast::<BanEvent>().read_unaligned() };
        let network = if event.family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(
                event.addr[0],
                event.addr[1],
                event.addr[2],
                event.addr[3],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(event.addr))
        };
        let source = SourcePrefix::new(network, u8::try_from(event.prefix_len).ok()?)?;
        Some(Self {
            source,
            reason: Reason::from_index(event.reason),
            until_ns: event.until_ns,
        })
    }

    /// Time left on the ban.
    pub fn remaining(&self) -> Option<Duration> {
        clock::until(self.until_ns)
    }
}

/// The consumer end of the ring buffer.
pub struct BanEvents {
    ring: RingBuf<MapData>,
}

impl BanEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Every event waiting now (does not block).
    pub fn drain(&mut self) -> Vec<BanNotice> {
        let mut notices = Vec::new();
        while let Some(item) = self.ring.next() {
            notices.extend(BanNotice::decode(&item));
        }
        notices
    }

    /// Waits for events until `stop`, handing each to `on_ban`.
    pub async fn run(self, stop: CancellationToken, on_ban: impl Fn(BanNotice)) {
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
        // the AsyncFd owns the ring buffer.
        let registered = unsafe { AsyncFd::register_with_interest(self.ring, Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "shield: cannot watch the ban ring buffer; kernel bans go unlogged");
                return;
            }
        };
        loop {
            let mut guard = tokio::select! {
                ready = fd.readable_mut() => match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::error!(error = %e, "shield: ban ring buffer failed");
                        return;
                    }
                },
                () = stop.cancelled() => return,
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(notice) = BanNotice::decode(&item) {
                    on_ban(notice);
                }
            }
            guard.clear_ready();
        }
    }
}

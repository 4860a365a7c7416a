//! Types shared by the kernel side (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers: these values cross the
//! kernel/userspace boundary as raw bytes in BPF maps. Map and program names are constants so
//! the loader and the programs can never disagree on a spelling.
#![no_std]

/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "sluice_shield";
/// Map: IPv4 source address (network byte order) -> [`BanEntry`].
pub const MAP_BANNED_V4: &str = "BANNED_V4";
/// Map: per-CPU array of [`Counter`], indexed by [`Reason`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Why the shield passed or dropped a packet. Index into the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IP, or IP to a destination the shield does not police.
    PassOther = 0,
    /// Inspected and allowed.
    Pass = 1,
    /// Headers shorter than they claim or cut off by the end of the frame.
    DropMalformed = 2,
    /// Source address is banned.
    DropBanned = 3,
}

impl Reason {
    /// Number of reasons; the size of the counters array.
    pub const COUNT: u32 = 4;
    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] =
        [Self::PassOther, Self::Pass, Self::DropMalformed, Self::DropBanned];

    /// A stable, Prometheus-friendly label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::PassOther => "pass_other",
            Self::Pass => "pass",
            Self::DropMalformed => "drop_malformed",
            Self::DropBanned => "drop_banned",
        }
    }

    /// True when packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(self, Self::DropMalformed | Self::DropBanned)
    }
}

/// Packets and bytes seen for one [`Reason`] on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A ban on one source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEntry {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which the ban no longer applies;
    /// `u64::MAX` for a ban without expiry.
    pub until_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: #[repr(C)], Copy, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BanEntry {}
}

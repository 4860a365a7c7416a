//! Types shared by the kernel side (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers: these values cross the
//! kernel/userspace boundary as raw bytes in BPF maps. Map and program names are constants so
//! the loader and the programs can never disagree on a spelling.
//!
//! Addresses are stored as they are on the wire (network byte order): an IPv4 source is the
//! `u32` read straight from the header (`u32::from_ne_bytes(ip.octets())` in userspace), an
//! IPv6 source its 16 octets (in the source tables, those octets as two native `u64`).
//!
//! A *source* is not one address but the network of its first [`SourcePrefixes`] bits (by
//! default the IPv4 /32 and the IPv6 /64): the source tables, kernel bans, the `BANNED_*` maps
//! and ban events are keyed by that network, so a host rotating addresses inside its own /64
//! is one source. The allow/deny tries are CIDR lists and match the full address.
#![no_std]

/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "sluice_shield";
/// Map (hash): IPv4 source network (the address masked with [`SourcePrefixes::v4_mask`], network
/// byte order) -> [`BanEntry`]. Bans userspace decides (operator via CLI or admin API, L7
/// abuse); bans the kernel decides live in [`SourceState`].
pub const MAP_BANNED_V4: &str = "BANNED_V4";
/// Map (hash): IPv6 source network (16 octets, masked with [`SourcePrefixes::v6_mask`]) ->
/// [`BanEntry`], as [`MAP_BANNED_V4`].
pub const MAP_BANNED_V6: &str = "BANNED_V6";
/// Map: per-CPU array of [`Counter`], indexed by [`Reason`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Map (array, one entry): the [`Policy`] in force (limits and protected ports).
pub const MAP_POLICY: &str = "POLICY";
/// Map (LPM trie): IPv4 CIDRs (key data: 4 octets) that bypass every limit -> [`CidrOrigin`].
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
/// Map (LPM trie): IPv6 CIDRs (key data: 16 octets) that bypass every limit -> [`CidrOrigin`].
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
/// Map (LPM trie): IPv4 CIDRs whose packets to protected ports are dropped -> [`CidrOrigin`].
pub const MAP_DENY_V4: &str = "DENY_V4";
/// Map (LPM trie): IPv6 CIDRs whose packets to protected ports are dropped -> [`CidrOrigin`].
pub const MAP_DENY_V6: &str = "DENY_V6";
/// Map (array, mmapable): the IPv4 source table, [`MAX_SOURCES`] slots of `SourceState<u32>`
/// (token buckets and kernel-decided ban of one source each); see [`SourceState`].
pub const MAP_SOURCES_V4: &str = "SOURCES_V4";
/// Map (array, mmapable): the IPv6 source table, slots of `SourceState<[u64; 2]>`.
pub const MAP_SOURCES_V6: &str = "SOURCES_V6";
/// Map (ring buffer): one [`BanEvent`] per ban the kernel decides.
pub const MAP_BAN_EVENTS: &str = "BAN_EVENTS";
/// Map (array, one [`SynFlood`] per destination port): how many SYNs from new sources each port
/// got in the current second, and whether the program answers its SYNs with cookies.
pub const MAP_SYN_FLOOD: &str = "SYN_FLOOD";
/// Map (LRU hash): destination address and port of a listener (two words of address, IPv4 in
/// the first; then the port, plus 1 << 16 for IPv6) -> when a SYN in SYN-cookie mode last went
/// on to it (CLOCK_MONOTONIC ns). Each listening socket keeps its own cookie window open.
pub const MAP_SYN_LISTENERS: &str = "SYN_LISTENERS";

/// Every map the shield pins, so the CLI can open a running relay's maps by name.
pub const PINNED_MAPS: [&str; 11] = [
    MAP_BANNED_V4,
    MAP_BANNED_V6,
    MAP_COUNTERS,
    MAP_POLICY,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_DENY_V4,
    MAP_DENY_V6,
    MAP_SOURCES_V4,
    MAP_SOURCES_V6,
    MAP_SYN_FLOOD,
];

/// Capacity of each ban map. Not LRU, so a flood of new sources cannot evict an operator's
/// ban; when it is full, userspace drops expired bans to make room, else refuses the new one.
pub const MAX_BANS: u32 = 65_536;
/// A source lives in one of the `SOURCE_WAYS` slots of the set its address hashes to; a new
/// source takes a free slot of its set, else the one whose source was seen longest ago.
pub const SOURCE_WAYS: u32 = 4;
/// log2 of the number of sets in each source table.
pub const SOURCE_SET_BITS: u32 = 16;
/// Slots in each source table.
pub const MAX_SOURCES: u32 = SOURCE_WAYS << SOURCE_SET_BITS;
/// `BPF_F_MMAPABLE` (`linux/bpf.h`): userspace maps the source tables into its memory to list
/// and lift the kernel's bans without a syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Capacity of each allow/deny trie.
pub const MAX_CIDRS: u32 = 16_384;

/// Why the shield passed or dropped a packet. Index into the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IP, not TCP, or TCP to a port the shield does not police.
    PassOther = 0,
    /// To a protected port, inspected and within its source's limits.
    Pass = 1,
    /// IPv4/IPv6/TCP headers shorter than they claim, cut off by the end of the frame, or
    /// otherwise impossible (IHL < 5, TCP data offset < 5, ...).
    DropMalformed = 2,
    /// Source address is banned.
    DropBanned = 3,
    /// Source is in the allowlist: passed without limits or bans.
    PassAllowlisted = 4,
    /// Source is in the denylist.
    DropDenylisted = 5,
    /// Impossible TCP flag combination (SYN+FIN, SYN+RST, no flags, FIN+PSH+URG).
    DropTcpFlags = 6,
    /// A TCP fragment to a protected port (or a non-first TCP fragment, whose port is unknown).
    DropFragment = 7,
    /// Over the source's new-connection (SYN) rate.
    DropSynRate = 8,
    /// Over the source's rate of segments that carry neither ACK nor RST and are not an opening
    /// SYN (see [`Limits::packet`]).
    DropPacketRate = 9,
    /// A SYN from a new source to a port in SYN-cookie mode, answered by the program itself with
    /// a SYN-ACK carrying a SYN cookie (`XDP_TX`).
    SyncookieSent = 10,
    /// An ACK from a new source to a port in SYN-cookie mode carrying a valid cookie: passed on,
    /// the kernel's listener creates the connection from it.
    SyncookieOk = 11,
    /// An ACK from a new source to a port in SYN-cookie mode whose cookie is not valid: a forged
    /// or stale handshake, dropped.
    SyncookieBad = 12,
}

impl Reason {
    /// Number of reasons; the size of the counters array.
    pub const COUNT: u32 = 13;
    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Self::PassOther,
        Self::Pass,
        Self::DropMalformed,
        Self::DropBanned,
        Self::PassAllowlisted,
        Self::DropDenylisted,
        Self::DropTcpFlags,
        Self::DropFragment,
        Self::DropSynRate,
        Self::DropPacketRate,
        Self::SyncookieSent,
        Self::SyncookieOk,
        Self::SyncookieBad,
    ];

    /// A stable, Prometheus-friendly label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::PassOther => "pass_other",
            Self::Pass => "pass",
            Self::DropMalformed => "drop_malformed",
            Self::DropBanned => "drop_banned",
            Self::PassAllowlisted => "pass_allowlisted",
            Self::DropDenylisted => "drop_denylisted",
            Self::DropTcpFlags => "drop_tcp_flags",
            Self::DropFragment => "drop_fragment",
            Self::DropSynRate => "drop_syn_rate",
            Self::DropPacketRate => "drop_packet_rate",
            Self::SyncookieSent => "syncookie_sent",
            Self::SyncookieOk => "syncookie_ok",
            Self::SyncookieBad => "syncookie_bad",
        }
    }

    /// True when packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropMalformed
                | Self::DropBanned
                | Self::DropDenylisted
                | Self::DropTcpFlags
                | Self::DropFragment
                | Self::DropSynRate
                | Self::DropPacketRate
                | Self::SyncookieBad
        )
    }

    /// True when the program sent the frame back out of the interface it came in on.
    pub const fn is_transmit(self) -> bool {
        matches!(self, Self::SyncookieSent)
    }

    /// The reason with index `index`, if any.
    pub const fn from_index(index: u32) -> Option<Self> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }
}

/// Packets and bytes seen for one [`Reason`] on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A ban on one source (network of [`SourcePrefixes`] bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEntry {
    /// CLOCK_MONOTONIC ns after which the ban no longer applies (the program reads the clock
    /// with `bpf_ktime_get_coarse_ns()`, i.e. at tick resolution);
    /// `u64::MAX` for a ban without expiry.
    pub until_ns: u64,
}

/// Nanotokens per token: buckets count in billionths of a token so that refilling needs only a
/// multiplication (elapsed ns x tokens per second), never a division, in the kernel.
pub const NANOTOKENS: u64 = 1_000_000_000;

/// One token bucket's parameters, as the kernel uses them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketLimit {
    /// Tokens added per second.
    pub rate: u64,
    /// Bucket size in nanotokens (`burst x NANOTOKENS`).
    pub capacity: u64,
    /// Nanoseconds an empty bucket takes to fill up (`capacity / rate`): refills are computed
    /// from at most this much elapsed time, which keeps `elapsed x rate` from overflowing.
    pub fill_ns: u64,
}

impl BucketLimit {
    /// A bucket of `burst` tokens refilled at `rate` tokens per second (both at least 1).
    pub const fn new(rate: u64, burst: u64) -> Self {
        let rate = if rate == 0 { 1 } else { rate };
        let burst = if burst == 0 { 1 } else { burst };
        let capacity = burst.saturating_mul(NANOTOKENS);
        Self {
            rate,
            capacity,
            fill_ns: capacity / rate,
        }
    }
}

/// How many leading bits of a source address make a source, per family, as masks the program
/// ANDs onto the address (in wire order, like the addresses) and the lengths they were made of.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourcePrefixes {
    /// The first `v6_len` bits set: the IPv6 source's octets as two native `u64`, masked.
    pub v6_mask: [u64; 2],
    /// The first `v4_len` bits set, as the IPv4 source's native `u32`.
    pub v4_mask: u32,
    /// Prefix length of an IPv4 source (at most 32); reported in ban events.
    pub v4_len: u16,
    /// Prefix length of an IPv6 source (at most 128).
    pub v6_len: u16,
}

impl SourcePrefixes {
    /// Masks for IPv4 sources of `v4_len` bits and IPv6 sources of `v6_len` bits (longer
    /// lengths are cut to the address size).
    pub const fn new(v4_len: u16, v6_len: u16) -> Self {
        let v4_len = if v4_len > 32 { 32 } else { v4_len };
        let v6_len = if v6_len > 128 { 128 } else { v6_len };
        let v4 = if v4_len == 0 { 0 } else { u32::MAX << (32 - v4_len) };
        let v6 = if v6_len == 0 {
            0
        } else {
            u128::MAX << (128 - v6_len)
        };
        let octets = v6.to_be_bytes();
        let mut high = [0u8; 8];
        let mut low = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            high[i] = octets[i];
            low[i] = octets[8 + i];
            i += 1;
        }
        Self {
            v6_mask: [u64::from_ne_bytes(high), u64::from_ne_bytes(low)],
            v4_mask: u32::from_ne_bytes(v4.to_be_bytes()),
            v4_len,
            v6_len,
        }
    }
}

/// The limits in force, part of the [`Policy`] userspace writes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// New connections per source: segments with SYN and without ACK.
    pub syn: BucketLimit,
    /// Segments per source that carry neither ACK nor RST and are not an opening SYN (FIN-,
    /// PSH- or URG-only junk). Every segment of an established connection carries ACK (RFC
    /// 9293), so downloads' ACKs and uploads' data are never charged; a bare RST is what a
    /// stack answers a segment for a connection it no longer has (a storm of them follows a
    /// client dying in the middle of a fast transfer) and needs no answer, so it is not either.
    pub packet: BucketLimit,
    /// Strikes: every drop over `syn` or `packet` spends a token of a bucket of
    /// `ban_threshold` tokens refilled at the strike decay rate; a drop that finds it empty
    /// bans the source for `ban_ns`.
    pub strikes: BucketLimit,
    /// How long a kernel-decided ban lasts, in nanoseconds.
    pub ban_ns: u64,
    /// Which allow/deny tries and ban maps hold entries (`LIST_*` bits), kept up to date by
    /// userspace so the program skips lookups in empty ones.
    pub lists: u64,
    /// Random odd multipliers of the source-table hash, chosen once when the program is loaded,
    /// so that nobody outside can pick addresses that crowd one set.
    pub seeds: [u64; 2],
    /// Bumped by userspace after every change to the tries and ban maps (it stays within
    /// `1..=u32::MAX`); a source's cached lookups hold while its slot has the same number.
    pub generation: u64,
    /// What makes a source (see the crate docs).
    pub prefixes: SourcePrefixes,
    /// When and how the program answers SYNs itself.
    pub syncookies: SyncookiePolicy,
}

/// [`SyncookiePolicy::mode`]: the program never answers SYNs (also what a zeroed policy says).
pub const SYNCOOKIES_NEVER: u8 = 0;
/// [`SyncookiePolicy::mode`]: a port goes into SYN-cookie mode above the threshold.
pub const SYNCOOKIES_ADAPTIVE: u8 = 1;
/// [`SyncookiePolicy::mode`]: every protected port is always in SYN-cookie mode.
pub const SYNCOOKIES_ALWAYS: u8 = 2;
/// How long a port stays in SYN-cookie mode after its last second over the threshold.
pub const SYNCOOKIE_HOLD_NS: u64 = 10_000_000_000;
/// In SYN-cookie mode, one SYN per listener (destination address and port) per this many
/// nanoseconds still goes to the kernel (the default of
/// [`SyncookiePolicy::listener_interval_ns`]): a listening socket accepts a cookie ACK only for
/// two minutes after it answered a SYN with a cookie of its own (`tcp_synq_no_recent_overflow`),
/// so it must keep doing so.
pub const SYNCOOKIE_LISTENER_NS: u64 = 1_000_000_000;

/// [`SyncookiePolicy::options`] bits: what the SYN-ACKs the program sends may offer.
/// The timestamp option, which carries the client's window scale and SACK permission back to the
/// kernel in the low bits of the timestamp the client echoes (the kernel's own cookie encoding).
pub const SYNCOOKIE_TIMESTAMPS: u8 = 1;
/// Window scaling (needs [`SYNCOOKIE_TIMESTAMPS`]).
pub const SYNCOOKIE_WSCALE: u8 = 2;
/// Selective acknowledgements (needs [`SYNCOOKIE_TIMESTAMPS`]).
pub const SYNCOOKIE_SACK: u8 = 4;

/// When the program answers SYNs itself, and the SYN-ACK it sends: the same options, window and
/// window scale the kernel's listener will assume when it creates the connection from the
/// cookie ACK, so both ends agree. Userspace derives the numbers from the host's sysctls and the
/// interfaces' MTU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncookiePolicy {
    /// Under [`SYNCOOKIES_ADAPTIVE`]: SYNs from new sources (not in the source table) per
    /// second to one port above which the port goes into SYN-cookie mode.
    pub threshold: u64,
    /// In SYN-cookie mode, SYNs from new sources still go to each listener (destination address
    /// and port) one per this many nanoseconds (the first one always).
    pub listener_interval_ns: u64,
    /// MSS offered over IPv4 and IPv6 (the interfaces' MTU less the headers).
    pub mss_v4: u16,
    pub mss_v6: u16,
    /// Receive window offered (unscaled, as in every SYN segment), per family.
    pub window_v4: u16,
    pub window_v6: u16,
    /// Window scale offered: what the kernel computes for the connection (from `tcp_rmem` and
    /// `rmem_max`), or the client would misread every window the kernel sends later.
    pub wscale: u8,
    /// IPv4 TTL / IPv6 hop limit of the SYN-ACK.
    pub ttl: u8,
    /// `SYNCOOKIE_*` bits.
    pub options: u8,
    /// `SYNCOOKIES_NEVER`, `SYNCOOKIES_ADAPTIVE` or `SYNCOOKIES_ALWAYS`.
    pub mode: u8,
    pub _reserved: [u8; 4],
}

impl Default for SyncookiePolicy {
    fn default() -> Self {
        Self {
            threshold: 0,
            listener_interval_ns: SYNCOOKIE_LISTENER_NS,
            mss_v4: 1460,
            mss_v6: 1440,
            window_v4: 64_240,
            window_v6: 64_800,
            wscale: 7,
            ttl: 64,
            options: 0,
            mode: SYNCOOKIES_NEVER,
            _reserved: [0; 4],
        }
    }
}

/// One destination port's SYN-flood state, in [`MAP_SYN_FLOOD`] (CLOCK_MONOTONIC ns at tick
/// resolution). Updates from several CPUs are not atomic: a count may lose a few SYNs, which
/// only delays the switch by as much.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynFlood {
    /// Start of the second `new_source_syns` counts in.
    pub window_ns: u64,
    /// SYNs from sources not in the source table since `window_ns`.
    pub new_source_syns: u64,
    /// The port is in SYN-cookie mode until then (0: never was).
    pub cookies_until_ns: u64,
}

/// [`Limits::lists`] bits.
pub const LIST_ALLOW_V4: u64 = 1;
pub const LIST_ALLOW_V6: u64 = 2;
pub const LIST_DENY_V4: u64 = 4;
pub const LIST_DENY_V6: u64 = 8;
pub const LIST_BANS_V4: u64 = 16;
pub const LIST_BANS_V6: u64 = 32;
/// Some allow/deny entry of the family is longer than its source prefix (say a /128 on the
/// allowlist with /64 sources): the answer a slot caches then holds only for the address it was
/// looked up for (`SourceState::listed_addr`), not for its whole network.
pub const LIST_FINE_V4: u64 = 64;
pub const LIST_FINE_V6: u64 = 128;

/// Protected destination ports as a 65,536-bit set: port `p` is bit `p % 64` of `words[p / 64]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet {
    pub words: [u64; 1024],
}

impl Default for PortSet {
    fn default() -> Self {
        Self { words: [0; 1024] }
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.words[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.words[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }
}

/// What userspace writes into [`MAP_POLICY`] slot 0: one map, so a packet looks up one array
/// (the ports for every packet, the limits for those to protected ports) instead of two.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub limits: Limits,
    pub ports: PortSet,
}

/// One slot of a source table: a source's token buckets and strikes, the ban the kernel gave
/// it, and what the allow/deny tries and ban maps said about it, in nanotokens and kernel ns.
/// `A` is the address as the table stores it: the IPv4 `u32` as on the wire, or the 16 IPv6
/// octets as two `u64` (cheap to compare). `addr` is the source's network (the packet's
/// source masked with [`Limits::prefixes`]).
///
/// The tables are BPF arrays the program indexes itself (set = keyed multiply-shift hash of the
/// network): array lookups are inlined by the verifier, where a hash-map lookup is a chain of
/// kernel calls costing more than the rest of the program. The price is that a source can be
/// evicted by another one landing in a full set, as an LRU map evicts when it is full.
///
/// `listed` and `listed_ban_until_ns` cache the trie and ban-map lookups: they hold while
/// `generation` equals [`Limits::generation`], which userspace bumps after every change to
/// those maps, so a packet only looks into them when its source is new or the maps changed.
/// The trie answer is the one for `listed_addr`, the full address it was looked up for; it
/// holds for the whole network unless the family's `LIST_FINE_*` bit says some entry is
/// longer than the prefix.
///
/// Strikes (`strike_tokens`, see [`Limits::strikes`]) refill with time like the other buckets,
/// so a source briefly over a limit and well-behaved afterwards is forgiven at a steady rate.
/// Updates from different CPUs are not atomic: a source hammering several queues at once may
/// get a few extra tokens, which only makes the limit slightly soft, and two new sources
/// claiming the same slot at once may mix their (fresh, nearly identical) states.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState<A> {
    /// The source's network.
    pub addr: A,
    /// The full address whose allow/deny answer `listed` holds.
    pub listed_addr: A,
    /// The [`Limits::generation`] `listed` and `listed_ban_until_ns` were looked up under
    /// (never 0 once the slot is taken); 0: a free slot.
    pub generation: u32,
    /// What the allow/deny tries say about `listed_addr` (`LISTED_*`).
    pub listed: u32,
    pub syn_tokens: u64,
    pub packet_tokens: u64,
    pub strike_tokens: u64,
    /// When the buckets were last refilled.
    pub last_ns: u64,
    /// The kernel's `jiffies` at `last_ns`: buckets are refilled at most once per tick, the
    /// resolution of the clock they use anyway. Also how recently the source was seen.
    pub tick: u64,
    /// Kernel-decided ban: dropped while the clock is below this; 0 for none.
    pub banned_until_ns: u64,
    /// The source's entry in the `BANNED_*` map (userspace ban); 0 for none.
    pub listed_ban_until_ns: u64,
}

/// [`SourceState::listed`] values.
pub const LISTED_NONE: u32 = 0;
pub const LISTED_ALLOW: u32 = 1;
pub const LISTED_DENY: u32 = 2;

/// Where an allow/deny entry came from: reloads replace configured entries and keep the ones
/// added at runtime (CLI).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrOrigin {
    Config = 1,
    Runtime = 2,
}

/// Address family tags in [`BanEvent::family`].
pub const FAMILY_V4: u16 = 4;
pub const FAMILY_V6: u16 = 6;

/// Sent through [`MAP_BAN_EVENTS`] whenever the kernel bans a source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEvent {
    /// When the ban ends (CLOCK_MONOTONIC ns).
    pub until_ns: u64,
    /// The source's network: 4 octets then zeros for IPv4, 16 octets for IPv6.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    /// Its prefix length ([`SourcePrefixes`] when the ban was decided).
    pub prefix_len: u16,
    /// The [`Reason`] (as `u32`) of the drop that found no strike left.
    pub reason: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all below): plain-old-data: #[repr(C)], Copy, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::BanEntry {}
    unsafe impl aya::Pod for super::Limits {}
    unsafe impl aya::Pod for super::PortSet {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::BanEvent {}
    unsafe impl aya::Pod for super::SynFlood {}
}

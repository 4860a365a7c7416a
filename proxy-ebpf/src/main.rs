//! Sluice's XDP shield: runs on every received frame before the kernel allocates an skb.
//!
//! It owns the fast drop decisions for TCP traffic to the relay's protected ports (in the
//! `POLICY` map): [`parse`] reads Ethernet (up to two VLAN tags), IPv4 or IPv6 (with extension headers)
//! and TCP; [`police`] applies the allowlist, denylist, bans and per-source token buckets; while
//! a port is flooded with SYNs from new sources, [`syncookie`] answers them with SYN cookies
//! (`XDP_TX`) and checks the ACKs that come back. Every verdict is counted per CPU (packets and
//! bytes) under its [`Reason`].
//!
//! Cost is the design constraint: a packet from a source seen before makes no kernel call at
//! all (map lookups other than arrays and clock reads are calls, each costing about as much as
//! the rest of the program); see [`police`] for how.
//!
//! What is dropped, and why regardless of the port or not:
//! - Malformed IPv4/IPv6 headers (IHL < 5, total/payload length beyond the frame or shorter
//!   than the header, wrong version, truncated headers) and TCP headers cut short, whatever the
//!   port: no stack accepts them, and a header we cannot read has no port we could spare.
//! - Non-first TCP fragments, whatever the port: their port is in the first fragment, which we
//!   drop when it goes to a protected port; real TCP does not fragment (DF, path MTU discovery).
//! - For protected ports only: first TCP fragments, TCP data offset < 5 or beyond the packet,
//!   impossible flag combinations (SYN+FIN, SYN+RST, no flags, FIN+PSH+URG), then the
//!   per-source policy.
//!
//! Everything else (ARP, UDP, ICMP, TCP to other ports such as SSH) passes untouched as
//! `pass_other`.
#![no_std]
#![no_main]

mod parse;
mod police;
mod syncookie;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use proxy_common::{
    BPF_F_MMAPABLE, BanEntry, Counter, FAMILY_V4, FAMILY_V6, LIST_ALLOW_V4, LIST_ALLOW_V6, LIST_BANS_V4,
    LIST_BANS_V6, LIST_DENY_V4, LIST_DENY_V6, LIST_FINE_V4, LIST_FINE_V6, Limits, MAX_BANS, MAX_CIDRS,
    MAX_SOURCES, Policy, Reason, SourceState, SynFlood,
};

use parse::{Parsed, Segment, Source};
use police::{Address, FamilyMaps, NewSource, Policed};
use syncookie::Family;

// Bans decided in userspace, keyed by source network. A plain hash, not LRU: a spray of new
// sources cannot evict them.
#[map(name = "BANNED_V4")]
static BANNED_V4: HashMap<u32, BanEntry> = HashMap::with_max_entries(MAX_BANS, 0);
// The 16 octets as the IPv6 source table keeps them (two native words): no conversion to look
// one up, and the same bytes userspace writes.
#[map(name = "BANNED_V6")]
static BANNED_V6: HashMap<[u64; 2], BanEntry> = HashMap::with_max_entries(MAX_BANS, 0);

#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "DENY_V4")]
static DENY_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

// Source tables: arrays of slots in sets, indexed by the program itself (see `SourceState`).
#[map(name = "SOURCES_V4")]
static SOURCES_V4: Array<SourceState<u32>> = Array::with_max_entries(MAX_SOURCES, BPF_F_MMAPABLE);
#[map(name = "SOURCES_V6")]
static SOURCES_V6: Array<SourceState<[u64; 2]>> = Array::with_max_entries(MAX_SOURCES, BPF_F_MMAPABLE);

#[map(name = "POLICY")]
static POLICY: Array<Policy> = Array::with_max_entries(1, 0);

#[map(name = "BAN_EVENTS")]
static BAN_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

// One slot per destination port, indexed by the port itself (an inlined array lookup, and only
// for segments from sources the source tables do not hold).
#[map(name = "SYN_FLOOD")]
static SYN_FLOOD: Array<SynFlood> = Array::with_max_entries(65_536, 0);

// Looked into only for a SYN from a new source to a port in SYN-cookie mode.
#[map(name = "SYN_LISTENERS")]
static SYN_LISTENERS: LruHashMap<[u64; 3], u64> = LruHashMap::with_max_entries(4_096, 0);

// The SYN-cookie helpers are for GPL-compatible programs; this program (proxy-ebpf, and the
// proxy-common types it is built with) is dual-licensed MIT or GPL-2.0.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[xdp]
pub fn sluice_shield(ctx: XdpContext) -> u32 {
    let reason = classify(&ctx);
    count(reason, ctx.data_end() - ctx.data());
    if reason.is_transmit() {
        xdp_action::XDP_TX
    } else if reason.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Reason {
    // Index 0 of a one-entry array is always there (zeroed until userspace writes it: no port
    // protected).
    let Some(policy) = POLICY.get(0) else {
        return Reason::PassOther;
    };
    let ports = &policy.ports;
    let protected = |port: u16| ports.words[usize::from(port >> 6) & 1023] & (1 << (port & 63)) != 0;
    match parse::parse(ctx, protected) {
        Parsed::Verdict(reason) => reason,
        Parsed::Police {
            source,
            flags,
            segment,
        } => {
            let limits = &policy.limits;
            match source {
                Source::V4(address) => {
                    let maps = FamilyMaps {
                        allow: &ALLOW_V4,
                        deny: &DENY_V4,
                        bans: &BANNED_V4,
                        sources: &SOURCES_V4,
                        family: FAMILY_V4,
                        allow_bit: LIST_ALLOW_V4,
                        deny_bit: LIST_DENY_V4,
                        bans_bit: LIST_BANS_V4,
                        fine_bit: LIST_FINE_V4,
                    };
                    police::<_, syncookie::V4>(ctx, &maps, address, flags, segment, limits)
                }
                Source::V6(address) => {
                    let maps = FamilyMaps {
                        allow: &ALLOW_V6,
                        deny: &DENY_V6,
                        bans: &BANNED_V6,
                        sources: &SOURCES_V6,
                        family: FAMILY_V6,
                        allow_bit: LIST_ALLOW_V6,
                        deny_bit: LIST_DENY_V6,
                        bans_bit: LIST_BANS_V6,
                        fine_bit: LIST_FINE_V6,
                    };
                    police::<_, syncookie::V6>(ctx, &maps, address, flags, segment, limits)
                }
            }
        }
    }
}

/// Polices a segment of family `F` from `address`, answering or checking SYN cookies where the
/// policy says so.
#[inline(always)]
fn police<A: Address, F: Family>(
    ctx: &XdpContext,
    maps: &FamilyMaps<A>,
    address: A,
    flags: u8,
    segment: Segment,
    limits: &Limits,
) -> Reason {
    let cookies = &limits.syncookies;
    let new_source = || match SYN_FLOOD.get_ptr_mut(u32::from(segment.port)) {
        Some(flood) => syncookie::decide::<F>(ctx, segment, flood, &SYN_LISTENERS, cookies, flags),
        None => NewSource::Police,
    };
    match police::police(maps, address, flags, limits, &BAN_EVENTS, new_source) {
        Policed::Verdict(reason) => reason,
        Policed::Answer => F::answer(ctx, segment, cookies),
        Policed::CheckCookie => {
            if !F::valid(ctx, segment) {
                return Reason::SyncookieBad;
            }
            match police::admit(maps, address, flags, limits, &BAN_EVENTS) {
                Reason::Pass => Reason::SyncookieOk,
                other => other,
            }
        }
    }
}

#[inline(always)]
fn count(reason: Reason, bytes: usize) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! Per-source policy for well-formed TCP segments to protected ports, in this order:
//! allowlist (pass, no limits) -> denylist (drop) -> ban (drop until it expires) -> token
//! buckets (packet bucket for every segment, SYN bucket for new connections) -> pass.
//!
//! Over-limit drops are strikes; more than `ban_threshold` strikes ban the source for
//! `ban_ns` and send a [`BanEvent`] to userspace. Strikes are forgiven once both buckets have
//! refilled completely.
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{LpmTrie, LruHashMap, RingBuf};
use proxy_common::{BanEntry, BanEvent, BucketLimit, Limits, NANOTOKENS, Reason, SourceState};

use crate::parse::{TCP_ACK, TCP_SYN};

/// The maps of one address family; `K` is the address as it is on the wire.
pub struct FamilyMaps<K: 'static> {
    pub allow: &'static LpmTrie<K, u8>,
    pub deny: &'static LpmTrie<K, u8>,
    pub bans: &'static LruHashMap<K, BanEntry>,
    pub sources: &'static LruHashMap<K, SourceState>,
    /// Prefix length of a full address (32 or 128).
    pub bits: u32,
    /// `FAMILY_V4` or `FAMILY_V6`, for ban events.
    pub family: u32,
    /// The `LIST_*` bits of this family's tries in `Limits::lists`.
    pub allow_bit: u64,
    pub deny_bit: u64,
}

#[inline(always)]
pub fn police<K: Copy + AddrBytes>(
    maps: &FamilyMaps<K>,
    source: K,
    flags: u8,
    limits: Option<&Limits>,
    events: &RingBuf,
    now: impl Fn() -> u64,
) -> Reason {
    // Without limits written yet, look into every trie.
    let lists = limits.map_or(u64::MAX, |l| l.lists);
    let prefix = Key::new(maps.bits, source);
    if lists & maps.allow_bit != 0 && maps.allow.get(&prefix).is_some() {
        return Reason::PassAllowlisted;
    }
    if lists & maps.deny_bit != 0 && maps.deny.get(&prefix).is_some() {
        return Reason::DropDenylisted;
    }
    let now = now();
    // SAFETY: the value is copied out at once; bans are only ever written whole.
    if let Some(ban) = unsafe { maps.bans.get(source) }
        && ban.until_ns > now
    {
        return Reason::DropBanned;
    }
    let Some(limits) = limits else {
        return Reason::Pass;
    };
    let new_connection = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    match maps.sources.get_ptr_mut(source) {
        Some(state) => {
            // SAFETY: the pointer is valid while the program runs; concurrent updates from
            // other CPUs are tolerated (see `SourceState`).
            let state = unsafe { &mut *state };
            let reason = step(state, limits, now, new_connection);
            if state.strikes > limits.ban_threshold {
                state.strikes = 0;
                ban(maps, source, now.saturating_add(limits.ban_ns), reason, events);
            }
            reason
        }
        None => {
            // First segment seen from this source: both buckets start full, so it passes.
            let mut state = SourceState {
                syn_tokens: limits.syn.capacity,
                syn_last_ns: now,
                packet_tokens: limits.packet.capacity,
                packet_last_ns: now,
                strikes: 0,
            };
            let reason = step(&mut state, limits, now, new_connection);
            // A full map evicts its least recently used source; failure only forgets history.
            let _ = maps.sources.insert(source, state, 0);
            reason
        }
    }
}

/// Refills both buckets, then charges this segment; returns the verdict.
#[inline(always)]
fn step(state: &mut SourceState, limits: &Limits, now: u64, new_connection: bool) -> Reason {
    let packet_full = refill(
        &mut state.packet_tokens,
        &mut state.packet_last_ns,
        &limits.packet,
        now,
    );
    let syn_full = refill(&mut state.syn_tokens, &mut state.syn_last_ns, &limits.syn, now);
    if packet_full && syn_full {
        state.strikes = 0;
    }
    if state.packet_tokens < NANOTOKENS {
        state.strikes += 1;
        return Reason::DropPacketRate;
    }
    if new_connection && state.syn_tokens < NANOTOKENS {
        state.strikes += 1;
        return Reason::DropSynRate;
    }
    state.packet_tokens -= NANOTOKENS;
    if new_connection {
        state.syn_tokens -= NANOTOKENS;
    }
    Reason::Pass
}

/// Adds the tokens earned since `last`; returns true when the bucket is full.
#[inline(always)]
fn refill(tokens: &mut u64, last: &mut u64, limit: &BucketLimit, now: u64) -> bool {
    // At most `fill_ns` counts: `fill_ns * rate <= capacity`, so nothing overflows.
    let elapsed = now.saturating_sub(*last).min(limit.fill_ns);
    let filled = (*tokens + elapsed * limit.rate).min(limit.capacity);
    *tokens = filled;
    *last = now;
    filled >= limit.capacity
}

#[inline(always)]
fn ban<K: Copy + AddrBytes>(
    maps: &FamilyMaps<K>,
    source: K,
    until_ns: u64,
    reason: Reason,
    events: &RingBuf,
) {
    let _ = maps.bans.insert(source, BanEntry { until_ns }, 0);
    if let Some(mut entry) = events.reserve::<BanEvent>(0) {
        entry.write(BanEvent {
            until_ns,
            addr: source.addr_bytes(),
            family: maps.family,
            reason: reason as u32,
        });
        entry.submit(0);
    }
    // A full ring buffer loses the event, never the ban.
}

/// An address as the 16 octets of a [`BanEvent`].
pub trait AddrBytes {
    fn addr_bytes(&self) -> [u8; 16];
}

impl AddrBytes for u32 {
    #[inline(always)]
    fn addr_bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        let octets = self.to_ne_bytes();
        bytes[0] = octets[0];
        bytes[1] = octets[1];
        bytes[2] = octets[2];
        bytes[3] = octets[3];
        bytes
    }
}

impl AddrBytes for [u8; 16] {
    #[inline(always)]
    fn addr_bytes(&self) -> [u8; 16] {
        *self
    }
}

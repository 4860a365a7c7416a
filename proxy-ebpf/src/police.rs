//! Per-source policy for well-formed TCP segments to protected ports, in this order:
//! allowlist (pass, no limits) -> denylist (drop) -> bans (drop until they expire) -> token
//! buckets (packet bucket for every segment, SYN bucket for new connections) -> pass.
//!
//! Over-limit drops are strikes; more than `ban_threshold` strikes ban the source for
//! `ban_ns` and send a [`BanEvent`] to userspace. Strikes are forgiven once both buckets have
//! refilled completely.
//!
//! Bans come from two places. The kernel's own bans live in the source's [`SourceState`],
//! which the packet looks up anyway, so they cost no extra lookup. Bans decided in userspace
//! (operator, L7 abuse) live in the `BANNED_*` hash maps, looked into only when userspace has
//! put something there.
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, RingBuf};
use proxy_common::{BanEntry, BanEvent, BucketLimit, Limits, NANOTOKENS, Reason, SourceState};

use crate::parse::{TCP_ACK, TCP_SYN};

/// The maps of one address family; `K` is the address as it is on the wire.
pub struct FamilyMaps<K: 'static> {
    pub allow: &'static LpmTrie<K, u8>,
    pub deny: &'static LpmTrie<K, u8>,
    pub bans: &'static HashMap<K, BanEntry>,
    pub sources: &'static LruHashMap<K, SourceState>,
    /// Prefix length of a full address (32 or 128).
    pub bits: u32,
    /// `FAMILY_V4` or `FAMILY_V6`, for ban events.
    pub family: u32,
    /// The `LIST_*` bits of this family's tries and ban map in `Limits::lists`.
    pub allow_bit: u64,
    pub deny_bit: u64,
    pub bans_bit: u64,
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
    if lists & maps.bans_bit != 0
        && let Some(ban) = unsafe { maps.bans.get(source) }
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
            if state.banned_until_ns > now {
                return Reason::DropBanned;
            }
            let reason = step(state, limits, now, new_connection);
            if state.strikes > limits.ban_threshold {
                state.strikes = 0;
                state.banned_until_ns = now.saturating_add(limits.ban_ns);
                report_ban(maps, source, state.banned_until_ns, reason, events);
            }
            reason
        }
        None => {
            // First segment seen from this source: both buckets start full, so it passes.
            let mut state = SourceState {
                syn_tokens: limits.syn.capacity,
                packet_tokens: limits.packet.capacity,
                last_ns: now,
                strikes: 0,
                banned_until_ns: 0,
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
    let elapsed = now.saturating_sub(state.last_ns);
    state.last_ns = now;
    let packet_full = refill(&mut state.packet_tokens, &limits.packet, elapsed);
    let syn_full = refill(&mut state.syn_tokens, &limits.syn, elapsed);
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

/// Adds the tokens earned in `elapsed` ns; returns true when the bucket is full.
#[inline(always)]
fn refill(tokens: &mut u64, limit: &BucketLimit, elapsed: u64) -> bool {
    // At most `fill_ns` counts: `fill_ns * rate <= capacity`, so nothing overflows.
    let elapsed = elapsed.min(limit.fill_ns);
    let filled = (*tokens + elapsed * limit.rate).min(limit.capacity);
    *tokens = filled;
    filled >= limit.capacity
}

/// Tells userspace about a ban the kernel just decided.
#[inline(always)]
fn report_ban<K: Copy + AddrBytes>(
    maps: &FamilyMaps<K>,
    source: K,
    until_ns: u64,
    reason: Reason,
    events: &RingBuf,
) {
    if let Some(mut entry) = events.reserve::<BanEvent>(0) {
        entry.write(BanEvent {
            until_ns,
            addr: source.addr_bytes(),
            family: maps.family,
            reason: reason as u32,
        });
        entry.submit(0);
    }
    // A full ring buffer loses the event, never the ban (it is already in the source's state).
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

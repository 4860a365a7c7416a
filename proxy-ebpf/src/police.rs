//! Per-source policy for well-formed TCP segments to protected ports, in this order:
//! allowlist (pass, no limits) -> denylist (drop) -> bans (drop until they expire) -> token
//! buckets -> pass. A segment from a source the table does not hold first asks the caller what
//! to do with it ([`NewSource`]): under a SYN flood, a SYN to be answered with a cookie or an ACK
//! whose cookie must be checked; such a source is screened against the lists and bans, and takes
//! a slot only once its cookie proved it real ([`admit`]).
//!
//! A source is the network of the packet's source address under [`Limits::prefixes`] (the
//! IPv4 /32 and IPv6 /64 by default): its buckets, strikes and bans are shared by every address
//! inside it, so rotating addresses inside one's own /64 buys nothing. The allow/deny tries
//! are CIDR lists and are asked about the full address.
//!
//! What the buckets charge (see [`Limits`]): an opening SYN (SYN without ACK) spends a token of
//! the SYN bucket; a segment with neither ACK nor RST (FIN-, PSH- or URG-only junk: no stack
//! sends one, and ours would answer each with a RST) one of the packet bucket. Everything with
//! ACK (every segment of an established connection, RFC 9293: a download's ACKs, an upload's
//! data) and bare RSTs pass uncharged: nothing per packet tells them from a flood without
//! tracking connections, and the TCP stack drops the ones that belong to no connection for
//! about what it costs to receive them.
//!
//! Strikes: each drop over a bucket spends a token of the source's strike bucket, which holds
//! `ban_threshold` tokens and refills at the strike decay rate; the drop that finds it empty
//! bans the source for `ban_ns` and sends a [`BanEvent`] to userspace. So a burst of up to
//! `ban_threshold` over-limit drops is forgiven at a steady rate, and only a source that keeps
//! exceeding its limits faster than that rate, or by more than the threshold at once, is
//! banned.
//!
//! Everything about a source lives in its slot of a source table (see [`SourceState`]): an
//! array the program indexes itself, because every kernel call costs (about 17-30 ns each for
//! a clock read, an LPM or hash-map lookup: more than the rest of the program) while array
//! lookups are inlined by the verifier. So a packet from a known source makes no kernel call:
//! - the allow/deny tries and the userspace ban map are looked into when the source is new or
//!   userspace changed them (`Limits::generation`), and the answers kept in the slot (the
//!   tries' answer again for another address of the network only when some entry is longer
//!   than the prefix, `LIST_FINE_*`);
//! - the kernel's own bans are kept in the slot;
//! - the clock is read at most once per tick per source.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, RingBuf};
use proxy_common::{
    BanEntry, BanEvent, BucketLimit, LISTED_ALLOW, LISTED_DENY, LISTED_NONE, Limits, NANOTOKENS, Reason,
    SOURCE_SET_BITS, SOURCE_WAYS, SourcePrefixes, SourceState,
};

use crate::parse::{TCP_ACK, TCP_RST, TCP_SYN};

/// The maps of one address family, whose addresses are `A`.
pub struct FamilyMaps<A: Address + 'static> {
    pub allow: &'static LpmTrie<A::Wire, u8>,
    pub deny: &'static LpmTrie<A::Wire, u8>,
    /// Keyed by the source network as the tables store it (the same bytes as on the wire).
    pub bans: &'static HashMap<A, BanEntry>,
    pub sources: &'static Array<SourceState<A>>,
    /// `FAMILY_V4` or `FAMILY_V6`, for ban events.
    pub family: u16,
    /// The `LIST_*` bits of this family's tries and ban map in `Limits::lists`.
    pub allow_bit: u64,
    pub deny_bit: u64,
    pub bans_bit: u64,
    pub fine_bit: u64,
}

/// What policing decided for one segment.
pub enum Policed {
    /// Pass or drop, counted under this reason.
    Verdict(Reason),
    /// A SYN from a source the table does not hold, to a port in SYN-cookie mode, past the
    /// allow/deny lists and bans: answer it with a cookie (the source takes no slot until its
    /// ACK proves it is real).
    Answer,
    /// An ACK from a source the table does not hold, to a port in SYN-cookie mode, past the
    /// lists and bans: pass it only with a valid cookie (then [`admit`] it).
    CheckCookie,
}

/// What to do with a segment from a source the table does not hold (see `syncookie::decide`).
pub enum NewSource {
    /// Police it like any segment: the source takes a slot.
    Police,
    /// See [`Policed::Answer`].
    Answer,
    /// See [`Policed::CheckCookie`].
    CheckCookie,
}

#[inline(always)]
pub fn police<A: Address>(
    maps: &FamilyMaps<A>,
    address: A,
    flags: u8,
    limits: &Limits,
    events: &RingBuf,
    new_source: impl FnOnce() -> NewSource,
) -> Policed {
    let source = address.masked(&limits.prefixes);
    let first = first_slot(source.hash(&limits.seeds));
    let slot = match find(maps.sources, first, source) {
        Some(slot) => slot,
        None => {
            let answer = match new_source() {
                NewSource::Police => None,
                NewSource::Answer => Some(Policed::Answer),
                NewSource::CheckCookie => Some(Policed::CheckCookie),
            };
            if let Some(answer) = answer {
                match screen(maps, address, source, limits) {
                    Screened::Unlisted => return answer,
                    Screened::Dropped(reason) => return Policed::Verdict(reason),
                    // Never answered for: its SYNs go to the kernel like all its traffic.
                    Screened::Allowlisted => {}
                }
            }
            match claim(maps.sources, first, source, limits) {
                Some(slot) => slot,
                None => return Policed::Verdict(Reason::Pass), // unreachable: every set lies inside the table
            }
        }
    };
    Policed::Verdict(police_slot(maps, address, source, slot, flags, limits, events))
}

/// A source whose ACK carried a valid cookie: it takes a slot (or finds one another CPU just
/// gave it) and is policed like any other from now on.
#[inline(always)]
pub fn admit<A: Address>(
    maps: &FamilyMaps<A>,
    address: A,
    flags: u8,
    limits: &Limits,
    events: &RingBuf,
) -> Reason {
    let source = address.masked(&limits.prefixes);
    let first = first_slot(source.hash(&limits.seeds));
    let slot = match find(maps.sources, first, source) {
        Some(slot) => slot,
        None => match claim(maps.sources, first, source, limits) {
            Some(slot) => slot,
            None => return Reason::Pass,
        },
    };
    police_slot(maps, address, source, slot, flags, limits, events)
}

/// The per-source policy of a source that has its slot.
#[inline(always)]
fn police_slot<A: Address>(
    maps: &FamilyMaps<A>,
    address: A,
    source: A,
    slot: *mut SourceState<A>,
    flags: u8,
    limits: &Limits,
    events: &RingBuf,
) -> Reason {
    // SAFETY: array slots stay valid while the program runs; concurrent updates from other
    // CPUs are tolerated (see `SourceState`).
    let state = unsafe { &mut *slot };
    // Userspace keeps the generation within 32 bits (see `Limits::generation`), so the slot's
    // compares as is (no truncation to do per packet).
    if u64::from(state.generation) != limits.generation {
        look_up_ban(maps, source, state, limits);
        look_up_lists(maps, address, state, limits);
        state.generation = limits.generation as u32;
    } else if limits.lists & maps.fine_bit != 0 && state.listed_addr != address {
        look_up_lists(maps, address, state, limits);
    }
    match state.listed {
        LISTED_ALLOW => return Reason::PassAllowlisted,
        LISTED_DENY => return Reason::DropDenylisted,
        _ => {}
    }
    let now = catch_up(state, limits);
    if state.banned_until_ns > now || state.listed_ban_until_ns > now {
        return Reason::DropBanned;
    }
    let reason = charge(state, flags);
    if reason != Reason::Pass {
        strike(maps, source, state, limits, now, reason, events);
    }
    reason
}

/// What the allow/deny tries and the ban map say about a source the table does not hold.
enum Screened {
    Allowlisted,
    Dropped(Reason),
    Unlisted,
}

/// Looks a source without a slot up in the tries and the ban map (those holding entries), in
/// the order a slot's cached answers are applied. Kernel-decided bans live in slots, so a
/// source without one has none.
#[inline(always)]
fn screen<A: Address>(maps: &FamilyMaps<A>, address: A, source: A, limits: &Limits) -> Screened {
    if limits.lists & maps.allow_bit != 0 && address.listed_in(maps.allow) {
        return Screened::Allowlisted;
    }
    if limits.lists & maps.deny_bit != 0 && address.listed_in(maps.deny) {
        return Screened::Dropped(Reason::DropDenylisted);
    }
    if limits.lists & maps.bans_bit != 0 {
        // SAFETY: the value is copied out at once; bans are only ever written whole.
        let until = unsafe { maps.bans.get(source) }.map_or(0, |ban| ban.until_ns);
        if until > coarse_now() {
            return Screened::Dropped(Reason::DropBanned);
        }
    }
    Screened::Unlisted
}

/// Gives a source the table does not hold a slot of its set: every bucket full (so its first
/// segment passes), nothing looked up yet.
#[inline(always)]
fn claim<A: Copy>(
    table: &Array<SourceState<A>>,
    first: u32,
    key: A,
    limits: &Limits,
) -> Option<*mut SourceState<A>> {
    let now = coarse_now();
    let slot = victim(table, first, now)?;
    // Field by field, the two zeroed neighbours as volatile stores: LLVM merges adjacent zero
    // stores into a call to memset, which the BPF target links as a byte loop.
    // SAFETY: as in `police`.
    unsafe {
        (*slot).addr = key;
        (*slot).listed_addr = key;
        (*slot).generation = 0;
        (*slot).listed = LISTED_NONE;
        (*slot).syn_tokens = limits.syn.capacity;
        (*slot).packet_tokens = limits.packet.capacity;
        (*slot).strike_tokens = limits.strikes.capacity;
        (*slot).last_ns = now;
        (*slot).tick = tick();
        (&raw mut (*slot).banned_until_ns).write_volatile(0);
        (&raw mut (*slot).listed_ban_until_ns).write_volatile(0);
    }
    Some(slot)
}

/// Looks the network up in the ban map (only when it holds entries) and caches the answer in its
/// slot until userspace changes the maps (`generation`).
#[inline(always)]
fn look_up_ban<A: Address>(maps: &FamilyMaps<A>, source: A, state: &mut SourceState<A>, limits: &Limits) {
    state.listed_ban_until_ns = if limits.lists & maps.bans_bit != 0 {
        // SAFETY: the value is copied out at once; bans are only ever written whole.
        unsafe { maps.bans.get(source) }.map_or(0, |ban| ban.until_ns)
    } else {
        0
    };
}

/// Looks the full address up in the allow/deny tries (only those holding entries) and caches
/// the answer in its slot, with the address it is for.
#[inline(always)]
fn look_up_lists<A: Address>(maps: &FamilyMaps<A>, address: A, state: &mut SourceState<A>, limits: &Limits) {
    state.listed = if limits.lists & maps.allow_bit != 0 && address.listed_in(maps.allow) {
        LISTED_ALLOW
    } else if limits.lists & maps.deny_bit != 0 && address.listed_in(maps.deny) {
        LISTED_DENY
    } else {
        LISTED_NONE
    };
    state.listed_addr = address;
}

/// Index of the first slot of the set a hash picks (its top `SOURCE_SET_BITS` bits).
#[inline(always)]
fn first_slot(hash: u64) -> u32 {
    ((hash >> (64 - SOURCE_SET_BITS)) as u32) * SOURCE_WAYS
}

/// The slot holding `key` in the set starting at `first`.
#[inline(always)]
fn find<A: Copy + PartialEq>(
    table: &Array<SourceState<A>>,
    first: u32,
    key: A,
) -> Option<*mut SourceState<A>> {
    for way in 0..SOURCE_WAYS {
        let slot = table.get_ptr_mut(first + way)?;
        // SAFETY: a valid slot pointer; reading a field another CPU may be writing is tolerated.
        if unsafe { (*slot).generation != 0 && (*slot).addr == key } {
            return Some(slot);
        }
    }
    None
}

/// The slot a new source takes in the set starting at `first`: a free one, else the one seen
/// longest ago, keeping sources the kernel has banned as long as another slot can go.
#[inline(always)]
fn victim<A>(table: &Array<SourceState<A>>, first: u32, now: u64) -> Option<*mut SourceState<A>> {
    let mut chosen = None;
    let mut chosen_age = u64::MAX;
    for way in 0..SOURCE_WAYS {
        let Some(slot) = table.get_ptr_mut(first + way) else {
            continue;
        };
        // SAFETY: as in `find`.
        let (generation, tick, banned_until_ns) =
            unsafe { ((*slot).generation, (*slot).tick, (*slot).banned_until_ns) };
        let age = if generation == 0 {
            0
        } else if banned_until_ns > now {
            u64::MAX
        } else {
            tick
        };
        if chosen.is_none() || age < chosen_age {
            chosen = Some(slot);
            chosen_age = age;
        }
    }
    chosen
}

/// Refills the buckets for the time since the source's last refill, at most once per clock
/// tick (the coarse clock does not move in between); returns the time now.
#[inline(always)]
fn catch_up<A>(state: &mut SourceState<A>, limits: &Limits) -> u64 {
    let tick = tick();
    if state.tick == tick {
        return state.last_ns;
    }
    let now = coarse_now();
    let elapsed = now.saturating_sub(state.last_ns);
    state.last_ns = now;
    state.tick = tick;
    refill(&mut state.syn_tokens, &limits.syn, elapsed);
    refill(&mut state.packet_tokens, &limits.packet, elapsed);
    refill(&mut state.strike_tokens, &limits.strikes, elapsed);
    now
}

/// Charges this segment to the bucket of its kind (see the module docs); returns the verdict.
#[inline(always)]
fn charge<A>(state: &mut SourceState<A>, flags: u8) -> Reason {
    if flags & (TCP_ACK | TCP_RST) != 0 {
        return Reason::Pass;
    }
    let (tokens, over) = if flags & TCP_SYN != 0 {
        (&mut state.syn_tokens, Reason::DropSynRate)
    } else {
        (&mut state.packet_tokens, Reason::DropPacketRate)
    };
    if *tokens < NANOTOKENS {
        return over;
    }
    *tokens -= NANOTOKENS;
    Reason::Pass
}

/// Counts an over-limit drop: spends a strike, or bans the source when none is left.
#[inline(always)]
fn strike<A: Address>(
    maps: &FamilyMaps<A>,
    source: A,
    state: &mut SourceState<A>,
    limits: &Limits,
    now: u64,
    reason: Reason,
    events: &RingBuf,
) {
    if state.strike_tokens >= NANOTOKENS {
        state.strike_tokens -= NANOTOKENS;
        return;
    }
    state.strike_tokens = limits.strikes.capacity;
    state.banned_until_ns = now.saturating_add(limits.ban_ns);
    let prefix_len = source.prefix_len(&limits.prefixes);
    report_ban(maps, source, prefix_len, state.banned_until_ns, reason, events);
}

/// Adds the tokens earned in `elapsed` ns, up to the bucket's capacity.
#[inline(always)]
fn refill(tokens: &mut u64, limit: &BucketLimit, elapsed: u64) {
    // At most `fill_ns` counts: `fill_ns * rate <= capacity`, so nothing overflows.
    let elapsed = elapsed.min(limit.fill_ns);
    *tokens = (*tokens + elapsed * limit.rate).min(limit.capacity);
}

/// The kernel's `jiffies`. The verifier inlines `bpf_jiffies64` into a single load, so this
/// costs nothing, unlike a clock helper call (about 17 ns here).
#[inline(always)]
fn tick() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_jiffies64() }
}

/// CLOCK_MONOTONIC ns at tick resolution (1-10 ms): plenty for token buckets and ban expiry,
/// and cheaper than `bpf_ktime_get_ns`. Read only when the tick moved.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Tells userspace about a ban the kernel just decided.
#[inline(always)]
fn report_ban<A: Address>(
    maps: &FamilyMaps<A>,
    source: A,
    prefix_len: u16,
    until_ns: u64,
    reason: Reason,
    events: &RingBuf,
) {
    if let Some(mut entry) = events.reserve::<BanEvent>(0) {
        entry.write(BanEvent {
            until_ns,
            addr: source.event_bytes(),
            family: maps.family,
            prefix_len,
            reason: reason as u32,
        });
        entry.submit(0);
    }
    // A full ring buffer loses the event, never the ban (it is already in the source's state).
}

/// A source address, as parsing reads it and the source tables store it.
pub trait Address: Copy + PartialEq {
    /// The address as the tries key it: the octets as on the wire.
    type Wire: Copy;

    /// The network of this address under `prefixes` (its host bits cleared).
    fn masked(&self, prefixes: &SourcePrefixes) -> Self;

    /// The prefix length `prefixes` gives this family.
    fn prefix_len(&self, prefixes: &SourcePrefixes) -> u16;

    /// Multiply-shift hash keyed by random odd multipliers (`Limits::seeds`): without the
    /// seeds, nobody can choose addresses that land in one set. The set is taken from the top
    /// bits.
    fn hash(&self, seeds: &[u64; 2]) -> u64;

    /// The 16 octets of a [`BanEvent`].
    fn event_bytes(&self) -> [u8; 16];

    /// Whether some entry of `trie` contains the (full) address.
    fn listed_in(&self, trie: &LpmTrie<Self::Wire, u8>) -> bool;
}

// LPM keys are built on the stack, where the verifier insists on aligned access whatever the
// CPU (and LLVM, told that misaligned access is fine, writes them with the widest stores it
// can). These place a key so that those stores are aligned: the IPv4 key (prefix length and
// address) as one 8-byte word, the IPv6 address at offset 8, after the prefix length at 4.
#[repr(C, align(8))]
struct V4TrieKey(Key<u32>);

#[repr(C, align(8))]
struct V6TrieKey {
    _align: u32,
    key: Key<[u8; 16]>,
}

/// IPv4: the four octets as on the wire, read as a native `u32`.
impl Address for u32 {
    type Wire = u32;

    #[inline(always)]
    fn masked(&self, prefixes: &SourcePrefixes) -> u32 {
        *self & prefixes.v4_mask
    }

    #[inline(always)]
    fn prefix_len(&self, prefixes: &SourcePrefixes) -> u16 {
        prefixes.v4_len
    }

    #[inline(always)]
    fn hash(&self, seeds: &[u64; 2]) -> u64 {
        u64::from(*self).wrapping_mul(seeds[0])
    }

    #[inline(always)]
    fn event_bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        let octets = self.to_ne_bytes();
        bytes[0] = octets[0];
        bytes[1] = octets[1];
        bytes[2] = octets[2];
        bytes[3] = octets[3];
        bytes
    }

    #[inline(always)]
    fn listed_in(&self, trie: &LpmTrie<u32, u8>) -> bool {
        let key = V4TrieKey(Key::new(32, *self));
        trie.get(&key.0).is_some()
    }
}

/// IPv6: the 16 octets as on the wire, read as two native `u64` (two compares, not 16).
impl Address for [u64; 2] {
    type Wire = [u8; 16];

    #[inline(always)]
    fn masked(&self, prefixes: &SourcePrefixes) -> [u64; 2] {
        [self[0] & prefixes.v6_mask[0], self[1] & prefixes.v6_mask[1]]
    }

    #[inline(always)]
    fn prefix_len(&self, prefixes: &SourcePrefixes) -> u16 {
        prefixes.v6_len
    }

    #[inline(always)]
    fn hash(&self, seeds: &[u64; 2]) -> u64 {
        self[0]
            .wrapping_mul(seeds[0])
            .wrapping_add(self[1].wrapping_mul(seeds[1]))
    }

    #[inline(always)]
    fn event_bytes(&self) -> [u8; 16] {
        octets(self)
    }

    #[inline(always)]
    fn listed_in(&self, trie: &LpmTrie<[u8; 16], u8>) -> bool {
        let key = V6TrieKey {
            _align: 0,
            key: Key::new(128, octets(self)),
        };
        trie.get(&key.key).is_some()
    }
}

/// The 16 octets of an IPv6 address kept as two native words.
#[inline(always)]
fn octets(words: &[u64; 2]) -> [u8; 16] {
    let [a, b, c, d, e, f, g, h] = words[0].to_ne_bytes();
    let [i, j, k, l, m, n, o, p] = words[1].to_ne_bytes();
    [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p]
}

//! Typed handles on the shield's BPF maps, and every read and write userspace does on them:
//! bans, allow/deny CIDRs, the limits and protected ports, the counters.
//!
//! Bans live in two places: the ones userspace decides (operator, L7 abuse) in the `BANNED_*`
//! hash maps, the ones the kernel decides in the source's state (`SOURCES_*`). Listing, checking
//! and lifting bans here covers both. Both are kept per source network ([`SourcePrefix`]): an
//! address given here stands for the network of the prefix lengths the kernel uses now (read
//! from its limits), so banning `2001:db8::1` bans `2001:db8::/64` at the default `/64`.
//!
//! The same [`ShieldMaps`] serves the relay (maps taken from the object it loaded) and the CLI
//! (maps opened from their pins under `/sys/fs/bpf/sluice/<instance>/`), so both edit a running
//! shield the same way.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use aya::{Ebpf, Pod};
use proxy_common::{
    BanEntry, BucketLimit, CidrOrigin, Counter, LIST_ALLOW_V4, LIST_ALLOW_V6, LIST_BANS_V4, LIST_BANS_V6,
    LIST_DENY_V4, LIST_DENY_V6, LIST_FINE_V4, LIST_FINE_V6, Limits, MAP_ALLOW_V4, MAP_ALLOW_V6,
    MAP_BANNED_V4, MAP_BANNED_V6, MAP_COUNTERS, MAP_DENY_V4, MAP_DENY_V6, MAP_POLICY, MAP_SOURCES_V4,
    MAP_SOURCES_V6, MAP_SYN_FLOOD, Policy, PortSet, Reason, SYNCOOKIES_ALWAYS, SynFlood, SyncookiePolicy,
};

use super::ShieldError;
use super::clock::monotonic_now_ns;
use super::sources::SourceTable;
use crate::cidr::Cidr;
use crate::prefix::{PrefixLengths, SourcePrefix};

/// Which list a CIDR is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidrList {
    /// `ALLOW_*`: sources that bypass every limit and ban.
    Allow,
    /// `DENY_*`: sources whose packets to protected ports are dropped.
    Deny,
}

impl CidrList {
    /// How the CLI names the list: `allow` or `deny`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One entry of an allow/deny list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrEntry {
    /// The list it is on.
    pub list: CidrList,
    /// The network (the trie's key).
    pub cidr: Cidr,
    /// Whether the config file or a runtime edit (CLI) put it there.
    pub origin: CidrOrigin,
}

/// One ban, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanRecord {
    /// The banned source network.
    pub source: SourcePrefix,
    /// Time left; `None` for a ban without expiry.
    pub remaining: Option<Duration>,
}

/// What the kernel enforces per source, in config units (see `[shield]` in relay.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// New connections: (per second, burst).
    pub syn: (u32, u32),
    /// Segments with neither ACK nor RST other than an opening SYN: (per second, burst).
    pub packet: (u32, u32),
    /// Over-limit drops a source may have in hand before the next one bans it...
    pub ban_threshold: u32,
    /// ...forgiven at this many per second.
    pub strike_decay_rate: u32,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// What makes a source.
    pub prefixes: PrefixLengths,
}

/// The limits and ports the kernel enforces, in the kernel's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The token buckets and ban rule (with the ports, the `POLICY` map's one entry).
    pub limits: Limits,
    /// The destination ports the program polices.
    pub ports: PortSet,
}

impl KernelPolicy {
    /// The policy for `ports` under `limits`, answering SYN floods as `syncookies` says.
    pub fn new(ports: &[u16], limits: &SourceLimits, syncookies: SyncookiePolicy) -> Self {
        let mut set = PortSet::default();
        for &port in ports {
            set.insert(port);
        }
        let bucket = |(rate, burst): (u32, u32)| BucketLimit::new(u64::from(rate), u64::from(burst));
        Self {
            limits: Limits {
                syn: bucket(limits.syn),
                packet: bucket(limits.packet),
                strikes: bucket((limits.strike_decay_rate, limits.ban_threshold)),
                ban_ns: u64::try_from(limits.ban_duration.as_nanos()).unwrap_or(u64::MAX),
                // Filled in by `ShieldMaps::set_policy`: lists from the maps, seeds drawn once,
                // the next generation.
                lists: 0,
                seeds: [0; 2],
                generation: 0,
                prefixes: limits.prefixes.to_kernel(),
                syncookies,
            },
            ports: set,
        }
    }
}

/// The maps userspace edits. Field names follow the kernel's map names.
pub struct ShieldMaps {
    bans_v4: HashMap<MapData, u32, BanEntry>,
    bans_v6: HashMap<MapData, [u8; 16], BanEntry>,
    sources_v4: SourceTable<u32>,
    sources_v6: SourceTable<[u64; 2]>,
    allow_v4: LpmTrie<MapData, u32, u8>,
    allow_v6: LpmTrie<MapData, [u8; 16], u8>,
    deny_v4: LpmTrie<MapData, u32, u8>,
    deny_v6: LpmTrie<MapData, [u8; 16], u8>,
    policy: Array<MapData, Policy>,
    counters: PerCpuArray<MapData, Counter>,
    syn_flood: Array<MapData, SynFlood>,
}

/// Whether a port's SYNs are answered with the program's SYN cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortCookies {
    /// The destination port.
    pub port: u16,
    /// In SYN-cookie mode now.
    pub active: bool,
    /// SYNs from sources not seen before in the second counted last.
    pub new_source_syns: u64,
}

impl ShieldMaps {
    /// Takes the maps out of a loaded object (the program keeps its own references), pinning
    /// each under `pin_dir` first when given.
    pub(super) fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self, ShieldError> {
        let mut take = |name: &'static str| -> Result<Map, ShieldError> {
            let map = ebpf
                .take_map(name)
                .ok_or(ShieldError::Missing { kind: "map", name })?;
            if let Some(dir) = pin_dir {
                map.pin(dir.join(name)).map_err(|source| ShieldError::Pin {
                    path: dir.join(name),
                    source,
                })?;
            }
            Ok(map)
        };
        Self::from_maps(&mut take)
    }

    /// Opens the maps a running relay pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, ShieldError> {
        let mut open = |name: &'static str| -> Result<Map, ShieldError> {
            let data = MapData::from_pin(dir.join(name)).map_err(|source| ShieldError::OpenPinned {
                path: dir.join(name),
                source,
            })?;
            Ok(Map::from_map_data(data)?)
        };
        Self::from_maps(&mut open)
    }

    fn from_maps(get: &mut dyn FnMut(&'static str) -> Result<Map, ShieldError>) -> Result<Self, ShieldError> {
        Ok(Self {
            bans_v4: get(MAP_BANNED_V4)?.try_into()?,
            bans_v6: get(MAP_BANNED_V6)?.try_into()?,
            sources_v4: SourceTable::new(get(MAP_SOURCES_V4)?, MAP_SOURCES_V4)?,
            sources_v6: SourceTable::new(get(MAP_SOURCES_V6)?, MAP_SOURCES_V6)?,
            allow_v4: get(MAP_ALLOW_V4)?.try_into()?,
            allow_v6: get(MAP_ALLOW_V6)?.try_into()?,
            deny_v4: get(MAP_DENY_V4)?.try_into()?,
            deny_v6: get(MAP_DENY_V6)?.try_into()?,
            policy: get(MAP_POLICY)?.try_into()?,
            counters: get(MAP_COUNTERS)?.try_into()?,
            syn_flood: get(MAP_SYN_FLOOD)?.try_into()?,
        })
    }

    /// Writes limits and protected ports (one map update). The source-table seeds are drawn
    /// once, the first time, and kept: new seeds would move every source to another set and
    /// lose its state. New prefix lengths apply to packets from then on; sources and bans
    /// already recorded stay keyed by the old ones.
    pub fn set_policy(&mut self, policy: &KernelPolicy) -> Result<(), ShieldError> {
        let current = self.policy.get(&0, 0)?.limits;
        let limits = Limits {
            lists: self.list_bits(PrefixLengths::from_kernel(&policy.limits.prefixes))?,
            seeds: if current.seeds == [0; 2] {
                random_seeds()?
            } else {
                current.seeds
            },
            generation: next_generation(current.generation),
            ..policy.limits
        };
        self.policy.set(
            0,
            Policy {
                limits,
                ports: policy.ports,
            },
            0,
        )?;
        Ok(())
    }

    /// Which tries and ban maps hold entries, and which families have an allow/deny entry
    /// longer than their source prefix under `prefixes`, as `Limits::lists` bits.
    fn list_bits(&self, prefixes: PrefixLengths) -> Result<u64, ShieldError> {
        let allow_v4 = extent(&self.allow_v4, prefixes.v4)?;
        let allow_v6 = extent(&self.allow_v6, prefixes.v6)?;
        let deny_v4 = extent(&self.deny_v4, prefixes.v4)?;
        let deny_v6 = extent(&self.deny_v6, prefixes.v6)?;
        let mut bits = 0;
        for (bit, set) in [
            (LIST_ALLOW_V4, allow_v4.any),
            (LIST_ALLOW_V6, allow_v6.any),
            (LIST_DENY_V4, deny_v4.any),
            (LIST_DENY_V6, deny_v6.any),
            (LIST_BANS_V4, self.bans_v4.keys().next().is_some()),
            (LIST_BANS_V6, self.bans_v6.keys().next().is_some()),
            (LIST_FINE_V4, allow_v4.finer || deny_v4.finer),
            (LIST_FINE_V6, allow_v6.finer || deny_v6.finer),
        ] {
            if set {
                bits |= bit;
            }
        }
        Ok(bits)
    }

    /// After a change to the tries or ban maps: tells the kernel which are worth a lookup.
    fn refresh_lists(&mut self) -> Result<(), ShieldError> {
        let lists = self.list_bits(self.prefixes()?)?;
        self.announce(|_| lists)
    }

    /// Writes `Limits::lists` as `lists` makes it from the current bits, and bumps the
    /// generation so every source's cached lookups (see `SourceState`) are redone.
    fn announce(&mut self, lists: impl FnOnce(u64) -> u64) -> Result<(), ShieldError> {
        let mut policy = self.policy.get(&0, 0)?;
        policy.limits.lists = lists(policy.limits.lists);
        policy.limits.generation = next_generation(policy.limits.generation);
        self.policy.set(0, policy, 0)?;
        Ok(())
    }

    /// The limits and ports in force.
    pub fn policy(&self) -> Result<KernelPolicy, ShieldError> {
        let Policy { limits, ports } = self.policy.get(&0, 0)?;
        Ok(KernelPolicy { limits, ports })
    }

    /// The prefix lengths the kernel keys sources by.
    pub fn prefixes(&self) -> Result<PrefixLengths, ShieldError> {
        Ok(PrefixLengths::from_kernel(
            &self.policy.get(&0, 0)?.limits.prefixes,
        ))
    }

    /// The source `address` belongs to, as the kernel keys it.
    pub fn source_of(&self, address: IpAddr) -> Result<SourcePrefix, ShieldError> {
        Ok(self.prefixes()?.of(address))
    }

    /// Bans the source `address` belongs to for `duration` (`None`: until unbanned); returns
    /// that source. When the ban map is full, expired bans make room; failing that, the ban is
    /// refused (`E2BIG`) rather than evicting another.
    pub fn ban(&mut self, address: IpAddr, duration: Option<Duration>) -> Result<SourcePrefix, ShieldError> {
        let source = self.source_of(address)?;
        let until_ns = match duration {
            None => u64::MAX,
            Some(d) => monotonic_now_ns()?.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        };
        let entry = BanEntry { until_ns };
        if let Err(e) = self.insert_ban(source, entry) {
            if !is_full(&e) {
                return Err(e.into());
            }
            self.remove_expired_bans()?;
            self.insert_ban(source, entry)?;
        }
        // The map holds an entry now: no need to look at every map for the bits.
        let bit = if source.network().is_ipv4() {
            LIST_BANS_V4
        } else {
            LIST_BANS_V6
        };
        self.announce(|lists| lists | bit)?;
        Ok(source)
    }

    fn insert_ban(&mut self, source: SourcePrefix, entry: BanEntry) -> Result<(), MapError> {
        match source.network() {
            IpAddr::V4(v4) => self.bans_v4.insert(v4_key(v4), entry, 0),
            IpAddr::V6(v6) => self.bans_v6.insert(v6.octets(), entry, 0),
        }
    }

    fn remove_expired_bans(&mut self) -> Result<(), ShieldError> {
        let now = monotonic_now_ns()?;
        remove_expired(&mut self.bans_v4, now)?;
        remove_expired(&mut self.bans_v6, now)
    }

    /// Lifts the ban on the source `address` belongs to, wherever it lives; returns whether
    /// there was one.
    pub fn unban(&mut self, address: IpAddr) -> Result<bool, ShieldError> {
        let now = monotonic_now_ns()?;
        let (listed, kernel) = match self.source_of(address)?.network() {
            IpAddr::V4(v4) => (
                absent_ok(self.bans_v4.remove(&v4_key(v4)))?,
                self.sources_v4.lift_ban(v4_key(v4), now),
            ),
            IpAddr::V6(v6) => (
                absent_ok(self.bans_v6.remove(&v6.octets()))?,
                self.sources_v6.lift_ban(v6_slot_key(v6), now),
            ),
        };
        if listed {
            self.refresh_lists()?;
        }
        Ok(listed || kernel)
    }

    /// Whether the source `address` belongs to is banned right now, by userspace or by the
    /// kernel.
    pub fn is_banned(&self, address: IpAddr) -> Result<bool, ShieldError> {
        let now = monotonic_now_ns()?;
        let (listed, kernel) = match self.source_of(address)?.network() {
            IpAddr::V4(v4) => (
                self.bans_v4.get(&v4_key(v4), 0),
                self.sources_v4.banned_until(v4_key(v4), now),
            ),
            IpAddr::V6(v6) => (
                self.bans_v6.get(&v6.octets(), 0),
                self.sources_v6.banned_until(v6_slot_key(v6), now),
            ),
        };
        let listed = found(listed)?.is_some_and(|entry| entry.until_ns > now);
        Ok(listed || kernel.is_some())
    }

    /// Every ban still in force, IPv4 first; a source banned both ways is listed once, with the
    /// ban that lasts longer.
    pub fn bans(&self) -> Result<Vec<BanRecord>, ShieldError> {
        let now = monotonic_now_ns()?;
        let prefixes = self.prefixes()?;
        let mut until = std::collections::BTreeMap::<SourcePrefix, u64>::new();
        let mut add = |network: IpAddr, until_ns: u64| {
            if until_ns > now {
                let longest = until.entry(prefixes.of(network)).or_default();
                *longest = (*longest).max(until_ns);
            }
        };
        for item in self.bans_v4.iter() {
            let (key, entry) = item?;
            add(IpAddr::V4(Ipv4Addr::from(key.to_ne_bytes())), entry.until_ns);
        }
        for (key, until_ns) in self.sources_v4.bans(now) {
            add(IpAddr::V4(Ipv4Addr::from(key.to_ne_bytes())), until_ns);
        }
        for item in self.bans_v6.iter() {
            let (key, entry) = item?;
            add(IpAddr::V6(Ipv6Addr::from(key)), entry.until_ns);
        }
        for (key, until_ns) in self.sources_v6.bans(now) {
            add(IpAddr::V6(v6_from_slot_key(key)), until_ns);
        }
        Ok(until
            .into_iter()
            .map(|(source, until_ns)| BanRecord {
                source,
                remaining: (until_ns != u64::MAX).then(|| Duration::from_nanos(until_ns - now)),
            })
            .collect())
    }

    /// Puts `cidr` on `list` (moving it off the other list, if it was there).
    pub fn add_cidr(&mut self, list: CidrList, cidr: Cidr, origin: CidrOrigin) -> Result<(), ShieldError> {
        self.insert_cidr(list, cidr, origin)?;
        self.refresh_lists()
    }

    fn insert_cidr(&mut self, list: CidrList, cidr: Cidr, origin: CidrOrigin) -> Result<(), ShieldError> {
        let other = match list {
            CidrList::Allow => CidrList::Deny,
            CidrList::Deny => CidrList::Allow,
        };
        self.remove_from(other, cidr)?;
        let prefix = u32::from(cidr.prefix());
        match (list, cidr.network()) {
            (CidrList::Allow, IpAddr::V4(v4)) => {
                self.allow_v4
                    .insert(&Key::new(prefix, v4_key(v4)), origin as u8, 0)?
            }
            (CidrList::Allow, IpAddr::V6(v6)) => {
                self.allow_v6
                    .insert(&Key::new(prefix, v6.octets()), origin as u8, 0)?
            }
            (CidrList::Deny, IpAddr::V4(v4)) => {
                self.deny_v4
                    .insert(&Key::new(prefix, v4_key(v4)), origin as u8, 0)?
            }
            (CidrList::Deny, IpAddr::V6(v6)) => {
                self.deny_v6
                    .insert(&Key::new(prefix, v6.octets()), origin as u8, 0)?
            }
        }
        Ok(())
    }

    /// Takes `cidr` off whichever list has it; returns whether one did.
    pub fn remove_cidr(&mut self, cidr: Cidr) -> Result<bool, ShieldError> {
        let allowed = self.remove_from(CidrList::Allow, cidr)?;
        let denied = self.remove_from(CidrList::Deny, cidr)?;
        self.refresh_lists()?;
        Ok(allowed || denied)
    }

    fn remove_from(&mut self, list: CidrList, cidr: Cidr) -> Result<bool, ShieldError> {
        let prefix = u32::from(cidr.prefix());
        let result = match (list, cidr.network()) {
            (CidrList::Allow, IpAddr::V4(v4)) => self.allow_v4.remove(&Key::new(prefix, v4_key(v4))),
            (CidrList::Allow, IpAddr::V6(v6)) => self.allow_v6.remove(&Key::new(prefix, v6.octets())),
            (CidrList::Deny, IpAddr::V4(v4)) => self.deny_v4.remove(&Key::new(prefix, v4_key(v4))),
            (CidrList::Deny, IpAddr::V6(v6)) => self.deny_v6.remove(&Key::new(prefix, v6.octets())),
        };
        absent_ok(result)
    }

    /// Every allow/deny entry.
    pub fn cidrs(&self) -> Result<Vec<CidrEntry>, ShieldError> {
        let mut entries = Vec::new();
        collect(
            &self.allow_v4,
            CidrList::Allow,
            |k| IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())),
            &mut entries,
        )?;
        collect(
            &self.allow_v6,
            CidrList::Allow,
            |k| IpAddr::V6(Ipv6Addr::from(k)),
            &mut entries,
        )?;
        collect(
            &self.deny_v4,
            CidrList::Deny,
            |k| IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())),
            &mut entries,
        )?;
        collect(
            &self.deny_v6,
            CidrList::Deny,
            |k| IpAddr::V6(Ipv6Addr::from(k)),
            &mut entries,
        )?;
        Ok(entries)
    }

    /// Makes the configured entries exactly `allow` and `deny`; runtime entries stay unless the
    /// config now lists the same network.
    pub fn sync_cidrs(&mut self, allow: &[Cidr], deny: &[Cidr]) -> Result<(), ShieldError> {
        for entry in self.cidrs()? {
            if entry.origin == CidrOrigin::Config {
                self.remove_from(entry.list, entry.cidr)?;
            }
        }
        for &cidr in deny {
            self.insert_cidr(CidrList::Deny, cidr, CidrOrigin::Config)?;
        }
        // Allow last: a network on both lists ends up allowed (allow wins).
        for &cidr in allow {
            self.insert_cidr(CidrList::Allow, cidr, CidrOrigin::Config)?;
        }
        self.refresh_lists()
    }

    /// Whether each protected port is in SYN-cookie mode now.
    pub fn port_cookies(&self) -> Result<Vec<PortCookies>, ShieldError> {
        let Policy { limits, ports } = self.policy.get(&0, 0)?;
        let now = monotonic_now_ns()?;
        let always = limits.syncookies.mode == SYNCOOKIES_ALWAYS;
        (1..=u16::MAX)
            .filter(|&port| ports.contains(port))
            .map(|port| {
                let flood = self.syn_flood.get(&u32::from(port), 0)?;
                Ok(PortCookies {
                    port,
                    active: always || flood.cookies_until_ns > now,
                    new_source_syns: flood.new_source_syns,
                })
            })
            .collect()
    }

    /// Sums every CPU's counters for each verdict reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, ShieldError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = self.counters.get(&(reason as u32), 0)?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
    }
}

/// An IPv4 address as the kernel keys it: the four octets in wire order, read as a native u32.
pub(super) fn v4_key(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

/// An IPv6 address as the source table stores it: its octets in wire order, as two native u64.
fn v6_slot_key(address: Ipv6Addr) -> [u64; 2] {
    let octets = address.octets();
    let (first, second) = octets.split_at(8);
    [
        u64::from_ne_bytes(first.try_into().expect("8 octets")),
        u64::from_ne_bytes(second.try_into().expect("8 octets")),
    ]
}

fn v6_from_slot_key(key: [u64; 2]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets[..8].copy_from_slice(&key[0].to_ne_bytes());
    octets[8..].copy_from_slice(&key[1].to_ne_bytes());
    Ipv6Addr::from(octets)
}

/// The generation after `current`, within `1..=u32::MAX` (the kernel keeps 32 bits per slot,
/// and 0 marks a free slot).
fn next_generation(current: u64) -> u64 {
    current % u64::from(u32::MAX) + 1
}

/// Random odd multipliers for the source-table hash, from the kernel's random pool (odd, so
/// the program need not make them so per packet).
fn random_seeds() -> Result<[u64; 2], ShieldError> {
    let mut bytes = [0u8; 16];
    // SAFETY: writes at most `bytes.len()` bytes into our buffer.
    let read = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if read != bytes.len() as isize {
        return Err(ShieldError::Random(std::io::Error::last_os_error()));
    }
    let mut seeds = [0u64; 2];
    for (seed, chunk) in seeds.iter_mut().zip(bytes.chunks_exact(8)) {
        *seed = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) | 1;
    }
    Ok(seeds)
}

fn found<V>(result: Result<V, MapError>) -> Result<Option<V>, ShieldError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What a trie holds, against a source prefix length.
struct Extent {
    /// Some entry.
    any: bool,
    /// Some entry longer than the prefix length.
    finer: bool,
}

fn extent<K: Pod>(trie: &LpmTrie<MapData, K, u8>, source_len: u8) -> Result<Extent, ShieldError> {
    let mut any = false;
    for key in trie.keys() {
        any = true;
        if key?.prefix_len() > u32::from(source_len) {
            return Ok(Extent { any, finer: true });
        }
    }
    Ok(Extent { any, finer: false })
}

/// Whether an insert failed because the map is full.
fn is_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// Removes the bans of one family's ban map that expired by `now`.
fn remove_expired<K: Pod>(bans: &mut HashMap<MapData, K, BanEntry>, now: u64) -> Result<(), ShieldError> {
    let expired: Vec<K> = bans
        .iter()
        .filter_map(|item| {
            item.ok()
                .filter(|(_, entry)| entry.until_ns <= now)
                .map(|(key, _)| key)
        })
        .collect();
    for key in expired {
        absent_ok(bans.remove(&key))?;
    }
    Ok(())
}

fn absent_ok(result: Result<(), MapError>) -> Result<bool, ShieldError> {
    match result {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        // Deleting a missing LPM entry reports ENOENT through the syscall error.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn collect<K: Pod>(
    trie: &LpmTrie<MapData, K, u8>,
    list: CidrList,
    address: impl Fn(K) -> IpAddr,
    into: &mut Vec<CidrEntry>,
) -> Result<(), ShieldError> {
    for item in trie.iter() {
        let (key, origin) = item?;
        let origin = if origin == CidrOrigin::Config as u8 {
            CidrOrigin::Config
        } else {
            CidrOrigin::Runtime
        };
        let prefix = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
        if let Ok(cidr) = Cidr::new(address(key.data()), prefix) {
            into.push(CidrEntry { list, cidr, origin });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_stay_within_32_bits_and_skip_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(1), 2);
        assert_eq!(next_generation(u64::from(u32::MAX) - 1), u64::from(u32::MAX));
        assert_eq!(next_generation(u64::from(u32::MAX)), 1);
    }

    #[test]
    fn ipv6_slot_keys_are_the_wire_octets_as_two_native_words() {
        let address: Ipv6Addr = "2001:db8::1:2:3".parse().unwrap();
        let key = v6_slot_key(address);
        let octets = address.octets();
        assert_eq!(key[0].to_ne_bytes(), octets[..8]);
        assert_eq!(key[1].to_ne_bytes(), octets[8..]);
        assert_eq!(v6_from_slot_key(key), address);
    }
}

//! [`RelayShield`]: the shield as one relay runs it.
//!
//! At start it tries XDP on the configured interfaces (`auto`: driver mode, else skb mode),
//! writes the config into the maps and pins them for the CLI, and spawns the ban-event reader.
//! When XDP is not possible (no interfaces configured, no privileges, an interface that
//! refuses) it says why and enforces the userspace [`ConnectionGate`] at accept time instead.
//! Either way the [`AbuseTracker`] and [`ScanTracker`] turn malformed input and SNI scanning
//! into bans, and
//! [`RelayShield::reload`] applies a new `[shield]` section. Kernel, gate and tracker key
//! sources by the same prefix lengths (see [`super::prefix`]), fixed for the relay's lifetime.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::relay::RelayConfig;
use crate::config::shield::{AttachMode, ShieldConfig};
use crate::prefix::SourcePrefix;

use super::abuse::{Abuse, AbuseTracker, Offender, ScanTracker};
use super::gate::{Admission, ConnectionGate};
use super::syncookies::{self, HostTcp};
use super::{
    BanNotice, BanRecord, KernelPolicy, Shield, ShieldError, ShieldMaps, SourceLimits, mode_name, pin,
};
use proxy_common::{SYNCOOKIES_ADAPTIVE, SYNCOOKIES_ALWAYS, SyncookiePolicy};

/// Whether a starting relay takes over the shield of the one it replaces (an upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// A fresh shield: pins left by an earlier relay are removed first.
    No,
    /// The running relay's pinned maps and links, if it has any.
    Yes,
}

/// Where the program is attached: `(interface, "driver" | "skb")`.
pub type Attachments = Vec<(String, &'static str)>;

/// Which enforcement is active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShieldMode {
    /// The XDP program is attached.
    Xdp {
        /// Every configured interface, with the mode it took.
        interfaces: Attachments,
    },
    /// XDP is off; the userspace gate enforces limits, for this reason.
    Fallback {
        /// Why XDP is off, for logs and the CLI: none configured, or the error that stopped it.
        reason: String,
    },
}

/// Counts a relay keeps about its shield.
#[derive(Debug, Default)]
pub struct ShieldStats {
    /// Bans the kernel decided (ring-buffer events received).
    pub kernel_bans: AtomicU64,
    /// Bans decided from repeated L7 rejections.
    pub abuse_bans: AtomicU64,
    /// Connections the userspace gate closed at accept.
    pub refused: AtomicU64,
}

/// The shield of one running relay.
pub struct RelayShield {
    /// Decided at start; the interfaces' attach modes are known once a taken-over shield is
    /// attached ([`RelayShield::take_over`]).
    mode: Mutex<ShieldMode>,
    /// The kernel polices (the mode is XDP): read on every accept.
    kernel_polices: bool,
    xdp: Mutex<Option<Shield>>,
    /// An adopted shield not attached yet: the listener ports its maps are synced for then.
    adopted: Mutex<Option<Vec<u16>>>,
    config: Mutex<ShieldConfig>,
    gate: ConnectionGate,
    abuse: AbuseTracker,
    scans: ScanTracker,
    stats: Arc<ShieldStats>,
    stop: CancellationToken,
    /// Where bans decided from L7 abuse are reported, to be shared with a fleet.
    decided: Mutex<Option<mpsc::Sender<DecidedBan>>>,
}

/// A ban this relay decided from what it saw at L7 (kernel rate-limit bans are not reported:
/// they stay local).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecidedBan {
    /// The banned source.
    pub source: SourcePrefix,
    /// For how long.
    pub duration: Duration,
    /// Why, for the fleet's record.
    pub why: &'static str,
}

impl RelayShield {
    /// Starts the shield for `config` (never fails: without XDP it falls back to userspace).
    /// Must run inside a tokio runtime (the ban-event reader is a task).
    pub fn start(config: &RelayConfig) -> Self {
        Self::start_as(config, Takeover::No)
    }

    /// [`RelayShield::start`], taking over the shield of the relay process this one replaces
    /// when `takeover` says so (its pinned maps and XDP links: bans and per-source state carry
    /// over, and no packet goes unpoliced in between).
    pub fn start_as(config: &RelayConfig, takeover: Takeover) -> Self {
        let shield_config = config.shield.clone();
        let stats = Arc::new(ShieldStats::default());
        let stop = CancellationToken::new();
        let mut adopted = None;
        let (mode, xdp) = if shield_config.interfaces.is_empty() {
            let reason = "no [shield] interfaces configured".to_owned();
            info!(%reason, "shield: userspace fallback ({reason})");
            (ShieldMode::Fallback { reason }, None)
        } else {
            let ports = config.listener_ports();
            match start_xdp(&shield_config, &ports, &instance_name(config), takeover) {
                Ok((mut shield, interfaces)) => {
                    if shield.owns_pins() {
                        for (interface, mode) in &interfaces {
                            info!(interface, mode, "shield: xdp on {interface} ({mode})");
                        }
                    } else {
                        info!(
                            "shield: the running relay's maps adopted; its links are taken over once it commits"
                        );
                        adopted = Some(ports);
                    }
                    if let Some(events) = shield.take_ban_events() {
                        tokio::spawn(events.run(stop.clone(), log_ban(Arc::clone(&stats))));
                    }
                    (ShieldMode::Xdp { interfaces }, Some(shield))
                }
                Err(e) => {
                    // With its causes: "bpf_link_create failed" alone does not say why.
                    let mut reason = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(inner) = cause {
                        reason.push_str(&format!(": {inner}"));
                        cause = inner.source();
                    }
                    warn!(%reason, "shield: userspace fallback ({reason})");
                    (ShieldMode::Fallback { reason }, None)
                }
            }
        };
        Self {
            kernel_polices: matches!(mode, ShieldMode::Xdp { .. }),
            mode: Mutex::new(mode),
            xdp: Mutex::new(xdp),
            adopted: Mutex::new(adopted),
            gate: ConnectionGate::new(&shield_config),
            abuse: AbuseTracker::new(&shield_config),
            scans: ScanTracker::new(&shield_config),
            config: Mutex::new(shield_config),
            stats,
            stop,
            decided: Mutex::new(None),
        }
    }

    /// Reports every ban decided from L7 abuse to `sink` from now on (a full sink drops the
    /// report, never the ban).
    pub fn report_decided_bans(&self, sink: mpsc::Sender<DecidedBan>) {
        *self.decided.lock().expect("shield lock") = Some(sink);
    }

    /// Which enforcement is active: decided at start, not changed by a reload.
    pub fn mode(&self) -> ShieldMode {
        self.mode.lock().expect("shield lock").clone()
    }

    /// The shield's counts since start, for the relay's metrics.
    pub fn stats(&self) -> &ShieldStats {
        &self.stats
    }

    /// Accept-time check: a connection not [`Admission::admitted`] is closed now; an
    /// [`Admission::Allowlisted`] one is exempt from per-source caps too. With XDP on, the kernel
    /// has already policed the connection's packets; only a ban the kernel could not take (kept
    /// by the gate instead) is checked here.
    pub fn admit(&self, peer: IpAddr) -> Admission {
        let now = Instant::now();
        let admission = if self.kernel_polices {
            if self.gate.is_allowlisted(peer) {
                Admission::Allowlisted
            } else if self.gate.is_banned(peer, now) {
                Admission::Banned
            } else {
                Admission::Admit
            }
        } else {
            self.gate.check(peer, now)
        };
        if !admission.admitted() {
            tracing::debug!(%peer, verdict = admission.label(), "shield: connection refused at accept");
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        admission
    }

    /// The edge refused a connection from `peer` for malformed input (`what`); bans sources
    /// that keep sending it. A [`Abuse::UnknownName`] without its name counts nowhere: see
    /// [`RelayShield::report_unknown_name`].
    pub fn report_abuse(&self, peer: IpAddr, what: Abuse) {
        if !what.is_malformed() || self.gate.is_allowlisted(peer) {
            return;
        }
        if let Some(offender) = self.abuse.record(peer, Instant::now()) {
            self.ban_offender(peer, offender, what.label(), "repeated malformed connections");
        }
    }

    /// The edge refused a connection from `peer` asking for `name`, which no route serves;
    /// bans sources that ask for more distinct such names than `scan_threshold` (SNI scanning).
    pub fn report_unknown_name(&self, peer: IpAddr, name: &str) {
        if self.gate.is_allowlisted(peer) {
            return;
        }
        if let Some(offender) = self.scans.record(peer, name, Instant::now()) {
            self.ban_offender(
                peer,
                offender,
                "unknown_name",
                "SNI scanning (many unknown hostnames)",
            );
        }
    }

    fn ban_offender(&self, peer: IpAddr, offender: Offender, last: &str, why: &'static str) {
        let duration = self.config.lock().expect("shield config lock").ban_duration;
        self.stats.abuse_bans.fetch_add(1, Ordering::Relaxed);
        warn!(
            source = %offender.source,
            count = offender.rejections,
            last,
            ban = ?duration,
            "shield: banning source for {why}"
        );
        let until = Instant::now().checked_add(duration);
        {
            let mut xdp = self.xdp.lock().expect("shield lock");
            match xdp.as_mut() {
                Some(shield) => {
                    if let Err(e) = shield.ban(peer.to_canonical(), Some(duration)) {
                        warn!(source = %offender.source, error = %e, "shield: kernel ban failed; banning at accept instead");
                        self.gate.ban(peer, until);
                    }
                }
                None => self.gate.ban(peer, until),
            }
        }
        if let Some(sink) = self.decided.lock().expect("shield lock").as_ref() {
            let decided = DecidedBan {
                source: offender.source,
                duration,
                why,
            };
            if sink.try_send(decided).is_err() {
                warn!(source = %offender.source, "shield: ban not shared (too many at once)");
            }
        }
    }

    /// Whether `peer`'s source is banned (kernel maps with XDP, plus the bans kept at accept).
    pub fn is_banned(&self, peer: IpAddr) -> bool {
        if self.gate.is_banned(peer, Instant::now()) {
            return true;
        }
        let xdp = self.xdp.lock().expect("shield lock");
        xdp.as_ref()
            .is_some_and(|shield| shield.maps().is_banned(peer.to_canonical()).unwrap_or(false))
    }

    /// Every ban in force: the kernel's (with XDP) and those kept at accept.
    pub fn bans(&self) -> Result<Vec<BanRecord>, ShieldError> {
        let mut bans = {
            let xdp = self.xdp.lock().expect("shield lock");
            match xdp.as_ref() {
                Some(shield) => shield.maps().bans()?,
                None => Vec::new(),
            }
        };
        for (source, remaining) in self.gate.bans(Instant::now()) {
            if !bans.iter().any(|b| b.source == source) {
                bans.push(BanRecord { source, remaining });
            }
        }
        bans.sort_by_key(|b| b.source);
        Ok(bans)
    }

    /// Bans the source `address` belongs to for `duration` (`None`: until lifted), wherever
    /// enforcement happens; returns that source (a prefix: `ipv4_prefix` / `ipv6_prefix`).
    pub fn ban(&self, address: IpAddr, duration: Option<Duration>) -> Result<SourcePrefix, ShieldError> {
        let mut xdp = self.xdp.lock().expect("shield lock");
        let source = match xdp.as_mut() {
            Some(shield) => shield.ban(address.to_canonical(), duration)?,
            None => {
                self.gate
                    .ban(address, duration.and_then(|d| Instant::now().checked_add(d)));
                self.gate.source_of(address)
            }
        };
        info!(%source, ban = ?duration, "shield: source banned by the operator");
        Ok(source)
    }

    /// The source `address` belongs to (its prefix at this relay's prefix lengths).
    pub fn source_of(&self, address: IpAddr) -> SourcePrefix {
        self.gate.source_of(address)
    }

    /// Lifts the ban on the source `address` belongs to; returns that source and whether it
    /// was banned.
    pub fn unban(&self, address: IpAddr) -> Result<(SourcePrefix, bool), ShieldError> {
        let source = self.gate.source_of(address);
        let mut xdp = self.xdp.lock().expect("shield lock");
        let was_banned = match xdp.as_mut() {
            Some(shield) => {
                let kernel = shield.maps_mut().unban(address.to_canonical())?;
                self.gate.unban(address) || kernel
            }
            None => self.gate.unban(address),
        };
        Ok((source, was_banned))
    }

    /// Runs `f` on the kernel maps, when XDP is on.
    pub fn with_maps<R>(&self, f: impl FnOnce(&mut ShieldMaps) -> R) -> Option<R> {
        let mut xdp = self.xdp.lock().expect("shield lock");
        xdp.as_mut().map(|shield| f(shield.maps_mut()))
    }

    /// Applies a new `[shield]` section: limits, ports and lists take effect at once;
    /// `interfaces`, `mode`, `ipv4_prefix` and `ipv6_prefix` only at the next start (every
    /// source's state and every ban is keyed by the prefixes).
    pub fn reload(&self, config: &ShieldConfig, listener_ports: &[u16]) -> Result<(), ShieldError> {
        let mut current = self.config.lock().expect("shield config lock");
        if current.interfaces != config.interfaces || current.mode != config.mode {
            warn!("shield: `interfaces` and `mode` changes take effect at the next restart");
        }
        let mut config = config.clone();
        if config.prefixes() != current.prefixes() {
            warn!("shield: `ipv4_prefix` and `ipv6_prefix` changes take effect at the next restart");
            config.ipv4_prefix = current.ipv4_prefix;
            config.ipv6_prefix = current.ipv6_prefix;
        }
        // The kernel's maps first: if they refuse, the userspace side stays as it was too.
        if let Some(shield) = self.xdp.lock().expect("shield lock").as_mut() {
            sync(shield.maps_mut(), &config, listener_ports)?;
        }
        self.gate.reconfigure(&config);
        self.abuse.reconfigure(&config);
        self.scans.reconfigure(&config);
        *current = config;
        info!("shield: configuration reloaded");
        Ok(())
    }

    /// Logs every protected port's switch into and out of SYN-cookie mode, looking once a second,
    /// until the shield shuts down. Returns at once without XDP.
    pub async fn watch_syncookies(self: Arc<Self>) {
        let mut active = std::collections::BTreeSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            let Some(ports) = self.with_maps(|maps| maps.port_cookies()) else {
                return;
            };
            let ports = match ports {
                Ok(ports) => ports,
                Err(e) => {
                    warn!(error = %e, "shield: reading the SYN-flood state failed");
                    continue;
                }
            };
            for port in ports {
                if port.active && active.insert(port.port) {
                    warn!(
                        port = port.port,
                        new_source_syns = port.new_source_syns,
                        "shield: port {} in SYN-cookie mode: XDP answers its SYNs from new sources",
                        port.port
                    );
                } else if !port.active && active.remove(&port.port) {
                    info!(
                        port = port.port,
                        "shield: port {} out of SYN-cookie mode", port.port
                    );
                }
            }
        }
    }

    /// Finishes taking over the shield of the relay this one replaces, once it has committed
    /// to the upgrade: syncs the adopted maps with this relay's `[shield]` and swaps this
    /// build's program into each pinned link (atomically: no packet goes unpoliced). Nothing to
    /// do for a shield that was not adopted.
    pub fn take_over(&self) -> Result<(), ShieldError> {
        let Some(ports) = self.adopted.lock().expect("shield lock").take() else {
            return Ok(());
        };
        let mut xdp = self.xdp.lock().expect("shield lock");
        let Some(shield) = xdp.as_mut() else {
            return Ok(());
        };
        let config = self.config.lock().expect("shield lock").clone();
        let interfaces = attach_all(shield, &config, &ports)?;
        for (interface, mode) in &interfaces {
            info!(interface, mode, "shield: xdp on {interface} ({mode}), taken over");
        }
        *self.mode.lock().expect("shield lock") = ShieldMode::Xdp { interfaces };
        Ok(())
    }

    /// Leaves the XDP program's pins, links and maps to the relay process taking over: this
    /// relay's shutdown then detaches nothing.
    pub fn hand_over(&self) {
        if let Some(shield) = self.xdp.lock().expect("shield lock").as_mut() {
            shield.hand_over();
        }
    }

    /// Detaches XDP, removes the pins and stops the event reader. Idempotent.
    pub fn shutdown(&self) {
        self.stop.cancel();
        if let Some(shield) = self.xdp.lock().expect("shield lock").take() {
            let interfaces: Vec<String> = shield.interfaces().map(str::to_owned).collect();
            drop(shield);
            info!(?interfaces, "shield: detached");
        }
    }
}

impl Drop for RelayShield {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The policy the kernel enforces for `config`, on `listener_ports` (the relay's edge and tunnel
/// ports) unless `protected_ports` names others, answering SYN floods as `syncookies` says.
pub fn kernel_policy(
    config: &ShieldConfig,
    listener_ports: &[u16],
    syncookies: SyncookiePolicy,
) -> KernelPolicy {
    KernelPolicy::new(
        &config.effective_ports(listener_ports),
        &source_limits(config),
        syncookies,
    )
}

/// How the program answers SYN floods under `config` on this host, as far as the host allows;
/// says what is missing.
fn syncookie_policy(config: &ShieldConfig) -> SyncookiePolicy {
    let host = match HostTcp::read(&config.interfaces) {
        Ok(host) => host,
        Err(e) => {
            warn!(error = %e, "shield: XDP SYN cookies off: cannot read the host's TCP settings");
            return SyncookiePolicy::default();
        }
    };
    let (policy, shortfalls) = syncookies::plan(config.syncookie_threshold, &host);
    for shortfall in &shortfalls {
        warn!("shield: {shortfall}");
    }
    match policy.mode {
        SYNCOOKIES_ALWAYS => info!(
            mss = policy.mss_v4,
            wscale = policy.wscale,
            "shield: XDP answers every SYN to the protected ports with a SYN cookie"
        ),
        SYNCOOKIES_ADAPTIVE => info!(
            threshold = policy.threshold,
            mss = policy.mss_v4,
            wscale = policy.wscale,
            "shield: XDP answers SYNs with SYN cookies at ports getting more than {} SYNs a second \
             from new sources",
            policy.threshold
        ),
        _ => {}
    }
    policy
}

/// The per-source limits of `config`.
pub fn source_limits(config: &ShieldConfig) -> SourceLimits {
    SourceLimits {
        syn: (config.syn_rate, config.syn_burst),
        packet: (config.packet_rate, config.packet_burst),
        ban_threshold: config.ban_threshold,
        strike_decay_rate: config.strike_decay_rate,
        ban_duration: config.ban_duration,
        prefixes: config.prefixes(),
    }
}

/// Writes `config` into the kernel maps.
pub fn sync(maps: &mut ShieldMaps, config: &ShieldConfig, listener_ports: &[u16]) -> Result<(), ShieldError> {
    maps.set_policy(&kernel_policy(config, listener_ports, syncookie_policy(config)))?;
    maps.sync_cidrs(&config.allow, &config.deny)
}

/// The pin directory name of a relay: its first non-ephemeral edge port (ports identify a
/// relay on a host), else its process id.
pub fn instance_name(config: &RelayConfig) -> String {
    config
        .fixed_instance()
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

fn start_xdp(
    config: &ShieldConfig,
    listener_ports: &[u16],
    instance: &str,
    takeover: Takeover,
) -> Result<(Shield, Attachments), ShieldError> {
    let dir = pin::instance_dir(instance);
    if takeover == Takeover::Yes && pin::holds_pins(&dir) {
        // Attached by `RelayShield::take_over` once the running relay commits to the upgrade;
        // until then its program polices on the same maps.
        let planned = config
            .interfaces
            .iter()
            .map(|i| (i.clone(), "taken over"))
            .collect();
        return Ok((Shield::adopt(&dir)?, planned));
    }
    let mut shield = Shield::load_pinned(&dir)?;
    let attached = attach_all(&mut shield, config, listener_ports)?;
    Ok((shield, attached))
}

/// Syncs the maps with `config` and attaches to every configured interface (swapping the
/// program into a pinned link where there is one).
fn attach_all(
    shield: &mut Shield,
    config: &ShieldConfig,
    listener_ports: &[u16],
) -> Result<Attachments, ShieldError> {
    sync(shield.maps_mut(), config, listener_ports)?;
    let mut attached = Vec::new();
    for interface in &config.interfaces {
        let mode = match config.mode {
            AttachMode::Driver => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
            AttachMode::Auto => match shield.attach(interface, XdpMode::Driver) {
                Ok(()) => {
                    attached.push((interface.clone(), mode_name(XdpMode::Driver)));
                    continue;
                }
                Err(e) => {
                    warn!(
                        interface,
                        error = %e,
                        "shield: driver mode refused on {interface}; falling back to skb mode"
                    );
                    XdpMode::Skb
                }
            },
        };
        shield.attach(interface, mode)?;
        attached.push((interface.clone(), mode_name(mode)));
    }
    Ok(attached)
}

fn log_ban(stats: Arc<ShieldStats>) -> impl Fn(BanNotice) {
    move |notice| {
        stats.kernel_bans.fetch_add(1, Ordering::Relaxed);
        warn!(
            source = %notice.source,
            reason = notice.reason.map_or("unknown", |r| r.label()),
            ban = ?notice.remaining(),
            "shield: kernel banned a source"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_is_named_after_the_first_fixed_edge_port() {
        let mut config: RelayConfig = toml::from_str(
            "state_dir = \"s\"\n[edge]\ntls_listen = [\"127.0.0.1:0\", \"127.0.0.1:8443\"]\n\
             [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n",
        )
        .unwrap();
        assert_eq!(instance_name(&config), "8443");
        config.edge.tls_listen.truncate(1);
        config.edge.http_listen.clear();
        assert_eq!(instance_name(&config), format!("pid-{}", std::process::id()));
    }

    #[tokio::test]
    async fn without_interfaces_the_gate_limits_and_abuse_bans_in_userspace() {
        let mut config: RelayConfig = toml::from_str(
            "state_dir = \"s\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n\
             [shield]\nconnection_rate = 1\nconnection_burst = 2\nabuse_threshold = 2\n",
        )
        .unwrap();
        let shield = RelayShield::start(&config);
        assert!(matches!(shield.mode(), ShieldMode::Fallback { .. }));

        let flooder: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(shield.admit(flooder).admitted());
        assert!(shield.admit(flooder).admitted());
        assert!(!shield.admit(flooder).admitted());
        assert_eq!(shield.stats().refused.load(Ordering::Relaxed), 1);

        let scanner: IpAddr = "192.0.2.10".parse().unwrap();
        for _ in 0..100 {
            shield.report_abuse(scanner, Abuse::UnknownName);
        }
        assert!(
            !shield.is_banned(scanner),
            "an unknown name alone is not malformed input"
        );
        for _ in 0..2 {
            shield.report_abuse(scanner, Abuse::BadClientHello);
        }
        assert!(!shield.is_banned(scanner));
        shield.report_abuse(scanner, Abuse::BadClientHello);
        assert!(shield.is_banned(scanner));
        assert!(!shield.admit(scanner).admitted());
        assert_eq!(shield.stats().abuse_bans.load(Ordering::Relaxed), 1);

        // Reload: the scanner's network is now allowlisted, which beats its ban.
        config.shield.allow = vec!["192.0.2.0/24".parse().unwrap()];
        shield.reload(&config.shield, &config.listener_ports()).unwrap();
        assert!(shield.admit(scanner).admitted());
        assert!(shield.with_maps(|_| ()).is_none());
    }

    #[tokio::test]
    async fn many_distinct_unknown_names_ban_a_scanner_and_repeats_never_do() {
        let config: RelayConfig = toml::from_str(
            "state_dir = \"s\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n\
             [shield]\nscan_threshold = 5\n",
        )
        .unwrap();
        let shield = RelayShield::start(&config);
        let office: IpAddr = "192.0.2.50".parse().unwrap();
        for _ in 0..1_000 {
            shield.report_unknown_name(office, "retired.example.com");
        }
        assert!(!shield.is_banned(office));
        let scanner: IpAddr = "192.0.2.51".parse().unwrap();
        for i in 0..5 {
            shield.report_unknown_name(scanner, &format!("guess{i}.example.com"));
        }
        assert!(!shield.is_banned(scanner));
        shield.report_unknown_name(scanner, "guess5.example.com");
        assert!(shield.is_banned(scanner));
        assert_eq!(shield.bans().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn bans_cover_the_source_prefix_and_a_reload_keeps_the_prefixes_in_force() {
        let mut config: RelayConfig = toml::from_str(
            "state_dir = \"s\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"c\"\nkey = \"k\"\n",
        )
        .unwrap();
        let shield = RelayShield::start(&config);
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let banned = shield.ban(ip("2001:db8::1"), None).unwrap();
        assert_eq!(banned.to_string(), "2001:db8::/64");
        assert!(shield.is_banned(ip("2001:db8::ffff")), "the whole /64");
        assert!(!shield.is_banned(ip("2001:db8:0:1::1")));
        let bans = shield.bans().unwrap();
        assert_eq!(bans[0].source.to_string(), "2001:db8::/64");

        // New prefix lengths wait for the next start: what is recorded stays meaningful.
        config.shield.ipv6_prefix = 128;
        shield.reload(&config.shield, &config.listener_ports()).unwrap();
        assert!(shield.is_banned(ip("2001:db8::ffff")));
        let (unbanned, was_banned) = shield.unban(ip("2001:db8::42")).unwrap();
        assert_eq!(
            (unbanned.to_string().as_str(), was_banned),
            ("2001:db8::/64", true)
        );
        assert!(shield.admit(ip("2001:db8::1")).admitted());
    }
}

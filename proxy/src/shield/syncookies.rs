//! What the XDP program needs to answer SYNs with SYN cookies the kernel will accept, worked out
//! from the host: [`HostTcp`] reads the sysctls and MTUs (I/O), [`plan`] turns them and
//! `shield.syncookie_threshold` into the kernel's [`SyncookiePolicy`] and says what is missing
//! (pure, so every rule below is unit-tested).
//!
//! What the kernel needs, and why (`net/ipv4/syncookies.c`, `include/net/tcp.h`):
//! - `net.ipv4.tcp_syncookies = 2`. A listener turns a cookie ACK into a connection only within
//!   two minutes of answering a SYN with a cookie itself (`tcp_synq_no_recent_overflow`); with
//!   `1` it does so only when its SYN queue overflows, which never happens while XDP answers
//!   the flood. With `2` it answers every SYN it gets with a cookie, and the program lets one
//!   SYN per port a second through to it. Without it the program answers nothing and floods
//!   are left to the kernel's own cookies.
//! - `net.ipv4.tcp_timestamps = 2` for window scaling and SACK. The client's window scale and
//!   SACK permission travel in the low bits of the timestamp it echoes; with `1` the kernel
//!   adds a secret per-connection offset to timestamps (and takes it off the echo), which the
//!   program cannot know, so it would read garbage. With `1` or `0` the program's SYN-ACKs
//!   offer neither timestamps, window scaling nor SACK: connections work, with windows of at
//!   most 64 KiB.
//! - The same window scale the kernel will use: `tcp_select_initial_window` takes
//!   `ilog2(max(tcp_rmem[2], rmem_max)) - 15`, clamped to 0..=14; a client told another scale
//!   would misread every window the connection sends.
//! - An MSS no larger than what the path takes: the smallest MTU of the shielded interfaces
//!   less 40 (IPv4) or 60 (IPv6) bytes of headers.
use std::path::Path;

use proxy_common::{
    SYNCOOKIE_SACK, SYNCOOKIE_TIMESTAMPS, SYNCOOKIE_WSCALE, SYNCOOKIES_ADAPTIVE, SYNCOOKIES_ALWAYS,
    SYNCOOKIES_NEVER, SyncookiePolicy,
};

use crate::config::shield::SyncookieThreshold;

/// The host's TCP settings that decide whether and how the program can answer SYNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTcp {
    /// `net.ipv4.tcp_syncookies`.
    pub syncookies: u8,
    /// `net.ipv4.tcp_timestamps`.
    pub timestamps: u8,
    /// `net.ipv4.tcp_window_scaling`.
    pub window_scaling: bool,
    /// `net.ipv4.tcp_sack`.
    pub sack: bool,
    /// `net.ipv4.tcp_rmem` (min, default, max).
    pub tcp_rmem: [u32; 3],
    /// `net.core.rmem_max`.
    pub rmem_max: u32,
    /// `net.ipv4.ip_default_ttl`.
    pub ttl: u8,
    /// The smallest MTU of the interfaces the program is attached to.
    pub mtu: u32,
}

impl HostTcp {
    /// Reads this network namespace's settings, and the MTU of `interfaces`.
    pub fn read(interfaces: &[String]) -> std::io::Result<Self> {
        let number = |name: &str| -> std::io::Result<u64> {
            let path = Path::new("/proc/sys").join(name.replace('.', "/"));
            let text = std::fs::read_to_string(&path)?;
            text.trim()
                .parse()
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
        };
        let rmem_text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")?;
        let mut tcp_rmem = [0u32; 3];
        for (slot, field) in tcp_rmem.iter_mut().zip(rmem_text.split_whitespace()) {
            *slot = field
                .parse()
                .map_err(|e| std::io::Error::other(format!("net.ipv4.tcp_rmem: {e}")))?;
        }
        let mut mtu = u32::MAX;
        for interface in interfaces {
            mtu = mtu.min(interface_mtu(interface)?);
        }
        Ok(Self {
            syncookies: number("net.ipv4.tcp_syncookies")? as u8,
            timestamps: number("net.ipv4.tcp_timestamps")? as u8,
            window_scaling: number("net.ipv4.tcp_window_scaling")? != 0,
            sack: number("net.ipv4.tcp_sack")? != 0,
            tcp_rmem,
            rmem_max: number("net.core.rmem_max")?.min(u64::from(u32::MAX)) as u32,
            ttl: number("net.ipv4.ip_default_ttl")?.clamp(1, 255) as u8,
            mtu: if mtu == u32::MAX { 1500 } else { mtu },
        })
    }
}

/// The MTU of `interface` in this thread's network namespace. Asked of the kernel with
/// `SIOCGIFMTU`: `/sys/class/net` shows the namespace sysfs was mounted in, which need not be
/// this one.
fn interface_mtu(interface: &str) -> std::io::Result<u32> {
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(std::io::Error::other(format!(
            "{interface:?} is not an interface name"
        )));
    }
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours alone from here on; the OwnedFd closes it.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain data; zeroed is a valid start.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid socket and an ifreq naming the interface, as SIOCGIFMTU takes them.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFMTU,
            &mut request,
        )
    };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            error.kind(),
            format!("MTU of {interface}: {error}"),
        ));
    }
    // SAFETY: SIOCGIFMTU filled in the MTU member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_mtu }.max(0) as u32)
}

/// What [`plan`] found missing on the host, each a line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// `tcp_syncookies` is not 2: the program answers no SYN.
    ListenerCookies(u8),
    /// `tcp_timestamps` is not 2: SYN-ACKs without timestamps, window scaling and SACK.
    Timestamps(u8),
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ListenerCookies(value) => write!(
                f,
                "XDP SYN cookies off: net.ipv4.tcp_syncookies is {value}, needs 2 (a listener accepts \
                 cookie ACKs only while it answers SYNs with cookies itself); floods are left to the \
                 kernel's own SYN cookies"
            ),
            Self::Timestamps(value) => write!(
                f,
                "XDP SYN cookies without window scaling and SACK: net.ipv4.tcp_timestamps is {value}, \
                 needs 2 (with 1 the kernel hides a secret offset in timestamps, where the cookie keeps \
                 the client's options); connections answered so take windows of at most 64 KiB"
            ),
        }
    }
}

/// The policy the kernel gets for `threshold` on `host`, and what keeps it from doing more.
pub fn plan(threshold: SyncookieThreshold, host: &HostTcp) -> (SyncookiePolicy, Vec<Shortfall>) {
    let mut shortfalls = Vec::new();
    let (mut mode, threshold) = match threshold {
        SyncookieThreshold::Never => (SYNCOOKIES_NEVER, 0),
        SyncookieThreshold::Always => (SYNCOOKIES_ALWAYS, 0),
        SyncookieThreshold::PerSecond(n) => (SYNCOOKIES_ADAPTIVE, u64::from(n)),
    };
    if mode != SYNCOOKIES_NEVER && host.syncookies != 2 {
        shortfalls.push(Shortfall::ListenerCookies(host.syncookies));
        mode = SYNCOOKIES_NEVER;
    }
    let mut options = 0;
    if host.timestamps == 2 {
        options |= SYNCOOKIE_TIMESTAMPS;
        if host.window_scaling {
            options |= SYNCOOKIE_WSCALE;
        }
        if host.sack {
            options |= SYNCOOKIE_SACK;
        }
    } else if mode != SYNCOOKIES_NEVER {
        shortfalls.push(Shortfall::Timestamps(host.timestamps));
    }
    let mss_v4 = mss(host.mtu, 40);
    let mss_v6 = mss(host.mtu, 60);
    let policy = SyncookiePolicy {
        threshold,
        mss_v4,
        mss_v6,
        window_v4: initial_window(host, mss_v4),
        window_v6: initial_window(host, mss_v6),
        wscale: window_scale(host),
        ttl: host.ttl,
        options,
        mode,
        ..SyncookiePolicy::default()
    };
    (policy, shortfalls)
}

/// The MSS for an MTU with `headers` bytes of IP and TCP header, within what TCP allows.
fn mss(mtu: u32, headers: u32) -> u16 {
    mtu.saturating_sub(headers).clamp(536, 65_495) as u16
}

/// The window scale `tcp_select_initial_window` gives a connection.
pub fn window_scale(host: &HostTcp) -> u8 {
    let space = host.tcp_rmem[2].max(host.rmem_max).max(1);
    (space.ilog2() as i64 - 15).clamp(0, 14) as u8
}

/// The window a listener offers in its SYN-ACK: its receive space (half its default buffer,
/// `tcp_win_from_space`), at most 65535, rounded down to whole segments.
pub fn initial_window(host: &HostTcp, mss: u16) -> u16 {
    let space = (host.tcp_rmem[1] / 2).min(65_535);
    let mss = u32::from(mss.max(1));
    let window = if space > mss { space / mss * mss } else { space };
    window as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stock Debian host with both sysctls set for XDP cookies.
    fn host() -> HostTcp {
        HostTcp {
            syncookies: 2,
            timestamps: 2,
            window_scaling: true,
            sack: true,
            tcp_rmem: [4096, 131_072, 6_291_456],
            rmem_max: 212_992,
            ttl: 64,
            mtu: 1500,
        }
    }

    #[test]
    fn a_ready_host_gets_every_option_and_the_kernels_numbers() {
        let (policy, shortfalls) = plan(SyncookieThreshold::PerSecond(1000), &host());
        assert!(shortfalls.is_empty());
        assert_eq!((policy.mode, policy.threshold), (SYNCOOKIES_ADAPTIVE, 1000));
        assert_eq!(
            policy.options,
            SYNCOOKIE_TIMESTAMPS | SYNCOOKIE_WSCALE | SYNCOOKIE_SACK
        );
        // What Linux puts in its own SYN-ACK on such a host: MSS 1460, window 64240 (44 segments),
        // window scale 7 (6 MiB of tcp_rmem).
        assert_eq!((policy.mss_v4, policy.mss_v6), (1460, 1440));
        assert_eq!((policy.window_v4, policy.window_v6), (64_240, 64_800));
        assert_eq!(policy.wscale, 7);
        assert_eq!(policy.ttl, 64);
    }

    #[test]
    fn window_scale_follows_the_largest_receive_buffer() {
        let mut big = host();
        big.tcp_rmem[2] = 33_554_432;
        assert_eq!(window_scale(&big), 10);
        big.rmem_max = 1 << 31;
        assert_eq!(window_scale(&big), 14, "clamped to TCP's 14");
        let mut small = host();
        small.tcp_rmem[2] = 65_536;
        small.rmem_max = 16_384;
        assert_eq!(window_scale(&small), 1);
    }

    #[test]
    fn without_listener_cookies_nothing_is_answered() {
        let mut stock = host();
        stock.syncookies = 1;
        let (policy, shortfalls) = plan(SyncookieThreshold::Always, &stock);
        assert_eq!(policy.mode, SYNCOOKIES_NEVER);
        assert_eq!(shortfalls[0], Shortfall::ListenerCookies(1));
        assert!(
            shortfalls[0]
                .to_string()
                .contains("net.ipv4.tcp_syncookies is 1, needs 2")
        );
        // Asked for nothing, nothing is missing.
        assert!(plan(SyncookieThreshold::Never, &stock).1.is_empty());
    }

    #[test]
    fn random_timestamp_offsets_leave_out_timestamps_and_what_rides_in_them() {
        let mut offsets = host();
        offsets.timestamps = 1;
        let (policy, shortfalls) = plan(SyncookieThreshold::PerSecond(10), &offsets);
        assert_eq!(policy.mode, SYNCOOKIES_ADAPTIVE, "still answered, with MSS only");
        assert_eq!(policy.options, 0);
        assert_eq!(shortfalls, [Shortfall::Timestamps(1)]);
        let mut no_sack = host();
        no_sack.sack = false;
        assert_eq!(
            plan(SyncookieThreshold::Always, &no_sack).0.options,
            SYNCOOKIE_TIMESTAMPS | SYNCOOKIE_WSCALE
        );
    }

    #[test]
    fn the_mss_fits_the_smallest_interface() {
        let mut jumbo = host();
        jumbo.mtu = 9000;
        assert_eq!(plan(SyncookieThreshold::Always, &jumbo).0.mss_v4, 8960);
        let mut tunnel = host();
        tunnel.mtu = 1280;
        let (policy, _) = plan(SyncookieThreshold::Always, &tunnel);
        assert_eq!((policy.mss_v4, policy.mss_v6), (1240, 1220));
        assert_eq!(policy.window_v4, 64_480, "52 segments of 1240");
    }

    #[test]
    fn the_shipped_sysctl_file_sets_what_xdp_cookies_need() {
        let file = include_str!("../../../deploy/sysctl/90-sluice-relay.conf");
        let mut host = host();
        (host.syncookies, host.timestamps) = (1, 1);
        for line in file
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line.split_once('=').expect("key = value");
            let value: u8 = value.trim().parse().unwrap();
            match key.trim() {
                "net.ipv4.tcp_syncookies" => host.syncookies = value,
                "net.ipv4.tcp_timestamps" => host.timestamps = value,
                other => panic!("unexpected sysctl {other}"),
            }
        }
        let (policy, shortfalls) = plan(SyncookieThreshold::PerSecond(1000), &host);
        assert!(shortfalls.is_empty(), "{shortfalls:?}");
        assert_eq!(
            policy.options,
            SYNCOOKIE_TIMESTAMPS | SYNCOOKIE_WSCALE | SYNCOOKIE_SACK
        );
    }

    #[test]
    fn reads_this_hosts_settings() {
        let host = HostTcp::read(&["lo".to_owned()]).unwrap();
        assert!(host.mtu >= 1280);
        assert!(host.tcp_rmem[2] >= host.tcp_rmem[1]);
        assert!(HostTcp::read(&["no-such-if".to_owned()]).is_err());
    }
}

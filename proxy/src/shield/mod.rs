//! The XDP shield, seen from userspace.
//!
//! - this file: [`Shield`], the loaded kernel object (built from `proxy-ebpf`, embedded in the
//!   binary by `proxy/build.rs`): load, attach/detach, pins, `BPF_PROG_TEST_RUN`.
//! - [`maps`]: typed reads and writes of its maps (bans, CIDR lists, limits, counters), shared
//!   by the relay and the CLI.
//! - [`sources`]: the kernel's per-source tables, mapped into memory (kernel-decided bans).
//! - [`events`]: ban events from the kernel's ring buffer.
//! - [`runtime`]: what a relay runs: XDP when it can attach, else the userspace [`gate`];
//!   plus the [`abuse`] tracker that turns repeated L7 rejections into bans.
//! - [`cli`]: `sluice shield ...`, editing a running relay's shield through its pins.
//! - [`prefix`]: what a source is (the network of its first `ipv4_prefix`/`ipv6_prefix`
//!   bits), for the kernel's tables and bans and for the userspace gate and abuse tracker.
//! - [`pin`], [`clock`]: pin paths, the kernel's clock.
pub mod abuse;
pub mod cli;
pub mod clock;
pub mod events;
pub mod gate;
pub mod maps;
pub mod pin;
pub mod runtime;
pub mod sources;
pub mod syncookies;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{MapError, RingBuf};
use aya::pin::PinError;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use proxy_common::{Counter, MAP_BAN_EVENTS, Reason, XDP_PROGRAM};

pub use crate::prefix::{PrefixLengths, SourcePrefix};
pub use events::{BanEvents, BanNotice};
pub use maps::{BanRecord, CidrEntry, CidrList, KernelPolicy, ShieldMaps, SourceLimits};
pub use runtime::RelayShield;

/// The compiled XDP object (BPF ELF with BTF), aligned for aya's parser.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-xdp"));

/// Everything that can go wrong between us and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ShieldError {
    /// The embedded object could not be parsed, or the kernel refused to create its maps (no
    /// BTF support, missing privileges).
    #[error("loading the XDP object into the kernel: {0}")]
    Load(#[from] EbpfError),
    /// The kernel refused the program (the verifier rejected it, or we lack the privileges), or
    /// detaching or test-running it failed.
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    /// The program could not be attached to an interface (no such interface, or the driver
    /// refuses this mode).
    #[error("attaching XDP to {interface} ({mode} mode): {source}")]
    Attach {
        /// The interface name.
        interface: String,
        /// The mode tried, as [`mode_name`] names it.
        mode: &'static str,
        /// What the kernel said.
        source: ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("BPF map: {0}")]
    Map(#[from] MapError),
    /// The object lacks a program or map this code expects: it was built from another
    /// version of `proxy-ebpf`.
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        /// `"program"` or `"map"`.
        kind: &'static str,
        /// The name looked for.
        name: &'static str,
    },
    /// Pinning a map under the relay's pin directory failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin's path.
        path: PathBuf,
        /// What aya reported.
        source: PinError,
    },
    /// The pin directory could not be created, or the BPF filesystem could not be mounted.
    #[error("{path}: {source}")]
    PinDir {
        /// The directory, or `/sys/fs/bpf` for the mount.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The CLI could not open a map a running relay pinned: no relay with XDP is running
    /// there, or we may not read it.
    #[error("opening the pinned map {path} (is a relay with XDP running?): {source}")]
    OpenPinned {
        /// The pin's path.
        path: PathBuf,
        /// What aya reported.
        source: MapError,
    },
    /// A per-source table is not the mmapable array this code expects, or `mmap` failed.
    #[error("mapping the source table {name} into memory: {source}")]
    SourceTable {
        /// The map's name (`SOURCES_V4` or `SOURCES_V6`).
        name: &'static str,
        /// Why it could not be mapped.
        source: std::io::Error,
    },
    /// `getrandom(2)` failed while seeding the source tables' hash.
    #[error("drawing random seeds: {0}")]
    Random(std::io::Error),
    /// `clock_gettime(CLOCK_MONOTONIC)` failed.
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(std::io::Error),
}

/// What the kernel answered for one frame under `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// Raw XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2, `XDP_TX` = 3).
    pub action: u32,
    /// Average run time per repetition as the kernel measured it.
    pub per_packet: Duration,
    /// The frame as the program left it (what `XDP_TX` sends, or `XDP_PASS` hands on).
    pub frame: Vec<u8>,
}

/// XDP action codes from `linux/bpf.h`.
pub mod action {
    /// `XDP_ABORTED`: the program failed; the frame is dropped and a trace event raised.
    pub const ABORTED: u32 = 0;
    /// `XDP_DROP`: the frame is dropped before the kernel's network stack sees it.
    pub const DROP: u32 = 1;
    /// `XDP_PASS`: the frame goes on to the kernel's network stack.
    pub const PASS: u32 = 2;
    /// `XDP_TX`: the (rewritten) frame goes back out of the interface it came in on.
    pub const TX: u32 = 3;
}

/// The loaded shield: program, maps, and the links that keep it attached.
pub struct Shield {
    ebpf: Ebpf,
    maps: ShieldMaps,
    events: Option<BanEvents>,
    links: Vec<(String, XdpLinkId)>,
    pin_dir: Option<PathBuf>,
}

impl Shield {
    /// Loads the embedded object and verifies the program in the kernel (not attached yet).
    /// The maps start empty: no protected ports, so everything passes until
    /// [`ShieldMaps::set_policy`].
    pub fn load() -> Result<Self, ShieldError> {
        Self::load_inner(None)
    }

    /// Like [`Shield::load`], and pins the maps under `pin_dir` (see [`pin`]); the pins are
    /// removed when the shield is dropped.
    pub fn load_pinned(pin_dir: &Path) -> Result<Self, ShieldError> {
        pin::prepare(pin_dir)?;
        Self::load_inner(Some(pin_dir)).inspect_err(|_| pin::remove(pin_dir))
    }

    fn load_inner(pin_dir: Option<&Path>) -> Result<Self, ShieldError> {
        let mut ebpf = Ebpf::load(XDP_OBJECT)?;
        xdp_program(&mut ebpf)?.load()?;
        let maps = ShieldMaps::take(&mut ebpf, pin_dir)?;
        let ring = ebpf.take_map(MAP_BAN_EVENTS).ok_or(ShieldError::Missing {
            kind: "map",
            name: MAP_BAN_EVENTS,
        })?;
        Ok(Self {
            ebpf,
            maps,
            events: Some(BanEvents::new(RingBuf::try_from(ring)?)),
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
        })
    }

    /// Attaches to `interface` in the given mode.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), ShieldError> {
        let link = xdp_program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| ShieldError::Attach {
                interface: interface.to_owned(),
                mode: mode_name(mode),
                source,
            })?;
        self.links.push((interface.to_owned(), link));
        Ok(())
    }

    /// Detaches from every interface (also happens when the shield is dropped).
    pub fn detach_all(&mut self) {
        let links = std::mem::take(&mut self.links);
        if let Ok(program) = xdp_program(&mut self.ebpf) {
            for (interface, link) in links {
                if let Err(e) = program.detach(link) {
                    tracing::warn!(interface, error = %e, "shield: detaching XDP failed");
                }
            }
        }
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(name, _)| name.as_str())
    }

    /// Typed access to the program's maps, for reading them.
    pub fn maps(&self) -> &ShieldMaps {
        &self.maps
    }

    /// Typed access to the program's maps, for changing policy, lists and bans.
    pub fn maps_mut(&mut self) -> &mut ShieldMaps {
        &mut self.maps
    }

    /// The ban-event consumer; there is one, so the second call returns `None`.
    pub fn take_ban_events(&mut self) -> Option<BanEvents> {
        self.events.take()
    }

    /// Bans the source `address` belongs to for `duration` (`None`: until unbanned); returns
    /// that source.
    pub fn ban(&mut self, address: IpAddr, duration: Option<Duration>) -> Result<SourcePrefix, ShieldError> {
        self.maps.ban(address, duration)
    }

    /// Lifts the ban on the source `address` belongs to; returns whether there was one.
    pub fn unban(&mut self, address: IpAddr) -> Result<bool, ShieldError> {
        self.maps.unban(address)
    }

    /// Sums every CPU's counters for each verdict reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, ShieldError> {
        self.maps.counters()
    }

    /// How many instructions the kernel's verifier walked to accept the program (its cost
    /// against the verifier's limit of a million), where the kernel reports it.
    pub fn verified_instructions(&mut self) -> Result<Option<u32>, ShieldError> {
        Ok(xdp_program(&mut self.ebpf)?.info()?.verified_instruction_count())
    }

    /// Runs the program on `frame` in the kernel without a NIC (`BPF_PROG_TEST_RUN`).
    /// `repeat` > 1 makes the kernel loop, and the outcome's duration is the per-run average.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, ShieldError> {
        // Room for what the program may grow the frame to (a SYN-ACK's options).
        let mut out = vec![0u8; frame.len() + 256];
        let result = xdp_program(&mut self.ebpf)?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            action: result.return_value,
            per_packet: result.duration,
            frame: out,
        })
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        self.detach_all();
        if let Some(dir) = self.pin_dir.take() {
            pin::remove(&dir);
        }
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, ShieldError> {
    let program = ebpf.program_mut(XDP_PROGRAM).ok_or(ShieldError::Missing {
        kind: "program",
        name: XDP_PROGRAM,
    })?;
    Ok(program.try_into()?)
}

/// How logs name an attach mode.
pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "driver",
        XdpMode::Skb => "skb",
        _ => "default",
    }
}

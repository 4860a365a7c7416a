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

use aya::maps::{MapError, MapInfo, RingBuf};
use aya::pin::PinError;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use proxy_common::{Counter, MAP_BAN_EVENTS, PINNED_MAPS, Reason, XDP_PROGRAM};

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
    /// The XDP link of an interface could not be pinned or taken over (a kernel without BPF
    /// links for XDP, or a pin that is not a link).
    #[error("the XDP link on {interface}: {source}")]
    Link {
        /// The interface name.
        interface: String,
        /// What aya reported.
        source: aya::programs::links::LinkError,
    },
    /// A running relay's pinned map cannot be taken over by this build (an upgrade across a
    /// change of the map's layout): restart the relay instead.
    #[error("taking over the pinned map {name}: {why}")]
    Incompatible {
        /// The map's name.
        name: &'static str,
        /// What differs.
        why: String,
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
    links: Vec<AttachedLink>,
    pin_dir: Option<PathBuf>,
    /// The pins (and with them the links and maps) are this process's to remove when the shield
    /// is dropped: not while they are still the running relay's (adopted, not yet taken over)
    /// nor once they have been handed over to the relay replacing this one.
    owns_pins: bool,
}

/// The program attached to one interface: the link, pinned next to the maps when the shield
/// is, so that a relay taking over (an upgrade) can swap its own program into it atomically.
struct AttachedLink {
    interface: String,
    link: FdLink,
    pin: Option<PathBuf>,
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

    /// Loads this build's program onto the maps another relay process pinned under `pin_dir`
    /// (an upgrade): bans, source state and lists carry over. Nothing changes in the kernel
    /// until [`Shield::attach`] swaps the program into each pinned link; until then the pins
    /// stay the running relay's (dropping this shield leaves them). Refused when a pinned map's
    /// shape is not this build's.
    pub fn adopt(pin_dir: &Path) -> Result<Self, ShieldError> {
        check_pinned_shapes(pin_dir)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|&name| (name, pin_dir.join(name)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(XDP_OBJECT)?;
        let mut shield = Self::from_loaded(ebpf, None)?;
        shield.pin_dir = Some(pin_dir.to_path_buf());
        shield.owns_pins = false;
        Ok(shield)
    }

    fn load_inner(pin_dir: Option<&Path>) -> Result<Self, ShieldError> {
        Self::from_loaded(Ebpf::load(XDP_OBJECT)?, pin_dir)
    }

    /// Loads the program of `ebpf` into the kernel and takes its maps, pinning them under
    /// `pin_dir` when given.
    fn from_loaded(mut ebpf: Ebpf, pin_dir: Option<&Path>) -> Result<Self, ShieldError> {
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
            owns_pins: true,
        })
    }

    /// Attaches to `interface` in the given mode. With pins, a link another relay pinned for
    /// this interface is taken over (the program in it replaced atomically, no packet unpoliced);
    /// else a new link is made, and pinned.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), ShieldError> {
        let attach_error = |source| ShieldError::Attach {
            interface: interface.to_owned(),
            mode: mode_name(mode),
            source,
        };
        let pin = self
            .pin_dir
            .as_ref()
            .map(|dir| dir.join(format!("link-{interface}")));
        let program = xdp_program(&mut self.ebpf)?;
        let pinned = pin
            .as_ref()
            .filter(|path| path.exists())
            .map(|path| PinnedLink::from_pin(path).map_err(|source| link_error(interface, source)))
            .transpose()?;
        let id = match pinned {
            Some(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|source| link_error(interface, source))?;
                program.attach_to_link(link).map_err(attach_error)?
            }
            None => program.attach(interface, mode).map_err(attach_error)?,
        };
        let mut link =
            FdLink::try_from(program.take_link(id)?).map_err(|source| link_error(interface, source))?;
        if let Some(path) = &pin
            && !path.exists()
        {
            // A pinned link outlives this process: what an upgrade takes over.
            let pinned = link.pin(path).map_err(|source| ShieldError::Pin {
                path: path.clone(),
                source,
            })?;
            link = FdLink::from(pinned);
        }
        self.links.push(AttachedLink {
            interface: interface.to_owned(),
            link,
            pin,
        });
        // Attached, or swapped into the running relay's link: the pins are this process's now.
        self.owns_pins = true;
        Ok(())
    }

    /// Detaches from every interface (also happens when the shield is dropped, unless it was
    /// handed over).
    pub fn detach_all(&mut self) {
        for attached in std::mem::take(&mut self.links) {
            if let Some(pin) = &attached.pin
                && let Err(e) = std::fs::remove_file(pin)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(interface = attached.interface, error = %e, "shield: unpinning the XDP link failed");
            }
            // Closing the last reference to the link detaches the program.
            drop(attached.link);
        }
    }

    /// Whether the pins are this process's (see [`Shield::adopt`], [`Shield::hand_over`]).
    pub fn owns_pins(&self) -> bool {
        self.owns_pins
    }

    /// Leaves the pinned maps and links to the relay process taking over: dropping this shield
    /// afterwards detaches nothing and removes no pin.
    pub fn hand_over(&mut self) {
        self.owns_pins = false;
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|attached| attached.interface.as_str())
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
        if !self.owns_pins {
            // The links stay attached through their pins; closing our descriptors is all.
            return;
        }
        self.detach_all();
        if let Some(dir) = self.pin_dir.take() {
            pin::remove(&dir);
        }
    }
}

fn link_error(interface: &str, source: aya::programs::links::LinkError) -> ShieldError {
    ShieldError::Link {
        interface: interface.to_owned(),
        source,
    }
}

/// Refuses to take over pinned maps whose shape (type, key and value size, capacity, flags)
/// is not the one this build's program expects: compared with a fresh set pinned next to them
/// for the purpose.
fn check_pinned_shapes(pin_dir: &Path) -> Result<(), ShieldError> {
    // The BPF filesystem allows no dots in names.
    let reference = pin_dir.with_file_name(format!("{}{}", pin::REFERENCE_PREFIX, std::process::id()));
    let fresh = Shield::load_pinned(&reference)?;
    let shape = |path: &Path| -> Result<(u32, u32, u32, u32, u32), ShieldError> {
        let info = MapInfo::from_pin(path)?;
        Ok((
            info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        ))
    };
    let mut result = Ok(());
    for name in PINNED_MAPS {
        let pinned = shape(&pin_dir.join(name)).map_err(|_| ShieldError::Incompatible {
            name,
            why: "not pinned by the running relay".into(),
        });
        let expected = shape(&reference.join(name))?;
        match pinned {
            Ok(pinned) if pinned == expected => {}
            Ok(pinned) => {
                result = Err(ShieldError::Incompatible {
                    name,
                    why: format!("pinned as {pinned:?}, this build expects {expected:?}"),
                });
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    drop(fresh);
    result
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

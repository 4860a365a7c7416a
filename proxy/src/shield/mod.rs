//! The XDP shield, seen from userspace: owns loading the kernel object built from `proxy-ebpf`,
//! attaching it to interfaces, writing bans into its maps and reading its per-CPU counters.
//!
//! The object is embedded in the binary at build time (see `proxy/build.rs`), so a deployed
//! `sluice` needs no separate file.
use std::net::Ipv4Addr;
use std::time::Duration;

use aya::maps::{HashMap, MapError, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use proxy_common::{BanEntry, Counter, MAP_BANNED_V4, MAP_COUNTERS, Reason, XDP_PROGRAM};

/// The compiled XDP object (BPF ELF with BTF), aligned for aya's parser.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-xdp"));

/// Everything that can go wrong between us and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ShieldError {
    #[error("loading the XDP object into the kernel: {0}")]
    Load(#[from] EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("BPF map: {0}")]
    Map(#[from] MapError),
    #[error("the XDP object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(std::io::Error),
}

/// What the kernel answered for one frame under `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// Raw XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2).
    pub action: u32,
    /// Average run time per repetition as the kernel measured it.
    pub per_packet: Duration,
}

/// XDP action codes from `linux/bpf.h`.
pub mod action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
}

/// The loaded shield: program, maps, and the links that keep it attached.
pub struct Shield {
    ebpf: Ebpf,
}

impl Shield {
    /// Loads the embedded object and verifies the program in the kernel (not attached yet).
    pub fn load() -> Result<Self, ShieldError> {
        let mut ebpf = Ebpf::load(XDP_OBJECT)?;
        xdp_program(&mut ebpf)?.load()?;
        Ok(Self { ebpf })
    }

    /// Attaches to `interface` in the given mode.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), ShieldError> {
        xdp_program(&mut self.ebpf)?.attach(interface, mode)?;
        Ok(())
    }

    /// Bans an IPv4 source for `duration` (`None`: until unbanned).
    pub fn ban_v4(&mut self, source: Ipv4Addr, duration: Option<Duration>) -> Result<(), ShieldError> {
        let until_ns = match duration {
            None => u64::MAX,
            Some(d) => monotonic_now_ns()?.saturating_add(d.as_nanos().try_into().unwrap_or(u64::MAX)),
        };
        let mut bans: HashMap<_, u32, BanEntry> = HashMap::try_from(self.map_mut(MAP_BANNED_V4)?)?;
        bans.insert(u32::from_ne_bytes(source.octets()), BanEntry { until_ns }, 0)?;
        Ok(())
    }

    /// Lifts a ban; lifting a ban that does not exist is not an error.
    pub fn unban_v4(&mut self, source: Ipv4Addr) -> Result<(), ShieldError> {
        let mut bans: HashMap<_, u32, BanEntry> = HashMap::try_from(self.map_mut(MAP_BANNED_V4)?)?;
        match bans.remove(&u32::from_ne_bytes(source.octets())) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sums every CPU's counters for each verdict reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, ShieldError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(ShieldError::Missing {
            kind: "map",
            name: MAP_COUNTERS,
        })?;
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map)?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = counters.get(&(reason as u32), 0)?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
    }

    /// Runs the program on `frame` in the kernel without a NIC (`BPF_PROG_TEST_RUN`).
    /// `repeat` > 1 makes the kernel loop, and the outcome's duration is the per-run average.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, ShieldError> {
        let result = xdp_program(&mut self.ebpf)?.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok(TestRunOutcome {
            action: result.return_value,
            per_packet: result.duration,
        })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ShieldError> {
        self.ebpf
            .map_mut(name)
            .ok_or(ShieldError::Missing { kind: "map", name })
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, ShieldError> {
    let program = ebpf.program_mut(XDP_PROGRAM).ok_or(ShieldError::Missing {
        kind: "program",
        name: XDP_PROGRAM,
    })?;
    Ok(program.try_into()?)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads in the kernel.
fn monotonic_now_ns() -> Result<u64, ShieldError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(ShieldError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

//! `cargo xtask`: the project's own commands — toolchain setup, build, local demo, tests.
//!
//! Every command other than `setup` first checks the eBPF toolchain and installs what is missing,
//! so a fresh machine needs nothing done by hand.
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly rust-src and a bpf-linker on the nightly's LLVM (idempotent).
    Setup,
    /// Build the `sluice` binary with its XDP programs embedded.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build and start a local demo.
    Run,
    /// Format check, clippy -D warnings (userspace and eBPF), every unit and integration test.
    /// (Workspace default members; `proxy-ebpf` is linted for its own BPF target.)
    Test,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build { release } => {
            setup::ensure()?;
            build(release)
        }
        Task::Run => {
            setup::ensure()?;
            build(false)?;
            run(Command::new(workspace_root().join("target/debug/sluice")).arg("shield-probe"))
        }
        Task::Test => {
            setup::ensure()?;
            test()
        }
    }
}

fn build(release: bool) -> Result<()> {
    let mut build = cmd("cargo");
    build.args(["build", "--package", "sluice", "--bin", "sluice"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)
}

fn test() -> Result<()> {
    run(cmd("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(cmd("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(cmd("cargo")
        .args([
            "+nightly",
            "clippy",
            "--package",
            "proxy-ebpf",
            "--bins",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", workspace_root().join("target/ebpf-clippy")))?;
    let mut test = cmd("cargo");
    test.args(["test", "--all-targets"]);
    if !is_root() {
        // The XDP and network-namespace tests need root; run the test binaries through sudo
        // rather than skipping them.
        eprintln!("xtask: not root; running test binaries through `sudo -E`");
        test.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run(&mut test)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A command that runs in the workspace root.
pub(crate) fn cmd(program: &str) -> Command {
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, failing with its command line when it exits non-zero.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    ensure!(status.success(), "{command:?} failed with {status}");
    Ok(())
}

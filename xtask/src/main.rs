//! `cargo xtask`: the project's own commands — toolchain setup, build, local demo, tests.
//!
//! Every command other than `setup` first checks the eBPF toolchain and installs what is missing,
//! so a fresh machine needs nothing done by hand.
mod demo;
mod fuzz;
mod layers;
mod package;
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
    /// Start a local demo: relay + agent + an HTTPS app, and print the curl command to reach it
    /// (`--acme`: the agent gets the app's certificate from a local ACME server).
    Run {
        /// Exit after checking one request through the relay instead of running until Ctrl-C.
        #[arg(long)]
        check: bool,
        /// The agent obtains the app's certificate itself from a local ACME server (Pebble),
        /// and terminates TLS in front of a plain-HTTP app.
        #[arg(long)]
        acme: bool,
    },
    /// Relay vs direct vs HAProxy, side by side: setup latency, request round trips, CPU per
    /// connection and per GB, sustained connection rate, memory; `--wan 10ms` puts a delay on
    /// the relay <-> agent link and counts setups in round trips of it.
    /// Writes target/load-test/{results.json,latency.svg}.
    LoadTest {
        /// Extra arguments for `sluice-load suite` (e.g. `--setups 200`, `--wan 10ms`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (release build): target/debian/sluice_<version>_<arch>.deb with
    /// the binary, the systemd units and the example configs; checked like `test` checks it.
    Package,
    /// The layering lint alone: no import cycle among the modules of a crate's `src/`.
    Layers {
        /// The `src/` directory to check (default: `proxy/src`).
        dir: Option<PathBuf>,
    },
    /// Run the fuzz targets in `fuzz/` one after another; fails on a crash or a timeout,
    /// printing the input and the command that replays it.
    Fuzz {
        /// Seconds to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run only this target (`cargo +nightly fuzz list --fuzz-dir fuzz` names them all).
        #[arg(long)]
        target: Option<String>,
    },
    /// Rewrite the checked-in seed corpus (`fuzz/corpus/`) with `fuzz/examples/seeds.rs`.
    FuzzSeeds,
    /// Format check, clippy -D warnings (userspace and eBPF), every fuzz target for a few
    /// seconds, every unit and integration test.
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
        Task::Run { check, acme } => {
            setup::ensure()?;
            build(false)?;
            demo::run(check, acme)
        }
        Task::LoadTest { args } => {
            setup::ensure()?;
            setup::ensure_haproxy();
            run(cmd("cargo").args(["build", "--release", "--bin", "sluice", "--bin", "sluice-load"]))?;
            let root = workspace_root();
            run(Command::new(root.join("target/release/sluice-load"))
                .arg("suite")
                .arg("--sluice")
                .arg(root.join("target/release/sluice"))
                .arg("--out")
                .arg(root.join("target/load-test"))
                .args(args))
        }
        Task::Package => {
            setup::ensure()?;
            package::release()
        }
        Task::Layers { dir } => {
            let dir = dir.unwrap_or_else(|| workspace_root().join("proxy/src"));
            println!("xtask: layers: {}", layers::check(&dir)?);
            Ok(())
        }
        Task::Fuzz { seconds, target } => {
            setup::ensure()?;
            fuzz::run_targets(seconds, target.as_deref())
        }
        Task::FuzzSeeds => {
            setup::ensure()?;
            fuzz::write_seeds()
        }
        Task::Test => {
            setup::ensure()?;
            test()
        }
    }
}

pub(crate) fn build(release: bool) -> Result<()> {
    // The workspace's default members, like `cargo test` builds them: building one package
    // alone unifies dependency features differently and would rebuild half the tree each time.
    let mut build = cmd("cargo");
    build.args(["build"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)
}

fn test() -> Result<()> {
    run(cmd("cargo").args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz crate is outside the workspace, so `--all` leaves it out.
    run(cmd("cargo").args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))?;
    // Dependencies inside the proxy crate point one way; say so before spending a build.
    println!(
        "xtask: layers: {}",
        layers::check(&workspace_root().join("proxy/src"))?
    );
    build(false)?;
    // The README's other command must keep working: bring the demo up and check it end to end,
    // with the tenant's own certificate and with one the agent obtains by ACME.
    demo::run(true, false)?;
    demo::run(true, true)?;
    // The package and its systemd units, from this build.
    let deb = package::build(
        &workspace_root().join("target/debug/sluice"),
        package::Compression::Store,
    )?;
    package::check(&deb)?;
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
    // Before the tests, so that their summed-up line stays the last one printed.
    fuzz::run_targets(fuzz::TEST_SECONDS, None)?;
    let mut test = cmd("cargo");
    test.args(["test", "--all-targets"]);
    if !is_root() {
        // The XDP and network-namespace tests need root; run the test binaries through sudo
        // rather than skipping them.
        eprintln!("xtask: not root; running test binaries through `sudo -E`");
        test.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run_counting_tests(&mut test)
}

/// Runs `cargo test`, echoing its output, and ends with one summed line
/// (`tests: N passed, N failed, N skipped`): cargo prints a result line per test binary, and the last
/// of those (often a binary without tests) says nothing about the run as a whole.
fn run_counting_tests(command: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            for part in summary.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(count), Some(kind)) = (words.next(), words.next()) {
                    let count: u64 = count.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += count,
                        "failed" => failed += count,
                        "ignored" => ignored += count,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    ensure!(status.success(), "{command:?} failed with {status}");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub(crate) fn workspace_root() -> PathBuf {
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

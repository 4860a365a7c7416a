//! `cargo xtask fuzz`, `cargo xtask fuzz-seeds` and the fuzz step of `cargo xtask test`: owns
//! building the cargo-fuzz targets in `fuzz/`, running them for a bounded time against the
//! checked-in seeds, and reporting a failure as the input that caused it and the command that
//! replays it.
//!
//! Layout, all but the seeds under the workspace's `target/` so that nothing a run finds is
//! committed by accident and repeated runs are incremental:
//! - `target/fuzz`: the targets' `CARGO_TARGET_DIR` (nightly, coverage-instrumented, release);
//! - `fuzz/corpus/<target>`: the seed corpus, read but never written by a run;
//! - `target/fuzz-corpus/<target>`: where libFuzzer keeps the inputs it finds, reused next run;
//! - `target/fuzz-logs/<target>.log`: each run's whole libFuzzer output;
//! - `fuzz/artifacts/<target>/`: crash and timeout inputs (cargo-fuzz's place; git-ignored).
//!
//! The targets are built without a sanitizer: the code under test is safe Rust, so
//! AddressSanitizer would find nothing the Rust bounds checks do not, at about twice the cost
//! per input. Debug assertions (integer overflow checks among them) are on.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cmd, run, workspace_root};

/// cargo-fuzz, pinned: this release builds with the installed stable toolchain (1.95) and
/// drives the installed nightly.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// What `cargo xtask test` gives each target: enough to replay the seeds and mutate them for a
/// while, small next to the build (the whole step adds about two minutes once built).
pub const TEST_SECONDS: u64 = 10;
/// Longest a single input may take before libFuzzer reports it as a timeout: far above any
/// parser's cost, so a hit means super-linear work on some input.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// How `cargo fuzz` builds the targets; the same for building, running and reproducing, so that
/// one build serves all three.
const BUILD_FLAGS: &[&str] = &[
    "--fuzz-dir",
    "fuzz",
    "--target-dir",
    "target/fuzz",
    "--sanitizer",
    "none",
    "--debug-assertions",
];

/// The fuzz targets, as cargo-fuzz reads them from `fuzz/Cargo.toml`.
pub fn targets() -> Result<Vec<String>> {
    let out = cargo_fuzz()
        .args(["list", "--fuzz-dir", "fuzz"])
        .output()
        .context("running `cargo fuzz list`")?;
    ensure!(
        out.status.success(),
        "`cargo fuzz list` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let targets: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(!targets.is_empty(), "fuzz/Cargo.toml lists no fuzz targets");
    Ok(targets)
}

/// Builds every target, then runs each (or only `only`) for `seconds`; fails at the first
/// target that crashes or times out, naming the input and the command that replays it.
pub fn run_targets(seconds: u64, only: Option<&str>) -> Result<()> {
    ensure_cargo_fuzz()?;
    let all = targets()?;
    let selected: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_owned()],
        Some(name) => bail!("no fuzz target `{name}`; the targets are: {}", all.join(", ")),
        None => all,
    };
    run(cargo_fuzz().arg("build").args(BUILD_FLAGS))?;
    for target in &selected {
        let summary = run_target(target, seconds)?;
        println!("xtask: fuzz {target}: {seconds} s, {summary}, no crash");
    }
    println!(
        "xtask: fuzz: {} target(s) for {seconds} s each, no crash",
        selected.len()
    );
    Ok(())
}

/// Runs one built target for `seconds` against its seeds and the corpus of earlier runs;
/// returns libFuzzer's final numbers (executions, coverage, corpus).
fn run_target(target: &str, seconds: u64) -> Result<String> {
    let root = workspace_root();
    let corpus = root.join("target/fuzz-corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    let logs = root.join("target/fuzz-logs");
    for dir in [&corpus, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ensure!(seeds.is_dir(), "{} is missing: no seed corpus", seeds.display());
    let log_path = logs.join(format!("{target}.log"));
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    // The first corpus directory is the one libFuzzer adds new inputs to: the seeds stay as
    // checked in.
    let status = cargo_fuzz()
        .arg("run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting `cargo fuzz run {target}`"))?;
    let output =
        std::fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    if status.success() {
        return Ok(final_numbers(&output));
    }
    // The panic message and libFuzzer's report sit at the end of the log.
    let lines: Vec<&str> = output.lines().collect();
    eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
    let inputs = failing_inputs(&output);
    if inputs.is_empty() {
        bail!(
            "fuzz target `{target}` failed ({status}) without writing an input; see {}",
            log_path.display()
        );
    }
    for input in &inputs {
        eprintln!("xtask: fuzz target `{target}` failed on {}", input.display());
        eprintln!(
            "xtask: reproduce with: cargo +nightly fuzz run {} {target} {}",
            BUILD_FLAGS.join(" "),
            input.display()
        );
    }
    bail!(
        "fuzz target `{target}` failed ({status}); whole output in {}",
        log_path.display()
    )
}

/// The inputs libFuzzer wrote for a crash, timeout or out-of-memory
/// (`Test unit written to <path>`).
fn failing_inputs(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, path)| path.trim()))
        .map(|path| {
            let path = Path::new(path);
            if path.is_absolute() {
                path.to_path_buf()
            } else {
                workspace_root().join(path)
            }
        })
        .collect()
}

/// `N execs, cov X, ft Y, corpus Z` from libFuzzer's last status line and final stats.
fn final_numbers(output: &str) -> String {
    let execs = output
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .map(str::trim);
    // `#123 DONE   cov: 953 ft: 2343 corp: 532/115Kb lim: 4096 exec/s: 14476 rss: 28Mb`
    let done = output
        .lines()
        .rev()
        .find(|l| l.split_whitespace().nth(1) == Some("DONE"))
        .unwrap_or("");
    let field = |name: &str| {
        let mut words = done.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()
    };
    format!(
        "{} execs, cov {}, ft {}, corpus {}",
        execs.unwrap_or("?"),
        field("cov:").unwrap_or("?"),
        field("ft:").unwrap_or("?"),
        field("corp:").unwrap_or("?"),
    )
}

/// Rewrites the seed corpus with `fuzz/examples/seeds.rs`, after the fuzz crate's own unit
/// tests (its cut and sample helpers), built on the stable toolchain in `target/fuzz-seeds`.
pub fn write_seeds() -> Result<()> {
    let fuzz_crate = [
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--target-dir",
        "target/fuzz-seeds",
    ];
    run(fuzz_cargo().arg("test").args(fuzz_crate).arg("--lib"))?;
    run(fuzz_cargo()
        .arg("run")
        .args(fuzz_crate)
        .args(["--example", "seeds"]))
}

/// `cargo +nightly fuzz` in the workspace root.
fn cargo_fuzz() -> Command {
    let mut command = fuzz_cargo();
    command.args(["+nightly", "fuzz"]);
    command
}

/// `cargo` in the workspace root, without the variables `cargo run` set for this xtask binary.
/// Some build scripts (ring's) ask to rerun when `CARGO_MANIFEST_DIR` changes, and cargo
/// compares the value in its own environment: inherited from `cargo xtask`, it would differ from
/// a `cargo fuzz` typed by hand (the reproducer command), and each would rebuild half the tree.
fn fuzz_cargo() -> Command {
    let mut command = cmd("cargo");
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

/// The installed cargo-fuzz's version, if there is one.
fn cargo_fuzz_version() -> Option<String> {
    let out = Command::new("cargo-fuzz").arg("--version").output().ok()?;
    // `cargo-fuzz 0.13.2`
    let text = String::from_utf8(out.stdout).ok()?;
    out.status
        .success()
        .then(|| text.split_whitespace().nth(1).map(str::to_owned))
        .flatten()
}

/// `None` when the pinned cargo-fuzz is installed; otherwise what is wrong.
pub fn cargo_fuzz_problem() -> Option<String> {
    match cargo_fuzz_version() {
        Some(version) if version == CARGO_FUZZ_VERSION => None,
        Some(version) => Some(format!("cargo-fuzz {CARGO_FUZZ_VERSION} (found {version})")),
        None => Some(format!("cargo-fuzz {CARGO_FUZZ_VERSION} (not on PATH)")),
    }
}

/// Installs the pinned cargo-fuzz when it is missing (or another version is installed).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let Some(problem) = cargo_fuzz_problem() else {
        return Ok(());
    };
    eprintln!("xtask: needs {problem}; installing it (a minute or two, once)");
    run(fuzz_cargo().args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))?;
    if let Some(problem) = cargo_fuzz_problem() {
        bail!("cargo-fuzz was installed but still not usable: {problem}; add ~/.cargo/bin to PATH");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRASH_LOG: &str = "\
#2114\tNEW    cov: 431 ft: 640 corp: 12/2993b lim: 4096 exec/s: 0 rss: 28Mb L: 4/4 MS: 1 ChangeBit-
thread '<unnamed>' panicked at fuzz_targets/tls_client_hello.rs:61:31:
NeedMore at the limit
==4711== ERROR: libFuzzer: deadly signal
artifact_prefix='/work/fuzz/artifacts/tls_client_hello/'; Test unit written to /work/fuzz/artifacts/tls_client_hello/crash-3f29546453678b855931c174a97d6c0894b8f546
Base64: gAE=
";

    #[test]
    fn a_crash_is_reported_by_the_input_libfuzzer_wrote() {
        assert_eq!(
            failing_inputs(CRASH_LOG),
            vec![PathBuf::from(
                "/work/fuzz/artifacts/tls_client_hello/crash-3f29546453678b855931c174a97d6c0894b8f546"
            )]
        );
        assert!(failing_inputs("Done 10 runs in 0 second(s)\n").is_empty());
        let relative = failing_inputs("Test unit written to fuzz/artifacts/x/timeout-1\n");
        assert_eq!(
            relative,
            vec![workspace_root().join("fuzz/artifacts/x/timeout-1")]
        );
    }

    #[test]
    fn a_clean_run_is_summed_up_from_libfuzzers_last_lines() {
        let log = "\
#881543\tREDUCE cov: 953 ft: 2343 corp: 532/115Kb lim: 4096 exec/s: 14692 rss: 28Mb L: 68/845
#883053\tDONE   cov: 953 ft: 2343 corp: 532/115Kb lim: 4096 exec/s: 14476 rss: 28Mb
Done 883053 runs in 61 second(s)
stat::number_of_executed_units: 883053
stat::average_exec_per_sec:     14476
";
        assert_eq!(
            final_numbers(log),
            "883053 execs, cov 953, ft 2343, corpus 532/115Kb"
        );
        assert_eq!(final_numbers(""), "? execs, cov ?, ft ?, corpus ?");
    }
}

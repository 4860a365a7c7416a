//! `cargo xtask setup`: installs what building the XDP programs (and the test suite) needs,
//! idempotently, and the pinned cargo-fuzz the fuzz targets run with. What the build needs from
//! Debian (protobuf-compiler and libprotobuf-dev for the etcd client) and the servers and clients
//! the tests run (etcd, Prometheus, Pebble, Chromium, curl) are [`DEBIAN_PACKAGES`], installed in
//! one apt-get run.
//!
//! The eBPF crate builds with the installed `nightly` toolchain (`-Z build-std=core` needs its
//! `rust-src`) and links with `bpf-linker`, which must be built against the same LLVM major as
//! that nightly. We link bpf-linker to the nightly's own shared libLLVM (../shared/TOOLCHAIN.md),
//! so no system LLVM is needed and the majors always agree.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cmd, run};

const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

/// Debian packages the tests and the demo run: (package, a file it installs, what for).
pub const DEBIAN_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "protobuf-compiler",
        "/usr/bin/protoc",
        "the etcd-client crate's build compiles etcd's protobuf definitions",
    ),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
        "protoc's well-known types, which etcd's definitions import",
    ),
    (
        "etcd-server",
        "/usr/bin/etcd",
        "the fleet tests run a real etcd cluster",
    ),
    (
        "prometheus",
        "/usr/bin/prometheus",
        "the metrics test scrapes with a real server",
    ),
    (
        "pebble",
        "/usr/bin/pebble-challtestsrv",
        "the ACME tests and `run --acme` use a real ACME server",
    ),
    (
        "chromium",
        "/usr/bin/chromium",
        "the browser test drives a real browser",
    ),
    (
        "curl",
        "/usr/bin/curl",
        "the ACME tests fetch and check with curl",
    ),
    (
        "ca-certificates",
        "/etc/ssl/certs/ca-certificates.crt",
        "the agent trusts the system's roots for a public ACME server",
    ),
];

/// The packages of [`DEBIAN_PACKAGES`] not installed here.
fn missing_packages() -> Vec<(&'static str, &'static str, &'static str)> {
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|(_, file, _)| !Path::new(file).exists())
        .collect()
}

/// What is missing, if anything; `None` when the toolchain is complete.
pub fn missing() -> Result<Option<String>> {
    if !nightly_installed()? {
        return Ok(Some(format!("the `{NIGHTLY}` toolchain")));
    }
    if !rust_src_installed()? {
        return Ok(Some(format!("rust-src for {NIGHTLY}")));
    }
    if let Some(problem) = bpf_linker_problem()? {
        return Ok(Some(problem));
    }
    if let Some((package, _, why)) = missing_packages().first() {
        return Ok(Some(format!("Debian's {package} ({why})")));
    }
    Ok(None)
}

/// Runs setup only when something is missing, saying so in one line.
pub fn ensure() -> Result<()> {
    if let Some(what) = missing()? {
        eprintln!("xtask: {what} missing; running `cargo xtask setup` first");
        setup()?;
    }
    Ok(())
}

/// Installs everything that is missing; a no-op on a complete machine.
pub fn setup() -> Result<()> {
    if !nightly_installed()? {
        bail!(
            "the `{NIGHTLY}` Rust toolchain is not installed and cannot be fetched here; \
             install it with `rustup toolchain install {NIGHTLY}` where a toolchain can be fetched"
        );
    }
    if !rust_src_installed()? {
        eprintln!("xtask: installing rust-src for {NIGHTLY}");
        run(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    if let Some(problem) = bpf_linker_problem()? {
        eprintln!(
            "xtask: needs {problem}; building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s LLVM (takes a few minutes, once)"
        );
        install_bpf_linker()?;
        if let Some(problem) = bpf_linker_problem()? {
            bail!("bpf-linker was installed but still does not work: {problem}");
        }
    }
    install_packages()?;
    eprintln!(
        "xtask: eBPF toolchain ready ({NIGHTLY} with rust-src, bpf-linker on LLVM {})",
        nightly_llvm_major()?
    );
    // Not part of `missing()`: only `fuzz` and `test` need it, and they install it themselves.
    crate::fuzz::ensure_cargo_fuzz()?;
    eprintln!(
        "xtask: cargo-fuzz {} ready (drives {NIGHTLY})",
        crate::fuzz::CARGO_FUZZ_VERSION
    );
    Ok(())
}

/// Installs every missing package of [`DEBIAN_PACKAGES`] with one apt-get run.
fn install_packages() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, _, why) in &missing {
        eprintln!("xtask: installing Debian's {package} package ({why})");
    }
    let packages: Vec<&str> = missing.iter().map(|(package, _, _)| *package).collect();
    apt_get_install(&packages)?;
    for (package, file, _) in &missing {
        ensure!(
            Path::new(file).exists(),
            "apt-get installed {package} but {file} is missing"
        );
    }
    Ok(())
}

/// Debian's HAProxy, the load test's side-by-side peer for SNI routing (`req.ssl_sni`). Optional:
/// when it cannot be installed, the load test runs without that column and says why.
pub fn ensure_haproxy() {
    const BINARY: &str = "/usr/sbin/haproxy";
    if Path::new(BINARY).is_file() {
        return;
    }
    if let Err(e) = apt_install("haproxy", BINARY, "the load test's SNI-routing peer") {
        eprintln!("xtask: could not install haproxy ({e:#}); the load test runs without it");
    }
}

fn apt_install(package: &str, binary: &str, why: &str) -> Result<()> {
    eprintln!("xtask: installing Debian's {package} package ({why})");
    apt_get_install(&[package])?;
    ensure!(
        Path::new(binary).is_file(),
        "apt-get installed {package} but {binary} is missing"
    );
    Ok(())
}

/// `apt-get update`, then `apt-get install` of `packages` without their recommends.
fn apt_get_install(packages: &[&str]) -> Result<()> {
    let root = crate::is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            Command::new("sudo")
        };
        if !root {
            command.arg("apt-get");
        }
        run(command.args(args).env("DEBIAN_FRONTEND", "noninteractive"))
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    apt(&install)
}

fn nightly_installed() -> Result<bool> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-"))))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = capture(cmd("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src_installed() -> Result<bool> {
    Ok(nightly_sysroot()?
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file())
}

/// The LLVM major version the nightly rustc was built with, from `rustc -vV`.
fn nightly_llvm_major() -> Result<u32> {
    let out = capture(cmd("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("unexpected LLVM version {version:?}"))
}

/// The nightly's own shared libLLVM (`libLLVM.so.<major>...-rust-...`).
fn nightly_libllvm() -> Result<PathBuf> {
    let lib = nightly_sysroot()?.join("lib");
    let found = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        });
    found.with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain ships no shared LLVM",
            lib.display()
        )
    })
}

/// `None` when a working bpf-linker on the nightly's LLVM major is on PATH.
fn bpf_linker_problem() -> Result<Option<String>> {
    let Ok(out) = Command::new("bpf-linker").arg("--version").output() else {
        return Ok(Some("bpf-linker (not on PATH)".into()));
    };
    if !out.status.success() {
        return Ok(Some(format!(
            "a working bpf-linker (`bpf-linker --version` failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // A bpf-linker linked dynamically against another LLVM major would emit objects the nightly's
    // bitcode does not match; ldd tells which libLLVM it loads.
    let major = nightly_llvm_major()?;
    let path = capture(cmd("sh").args(["-c", "command -v bpf-linker"]))?;
    if let Ok(ldd) = Command::new("ldd").arg(path.trim()).output() {
        let ldd = String::from_utf8_lossy(&ldd.stdout);
        let loaded = ldd
            .lines()
            .find_map(|l| l.trim().strip_prefix("libLLVM").map(str::to_owned));
        if let Some(loaded) = loaded
            && !loaded.starts_with(&format!(".so.{major}"))
            && !loaded.starts_with(&format!("-{major}"))
        {
            return Ok(Some(format!(
                "a bpf-linker on LLVM {major} (found one loading libLLVM{loaded})"
            )));
        }
    }
    Ok(None)
}

fn install_bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let libllvm = nightly_libllvm()?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    // A stable directory: the installed binary keeps an rpath to it.
    let prefix = Path::new(&home).join(".local/share/llvm-rust-nightly");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let so_name = libllvm.file_name().context("libLLVM path has no file name")?;
    for link in [lib.join(so_name), lib.join("libLLVM.so")] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    run(cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))?;
    ensure!(
        Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "bpf-linker is not on PATH after `cargo install`; add ~/.cargo/bin to PATH"
    );
    Ok(())
}

fn capture(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

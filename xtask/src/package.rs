//! `cargo xtask package`: the Debian package, built with `dpkg-deb` from a staged tree (no
//! packaging tool to install), and the checks `cargo xtask test` runs on it.
//!
//! What it installs: `/usr/bin/sluice` (the XDP program is inside), the systemd units from
//! `deploy/systemd/` under `/lib/systemd/system/`, and under `/usr/share/doc/sluice/` the README,
//! the commented example configs and the relay host's sysctl file (`examples/`). Its postinst
//! creates the `sluice` and `sluice-agent` system users the units run as; nothing is enabled or
//! started: the operator writes `/etc/sluice/relay.toml` or `agent.toml` first (the units
//! refuse to start without them).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::{run, workspace_root};

/// Files the package installs, relative to its root, with where they come from in the
/// workspace (the binary's source is given at build time).
const FILES: [(&str, &str); 7] = [
    (
        "lib/systemd/system/sluice-relay.service",
        "deploy/systemd/sluice-relay.service",
    ),
    (
        "lib/systemd/system/sluice-agent.service",
        "deploy/systemd/sluice-agent.service",
    ),
    ("usr/share/doc/sluice/README.md", "README.md"),
    ("usr/share/doc/sluice/examples/relay.toml", "examples/relay.toml"),
    ("usr/share/doc/sluice/examples/agent.toml", "examples/agent.toml"),
    (
        "usr/share/doc/sluice/examples/90-sluice-relay.conf",
        "deploy/sysctl/90-sluice-relay.conf",
    ),
    ("usr/share/doc/sluice/copyright", "deploy/debian/copyright"),
];

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    for user in sluice sluice-agent; do
        if ! getent passwd "$user" >/dev/null; then
            adduser --system --group --no-create-home --home "/var/lib/$user" --quiet "$user"
        fi
    done
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
"#;

/// How hard `dpkg-deb` compresses: the test's check packages a debug build, which is large and
/// thrown away, so it only stores.
#[derive(Clone, Copy)]
pub enum Compression {
    /// dpkg-deb's default (xz).
    Default,
    /// None (`-Znone`).
    Store,
}

/// Builds the package from `binary`; returns its path (under `target/debian/`).
pub fn build(binary: &Path, compression: Compression) -> Result<PathBuf> {
    let root = workspace_root();
    let version = workspace_version(&root)?;
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?;
    let name = format!("sluice_{version}_{arch}");
    let out = root.join("target/debian");
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    let install = |to: &str, from: &Path, mode: u32| -> Result<()> {
        let target = stage.join(to);
        std::fs::create_dir_all(target.parent().expect("a file under the stage"))?;
        std::fs::copy(from, &target).with_context(|| format!("copying {}", from.display()))?;
        set_mode(&target, mode)
    };
    install("usr/bin/sluice", binary, 0o755)?;
    for (to, from) in FILES {
        install(to, &root.join(from), 0o644)?;
    }
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    let installed_kib = dir_size(&stage)? / 1024;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: sluice\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Sluice maintainers \
             <maintainers@sluice.invalid>\nInstalled-Size: {installed_kib}\nDepends: libc6, adduser\n\
             Section: net\nPriority: optional\nHomepage: https://sluice.invalid\nDescription: \
             XDP-shielded edge relay for on-prem apps\n Publishes applications that run on premises \
             to any browser\n through relays that route TLS by SNI and never decrypt it. One binary \
             is\n both the relay (with its XDP shield) and the agent next to the app.\n"
        ),
    )?;
    for (script, text) in [("postinst", POSTINST), ("postrm", POSTRM)] {
        std::fs::write(debian.join(script), text)?;
        set_mode(&debian.join(script), 0o755)?;
    }
    let deb = out.join(format!("{name}.deb"));
    let mut dpkg_deb = Command::new("dpkg-deb");
    dpkg_deb.args(["--root-owner-group", "--build"]);
    if let Compression::Store = compression {
        dpkg_deb.arg("-Znone");
    }
    run(dpkg_deb.arg(&stage).arg(&deb))?;
    std::fs::remove_dir_all(&stage)?;
    Ok(deb)
}

/// Checks a built package: its metadata and file list, and its systemd units with
/// `systemd-analyze verify` against the package's own tree (with this host's units beside
/// them), which must have nothing to say.
pub fn check(deb: &Path) -> Result<()> {
    let info = capture(Command::new("dpkg-deb").arg("--field").arg(deb).arg("Package"))?;
    ensure!(info == "sluice", "package name {info:?}");
    let contents = capture(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for path in std::iter::once("usr/bin/sluice").chain(FILES.iter().map(|(to, _)| *to)) {
        ensure!(
            contents.lines().any(|l| l.ends_with(&format!("./{path}"))),
            "{} does not install /{path}",
            deb.display()
        );
    }
    let root = tempfile_dir("sluice-deb-check")?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    // The units refer to /bin/kill and /usr/bin/install, and need the host's targets.
    let units = root.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").context("this host's systemd units")? {
        let entry = entry?;
        let target = units.join(entry.file_name());
        if !target.exists() && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    for (binary, to) in [("/bin/kill", "bin/kill"), ("/usr/bin/install", "usr/bin/install")] {
        std::fs::create_dir_all(root.join(to).parent().expect("under the root"))?;
        std::fs::copy(binary, root.join(to))?;
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(units.join("sluice-relay.service"))
        .arg(units.join("sluice-agent.service"))
        .output()
        .context("running systemd-analyze (Debian's systemd package)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
    if !output.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify on the packaged units:\n{said}");
    }
    println!("xtask: package {}: contents and units verified", deb.display());
    Ok(())
}

/// `cargo xtask package`: a release build, packaged.
pub fn release() -> Result<()> {
    crate::build(true)?;
    let deb = build(
        &workspace_root().join("target/release/sluice"),
        Compression::Default,
    )?;
    check(&deb)?;
    println!("{}", deb.display());
    Ok(())
}

fn workspace_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_owned)
        .context("no version in the workspace Cargo.toml")
}

fn capture(command: &mut Command) -> Result<String> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

//! Where a relay pins its shield maps so the CLI can edit a running shield:
//! `/sys/fs/bpf/sluice/<instance>/<MAP_NAME>`, one directory per relay instance (named after its
//! first edge port). The relay creates the directory at start and removes it at shutdown.
//!
//! `/sys/fs/bpf` belongs to a mount namespace: a relay started by `ip netns exec` (which mounts
//! a fresh `/sys` for the network namespace) or in a container pins into a BPF filesystem that
//! processes in other mount namespaces do not see. They reach it through the relay's root,
//! `/proc/<relay pid>/root/sys/fs/bpf/sluice`, or by entering its mount namespace.
use std::path::{Path, PathBuf};

use proxy_common::MAP_POLICY;

use super::ShieldError;

/// Directories named so hold scratch pins (an upgrade's reference maps), not an instance.
pub const REFERENCE_PREFIX: &str = "reference-";
/// Root of every relay's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/sluice";
const BPF_FS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of relay instance `instance`.
pub fn instance_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// Makes sure `/sys/fs/bpf` is a BPF filesystem (mounting one if nothing is mounted there, as
/// systemd does on most distributions) and creates a fresh `dir` for our pins. Pins left by a
/// relay that died without cleaning up are removed first.
pub fn prepare(dir: &Path) -> Result<(), ShieldError> {
    ensure_bpffs()?;
    if dir.exists() {
        tracing::warn!(dir = %dir.display(), "removing stale shield pins left by an earlier relay");
        remove(dir);
    }
    std::fs::create_dir_all(dir).map_err(|source| ShieldError::PinDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes our pins (the maps stay alive while the program or a process still holds them).
pub fn remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Instances with pinned maps under [`PIN_ROOT`], sorted.
pub fn instances() -> Vec<String> {
    instances_in(Path::new(PIN_ROOT))
}

/// Instances with pinned maps under `root` (directories holding a relay's pins), sorted.
pub fn instances_in(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(REFERENCE_PREFIX))
                .filter(|e| holds_pins(&e.path()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `dir` is one relay instance's pin directory.
pub fn holds_pins(dir: &Path) -> bool {
    dir.join(MAP_POLICY).exists()
}

/// Why nothing is pinned under `root`, as seen from this process: it is missing, it holds no
/// instance, or (for a path under `/sys/fs/bpf`) no BPF filesystem is mounted there in this
/// mount namespace.
pub fn why_empty(root: &Path) -> String {
    let state = if root.exists() {
        "holds no relay instance"
    } else {
        "does not exist"
    };
    if root.starts_with(BPF_FS) && !is_bpffs(BPF_FS) {
        format!(
            "{} {state}; {BPF_FS} is not a BPF filesystem in this mount namespace",
            root.display()
        )
    } else {
        format!("{} {state}", root.display())
    }
}

fn ensure_bpffs() -> Result<(), ShieldError> {
    if is_bpffs(BPF_FS) {
        return Ok(());
    }
    let (source, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: valid NUL-terminated strings; no mount data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ShieldError::PinDir {
            path: PathBuf::from(BPF_FS),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted the BPF filesystem on /sys/fs/bpf");
    Ok(())
}

fn is_bpffs(path: &str) -> bool {
    let Ok(path) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

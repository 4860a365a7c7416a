//! The on-disk side of the store: the writer lock, atomic replacement of `store.json`, and the
//! cheap change fingerprint the relay polls.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use super::StoreError;

/// Cheap change detector for `store.json`: modification time, size, inode and device.
///
/// Every write replaces the file by rename, so a new inode and mtime come with each change;
/// comparing all four makes a missed change need a reused inode, the same size and a write
/// within one filesystem timestamp tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoreFingerprint {
    mtime_sec: i64,
    mtime_nsec: i64,
    len: u64,
    ino: u64,
    dev: u64,
}

/// The fingerprint of `path`, `None` if it does not exist.
pub(super) fn fingerprint(path: &Path) -> Result<Option<StoreFingerprint>, StoreError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(StoreFingerprint {
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            len: m.size(),
            ino: m.ino(),
            dev: m.dev(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("cannot stat", path, e)),
    }
}

/// An exclusive `flock` on the lock file, held until dropped (closing the descriptor releases
/// it, also when the process dies).
pub(super) struct WriteLock {
    _file: File,
}

/// Blocks until this process holds the exclusive writer lock at `path`.
pub(super) fn lock(path: &Path) -> Result<WriteLock, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io("cannot open lock file", path, e))?;
    // `File::lock` is flock(LOCK_EX) on Linux: whole-file, per open file description, so two
    // handles in one process exclude each other as well as two processes do.
    file.lock().map_err(|e| StoreError::io("cannot lock", path, e))?;
    Ok(WriteLock { _file: file })
}

/// Replaces `path` with `contents` atomically and durably: write a 0600 temp file in the same
/// directory, fsync it, rename it over `path`, fsync the directory. Readers see either the old
/// or the new file, never a partial one. Call with the write lock held.
pub(super) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("store.json");
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = write_then_rename(&tmp, path, contents);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("cannot fsync directory", dir, e))
}

fn write_then_rename(tmp: &Path, path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    // A temp file left by a writer that crashed with our pid is stale: we hold the lock.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("cannot remove stale temp file", tmp, e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| StoreError::io("cannot create", tmp, e))?;
    file.write_all(contents)
        .map_err(|e| StoreError::io("cannot write", tmp, e))?;
    file.sync_all()
        .map_err(|e| StoreError::io("cannot fsync", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| StoreError::io("cannot rename temp file over", path, e))
}

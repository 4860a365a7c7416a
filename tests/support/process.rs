//! Helpers for tests that run Sluice as a real process, and look into its memory.
use std::path::PathBuf;
use std::process::Child;

/// A `sluice relay` child process, killed on drop.
pub struct RelayProcess {
    pub child: Child,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `sluice` binary built next to the running test (target/<profile>/sluice).
pub fn sluice_binary() -> PathBuf {
    // target/debug/deps/<test>-<hash> -> target/debug/sluice
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("sluice");
    assert!(
        bin.is_file(),
        "{} not found: build the workspace first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A loopback port that was free a moment ago (for configs that need a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every page of process `pid` that holds anything: the pages of its readable mappings that are
/// in memory or in swap, concatenated (needs ptrace access: root or parent). Pages never touched
/// hold nothing and are left out, so a mostly reserved heap (mimalloc reserves a GiB) costs only
/// what it uses, and reading does not fault it in.
pub fn read_process_memory(pid: u32) -> Vec<u8> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        // One 64-bit entry per page: bit 63 present in memory, bit 62 swapped out.
        let pages = ((end - start) / page) as usize;
        let mut entries = vec![0u8; pages * 8];
        if pagemap.seek(SeekFrom::Start(start / page * 8)).is_err()
            || pagemap.read_exact(&mut entries).is_err()
        {
            continue;
        }
        let held = |i: usize| {
            let entry = u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap());
            entry & (0b11 << 62) != 0
        };
        let mut i = 0;
        while i < pages {
            if !held(i) {
                i += 1;
                continue;
            }
            let run = (i..pages).take_while(|&j| held(j)).count();
            let mut region = vec![0u8; run * page as usize];
            if mem.seek(SeekFrom::Start(start + i as u64 * page)).is_ok()
                && mem.read_exact(&mut region).is_ok()
            {
                out.extend_from_slice(&region);
            }
            i += run;
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// The 32-byte private scalar inside a PKCS#8 P-256 key (`02 01 01 04 20 <scalar>`).
pub fn ec_private_scalar(pkcs8: &[u8]) -> &[u8] {
    let at = pkcs8
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("P-256 PKCS#8 key");
    &pkcs8[at + 5..at + 37]
}

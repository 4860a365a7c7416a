//! Helpers for tests that run Sluice as a real process.
use std::path::PathBuf;

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

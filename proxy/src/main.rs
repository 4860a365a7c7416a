//! `sluice`: the command-line edge of the relay. Parses arguments, sets up logging, and hands
//! off to the library; errors become one readable message and a non-zero exit code here.
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Edge relay for on-prem apps: routes TLS by SNI, never decrypts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks that this host can run the XDP shield: loads it and runs it on a test frame.
    ShieldProbe,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::ShieldProbe => shield_probe(),
    }
}

fn shield_probe() -> anyhow::Result<()> {
    let mut shield =
        sluice::shield::Shield::load().context("loading the XDP shield (needs root or CAP_BPF)")?;
    // An Ethernet frame carrying ARP: not IP, so the shield must pass it untouched.
    let mut frame = [0u8; 42];
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let outcome = shield.test_run(&frame, 1000).context("BPF_PROG_TEST_RUN")?;
    anyhow::ensure!(
        outcome.action == sluice::shield::action::PASS,
        "the shield returned XDP action {} for an ARP frame; expected XDP_PASS",
        outcome.action
    );
    println!(
        "XDP shield loaded and verified by the kernel; test frame passed in {:?}",
        outcome.per_packet
    );
    Ok(())
}

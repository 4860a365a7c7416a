//! `sluice shield ...`: edits the shield of a running relay through the maps it pinned under
//! `/sys/fs/bpf/sluice/<instance>/` — bans, allow and deny lists — and shows its counters.
//! Changes take effect for the next packet; nothing is restarted.
use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use proxy_common::CidrOrigin;

use super::maps::{CidrList, ShieldMaps};
use super::{ShieldError, pin};
use crate::cidr::Cidr;

/// Arguments of `sluice shield`.
#[derive(Debug, Args)]
pub struct ShieldArgs {
    /// Which relay, when several run on this host: the name of its pin directory (its first
    /// edge port, e.g. `443`).
    #[arg(long, global = true)]
    pub instance: Option<String>,
    /// What to show or change.
    #[command(subcommand)]
    pub command: ShieldCommand,
}

/// The `sluice shield` subcommands.
#[derive(Debug, Subcommand)]
pub enum ShieldCommand {
    /// Sources banned in the kernel.
    Bans {
        /// List, add or remove.
        #[command(subcommand)]
        action: BanAction,
    },
    /// Networks that bypass every limit (allow) or are always dropped (deny).
    Cidr {
        /// List, allow, deny or remove.
        #[command(subcommand)]
        action: CidrAction,
    },
    /// Packets and bytes per verdict since the relay started.
    Counters,
}

/// `sluice shield bans ...`.
#[derive(Debug, Subcommand)]
pub enum BanAction {
    /// List every ban in force and its time left (operator, abuse and kernel-decided bans).
    List,
    /// Ban a source address.
    Add {
        /// The address to ban (IPv4 or IPv6).
        ip: IpAddr,
        /// How long, e.g. `10m`; without it the ban lasts until removed.
        #[arg(long = "for", value_parser = crate::config::ban_duration)]
        duration: Option<Duration>,
    },
    /// Lift a ban.
    Remove {
        /// The banned address.
        ip: IpAddr,
    },
}

/// `sluice shield cidr ...`.
#[derive(Debug, Subcommand)]
pub enum CidrAction {
    /// List both lists, with who put each network there (config or CLI).
    List,
    /// Never limit or ban this network (wins over deny).
    Allow {
        /// A network like `10.0.0.0/8`, or a single address.
        cidr: Cidr,
    },
    /// Drop this network's traffic to protected ports.
    Deny {
        /// A network like `198.51.100.0/24`, or a single address.
        cidr: Cidr,
    },
    /// Take a network off the allow or deny list.
    Remove {
        /// The network exactly as listed.
        cidr: Cidr,
    },
}

/// Why a `sluice shield` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No relay on this host has pinned shield maps: none is running, or it runs without XDP.
    #[error(
        "no relay's shield maps are pinned under {root}: is a relay running with XDP enabled \
         (`[shield] interfaces` in relay.toml)?"
    )]
    NothingPinned {
        /// Where pins are looked for ([`pin::PIN_ROOT`]).
        root: &'static str,
    },
    /// `--instance` names no pinned relay.
    #[error("no relay instance {instance:?} is pinned under {root} (pinned: {pinned})")]
    UnknownInstance {
        /// The instance asked for.
        instance: String,
        /// Where pins are looked for ([`pin::PIN_ROOT`]).
        root: &'static str,
        /// The instances that are pinned, comma-separated.
        pinned: String,
    },
    /// Several relays are pinned and no `--instance` chose one.
    #[error("several relays are running ({pinned}); choose one with --instance")]
    Ambiguous {
        /// The instances that are pinned, comma-separated.
        pinned: String,
    },
    /// Opening or editing the maps failed.
    #[error(transparent)]
    Shield(#[from] ShieldError),
    /// `sluice shield-probe`: the program answered a test frame wrongly.
    #[error("the shield returned XDP action {action} for an ARP frame; expected XDP_PASS")]
    ProbeFailed {
        /// What it returned.
        action: u32,
    },
    /// Writing the report to `out` failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs one `sluice shield` command, writing its report to `out`.
pub fn run(args: &ShieldArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let instance = choose_instance(args.instance.as_deref(), &pin::instances())?;
    let mut maps = ShieldMaps::open_pinned(&pin::instance_dir(&instance))?;
    match &args.command {
        ShieldCommand::Bans { action } => match action {
            BanAction::List => {
                for ban in maps.bans()? {
                    let remaining = match ban.remaining {
                        Some(left) => {
                            humantime::format_duration(Duration::from_secs(left.as_secs())).to_string()
                        }
                        None => "until removed".to_owned(),
                    };
                    writeln!(out, "{}\t{remaining}", ban.source)?;
                }
            }
            BanAction::Add { ip, duration } => {
                maps.ban(*ip, *duration)?;
                match duration {
                    Some(d) => writeln!(out, "banned {ip} for {}", humantime::format_duration(*d))?,
                    None => writeln!(out, "banned {ip} until removed")?,
                }
            }
            BanAction::Remove { ip } => {
                if maps.unban(*ip)? {
                    writeln!(out, "unbanned {ip}")?;
                } else {
                    writeln!(out, "{ip} was not banned")?;
                }
            }
        },
        ShieldCommand::Cidr { action } => match action {
            CidrAction::List => {
                for entry in maps.cidrs()? {
                    let origin = match entry.origin {
                        CidrOrigin::Config => "config",
                        CidrOrigin::Runtime => "runtime",
                    };
                    writeln!(out, "{}\t{}\t{origin}", entry.list.label(), entry.cidr)?;
                }
            }
            CidrAction::Allow { cidr } => {
                maps.add_cidr(CidrList::Allow, *cidr, CidrOrigin::Runtime)?;
                writeln!(out, "allowed {cidr}")?;
            }
            CidrAction::Deny { cidr } => {
                maps.add_cidr(CidrList::Deny, *cidr, CidrOrigin::Runtime)?;
                writeln!(out, "denied {cidr}")?;
            }
            CidrAction::Remove { cidr } => {
                if maps.remove_cidr(*cidr)? {
                    writeln!(out, "removed {cidr}")?;
                } else {
                    writeln!(out, "{cidr} was on neither list")?;
                }
            }
        },
        ShieldCommand::Counters => {
            for (reason, counter) in maps.counters()? {
                writeln!(out, "{}\t{}\t{}", reason.label(), counter.packets, counter.bytes)?;
            }
        }
    }
    Ok(())
}

/// `sluice shield-probe`: loads the shield into the running kernel (the verifier checks it) and
/// runs it on a test frame with `BPF_PROG_TEST_RUN`: a quick check that this host can run it.
pub fn probe(out: &mut dyn Write) -> Result<(), CliError> {
    let mut shield = super::Shield::load()?;
    // An Ethernet frame carrying ARP: not IP, so the shield must pass it untouched.
    let mut frame = [0u8; 42];
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let outcome = shield.test_run(&frame, 1000)?;
    if outcome.action != super::action::PASS {
        return Err(CliError::ProbeFailed {
            action: outcome.action,
        });
    }
    writeln!(
        out,
        "XDP shield loaded and verified by the kernel; test frame passed in {:?}",
        outcome.per_packet
    )?;
    Ok(())
}

/// The instance to edit: the one asked for, or the only one pinned.
fn choose_instance(asked: Option<&str>, pinned: &[String]) -> Result<String, CliError> {
    let root = pin::PIN_ROOT;
    match (asked, pinned) {
        (_, []) => Err(CliError::NothingPinned { root }),
        (Some(asked), pinned) if pinned.iter().any(|p| p == asked) => Ok(asked.to_owned()),
        (Some(asked), pinned) => Err(CliError::UnknownInstance {
            instance: asked.to_owned(),
            root,
            pinned: pinned.join(", "),
        }),
        (None, [only]) => Ok(only.clone()),
        (None, pinned) => Err(CliError::Ambiguous {
            pinned: pinned.join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_the_only_or_the_named_instance() {
        let one = vec!["443".to_owned()];
        let two = vec!["443".to_owned(), "8443".to_owned()];
        assert!(matches!(
            choose_instance(None, &[]),
            Err(CliError::NothingPinned { .. })
        ));
        assert!(matches!(
            choose_instance(Some("443"), &[]),
            Err(CliError::NothingPinned { .. })
        ));
        assert_eq!(choose_instance(None, &one).unwrap(), "443");
        assert!(matches!(
            choose_instance(None, &two),
            Err(CliError::Ambiguous { .. })
        ));
        assert_eq!(choose_instance(Some("8443"), &two).unwrap(), "8443");
        assert!(matches!(
            choose_instance(Some("80"), &two),
            Err(CliError::UnknownInstance { .. })
        ));
        let message = choose_instance(None, &[]).unwrap_err().to_string();
        assert!(message.contains("/sys/fs/bpf/sluice"), "{message}");
    }
}

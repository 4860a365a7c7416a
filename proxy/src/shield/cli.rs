//! `sluice shield ...`: edits the shield of a running relay through the maps it pinned under
//! `/sys/fs/bpf/sluice/<instance>/` (or wherever `--pin-dir` says) — bans, allow and deny lists
//! — and shows its counters. Changes take effect for the next packet; nothing is restarted.
//! Bans are per source network (see [`super::prefix`]): the output names the network banned.
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
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
    /// Where the relay's pins are: its instance directory, or a directory of instances
    /// (default /sys/fs/bpf/sluice). For a relay in another mount namespace (started by
    /// `ip netns exec`, in a container): /proc/<relay pid>/root/sys/fs/bpf/sluice.
    #[arg(long, global = true, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
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
    /// Ban the source an address belongs to (its /64 for IPv6 at the default `ipv6_prefix`).
    Add {
        /// The address to ban (IPv4 or IPv6).
        ip: IpAddr,
        /// How long, e.g. `10m`; without it the ban lasts until removed.
        #[arg(long = "for", value_parser = crate::config::ban_duration)]
        duration: Option<Duration>,
    },
    /// Lift the ban on the source an address belongs to.
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
        "no relay's shield maps are pinned here ({why}). Is a relay running with XDP enabled \
         (`[shield] interfaces` in relay.toml)? A relay in another mount namespace (started by \
         `ip netns exec`, which mounts its own /sys, or in a container) pins into a \
         /sys/fs/bpf this command cannot see: run it in the relay's mount namespace \
         (`nsenter --mount=/proc/<relay pid>/ns/mnt sluice shield ...`) or pass \
         `--pin-dir /proc/<relay pid>/root/sys/fs/bpf/sluice`"
    )]
    NothingPinned {
        /// Where it looked and what it found there.
        why: String,
    },
    /// `--instance` names no pinned relay.
    #[error("no relay instance {instance:?} is pinned under {root} (pinned: {pinned})", root = .root.display())]
    UnknownInstance {
        /// The instance asked for.
        instance: String,
        /// Where pins were looked for.
        root: PathBuf,
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
    let dir = locate(args.pin_dir.as_deref(), args.instance.as_deref())?;
    let mut maps = ShieldMaps::open_pinned(&dir)?;
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
                let source = maps.ban(*ip, *duration)?;
                match duration {
                    Some(d) => writeln!(out, "banned {source} for {}", humantime::format_duration(*d))?,
                    None => writeln!(out, "banned {source} until removed")?,
                }
            }
            BanAction::Remove { ip } => {
                let source = maps.source_of(*ip)?;
                if maps.unban(*ip)? {
                    writeln!(out, "unbanned {source}")?;
                } else {
                    writeln!(out, "{source} was not banned")?;
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

/// The pin directory of the relay to edit: `pin_dir` itself when it holds pins, else the
/// instance under it (default [`pin::PIN_ROOT`]) asked for, or the only one there.
fn locate(pin_dir: Option<&Path>, instance: Option<&str>) -> Result<PathBuf, CliError> {
    let root = pin_dir.unwrap_or(Path::new(pin::PIN_ROOT));
    if pin::holds_pins(root) {
        return match instance {
            Some(asked) if root.file_name().is_none_or(|name| name != asked) => {
                Err(CliError::UnknownInstance {
                    instance: asked.to_owned(),
                    root: root.to_path_buf(),
                    pinned: root.display().to_string(),
                })
            }
            _ => Ok(root.to_path_buf()),
        };
    }
    let name = choose_instance(instance, &pin::instances_in(root), root)?;
    Ok(root.join(name))
}

/// The instance to edit: the one asked for, or the only one pinned under `root`.
fn choose_instance(asked: Option<&str>, pinned: &[String], root: &Path) -> Result<String, CliError> {
    match (asked, pinned) {
        (_, []) => Err(CliError::NothingPinned {
            why: pin::why_empty(root),
        }),
        (Some(asked), pinned) if pinned.iter().any(|p| p == asked) => Ok(asked.to_owned()),
        (Some(asked), pinned) => Err(CliError::UnknownInstance {
            instance: asked.to_owned(),
            root: root.to_path_buf(),
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
        let root = Path::new(pin::PIN_ROOT);
        let one = vec!["443".to_owned()];
        let two = vec!["443".to_owned(), "8443".to_owned()];
        assert!(matches!(
            choose_instance(None, &[], root),
            Err(CliError::NothingPinned { .. })
        ));
        assert!(matches!(
            choose_instance(Some("443"), &[], root),
            Err(CliError::NothingPinned { .. })
        ));
        assert_eq!(choose_instance(None, &one, root).unwrap(), "443");
        assert!(matches!(
            choose_instance(None, &two, root),
            Err(CliError::Ambiguous { .. })
        ));
        assert_eq!(choose_instance(Some("8443"), &two, root).unwrap(), "8443");
        assert!(matches!(
            choose_instance(Some("80"), &two, root),
            Err(CliError::UnknownInstance { .. })
        ));
    }

    #[test]
    fn finding_nothing_says_where_it_looked_and_how_to_reach_another_mount_namespace() {
        let missing = std::env::temp_dir().join(format!("sluice-no-pins-{}", std::process::id()));
        let message = locate(Some(&missing), None).unwrap_err().to_string();
        assert!(
            message.contains(&format!("{} does not exist", missing.display())),
            "{message}"
        );
        assert!(message.contains("ip netns exec"), "{message}");
        assert!(
            message.contains("nsenter --mount=/proc/<relay pid>/ns/mnt"),
            "{message}"
        );
        assert!(
            message.contains("--pin-dir /proc/<relay pid>/root/sys/fs/bpf/sluice"),
            "{message}"
        );

        let empty = tempfile::tempdir().unwrap();
        let message = locate(Some(empty.path()), None).unwrap_err().to_string();
        assert!(
            message.contains(&format!("{} holds no relay instance", empty.path().display())),
            "{message}"
        );
    }

    #[test]
    fn pin_dir_names_an_instance_or_a_directory_of_instances() {
        let root = tempfile::tempdir().unwrap();
        for instance in ["443", "8443"] {
            let dir = root.path().join(instance);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(proxy_common::MAP_POLICY), b"").unwrap();
        }
        // A leftover directory without pins is no instance.
        std::fs::create_dir(root.path().join("stale")).unwrap();
        let instance = root.path().join("8443");
        assert_eq!(locate(Some(&instance), None).unwrap(), instance);
        assert_eq!(locate(Some(&instance), Some("8443")).unwrap(), instance);
        assert!(matches!(
            locate(Some(&instance), Some("443")),
            Err(CliError::UnknownInstance { .. })
        ));
        assert!(matches!(
            locate(Some(root.path()), None),
            Err(CliError::Ambiguous { .. })
        ));
        assert_eq!(
            locate(Some(root.path()), Some("443")).unwrap(),
            root.path().join("443")
        );
    }
}

//! Sluice: an edge relay that routes still-encrypted TLS streams to on-prem agents.
//!
//! # Layout
//!
//! The relay's data path, in the order a browser connection takes it:
//! [`relay::edge`] accepts it, reads its ClientHello or request head with the sans-IO parsers
//! of [`peek`], looks the hostname up in the [`route`] registry, hands it to one of the tenant's
//! agent sessions ([`relay::tunnel`]) over a data connection speaking the [`wire`] protocol, and
//! [`pump`] moves the bytes both ways without reading them. On premises, the [`agent`] dials the
//! relays, keeps those data connections ready and serves each stream to its target.
//!
//! Dependencies point one way, from the bottom of this list to its top (`cargo xtask test`
//! checks there is no cycle):
//!
//! - rules and wire formats, pure code: [`hostname`], [`cidr`], [`prefix`], [`peek`], [`wire`]
//! - mechanisms: [`pump`] (byte pumps), [`net`] (socket setup), [`route`] (the registry),
//!   [`config`] (the TOML files), [`store`] (tenants and tokens), [`shield`] (the XDP program
//!   from userspace), [`admin`] (the admin HTTP listener, metric plumbing, the API client)
//! - roles, composing the rest: [`relay`] and [`agent`]
#![warn(missing_docs, unreachable_pub)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod admin;
pub mod agent;
pub mod cidr;
pub mod config;
pub mod hostname;
pub mod net;
pub mod peek;
pub mod prefix;
pub mod pump;
pub mod relay;
pub mod route;
pub mod shield;
pub mod store;
pub mod wire;

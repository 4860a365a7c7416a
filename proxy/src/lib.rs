//! Sluice: an edge relay that routes still-encrypted TLS streams to on-prem agents.
//!
//! The relay's data path, in the order a browser connection takes it:
//! - [`edge`]: accept -> peek the ClientHello / Host header ([`peek`], sans-IO) -> route
//! - [`route`]: hostname -> tenant -> agent sessions
//! - [`tunnel`]: the agent tunnel (control, data connections, session credentials, TLS)
//! - [`pump`]: moves bytes both ways, never reading them
//!
//! Around it: [`admin`] serves metrics, probes and the admin API, [`relay`] composes the relay
//! process, [`agent`] is the on-prem side, [`store`]
//! holds tenants and tokens, [`config`] parses the TOML files, and [`shield`] drives the XDP
//! program that drops floods in the kernel.
pub mod admin;
pub mod agent;
pub mod config;
pub mod edge;
pub mod peek;
pub mod pump;
pub mod relay;
pub mod route;
pub mod shield;
pub mod store;
pub mod tunnel;

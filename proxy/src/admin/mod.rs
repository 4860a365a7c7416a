//! The admin side of a Sluice process, for SREs and the CLI: Prometheus metrics, health and
//! readiness probes, and (on the relay) a small JSON API over tenants, tokens and live tunnels.
//!
//! - [`client`]: the blocking client the CLI uses
//! - [`http`]: the listener (hyper), bearer-token check, request plumbing
//! - [`metrics`]: the relay's metric families and the tenant-label cardinality cap
//! - [`relay_api`]: the relay's endpoints
pub mod client;
pub mod http;
pub mod metrics;
pub mod relay_api;

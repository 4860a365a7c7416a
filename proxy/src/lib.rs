//! Sluice: an edge relay that routes still-encrypted TLS streams to on-prem agents.
//!
//! Module map (the data path reads top to bottom):
//! - [`shield`]: the XDP program in the kernel — drops floods and banned sources before the proxy.
//! - [`route`]: hostname patterns tenants own and agents register, and SNI lookups against them.
//! - [`store`]: the embedded store of tenants and agent tokens (`store.json`).
pub mod route;
pub mod shield;
pub mod store;

//! Sluice: an edge relay that routes still-encrypted TLS streams to on-prem agents.
//!
//! Module map (the data path reads top to bottom):
//! - [`shield`]: the XDP program in the kernel — drops floods and banned sources before the proxy.
pub mod shield;

//! Sluice: an edge relay that routes still-encrypted TLS streams to on-prem agents.
//!
//! Module map (the data path reads top to bottom):
//! - [`shield`]: the XDP program in the kernel — drops floods and banned sources before the proxy.
//! - [`peek`]: sans-IO reading of a connection's first bytes (ClientHello SNI/ALPN, HTTP/1.x head).
pub mod peek;
pub mod shield;

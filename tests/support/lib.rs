//! Shared helpers for Sluice's integration tests: certificates, on-prem servers, a browser
//! stand-in, a whole relay+agents deployment, crafted frames for the XDP programs, and a delayed
//! link between network namespaces (a WAN on one machine).
pub mod client;
pub mod frames;
pub mod netns;
pub mod pki;
pub mod process;
pub mod records;
pub mod servers;
pub mod wan;
pub mod world;

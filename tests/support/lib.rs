//! Shared helpers for Sluice's integration tests: certificates, on-prem servers, a browser
//! stand-in, a whole relay+agents deployment, and crafted frames for the XDP programs.
pub mod client;
pub mod etcd;
pub mod frames;
pub mod netns;
pub mod pki;
pub mod process;
pub mod records;
pub mod servers;
pub mod world;

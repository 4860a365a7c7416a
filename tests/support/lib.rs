//! Shared helpers for Sluice's integration tests: certificates, on-prem servers (line echo and
//! a web app), a browser stand-in and a real headless browser, a real ACME server, a whole
//! relay+agents deployment, crafted frames for the XDP programs, and a delayed link between
//! network namespaces (a WAN on one machine).
pub mod browser;
pub mod client;
pub mod etcd;
pub mod frames;
pub mod netns;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod records;
pub mod servers;
pub mod wan;
pub mod web;
pub mod world;

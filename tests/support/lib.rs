//! Shared helpers for Sluice's integration tests: crafted frames for the XDP programs.
pub mod frames;

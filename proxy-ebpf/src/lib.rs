//! Empty on purpose: the XDP programs live in the `sluice-xdp` binary target (`src/main.rs`).
//! This library target only exists so `proxy` can name this crate as a build dependency and be
//! rebuilt when it changes.
#![no_std]

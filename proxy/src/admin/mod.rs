//! The admin side of a Sluice process, for SREs and the CLI: the HTTP listener that serves
//! metrics, probes and (on the relay) the JSON API, the metric plumbing both processes use, and
//! the client the CLI talks to a running relay with. The endpoints themselves live with what
//! they show: `relay::api` and `agent::metrics`.
//!
//! - [`http`]: the listener (hyper), bearer-token check, request plumbing
//! - [`metrics`]: registration helpers, text exposition, gauge guard
//! - [`client`]: the blocking client the CLI uses
pub mod client;
pub mod http;
pub mod metrics;

//! Sans-IO peeking: owns reading the opening message of a client's byte stream — a TLS ClientHello
//! ([`tls`]) or a plaintext HTTP/1.x request head ([`http`]) — far enough to route the connection,
//! without consuming, decrypting or rewriting anything, and deciding how a connection that cannot
//! be served is turned away ([`refusal`]: what it counts as, whether it is abuse, the TLS alert or
//! HTTP response the client gets).
//!
//! Peekers are pure functions over the bytes received so far: no I/O, no timers, no state. The
//! caller appends what it reads to one buffer and calls the peeker again on the whole buffer after
//! every [`Peek::NeedMore`]; re-parsing from the start is cheap and bounded by the caller's
//! `max_len`. Any valid prefix of a message yields `NeedMore`, never an error, so the result does
//! not depend on how the network split the bytes.

pub mod http;
pub mod http_stream;
pub mod refusal;
pub mod tls;

pub use refusal::{Abuse, Refusal, Refused, Rejection, Reply};

/// Result of feeding the bytes received so far to a peeker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<T> {
    /// The bytes so far are a valid prefix of the message; call again with more.
    NeedMore,
    /// The message is complete and was parsed.
    Done(T),
}

//! How the edge turns a connection away: what it is counted as (the `reason` label of
//! `sluice_connections_rejected_total`), whether it counts towards a ban of its source, and the
//! bytes the client is told before the close (a TLS alert, an HTTP error, or nothing).
//!
//! The peekers decide a [`Refusal`] for every way a connection can fail on their port
//! ([`super::tls::refusal`], [`super::http::refusal`], and their parse errors'
//! `refusal()`); the edge applies it in one place. Pure data, no I/O.
use std::borrow::Cow;

/// Why a browser connection was turned away: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// A ClientHello without a server name.
    NoSni,
    /// A server name or Host no live route serves.
    UnknownHost,
    /// A ClientHello or HTTP request head that does not parse.
    ParseError,
    /// Not TLS at all on the TLS port.
    NotTls,
    /// No complete ClientHello / request head before the deadline.
    Timeout,
    /// Refused at accept by the userspace gate (rate limit, ban, denylist).
    RateLimited,
    /// The hostname's tenant has no live agent serving it.
    NoAgent,
    /// The tenant's agents had no data connection to spare within `agent_wait`.
    AgentBusy,
    /// A data connection was claimed, but writing the stream to it failed.
    AgentUnreachable,
    /// Forwarded plaintext HTTP carried a request the relay does not forward: for another host
    /// than the one the connection was routed by, CONNECT, an Upgrade, or ambiguous framing.
    ForwardRefused,
    /// The relay holds `edge.max_connections` browser connections already.
    ConnectionLimit,
    /// The source holds `edge.max_connections_per_source` connections already.
    SourceConnectionLimit,
    /// The relay holds `edge.max_unrouted_connections` connections that have not yet said
    /// where they go.
    UnroutedLimit,
    /// The source holds `edge.max_unrouted_per_source` such connections already.
    SourceUnroutedLimit,
    /// The tenant carries its `max_streams` streams already.
    TenantStreamLimit,
}

impl Rejection {
    /// Every rejection, for tests and documentation.
    pub const ALL: [Rejection; 15] = [
        Self::NoSni,
        Self::UnknownHost,
        Self::ParseError,
        Self::NotTls,
        Self::Timeout,
        Self::RateLimited,
        Self::NoAgent,
        Self::AgentBusy,
        Self::AgentUnreachable,
        Self::ForwardRefused,
        Self::ConnectionLimit,
        Self::SourceConnectionLimit,
        Self::UnroutedLimit,
        Self::SourceUnroutedLimit,
        Self::TenantStreamLimit,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::NoSni => "no_sni",
            Self::UnknownHost => "unknown_host",
            Self::ParseError => "parse_error",
            Self::NotTls => "not_tls",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::NoAgent => "no_agent",
            Self::AgentBusy => "agent_busy",
            Self::AgentUnreachable => "agent_unreachable",
            Self::ForwardRefused => "forward_refused",
            Self::ConnectionLimit => "connection_limit",
            Self::SourceConnectionLimit => "source_connection_limit",
            Self::UnroutedLimit => "unrouted_limit",
            Self::SourceUnroutedLimit => "source_unrouted_limit",
            Self::TenantStreamLimit => "tenant_stream_limit",
        }
    }
}

/// A rejection the shield holds against its source.
///
/// Only malformed input counts towards a ban at `abuse_threshold`: no browser sends it. A name
/// no tenant serves is what a browser sends for a mistyped or retired hostname, a tenant whose
/// agent is down, or an IP literal (no SNI at all, which is not abuse in any way); it counts
/// only as one *distinct* name towards SNI-scan detection (`scan_threshold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abuse {
    /// Not TLS, or a ClientHello that does not parse.
    BadClientHello,
    /// A request head that does not parse or is too large.
    BadHttpRequest,
    /// A failed TLS handshake on the tunnel port (agents that dial in complete theirs).
    BadTunnelHandshake,
    /// A server name (or Host) no route serves: one more name towards scan detection.
    UnknownName,
}

impl Abuse {
    /// The label in logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::BadClientHello => "bad_client_hello",
            Self::BadHttpRequest => "bad_http_request",
            Self::BadTunnelHandshake => "bad_tunnel_handshake",
            Self::UnknownName => "unknown_name",
        }
    }

    /// Whether this is malformed input (counted towards `abuse_threshold`).
    pub const fn is_malformed(self) -> bool {
        !matches!(self, Self::UnknownName)
    }
}

/// What the client is told before the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Nothing: the peer does not speak the protocol, or has not said enough to answer.
    Close,
    /// A fatal TLS alert, sent in the clear (correct before the server has answered).
    TlsAlert(AlertDescription),
    /// A complete small plain-text HTTP error response.
    Http {
        /// Status code.
        status: u16,
        /// Reason phrase.
        reason: &'static str,
        /// Body, shown by the browser.
        body: &'static str,
    },
}

impl Reply {
    /// The bytes to send (none for [`Reply::Close`]).
    pub fn bytes(&self) -> Cow<'static, [u8]> {
        match *self {
            Reply::Close => Cow::Borrowed(&[]),
            Reply::TlsAlert(description) => Cow::Owned(fatal_alert(description).to_vec()),
            Reply::Http { status, reason, body } => Cow::Owned(error_response(status, reason, body)),
        }
    }
}

/// How to turn one connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// What it is counted as.
    pub rejection: Rejection,
    /// Whether it tells against the source.
    pub abuse: Option<Abuse>,
    /// What the client is told.
    pub reply: Reply,
}

/// A parse error that knows how its connection is turned away.
pub trait Refused {
    /// The refusal for a connection whose opening bytes failed this way.
    fn refusal(&self) -> Refusal;
}

/// TLS alert descriptions we send (RFC 8446 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    /// `handshake_failure` (40).
    HandshakeFailure = 40,
    /// `decode_error` (50): the hello could not be decoded.
    DecodeError = 50,
    /// `protocol_version` (70).
    ProtocolVersion = 70,
    /// `internal_error` (80): our side failed.
    InternalError = 80,
    /// `unrecognized_name` (112): nothing is served under that name.
    UnrecognizedName = 112,
}

/// `ContentType.alert`.
pub(super) const CONTENT_TYPE_ALERT: u8 = 21;

/// A complete fatal alert record (7 bytes: 0x15, version 0x0303, length 2, level 2 = fatal,
/// description).
pub const fn fatal_alert(description: AlertDescription) -> [u8; 7] {
    const FATAL: u8 = 2;
    [CONTENT_TYPE_ALERT, 3, 3, 0, 2, FATAL, description as u8]
}

/// A complete small plain-text error response (e.g. 400, 404, 502, 503) with Connection: close.
///
/// A `status` outside 100..=599 becomes 500, and characters of `reason` that may not appear in a
/// reason phrase (controls, non-ASCII) are dropped, so the status line cannot be split.
pub fn error_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    let status = if (100..=599).contains(&status) {
        status
    } else {
        500
    };
    let reason: String = reason
        .chars()
        .filter(|&c| c == ' ' || c == '\t' || c.is_ascii_graphic())
        .collect();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_alert_bytes() {
        assert_eq!(
            fatal_alert(AlertDescription::UnrecognizedName),
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]
        );
        assert_eq!(fatal_alert(AlertDescription::HandshakeFailure)[6], 40);
        assert_eq!(fatal_alert(AlertDescription::DecodeError)[6], 50);
        assert_eq!(fatal_alert(AlertDescription::ProtocolVersion)[6], 70);
        assert_eq!(fatal_alert(AlertDescription::InternalError)[6], 80);
    }

    #[test]
    fn error_responses() {
        assert_eq!(
            error_response(404, "Not Found", "no route for a.example\n"),
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 23\r\n\
              Connection: close\r\n\r\nno route for a.example\n"
        );
        let response = String::from_utf8(error_response(1000, "Bad\r\nX: y", "\u{e9}")).unwrap();
        assert!(response.starts_with("HTTP/1.1 500 BadX: y\r\n"), "{response}");
        assert!(response.contains("Content-Length: 2\r\n"));
        for status in [400, 502, 503] {
            assert!(
                error_response(status, "x", "").starts_with(format!("HTTP/1.1 {status} x\r\n").as_bytes())
            );
        }
    }

    #[test]
    fn replies_render_their_bytes() {
        assert!(Reply::Close.bytes().is_empty());
        assert_eq!(
            &*Reply::TlsAlert(AlertDescription::DecodeError).bytes(),
            &fatal_alert(AlertDescription::DecodeError)
        );
        let http = Reply::Http {
            status: 502,
            reason: "Bad Gateway",
            body: "down\n",
        };
        assert_eq!(&*http.bytes(), &error_response(502, "Bad Gateway", "down\n")[..]);
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Rejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Rejection::ALL.len());
    }
}

//! The control messages agents and the relay exchange, one per frame.
//!
//! Unknown fields are refused so that a mismatched peer fails loudly instead of half-working.
use serde::{Deserialize, Serialize};

/// How the relay treats plaintext HTTP requests for a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    /// Answer with a redirect to https (the default: nothing travels in the clear).
    #[default]
    Redirect,
    /// Forward the plaintext request to the agent (opt-in, e.g. for ACME HTTP-01).
    Forward,
}

/// One hostname an agent offers to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAd {
    /// `app.example.com` or `*.example.com`.
    pub hostname: String,
    /// What the relay does with plaintext HTTP requests for it.
    #[serde(default)]
    pub http: HttpMode,
}

/// A route the relay did not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedRoute {
    /// The hostname as the agent advertised it.
    pub hostname: String,
    /// Why, for the agent's log: not a valid pattern, not among the tenant's hostnames, or
    /// served by a live agent of another tenant.
    pub reason: String,
}

/// Agent -> relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First frame of a control connection: authenticate and register routes.
    Hello {
        /// The [`PROTOCOL_VERSION`](crate::wire::PROTOCOL_VERSION) the agent speaks; the relay
        /// rejects any other.
        protocol: u16,
        /// The tenant token, `sluice_<id>_<secret>`, for an agent without a certificate (a relay
        /// with `agent_auth = "token"`); absent when the agent authenticated with its
        /// certificate in the TLS handshake.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The agent's configured name; becomes part of the session id.
        agent_name: String,
        /// The hostnames it offers to serve.
        routes: Vec<RouteAd>,
    },
    /// First and only frame of a data connection: join the session's idle pool.
    Data {
        /// The session id from `Welcome`.
        agent_id: String,
        /// The session credential (the current one, or the previous one until it expires).
        credential: String,
    },
    /// Re-authenticate for a fresh session credential: with the tenant token, or (absent) on
    /// the strength of the certificate the control connection was opened with.
    Renew {
        /// The tenant token; one of another tenant ends the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// First and only frame of an enrollment connection (no client certificate): the token
    /// vouches, once, for a key pair generated on the agent's machine.
    Enroll {
        /// The protocol version the agent speaks.
        protocol: u16,
        /// The tenant token, `sluice_<id>_<secret>`.
        token: String,
        /// The agent's configured name, kept in its record.
        agent_name: String,
        /// A PKCS#10 certificate signing request (PEM) for the agent's public key; its
        /// signature proves the agent holds the private key, which never leaves the machine.
        csr: String,
    },
    /// Asks for a fresh certificate for the key of the current one (sent at its half-life on a
    /// control connection opened with it).
    RenewCertificate,
    /// Replace the set of routes this agent serves (the tenant decides what is online).
    Routes {
        /// The whole new set: hostnames left out are unregistered.
        routes: Vec<RouteAd>,
    },
    /// Heartbeat; answered with a `Pong` carrying the same `seq`.
    Ping {
        /// Counts up from 1 on each end.
        seq: u64,
    },
    /// Answer to the relay's `Ping`.
    Pong {
        /// The `seq` of the ping answered.
        seq: u64,
    },
}

/// Relay -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelayMessage {
    /// Answer to an accepted `Hello`: the session is up.
    Welcome {
        /// Unique id of this agent session, in every log line on both sides.
        agent_id: String,
        /// Session credential for data connections; expires unless renewed.
        credential: String,
        /// Lifetime of `credential` in seconds; the agent renews at half of it.
        credential_ttl_secs: u64,
        /// Heartbeat interval in seconds (at least 1); a peer silent for
        /// [`MISSED_HEARTBEATS`](crate::wire::heartbeat::MISSED_HEARTBEATS) intervals is gone.
        heartbeat_secs: u64,
        /// Idle data connections the agent should keep open.
        pool_size: u32,
        /// The hostnames registered for this session, normalized.
        accepted: Vec<String>,
        /// The hostnames that were not, and why.
        refused: Vec<RefusedRoute>,
    },
    /// Authentication failed; the relay closes the connection after this.
    Rejected {
        /// Why, for the agent's log: the token was refused (and how), the protocol version is
        /// not the relay's, a data connection's session or credential is not valid, the first
        /// frame was not a `Hello` or `Data`.
        reason: String,
    },
    /// Answer to a successful `Renew`.
    Renewed {
        /// The new session credential; the previous one stays valid until it expires.
        credential: String,
        /// Lifetime of `credential` in seconds.
        credential_ttl_secs: u64,
    },
    /// Answer to an `Enroll` the store accepted: the agent's certificate. The relay closes the
    /// connection after this; the agent connects again with the certificate.
    Enrolled {
        /// The agent's record id (`sluice agents ...` takes it).
        agent: String,
        /// The certificate (PEM) for the agent's key, naming its tenant and agent id.
        certificate: String,
    },
    /// Answer to an `Enroll` beyond what the token may enroll: held until the tenant approves
    /// it (`sluice agents approve <agent>`); enrolling again with the same key gets the
    /// certificate then. The relay closes the connection after this.
    EnrollmentPending {
        /// The agent's record id, what the tenant approves.
        agent: String,
    },
    /// Answer to `RenewCertificate`: the new certificate for the same key.
    Certificate {
        /// The certificate (PEM).
        certificate: String,
    },
    /// `RenewCertificate` could not be served now (e.g. the store is unreachable); the session
    /// goes on and the agent asks again later.
    CertificateRefused {
        /// Why, for the agent's log.
        reason: String,
    },
    /// Answer to `Routes`: the session's routes now.
    RoutesUpdated {
        /// The hostnames registered for this session, normalized.
        accepted: Vec<String>,
        /// The hostnames that were not, and why.
        refused: Vec<RefusedRoute>,
    },
    /// The pool ran dry: open this many more data connections. `require_tls`: they are for
    /// plaintext HTTP streams, so they must be TLS even if the agent uses plain TCP otherwise.
    OpenData {
        /// How many one-shot connections to open (each serves one stream).
        count: u32,
        /// Open them over TLS whatever the agent's `data_transport`; omitted when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        require_tls: bool,
    },
    /// Heartbeat; answered with a `Pong` carrying the same `seq`.
    Ping {
        /// Counts up from 1 on each end.
        seq: u64,
    },
    /// Answer to the agent's `Ping`.
    Pong {
        /// The `seq` of the ping answered.
        seq: u64,
    },
    /// This relay process is being replaced by another on the same address (an upgrade): open
    /// a new session now, then close this one once the new one is welcomed. Streams already
    /// open finish on this process.
    Moving,
    /// The session ends (revoked, expired, relay shutting down); the relay closes after this.
    Goodbye {
        /// Why the session ended, as the relay logs it.
        reason: String,
    },
}

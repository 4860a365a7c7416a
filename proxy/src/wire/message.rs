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
    #[serde(default)]
    pub http: HttpMode,
}

/// A route the relay did not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedRoute {
    pub hostname: String,
    pub reason: String,
}

/// Agent -> relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First frame of a control connection: authenticate and register routes.
    Hello {
        protocol: u16,
        token: String,
        agent_name: String,
        routes: Vec<RouteAd>,
    },
    /// First and only frame of a data connection: join the session's idle pool.
    Data {
        agent_id: String,
        credential: String,
    },
    /// Re-authenticate with the tenant token for a fresh session credential.
    Renew {
        token: String,
    },
    /// Replace the set of routes this agent serves (the tenant decides what is online).
    Routes {
        routes: Vec<RouteAd>,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
}

/// Relay -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RelayMessage {
    Welcome {
        /// Unique id of this agent session, in every log line on both sides.
        agent_id: String,
        /// Session credential for data connections; expires unless renewed.
        credential: String,
        credential_ttl_secs: u64,
        heartbeat_secs: u64,
        /// Idle data connections the agent should keep open.
        pool_size: u32,
        accepted: Vec<String>,
        refused: Vec<RefusedRoute>,
    },
    /// Authentication failed; the relay closes the connection after this.
    Rejected {
        reason: String,
    },
    Renewed {
        credential: String,
        credential_ttl_secs: u64,
    },
    RoutesUpdated {
        accepted: Vec<String>,
        refused: Vec<RefusedRoute>,
    },
    /// The pool ran dry: open this many more data connections. `require_tls`: they are for
    /// plaintext HTTP streams, so they must be TLS even if the agent uses plain TCP otherwise.
    OpenData {
        count: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        require_tls: bool,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// The session ends (revoked, expired, relay shutting down); the relay closes after this.
    Goodbye {
        reason: String,
    },
}

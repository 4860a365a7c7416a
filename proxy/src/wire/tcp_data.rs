//! Plain-TCP data connections (agent option `data_transport = "tcp"`): how an agent joins the
//! relay's pool without a TLS handshake, and how the relay then hands it a stream. Sans-IO: the
//! wire format and the HMAC-SHA256 computations (ring); the sockets live in the relay's
//! `relay::tunnel::data` and the agent's `agent::data`.
//!
//! They carry browser TLS streams only, whose every byte is already encrypted and authenticated
//! end to end, so the relay can move them with splice(2) instead of a second layer of crypto.
//! What TLS would add on this leg is authentication, and this module provides it with the
//! session credential (256 random bits, issued and renewed over the control connection's TLS,
//! never sent on a plain connection) as the HMAC key:
//!
//! ```text
//! agent -> relay  "SLT1" | agent id len u16 | agent id | agent nonce [32]
//! relay -> agent  '+' | relay nonce [32]
//!                 (or '-' | reason | '\n' when it refuses the join, then closes)
//! agent -> relay  HMAC(credential, "sluice tcp-data v1 join" | id | nonces)      [32]
//!                 (the relay checks it against the live credentials, then parks the connection)
//! relay -> agent  stream header | HMAC(stream key, header)                         [32]
//!                 where stream key = HMAC(credential, "sluice tcp-data v1 stream" | id | nonces)
//! ```
//! Fresh nonces from both sides make a recorded join useless on another connection, and the
//! header's tag proves to the agent that the relay (the only other holder of the credential)
//! chose this hostname and client address for this very connection: nobody on the path can
//! open streams, inject a header or spoof the address the agent forwards in PROXY v2.
//! What is not hidden on this leg: the stream header (client address, hostname), i.e. the
//! metadata an observer between browser and relay sees anyway.
use ring::hmac;

use super::stream_header::{StreamHeader, StreamHeaderError};
use crate::peek::Peek;

/// First bytes of a plain-TCP data connection; a TLS connection starts with 0x16 instead.
pub const MAGIC: &[u8; 4] = b"SLT1";
/// Bytes in each side's nonce (256 bits).
pub const NONCE_LEN: usize = 32;
/// Bytes in an HMAC-SHA256 tag: the join proof, and the stream header's tag.
pub const TAG_LEN: usize = 32;
/// Longest agent id accepted in a join (ids are `tenant/agent/suffix`, far shorter).
pub const MAX_AGENT_ID_LEN: usize = 512;

const JOIN_LABEL: &[u8] = b"sluice tcp-data v1 join";
const STREAM_LABEL: &[u8] = b"sluice tcp-data v1 stream";

/// One side's fresh random contribution to a connection's tags.
pub type Nonce = [u8; NONCE_LEN];
/// An HMAC-SHA256 output.
pub type Tag = [u8; TAG_LEN];

/// Why a join or a sealed header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TcpDataError {
    /// The connection does not start with `SLT1` (checked from the first byte on).
    #[error("not a data connection (bad magic)")]
    BadMagic,
    /// The join's agent id is empty, over [`MAX_AGENT_ID_LEN`] bytes, or not UTF-8; carries its
    /// length.
    #[error("agent id of {0} bytes is empty or too long")]
    BadAgentId(usize),
    /// The stream header itself does not encode (sealing) or decode (opening).
    #[error("stream header: {0}")]
    Header(#[from] StreamHeaderError),
    /// The header's tag does not match: it was not sealed with this connection's stream key.
    #[error("stream header not authenticated by the session credential")]
    BadHeaderTag,
}

/// The agent's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The session id from `Welcome`, naming the session whose pool to join.
    pub agent_id: String,
    /// The agent's fresh nonce for this connection ([`new_nonce`]).
    pub agent_nonce: Nonce,
}

impl Join {
    /// The join's bytes: magic, id length, id, nonce. Fails if the id is empty or too long.
    pub fn encode(&self) -> Result<Vec<u8>, TcpDataError> {
        let id = self.agent_id.as_bytes();
        if id.is_empty() || id.len() > MAX_AGENT_ID_LEN {
            return Err(TcpDataError::BadAgentId(id.len()));
        }
        let mut out = Vec::with_capacity(MAGIC.len() + 2 + id.len() + NONCE_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&self.agent_nonce);
        Ok(out)
    }

    /// Decodes a join from the start of `buf`, returning it and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Peek<(Self, usize)>, TcpDataError> {
        let magic_seen = &buf[..buf.len().min(MAGIC.len())];
        if magic_seen != &MAGIC[..magic_seen.len()] {
            return Err(TcpDataError::BadMagic);
        }
        let Some(len) = buf.get(4..6) else {
            return Ok(Peek::NeedMore);
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len == 0 || len > MAX_AGENT_ID_LEN {
            return Err(TcpDataError::BadAgentId(len));
        }
        let end = 6 + len + NONCE_LEN;
        let Some(rest) = buf.get(6..end) else {
            return Ok(Peek::NeedMore);
        };
        let (id, nonce) = rest.split_at(len);
        let agent_id = std::str::from_utf8(id)
            .map_err(|_| TcpDataError::BadAgentId(len))?
            .to_owned();
        let agent_nonce = nonce.try_into().expect("split at NONCE_LEN");
        Ok(Peek::Done((
            Self {
                agent_id,
                agent_nonce,
            },
            end,
        )))
    }
}

/// Both nonces of one connection, which bind every tag to it.
#[derive(Debug, Clone, Copy)]
pub struct Nonces {
    /// Sent by the agent in its [`Join`].
    pub agent: Nonce,
    /// Sent by the relay in its challenge.
    pub relay: Nonce,
}

/// Fresh random bytes for a nonce.
pub fn new_nonce() -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .expect("the OS random source failed");
    nonce
}

fn keyed(credential: &str, label: &[u8], agent_id: &str, nonces: &Nonces) -> hmac::Context {
    let key = hmac::Key::new(hmac::HMAC_SHA256, credential.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(label);
    context.update(&(agent_id.len() as u16).to_be_bytes());
    context.update(agent_id.as_bytes());
    context.update(&nonces.agent);
    context.update(&nonces.relay);
    context
}

fn tag_of(context: hmac::Context) -> Tag {
    context
        .sign()
        .as_ref()
        .try_into()
        .expect("HMAC-SHA256 is 32 bytes")
}

/// The agent's proof that it holds `credential`, for this connection's nonces.
pub fn join_proof(credential: &str, agent_id: &str, nonces: &Nonces) -> Tag {
    tag_of(keyed(credential, JOIN_LABEL, agent_id, nonces))
}

/// Checks a join proof in constant time.
pub fn join_proof_valid(credential: &str, agent_id: &str, nonces: &Nonces, proof: &Tag) -> bool {
    use subtle::ConstantTimeEq as _;
    join_proof(credential, agent_id, nonces).ct_eq(proof).into()
}

/// The key that authenticates the stream header of one connection (32 bytes, so that parked
/// connections stay small; the HMAC key schedule runs once per stream).
pub struct StreamKey([u8; TAG_LEN]);

impl StreamKey {
    /// The stream key both ends derive from the credential the join proved, the session id
    /// and this connection's nonces.
    pub fn derive(credential: &str, agent_id: &str, nonces: &Nonces) -> Self {
        Self(tag_of(keyed(credential, STREAM_LABEL, agent_id, nonces)))
    }

    fn key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }

    /// Appends the encoded header and its tag to `out` (relay side).
    pub fn seal(&self, header: &StreamHeader, out: &mut Vec<u8>) -> Result<(), TcpDataError> {
        let start = out.len();
        header.encode(out)?;
        let tag = hmac::sign(&self.key(), &out[start..]);
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decodes a sealed header from the start of `buf` and checks its tag (agent side).
    pub fn open(&self, buf: &[u8]) -> Result<Peek<(StreamHeader, usize)>, TcpDataError> {
        let Peek::Done((header, used)) = StreamHeader::decode(buf)? else {
            return Ok(Peek::NeedMore);
        };
        let Some(tag) = buf.get(used..used + TAG_LEN) else {
            return Ok(Peek::NeedMore);
        };
        hmac::verify(&self.key(), &buf[..used], tag).map_err(|_| TcpDataError::BadHeaderTag)?;
        Ok(Peek::Done((header, used + TAG_LEN)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stream_header::StreamKind;

    const ID: &str = "acme/agent-1/abcd1234";

    fn nonces() -> Nonces {
        Nonces {
            agent: new_nonce(),
            relay: new_nonce(),
        }
    }

    fn header() -> StreamHeader {
        StreamHeader {
            kind: StreamKind::Tls,
            client: "192.0.2.7:51000".parse().unwrap(),
            relay_port: 443,
            host: "app.acme.test".into(),
        }
    }

    #[test]
    fn join_round_trips_and_every_prefix_needs_more() {
        let join = Join {
            agent_id: ID.into(),
            agent_nonce: new_nonce(),
        };
        let mut bytes = join.encode().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(Join::decode(&bytes[..cut]), Ok(Peek::NeedMore), "cut at {cut}");
        }
        bytes.extend_from_slice(b"proof");
        let Peek::Done((decoded, used)) = Join::decode(&bytes).unwrap() else {
            panic!("complete join")
        };
        assert_eq!(decoded, join);
        assert_eq!(&bytes[used..], b"proof");
    }

    #[test]
    fn join_refuses_garbage_tls_and_silly_ids() {
        assert_eq!(Join::decode(b"GET /"), Err(TcpDataError::BadMagic));
        assert_eq!(Join::decode(b"\x16\x03\x01"), Err(TcpDataError::BadMagic));
        assert_eq!(Join::decode(b"SLT1\0\0"), Err(TcpDataError::BadAgentId(0)));
        assert_eq!(
            Join::decode(b"SLT1\xff\xff"),
            Err(TcpDataError::BadAgentId(65535))
        );
        let long = Join {
            agent_id: "a".repeat(MAX_AGENT_ID_LEN + 1),
            agent_nonce: [0; NONCE_LEN],
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn join_proof_needs_the_credential_and_this_connections_nonces() {
        let n = nonces();
        let proof = join_proof("secret", ID, &n);
        assert!(join_proof_valid("secret", ID, &n, &proof));
        assert!(!join_proof_valid("other", ID, &n, &proof));
        assert!(!join_proof_valid("secret", "acme/agent-2/abcd1234", &n, &proof));
        // Replayed on another connection (another relay nonce).
        let replay = Nonces {
            relay: new_nonce(),
            ..n
        };
        assert!(!join_proof_valid("secret", ID, &replay, &proof));
    }

    #[test]
    fn sealed_header_opens_only_with_the_same_key_and_unmodified() {
        let n = nonces();
        let relay = StreamKey::derive("secret", ID, &n);
        let agent = StreamKey::derive("secret", ID, &n);
        let mut wire = Vec::new();
        relay.seal(&header(), &mut wire).unwrap();
        let sealed_len = wire.len();
        wire.extend_from_slice(b"\x16\x03\x01");
        for cut in 0..sealed_len {
            assert!(
                matches!(agent.open(&wire[..cut]), Ok(Peek::NeedMore)),
                "cut at {cut}"
            );
        }
        let Peek::Done((opened, used)) = agent.open(&wire).unwrap() else {
            panic!("complete header")
        };
        assert_eq!(opened, header());
        assert_eq!(&wire[used..], b"\x16\x03\x01");

        // Another connection's key (a header replayed or injected from elsewhere).
        let elsewhere = StreamKey::derive("secret", ID, &nonces());
        assert!(matches!(elsewhere.open(&wire), Err(TcpDataError::BadHeaderTag)));
        // A spoofed client address: flip one bit of the IPv4 address.
        let mut spoofed = wire.clone();
        spoofed[7] ^= 1;
        assert!(matches!(agent.open(&spoofed), Err(TcpDataError::BadHeaderTag)));
    }
}

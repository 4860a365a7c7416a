//! TLS ClientHello peeking: owns the record framing and handshake reassembly needed to read a
//! client's first flight without terminating TLS, the extraction of the SNI host name and ALPN
//! offer we route on, and the fatal alert records we answer with when we refuse a hello.
//!
//! The record layer (RFC 8446 §5.1) is framed here because tls-parser parses one record at a time
//! and cannot reassemble a ClientHello fragmented across records. The reassembled ClientHello body
//! and the `server_name` and `application_layer_protocol_negotiation` extensions are parsed with
//! tls-parser, and checked to account for every byte: the routing decision must not rest on bytes
//! the backend will read differently. The other extensions are only framed; judging them is the
//! backend's job.

use std::borrow::Cow;

use tls_parser::{
    SNIType, TlsExtension, TlsExtensionType, parse_tls_extension_alpn_content,
    parse_tls_extension_sni_content, parse_tls_extension_unknown, parse_tls_handshake_client_hello,
};

use super::Peek;
use super::refusal::{Abuse, AlertDescription, CONTENT_TYPE_ALERT, Refusal, Refused, Rejection, Reply};

/// `ContentType.handshake`.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// `HandshakeType.client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// content type (1) + legacy_record_version (2) + length (2).
const RECORD_HEADER_LEN: usize = 5;
/// msg_type (1) + length (u24).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1 (and RFC 5246 §6.2.1): a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT_LEN: usize = 1 << 14;
/// `ExtensionType.server_name` (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// `ExtensionType.application_layer_protocol_negotiation` (RFC 7301 §3.1).
const EXT_ALPN: u16 = 16;

/// What a ClientHello tells us about where the connection should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// SNI host_name, lowercased, trailing dot removed, validated as a DNS name (LDH labels, 1..=63
    /// chars each, total <= 253). None when the extension is absent.
    pub server_name: Option<String>,
    /// ALPN protocol names offered, in order (empty when absent).
    pub alpn: Vec<Vec<u8>>,
    /// Number of leading bytes of the input that hold the complete ClientHello (all records it spans).
    pub len: usize,
}

/// Why the start of a stream is not a ClientHello we can route.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientHelloError {
    /// The first record is not a TLS handshake record: plain HTTP, SSLv2, another record type, or garbage.
    #[error("not a TLS handshake record")]
    NotTls,
    /// A TLS handshake record whose first message is not a ClientHello.
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    /// TLS framing or ClientHello encoding is broken.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The complete ClientHello would be longer than the caller's limit.
    #[error("ClientHello exceeds {limit} bytes")]
    TooLarge {
        /// The `max_len` the hello was checked against.
        limit: usize,
    },
    /// The SNI host_name is an IP literal or not a valid DNS name.
    #[error("SNI host_name is not a valid DNS name")]
    InvalidServerName,
}

impl Refused for ClientHelloError {
    /// How the TLS edge refuses a connection whose hello is this: counted as `not_tls` or
    /// `parse_error`, held against the source, answered with a fatal alert unless the peer does
    /// not speak TLS (an alert would be noise to it).
    fn refusal(&self) -> Refusal {
        let (rejection, reply) = match self {
            Self::NotTls => (Rejection::NotTls, Reply::Close),
            Self::NotClientHello | Self::TooLarge { .. } | Self::Malformed(_) => (
                Rejection::ParseError,
                Reply::TlsAlert(AlertDescription::DecodeError),
            ),
            Self::InvalidServerName => (
                Rejection::ParseError,
                Reply::TlsAlert(AlertDescription::UnrecognizedName),
            ),
        };
        Refusal {
            rejection,
            abuse: Some(Abuse::BadClientHello),
            reply,
        }
    }
}

/// How the TLS edge refuses a connection for `rejection` once its hello was read (or for lack
/// of one): which alert the browser gets, and whether the source is held to account.
pub fn refusal(rejection: Rejection) -> Refusal {
    use AlertDescription::{DecodeError, InternalError, UnrecognizedName};
    let (abuse, reply) = match rejection {
        Rejection::NoSni => (None, Reply::TlsAlert(UnrecognizedName)),
        Rejection::UnknownHost => (Some(Abuse::UnknownName), Reply::TlsAlert(UnrecognizedName)),
        Rejection::NoAgent => (None, Reply::TlsAlert(UnrecognizedName)),
        Rejection::AgentBusy | Rejection::AgentUnreachable | Rejection::TenantStreamLimit => {
            (None, Reply::TlsAlert(InternalError))
        }
        Rejection::ParseError => (Some(Abuse::BadClientHello), Reply::TlsAlert(DecodeError)),
        Rejection::NotTls => (Some(Abuse::BadClientHello), Reply::Close),
        // Refused at accept, before the client said anything: nothing to answer in TLS yet.
        Rejection::Timeout
        | Rejection::RateLimited
        | Rejection::ForwardRefused
        | Rejection::ConnectionLimit
        | Rejection::SourceConnectionLimit
        | Rejection::UnroutedLimit
        | Rejection::SourceUnroutedLimit => (None, Reply::Close),
    };
    Refusal {
        rejection,
        abuse,
        reply,
    }
}

/// Parse the start of a client's byte stream. Called again with a longer buffer after NeedMore
/// (re-parsing from the start is fine; cheap).
///
/// `len` in the result counts whole records: a ClientHello must end on a record boundary (the
/// client sends nothing else in the handshake content type before the server answers), so extra
/// handshake bytes after it are `Malformed`, while any bytes after its last record (early data,
/// a compatibility ChangeCipherSpec) are left to the caller.
///
/// Errors come as early as the bytes allow: a bad record header or handshake type after the few
/// bytes that show it, and [`ClientHelloError::TooLarge`] as soon as the declared record and
/// handshake lengths imply more than `max_len` bytes on the wire.
pub fn peek_client_hello(buf: &[u8], max_len: usize) -> Result<Peek<ClientHelloInfo>, ClientHelloError> {
    ClientHelloPeeker::new(max_len).peek(buf)
}

/// [`peek_client_hello`] for a buffer that grows between calls: it resumes where the last call
/// stopped, so the records already complete are never walked again and the work is linear in
/// the bytes received, however the client splits its hello into records and segments (a 32 KiB
/// hello in one-byte records would otherwise be walked from byte 0 on every read). Call
/// [`ClientHelloPeeker::peek`] with the whole buffer after every read; the bytes already seen
/// must not change.
#[derive(Debug, Clone)]
pub struct ClientHelloPeeker {
    max_len: usize,
    /// Start of the first record not yet complete.
    record_start: usize,
    /// The handshake bytes of the complete records before `record_start`; empty while the hello
    /// has not left its first record (the common case, parsed in place without a copy).
    payload: Vec<u8>,
}

/// A ClientHello taken out of its records.
struct Reassembled<'a> {
    /// The message after its handshake header: borrowed from the input when it sits in a single
    /// record, copied together otherwise.
    body: Cow<'a, [u8]>,
    /// Input bytes its records span.
    len: usize,
}

impl ClientHelloPeeker {
    /// A peeker that refuses a hello spanning more than `max_len` bytes of records.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            record_start: 0,
            payload: Vec::new(),
        }
    }

    /// Peeks at `buf`, everything received so far; see [`peek_client_hello`] for the result.
    pub fn peek(&mut self, buf: &[u8]) -> Result<Peek<ClientHelloInfo>, ClientHelloError> {
        let Peek::Done(Reassembled { body, len }) = self.reassemble(buf)? else {
            return Ok(Peek::NeedMore);
        };
        let (server_name, alpn) = parse_client_hello_body(&body)?;
        Ok(Peek::Done(ClientHelloInfo {
            server_name,
            alpn,
            len,
        }))
    }

    /// Walks the handshake records of `buf` from the first one not yet complete and
    /// reassembles the ClientHello they carry.
    fn reassemble<'a>(&mut self, buf: &'a [u8]) -> Result<Peek<Reassembled<'a>>, ClientHelloError> {
        let too_large = ClientHelloError::TooLarge { limit: self.max_len };
        loop {
            let record = buf.get(self.record_start..).unwrap_or_default();
            check_record_header(record, self.record_start == 0)?;
            let Some(&[_, _, _, len_hi, len_lo]) = record.first_chunk::<RECORD_HEADER_LEN>() else {
                return Ok(Peek::NeedMore);
            };
            let fragment_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
            // The hello ends on a record boundary, so it spans at least this whole record.
            let record_end = self.record_start + RECORD_HEADER_LEN + fragment_len;
            if record_end > self.max_len {
                return Err(too_large);
            }
            let received = record.get(RECORD_HEADER_LEN..).unwrap_or_default();
            let fragment = received.get(..fragment_len).unwrap_or(received);
            // Handshake bytes declared by the complete records and this one.
            let through_record = self.payload.len() + fragment_len;
            let (head, head_len) = first_bytes(&self.payload, fragment);
            if head_len > 0 && head[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(ClientHelloError::NotClientHello);
            }
            if head_len == HANDSHAKE_HEADER_LEN {
                let [_, len0, len1, len2] = head;
                let message_len = HANDSHAKE_HEADER_LEN
                    + (usize::from(len0) << 16 | usize::from(len1) << 8 | usize::from(len2));
                if message_len < through_record {
                    return Err(ClientHelloError::Malformed(
                        "ClientHello does not end on a record boundary",
                    ));
                }
                // Fewest wire bytes the rest of the message can take: full-size records.
                let missing = message_len - through_record;
                let min_len = record_end + missing + RECORD_HEADER_LEN * missing.div_ceil(MAX_FRAGMENT_LEN);
                if min_len > self.max_len {
                    return Err(too_large);
                }
                if missing == 0 && fragment.len() == fragment_len {
                    let body = if self.payload.is_empty() {
                        Cow::Borrowed(&fragment[HANDSHAKE_HEADER_LEN..])
                    } else {
                        let mut message = std::mem::take(&mut self.payload);
                        message.extend_from_slice(fragment);
                        message.drain(..HANDSHAKE_HEADER_LEN);
                        Cow::Owned(message)
                    };
                    return Ok(Peek::Done(Reassembled {
                        body,
                        len: record_end,
                    }));
                }
            }
            if fragment.len() < fragment_len {
                return Ok(Peek::NeedMore);
            }
            self.payload.extend_from_slice(fragment);
            self.record_start = record_end;
        }
    }
}

/// The first bytes (up to a handshake header's worth) of `payload` followed by `fragment`, and
/// how many there are.
fn first_bytes(payload: &[u8], fragment: &[u8]) -> ([u8; HANDSHAKE_HEADER_LEN], usize) {
    let mut head = [0u8; HANDSHAKE_HEADER_LEN];
    let mut n = 0;
    for &b in payload.iter().chain(fragment).take(HANDSHAKE_HEADER_LEN) {
        head[n] = b;
        n += 1;
    }
    (head, n)
}

/// Validates as much of a record header as `header` holds, so that a stream fails on the first
/// byte that cannot start a ClientHello record and waits on every byte that can.
fn check_record_header(header: &[u8], first_record: bool) -> Result<(), ClientHelloError> {
    if let Some(&content_type) = header.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(if first_record {
            ClientHelloError::NotTls
        } else if content_type == CONTENT_TYPE_ALERT {
            ClientHelloError::Malformed("alert record inside the ClientHello")
        } else {
            ClientHelloError::Malformed("non-handshake record inside the ClientHello")
        });
    }
    // legacy_record_version: every TLS version is 3.x on the wire (SSL 3.0 to TLS 1.3).
    if let Some(&major) = header.get(1)
        && major != 3
    {
        return Err(if first_record {
            ClientHelloError::NotTls
        } else {
            ClientHelloError::Malformed("record version is not 3.x")
        });
    }
    if let Some(&[len_hi, len_lo]) = header.get(3..RECORD_HEADER_LEN) {
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 {
            return Err(ClientHelloError::Malformed("empty handshake record"));
        }
        if len > MAX_FRAGMENT_LEN {
            return Err(ClientHelloError::Malformed("record longer than 2^14 bytes"));
        }
    }
    Ok(())
}

/// Parses a ClientHello body (after the handshake header) and pulls out SNI and ALPN.
fn parse_client_hello_body(body: &[u8]) -> Result<(Option<String>, Vec<Vec<u8>>), ClientHelloError> {
    let (rest, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|_| ClientHelloError::Malformed("ClientHello fields"))?;
    // tls-parser reads the extensions block optionally: a bad block length shows up as leftovers.
    if !rest.is_empty() {
        return Err(ClientHelloError::Malformed(
            "bytes after the ClientHello extensions",
        ));
    }
    let mut extensions = hello.ext.unwrap_or_default();
    let mut server_name = None;
    let mut alpn = None;
    while !extensions.is_empty() {
        let (next, extension) = parse_tls_extension_unknown(extensions)
            .map_err(|_| ClientHelloError::Malformed("extension framing"))?;
        extensions = next;
        let TlsExtension::Unknown(TlsExtensionType(extension_type), data) = extension else {
            return Err(ClientHelloError::Malformed("extension framing"));
        };
        match extension_type {
            EXT_SERVER_NAME if server_name.is_some() => {
                return Err(ClientHelloError::Malformed("duplicate server_name extension"));
            }
            EXT_SERVER_NAME => server_name = Some(parse_server_name(data)?),
            EXT_ALPN if alpn.is_some() => {
                return Err(ClientHelloError::Malformed("duplicate ALPN extension"));
            }
            EXT_ALPN => alpn = Some(parse_alpn(data)?),
            _ => {}
        }
    }
    Ok((server_name.flatten(), alpn.unwrap_or_default()))
}

/// `ServerNameList` (RFC 6066 §3): the host_name entry, if any.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, ClientHelloError> {
    const BAD: ClientHelloError = ClientHelloError::Malformed("server_name extension");
    let Ok((rest, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Err(BAD);
    };
    // tls-parser stops quietly at a short entry; require the list to account for every byte.
    let encoded: usize = names.iter().map(|(_, name)| 3 + name.len()).sum();
    if !rest.is_empty() || names.is_empty() || encoded + 2 != data.len() {
        return Err(BAD);
    }
    let mut host_names = names
        .iter()
        .filter(|(name_type, _)| *name_type == SNIType::HostName);
    let Some((_, host_name)) = host_names.next() else {
        return Ok(None);
    };
    if host_names.next().is_some() {
        // "The ServerNameList MUST NOT contain more than one name of the same name_type."
        return Err(ClientHelloError::Malformed(
            "two host_name entries in server_name",
        ));
    }
    crate::hostname::normalize(host_name)
        .map(Some)
        .map_err(|_| ClientHelloError::InvalidServerName)
}

/// `ProtocolNameList` (RFC 7301 §3.1): non-empty list of non-empty names.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, ClientHelloError> {
    const BAD: ClientHelloError = ClientHelloError::Malformed("ALPN extension");
    let Ok((rest, TlsExtension::ALPN(protocols))) = parse_tls_extension_alpn_content(data) else {
        return Err(BAD);
    };
    let encoded: usize = protocols.iter().map(|name| 1 + name.len()).sum();
    if !rest.is_empty()
        || protocols.is_empty()
        || protocols.iter().any(|p| p.is_empty())
        || encoded + 2 != data.len()
    {
        return Err(BAD);
    }
    Ok(protocols.into_iter().map(<[u8]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    const NO_LIMIT: usize = usize::MAX;

    /// The exact first flight rustls sends for `server_name` (a DNS name or an IP address).
    fn rustls_flight(server_name: &str, alpn: &[&[u8]], tweak: impl FnOnce(&mut ClientConfig)) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tweak(&mut config);
        let server_name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A ClientHello for `example.com` offering h2 and http/1.1, in one record.
    fn rustls_hello() -> Vec<u8> {
        rustls_flight("example.com", &[b"h2", b"http/1.1"], |_| {})
    }

    fn done(buf: &[u8]) -> ClientHelloInfo {
        match peek_client_hello(buf, NO_LIMIT) {
            Ok(Peek::Done(info)) => info,
            other => panic!("expected a parsed hello, got {other:?}"),
        }
    }

    /// The handshake message carried by a single-record hello.
    fn message(single_record: &[u8]) -> &[u8] {
        let len = usize::from(u16::from_be_bytes([single_record[3], single_record[4]]));
        assert_eq!(
            single_record.len(),
            RECORD_HEADER_LEN + len,
            "not exactly one record"
        );
        &single_record[RECORD_HEADER_LEN..]
    }

    /// Frames handshake bytes into records of the given fragment sizes (the last takes the rest).
    fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            if rest.is_empty() {
                break;
            }
            let (fragment, tail) = rest.split_at(size.min(rest.len()));
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
            out.extend_from_slice(fragment);
            rest = tail;
        }
        out
    }

    /// A minimal TLS 1.2-style ClientHello record carrying the given extensions, each
    /// `(type, extension_data)`.
    fn crafted_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext_block = Vec::new();
        for (ext_type, data) in extensions {
            ext_block.extend_from_slice(&ext_type.to_be_bytes());
            ext_block.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            ext_block.extend_from_slice(data);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x5a; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0xc0, 0x2f]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(ext_block.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext_block);
        handshake_record(HANDSHAKE_CLIENT_HELLO, &body)
    }

    fn handshake_record(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![msg_type];
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        msg.extend_from_slice(body);
        records(&msg, &[])
    }

    /// `server_name` extension data from `(name_type, name)` entries.
    fn sni(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend_from_slice(p);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    #[test]
    fn parses_a_real_rustls_hello() {
        let hello = rustls_hello();
        let info = done(&hello);
        assert_eq!(info.server_name.as_deref(), Some("example.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(info.len, hello.len());
    }

    #[test]
    fn every_prefix_needs_more() {
        let hello = rustls_hello();
        for end in 0..hello.len() {
            assert_eq!(
                peek_client_hello(&hello[..end], NO_LIMIT),
                Ok(Peek::NeedMore),
                "prefix {end}"
            );
            assert_eq!(
                peek_client_hello(&hello[..end], hello.len()),
                Ok(Peek::NeedMore),
                "prefix {end}"
            );
        }
    }

    #[test]
    fn reassembles_a_hello_split_across_records() {
        let hello = rustls_hello();
        let expected = done(&hello);
        // Odd sizes, including ones that split the 4-byte handshake header across records.
        for sizes in [&[7, 131][..], &[1, 2], &[3, 1], &[101, 33]] {
            let split = records(message(&hello), sizes);
            assert_eq!(split.len(), hello.len() + 2 * RECORD_HEADER_LEN);
            let info = done(&split);
            assert_eq!(
                info,
                ClientHelloInfo {
                    len: split.len(),
                    ..expected.clone()
                },
                "{sizes:?}"
            );
            for end in 0..split.len() {
                assert_eq!(
                    peek_client_hello(&split[..end], NO_LIMIT),
                    Ok(Peek::NeedMore),
                    "{sizes:?} {end}"
                );
            }
        }
    }

    #[test]
    fn resuming_gives_what_a_fresh_peek_gives_on_every_prefix() {
        let hello = rustls_hello();
        let big = rustls_flight("fragmented.example.net", &[b"h2"], |c| {
            c.max_fragment_size = Some(64)
        });
        let mut inputs = vec![
            hello.clone(),
            records(message(&hello), &[1, 2]),
            records(message(&hello), &vec![1; message(&hello).len()]),
            records(message(&hello), &[3, 1, 50]),
            big,
        ];
        let mut rng = StdRng::seed_from_u64(0x7e5u64);
        for _ in 0..200 {
            let mut mutated = records(
                message(&hello),
                &[rng.random_range(1..40), rng.random_range(1..40)],
            );
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..mutated.len());
                mutated[at] = rng.random();
            }
            inputs.push(mutated);
        }
        for input in &inputs {
            for max_len in [NO_LIMIT, input.len(), input.len() / 2] {
                let mut peeker = ClientHelloPeeker::new(max_len);
                for end in 0..=input.len() {
                    let resumed = peeker.peek(&input[..end]);
                    assert_eq!(resumed, peek_client_hello(&input[..end], max_len), "prefix {end}");
                    if resumed != Ok(Peek::NeedMore) {
                        break; // done or refused: the edge stops reading
                    }
                }
            }
        }
    }

    #[test]
    fn reassembles_rustls_own_fragmentation() {
        let flight = rustls_flight("fragmented.example.net", &[b"h2"], |c| {
            c.max_fragment_size = Some(64)
        });
        let info = done(&flight);
        assert_eq!(info.server_name.as_deref(), Some("fragmented.example.net"));
        assert_eq!(info.alpn, vec![b"h2".to_vec()]);
        assert_eq!(info.len, flight.len());
        assert!(
            flight.len() > 4 * 64,
            "expected several records, got {} bytes",
            flight.len()
        );
    }

    #[test]
    fn large_hello_with_many_alpn_protocols() {
        let names: Vec<Vec<u8>> = (0..400).map(|i| format!("proto-{i:04}").into_bytes()).collect();
        let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let hello = rustls_flight("big.example", &refs, |_| {});
        assert!(hello.len() > 4000);
        let info = done(&hello);
        assert_eq!(info.alpn, names);
        assert_eq!(info.len, hello.len());
    }

    #[test]
    fn len_stops_at_the_hello_when_more_bytes_follow() {
        let hello = rustls_hello();
        let mut stream = hello.clone();
        // A middlebox-compatibility ChangeCipherSpec record, then an application data record.
        stream.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        stream.extend_from_slice(&[23, 3, 3, 0, 3, 0xaa, 0xbb, 0xcc]);
        assert_eq!(done(&stream).len, hello.len());
        let mut split = records(message(&hello), &[50, 50]);
        let split_len = split.len();
        split.extend_from_slice(b"trailing junk");
        assert_eq!(done(&split).len, split_len);
    }

    #[test]
    fn no_sni() {
        let hello = rustls_flight("example.com", &[], |c| c.enable_sni = false);
        let info = done(&hello);
        assert_eq!(info.server_name, None);
        assert!(info.alpn.is_empty());
        // rustls sends no SNI for an IP address either.
        assert_eq!(
            done(&rustls_flight("192.0.2.1", &[b"h2"], |_| {})).server_name,
            None
        );
        // Nor does a hello without any extensions carry one.
        let mut bare = crafted_hello(&[]);
        bare.truncate(bare.len() - 2);
        bare[4] -= 2;
        bare[8] -= 2;
        assert_eq!(
            done(&bare),
            ClientHelloInfo {
                server_name: None,
                alpn: vec![],
                len: bare.len()
            }
        );
    }

    #[test]
    fn sni_is_normalised() {
        let mut hello = rustls_hello();
        let at = hello.windows(11).position(|w| w == b"example.com").unwrap();
        hello[at..at + 7].copy_from_slice(b"EXAMPLE");
        assert_eq!(done(&hello).server_name.as_deref(), Some("example.com"));

        let hello = crafted_hello(&[(EXT_SERVER_NAME, sni(&[(0, b"Api.Example.ORG.")]))]);
        assert_eq!(done(&hello).server_name.as_deref(), Some("api.example.org"));
    }

    #[test]
    fn picks_the_host_name_entry() {
        let hello = crafted_hello(&[(EXT_SERVER_NAME, sni(&[(7, b"\x01\x02"), (0, b"a.example")]))]);
        assert_eq!(done(&hello).server_name.as_deref(), Some("a.example"));
        // Only unknown name types: no host name to route on.
        let hello = crafted_hello(&[(EXT_SERVER_NAME, sni(&[(7, b"whatever")]))]);
        assert_eq!(done(&hello).server_name, None);
        let hello = crafted_hello(&[(EXT_SERVER_NAME, sni(&[(0, b"a.example"), (0, b"b.example")]))]);
        assert!(matches!(
            peek_client_hello(&hello, NO_LIMIT),
            Err(ClientHelloError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_server_names() {
        for name in [
            &b"192.0.2.1"[..],
            b"::1",
            b"[::1]",
            b"a b.example",
            b"a_b.example",
            b"",
            b"-a.example",
        ] {
            let hello = crafted_hello(&[(EXT_SERVER_NAME, sni(&[(0, name)]))]);
            assert_eq!(
                peek_client_hello(&hello, NO_LIMIT),
                Err(ClientHelloError::InvalidServerName),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn malformed_extensions() {
        let malformed = |extensions: &[(u16, Vec<u8>)]| {
            let hello = crafted_hello(extensions);
            match peek_client_hello(&hello, NO_LIMIT) {
                Err(ClientHelloError::Malformed(_)) => {}
                other => panic!("{extensions:?}: {other:?}"),
            }
        };
        let good_sni = sni(&[(0, b"a.example")]);
        malformed(&[
            (EXT_SERVER_NAME, good_sni.clone()),
            (EXT_SERVER_NAME, good_sni.clone()),
        ]);
        malformed(&[(EXT_SERVER_NAME, vec![])]);
        malformed(&[(EXT_SERVER_NAME, vec![0, 0])]);
        let mut trailing = good_sni.clone();
        trailing.push(0);
        malformed(&[(EXT_SERVER_NAME, trailing)]);
        let mut short_list = good_sni.clone();
        short_list[1] -= 1;
        malformed(&[(EXT_SERVER_NAME, short_list)]);
        let mut long_list = good_sni;
        long_list[1] += 1;
        malformed(&[(EXT_SERVER_NAME, long_list)]);
        malformed(&[(EXT_ALPN, alpn(&[b"h2"])), (EXT_ALPN, alpn(&[b"h2"]))]);
        malformed(&[(EXT_ALPN, alpn(&[]))]);
        malformed(&[(EXT_ALPN, alpn(&[b"h2", b""]))]);
        malformed(&[(EXT_ALPN, vec![0, 3, 2, b'h', b'2', 0])]);
        malformed(&[(EXT_ALPN, vec![0, 4, 2, b'h', b'2'])]);

        // Other extensions are only framed, whatever they hold.
        let hello = crafted_hello(&[(51, vec![0xff; 3]), (EXT_ALPN, alpn(&[b"h2"])), (0xfe0d, vec![])]);
        assert_eq!(done(&hello).alpn, vec![b"h2".to_vec()]);

        // An extensions block whose length overruns the message.
        let mut hello = crafted_hello(&[(EXT_ALPN, alpn(&[b"h2"]))]);
        let ext_len_at = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + 32 + 1 + 4 + 2 + 1;
        hello[ext_len_at] = 1;
        assert!(matches!(
            peek_client_hello(&hello, NO_LIMIT),
            Err(ClientHelloError::Malformed(_))
        ));
    }

    #[test]
    fn not_tls() {
        for stream in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            // SSLv2-compatible CLIENT-HELLO (2-byte header with the high bit set, msg type 1).
            b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",
            // A TLS record of another content type first: alert, application data.
            &crate::peek::refusal::fatal_alert(AlertDescription::InternalError),
            b"\x17\x03\x03\x00\x01\x00",
            // Handshake content type with a version that is not 3.x.
            b"\x16\x02\x00",
            b"\x16",
        ] {
            let result = peek_client_hello(stream, NO_LIMIT);
            if stream == b"\x16" {
                assert_eq!(result, Ok(Peek::NeedMore));
            } else {
                assert_eq!(result, Err(ClientHelloError::NotTls), "{stream:?}");
            }
        }
    }

    #[test]
    fn not_a_client_hello() {
        let server_hello = handshake_record(2, &[3, 3, 0, 0]);
        assert_eq!(
            peek_client_hello(&server_hello, NO_LIMIT),
            Err(ClientHelloError::NotClientHello)
        );
        // Known from the sixth byte on.
        assert_eq!(
            peek_client_hello(&server_hello[..6], NO_LIMIT),
            Err(ClientHelloError::NotClientHello)
        );
    }

    #[test]
    fn bad_framing() {
        let hello = rustls_hello();
        let malformed = |stream: &[u8], why: &str| match peek_client_hello(stream, NO_LIMIT) {
            Err(ClientHelloError::Malformed(_)) => {}
            other => panic!("{why}: {other:?}"),
        };
        // Record longer than 2^14, known from the header alone.
        malformed(b"\x16\x03\x01\x40\x01", "oversized record");
        malformed(b"\x16\x03\x01\x00\x00", "empty record");
        // Another content type interleaved with the hello's records.
        let mut split = records(message(&hello), &[40]);
        split[RECORD_HEADER_LEN + 40] = 23;
        malformed(&split, "application data inside the hello");
        malformed(
            &split[..RECORD_HEADER_LEN + 41],
            "application data inside the hello, early",
        );
        let mut split = records(message(&hello), &[40]);
        split[RECORD_HEADER_LEN + 41] = 4;
        malformed(&split, "second record not 3.x");
        // More handshake bytes in the hello's last record.
        let mut msg = message(&hello).to_vec();
        msg.extend_from_slice(&[20, 0, 0, 0]);
        malformed(&records(&msg, &[]), "trailing handshake message");
        // ... known before the record is complete.
        malformed(&records(&msg, &[])[..20], "trailing handshake message, early");
        // Body shorter than its own fields claim.
        let msg = [HANDSHAKE_CLIENT_HELLO, 0, 0, 3, 3, 3, 0];
        malformed(&records(&msg, &[]), "truncated body");
    }

    #[test]
    fn too_large() {
        let hello = rustls_hello();
        let limit = hello.len() - 1;
        assert_eq!(
            peek_client_hello(&hello, limit),
            Err(ClientHelloError::TooLarge { limit })
        );
        assert!(matches!(
            peek_client_hello(&hello, hello.len()),
            Ok(Peek::Done(_))
        ));
        // From the record header alone: a 16 KiB record cannot fit in 1 KiB.
        assert_eq!(
            peek_client_hello(b"\x16\x03\x01\x40\x00", 1024),
            Err(ClientHelloError::TooLarge { limit: 1024 })
        );
        // From the handshake header: a 100 KiB hello in small records, 9 bytes in.
        let head = [22, 3, 1, 0, 100, HANDSHAKE_CLIENT_HELLO, 0x01, 0x90, 0x00];
        assert_eq!(
            peek_client_hello(&head, 64 * 1024),
            Err(ClientHelloError::TooLarge { limit: 64 * 1024 })
        );
        // The minimum counts the record headers the rest needs: 20000 body bytes in 1 + 2 records.
        let head = [22, 3, 1, 0, 4, HANDSHAKE_CLIENT_HELLO, 0x00, 0x4e, 0x20];
        let fits = 9 + 20000 + 2 * RECORD_HEADER_LEN;
        assert_eq!(peek_client_hello(&head, fits), Ok(Peek::NeedMore));
        assert_eq!(
            peek_client_hello(&head, fits - 1),
            Err(ClientHelloError::TooLarge { limit: fits - 1 })
        );
    }

    #[test]
    fn refusals_for_bad_hellos() {
        let reply = |e: ClientHelloError| e.refusal().reply;
        assert_eq!(reply(ClientHelloError::NotTls), Reply::Close);
        assert_eq!(ClientHelloError::NotTls.refusal().rejection, Rejection::NotTls);
        assert_eq!(
            reply(ClientHelloError::InvalidServerName),
            Reply::TlsAlert(AlertDescription::UnrecognizedName)
        );
        for undecodable in [
            ClientHelloError::NotClientHello,
            ClientHelloError::TooLarge { limit: 512 },
            ClientHelloError::Malformed("x"),
        ] {
            let refusal = undecodable.refusal();
            assert_eq!(
                refusal.reply,
                Reply::TlsAlert(AlertDescription::DecodeError),
                "{undecodable:?}"
            );
            assert_eq!(refusal.rejection, Rejection::ParseError);
            assert_eq!(refusal.abuse, Some(Abuse::BadClientHello));
        }
    }

    #[test]
    fn refusals_after_the_hello() {
        use AlertDescription::{InternalError, UnrecognizedName};
        for (rejection, abuse, reply) in [
            (Rejection::NoSni, None, Reply::TlsAlert(UnrecognizedName)),
            (
                Rejection::UnknownHost,
                Some(Abuse::UnknownName),
                Reply::TlsAlert(UnrecognizedName),
            ),
            (Rejection::NoAgent, None, Reply::TlsAlert(UnrecognizedName)),
            (Rejection::AgentBusy, None, Reply::TlsAlert(InternalError)),
            (Rejection::AgentUnreachable, None, Reply::TlsAlert(InternalError)),
            (Rejection::Timeout, None, Reply::Close),
            (Rejection::RateLimited, None, Reply::Close),
        ] {
            assert_eq!(
                refusal(rejection),
                Refusal {
                    rejection,
                    abuse,
                    reply
                },
                "{rejection:?}"
            );
        }
    }

    /// Checks what must hold for any input: no panic, `len` within the input and the limit, a
    /// completed hello is only `NeedMore` on every shorter prefix, and an error on a prefix is
    /// the same error on the whole input.
    fn check_invariants(buf: &[u8], max_len: usize) {
        match peek_client_hello(buf, max_len) {
            Ok(Peek::Done(info)) => {
                assert!(info.len <= buf.len() && info.len <= max_len);
                for end in [0, 1, 5, 9, info.len / 2, info.len - 1] {
                    assert_eq!(
                        peek_client_hello(&buf[..end.min(info.len - 1)], max_len),
                        Ok(Peek::NeedMore)
                    );
                }
            }
            Ok(Peek::NeedMore) => {}
            Err(err) => {
                for end in [1, 5, 9, buf.len() / 2] {
                    if let Err(prefix_err) = peek_client_hello(&buf[..end.min(buf.len())], max_len) {
                        assert_eq!(prefix_err, err, "prefix {end} of {buf:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5eed_5105);
        let hello = rustls_hello();
        let split = records(message(&hello), &[7, 131]);
        for _ in 0..3000 {
            // Pure noise, and noise behind a plausible record header.
            let mut noise = vec![0u8; rng.random_range(0..600)];
            rng.fill(noise.as_mut_slice());
            check_invariants(&noise, NO_LIMIT);
            if noise.len() >= 6 {
                noise[..3].copy_from_slice(&[22, 3, 1]);
                noise[5] = HANDSHAKE_CLIENT_HELLO;
                check_invariants(&noise, NO_LIMIT);
            }
            // Real hellos with a few bytes changed, truncated, or both.
            for base in [&hello, &split] {
                let mut mutated = base.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..mutated.len());
                    mutated[at] = rng.random();
                }
                let end = rng.random_range(0..=mutated.len());
                let max_len = if rng.random_bool(0.2) {
                    rng.random_range(0..400)
                } else {
                    NO_LIMIT
                };
                check_invariants(&mutated, max_len);
                check_invariants(&mutated[..end], max_len);
                check_invariants(&base[..end], max_len);
            }
        }
    }

    #[test]
    fn every_single_byte_mutation() {
        let hello = rustls_hello();
        for at in 0..hello.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff, hello[at] ^ 0x01] {
                let mut mutated = hello.clone();
                mutated[at] = value;
                check_invariants(&mutated, NO_LIMIT);
            }
        }
    }
}

//! The header the relay writes at the start of a data connection when it hands a client
//! stream to an agent. Binary and tiny, because it is on every connection's setup path:
//!
//! ```text
//! "SLS1" | kind u8 | family u8 (4|6) | client ip (4|16) | client port u16 | relay port u16
//!        | host len u8 | host bytes
//! ```
//! Everything after the header is the client's byte stream, unmodified.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::peek::Peek;

const MAGIC: &[u8; 4] = b"SLS1";
/// Largest possible header: magic, kind, family, IPv6, ports, host length, 255-byte host.
pub const MAX_LEN: usize = 4 + 1 + 1 + 16 + 2 + 2 + 1 + 255;

/// Which edge listener the stream arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// TLS, routed by SNI: the bytes are the browser's TLS stream.
    Tls = 1,
    /// Plaintext HTTP/1.x, routed by the Host header.
    Http = 2,
}

/// What the agent learns about a stream before its first byte: how it arrived, from whom, and
/// for which hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The listener it arrived on, which says what the bytes after the header are.
    pub kind: StreamKind,
    /// The browser's address as the relay saw it (for PROXY protocol on the agent side).
    pub client: SocketAddr,
    /// The relay port the client connected to.
    pub relay_port: u16,
    /// The hostname the stream was routed by (SNI or Host), lowercased.
    pub host: String,
}

/// Why a stream header could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamHeaderError {
    /// The first four bytes are not `SLS1`.
    #[error("data connection did not start with a stream header")]
    BadMagic,
    /// The kind byte is neither 1 (TLS) nor 2 (HTTP).
    #[error("unknown stream kind {0}")]
    UnknownKind(u8),
    /// The family byte is neither 4 nor 6.
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    /// The hostname bytes are not ASCII.
    #[error("hostname is not ASCII")]
    BadHost,
    /// Encoding: the hostname is over 255 bytes, more than its length byte can say.
    #[error("hostname of {0} bytes does not fit the header")]
    HostTooLong(usize),
}

impl StreamHeader {
    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut impl bytes::BufMut) -> Result<(), StreamHeaderError> {
        let host_len =
            u8::try_from(self.host.len()).map_err(|_| StreamHeaderError::HostTooLong(self.host.len()))?;
        out.put_slice(MAGIC);
        out.put_u8(self.kind as u8);
        match self.client.ip() {
            IpAddr::V4(ip) => {
                out.put_u8(4);
                out.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.put_u8(6);
                out.put_slice(&ip.octets());
            }
        }
        out.put_u16(self.client.port());
        out.put_u16(self.relay_port);
        out.put_u8(host_len);
        out.put_slice(self.host.as_bytes());
        Ok(())
    }

    /// Decodes a header from the start of `buf`, returning it and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Peek<(Self, usize)>, StreamHeaderError> {
        let mut cursor = Cursor { buf, pos: 0 };
        let Some(magic) = cursor.take(4) else {
            return Ok(Peek::NeedMore);
        };
        if magic != MAGIC {
            return Err(StreamHeaderError::BadMagic);
        }
        let Some(kind) = cursor.u8() else {
            return Ok(Peek::NeedMore);
        };
        let kind = match kind {
            1 => StreamKind::Tls,
            2 => StreamKind::Http,
            other => return Err(StreamHeaderError::UnknownKind(other)),
        };
        let Some(family) = cursor.u8() else {
            return Ok(Peek::NeedMore);
        };
        let ip = match family {
            4 => match cursor.take(4) {
                Some(b) => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
                None => return Ok(Peek::NeedMore),
            },
            6 => match cursor.take(16).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                Some(b) => IpAddr::V6(Ipv6Addr::from(b)),
                None => return Ok(Peek::NeedMore),
            },
            other => return Err(StreamHeaderError::UnknownFamily(other)),
        };
        let (Some(client_port), Some(relay_port), Some(host_len)) = (cursor.u16(), cursor.u16(), cursor.u8())
        else {
            return Ok(Peek::NeedMore);
        };
        let Some(host) = cursor.take(usize::from(host_len)) else {
            return Ok(Peek::NeedMore);
        };
        if !host.is_ascii() {
            return Err(StreamHeaderError::BadHost);
        }
        let host = String::from_utf8(host.to_vec()).map_err(|_| StreamHeaderError::BadHost)?;
        let header = Self {
            kind,
            client: SocketAddr::new(ip, client_port),
            relay_port,
            host,
        };
        Ok(Peek::Done((header, cursor.pos)))
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(bytes)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(header: &StreamHeader) -> Vec<u8> {
        let mut out = Vec::new();
        header.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn round_trips_v4_and_v6() {
        for client in ["192.0.2.7:51000", "[2001:db8::1]:443"] {
            let header = StreamHeader {
                kind: StreamKind::Tls,
                client: client.parse().unwrap(),
                relay_port: 443,
                host: "app.acme.test".into(),
            };
            let mut bytes = encoded(&header);
            bytes.extend_from_slice(b"\x16\x03\x01");
            let Peek::Done((decoded, used)) = StreamHeader::decode(&bytes).unwrap() else {
                panic!()
            };
            assert_eq!(decoded, header);
            assert_eq!(&bytes[used..], b"\x16\x03\x01");
        }
    }

    #[test]
    fn every_prefix_needs_more() {
        let header = StreamHeader {
            kind: StreamKind::Http,
            client: "[2001:db8::1]:80".parse().unwrap(),
            relay_port: 80,
            host: "a.b".into(),
        };
        let bytes = encoded(&header);
        for cut in 0..bytes.len() {
            assert_eq!(
                StreamHeader::decode(&bytes[..cut]),
                Ok(Peek::NeedMore),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            StreamHeader::decode(b"GET / HTTP/1.1\r\n"),
            Err(StreamHeaderError::BadMagic)
        );
        assert_eq!(
            StreamHeader::decode(b"SLS1\x09"),
            Err(StreamHeaderError::UnknownKind(9))
        );
        assert_eq!(
            StreamHeader::decode(b"SLS1\x01\x05"),
            Err(StreamHeaderError::UnknownFamily(5))
        );
    }

    #[test]
    fn refuses_hosts_that_do_not_fit() {
        let header = StreamHeader {
            kind: StreamKind::Tls,
            client: "192.0.2.1:1".parse().unwrap(),
            relay_port: 443,
            host: "a".repeat(256),
        };
        assert_eq!(
            header.encode(&mut Vec::new()),
            Err(StreamHeaderError::HostTooLong(256))
        );
    }
}

//! Plaintext HTTP/1.x peeking: owns reading the first request head on a cleartext connection
//! (with httparse) far enough to route it by `Host`, and the few complete responses the relay
//! answers with itself (the redirect to HTTPS, small errors).
//!
//! Only the first request's head is read; the caller forwards or answers it and closes. Later
//! requests on a kept-alive connection are not inspected, so callers must not route them.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::Peek;
use super::refusal::{Abuse, Refusal, Refused, Rejection, Reply};

/// Most header fields we parse in a request head; more is `Malformed`.
pub const MAX_HEADERS: usize = 64;

/// What a request head tells us about where the connection should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Host header value lowercased, port stripped, validated like SNI unless it is an IP literal
    /// (IPv4 dotted quad, or bracketed IPv6 in canonical form, e.g. `[::1]:8080` -> `[::1]`).
    pub host: String,
    /// Request method as sent (a token, e.g. "GET").
    pub method: String,
    /// Request target as sent (e.g. "/path?q=1"); visible ASCII only.
    pub target: String,
    /// Length of the head including the final CRLFCRLF.
    pub len: usize,
    /// How the request's body is framed.
    pub body: BodyLength,
    /// It carries an `Upgrade` header (e.g. a WebSocket handshake).
    pub upgrade: bool,
}

/// How a request's body is delimited (RFC 9112 §6.3): the head says, unambiguously, or the
/// request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Neither Content-Length nor Transfer-Encoding: no body.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Why the start of a stream is not an HTTP/1.x request head we can route.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HttpPeekError {
    /// The stream does not start with an HTTP request line (e.g. a TLS record, binary garbage).
    #[error("not an HTTP request")]
    NotHttp,
    /// An HTTP request line, but a head we refuse to read or route.
    #[error("malformed HTTP request head: {0}")]
    Malformed(String),
    /// No `Host` header, or an empty one.
    #[error("HTTP request without a Host header")]
    MissingHost,
    /// No complete head within the first `limit` bytes.
    #[error("HTTP request head exceeds {limit} bytes")]
    TooLarge {
        /// The `max_len` the head was checked against.
        limit: usize,
    },
}

/// Parse the request head at the start of a client's byte stream. Called again with a longer
/// buffer after NeedMore.
///
/// Accepts HTTP/1.0 and HTTP/1.1 with at most [`MAX_HEADERS`] header fields and exactly one
/// `Host` header, which is required even for HTTP/1.0; a target in absolute form must name the
/// same host. The body must be framed unambiguously: one Content-Length (repeats must agree),
/// or `Transfer-Encoding: chunked`, never both. Bytes after the head (a body, a pipelined
/// request) are left alone.
pub fn peek_request_head(buf: &[u8], max_len: usize) -> Result<Peek<RequestHead>, HttpPeekError> {
    let window = buf.get(..max_len).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() >= max_len => {
            return Err(HttpPeekError::TooLarge { limit: max_len });
        }
        Ok(httparse::Status::Partial) => return Ok(Peek::NeedMore),
        // httparse only fails before the method when the first bytes cannot start a request line.
        Err(_) if request.method.is_none() => return Err(HttpPeekError::NotHttp),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(malformed(format!("more than {MAX_HEADERS} header fields")));
        }
        Err(httparse::Error::Version) => return Err(malformed("not HTTP/1.0 or HTTP/1.1")),
        Err(err) => return Err(malformed(err)),
    };
    let (Some(method), Some(target), Some(0 | 1)) = (request.method, request.path, request.version) else {
        return Err(malformed("incomplete request line"));
    };
    // httparse lets obs-text (bytes >= 0x80) through; nothing but visible ASCII may reach a
    // Location header or a log line.
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("request target holds a byte outside visible ASCII"));
    }
    let mut host = None;
    for header in request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
    {
        if host.replace(header.value).is_some() {
            return Err(malformed("more than one Host header"));
        }
    }
    let host = match host {
        None | Some([]) => return Err(HttpPeekError::MissingHost),
        Some(value) => normalize_host(value).ok_or_else(|| malformed("invalid Host header"))?,
    };
    if let Some(authority) = absolute_form_authority(target) {
        let named = normalize_host(authority.as_bytes())
            .ok_or_else(|| malformed("invalid host in an absolute-form target"))?;
        if named != host {
            return Err(malformed("absolute-form target names another host than Host"));
        }
    }
    let body = body_length(request.headers)?;
    let upgrade = request
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    Ok(Peek::Done(RequestHead {
        host,
        method: method.to_owned(),
        target: target.to_owned(),
        len,
        body,
        upgrade,
    }))
}

/// [`peek_request_head`] for a buffer that grows between calls, at a cost linear in the bytes
/// received: the head is parsed again only once it may have ended (an empty line arrived), the
/// buffer doubled since the last parse, or the limit was reached — so a head trickled in a byte
/// at a time is not parsed from its start on every read. Garbage is still refused at once: the
/// first call always parses.
#[derive(Debug, Clone)]
pub struct RequestHeadPeeker {
    max_len: usize,
    /// Buffer length at the last parse (0: none yet).
    parsed_at: usize,
    /// Bytes already searched for an empty line.
    scanned: usize,
}

impl RequestHeadPeeker {
    /// A peeker that refuses a head longer than `max_len`.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            parsed_at: 0,
            scanned: 0,
        }
    }

    /// Peeks at `buf`, everything received so far (the bytes already seen must not change);
    /// see [`peek_request_head`] for the result.
    pub fn peek(&mut self, buf: &[u8]) -> Result<Peek<RequestHead>, HttpPeekError> {
        let window = buf.get(..self.max_len).unwrap_or(buf);
        // An empty line is "\n\n" or "\n\r\n": look at each byte once, two back for one that
        // spans two reads.
        let from = self.scanned.saturating_sub(2).min(window.len());
        let ended = window[from..].windows(2).enumerate().any(|(i, w)| {
            w[0] == b'\n' && (w[1] == b'\n' || (w[1] == b'\r' && window.get(from + i + 2) == Some(&b'\n')))
        });
        self.scanned = window.len();
        let due = self.parsed_at == 0
            || ended
            || window.len() >= self.parsed_at.saturating_mul(2)
            || window.len() >= self.max_len;
        if !due {
            return Ok(Peek::NeedMore);
        }
        self.parsed_at = window.len().max(1);
        peek_request_head(buf, self.max_len)
    }
}

/// The authority of an absolute-form target (`http://a.example:80/x` -> `a.example:80`).
fn absolute_form_authority(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The body framing the headers declare, or why it is ambiguous.
fn body_length(headers: &[httparse::Header<'_>]) -> Result<BodyLength, HttpPeekError> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| malformed("invalid Content-Length"))?;
            if length.replace(value).is_some_and(|earlier| earlier != value) {
                return Err(malformed("Content-Length headers that disagree"));
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(malformed("a transfer coding other than one `chunked`"));
            }
            chunked = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(malformed("both Content-Length and Transfer-Encoding")),
        (Some(length), false) => Ok(BodyLength::Length(length)),
        (None, true) => Ok(BodyLength::Chunked),
        (None, false) => Ok(BodyLength::None),
    }
}

fn malformed(why: impl ToString) -> HttpPeekError {
    HttpPeekError::Malformed(why.to_string())
}

impl Refused for HttpPeekError {
    /// How the HTTP edge refuses a connection whose request head is this: `parse_error`, held
    /// against the source, answered 431 for a head too large and 400 otherwise.
    fn refusal(&self) -> Refusal {
        let reply = match self {
            HttpPeekError::TooLarge { .. } => Reply::Http {
                status: 431,
                reason: "Request Header Fields Too Large",
                body: "request head too large\n",
            },
            _ => Reply::Http {
                status: 400,
                reason: "Bad Request",
                body: "bad request\n",
            },
        };
        Refusal {
            rejection: Rejection::ParseError,
            abuse: Some(Abuse::BadHttpRequest),
            reply,
        }
    }
}

/// How the HTTP edge refuses a connection for `rejection` once its head was read (or for lack
/// of one): the status the browser gets, and whether the source is held to account.
pub fn refusal(rejection: Rejection) -> Refusal {
    const BAD_GATEWAY: Reply = Reply::Http {
        status: 502,
        reason: "Bad Gateway",
        body: "the site's agent is unavailable\n",
    };
    let (abuse, reply) = match rejection {
        Rejection::UnknownHost => (
            Some(Abuse::UnknownName),
            Reply::Http {
                status: 404,
                reason: "Not Found",
                body: "unknown host\n",
            },
        ),
        Rejection::NoAgent | Rejection::AgentBusy | Rejection::AgentUnreachable => (None, BAD_GATEWAY),
        Rejection::ParseError | Rejection::NotTls | Rejection::NoSni => (
            Some(Abuse::BadHttpRequest),
            Reply::Http {
                status: 400,
                reason: "Bad Request",
                body: "bad request\n",
            },
        ),
        Rejection::ForwardRefused => (
            None,
            Reply::Http {
                status: 400,
                reason: "Bad Request",
                body: "this request is not forwarded in plaintext\n",
            },
        ),
        Rejection::ConnectionLimit
        | Rejection::SourceConnectionLimit
        | Rejection::UnroutedLimit
        | Rejection::SourceUnroutedLimit
        | Rejection::TenantStreamLimit => (
            None,
            Reply::Http {
                status: 503,
                reason: "Service Unavailable",
                body: "too many connections; try again later\n",
            },
        ),
        Rejection::Timeout | Rejection::RateLimited => (None, Reply::Close),
    };
    Refusal {
        rejection,
        abuse,
        reply,
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2) to the host we route on: a DNS name as for SNI, an
/// IPv4 address, or a bracketed IPv6 address, without the port.
fn normalize_host(value: &[u8]) -> Option<String> {
    if let Some(bracketed) = value.strip_prefix(b"[") {
        let close = bracketed.iter().position(|&b| b == b']')?;
        let (address, after) = bracketed.split_at_checked(close)?;
        if !is_port_suffix(after.get(1..)?) {
            return None;
        }
        let address: Ipv6Addr = std::str::from_utf8(address).ok()?.parse().ok()?;
        return Some(format!("[{address}]"));
    }
    let colon = value.iter().position(|&b| b == b':').unwrap_or(value.len());
    let (name, port) = value.split_at_checked(colon)?;
    if !is_port_suffix(port) {
        return None;
    }
    if let Ok(address) = std::str::from_utf8(name).ok()?.parse::<Ipv4Addr>() {
        return Some(address.to_string());
    }
    crate::hostname::normalize(name).ok()
}

/// Nothing, or `":" *DIGIT` with a value that fits a port (RFC 3986 allows an empty port).
fn is_port_suffix(suffix: &[u8]) -> bool {
    match suffix.split_first() {
        None => true,
        Some((b':', digits)) => {
            // All digits first: `u16::from_str` would also take a leading `+`.
            digits.iter().all(u8::is_ascii_digit)
                && (digits.is_empty() || std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u16>().is_ok()))
        }
        Some(_) => false,
    }
}

/// A complete `308 Permanent Redirect` response to https://{host}{target}, with Content-Length: 0
/// and Connection: close.
///
/// `host` is meant to be a validated [`RequestHead::host`]. A target not in origin form keeps only
/// its path and query (`http://a.b/x?y` -> `/x?y`; `*` or an authority -> `/`). Whatever the input,
/// any byte outside visible ASCII is percent-encoded, so the Location header cannot be split.
pub fn redirect_to_https(host: &str, target: &str) -> Vec<u8> {
    let mut location = String::with_capacity("https://".len() + host.len() + target.len() + 1);
    location.push_str("https://");
    push_visible(&mut location, host);
    match origin_form(target) {
        Some(path) if path.starts_with('/') => push_visible(&mut location, path),
        Some(query) => {
            location.push('/');
            push_visible(&mut location, query);
        }
        None => location.push('/'),
    }
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The path-and-query part of a request target: the target itself in origin form, what follows
/// the authority in absolute form (starting with `/` or `?`), `None` otherwise (no path, `*`,
/// authority form).
fn origin_form(target: &str) -> Option<&str> {
    if target.starts_with('/') {
        return Some(target);
    }
    let (_scheme, rest) = target.split_once("://")?;
    let path_at = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.get(path_at..)
        .filter(|p| !p.is_empty() && !p.starts_with('#'))
}

/// Appends `s`, percent-encoding every byte that is not visible ASCII.
fn push_visible(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const NO_LIMIT: usize = usize::MAX;

    const BROWSER_GET: &[u8] = b"GET /search?q=sluice&lang=en HTTP/1.1\r\n\
        Host: WWW.Example.com:8080\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
        Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
        Accept-Language: en-US,en;q=0.5\r\n\
        Accept-Encoding: gzip, deflate\r\n\
        Connection: keep-alive\r\n\
        Upgrade-Insecure-Requests: 1\r\n\
        \r\n";

    fn done(buf: &[u8]) -> RequestHead {
        match peek_request_head(buf, NO_LIMIT) {
            Ok(Peek::Done(head)) => head,
            other => panic!("expected a parsed head, got {other:?}"),
        }
    }

    fn request(host_lines: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\n{host_lines}Accept: */*\r\n\r\n").into_bytes()
    }

    fn is_malformed(result: Result<Peek<RequestHead>, HttpPeekError>) -> bool {
        matches!(result, Err(HttpPeekError::Malformed(_)))
    }

    #[test]
    fn parses_a_browser_request() {
        let head = done(BROWSER_GET);
        assert_eq!(
            head,
            RequestHead {
                host: "www.example.com".into(),
                method: "GET".into(),
                target: "/search?q=sluice&lang=en".into(),
                len: BROWSER_GET.len(),
                body: BodyLength::None,
                upgrade: false,
            }
        );
    }

    #[test]
    fn a_resumed_peek_ends_where_a_fresh_one_does_and_parses_rarely() {
        for step in [1, 2, 7, BROWSER_GET.len()] {
            let mut peeker = RequestHeadPeeker::new(NO_LIMIT);
            let mut result = Ok(Peek::NeedMore);
            let mut end = 0;
            while result == Ok(Peek::NeedMore) && end < BROWSER_GET.len() {
                end = (end + step).min(BROWSER_GET.len());
                result = peeker.peek(&BROWSER_GET[..end]);
            }
            assert_eq!(end, BROWSER_GET.len(), "done only once the head is complete");
            assert_eq!(result, peek_request_head(BROWSER_GET, NO_LIMIT), "step {step}");
        }
        // One byte at a time: a parse per doubling plus the final one, not one per byte.
        let mut peeker = RequestHeadPeeker::new(NO_LIMIT);
        let mut count = 0;
        for end in 1..=BROWSER_GET.len() {
            let before = peeker.parsed_at;
            let _ = peeker.peek(&BROWSER_GET[..end]);
            count += usize::from(peeker.parsed_at != before);
        }
        assert!(count <= 12, "{count} parses for {} bytes", BROWSER_GET.len());
        // Garbage is refused at the first call, and a head with bare LFs still completes.
        assert_eq!(
            RequestHeadPeeker::new(NO_LIMIT).peek(b"\x16\x03\x01"),
            Err(HttpPeekError::NotHttp)
        );
        let bare = b"GET / HTTP/1.1\nHost: a.example\n\n";
        let mut peeker = RequestHeadPeeker::new(NO_LIMIT);
        let mut result = Ok(Peek::NeedMore);
        for end in 1..=bare.len() {
            result = peeker.peek(&bare[..end]);
        }
        assert_eq!(result, peek_request_head(bare, NO_LIMIT));
    }

    #[test]
    fn body_framing_must_be_unambiguous() {
        let framing = |headers: &str| {
            peek_request_head(
                format!("POST / HTTP/1.1\r\nHost: a.example\r\n{headers}\r\n").as_bytes(),
                NO_LIMIT,
            )
            .map(|p| match p {
                Peek::Done(head) => head.body,
                Peek::NeedMore => panic!("complete head"),
            })
        };
        assert_eq!(framing(""), Ok(BodyLength::None));
        assert_eq!(framing("Content-Length: 12\r\n"), Ok(BodyLength::Length(12)));
        assert_eq!(
            framing("Content-Length: 12\r\ncontent-length: 12\r\n"),
            Ok(BodyLength::Length(12))
        );
        assert_eq!(framing("Transfer-Encoding: Chunked\r\n"), Ok(BodyLength::Chunked));
        for ambiguous in [
            "Content-Length: 12\r\nContent-Length: 13\r\n",
            "Content-Length: 12\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1,1\r\n",
            "Content-Length: 99999999999999999999\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(
                matches!(framing(ambiguous), Err(HttpPeekError::Malformed(_))),
                "{ambiguous:?}"
            );
        }
        let upgrade = done(b"GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n");
        assert!(upgrade.upgrade);
    }

    #[test]
    fn every_prefix_needs_more() {
        for end in 0..BROWSER_GET.len() {
            assert_eq!(
                peek_request_head(&BROWSER_GET[..end], NO_LIMIT),
                Ok(Peek::NeedMore),
                "prefix {end}"
            );
            assert_eq!(
                peek_request_head(&BROWSER_GET[..end], BROWSER_GET.len()),
                Ok(Peek::NeedMore)
            );
        }
    }

    #[test]
    fn len_excludes_the_body() {
        let mut stream = b"POST /upload HTTP/1.0\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n".to_vec();
        let head_len = stream.len();
        stream.extend_from_slice(b"hello");
        let head = done(&stream);
        assert_eq!((head.method.as_str(), head.len), ("POST", head_len));
    }

    #[test]
    fn host_forms() {
        for (value, expected) in [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("example.com:443", "example.com"),
            ("example.com:", "example.com"),
            ("127.0.0.1:8080", "127.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("[2001:DB8:0:0::1]", "[2001:db8::1]"),
            ("  padded.example  ", "padded.example"),
        ] {
            let head = done(&request(&format!("Host: {value}\r\n")));
            assert_eq!(head.host, expected, "{value:?}");
        }
        // Any case of the header name.
        assert_eq!(done(&request("hOsT: a.example\r\n")).host, "a.example");
    }

    #[test]
    fn invalid_hosts() {
        for value in [
            "exa_mple.com",
            "exa mple.com",
            "example.com:99999",
            "example.com:8o",
            "example.com:80:80",
            "10.1",
            "01.2.3.4",
            "::1",
            "[::1",
            "[::1]x",
            "[fe80::1%25eth0]",
            "[example.com]",
            "user@example.com",
            "b\u{fc}cher.example",
        ] {
            assert!(
                is_malformed(peek_request_head(
                    &request(&format!("Host: {value}\r\n")),
                    NO_LIMIT
                )),
                "{value:?}"
            );
        }
    }

    #[test]
    fn host_is_required_and_unique() {
        assert_eq!(
            peek_request_head(&request(""), NO_LIMIT),
            Err(HttpPeekError::MissingHost)
        );
        assert_eq!(
            peek_request_head(&request("Host:\r\n"), NO_LIMIT),
            Err(HttpPeekError::MissingHost)
        );
        assert_eq!(
            peek_request_head(b"GET / HTTP/1.0\r\n\r\n", NO_LIMIT),
            Err(HttpPeekError::MissingHost)
        );
        assert!(is_malformed(peek_request_head(
            &request("Host: a.example\r\nHost: b.example\r\n"),
            NO_LIMIT
        )));
        assert!(is_malformed(peek_request_head(
            &request("Host: a.example\r\nHOST: a.example\r\n"),
            NO_LIMIT
        )));
    }

    #[test]
    fn an_absolute_form_target_must_name_the_host_header() {
        let head = done(b"GET http://A.example:80/x?y=1 HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(
            (head.host.as_str(), head.target.as_str()),
            ("a.example", "http://A.example:80/x?y=1")
        );
        for other in [
            &b"GET http://other.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"[..],
            b"GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET https://other.example HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ] {
            assert!(
                is_malformed(peek_request_head(other, NO_LIMIT)),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(
            peek_request_head(b"GET http://a.example/ HTTP/1.1\r\n\r\n", NO_LIMIT),
            Err(HttpPeekError::MissingHost)
        );
    }

    #[test]
    fn not_http() {
        for stream in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"\x00\x00\x00\x00",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\r\x00",
            b" GET / HTTP/1.1\r\n",
        ] {
            assert_eq!(
                peek_request_head(stream, NO_LIMIT),
                Err(HttpPeekError::NotHttp),
                "{stream:?}"
            );
        }
        // An empty line before the request line is tolerated (RFC 9112 §2.2).
        let stream = b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
        assert_eq!(done(stream).len, stream.len());
    }

    #[test]
    fn malformed_heads() {
        for stream in [
            &b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: a.example\r\n\r\n",
            b"GET /\r\n",
            b"GET /a\x01b HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET /a\rLocation: x HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost a.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x00.example\r\n\r\n",
        ] {
            assert!(
                is_malformed(peek_request_head(stream, NO_LIMIT)),
                "{:?}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn header_count_limit() {
        // `request` adds Host and Accept: 64 fields in all, then 65.
        let mut fields: String = (2..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(done(&request(&format!("Host: a.example\r\n{fields}"))).len > 0);
        fields.push_str("X-Last: v\r\n");
        assert!(is_malformed(peek_request_head(
            &request(&format!("Host: a.example\r\n{fields}")),
            NO_LIMIT
        )));
    }

    #[test]
    fn too_large() {
        let limit = BROWSER_GET.len() - 1;
        assert_eq!(
            peek_request_head(BROWSER_GET, limit),
            Err(HttpPeekError::TooLarge { limit })
        );
        assert!(matches!(
            peek_request_head(BROWSER_GET, BROWSER_GET.len()),
            Ok(Peek::Done(_))
        ));
        // An unfinished head fails once it reaches the limit, not before.
        let endless = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 100]].concat();
        let limit = endless.len();
        assert_eq!(peek_request_head(&endless, limit + 1), Ok(Peek::NeedMore));
        assert_eq!(
            peek_request_head(&endless, limit),
            Err(HttpPeekError::TooLarge { limit })
        );
        assert_eq!(
            peek_request_head(&endless, 20),
            Err(HttpPeekError::TooLarge { limit: 20 })
        );
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x4774_7031);
        for _ in 0..5000 {
            let mut buf = vec![0u8; rng.random_range(0..300)];
            if rng.random_bool(0.5) {
                rng.fill(buf.as_mut_slice());
            } else {
                // Printable soup with line breaks, sometimes behind a valid request line.
                let alphabet = b"GET /HTTP1.0:[]@?# \t\r\nHost\x00\x7f\xff";
                for b in &mut buf {
                    *b = alphabet[rng.random_range(0..alphabet.len())];
                }
                if rng.random_bool(0.5) {
                    buf.splice(0..0, b"GET / HTTP/1.1\r\nHost: ".iter().copied());
                }
            }
            let max_len = rng.random_range(0..400);
            if let Ok(Peek::Done(head)) = peek_request_head(&buf, max_len) {
                assert!(head.len <= buf.len() && head.len <= max_len);
                assert!(head.target.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }

    #[test]
    fn redirect() {
        assert_eq!(
            redirect_to_https("example.com", "/a/b?c=d"),
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://example.com/a/b?c=d\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let location = |target: &str| {
            let response = String::from_utf8(redirect_to_https("a.example", target)).unwrap();
            let (_, rest) = response.split_once("Location: ").unwrap();
            rest.split_once("\r\n").unwrap().0.to_owned()
        };
        assert_eq!(location("http://other.example/x?y"), "https://a.example/x?y");
        assert_eq!(location("http://other.example?y"), "https://a.example/?y");
        assert_eq!(location("http://other.example"), "https://a.example/");
        assert_eq!(location("http://other.example#frag"), "https://a.example/");
        assert_eq!(location("*"), "https://a.example/");
        assert_eq!(location("a.example:443"), "https://a.example/");
        // Defence in depth: even unvalidated input cannot split the header.
        assert_eq!(
            location("/x\r\nSet-Cookie: a=b"),
            "https://a.example/x%0D%0ASet-Cookie:%20a=b"
        );
        let response = redirect_to_https("evil\r\nX: y", "/");
        assert_eq!(response.windows(2).filter(|w| w == b"\r\n").count(), 5);
    }

    #[test]
    fn redirect_for_a_parsed_request() {
        let head = done(BROWSER_GET);
        let response = redirect_to_https(&head.host, &head.target);
        assert!(response.starts_with(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://www.example.com/search?q=sluice&lang=en\r\n"));
    }

    #[test]
    fn refusals() {
        let too_large = HttpPeekError::TooLarge { limit: 1 }.refusal();
        assert!(matches!(too_large.reply, Reply::Http { status: 431, .. }));
        assert_eq!(too_large.abuse, Some(Abuse::BadHttpRequest));
        let bad = HttpPeekError::NotHttp.refusal();
        assert!(matches!(bad.reply, Reply::Http { status: 400, .. }));
        assert_eq!(bad.rejection, Rejection::ParseError);
        let unknown = refusal(Rejection::UnknownHost);
        assert!(matches!(unknown.reply, Reply::Http { status: 404, .. }));
        assert_eq!(unknown.abuse, Some(Abuse::UnknownName));
        for failed in [
            Rejection::NoAgent,
            Rejection::AgentBusy,
            Rejection::AgentUnreachable,
        ] {
            let refusal = refusal(failed);
            assert!(
                matches!(refusal.reply, Reply::Http { status: 502, .. }),
                "{failed:?}"
            );
            assert_eq!(refusal.abuse, None);
        }
        assert_eq!(refusal(Rejection::Timeout).reply, Reply::Close);
    }
}

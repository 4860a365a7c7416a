//! Forwarded plaintext HTTP after the first request: the rest of the client's byte stream,
//! request by request. The relay routed the connection by its first request's Host; every
//! later request must be for the same host (and an absolute-form target's host must equal its
//! Host header), or the relay closes the connection. Without this, a keep-alive connection
//! routed by one hostname could carry requests for another hostname of the same tenant — one
//! the tenant wants redirected to https — to the target in plaintext.
//!
//! Sans-IO: [`RequestStream::feed`] takes the bytes read from the client and appends to `out`
//! the bytes that may be forwarded now. A request head is held back until it is complete and
//! checked; a body passes as it comes, framed by its Content-Length or its chunked transfer
//! coding. What cannot be framed unambiguously is refused ([`super::http::peek_request_head`]
//! refuses both Content-Length and Transfer-Encoding, differing Content-Lengths, and transfer
//! codings other than chunked), and so are CONNECT and Upgrade requests, which would turn the
//! rest of the stream into bytes nobody inspects. Work is linear in the bytes fed.
use super::Peek;
use super::http::{BodyLength, HttpPeekError, RequestHead, peek_request_head};

/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// Why the relay closes a forwarded plaintext connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpStreamError {
    /// A later request's head does not parse or frames its body ambiguously.
    #[error("request {index} on the connection: {error}")]
    BadRequest {
        /// 1-based position on the connection.
        index: u64,
        /// What is wrong with it.
        error: HttpPeekError,
    },
    /// A later request names another host than the one the connection was routed by.
    #[error("request {index} on the connection is for {found}, not {routed}")]
    OtherHost {
        /// 1-based position on the connection.
        index: u64,
        /// The host the connection was routed by.
        routed: String,
        /// The host this request names.
        found: String,
    },
    /// CONNECT, or an Upgrade: the rest of the stream would not be HTTP any more.
    #[error("request {index} on the connection asks for {what}, which is not forwarded in plaintext")]
    Opaque {
        /// 1-based position on the connection.
        index: u64,
        /// `CONNECT` or `Upgrade`.
        what: &'static str,
    },
    /// A chunked body whose framing is broken.
    #[error("request {index} on the connection: malformed chunked body: {why}")]
    BadChunk {
        /// 1-based position on the connection.
        index: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Where the stream is.
#[derive(Debug)]
enum State {
    /// Collecting the next request head; `scanned` bytes of it are known not to end it.
    Head { head: Vec<u8>, scanned: usize },
    /// Inside a body of known length.
    Body { remaining: u64 },
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Refused: nothing more is forwarded.
    Refused(HttpStreamError),
}

/// Where a chunked body is.
#[derive(Debug)]
enum Chunk {
    /// Reading a chunk-size line.
    Size { line: Vec<u8> },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// The CRLF after chunk data; `seen` of its two bytes so far.
    DataEnd { seen: u8 },
    /// Trailer fields after the last chunk, up to the empty line; `line` is the current one.
    Trailer { line: Vec<u8>, total: usize },
}

/// The requests of one forwarded plaintext connection.
#[derive(Debug)]
pub struct RequestStream {
    routed_host: String,
    max_head: usize,
    /// Requests started so far (the first one included).
    requests: u64,
    state: State,
}

impl RequestStream {
    /// The stream after its first request `first` (already checked and forwarded by the edge),
    /// whose body comes next. Later heads may be up to `max_head` bytes.
    pub fn after(first: &RequestHead, max_head: usize) -> Result<Self, HttpStreamError> {
        let mut stream = Self {
            routed_host: first.host.clone(),
            max_head,
            requests: 1,
            state: State::Head {
                head: Vec::new(),
                scanned: 0,
            },
        };
        stream.state = stream.begin(first)?;
        Ok(stream)
    }

    /// Feeds `input` (the next bytes from the client) and appends to `out` the bytes that may
    /// be forwarded to the agent. After an error nothing more is forwarded; what was appended
    /// before it belongs to requests that passed and may still go out.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), HttpStreamError> {
        while !input.is_empty() {
            let used = match &mut self.state {
                State::Refused(error) => return Err(error.clone()),
                State::Body { remaining } => {
                    let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Head {
                            head: Vec::new(),
                            scanned: 0,
                        };
                    }
                    n
                }
                State::Chunked(_) => self.feed_chunked(input, out),
                State::Head { .. } => self.feed_head(input, out),
            };
            input = &input[used..];
            if let State::Refused(error) = &self.state {
                return Err(error.clone());
            }
        }
        Ok(())
    }

    /// Takes bytes of a request head; once it is complete, checks it and forwards it.
    fn feed_head(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let State::Head { head, scanned } = &mut self.state else {
            unreachable!("called in the head state");
        };
        // Find the end of the head (CRLF CRLF) among the bytes taken so far and these, looking
        // at each byte once (three bytes back, for an end that spans two reads).
        let room = self.max_head.saturating_sub(head.len()).max(1);
        let take = input.len().min(room);
        head.extend_from_slice(&input[..take]);
        let from = scanned.saturating_sub(3);
        let end = head[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| from + at + 4);
        let Some(end) = end else {
            *scanned = head.len();
            if head.len() >= self.max_head {
                self.requests += 1;
                self.state = State::Refused(HttpStreamError::BadRequest {
                    index: self.requests,
                    error: HttpPeekError::TooLarge { limit: self.max_head },
                });
            }
            return take;
        };
        // Bytes past the end of the head go back to the input.
        let unused = head.len() - end;
        head.truncate(end);
        let head = std::mem::take(head);
        self.requests += 1;
        self.state = match peek_request_head(&head, self.max_head) {
            Ok(Peek::Done(parsed)) => match self.begin(&parsed) {
                Ok(next) => {
                    out.extend_from_slice(&head);
                    next
                }
                Err(error) => State::Refused(error),
            },
            // A complete head (it ends with CRLF CRLF) is never `NeedMore`.
            Ok(Peek::NeedMore) => State::Refused(HttpStreamError::BadRequest {
                index: self.requests,
                error: HttpPeekError::Malformed("incomplete request head".into()),
            }),
            Err(error) => State::Refused(HttpStreamError::BadRequest {
                index: self.requests,
                error,
            }),
        };
        take - unused
    }

    /// Checks request `head` (the `self.requests`-th) and returns the state its body starts.
    fn begin(&self, head: &RequestHead) -> Result<State, HttpStreamError> {
        let index = self.requests;
        if head.host != self.routed_host {
            return Err(HttpStreamError::OtherHost {
                index,
                routed: self.routed_host.clone(),
                found: head.host.clone(),
            });
        }
        if head.method.eq_ignore_ascii_case("CONNECT") {
            return Err(HttpStreamError::Opaque {
                index,
                what: "CONNECT",
            });
        }
        if head.upgrade {
            return Err(HttpStreamError::Opaque {
                index,
                what: "Upgrade",
            });
        }
        Ok(match head.body {
            BodyLength::None | BodyLength::Length(0) => State::Head {
                head: Vec::new(),
                scanned: 0,
            },
            BodyLength::Length(remaining) => State::Body { remaining },
            BodyLength::Chunked => State::Chunked(Chunk::Size { line: Vec::new() }),
        })
    }

    /// Takes bytes of a chunked body, forwarding them as their framing checks out.
    fn feed_chunked(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let index = self.requests;
        let bad = |why| State::Refused(HttpStreamError::BadChunk { index, why });
        let max_trailer = self.max_head;
        let State::Chunked(chunk) = &mut self.state else {
            unreachable!("called in the chunked state");
        };
        match chunk {
            Chunk::Data { remaining } => {
                let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(input.len());
                out.extend_from_slice(&input[..n]);
                *remaining -= n as u64;
                if *remaining == 0 {
                    *chunk = Chunk::DataEnd { seen: 0 };
                }
                n
            }
            Chunk::DataEnd { seen } => {
                let expected = b"\r\n"[usize::from(*seen)];
                if input[0] != expected {
                    self.state = bad("chunk data not followed by CRLF");
                    return 0;
                }
                out.push(input[0]);
                *seen += 1;
                if *seen == 2 {
                    *chunk = Chunk::Size { line: Vec::new() };
                }
                1
            }
            Chunk::Size { line } => {
                let Some(at) = input.iter().position(|&b| b == b'\n') else {
                    line.extend_from_slice(input);
                    if line.len() > MAX_CHUNK_LINE {
                        self.state = bad("chunk-size line too long");
                    }
                    return input.len();
                };
                line.extend_from_slice(&input[..=at]);
                if line.len() > MAX_CHUNK_LINE {
                    self.state = bad("chunk-size line too long");
                    return 0;
                }
                let size = match parse_chunk_size(line) {
                    Ok(size) => size,
                    Err(why) => {
                        self.state = bad(why);
                        return 0;
                    }
                };
                out.extend_from_slice(line);
                *chunk = if size == 0 {
                    Chunk::Trailer {
                        line: Vec::new(),
                        total: 0,
                    }
                } else {
                    Chunk::Data { remaining: size }
                };
                at + 1
            }
            Chunk::Trailer { line, total } => {
                let Some(at) = input.iter().position(|&b| b == b'\n') else {
                    line.extend_from_slice(input);
                    *total += input.len();
                    if *total > max_trailer {
                        self.state = bad("trailer section too large");
                    }
                    return input.len();
                };
                line.extend_from_slice(&input[..=at]);
                *total += at + 1;
                if *total > max_trailer {
                    self.state = bad("trailer section too large");
                    return 0;
                }
                if !line.ends_with(b"\r\n") {
                    self.state = bad("trailer line not ended by CRLF");
                    return 0;
                }
                out.extend_from_slice(line);
                if line.len() == 2 {
                    // The empty line: the message is complete.
                    self.state = State::Head {
                        head: Vec::new(),
                        scanned: 0,
                    };
                } else {
                    line.clear();
                }
                at + 1
            }
        }
    }
}

/// `chunk-size [ chunk-ext ] CRLF` (RFC 9112 §7.1): the size, in hex.
fn parse_chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or("chunk-size line not ended by CRLF")?;
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() {
        return Err("chunk size missing");
    }
    if digits.len() > 15 {
        return Err("chunk size too large");
    }
    if !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t') {
        return Err("junk after the chunk size");
    }
    if rest.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err("control byte in a chunk extension");
    }
    let digits = std::str::from_utf8(digits).map_err(|_| "chunk size not ASCII")?;
    u64::from_str_radix(digits, 16).map_err(|_| "chunk size not hex")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 * 1024;

    fn first(request: &[u8]) -> (RequestHead, Vec<u8>) {
        let Ok(Peek::Done(head)) = peek_request_head(request, MAX) else {
            panic!(
                "first request does not parse: {:?}",
                String::from_utf8_lossy(request)
            );
        };
        let rest = request[head.len..].to_vec();
        (head, rest)
    }

    /// Feeds `rest` after `first`'s head in pieces of `step` bytes; returns what was forwarded
    /// and the outcome.
    fn run(first_request: &[u8], step: usize) -> (Vec<u8>, Result<(), HttpStreamError>) {
        let (head, rest) = first(first_request);
        let mut stream = match RequestStream::after(&head, MAX) {
            Ok(stream) => stream,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let mut out = Vec::new();
        for piece in rest.chunks(step.max(1)) {
            if let Err(e) = stream.feed(piece, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: app.acme.test\r\n\r\n";

    #[test]
    fn keep_alive_requests_for_the_same_host_pass_unchanged_however_they_are_split() {
        let mut stream = GET.to_vec();
        let post = b"POST /b HTTP/1.1\r\nHost: APP.acme.test:80\r\nContent-Length: 5\r\n\r\nhello";
        let chunked = b"POST /c HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n";
        let absolute = b"GET http://app.acme.test/d HTTP/1.1\r\nHost: app.acme.test\r\n\r\n";
        for later in [&post[..], chunked, absolute, GET] {
            stream.extend_from_slice(later);
        }
        let expected = stream[GET.len()..].to_vec();
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (out, result) = run(&stream, step);
            assert_eq!(result, Ok(()), "step {step}");
            assert_eq!(out, expected, "step {step}");
        }
    }

    #[test]
    fn a_request_for_another_host_is_refused_and_never_forwarded() {
        let mut stream = GET.to_vec();
        stream.extend_from_slice(b"GET /x HTTP/1.1\r\nHost: app.acme.test\r\n\r\n");
        let allowed = stream.len() - GET.len();
        stream.extend_from_slice(b"GET /secret HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n");
        for step in [1, 5, stream.len()] {
            let (out, result) = run(&stream, step);
            assert!(
                matches!(&result, Err(HttpStreamError::OtherHost { index: 3, found, .. }) if found == "admin.acme.test"),
                "{result:?}"
            );
            assert_eq!(
                out.len(),
                allowed,
                "nothing of the refused request went out (step {step})"
            );
        }
    }

    #[test]
    fn an_absolute_form_target_must_name_the_host_header() {
        let mut stream = GET.to_vec();
        stream.extend_from_slice(b"GET http://admin.acme.test/ HTTP/1.1\r\nHost: app.acme.test\r\n\r\n");
        let (out, result) = run(&stream, 3);
        assert!(
            matches!(result, Err(HttpStreamError::BadRequest { index: 2, .. })),
            "{result:?}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn a_body_is_never_read_as_a_request() {
        // The body of the first request looks like a request for another host: it is a body.
        let body = b"GET / HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nHost: app.acme.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(GET);
        let (out, result) = run(&stream, 4);
        assert_eq!(result, Ok(()));
        assert_eq!(out.len(), body.len() + GET.len());
    }

    #[test]
    fn connect_upgrade_and_ambiguous_framing_are_refused() {
        for (later, opaque) in [
            (&b"CONNECT admin.acme.test:443 HTTP/1.1\r\nHost: app.acme.test\r\n\r\n"[..], true),
            (b"GET /ws HTTP/1.1\r\nHost: app.acme.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", true),
            (b"POST / HTTP/1.1\r\nHost: app.acme.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\nHost: app.acme.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            (b"POST / HTTP/1.1\r\nHost: app.acme.test\r\nContent-Length: -1\r\n\r\n", false),
        ] {
            let mut stream = GET.to_vec();
            stream.extend_from_slice(later);
            let (out, result) = run(&stream, 2);
            assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(later));
            match result {
                Err(HttpStreamError::Opaque { .. }) if opaque => {}
                Err(HttpStreamError::BadRequest { .. }) if !opaque => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(later)),
            }
        }
        // The first request itself asking for an upgrade.
        let (head, _) = first(b"GET /ws HTTP/1.1\r\nHost: app.acme.test\r\nUpgrade: websocket\r\n\r\n");
        assert!(matches!(
            RequestStream::after(&head, MAX),
            Err(HttpStreamError::Opaque { index: 1, .. })
        ));
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for body in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff1\r\n",
            b"5 junk\x00\r\nhello\r\n0\r\n\r\n",
        ] {
            let mut stream =
                b"POST / HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            stream.extend_from_slice(body);
            stream.extend_from_slice(GET);
            let (_, result) = run(&stream, 3);
            assert!(
                matches!(result, Err(HttpStreamError::BadChunk { .. })),
                "{:?}: {result:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_head_that_never_ends_is_refused_at_the_limit() {
        let mut stream = GET.to_vec();
        stream.extend_from_slice(b"GET / HTTP/1.1\r\nX: ");
        stream.extend(std::iter::repeat_n(b'a', MAX * 2));
        let (out, result) = run(&stream, 1000);
        assert!(out.is_empty());
        assert!(
            matches!(
                result,
                Err(HttpStreamError::BadRequest {
                    error: HttpPeekError::TooLarge { .. },
                    ..
                })
            ),
            "{result:?}"
        );
    }
}

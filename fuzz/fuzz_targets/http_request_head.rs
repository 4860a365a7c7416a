//! Fuzzes the plaintext HTTP request-head peek: `sluice::peek::http::{peek_request_head,
//! RequestHeadPeeker}`.
//!
//! Input: [`Knobs`] (the peek's `max_len`, and where the stream is cut into reads), then the
//! client's first bytes. Properties, for every input:
//!
//! 1. No panic. A `Done` head's `len` is within the input and `max_len`, its target is visible
//!    ASCII (it may reach a `Location` header) and its host is in normal form (a name
//!    [`normalize`] leaves unchanged, an IPv4 address, or a bracketed IPv6 address as Rust
//!    prints it); `NeedMore` never waits past `max_len`.
//! 2. The verdict does not depend on how the network split the bytes: every prefix is
//!    `NeedMore` up to the first with a verdict, which is the whole input's; a head is `Done`
//!    exactly from its last byte on (every shorter prefix is `NeedMore`, never an error).
//! 3. `RequestHeadPeeker`, fed one byte per read and at the knobs' cuts, gives the whole
//!    input's verdict whenever it gives one, gives `Done` at the read that completes the head,
//!    and has given its verdict once the buffer reaches `max_len`.
//! 4. Agreement with httparse (on the bytes within `max_len`): where we return `Done`, httparse
//!    parses a complete HTTP/1.0 or 1.1 request of the same length with the same method and
//!    target; where httparse fails before it has a method, we say `NotHttp`; where it needs more
//!    bytes below the limit, so do we; where it parses a complete head, we do not call the
//!    stream `NotHttp`, `TooLarge` or incomplete.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use sluice::hostname::normalize;
use sluice::peek::Peek;
use sluice::peek::http::{HttpPeekError, MAX_HEADERS, RequestHead, RequestHeadPeeker, peek_request_head};
use sluice_fuzz::Knobs;

type Verdict = Result<Peek<RequestHead>, HttpPeekError>;

fuzz_target!(|data: &[u8]| {
    let Some((knobs, stream)) = Knobs::split(data) else {
        return;
    };
    // Steps of 4 bytes: limits up to 508 bytes, inside and around typical heads.
    let max_len = knobs.limit(4);
    let whole = peek_request_head(stream, max_len);
    match &whole {
        Ok(Peek::Done(head)) => check_head(stream, max_len, head),
        Ok(Peek::NeedMore) => assert!(stream.len() < max_len, "NeedMore at the limit"),
        Err(_) => {}
    }
    check_prefixes(stream, max_len, &whole);
    check_peeker(stream, max_len, &whole, &sluice_fuzz::cuts(1, stream.len()), true);
    check_peeker(
        stream,
        max_len,
        &whole,
        &sluice_fuzz::cuts(knobs.cuts, stream.len()),
        false,
    );
    check_httparse_agrees(stream, max_len, &whole);
});

/// Property 1 for a parsed head.
fn check_head(stream: &[u8], max_len: usize, head: &RequestHead) {
    assert!(head.len <= stream.len() && head.len <= max_len, "{head:?}");
    assert!(head.target.bytes().all(|b| b.is_ascii_graphic()), "{head:?}");
    assert!(!head.method.is_empty());
    let host = head.host.as_str();
    let normal = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<Ipv6Addr>().is_ok_and(|a| a.to_string() == v6)
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        v4.to_string() == host
    } else {
        normalize(host.as_bytes()).is_ok_and(|n| n == host)
    };
    assert!(normal, "host {host:?} is not in normal form");
}

/// Property 2: prefixes (all of them for short inputs, a sample of long ones) are `NeedMore`
/// until the first verdict, then that verdict; a `Done` head completes at its last byte.
fn check_prefixes(stream: &[u8], max_len: usize, whole: &Verdict) {
    if let Ok(Peek::Done(head)) = whole {
        assert_eq!(
            peek_request_head(&stream[..head.len], max_len),
            *whole,
            "at the head's end"
        );
        assert_eq!(
            peek_request_head(&stream[..head.len - 1], max_len),
            Ok(Peek::NeedMore),
            "one byte short of the head's end"
        );
    }
    let mut verdict: Option<Verdict> = None;
    for end in sluice_fuzz::prefix_sample(stream.len()) {
        let fresh = peek_request_head(&stream[..end], max_len);
        match &verdict {
            None if fresh == Ok(Peek::NeedMore) => {}
            None => {
                assert_eq!(
                    fresh, *whole,
                    "first verdict, at prefix {end}, is not the whole input's"
                );
                verdict = Some(fresh);
            }
            Some(seen) => assert_eq!(fresh, *seen, "verdict changed at prefix {end}"),
        }
    }
}

/// Property 3 for one way of cutting the stream into reads.
fn check_peeker(stream: &[u8], max_len: usize, whole: &Verdict, cuts: &[usize], per_byte: bool) {
    let mut peeker = RequestHeadPeeker::new(max_len);
    let mut verdict = None;
    for &end in cuts {
        let result = peeker.peek(&stream[..end]);
        if result == Ok(Peek::NeedMore) {
            if end >= max_len {
                panic!("peeker still waiting at the limit ({end} bytes)");
            }
            continue;
        }
        assert_eq!(result, *whole, "peeker's verdict at {end} bytes");
        if let (true, Ok(Peek::Done(head))) = (per_byte, &result) {
            assert_eq!(head.len, end, "per-byte peeker done only at the head's last byte");
        }
        verdict = Some(result);
        break;
    }
    if matches!(whole, Ok(Peek::Done(_))) {
        assert!(
            verdict.is_some(),
            "peeker never completed a head the fresh peek completes"
        );
    }
}

/// Property 4.
fn check_httparse_agrees(stream: &[u8], max_len: usize, ours: &Verdict) {
    let window = stream.get(..max_len).unwrap_or(stream);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let reference = request.parse(window);
    if let Ok(Peek::Done(head)) = ours {
        assert_eq!(
            reference,
            Ok(httparse::Status::Complete(head.len)),
            "httparse on a head we parse"
        );
        assert_eq!(request.method, Some(head.method.as_str()));
        assert_eq!(request.path, Some(head.target.as_str()));
        assert!(matches!(request.version, Some(0 | 1)));
        return;
    }
    match reference {
        Err(_) if request.method.is_none() => assert_eq!(*ours, Err(HttpPeekError::NotHttp)),
        Ok(httparse::Status::Partial) if window.len() < max_len => assert_eq!(*ours, Ok(Peek::NeedMore)),
        Ok(httparse::Status::Partial) => assert_eq!(*ours, Err(HttpPeekError::TooLarge { limit: max_len })),
        Ok(httparse::Status::Complete(_)) => assert!(
            matches!(
                ours,
                Err(HttpPeekError::Malformed(_) | HttpPeekError::MissingHost)
            ),
            "httparse parses a complete head, we say {ours:?}"
        ),
        Err(_) => assert!(matches!(ours, Err(HttpPeekError::Malformed(_))), "{ours:?}"),
    }
}

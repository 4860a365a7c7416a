//! Fuzzes the forwarded plaintext HTTP stream after the first request:
//! `sluice::peek::http_stream::RequestStream`.
//!
//! Input: [`Knobs`] (the limit on later heads, and where the stream is cut into reads), then a
//! client's plaintext connection. The first request head is read with `peek_request_head`, as
//! the edge does; inputs whose first head does not parse, or is refused by
//! `RequestStream::after`, end there. The rest is fed to the stream. Properties:
//!
//! 1. No panic.
//! 2. Splitting the rest at any points gives the same forwarded bytes and the same verdict as
//!    feeding it whole: checked for one byte per read and for the knobs' cuts.
//! 3. The forwarded bytes are always a prefix of the input (nothing is invented, reordered or
//!    dropped), after every read.
//! 4. An error is final: feeding more after it returns the same error and forwards nothing.
//! 5. What is held back at the end is a part of a request head or a chunked-body line still
//!    being read: no complete head (`CRLF CRLF`) and no more than the limit of either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::peek::Peek;
use sluice::peek::http::peek_request_head;
use sluice::peek::http_stream::{HttpStreamError, RequestStream};
use sluice_fuzz::Knobs;

/// The limit on the first head, as the edge's default header cap.
const FIRST_HEAD_LIMIT: usize = 16 * 1024;
/// `RequestStream`'s longest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((knobs, stream)) = Knobs::split(data) else {
        return;
    };
    let Ok(Peek::Done(first)) = peek_request_head(stream, FIRST_HEAD_LIMIT) else {
        return;
    };
    // Limits of 32 bytes to about 2 KiB: later heads both fit and overflow.
    let max_head = match knobs.limit(16) {
        usize::MAX => FIRST_HEAD_LIMIT,
        limit => 32 + limit,
    };
    let rest = &stream[first.len..];
    let feed = |cuts: &[usize]| -> (Vec<u8>, Result<(), HttpStreamError>) {
        let mut requests = match RequestStream::after(&first, max_head) {
            Ok(requests) => requests,
            Err(error) => return (Vec::new(), Err(error)),
        };
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts {
            let result = requests.feed(&rest[start..end], &mut out);
            assert_eq!(
                out,
                rest[..out.len()],
                "forwarded bytes are not a prefix of the input"
            );
            if let Err(error) = result {
                let before = out.len();
                assert_eq!(
                    requests.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out),
                    Err(error.clone())
                );
                assert_eq!(out.len(), before, "forwarded bytes after an error");
                return (out, Err(error));
            }
            start = end;
        }
        (out, Ok(()))
    };
    let whole = feed(&[rest.len()]);
    if let (out, Err(HttpStreamError::Opaque { index: 1, .. })) = &whole {
        // The first request itself was refused by `after`: nothing was fed.
        assert!(out.is_empty());
        return;
    }
    for cuts in [
        sluice_fuzz::cuts(1, rest.len()),
        sluice_fuzz::cuts(knobs.cuts, rest.len()),
    ] {
        assert_eq!(feed(&cuts), whole, "a split feed differs from the whole feed");
    }
    if let (out, Ok(())) = &whole {
        let held = &rest[out.len()..];
        assert!(
            !held.windows(4).any(|w| w == b"\r\n\r\n"),
            "a complete head held back: {held:?}"
        );
        assert!(
            held.len() <= max_head.max(MAX_CHUNK_LINE),
            "{} bytes held back",
            held.len()
        );
    }
});

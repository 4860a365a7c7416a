//! Cost of routing a connection from its first bytes: `sluice::peek` on a real rustls ClientHello
//! (one record, padded to 2 KiB, split into 3 records) and on a typical browser request head.
//!
//! Each input is parsed whole, as the relay does once the last segment has arrived; and a large
//! hello is delivered the hard way, in one-byte records arriving one per read, to show that
//! reassembly costs about the same per byte however the client splits it (`ClientHelloPeeker`
//! resumes where it stopped; the stateless `peek_client_hello` re-walks every record on every
//! read, which is what a hostile client made quadratic).
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::peek::Peek;
use sluice::peek::http::peek_request_head;
use sluice::peek::tls::{ClientHelloPeeker, peek_client_hello};
use sluice_tests::records::handshake_records;

/// The first flight rustls 0.23 (ring provider, TLS 1.3 + 1.2) sends for `api.example.com` with
/// ALPN `h2`, `http/1.1`: one 260-byte handshake record, captured with `ClientConnection::write_tls`.
const RUSTLS_HELLO_HEX: &str = concat!(
    "16030100ff010000fb030316b6f003582560f8490b6c0455bceaf1184efea2d5ce067315a31dbd1cf07bed2089c0348e",
    "df5be9f78d29901e7beb3df4c47daba0e372efd7d81ca0359fd5f0010014130213011303c02cc02bcca9c030c02fcca8",
    "00ff0100009e002d00020101000d0014001205030403080708060805080406010501040100170000002b000504030403",
    "0300000014001200000f6170692e6578616d706c652e636f6d000b0002010000230000003300260024001d0020bf3945",
    "21282715749404e6963e25a65d80ffbb665c7b7806e133309e1190e8430010000e000c02683208687474702f312e3100",
    "0a00080006001d00170018000500050100000000",
);

/// A Firefox-style navigation request as it arrives on the cleartext port.
const BROWSER_REQUEST_HEAD: &[u8] = b"GET /docs/getting-started?lang=en&ref=nav HTTP/1.1\r\n\
    Host: www.example.com\r\n\
    User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
    Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
    Accept-Language: en-US,en;q=0.5\r\n\
    Accept-Encoding: gzip, deflate\r\n\
    Connection: keep-alive\r\n\
    Cookie: session=4f2a9c1e7b3d5a6f; theme=dark\r\n\
    Upgrade-Insecure-Requests: 1\r\n\
    Priority: u=0, i\r\n\
    \r\n";

const MAX_LEN: usize = 64 * 1024;

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

fn u16_at(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]))
}

/// The handshake message of a one-record hello, with a padding extension (RFC 7685) appended so
/// that the record is `target_len` bytes long.
fn padded(hello: &[u8], target_len: usize) -> Vec<u8> {
    let mut message = hello[5..].to_vec();
    let pad = target_len - hello.len() - 4;
    // Skip the handshake header, version, random, then the length-prefixed session id, cipher
    // suites and compression methods, to land on the extensions length.
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(message[at]);
    at += 2 + u16_at(&message, at);
    at += 1 + usize::from(message[at]);
    let extensions_len = u16_at(&message, at) + 4 + pad;
    message[at..at + 2].copy_from_slice(&u16::try_from(extensions_len).expect("extensions").to_be_bytes());
    message.extend_from_slice(&21u16.to_be_bytes());
    message.extend_from_slice(&u16::try_from(pad).expect("padding").to_be_bytes());
    message.resize(message.len() + pad, 0);
    let body_len = u32::try_from(message.len() - 4).expect("body").to_be_bytes();
    message[1..4].copy_from_slice(&body_len[1..]);
    handshake_records(&message, &[])
}

fn bench_client_hello(c: &mut Criterion) {
    let hello = from_hex(RUSTLS_HELLO_HEX);
    let message = &hello[5..];
    let inputs = [
        ("rustls_sni_alpn_260B", hello.clone()),
        ("rustls_padded_2KiB", padded(&hello, 2048)),
        ("rustls_sni_alpn_3_records", handshake_records(message, &[7, 131])),
        (
            "rustls_padded_2KiB_3_records",
            handshake_records(&padded(&hello, 2048)[5..], &[601, 997]),
        ),
    ];
    let mut group = c.benchmark_group("peek_client_hello");
    for (name, input) in &inputs {
        match peek_client_hello(input, MAX_LEN) {
            Ok(Peek::Done(info)) => {
                assert_eq!(info.server_name.as_deref(), Some("api.example.com"), "{name}");
                assert_eq!(info.alpn, [b"h2".as_slice(), b"http/1.1"], "{name}");
                assert_eq!(info.len, input.len(), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| peek_client_hello(black_box(input), black_box(MAX_LEN)))
        });
    }
    group.finish();
}

fn bench_request_head(c: &mut Criterion) {
    let input = BROWSER_REQUEST_HEAD;
    match peek_request_head(input, MAX_LEN) {
        Ok(Peek::Done(head)) => assert_eq!((head.host.as_str(), head.len), ("www.example.com", input.len())),
        other => panic!("{other:?}"),
    }
    let mut group = c.benchmark_group("peek_request_head");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("browser_get", |b| {
        b.iter(|| peek_request_head(black_box(input), black_box(MAX_LEN)))
    });
    group.finish();
}

/// Handshake bytes of the large hello: in one-byte records (6 wire bytes each) it fills most of
/// the relay's 32 KiB `max_client_hello`.
const LARGE_MESSAGE: usize = 5400;
const LIMIT: usize = 32 * 1024;

/// Feeds `wire` to `peek` as the edge would: the buffer grows by one `step` per read and the
/// peeker sees all of it each time.
fn deliver(wire: &[u8], step: usize, mut peek: impl FnMut(&[u8]) -> bool) {
    let mut end = 0;
    while end < wire.len() {
        end = (end + step).min(wire.len());
        if peek(&wire[..end]) {
            return;
        }
    }
    panic!("the hello never completed");
}

fn bench_client_hello_delivery(c: &mut Criterion) {
    let hello = from_hex(RUSTLS_HELLO_HEX);
    let one_record = padded(&hello, LARGE_MESSAGE + 5);
    let message = &one_record[5..];
    let one_byte_records = handshake_records(message, &vec![1; message.len()]);
    assert!(one_byte_records.len() <= LIMIT, "{}", one_byte_records.len());
    let done = |r: Result<Peek<_>, _>| match r {
        Ok(Peek::Done(_)) => true,
        Ok(Peek::NeedMore) => false,
        Err(e) => panic!("{e}"),
    };
    let mut group = c.benchmark_group("client_hello_delivery");
    group.sample_size(20);
    for (name, wire, step) in [
        ("one_record_one_read", &one_record, one_record.len()),
        (
            "one_byte_records_one_read",
            &one_byte_records,
            one_byte_records.len(),
        ),
        ("one_byte_records_one_per_read", &one_byte_records, 6),
    ] {
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("incremental/{name}"), |b| {
            b.iter(|| {
                let mut peeker = ClientHelloPeeker::new(LIMIT);
                deliver(wire, step, |buf| done(peeker.peek(black_box(buf))));
            })
        });
    }
    group.throughput(Throughput::Bytes(one_byte_records.len() as u64));
    group.bench_function("stateless/one_byte_records_one_per_read", |b| {
        b.iter(|| {
            deliver(&one_byte_records, 6, |buf| {
                done(peek_client_hello(black_box(buf), LIMIT))
            })
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_client_hello,
    bench_request_head,
    bench_client_hello_delivery
);
criterion_main!(benches);

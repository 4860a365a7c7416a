//! Fuzzes the plain-TCP data connection's sans-IO side: `sluice::wire::tcp_data::Join::decode`
//! (the relay reading an agent's join) and `StreamKey::open` (the agent reading the sealed
//! stream header), with their inverses `Join::encode` and `StreamKey::seal`.
//!
//! Input: the first bytes of a plain-TCP data connection; the same bytes are read as a join,
//! as a sealed header under the fixed session of [`sluice_fuzz::tcp_stream_key`] (the seeds
//! hold headers sealed with it), and as a header to seal. Properties:
//!
//! 1. No panic. `Join::decode`: `NeedMore` only below the longest join; the first verdict over
//!    the prefixes is the whole input's (every prefix of a join is `NeedMore`); a decoded join
//!    encodes to exactly its bytes.
//! 2. `open`: a header that opens is exactly what the relay seals for it (so no other bytes
//!    open: changing a sealed header means forging its HMAC); every prefix of it is `NeedMore`;
//!    a header that does not decode is refused as the header decoder refuses it.
//! 3. Seal/open: any header the decoder reads, sealed, opens to itself with the same key, not
//!    with another connection's key, and not after any one bit of the sealed bytes is flipped;
//!    every prefix of the sealed bytes is `NeedMore`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::peek::Peek;
use sluice::wire::stream_header::StreamHeader;
use sluice::wire::tcp_data::{Join, MAX_AGENT_ID_LEN, NONCE_LEN, Nonces, StreamKey, TcpDataError};
use sluice_fuzz::{TCP_AGENT_ID, TCP_CREDENTIAL, TCP_NONCES, tcp_stream_key};

/// Bit flips tried per sealed header; spread over all of it (every field and the tag).
const FLIPS: usize = 48;

fuzz_target!(|data: &[u8]| {
    check_join(data);
    let key = tcp_stream_key();
    check_open(&key, data);
    if let Ok(Peek::Done((header, _))) = StreamHeader::decode(data) {
        check_seal(&key, &header, data);
    }
});

/// Property 1.
fn check_join(data: &[u8]) {
    let whole = Join::decode(data);
    for end in 0..=data.len() {
        let fresh = Join::decode(&data[..end]);
        if fresh != Ok(Peek::NeedMore) {
            assert_eq!(
                fresh, whole,
                "first verdict, at prefix {end}, is not the whole input's"
            );
            break;
        }
    }
    match whole {
        Ok(Peek::NeedMore) => {
            assert!(
                data.len() < 6 + MAX_AGENT_ID_LEN + NONCE_LEN,
                "NeedMore past the longest join"
            );
        }
        Ok(Peek::Done((join, used))) => {
            assert_eq!(
                join.encode().as_deref(),
                Ok(&data[..used]),
                "encode(decode(b)) != b"
            );
        }
        Err(_) => {}
    }
}

/// Property 2.
fn check_open(key: &StreamKey, data: &[u8]) {
    match key.open(data) {
        Ok(Peek::Done((header, used))) => {
            let mut sealed = Vec::new();
            key.seal(&header, &mut sealed).expect("an opened header seals");
            assert_eq!(
                sealed,
                data[..used],
                "opened bytes the relay would not have sealed"
            );
            for cut in 0..used {
                assert!(
                    matches!(key.open(&data[..cut]), Ok(Peek::NeedMore)),
                    "prefix {cut} of a sealed header is not NeedMore"
                );
            }
        }
        Ok(Peek::NeedMore) => {}
        Err(TcpDataError::Header(error)) => assert_eq!(StreamHeader::decode(data), Err(error)),
        Err(TcpDataError::BadHeaderTag) => {
            assert!(matches!(StreamHeader::decode(data), Ok(Peek::Done(_))));
        }
        Err(other) => panic!("open refused with a join error: {other:?}"),
    }
}

/// Property 3.
fn check_seal(key: &StreamKey, header: &StreamHeader, data: &[u8]) {
    let mut sealed = Vec::new();
    key.seal(header, &mut sealed).expect("a decoded header seals");
    assert_eq!(key.open(&sealed), Ok(Peek::Done((header.clone(), sealed.len()))));
    for cut in 0..sealed.len() {
        assert!(
            matches!(key.open(&sealed[..cut]), Ok(Peek::NeedMore)),
            "prefix {cut}"
        );
    }
    let elsewhere = StreamKey::derive(
        TCP_CREDENTIAL,
        TCP_AGENT_ID,
        &Nonces {
            relay: [0; NONCE_LEN],
            ..TCP_NONCES
        },
    );
    assert_eq!(
        elsewhere.open(&sealed),
        Err(TcpDataError::BadHeaderTag),
        "another key opens it"
    );
    let bits = sealed.len() * 8;
    let offset = usize::from(data.first().copied().unwrap_or(0));
    for i in 0..FLIPS.min(bits) {
        let bit = (offset + i * bits / FLIPS.min(bits)) % bits;
        let mut flipped = sealed.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            !matches!(key.open(&flipped), Ok(Peek::Done(_))),
            "sealed header opens with bit {bit} flipped"
        );
    }
}

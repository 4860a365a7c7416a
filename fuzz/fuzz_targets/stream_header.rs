//! Fuzzes the stream header that opens a handed-over stream on a data connection:
//! `sluice::wire::stream_header::StreamHeader::{decode, encode}`.
//!
//! Input: the first bytes of a data connection, as the agent reads them. Properties:
//!
//! 1. No panic; `NeedMore` only below `MAX_LEN` bytes (a relay cannot make the agent wait for a
//!    header longer than the largest one).
//! 2. The verdict does not depend on how the bytes were split: every prefix is `NeedMore` up
//!    to the first with a verdict, which is the whole input's; a decoded header's every shorter
//!    prefix is `NeedMore`, never an error.
//! 3. The encoding is canonical: a decoded header encodes to exactly the bytes it was decoded
//!    from, and its host is ASCII.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::peek::Peek;
use sluice::wire::stream_header::{MAX_LEN, StreamHeader};

fuzz_target!(|data: &[u8]| {
    let whole = StreamHeader::decode(data);
    for end in 0..=data.len() {
        let fresh = StreamHeader::decode(&data[..end]);
        if fresh != Ok(Peek::NeedMore) {
            assert_eq!(
                fresh, whole,
                "first verdict, at prefix {end}, is not the whole input's"
            );
            if let Ok(Peek::Done((_, used))) = &fresh {
                assert_eq!(*used, end, "a header is complete only at its last byte");
            }
            break;
        }
    }
    match whole {
        Ok(Peek::NeedMore) => assert!(data.len() < MAX_LEN, "NeedMore past the largest header"),
        Ok(Peek::Done((header, used))) => {
            assert!(used <= MAX_LEN);
            assert!(header.host.is_ascii());
            let mut encoded = Vec::new();
            header.encode(&mut encoded).expect("a decoded header encodes");
            assert_eq!(encoded, data[..used], "encode(decode(b)) != b");
        }
        Err(_) => {}
    }
});

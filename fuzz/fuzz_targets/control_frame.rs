//! Fuzzes the control-connection codec: `sluice::wire::frame::decode` of both message types,
//! `AgentMessage` (what the relay reads) and `RelayMessage` (what the agent reads).
//!
//! Input: the bytes a peer sends on a control connection. Properties, for each message type:
//!
//! 1. No panic; only `TooLarge` or `Json` errors (I/O and truncation belong to the reader).
//! 2. `TooLarge` exactly when the length prefix is over `MAX_FRAME_LEN`, known from the prefix
//!    alone; `NeedMore` only while the prefix or the body it declares is incomplete, so a peer
//!    cannot make a reader buffer more than one maximal frame.
//! 3. A decoded frame uses exactly its prefix and body, and every shorter prefix of it is
//!    `NeedMore`, never an error.
//! 4. Round trip: a decoded message encodes to a frame (unless its JSON would exceed the limit)
//!    that decodes to the same message, using the whole frame; encoding is then stable.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice::peek::Peek;
use sluice::wire::frame::{FrameError, MAX_FRAME_LEN, decode, encode};
use sluice::wire::message::{AgentMessage, RelayMessage};

fuzz_target!(|data: &[u8]| {
    check::<AgentMessage>(data);
    check::<RelayMessage>(data);
});

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let declared = data
        .first_chunk::<4>()
        .map(|prefix| u32::from_be_bytes(*prefix) as usize);
    match decode::<T>(data) {
        Ok(Peek::NeedMore) => assert!(
            declared.is_none_or(|len| len <= MAX_FRAME_LEN && data.len() < 4 + len),
            "NeedMore on a complete frame"
        ),
        Err(FrameError::TooLarge { len }) => {
            assert_eq!(Some(len), declared);
            assert!(len > MAX_FRAME_LEN);
        }
        Err(FrameError::Json(_)) => {
            let len = declared.expect("a body was read");
            assert!(len <= MAX_FRAME_LEN && data.len() >= 4 + len);
        }
        Err(other) => panic!("decode returned an I/O-side error: {other:?}"),
        Ok(Peek::Done((message, used))) => {
            assert_eq!(Some(used - 4), declared, "used bytes are not prefix + body");
            for cut in 0..used {
                assert!(
                    matches!(decode::<T>(&data[..cut]), Ok(Peek::NeedMore)),
                    "prefix {cut} of a frame is not NeedMore"
                );
            }
            match encode(&message) {
                Ok(frame) => {
                    let Ok(Peek::Done((again, again_used))) = decode::<T>(&frame) else {
                        panic!("{message:?} encodes to a frame that does not decode");
                    };
                    assert_eq!(again, message, "round trip");
                    assert_eq!(again_used, frame.len());
                    assert_eq!(encode(&again).ok(), Some(frame), "encoding is not stable");
                }
                Err(FrameError::TooLarge { len }) => assert!(len > MAX_FRAME_LEN),
                Err(other) => panic!("{message:?} does not encode: {other:?}"),
            }
        }
    }
}

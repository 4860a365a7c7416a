//! Control frames: a big-endian `u32` length followed by a JSON message of at most
//! [`MAX_FRAME_LEN`] bytes. [`decode`] is sans-IO; [`FrameReader`]/[`write_frame`] are the thin
//! async edges used by both ends.
use bytes::{Buf as _, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::peek::Peek;

/// Upper bound on one control message; far above any legitimate message.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
const LEN_PREFIX: usize = 4;

/// Why a control frame could not be read or written. Any of these ends the control connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length prefix, or a message to send, is over [`MAX_FRAME_LEN`]; refused before the
    /// body is read.
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge {
        /// The frame's body length in bytes.
        len: usize,
    },
    /// The body is not JSON of the expected message type (or the message failed to serialize).
    #[error("invalid control message: {0}")]
    Json(#[from] serde_json::Error),
    /// The peer closed the connection after part of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// Reading or writing the connection failed.
    #[error("tunnel I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Serializes `message` into one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; LEN_PREFIX];
    serde_json::to_writer(&mut out, message)?;
    let len = out.len() - LEN_PREFIX;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    out[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes the first frame in `buf`, returning the message and the bytes it used.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Peek<(T, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(Peek::NeedMore);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(Peek::NeedMore);
    };
    Ok(Peek::Done((serde_json::from_slice(body)?, LEN_PREFIX + len)))
}

/// Reads frames from a stream, keeping any bytes past the last frame.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of the frames `inner` carries, with nothing buffered yet.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(1024),
        }
    }

    /// The next message; `None` on a clean end of stream between frames.
    /// Cancel-safe: a partially received frame stays buffered.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if let Peek::Done((message, used)) = decode(&self.buf)? {
                self.buf.advance(used);
                return Ok(Some(message));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Gives back the stream and the bytes read past the last decoded frame.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// The underlying stream, e.g. to write on it; bytes already buffered stay here.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::AgentMessage;

    #[test]
    fn round_trips_and_reports_length() {
        let message = AgentMessage::Ping { seq: 7 };
        let mut bytes = encode(&message).unwrap();
        bytes.extend_from_slice(b"next");
        let Peek::Done((decoded, used)) = decode::<AgentMessage>(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(decoded, message);
        assert_eq!(&bytes[used..], b"next");
    }

    #[test]
    fn every_prefix_needs_more() {
        let bytes = encode(&AgentMessage::Pong { seq: 1 }).unwrap();
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode::<AgentMessage>(&bytes[..cut]).unwrap(),
                Peek::NeedMore
            ));
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let prefix = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode::<AgentMessage>(&prefix),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_body_is_a_json_error() {
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01\x00\x10");
        assert!(matches!(decode::<AgentMessage>(&bytes), Err(FrameError::Json(_))));
    }

    #[tokio::test]
    async fn reader_keeps_bytes_after_the_frame() {
        let mut wire = encode(&AgentMessage::Ping { seq: 3 }).unwrap();
        wire.extend_from_slice(b"raw");
        let mut reader = FrameReader::new(&wire[..]);
        assert_eq!(
            reader.next::<AgentMessage>().await.unwrap(),
            Some(AgentMessage::Ping { seq: 3 })
        );
        assert_eq!(&reader.into_parts().1[..], b"raw");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_a_clean_close() {
        let wire = encode(&AgentMessage::Ping { seq: 3 }).unwrap();
        let mut reader = FrameReader::new(&wire[..wire.len() - 1]);
        assert!(matches!(
            reader.next::<AgentMessage>().await,
            Err(FrameError::Truncated)
        ));
    }
}

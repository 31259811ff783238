//! Reading framed data from QUIC streams: a receive stream plus a buffer, driven by the
//! push-style decoders of `tokengo-proto`. Bounded in size and time, so a peer that sends
//! garbage or nothing cannot hold memory or a task.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};

/// QUIC application error codes TokenGo uses to reset or stop streams.
pub mod code {
    use quinn::VarInt;
    /// The peer sent something malformed.
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// The other side of a forwarded stream went away.
    pub const PEER_GONE: VarInt = VarInt::from_u32(2);
    /// The request was abandoned (shutdown, timeout, backend failure mid-stream).
    pub const ABANDONED: VarInt = VarInt::from_u32(3);
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// The peer's bytes did not decode.
    #[error("malformed: {0}")]
    Decode(E),
    /// The stream ended before a complete frame.
    #[error("stream ended early")]
    Eof,
    /// The stream was reset or the connection failed.
    #[error("stream failed: {0}")]
    Stream(#[from] quinn::ReadError),
    /// Nothing complete arrived in time.
    #[error("timed out waiting for the peer")]
    Timeout,
    /// More bytes arrived than the frame may have.
    #[error("frame too large")]
    TooLarge,
}

/// A receive stream with a decode buffer.
#[derive(Debug)]
pub struct StreamReader {
    recv: RecvStream,
    buf: BytesMut,
    eof: bool,
}

impl StreamReader {
    /// Wraps a receive stream.
    #[must_use]
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            eof: false,
        }
    }

    /// Bytes received and not yet decoded.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Whether the peer finished the stream.
    #[must_use]
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Receives the next piece of data into the buffer. Returns `false` at the end of the
    /// stream.
    pub async fn fill(&mut self) -> Result<bool, quinn::ReadError> {
        if self.eof {
            return Ok(false);
        }
        match self.recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// Decodes one frame, reading until `decode` yields it. Fails if the buffer grows past
    /// `max_len` without a frame, the stream ends, or `deadline` passes.
    pub async fn decode<T, E>(
        &mut self,
        max_len: usize,
        deadline: Duration,
        mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
    ) -> Result<T, ReadError<E>> {
        let work = async {
            loop {
                if let Some(frame) = decode(&mut self.buf).map_err(ReadError::Decode)? {
                    return Ok(frame);
                }
                if self.buf.len() > max_len {
                    return Err(ReadError::TooLarge);
                }
                if !self.fill().await? {
                    return Err(ReadError::Eof);
                }
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or(Err(ReadError::Timeout))
    }

    /// Reads everything until the end of the stream, at most `max_len` bytes.
    pub async fn read_to_end(
        &mut self,
        max_len: usize,
    ) -> Result<Bytes, ReadError<std::convert::Infallible>> {
        while self.fill().await? {
            if self.buf.len() > max_len {
                return Err(ReadError::TooLarge);
            }
        }
        Ok(self.buf.split().freeze())
    }

    /// Gives back the stream and whatever was buffered but not decoded.
    #[must_use]
    pub fn into_parts(self) -> (RecvStream, BytesMut, bool) {
        (self.recv, self.buf, self.eof)
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: VarInt) {
        let _ = self.recv.stop(code);
    }
}

/// Copies one direction of a forwarded stream chunk by chunk, without parsing or buffering
/// more than a chunk: QUIC flow control on both sides is the back-pressure. A reset on the
/// reading side becomes a reset on the writing side, so truncation is never hidden as a FIN.
/// Returns the number of bytes copied.
/// `observe` sees each chunk before it is forwarded.
pub async fn pipe(
    from: &mut RecvStream,
    to: &mut SendStream,
    mut observe: impl FnMut(&Bytes),
) -> Result<u64, PipeError> {
    let mut copied = 0u64;
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                observe(&chunk.bytes);
                let len = chunk.bytes.len() as u64;
                if to.write_chunk(chunk.bytes).await.is_err() {
                    let _ = from.stop(code::PEER_GONE);
                    return Err(PipeError::WriteSide);
                }
                copied += len;
            }
            Ok(None) => {
                let _ = to.finish();
                return Ok(copied);
            }
            Err(_) => {
                let _ = to.reset(code::PEER_GONE);
                return Err(PipeError::ReadSide);
            }
        }
    }
}

/// Which side of a pipe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    /// The sender reset its stream or its connection failed.
    #[error("source stream failed")]
    ReadSide,
    /// The receiver stopped reading or its connection failed.
    #[error("destination stream failed")]
    WriteSide,
}

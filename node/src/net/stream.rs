//! Reading framed data from QUIC streams: a receive stream plus a buffer, driven by the
//! push-style decoders of `tokengo-proto`. Bounded in size and time, so a peer that sends
//! garbage or nothing cannot hold memory or a task.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokengo_proto::{
    chunked::{Chunk, ChunkedRequestOpener, ChunkedResponseOpener},
    ohttp::OhttpError,
};

/// QUIC application error codes TokenGo uses to reset or stop streams, as quinn takes them
/// (the values are the protocol's, in `tokengo_proto::close_code`).
pub mod code {
    use quinn::VarInt;
    use tokengo_proto::close_code;
    /// The peer sent something malformed.
    pub const PROTOCOL: VarInt = VarInt::from_u32(close_code::PROTOCOL);
    /// The other side of a forwarded stream went away.
    pub const PEER_GONE: VarInt = VarInt::from_u32(close_code::PEER_GONE);
    /// The request was abandoned (shutdown, timeout, backend failure mid-stream).
    pub const ABANDONED: VarInt = VarInt::from_u32(close_code::ABANDONED);
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

/// Opens the chunks of a chunked OHTTP message from buffered bytes: the exit's request opener
/// and the client's response opener read their streams with the same loop.
pub trait ChunkOpener {
    /// Opens the next chunk if it is complete in `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError>;
    /// Opens what is left in `buf` at the end of the stream.
    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError>;
}

impl ChunkOpener for ChunkedRequestOpener {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        Self::decode(self, buf)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        Self::decode_eof(self, buf)
    }
}

impl ChunkOpener for ChunkedResponseOpener {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        Self::decode(self, buf)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        Self::decode_eof(self, buf)
    }
}

/// Why the next chunk of a chunked OHTTP message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// A chunk did not open: another key, tampered or malformed bytes.
    #[error("{0}")]
    Open(#[from] OhttpError),
    /// Nothing arrived for longer than the reader waits.
    #[error("the peer went silent")]
    Silent,
    /// The stream was reset or its connection failed.
    #[error("stream broke: {0}")]
    Stream(#[from] quinn::ReadError),
    /// The stream ended before the message's final chunk.
    #[error("truncated")]
    Truncated,
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

    /// Reads until `opener` opens the next chunk. Each wait for more bytes may last `silence`;
    /// `received` is told how many bytes each read added (the client counts them).
    pub async fn next_chunk(
        &mut self,
        opener: &mut impl ChunkOpener,
        silence: Duration,
        mut received: impl FnMut(usize),
    ) -> Result<Chunk, ChunkError> {
        loop {
            if let Some(chunk) = opener.decode(&mut self.buf)? {
                return Ok(chunk);
            }
            let before = self.buf.len();
            let more = tokio::time::timeout(silence, self.fill())
                .await
                .map_err(|_| ChunkError::Silent)??;
            received(self.buf.len().saturating_sub(before));
            if !more {
                return opener
                    .decode_eof(&mut self.buf)?
                    .ok_or(ChunkError::Truncated);
            }
        }
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

/// Why a bounded write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The peer stopped the stream, reset it, or its connection failed.
    #[error("the peer stopped reading or went away")]
    Closed,
    /// The peer took no bytes for the whole stall timeout; the stream was reset.
    #[error("the peer took no bytes for {0:?}")]
    Stalled(Duration),
}

/// Writes `bytes` to `send`, failing when the peer takes nothing for `stall`. Each wait for
/// flow-control credit is bounded, not the write as a whole: a slow reader that keeps reading
/// is never cut, one that stopped reading is, and the stream is reset so neither its buffers
/// nor whatever feeds it (an exit's backend connection) stay pinned.
pub async fn write_bounded(
    send: &mut SendStream,
    bytes: Bytes,
    stall: Duration,
) -> Result<(), WriteError> {
    let mut bufs = [bytes];
    while !bufs[0].is_empty() {
        match tokio::time::timeout(stall, send.write_chunks(&mut bufs)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(WriteError::Closed),
            Err(_) => {
                let _ = send.reset(code::ABANDONED);
                return Err(WriteError::Stalled(stall));
            }
        }
    }
    Ok(())
}

/// How long the reading side of a pipe may take: a request body must arrive at a minimum
/// average rate after a grace period, so a client cannot hold a stream (and an exit's slot)
/// by trickling a byte now and then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBound {
    /// No bound (a response: the backend may think for minutes between tokens; the exit's
    /// backend idle timeout and QUIC's idle timeout bound it).
    None,
    /// After `grace`, at least `bytes_per_sec` on average since the start.
    MinRate {
        /// Time allowed before the rate counts (the first bytes, slow starts).
        grace: Duration,
        /// The lowest average rate accepted.
        bytes_per_sec: u64,
    },
}

impl ReadBound {
    /// How long after the start `received` bytes may have taken.
    fn allowance(self, received: u64) -> Option<Duration> {
        match self {
            Self::None => None,
            Self::MinRate {
                grace,
                bytes_per_sec,
            } => Some(grace.saturating_add(Duration::from_secs_f64(
                received as f64 / bytes_per_sec.max(1) as f64,
            ))),
        }
    }
}

/// The bounds of one direction of a forwarded stream.
#[derive(Debug, Clone, Copy)]
pub struct PipeLimits {
    /// How long a write may wait for the receiver to take bytes.
    pub write_stall: Duration,
    /// How slowly the sender may deliver.
    pub read: ReadBound,
}

/// Copies one direction of a forwarded stream chunk by chunk, without parsing or buffering
/// more than a chunk: QUIC flow control on both sides is the back-pressure. A reset on the
/// reading side becomes a reset on the writing side, so truncation is never hidden as a FIN;
/// a receiver that stops reading, or a sender slower than `limits` allow, ends both sides.
/// Returns the number of bytes copied. `observe` sees each chunk before it is forwarded.
pub async fn pipe(
    from: &mut RecvStream,
    to: &mut SendStream,
    limits: PipeLimits,
    mut observe: impl FnMut(&Bytes),
) -> Result<u64, PipeError> {
    let started = tokio::time::Instant::now();
    // Time spent waiting for the receiver is not the sender's slowness: it extends the
    // sender's allowance.
    let mut waited_on_receiver = Duration::ZERO;
    let mut copied = 0u64;
    loop {
        let read = match limits.read.allowance(copied) {
            None => from.read_chunk(usize::MAX, true).await,
            Some(allowance) => {
                match tokio::time::timeout_at(
                    started + allowance.saturating_add(waited_on_receiver),
                    from.read_chunk(usize::MAX, true),
                )
                .await
                {
                    Ok(read) => read,
                    Err(_) => {
                        let _ = from.stop(code::ABANDONED);
                        let _ = to.reset(code::ABANDONED);
                        return Err(PipeError::TooSlow);
                    }
                }
            }
        };
        match read {
            Ok(Some(chunk)) => {
                observe(&chunk.bytes);
                let len = chunk.bytes.len() as u64;
                let writing = tokio::time::Instant::now();
                let written = write_bounded(to, chunk.bytes, limits.write_stall).await;
                waited_on_receiver += writing.elapsed();
                if let Err(error) = written {
                    let _ = from.stop(code::PEER_GONE);
                    return Err(match error {
                        WriteError::Closed => PipeError::WriteSide,
                        WriteError::Stalled(_) => PipeError::Stalled,
                    });
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
    /// The receiver took no bytes for the write stall timeout.
    #[error("destination stopped reading")]
    Stalled,
    /// The sender delivered below the minimum rate.
    #[error("source sent too slowly")]
    TooSlow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_rate_allows_the_grace_then_time_in_proportion_to_the_bytes() {
        let bound = ReadBound::MinRate {
            grace: Duration::from_secs(10),
            bytes_per_sec: 1000,
        };
        assert_eq!(bound.allowance(0), Some(Duration::from_secs(10)));
        assert_eq!(bound.allowance(5000), Some(Duration::from_secs(15)));
        assert_eq!(ReadBound::None.allowance(5000), None);
        let zero = ReadBound::MinRate {
            grace: Duration::from_secs(1),
            bytes_per_sec: 0,
        };
        assert_eq!(zero.allowance(2), Some(Duration::from_secs(3)));
    }
}

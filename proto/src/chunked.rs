//! Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp-08): requests and responses sealed and
//! opened chunk by chunk, so a streamed answer reaches the client as it is produced.
//!
//! ```text
//! request  = hdr || enc            || chunk* || 0x00 || final ciphertext (to end of stream)
//! response = response_nonce (16)   || chunk* || 0x00 || final ciphertext (to end of stream)
//! chunk    = varint(length > 0) || ciphertext      (AAD "", plaintext never empty)
//! ```
//!
//! Sealers return the bytes to send for each chunk. Openers are push-style decoders in the
//! manner of `tokio_util::codec::Decoder`: append what arrived to a `BytesMut`, call `decode`
//! until it returns `None`, and once the input has ended call `decode_eof` until it returns
//! `None`. A message is complete only once a [`Chunk`] with `last == true` came out: that chunk
//! was sealed with the AAD `"final"`, so a truncated stream is always an error, never a short
//! success. After an error an opener keeps returning that error.

use std::{fmt, sync::Arc};

use bytes::{Buf, BytesMut};
use zeroize::Zeroizing;

use crate::{
    hpke::{ENC_LEN, ReceiverContext, SenderContext, SequencedAead, TAG_LEN},
    key_config::{KeyConfig, KeyPair},
    ohttp::{
        self, Gateway, OhttpError, REQUEST_HEADER_LEN, REQUEST_PREFIX_LEN, RESPONSE_NONCE_LEN,
        RESPONSE_SECRET_LEN,
    },
    varint,
};

const REQUEST_INFO: &[u8] = b"message/bhttp chunked request";
const RESPONSE_LABEL: &[u8] = b"message/bhttp chunked response";
const CHUNK_AAD: &[u8] = b"";
const FINAL_AAD: &[u8] = b"final";

/// The largest chunk plaintext a sealer accepts.
///
/// The draft requires receivers to accept 16 KiB and asks senders to stay within that unless
/// they know the receiver takes more. Both ends of TokenGo are this crate, which takes 64 KiB;
/// a peer using the `ohttp` crate needs chunks of at most 16 KiB.
pub const MAX_CHUNK_PLAINTEXT: usize = 64 * 1024;

/// The largest chunk ciphertext an opener accepts, final chunk included. A longer length
/// prefix fails with [`OhttpError::TooLarge`] as soon as it is read, before anything is
/// buffered for it, so a peer cannot make an opener hold more than this.
pub const MAX_CHUNK_CIPHERTEXT: usize = MAX_CHUNK_PLAINTEXT + TAG_LEN;

/// One opened chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The plaintext; empty only for a final chunk.
    pub data: Vec<u8>,
    /// Whether this is the final chunk, the one that proves the message complete.
    pub last: bool,
}

/// Starts a chunked request to the gateway key `config`, with a fresh ephemeral key.
///
/// Returns the sealer and the request header (`hdr || enc`), to be sent before any chunk.
pub fn start_request(config: &KeyConfig) -> Result<(ChunkedRequestSealer, Vec<u8>), OhttpError> {
    start(config, None)
}

/// [`start_request`] with a given ephemeral private key, to reproduce test vectors. Never reuse
/// an ephemeral key: production code calls [`start_request`].
pub fn start_request_with_ephemeral(
    config: &KeyConfig,
    ephemeral_secret: [u8; 32],
) -> Result<(ChunkedRequestSealer, Vec<u8>), OhttpError> {
    start(config, Some(ephemeral_secret))
}

fn start(
    config: &KeyConfig,
    ephemeral: Option<[u8; 32]>,
) -> Result<(ChunkedRequestSealer, Vec<u8>), OhttpError> {
    let (header, enc, context) = ohttp::setup_client(config, REQUEST_INFO, ephemeral)?;
    let mut prefix = Vec::with_capacity(REQUEST_PREFIX_LEN);
    prefix.extend_from_slice(&header);
    prefix.extend_from_slice(&enc);
    let sealer = ChunkedRequestSealer {
        context,
        enc,
        writer: ChunkWriter::default(),
    };
    Ok((sealer, prefix))
}

/// The client's sealer for the chunks of one request.
#[derive(Debug)]
pub struct ChunkedRequestSealer {
    context: SenderContext,
    enc: [u8; ENC_LEN],
    writer: ChunkWriter,
}

impl ChunkedRequestSealer {
    /// Seals a non-final chunk: `varint(length) || ciphertext`. The plaintext must not be empty
    /// ([`OhttpError::EmptyChunk`]) nor longer than [`MAX_CHUNK_PLAINTEXT`].
    pub fn seal_chunk(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, OhttpError> {
        self.writer.seal(self.context.aead_mut(), plaintext, false)
    }

    /// Seals the final chunk, `0x00 || ciphertext`, after which the stream must end. The
    /// plaintext may be empty.
    pub fn seal_final(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, OhttpError> {
        self.writer.seal(self.context.aead_mut(), plaintext, true)
    }

    /// Seals plaintext of any length as as many chunks as it takes (at most
    /// [`MAX_CHUNK_PLAINTEXT`] each), the last of them final if `last`. Empty non-final input
    /// yields nothing.
    pub fn seal_split(&mut self, plaintext: &[u8], last: bool) -> Result<Vec<u8>, OhttpError> {
        self.writer
            .seal_split(self.context.aead_mut(), plaintext, last)
    }

    /// The opener for the response to this request, available from the start. (Reading
    /// response chunks before sending the whole request makes the exchange interactive, which
    /// lets the gateway measure round trips to the client: draft §7.2.)
    pub fn response_opener(&self) -> Result<ChunkedResponseOpener, OhttpError> {
        let secret = ohttp::export_response_secret(|out| self.context.export(RESPONSE_LABEL, out))?;
        Ok(ChunkedResponseOpener {
            secret,
            enc: self.enc,
            aead: None,
            reader: ChunkReader::default(),
            failed: None,
        })
    }
}

impl Gateway {
    /// An opener for one chunked request to this gateway.
    #[must_use]
    pub fn chunked_request(&self) -> ChunkedRequestOpener {
        ChunkedRequestOpener {
            keys: Arc::clone(self.keys()),
            session: None,
            reader: ChunkReader::default(),
            failed: None,
        }
    }
}

/// The gateway's decoder for one chunked request.
#[derive(Debug)]
pub struct ChunkedRequestOpener {
    keys: Arc<[KeyPair]>,
    /// Set once `hdr || enc` was read.
    session: Option<Session>,
    reader: ChunkReader,
    failed: Option<OhttpError>,
}

#[derive(Debug)]
struct Session {
    context: ReceiverContext,
    enc: [u8; ENC_LEN],
}

impl ChunkedRequestOpener {
    /// Consumes the header and the next complete chunk from `buf`. Returns `None` when more
    /// input is needed. Reports [`OhttpError::UnknownKey`] as soon as the key id byte arrives.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        fuse(&mut self.failed, || {
            match accept_header(&self.keys, &mut self.session, buf)? {
                Some(context) => self.reader.decode(context.aead_mut(), buf),
                None => Ok(None),
            }
        })
    }

    /// Like [`decode`](Self::decode), once the input has ended: returns the remaining chunks,
    /// the final one last, then `None`. Fails if the stream stopped before its final chunk.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        fuse(&mut self.failed, || {
            match accept_header(&self.keys, &mut self.session, buf)? {
                Some(context) => self.reader.decode_eof(context.aead_mut(), buf),
                None => Err(OhttpError::Truncated),
            }
        })
    }

    /// The request's encapsulated key, once the header was read (see [`ohttp::enc_of`] for
    /// its use against replay).
    #[must_use]
    pub fn enc(&self) -> Option<&[u8; ENC_LEN]> {
        self.session.as_ref().map(|session| &session.enc)
    }

    /// The sealer for the response, available once the header was read
    /// ([`OhttpError::NotReady`] before), and the response nonce to send before any chunk.
    pub fn response_sealer(&self) -> Result<(ChunkedResponseSealer, Vec<u8>), OhttpError> {
        self.response_sealer_with_nonce(ohttp::random_response_nonce())
    }

    /// [`response_sealer`](Self::response_sealer) with a given response nonce, to reproduce
    /// test vectors. A nonce must never repeat for the same request.
    pub fn response_sealer_with_nonce(
        &self,
        nonce: [u8; RESPONSE_NONCE_LEN],
    ) -> Result<(ChunkedResponseSealer, Vec<u8>), OhttpError> {
        // A request that failed to open is not authenticated: nothing may answer it.
        if let Some(error) = self.failed {
            return Err(error);
        }
        let session = self.session.as_ref().ok_or(OhttpError::NotReady)?;
        let secret =
            ohttp::export_response_secret(|out| session.context.export(RESPONSE_LABEL, out))?;
        let aead = ohttp::response_aead(&secret, &session.enc, &nonce);
        let sealer = ChunkedResponseSealer {
            aead,
            writer: ChunkWriter::default(),
        };
        Ok((sealer, nonce.to_vec()))
    }
}

/// Reads `hdr || enc` once all of it is in `buf`; from then on returns the receiver.
fn accept_header<'s>(
    keys: &[KeyPair],
    session: &'s mut Option<Session>,
    buf: &mut BytesMut,
) -> Result<Option<&'s mut ReceiverContext>, OhttpError> {
    if session.is_none() {
        // Checks whatever part of the header has arrived, so that an unknown key is reported
        // from the first byte.
        let Some(key) = ohttp::find_key(keys, buf)? else {
            return Ok(None);
        };
        let Some((header, rest)) = buf.split_first_chunk::<REQUEST_HEADER_LEN>() else {
            return Ok(None);
        };
        let Some(enc) = rest.first_chunk::<ENC_LEN>() else {
            return Ok(None);
        };
        let context = ohttp::accept(key, header, enc, REQUEST_INFO)?;
        let enc = *enc;
        buf.advance(REQUEST_PREFIX_LEN);
        *session = Some(Session { context, enc });
    }
    Ok(session.as_mut().map(|session| &mut session.context))
}

/// The gateway's sealer for the chunks of one response.
#[derive(Debug)]
pub struct ChunkedResponseSealer {
    aead: SequencedAead,
    writer: ChunkWriter,
}

impl ChunkedResponseSealer {
    /// Seals a non-final chunk, as [`ChunkedRequestSealer::seal_chunk`].
    pub fn seal_chunk(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, OhttpError> {
        self.writer.seal(&mut self.aead, plaintext, false)
    }

    /// Seals plaintext of any length, as [`ChunkedRequestSealer::seal_split`].
    pub fn seal_split(&mut self, plaintext: &[u8], last: bool) -> Result<Vec<u8>, OhttpError> {
        self.writer.seal_split(&mut self.aead, plaintext, last)
    }

    /// Seals the final chunk, as [`ChunkedRequestSealer::seal_final`].
    pub fn seal_final(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, OhttpError> {
        self.writer.seal(&mut self.aead, plaintext, true)
    }
}

/// The client's decoder for one chunked response.
pub struct ChunkedResponseOpener {
    /// What the response key is derived from, with the response nonce.
    secret: Zeroizing<[u8; RESPONSE_SECRET_LEN]>,
    enc: [u8; ENC_LEN],
    /// Set once the response nonce was read.
    aead: Option<SequencedAead>,
    reader: ChunkReader,
    failed: Option<OhttpError>,
}

impl ChunkedResponseOpener {
    /// Consumes the response nonce and the next complete chunk from `buf`. Returns `None` when
    /// more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        fuse(&mut self.failed, || {
            match accept_nonce(&self.secret, &self.enc, &mut self.aead, buf) {
                Some(aead) => self.reader.decode(aead, buf),
                None => Ok(None),
            }
        })
    }

    /// Like [`decode`](Self::decode), once the input has ended: returns the remaining chunks,
    /// the final one last, then `None`. Fails if the stream stopped before its final chunk.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
        fuse(&mut self.failed, || {
            match accept_nonce(&self.secret, &self.enc, &mut self.aead, buf) {
                Some(aead) => self.reader.decode_eof(aead, buf),
                None => Err(OhttpError::Truncated),
            }
        })
    }
}

impl fmt::Debug for ChunkedResponseOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkedResponseOpener")
            .field("aead", &self.aead)
            .field("reader", &self.reader)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Reads the response nonce once it is in `buf`; from then on returns the response AEAD.
fn accept_nonce<'a>(
    secret: &[u8; RESPONSE_SECRET_LEN],
    enc: &[u8; ENC_LEN],
    aead: &'a mut Option<SequencedAead>,
    buf: &mut BytesMut,
) -> Option<&'a mut SequencedAead> {
    if aead.is_none() {
        let nonce = buf.first_chunk::<RESPONSE_NONCE_LEN>()?;
        let opened = ohttp::response_aead(secret, enc, nonce);
        buf.advance(RESPONSE_NONCE_LEN);
        *aead = Some(opened);
    }
    aead.as_mut()
}

/// Runs one decoding step; the first error sticks, because after a failure the AEAD counter
/// and the framing are no longer trustworthy.
fn fuse<T>(
    failed: &mut Option<OhttpError>,
    step: impl FnOnce() -> Result<T, OhttpError>,
) -> Result<T, OhttpError> {
    if let Some(error) = *failed {
        return Err(error);
    }
    let result = step();
    if let Err(error) = result {
        *failed = Some(error);
    }
    result
}

/// The sealing side of the chunk framing, shared by requests and responses.
#[derive(Debug, Default)]
struct ChunkWriter {
    finished: bool,
}

impl ChunkWriter {
    fn seal_split(
        &mut self,
        aead: &mut SequencedAead,
        plaintext: &[u8],
        last: bool,
    ) -> Result<Vec<u8>, OhttpError> {
        let mut pieces = plaintext.chunks(MAX_CHUNK_PLAINTEXT).peekable();
        let mut out = Vec::with_capacity(
            plaintext.len() + TAG_LEN * (1 + plaintext.len() / MAX_CHUNK_PLAINTEXT) + 8,
        );
        if pieces.peek().is_none() && last {
            return self.seal(aead, &[], true);
        }
        while let Some(piece) = pieces.next() {
            let final_piece = last && pieces.peek().is_none();
            out.extend_from_slice(&self.seal(aead, piece, final_piece)?);
        }
        Ok(out)
    }

    fn seal(
        &mut self,
        aead: &mut SequencedAead,
        plaintext: &[u8],
        last: bool,
    ) -> Result<Vec<u8>, OhttpError> {
        if self.finished {
            return Err(OhttpError::Finished);
        }
        if plaintext.len() > MAX_CHUNK_PLAINTEXT {
            return Err(OhttpError::TooLarge);
        }
        let (length, aad) = match (last, plaintext.is_empty()) {
            (true, _) => (0, FINAL_AAD),
            (false, true) => return Err(OhttpError::EmptyChunk),
            (false, false) => (plaintext.len() + TAG_LEN, CHUNK_AAD),
        };
        // Lossless: lengths are bounded by MAX_CHUNK_CIPHERTEXT.
        let length = length as u64;
        let mut out = Vec::with_capacity(varint::encoded_len(length) + plaintext.len() + TAG_LEN);
        varint::put(&mut out, length);
        aead.seal_append(aad, plaintext, &mut out)?;
        self.finished = last;
        Ok(out)
    }
}

/// Where the opening side of the chunk framing is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading length-prefixed chunks.
    #[default]
    Chunks,
    /// The zero length was read: the final chunk runs to the end of the stream.
    Final,
    /// The final chunk was opened; nothing may follow.
    Done,
}

/// The opening side of the chunk framing, shared by requests and responses.
#[derive(Debug, Default)]
struct ChunkReader {
    phase: Phase,
}

impl ChunkReader {
    fn decode(
        &mut self,
        aead: &mut SequencedAead,
        buf: &mut BytesMut,
    ) -> Result<Option<Chunk>, OhttpError> {
        match self.phase {
            Phase::Chunks => self.decode_chunk(aead, buf),
            Phase::Final => check_final_len(buf).map(|()| None),
            Phase::Done if buf.is_empty() => Ok(None),
            Phase::Done => Err(OhttpError::TrailingData),
        }
    }

    fn decode_eof(
        &mut self,
        aead: &mut SequencedAead,
        buf: &mut BytesMut,
    ) -> Result<Option<Chunk>, OhttpError> {
        if let Some(chunk) = self.decode(aead, buf)? {
            return Ok(Some(chunk));
        }
        match self.phase {
            Phase::Chunks if buf.is_empty() => Err(OhttpError::MissingFinalChunk),
            Phase::Chunks => Err(OhttpError::Truncated),
            Phase::Final => self.open_final(aead, buf).map(Some),
            Phase::Done => Ok(None),
        }
    }

    /// Opens the next non-final chunk if all of it is in `buf`, or moves to the final chunk.
    fn decode_chunk(
        &mut self,
        aead: &mut SequencedAead,
        buf: &mut BytesMut,
    ) -> Result<Option<Chunk>, OhttpError> {
        let Ok((length, prefix_len)) = varint::peek(buf) else {
            return Ok(None);
        };
        if length == 0 {
            buf.advance(prefix_len);
            self.phase = Phase::Final;
            check_final_len(buf)?;
            return Ok(None);
        }
        let length = usize::try_from(length)
            .ok()
            .filter(|&length| length <= MAX_CHUNK_CIPHERTEXT)
            .ok_or(OhttpError::TooLarge)?;
        if length < TAG_LEN {
            return Err(OhttpError::Malformed);
        }
        // A tag alone carries no data, which the draft forbids for a non-final chunk.
        if length == TAG_LEN {
            return Err(OhttpError::EmptyChunk);
        }
        let end = prefix_len + length;
        if buf.len() < end {
            buf.reserve(end - buf.len());
            return Ok(None);
        }
        let data = aead.open(CHUNK_AAD, &buf[prefix_len..end])?;
        buf.advance(end);
        Ok(Some(Chunk { data, last: false }))
    }

    fn open_final(
        &mut self,
        aead: &mut SequencedAead,
        buf: &mut BytesMut,
    ) -> Result<Chunk, OhttpError> {
        if buf.len() < TAG_LEN {
            return Err(OhttpError::Truncated);
        }
        let data = aead.open(FINAL_AAD, buf)?;
        buf.clear();
        self.phase = Phase::Done;
        Ok(Chunk { data, last: true })
    }
}

/// The final chunk has no length prefix, so its size is bounded as it accumulates.
fn check_final_len(buf: &BytesMut) -> Result<(), OhttpError> {
    if buf.len() > MAX_CHUNK_CIPHERTEXT {
        return Err(OhttpError::TooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn h(hex_str: &str) -> Vec<u8> {
        hex::decode(hex_str).unwrap()
    }

    fn a<const N: usize>(hex_str: &str) -> [u8; N] {
        h(hex_str).try_into().unwrap()
    }

    // draft-ietf-ohai-chunked-ohttp-08, Appendix A.
    const SK_R: &str = "1c190d72acdbe4dbc69e680503bb781a932c70a12c8f3754434c67d8640d8698";
    const KEY_CONFIG: &str = "010020668eb21aace159803974a4c67f08b4152d29bed10735fd08f98ccdd6fe\
                              09570800080001000100010003";
    const REQUEST: &str = "00034745540568747470730b6578616d706c652e636f6d012f";
    const SK_E: &str = "b26d565f3f875ed480d1abced3d665159650c99174fd0b124ac4bda0c64ae324";
    const PK_E: &str = "8811eb457e100811c40a0aa71340a1b81d804bb986f736f2f566a7199761a032";
    const INFO: &str = "6d6573736167652f6268747470206368756e6b65642072657175657374000100\
                        2000010001";
    const REQUEST_HEADER: &str = "01002000010001";
    const REQUEST_CHUNKS: [&str; 3] = [
        "1c2ad24942d4d692563012f2980c8fef437a336b9b2fc938ef77a5834f",
        "1d2e33d8fd25577afe31bd1c79d094f76b6250ae6549b473ecd950501311",
        "001c6c1395d0ef7c1022297966307b8a7f",
    ];
    const RESPONSE: &str = "0140c8";
    const RESPONSE_SECRET: &str = "1d4484834ae36102a6ac42a5523454d9";
    const RESPONSE_NONCE: &str = "bcce7f4cb921309ba5d62edf1769ef09";
    const AEAD_KEY: &str = "8209f78f2a1610d80c7125009b00aff0";
    const AEAD_NONCE: &str = "fead854635d2d5527d64f546";
    const RESPONSE_CHUNKS: [&str; 3] = [
        "1179bf1cc87fa0e2c02de4546945aa3d1e48",
        "12b348b5bd4c594c16b6170b07b475845d1f32",
        "00ed9d8a796617a5b27265f4d73247f639",
    ];

    #[test]
    fn seal_split_cuts_large_plaintext_into_bounded_chunks() {
        let gateway = draft_gateway();
        let (mut sealer, mut stream) = start_request(&draft_config()).unwrap();
        assert!(sealer.seal_split(&[], false).unwrap().is_empty());
        let plaintext: Vec<u8> = (0..3 * MAX_CHUNK_PLAINTEXT + 17).map(|i| i as u8).collect();
        stream.extend(sealer.seal_split(&plaintext, true).unwrap());
        let mut opener = gateway.chunked_request();
        let mut buf = BytesMut::from(&stream[..]);
        let mut chunks = Vec::new();
        while let Some(chunk) = opener.decode(&mut buf).unwrap() {
            chunks.push(chunk);
        }
        while let Some(chunk) = opener.decode_eof(&mut buf).unwrap() {
            chunks.push(chunk);
        }
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.data.len() <= MAX_CHUNK_PLAINTEXT));
        assert_eq!(chunks.iter().filter(|c| c.last).count(), 1);
        assert!(chunks[3].last);
        let joined: Vec<u8> = chunks.into_iter().flat_map(|c| c.data).collect();
        assert_eq!(joined, plaintext);
    }

    fn draft_gateway() -> Gateway {
        Gateway::new(vec![KeyPair::from_secret(1, a(SK_R))])
    }

    fn draft_config() -> KeyConfig {
        KeyConfig::decode(&h(KEY_CONFIG)).unwrap()
    }

    fn draft_request() -> Vec<u8> {
        let mut stream = h(REQUEST_HEADER);
        stream.extend(h(PK_E));
        for chunk in REQUEST_CHUNKS {
            stream.extend(h(chunk));
        }
        stream
    }

    fn draft_response() -> Vec<u8> {
        let mut stream = h(RESPONSE_NONCE);
        for chunk in RESPONSE_CHUNKS {
            stream.extend(h(chunk));
        }
        stream
    }

    /// Both openers, so the stream-driving helpers serve both.
    trait Opener {
        fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError>;
        fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError>;
    }

    impl Opener for ChunkedRequestOpener {
        fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
            ChunkedRequestOpener::decode(self, buf)
        }
        fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
            ChunkedRequestOpener::decode_eof(self, buf)
        }
    }

    impl Opener for ChunkedResponseOpener {
        fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
            ChunkedResponseOpener::decode(self, buf)
        }
        fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, OhttpError> {
            ChunkedResponseOpener::decode_eof(self, buf)
        }
    }

    /// Feeds `stream` cut at `cuts` (sorted offsets), then ends it. Every chunk that came out
    /// goes to `chunks`, even when the stream then fails.
    fn drive(
        opener: &mut impl Opener,
        stream: &[u8],
        cuts: &[usize],
        chunks: &mut Vec<Chunk>,
    ) -> Result<(), OhttpError> {
        let mut buf = BytesMut::new();
        let mut start = 0;
        for cut in cuts.iter().copied().chain(std::iter::once(stream.len())) {
            let cut = cut.clamp(start, stream.len());
            buf.extend_from_slice(&stream[start..cut]);
            start = cut;
            while let Some(chunk) = opener.decode(&mut buf)? {
                chunks.push(chunk);
            }
        }
        while let Some(chunk) = opener.decode_eof(&mut buf)? {
            chunks.push(chunk);
        }
        Ok(())
    }

    /// Opens a whole stream; returns the chunks' data, checking the last one is final.
    fn open_all(opener: &mut impl Opener, stream: &[u8]) -> Result<Vec<Vec<u8>>, OhttpError> {
        let mut chunks = Vec::new();
        drive(opener, stream, &[], &mut chunks)?;
        assert!(chunks.last().unwrap().last);
        assert_eq!(chunks.iter().filter(|chunk| chunk.last).count(), 1);
        Ok(chunks.into_iter().map(|chunk| chunk.data).collect())
    }

    #[test]
    fn draft08_appendix_a_request() {
        let config = draft_config();
        let gateway = draft_gateway();
        assert_eq!(gateway.key_configs(), [config]);
        assert_eq!(
            ohttp::request_info(REQUEST_INFO, &ohttp::request_header(1)),
            h(INFO)
        );

        let request = h(REQUEST);
        let (mut sealer, header) = start_request_with_ephemeral(&config, a(SK_E)).unwrap();
        assert_eq!(hex::encode(header), format!("{REQUEST_HEADER}{PK_E}"));
        assert_eq!(
            hex::encode(sealer.seal_chunk(&request[..12]).unwrap()),
            REQUEST_CHUNKS[0]
        );
        assert_eq!(
            hex::encode(sealer.seal_chunk(&request[12..]).unwrap()),
            REQUEST_CHUNKS[1]
        );
        assert_eq!(
            hex::encode(sealer.seal_final(&[]).unwrap()),
            REQUEST_CHUNKS[2]
        );

        let mut opener = gateway.chunked_request();
        let chunks = open_all(&mut opener, &draft_request()).unwrap();
        assert_eq!(
            chunks,
            [request[..12].to_vec(), request[12..].to_vec(), vec![]]
        );
        assert_eq!(opener.enc(), Some(&a(PK_E)));
        assert_eq!(ohttp::enc_of(&draft_request()), Some(&a(PK_E)));
    }

    #[test]
    fn draft08_appendix_a_response() {
        let gateway = draft_gateway();
        let mut opener = gateway.chunked_request();
        open_all(&mut opener, &draft_request()).unwrap();
        let session = opener.session.as_ref().unwrap();
        let secret =
            ohttp::export_response_secret(|out| session.context.export(RESPONSE_LABEL, out));
        assert_eq!(*secret.unwrap(), a(RESPONSE_SECRET));
        let (key, nonce) =
            ohttp::response_key_material(&a(RESPONSE_SECRET), &session.enc, &a(RESPONSE_NONCE));
        assert_eq!(*key, a(AEAD_KEY));
        assert_eq!(nonce, a(AEAD_NONCE));

        let response = h(RESPONSE);
        let (mut sealer, nonce) = opener
            .response_sealer_with_nonce(a(RESPONSE_NONCE))
            .unwrap();
        assert_eq!(hex::encode(nonce), RESPONSE_NONCE);
        assert_eq!(
            hex::encode(sealer.seal_chunk(&response[..1]).unwrap()),
            RESPONSE_CHUNKS[0]
        );
        assert_eq!(
            hex::encode(sealer.seal_chunk(&response[1..]).unwrap()),
            RESPONSE_CHUNKS[1]
        );
        assert_eq!(
            hex::encode(sealer.seal_final(&[]).unwrap()),
            RESPONSE_CHUNKS[2]
        );

        let (client, _) = start_request_with_ephemeral(&draft_config(), a(SK_E)).unwrap();
        let mut response_opener = client.response_opener().unwrap();
        assert_eq!(*response_opener.secret, a(RESPONSE_SECRET));
        let chunks = open_all(&mut response_opener, &draft_response()).unwrap();
        assert_eq!(
            chunks,
            [response[..1].to_vec(), response[1..].to_vec(), vec![]]
        );
    }

    #[test]
    fn truncation_at_every_offset_is_an_error() {
        let request = draft_request();
        for len in 0..request.len() {
            let mut chunks = Vec::new();
            let result = drive(
                &mut draft_gateway().chunked_request(),
                &request[..len],
                &[],
                &mut chunks,
            );
            assert!(result.is_err(), "request cut at {len} accepted");
            assert!(
                chunks.iter().all(|chunk| !chunk.last),
                "request cut at {len}"
            );
        }
        let response = draft_response();
        for len in 0..response.len() {
            let (client, _) = start_request_with_ephemeral(&draft_config(), a(SK_E)).unwrap();
            let mut chunks = Vec::new();
            let result = drive(
                &mut client.response_opener().unwrap(),
                &response[..len],
                &[],
                &mut chunks,
            );
            assert!(result.is_err(), "response cut at {len} accepted");
            assert!(
                chunks.iter().all(|chunk| !chunk.last),
                "response cut at {len}"
            );
        }
    }

    #[test]
    fn truncation_errors_say_where() {
        let request = draft_request();
        let drive_to = |len: usize| {
            drive(
                &mut draft_gateway().chunked_request(),
                &request[..len],
                &[],
                &mut Vec::new(),
            )
        };
        assert_eq!(drive_to(0), Err(OhttpError::Truncated));
        assert_eq!(drive_to(REQUEST_PREFIX_LEN - 1), Err(OhttpError::Truncated));
        assert_eq!(
            drive_to(REQUEST_PREFIX_LEN),
            Err(OhttpError::MissingFinalChunk)
        );
        assert_eq!(drive_to(REQUEST_PREFIX_LEN + 1), Err(OhttpError::Truncated));
        let final_start = request.len() - REQUEST_CHUNKS[2].len() / 2;
        assert_eq!(drive_to(final_start), Err(OhttpError::MissingFinalChunk));
        assert_eq!(drive_to(final_start + 1), Err(OhttpError::Truncated));
        assert_eq!(drive_to(request.len() - 1), Err(OhttpError::Truncated));
    }

    #[test]
    fn data_after_the_final_chunk_is_an_error() {
        // Appended to the stream, it becomes part of the final chunk, which then fails to open.
        let mut longer = draft_request();
        longer.push(0);
        let result = drive(
            &mut draft_gateway().chunked_request(),
            &longer,
            &[],
            &mut Vec::new(),
        );
        assert_eq!(result, Err(OhttpError::Decrypt));

        // Arriving after the final chunk was opened, it is refused as such, and stays refused.
        let mut opener = draft_gateway().chunked_request();
        open_all(&mut opener, &draft_request()).unwrap();
        let mut buf = BytesMut::from(&b"x"[..]);
        assert_eq!(opener.decode(&mut buf), Err(OhttpError::TrailingData));
        assert_eq!(
            opener.decode_eof(&mut BytesMut::new()),
            Err(OhttpError::TrailingData)
        );
        assert_eq!(
            opener.response_sealer().err(),
            Some(OhttpError::TrailingData)
        );
    }

    #[test]
    fn unknown_key_and_suite_are_reported_early() {
        let mut opener = draft_gateway().chunked_request();
        let mut buf = BytesMut::from(&[2u8][..]);
        assert_eq!(opener.decode(&mut buf), Err(OhttpError::UnknownKey(2)));

        let mut opener = draft_gateway().chunked_request();
        let mut buf = BytesMut::from(&h("01002000010003")[..]);
        assert_eq!(opener.decode(&mut buf), Err(OhttpError::UnsupportedSuite));

        let mut opener = draft_gateway().chunked_request();
        let mut buf = BytesMut::from(&h("010020")[..]);
        assert_eq!(opener.decode(&mut buf), Ok(None));
        assert_eq!(opener.response_sealer().err(), Some(OhttpError::NotReady));
        assert_eq!(opener.enc(), None);
    }

    #[test]
    fn every_flipped_bit_fails() {
        let request = draft_request();
        for bit in 0..request.len() * 8 {
            let mut bad = request.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut chunks = Vec::new();
            let result = drive(
                &mut draft_gateway().chunked_request(),
                &bad,
                &[],
                &mut chunks,
            );
            assert!(result.is_err(), "request bit {bit} flipped but accepted");
            assert!(chunks.iter().all(|chunk| !chunk.last));
        }
        let response = draft_response();
        for bit in 0..response.len() * 8 {
            let mut bad = response.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let (client, _) = start_request_with_ephemeral(&draft_config(), a(SK_E)).unwrap();
            let mut chunks = Vec::new();
            let result = drive(
                &mut client.response_opener().unwrap(),
                &bad,
                &[],
                &mut chunks,
            );
            assert!(result.is_err(), "response bit {bit} flipped but accepted");
            assert!(chunks.iter().all(|chunk| !chunk.last));
        }
    }

    /// A request whose body is `chunks` (raw plaintexts sealed as non-final chunks, empty ones
    /// included) then an empty final chunk, framed by hand.
    fn request_with_raw_chunks(chunks: &[&[u8]]) -> Vec<u8> {
        let (mut sealer, mut stream) = start_request(&draft_config()).unwrap();
        for chunk in chunks {
            let aead = sealer.context.aead_mut();
            varint::put(&mut stream, (chunk.len() + TAG_LEN) as u64);
            aead.seal_append(CHUNK_AAD, chunk, &mut stream).unwrap();
        }
        stream.extend(sealer.seal_final(&[]).unwrap());
        stream
    }

    #[test]
    fn empty_non_final_chunk_is_an_error() {
        let stream = request_with_raw_chunks(&[b"a", b"", b"b"]);
        let mut chunks = Vec::new();
        let result = drive(
            &mut draft_gateway().chunked_request(),
            &stream,
            &[],
            &mut chunks,
        );
        assert_eq!(result, Err(OhttpError::EmptyChunk));
        assert_eq!(
            chunks,
            [Chunk {
                data: b"a".to_vec(),
                last: false
            }]
        );
    }

    #[test]
    fn size_limits() {
        let (mut sealer, header) = start_request(&draft_config()).unwrap();
        assert_eq!(sealer.seal_chunk(&[]), Err(OhttpError::EmptyChunk));
        let too_big = vec![0u8; MAX_CHUNK_PLAINTEXT + 1];
        assert_eq!(sealer.seal_chunk(&too_big), Err(OhttpError::TooLarge));
        assert_eq!(sealer.seal_final(&too_big), Err(OhttpError::TooLarge));
        let biggest = vec![7u8; MAX_CHUNK_PLAINTEXT];
        let mut stream = header.clone();
        stream.extend(sealer.seal_chunk(&biggest).unwrap());
        stream.extend(sealer.seal_final(&biggest).unwrap());
        assert_eq!(sealer.seal_chunk(b"x"), Err(OhttpError::Finished));
        assert_eq!(sealer.seal_final(b"x"), Err(OhttpError::Finished));
        let chunks = open_all(&mut draft_gateway().chunked_request(), &stream).unwrap();
        assert_eq!(chunks, [biggest.clone(), biggest]);

        // An oversized length prefix fails as soon as it is read, with nothing else buffered.
        let mut buf = BytesMut::from(&header[..]);
        varint::put(&mut buf, (MAX_CHUNK_CIPHERTEXT + 1) as u64);
        assert_eq!(
            draft_gateway().chunked_request().decode(&mut buf),
            Err(OhttpError::TooLarge)
        );
        let mut buf = BytesMut::from(&header[..]);
        varint::put(&mut buf, varint::MAX);
        assert_eq!(
            draft_gateway().chunked_request().decode(&mut buf),
            Err(OhttpError::TooLarge)
        );
        // A final chunk is bounded as it accumulates.
        let mut opener = draft_gateway().chunked_request();
        let mut buf = BytesMut::from(&header[..]);
        buf.extend_from_slice(&[0]);
        buf.extend_from_slice(&vec![0u8; MAX_CHUNK_CIPHERTEXT]);
        assert_eq!(opener.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[0]);
        assert_eq!(opener.decode(&mut buf), Err(OhttpError::TooLarge));
        // A chunk shorter than a tag cannot be one.
        let mut buf = BytesMut::from(&header[..]);
        buf.extend_from_slice(&[5, 0, 0, 0, 0, 0]);
        assert_eq!(
            draft_gateway().chunked_request().decode(&mut buf),
            Err(OhttpError::Malformed)
        );
    }

    #[test]
    fn errors_stick() {
        let mut opener = draft_gateway().chunked_request();
        let mut buf = BytesMut::from(&[9u8][..]);
        assert_eq!(opener.decode(&mut buf), Err(OhttpError::UnknownKey(9)));
        let mut good = BytesMut::from(&draft_request()[..]);
        assert_eq!(opener.decode(&mut good), Err(OhttpError::UnknownKey(9)));
        assert_eq!(opener.decode_eof(&mut good), Err(OhttpError::UnknownKey(9)));
    }

    #[test]
    fn response_before_request_end_and_random_nonce() {
        let gateway = Gateway::new(vec![KeyPair::from_seed(7, &[7; 32])]);
        let (mut client, header) = start_request(&gateway.key_configs()[0]).unwrap();
        let mut response_opener = client.response_opener().unwrap();
        let mut opener = gateway.chunked_request();
        let mut buf = BytesMut::from(&header[..]);
        buf.extend_from_slice(&client.seal_chunk(b"hello").unwrap());
        assert_eq!(opener.decode(&mut buf).unwrap().unwrap().data, b"hello");

        let (mut sealer, nonce) = opener.response_sealer().unwrap();
        let mut response = BytesMut::from(&nonce[..]);
        response.extend_from_slice(&sealer.seal_chunk(b"event 1").unwrap());
        assert_eq!(
            response_opener.decode(&mut response).unwrap().unwrap().data,
            b"event 1"
        );
        response.extend_from_slice(&sealer.seal_final(b"done").unwrap());
        assert_eq!(response_opener.decode(&mut response), Ok(None));
        let last = response_opener.decode_eof(&mut response).unwrap().unwrap();
        assert_eq!(
            last,
            Chunk {
                data: b"done".to_vec(),
                last: true
            }
        );
        assert_eq!(response_opener.decode_eof(&mut response), Ok(None));
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let (sealer, _) = start_request_with_ephemeral(&draft_config(), a(SK_E)).unwrap();
        let opener = sealer.response_opener().unwrap();
        let debug = format!("{sealer:?} {opener:?}");
        assert!(!debug.contains("1d4484"), "{debug}");
        assert!(!debug.contains(&SK_E[..8]), "{debug}");
        let debug = format!("{:?}", draft_gateway().chunked_request());
        assert!(!debug.contains(&SK_R[..8]), "{debug}");
    }

    fn seal_request(
        gateway: &Gateway,
        chunks: &[Vec<u8>],
        last: &[u8],
    ) -> (Vec<u8>, ChunkedRequestSealer) {
        let (mut sealer, mut stream) = start_request(&gateway.key_configs()[0]).unwrap();
        for chunk in chunks {
            stream.extend(sealer.seal_chunk(chunk).unwrap());
        }
        stream.extend(sealer.seal_final(last).unwrap());
        (stream, sealer)
    }

    fn cuts_within(len: usize) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..=len, 0..12).prop_map(|mut cuts| {
            cuts.sort_unstable();
            cuts
        })
    }

    proptest! {
        #[test]
        fn request_decoder_never_panics(
            with_header in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in cuts_within(340),
        ) {
            let mut stream = if with_header { draft_request()[..REQUEST_PREFIX_LEN].to_vec() } else { Vec::new() };
            stream.extend(body);
            let mut chunks = Vec::new();
            let result = drive(&mut draft_gateway().chunked_request(), &stream, &cuts, &mut chunks);
            prop_assert!(result.is_err() || chunks.last().is_some_and(|chunk| chunk.last));
        }

        #[test]
        fn response_decoder_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in cuts_within(300),
        ) {
            let (client, _) = start_request_with_ephemeral(&draft_config(), a(SK_E)).unwrap();
            let mut chunks = Vec::new();
            let result = drive(&mut client.response_opener().unwrap(), &body, &cuts, &mut chunks);
            prop_assert!(result.is_err() || chunks.last().is_some_and(|chunk| chunk.last));
        }

        #[test]
        fn any_cutting_of_a_stream_decodes_the_same(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 0..6),
            last in proptest::collection::vec(any::<u8>(), 0..100),
            request_cuts in cuts_within(1200),
            response_cuts in cuts_within(1200),
        ) {
            let gateway = Gateway::new(vec![KeyPair::from_seed(1, &[1; 32])]);
            let (stream, client) = seal_request(&gateway, &chunks, &last);
            let mut expected: Vec<Chunk> =
                chunks.iter().map(|data| Chunk { data: data.clone(), last: false }).collect();
            expected.push(Chunk { data: last.clone(), last: true });

            let mut opener = gateway.chunked_request();
            let mut got = Vec::new();
            drive(&mut opener, &stream, &request_cuts, &mut got).unwrap();
            prop_assert_eq!(&got, &expected);

            let (mut sealer, mut response) = opener.response_sealer().unwrap();
            for chunk in &chunks {
                response.extend(sealer.seal_chunk(chunk).unwrap());
            }
            response.extend(sealer.seal_final(&last).unwrap());
            let mut got = Vec::new();
            drive(&mut client.response_opener().unwrap(), &response, &response_cuts, &mut got).unwrap();
            prop_assert_eq!(&got, &expected);
        }
    }

    /// Interoperability with the `ohttp` crate's chunked stream API.
    mod interop {
        use std::{
            cell::RefCell,
            io,
            pin::Pin,
            rc::Rc,
            task::{Context, Poll},
        };

        use ::ohttp::{
            ClientRequest, KeyConfig as TheirConfig, Server, SymmetricSuite,
            hpke::{Aead, Kdf, Kem},
        };
        use futures::{AsyncReadExt, AsyncWrite, AsyncWriteExt, executor::block_on};

        use super::*;

        const IKM: [u8; 32] = [0x24; 32];
        const REQUEST: &[u8] = b"a chunked request, long enough to be worth chunking";

        fn their_server() -> Server {
            let config = TheirConfig::derive(
                3,
                Kem::X25519Sha256,
                vec![SymmetricSuite::new(Kdf::HkdfSha256, Aead::Aes128Gcm)],
                &IKM,
            )
            .unwrap();
            Server::new(config).unwrap()
        }

        fn our_gateway() -> Gateway {
            Gateway::new(vec![KeyPair::from_seed(3, &IKM)])
        }

        /// A writer whose bytes stay readable while the `ohttp` client that owns it lives on.
        #[derive(Clone, Default)]
        struct Shared(Rc<RefCell<Vec<u8>>>);

        impl AsyncWrite for Shared {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.0.borrow_mut().extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }

        #[test]
        fn their_client_our_gateway() {
            let gateway = our_gateway();
            let encoded = gateway.key_configs()[0].encode();
            let client = ClientRequest::from_encoded_config(&encoded).unwrap();
            let sent = Shared::default();
            let mut request = client.encapsulate_stream(sent.clone()).unwrap();
            block_on(async {
                request.write_all(&REQUEST[..10]).await.unwrap();
                request.write_all(&REQUEST[10..]).await.unwrap();
                request.close().await.unwrap();
            });

            let stream = sent.0.borrow().clone();
            let mut opener = gateway.chunked_request();
            let chunks = open_all(&mut opener, &stream).unwrap();
            assert_eq!(chunks.concat(), REQUEST);

            let (mut sealer, mut response) = opener.response_sealer().unwrap();
            response.extend(sealer.seal_chunk(b"data: one\n\n").unwrap());
            response.extend(sealer.seal_chunk(b"data: two\n\n").unwrap());
            response.extend(sealer.seal_final(b"").unwrap());
            let mut reader = request.response(&response[..]).unwrap();
            let mut received = Vec::new();
            block_on(reader.read_to_end(&mut received)).unwrap();
            assert_eq!(received, b"data: one\n\ndata: two\n\n");
        }

        #[test]
        fn our_client_their_server() {
            let (mut sealer, mut stream) = start_request(&our_gateway().key_configs()[0]).unwrap();
            stream.extend(sealer.seal_chunk(&REQUEST[..20]).unwrap());
            stream.extend(sealer.seal_final(&REQUEST[20..]).unwrap());

            let mut server_request = their_server().decapsulate_stream(&stream[..]);
            let mut received = Vec::new();
            block_on(server_request.read_to_end(&mut received)).unwrap();
            assert_eq!(received, REQUEST);

            let mut response = Vec::new();
            let mut writer = server_request.response(&mut response).unwrap();
            block_on(async {
                writer.write_all(b"first").await.unwrap();
                writer.write_all(b"second").await.unwrap();
                writer.close().await.unwrap();
            });
            let chunks = open_all(&mut sealer.response_opener().unwrap(), &response).unwrap();
            assert_eq!(chunks.concat(), b"firstsecond");
        }

        /// The draft (§6) makes an empty non-final chunk an error, and we refuse one. The
        /// `ohttp` crate instead writes one when `poll_write` gets an empty buffer, and its
        /// reader takes one for the end of the stream (`read` returns 0 when the chunk fits the
        /// caller's buffer): the request reads as complete and empty, and the final chunk is
        /// never checked.
        #[test]
        fn empty_chunks_they_write_and_stop_at_we_refuse() {
            let client =
                ClientRequest::from_encoded_config(&our_gateway().key_configs()[0].encode())
                    .unwrap();
            let sent = Shared::default();
            let mut request = client.encapsulate_stream(sent.clone()).unwrap();
            block_on(async {
                assert_eq!(request.write(b"").await.unwrap(), 0);
                request.write_all(b"end").await.unwrap();
                request.close().await.unwrap();
            });
            let stream = sent.0.borrow().clone();
            assert_eq!(
                stream[REQUEST_PREFIX_LEN], TAG_LEN as u8,
                "an empty chunk was written"
            );

            let mut server_request = their_server().decapsulate_stream(&stream[..]);
            let mut received = Vec::new();
            block_on(server_request.read_to_end(&mut received)).unwrap();
            assert_eq!(received, b"", "their reader stopped at the empty chunk");

            let result = drive(
                &mut our_gateway().chunked_request(),
                &stream,
                &[],
                &mut Vec::new(),
            );
            assert_eq!(result, Err(OhttpError::EmptyChunk));
        }
    }
}

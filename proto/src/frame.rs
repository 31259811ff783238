//! TokenGo's own framing between client, relay and exit (ARCHITECTURE.md, "Wire protocol"):
//! stream headers, the answer status byte, exit-registration control frames and the exit list.
//!
//! Decoders are push-style over a `BytesMut`: `Ok(None)` means "need more bytes" and consumes
//! nothing, so a caller appends what the stream delivers and calls again. Every length read
//! from the wire is checked against its limit before any byte of the item is buffered.

use bytes::{Buf, BufMut, BytesMut};

use crate::varint;

/// Protocol version the encoders write in every stream header.
///
/// - 1: the answer starts with its status byte.
/// - 2: the answer may start with [`ACCEPTED`] before the status byte: the exit sends it once
///   the request has decrypted and before it does anything with it (before its backend is
///   called), so whoever sees a stream break before it knows the exit cannot have passed the
///   request on (and may send it to another exit), and whoever sees it knows the request may
///   have reached a backend (and must not). Every decrypted request gets it, also one the
///   exit then answers itself, so the relay cannot tell those apart.
///
/// Decoders accept every version from [`MIN_VERSION`] to [`VERSION`]: a relay carries a
/// client's version to the exit, which answers in it.
pub const VERSION: u8 = 2;
/// The oldest stream header version the decoders accept.
pub const MIN_VERSION: u8 = 1;
/// The first version in which an exit announces [`ACCEPTED`].
pub const VERSION_ACCEPTED: u8 = 2;
/// Version 2: the answer byte an exit sends once a request has decrypted, before it passes the
/// request to its backend. It precedes the status byte, at most once, and only [`Status::Ok`]
/// may follow it (after it, every failure travels inside the encrypted response, or as a
/// broken stream).
pub const ACCEPTED: u8 = 0x05;
/// ALPN of client connections to a relay.
pub const ALPN_CLIENT: &[u8] = b"tokengo/1";
/// ALPN of exit tunnel connections to a relay.
pub const ALPN_EXIT: &[u8] = b"tokengo-exit/1";
/// Longest exit id (a PeerId's multihash bytes; 38 for an Ed25519 identity) a header may carry.
pub const MAX_EXIT_ID_LEN: usize = 64;

/// A [`ControlFrame::decode`] limit that admits every valid REGISTER (the largest signed
/// descriptor plus the kind byte) and bounds what a peer can make us buffer.
pub const MAX_CONTROL_FRAME_LEN: usize = crate::descriptor::MAX_DESCRIPTOR_LEN + 1;

const KIND_LIST_EXITS: u8 = 0x01;
const KIND_FORWARD: u8 = 0x02;
const CONTROL_REGISTER: u8 = 0x10;
const CONTROL_ACK: u8 = 0x11;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header's version byte is not [`VERSION`]: the peer speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    UnknownVersion(u8),
    /// A request or control frame kind this version does not define.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The exit id is longer than [`MAX_EXIT_ID_LEN`].
    #[error("exit id of {0} bytes exceeds {MAX_EXIT_ID_LEN}")]
    ExitIdTooLong(u64),
    /// A media type byte other than 0x01 (single OHTTP) or 0x02 (chunked OHTTP).
    #[error("unknown media type 0x{0:02x}")]
    UnknownMediaType(u8),
    /// A status byte this version does not define.
    #[error("unknown status 0x{0:02x}")]
    UnknownStatus(u8),
    /// A control frame announces more bytes than the caller's limit (checked before buffering).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The caller's limit.
        max: usize,
    },
    /// An exit list announces more entries than the caller accepts.
    #[error("exit list of {count} entries exceeds the limit of {max}")]
    TooMany {
        /// The announced count.
        count: u64,
        /// The caller's limit.
        max: usize,
    },
    /// A complete buffer (the exit list) ends inside an item.
    #[error("frame truncated")]
    Truncated,
    /// An ACK reason that is not UTF-8.
    #[error("ACK reason is not UTF-8")]
    InvalidUtf8,
    /// Any other violation of the format; the reason says which.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// How the OHTTP body of a stream is encapsulated.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaType {
    /// RFC 9458 single request and response; inner known-length Binary HTTP.
    Single = 0x01,
    /// Chunked OHTTP (draft-ietf-ohai-chunked-ohttp-08); inner indeterminate-length Binary HTTP.
    Chunked = 0x02,
}

impl MediaType {
    /// The `Content-Type` of a request body in this encapsulation.
    #[must_use]
    pub const fn request_content_type(self) -> &'static str {
        match self {
            Self::Single => "message/ohttp-req",
            Self::Chunked => "message/ohttp-chunked-req",
        }
    }

    /// The `Content-Type` of a response body in this encapsulation.
    #[must_use]
    pub const fn response_content_type(self) -> &'static str {
        match self {
            Self::Single => "message/ohttp-res",
            Self::Chunked => "message/ohttp-chunked-res",
        }
    }
}

impl TryFrom<u8> for MediaType {
    type Error = FrameError;

    fn try_from(byte: u8) -> Result<Self, FrameError> {
        match byte {
            0x01 => Ok(Self::Single),
            0x02 => Ok(Self::Chunked),
            other => Err(FrameError::UnknownMediaType(other)),
        }
    }
}

impl From<MediaType> for u8 {
    fn from(media: MediaType) -> u8 {
        media as u8
    }
}

/// The header that starts every stream a client opens to a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    /// Ask for the signed descriptors of the registered exits; the client sends FIN next.
    ListExits,
    /// Forward the OHTTP body that follows (until FIN) to an exit.
    Forward {
        /// The exit's PeerId bytes. At most [`MAX_EXIT_ID_LEN`] bytes: longer ids are
        /// written as given and refused by the decoder, so build them from a `PeerId`.
        exit_id: Vec<u8>,
        /// How the body is encapsulated.
        media: MediaType,
    },
}

impl ClientRequest {
    /// Appends the header.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(VERSION);
        match self {
            Self::ListExits => out.put_u8(KIND_LIST_EXITS),
            Self::Forward { exit_id, media } => {
                out.put_u8(KIND_FORWARD);
                varint::put(out, len_u64(exit_id.len()));
                out.put_slice(exit_id);
                out.put_u8(u8::from(*media));
            }
        }
    }

    /// Takes one header from the front of `buf`, leaving the body bytes after it in place.
    /// `Ok(None)`: the header is incomplete and nothing was consumed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, FrameError> {
        Ok(Self::decode_versioned(buf)?.map(|(request, _)| request))
    }

    /// [`ClientRequest::decode`], also returning the header's version (which the relay
    /// carries to the exit).
    pub fn decode_versioned(buf: &mut BytesMut) -> Result<Option<(Self, u8)>, FrameError> {
        let Some((request, len)) = Self::parse(buf)? else {
            return Ok(None);
        };
        let version = buf.first().copied().unwrap_or(VERSION);
        buf.advance(len);
        Ok(Some((request, version)))
    }

    /// Parses a header at the front of `input`, returning it and its length. Errors are
    /// reported as soon as the offending byte arrives, without waiting for the rest.
    fn parse(input: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some(&version) = input.first() else {
            return Ok(None);
        };
        check_version(version)?;
        let Some(&kind) = input.get(1) else {
            return Ok(None);
        };
        match kind {
            KIND_LIST_EXITS => Ok(Some((Self::ListExits, 2))),
            KIND_FORWARD => Ok(Self::parse_forward(input.get(2..).unwrap_or_default())?
                .map(|(request, len)| (request, len.saturating_add(2)))),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// Parses the FORWARD fields after version and kind; the length excludes those two bytes.
    fn parse_forward(input: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Ok((id_len, prefix)) = varint::peek(input) else {
            return Ok(None);
        };
        let id_len = usize::try_from(id_len)
            .ok()
            .filter(|&len| len <= MAX_EXIT_ID_LEN)
            .ok_or(FrameError::ExitIdTooLong(id_len))?;
        // Both terms are small (prefix <= 8, id_len <= 64): no overflow.
        let id_end = prefix + id_len;
        let (Some(exit_id), Some(&media)) = (input.get(prefix..id_end), input.get(id_end)) else {
            return Ok(None);
        };
        let media = MediaType::try_from(media)?;
        Ok(Some((
            Self::Forward {
                exit_id: exit_id.to_vec(),
                media,
            },
            id_end + 1,
        )))
    }
}

/// The header of every stream a relay opens to an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRequest {
    /// How the OHTTP body that follows is encapsulated.
    pub media: MediaType,
}

impl ExitRequest {
    /// Encoded length of the header.
    pub const LEN: usize = 2;

    /// Appends the header in the current [`VERSION`].
    pub fn encode(&self, out: &mut impl BufMut) {
        self.encode_version(VERSION, out);
    }

    /// Appends the header in `version` (the client's, which the relay carries over).
    pub fn encode_version(&self, version: u8, out: &mut impl BufMut) {
        out.put_u8(version);
        out.put_u8(u8::from(self.media));
    }

    /// Takes one header from the front of `buf`. `Ok(None)`: incomplete, nothing consumed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, FrameError> {
        Ok(Self::decode_versioned(buf)?.map(|(request, _)| request))
    }

    /// [`ExitRequest::decode`], also returning the header's version (the exit answers in it).
    pub fn decode_versioned(buf: &mut BytesMut) -> Result<Option<(Self, u8)>, FrameError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        check_version(version)?;
        let Some(&media) = buf.get(1) else {
            return Ok(None);
        };
        let media = MediaType::try_from(media)?;
        buf.advance(Self::LEN);
        Ok(Some((Self { media }, version)))
    }
}

/// What the start of an answer says (exit → relay → client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerEvent {
    /// [`ACCEPTED`]: the exit is passing the request to its backend.
    Accepted,
    /// The status byte; the body (if any) follows.
    Status(Status),
}

/// Reads the start of an answer in a given version: in version 2 an optional [`ACCEPTED`],
/// then the status byte. Push-style, like the other decoders; no I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerStart {
    version: u8,
    accepted: bool,
    done: bool,
}

impl AnswerStart {
    /// A reader for an answer to a request sent with header `version`.
    #[must_use]
    pub const fn new(version: u8) -> Self {
        Self {
            version,
            accepted: false,
            done: false,
        }
    }

    /// Whether [`ACCEPTED`] was seen: the request may have reached the backend.
    #[must_use]
    pub const fn accepted(&self) -> bool {
        self.accepted
    }

    /// Takes the next event from the front of `buf`. `Ok(None)`: need more bytes (nothing
    /// consumed). After the status byte, the body's bytes stay in `buf` and further calls
    /// are an error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<AnswerEvent>, FrameError> {
        if self.done {
            return Err(FrameError::Malformed("answer start already read"));
        }
        let Some(&byte) = buf.first() else {
            return Ok(None);
        };
        let event = if byte == ACCEPTED && self.version >= VERSION_ACCEPTED {
            if self.accepted {
                return Err(FrameError::Malformed("ACCEPTED sent twice"));
            }
            self.accepted = true;
            AnswerEvent::Accepted
        } else {
            let status = Status::try_from(byte)?;
            if self.accepted && status != Status::Ok {
                return Err(FrameError::Malformed("a refusal after ACCEPTED"));
            }
            self.done = true;
            AnswerEvent::Status(status)
        };
        buf.advance(1);
        Ok(Some(event))
    }
}

/// The first byte of every answer (exit → relay → client, and relay → client).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success: the OHTTP response (or the exit list) follows until FIN.
    Ok = 0x00,
    /// The relay knows no exit with the requested id.
    NoSuchExit = 0x01,
    /// The exit was registered but went away.
    ExitUnavailable = 0x02,
    /// The request header could not be decoded.
    Malformed = 0x03,
    /// A limit was reached (streams, connections, load).
    Overloaded = 0x04,
    /// The exit does not hold the request's key id: refresh key configs and retry once.
    KeyUnknown = 0x10,
    /// The exit could not decapsulate the request.
    Undecryptable = 0x11,
}

impl Status {
    /// A short human-readable description, for logs and error messages.
    #[must_use]
    pub const fn description(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoSuchExit => "no such exit",
            Self::ExitUnavailable => "exit unavailable",
            Self::Malformed => "malformed request header",
            Self::Overloaded => "overloaded",
            Self::KeyUnknown => "key unknown (refresh key configurations and retry)",
            Self::Undecryptable => "request could not be decapsulated",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.description())
    }
}

impl TryFrom<u8> for Status {
    type Error = FrameError;

    fn try_from(byte: u8) -> Result<Self, FrameError> {
        Ok(match byte {
            0x00 => Self::Ok,
            0x01 => Self::NoSuchExit,
            0x02 => Self::ExitUnavailable,
            0x03 => Self::Malformed,
            0x04 => Self::Overloaded,
            0x10 => Self::KeyUnknown,
            0x11 => Self::Undecryptable,
            other => return Err(FrameError::UnknownStatus(other)),
        })
    }
}

impl From<Status> for u8 {
    fn from(status: Status) -> u8 {
        status as u8
    }
}

/// A frame on the exit's registration control stream: `Length (i), Kind (8), Payload (..)`,
/// where `Length` covers `Kind` and `Payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    /// Exit → relay: the exit's signed descriptor bytes.
    Register(Vec<u8>),
    /// Relay → exit: the outcome of the last REGISTER.
    Ack {
        /// [`Status::Ok`] when the registration was accepted.
        status: Status,
        /// Why it was refused; may be empty.
        reason: String,
    },
}

impl ControlFrame {
    /// Appends the frame.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Self::Register(descriptor) => {
                varint::put(out, len_u64(descriptor.len()).saturating_add(1));
                out.put_u8(CONTROL_REGISTER);
                out.put_slice(descriptor);
            }
            Self::Ack { status, reason } => {
                varint::put(out, len_u64(reason.len()).saturating_add(2));
                out.put_u8(CONTROL_ACK);
                out.put_u8(u8::from(*status));
                out.put_slice(reason.as_bytes());
            }
        }
    }

    /// Takes one frame from the front of `buf`. A frame longer than `max_len` (its `Length`
    /// field) is refused as soon as the length is read, before its bytes are buffered.
    /// `Ok(None)`: incomplete, nothing consumed.
    pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<Self>, FrameError> {
        let Ok((len, prefix)) = varint::peek(buf) else {
            return Ok(None);
        };
        let too_large = FrameError::TooLarge { len, max: max_len };
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= max_len)
            .ok_or(too_large)?;
        let end = prefix.checked_add(len).ok_or(FrameError::TooLarge {
            len: len_u64(len),
            max: max_len,
        })?;
        let Some(frame) = buf.get(prefix..end) else {
            return Ok(None);
        };
        let frame = Self::parse(frame)?;
        buf.advance(end);
        Ok(Some(frame))
    }

    /// Parses `Kind` and `Payload`.
    fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        let (&kind, payload) = frame
            .split_first()
            .ok_or(FrameError::Malformed("empty control frame"))?;
        match kind {
            CONTROL_REGISTER => Ok(Self::Register(payload.to_vec())),
            CONTROL_ACK => {
                let (&status, reason) = payload
                    .split_first()
                    .ok_or(FrameError::Malformed("ACK without status"))?;
                let status = Status::try_from(status)?;
                let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
                Ok(Self::Ack {
                    status,
                    reason: reason.to_owned(),
                })
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// Encodes the LIST_EXITS answer body: `Count (i)`, then `Length (i), Signed Descriptor (..)`
/// for each descriptor.
#[must_use]
pub fn encode_exit_list(descriptors: &[&[u8]]) -> Vec<u8> {
    let len = descriptors
        .iter()
        .map(|d| varint::encoded_len(len_u64(d.len())).saturating_add(d.len()))
        .fold(
            varint::encoded_len(len_u64(descriptors.len())),
            usize::saturating_add,
        );
    let mut out = Vec::with_capacity(len);
    varint::put(&mut out, len_u64(descriptors.len()));
    for descriptor in descriptors {
        varint::put(&mut out, len_u64(descriptor.len()));
        out.put_slice(descriptor);
    }
    out
}

/// Decodes a complete LIST_EXITS answer body into the descriptors' bytes (not yet verified).
/// More than `max_count` entries is an error before anything is allocated.
pub fn decode_exit_list(mut bytes: &[u8], max_count: usize) -> Result<Vec<Vec<u8>>, FrameError> {
    let count = varint::get(&mut bytes).map_err(|_| FrameError::Truncated)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| n <= max_count)
        .ok_or(FrameError::TooMany {
            count,
            max: max_count,
        })?;
    // Every entry takes at least one byte, so the input bounds the allocation too.
    let mut descriptors = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let len = varint::get(&mut bytes).map_err(|_| FrameError::Truncated)?;
        let len = usize::try_from(len).map_err(|_| FrameError::Truncated)?;
        let (descriptor, rest) = bytes.split_at_checked(len).ok_or(FrameError::Truncated)?;
        descriptors.push(descriptor.to_vec());
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(FrameError::Malformed("bytes after the exit list"));
    }
    Ok(descriptors)
}

fn check_version(version: u8) -> Result<(), FrameError> {
    if (MIN_VERSION..=VERSION).contains(&version) {
        Ok(())
    } else {
        Err(FrameError::UnknownVersion(version))
    }
}

/// Lengths of in-memory buffers always fit in a varint's 62 bits.
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(f: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut buf = BytesMut::new();
        f(&mut buf);
        buf
    }

    #[test]
    fn client_request_wire_bytes() {
        let list = encoded(|b| ClientRequest::ListExits.encode(b));
        assert_eq!(&list[..], [0x02, 0x01]);

        let forward = ClientRequest::Forward {
            exit_id: vec![0xaa, 0xbb],
            media: MediaType::Chunked,
        };
        let bytes = encoded(|b| forward.encode(b));
        assert_eq!(&bytes[..], [0x02, 0x02, 0x02, 0xaa, 0xbb, 0x02]);

        // The body that follows the header stays in the buffer.
        let mut buf = bytes.clone();
        buf.extend_from_slice(b"ohttp body");
        assert_eq!(ClientRequest::decode(&mut buf).unwrap(), Some(forward));
        assert_eq!(&buf[..], b"ohttp body");
    }

    #[test]
    fn exit_request_and_status_wire_bytes() {
        let bytes = encoded(|b| {
            ExitRequest {
                media: MediaType::Single,
            }
            .encode(b)
        });
        assert_eq!(&bytes[..], [0x02, 0x01]);
        for (byte, status) in [
            (0x00, Status::Ok),
            (0x01, Status::NoSuchExit),
            (0x02, Status::ExitUnavailable),
            (0x03, Status::Malformed),
            (0x04, Status::Overloaded),
            (0x10, Status::KeyUnknown),
            (0x11, Status::Undecryptable),
        ] {
            assert_eq!(Status::try_from(byte), Ok(status));
            assert_eq!(u8::from(status), byte);
            assert!(!status.to_string().is_empty());
        }
        assert_eq!(Status::try_from(0x05), Err(FrameError::UnknownStatus(0x05)));
    }

    #[test]
    fn version_1_headers_are_still_read_and_their_version_is_kept() {
        let mut buf = BytesMut::from(&[0x01, 0x02, 0x01, 0xaa, 0x01, b'x'][..]);
        assert_eq!(
            ClientRequest::decode_versioned(&mut buf),
            Ok(Some((
                ClientRequest::Forward {
                    exit_id: vec![0xaa],
                    media: MediaType::Single
                },
                1
            )))
        );
        assert_eq!(&buf[..], b"x");
        let mut head = BytesMut::new();
        ExitRequest {
            media: MediaType::Chunked,
        }
        .encode_version(1, &mut head);
        assert_eq!(&head[..], [0x01, 0x02]);
        assert_eq!(
            ExitRequest::decode_versioned(&mut head),
            Ok(Some((
                ExitRequest {
                    media: MediaType::Chunked
                },
                1
            )))
        );
    }

    #[test]
    fn answer_start_in_version_2_reads_accepted_then_the_status() {
        let mut start = AnswerStart::new(VERSION);
        let mut buf = BytesMut::new();
        assert_eq!(start.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[ACCEPTED]);
        assert_eq!(start.decode(&mut buf), Ok(Some(AnswerEvent::Accepted)));
        assert!(start.accepted());
        assert_eq!(
            start.decode(&mut buf),
            Ok(None),
            "the status is still to come"
        );
        buf.extend_from_slice(&[0x00, 0xee]);
        assert_eq!(
            start.decode(&mut buf),
            Ok(Some(AnswerEvent::Status(Status::Ok)))
        );
        assert_eq!(&buf[..], [0xee], "the body stays");
        assert!(start.decode(&mut buf).is_err(), "nothing more to read");

        // A refusal comes without ACCEPTED: the backend was never called.
        let mut start = AnswerStart::new(VERSION);
        let mut buf = BytesMut::from(&[0x10][..]);
        assert_eq!(
            start.decode(&mut buf),
            Ok(Some(AnswerEvent::Status(Status::KeyUnknown)))
        );
        assert!(!start.accepted());
    }

    #[test]
    fn answer_start_refuses_what_an_honest_exit_never_sends() {
        // Only OK may follow ACCEPTED: once the backend may have the request, failures are
        // encrypted answers or broken streams.
        let mut start = AnswerStart::new(VERSION);
        let mut buf = BytesMut::from(&[ACCEPTED, 0x02][..]);
        assert_eq!(start.decode(&mut buf), Ok(Some(AnswerEvent::Accepted)));
        assert_eq!(
            start.decode(&mut buf),
            Err(FrameError::Malformed("a refusal after ACCEPTED"))
        );
        let mut start = AnswerStart::new(VERSION);
        let mut buf = BytesMut::from(&[ACCEPTED, ACCEPTED][..]);
        assert_eq!(start.decode(&mut buf), Ok(Some(AnswerEvent::Accepted)));
        assert_eq!(
            start.decode(&mut buf),
            Err(FrameError::Malformed("ACCEPTED sent twice"))
        );
        // Version 1 has no ACCEPTED: the byte is an unknown status there.
        let mut start = AnswerStart::new(1);
        let mut buf = BytesMut::from(&[ACCEPTED][..]);
        assert_eq!(
            start.decode(&mut buf),
            Err(FrameError::UnknownStatus(ACCEPTED))
        );
        assert!(
            Status::try_from(ACCEPTED).is_err(),
            "no status shares its byte"
        );
    }

    #[test]
    fn media_type_content_types() {
        assert_eq!(
            MediaType::Single.request_content_type(),
            "message/ohttp-req"
        );
        assert_eq!(
            MediaType::Single.response_content_type(),
            "message/ohttp-res"
        );
        assert_eq!(
            MediaType::Chunked.request_content_type(),
            "message/ohttp-chunked-req"
        );
        assert_eq!(
            MediaType::Chunked.response_content_type(),
            "message/ohttp-chunked-res"
        );
    }

    #[test]
    fn header_errors_are_reported_early() {
        // A wrong version fails on its first byte, before the rest of the header arrives.
        let mut buf = BytesMut::from(&[0x03][..]);
        assert_eq!(
            ClientRequest::decode(&mut buf),
            Err(FrameError::UnknownVersion(3))
        );
        assert_eq!(
            ExitRequest::decode(&mut buf),
            Err(FrameError::UnknownVersion(3))
        );
        let mut buf = BytesMut::from(&[0x00][..]);
        assert_eq!(
            ClientRequest::decode(&mut buf),
            Err(FrameError::UnknownVersion(0))
        );
        let mut buf = BytesMut::from(&[0x01, 0x07][..]);
        assert_eq!(
            ClientRequest::decode(&mut buf),
            Err(FrameError::UnknownKind(7))
        );
        // An oversized exit id fails on its length, without waiting for the id.
        let mut buf = BytesMut::from(&[0x01, 0x02, 0x40, 0x41][..]);
        assert_eq!(
            ClientRequest::decode(&mut buf),
            Err(FrameError::ExitIdTooLong(65))
        );
        let mut buf = BytesMut::from(&[0x01, 0x02, 0x01, 0xaa, 0x03][..]);
        assert_eq!(
            ClientRequest::decode(&mut buf),
            Err(FrameError::UnknownMediaType(3))
        );
        let mut buf = BytesMut::from(&[0x01, 0x00][..]);
        assert_eq!(
            ExitRequest::decode(&mut buf),
            Err(FrameError::UnknownMediaType(0))
        );
        // Exactly MAX_EXIT_ID_LEN is fine.
        let max = ClientRequest::Forward {
            exit_id: vec![7; MAX_EXIT_ID_LEN],
            media: MediaType::Single,
        };
        let mut buf = encoded(|b| max.encode(b));
        assert_eq!(ClientRequest::decode(&mut buf).unwrap(), Some(max));
    }

    #[test]
    fn control_frame_wire_bytes() {
        let register = encoded(|b| ControlFrame::Register(vec![1, 2, 3]).encode(b));
        assert_eq!(&register[..], [0x04, 0x10, 1, 2, 3]);
        let ack = ControlFrame::Ack {
            status: Status::Malformed,
            reason: "bad".into(),
        };
        let bytes = encoded(|b| ack.encode(b));
        assert_eq!(&bytes[..], [0x05, 0x11, 0x03, b'b', b'a', b'd']);
        let mut buf = bytes;
        assert_eq!(ControlFrame::decode(&mut buf, 16).unwrap(), Some(ack));
        assert!(buf.is_empty());
    }

    #[test]
    fn control_frame_errors() {
        // The length is checked before the frame is buffered.
        let mut buf = BytesMut::from(&[0x80, 0x01, 0x00, 0x00][..]);
        assert_eq!(
            ControlFrame::decode(&mut buf, 1024),
            Err(FrameError::TooLarge {
                len: 65536,
                max: 1024
            })
        );
        assert_eq!(buf.len(), 4, "nothing consumed on error");
        let cases: [(&[u8], FrameError); 5] = [
            (&[0x00], FrameError::Malformed("empty control frame")),
            (&[0x01, 0x11], FrameError::Malformed("ACK without status")),
            (&[0x02, 0x11, 0x99], FrameError::UnknownStatus(0x99)),
            (&[0x03, 0x11, 0x00, 0xff], FrameError::InvalidUtf8),
            (&[0x01, 0x12], FrameError::UnknownKind(0x12)),
        ];
        for (bytes, error) in cases {
            assert_eq!(
                ControlFrame::decode(&mut BytesMut::from(bytes), 64),
                Err(error)
            );
        }
    }

    #[test]
    fn exit_list_wire_bytes_and_errors() {
        let list = encode_exit_list(&[b"ab", b""]);
        assert_eq!(list, [0x02, 0x02, b'a', b'b', 0x00]);
        assert_eq!(
            decode_exit_list(&list, 2).unwrap(),
            vec![b"ab".to_vec(), Vec::new()]
        );
        assert_eq!(
            decode_exit_list(&list, 1),
            Err(FrameError::TooMany { count: 2, max: 1 })
        );
        assert_eq!(decode_exit_list(&list[..4], 2), Err(FrameError::Truncated));
        assert_eq!(decode_exit_list(&[], 2), Err(FrameError::Truncated));
        let mut trailing = list.clone();
        trailing.push(0);
        assert_eq!(
            decode_exit_list(&trailing, 2),
            Err(FrameError::Malformed("bytes after the exit list"))
        );
        assert_eq!(
            decode_exit_list(&encode_exit_list(&[]), 0).unwrap(),
            Vec::<Vec<u8>>::new()
        );
    }

    fn media() -> impl Strategy<Value = MediaType> {
        prop_oneof![Just(MediaType::Single), Just(MediaType::Chunked)]
    }

    fn client_request() -> impl Strategy<Value = ClientRequest> {
        prop_oneof![
            Just(ClientRequest::ListExits),
            (
                proptest::collection::vec(any::<u8>(), 0..=MAX_EXIT_ID_LEN),
                media()
            )
                .prop_map(|(exit_id, media)| ClientRequest::Forward { exit_id, media }),
        ]
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x03, 0x04, 0x10, 0x11])
            .prop_map(|b| Status::try_from(b).unwrap())
    }

    fn control_frame() -> impl Strategy<Value = ControlFrame> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(ControlFrame::Register),
            (status(), ".{0,40}").prop_map(|(status, reason)| ControlFrame::Ack { status, reason }),
        ]
    }

    proptest! {
        /// Round trip, with every strict prefix answering "need more" without consuming, and
        /// the bytes after the frame left in place.
        #[test]
        fn client_request_round_trip(request in client_request(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let bytes = encoded(|b| request.encode(b));
            for cut in 0..bytes.len() {
                let mut prefix = BytesMut::from(&bytes[..cut]);
                prop_assert_eq!(ClientRequest::decode(&mut prefix), Ok(None));
                prop_assert_eq!(prefix.len(), cut);
            }
            let mut buf = bytes.clone();
            buf.extend_from_slice(&tail);
            prop_assert_eq!(ClientRequest::decode(&mut buf), Ok(Some(request)));
            prop_assert_eq!(&buf[..], &tail[..]);
        }

        #[test]
        fn exit_request_round_trip(media in media()) {
            let request = ExitRequest { media };
            let bytes = encoded(|b| request.encode(b));
            prop_assert_eq!(bytes.len(), ExitRequest::LEN);
            for cut in 0..bytes.len() {
                let mut prefix = BytesMut::from(&bytes[..cut]);
                prop_assert_eq!(ExitRequest::decode(&mut prefix), Ok(None));
                prop_assert_eq!(prefix.len(), cut);
            }
            prop_assert_eq!(ExitRequest::decode(&mut bytes.clone()), Ok(Some(request)));
        }

        #[test]
        fn control_frame_round_trip(frame in control_frame(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let bytes = encoded(|b| frame.encode(b));
            for cut in 0..bytes.len() {
                let mut prefix = BytesMut::from(&bytes[..cut]);
                prop_assert_eq!(ControlFrame::decode(&mut prefix, 1024), Ok(None));
                prop_assert_eq!(prefix.len(), cut);
            }
            let mut buf = bytes.clone();
            buf.extend_from_slice(&tail);
            prop_assert_eq!(ControlFrame::decode(&mut buf, 1024), Ok(Some(frame)));
            prop_assert_eq!(&buf[..], &tail[..]);
        }

        #[test]
        fn exit_list_round_trip(list in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..10)) {
            let refs: Vec<&[u8]> = list.iter().map(Vec::as_slice).collect();
            let bytes = encode_exit_list(&refs);
            prop_assert_eq!(decode_exit_list(&bytes, 10), Ok(list));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128), max in 0usize..200) {
            let _ = ClientRequest::decode(&mut BytesMut::from(&bytes[..]));
            let _ = ExitRequest::decode(&mut BytesMut::from(&bytes[..]));
            let _ = ControlFrame::decode(&mut BytesMut::from(&bytes[..]), max);
            let _ = decode_exit_list(&bytes, max);
            let mut start = AnswerStart::new(VERSION);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = start.decode(&mut buf) {}
            if let Some(&b) = bytes.first() {
                let _ = Status::try_from(b);
                let _ = MediaType::try_from(b);
            }
        }
    }
}

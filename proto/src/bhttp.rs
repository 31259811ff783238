//! Binary HTTP (RFC 9292): the inner request and response of every OHTTP exchange, in the
//! known-length form (single OHTTP messages) and the indeterminate-length form (streamed over
//! chunked OHTTP), with push-style incremental decoders and an incremental encoder.
//!
//! Decoding is strict, as RFC 9292 §4 asks: an invalid message is an error, never a guess.
//! Field names must be HTTP tokens (they are lowercased, as field names are case-insensitive),
//! field values must be valid HTTP/2 values, pseudo-fields are refused, and every length is
//! checked against [`Limits`] before the bytes it announces are buffered.
//!
//! RFC 9292 §3.1 and §3.8 let an encoder end a message early when everything after that point
//! is empty: after the control data, after the header section, or after the content; decoders
//! must read the omitted parts as empty (RFC 9458 Appendix A's messages do this). The
//! incremental decoders implement that in [`RequestDecoder::decode_eof`], which is told that
//! the input has ended; [`RequestDecoder::finish`] is the strict check that the whole message,
//! through its trailer section, was seen. Our encoders never truncate. Truncation cannot be
//! used against us: OHTTP authenticates the whole message, and chunked OHTTP its end.
//!
//! Our encoders never write informational (1xx) responses or trailers; the decoders skip
//! informational responses and validate, then drop, trailers.

use crate::varint;

mod decode;
mod encode;

pub use decode::{
    Event, RequestDecoder, RequestEvent, ResponseDecoder, ResponseEvent, decode_request,
    decode_response,
};
pub use encode::{
    StreamingEncoder, encode_request, encode_response, encoded_request_len, encoded_response_len,
};

const KNOWN_LENGTH_REQUEST: u64 = 0;
const KNOWN_LENGTH_RESPONSE: u64 = 1;
const INDETERMINATE_LENGTH_REQUEST: u64 = 2;
const INDETERMINATE_LENGTH_RESPONSE: u64 = 3;

/// Why a message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BhttpError {
    /// The input ended inside the message, at a point where RFC 9292 §3.8 does not allow it to
    /// end (or, for [`RequestDecoder::finish`], before the trailer section was read).
    #[error("binary HTTP message truncated")]
    Truncated,
    /// A framing indicator this decoder does not read: requests are 0 or 2, responses 1 or 3.
    #[error("unexpected binary HTTP framing indicator {0}")]
    UnknownFraming(u64),
    /// A status code outside 100..=599 when decoding, or a final status outside 200..=599
    /// when encoding.
    #[error("invalid status code {0}")]
    InvalidStatus(u64),
    /// A field section, or the request control data, is larger than
    /// [`Limits::max_field_section`].
    #[error("field section too large")]
    FieldSectionTooLarge,
    /// A field section has more than [`Limits::max_fields`] field lines.
    #[error("too many fields")]
    TooManyFields,
    /// Known-length content is larger than [`Limits::max_body`].
    #[error("content too large")]
    BodyTooLarge,
    /// A non-zero byte after the message, where only zero padding may follow.
    #[error("non-zero padding")]
    NonZeroPadding,
    /// The message breaks RFC 9292 or the HTTP rules it refers to; the reason says which.
    #[error("malformed binary HTTP message: {0}")]
    Malformed(&'static str),
}

/// One field line. Names are lowercase: decoders lowercase them and encoders write them
/// lowercased, as HTTP/2 requires.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Field {
    /// The field name: a non-empty HTTP token, lowercase.
    pub name: Vec<u8>,
    /// The field value: no NUL, CR or LF, no leading or trailing space or tab.
    pub value: Vec<u8>,
}

impl Field {
    /// A field from anything byte-like.
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

impl std::fmt::Debug for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.name.escape_ascii(),
            self.value.escape_ascii()
        )
    }
}

/// Request control data and header fields.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, an HTTP token such as `GET`.
    pub method: Vec<u8>,
    /// The scheme, such as `https`.
    pub scheme: Vec<u8>,
    /// The authority; empty when absent.
    pub authority: Vec<u8>,
    /// The path and query.
    pub path: Vec<u8>,
    /// Header fields, in order.
    pub fields: Vec<Field>,
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}://{}{} ",
            self.method.escape_ascii(),
            self.scheme.escape_ascii(),
            self.authority.escape_ascii(),
            self.path.escape_ascii()
        )?;
        f.debug_list().entries(&self.fields).finish()
    }
}

impl RequestHead {
    /// Checks what decoders check, so encoders never write a message a decoder refuses:
    /// the method is a token, the scheme a URI scheme, authority and path visible ASCII,
    /// and the fields valid.
    pub fn validate(&self) -> Result<(), BhttpError> {
        check_control(&self.method, &self.scheme, &self.authority, &self.path)?;
        self.fields
            .iter()
            .try_for_each(|field| check_field(&field.name, &field.value))
    }
}

/// Final response status and header fields.
#[derive(Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The final status code, 200..=599.
    pub status: u16,
    /// Header fields, in order.
    pub fields: Vec<Field>,
}

impl std::fmt::Debug for ResponseHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.status)?;
        f.debug_list().entries(&self.fields).finish()
    }
}

impl ResponseHead {
    /// Checks what decoders check: a final status code (200..=599) and valid fields.
    pub fn validate(&self) -> Result<(), BhttpError> {
        if !(200..=599).contains(&self.status) {
            return Err(BhttpError::InvalidStatus(u64::from(self.status)));
        }
        self.fields
            .iter()
            .try_for_each(|field| check_field(&field.name, &field.value))
    }
}

/// Resource limits for decoding, checked before anything they limit is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded field section (field lines with their length prefixes), applied to
    /// header, trailer and informational sections alike, and to the request control data.
    /// Default 64 KiB: generous for real headers, small enough to buffer per stream.
    pub max_field_section: usize,
    /// Most field lines in one section. Default 256.
    pub max_fields: usize,
    /// Largest known-length content. Default 32 MiB. Indeterminate-length content is streamed
    /// through and not limited here.
    pub max_body: usize,
}

impl Limits {
    /// The defaults: 64 KiB field sections, 256 fields per section, 32 MiB known-length bodies.
    pub const DEFAULT: Self = Self {
        max_field_section: 64 * 1024,
        max_fields: 256,
        max_body: 32 * 1024 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

// ---------------------------------------------------------------------------------------------
// Validation (RFC 9292 §3.4, §3.6; RFC 9110 §5.1; RFC 9113 §8.2.1, §8.3.1)

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| is_tchar(b))
}

/// A field name is a token; this also refuses pseudo-fields (`:` is not a tchar), which
/// RFC 9292 forbids for the control-data names and which no HTTP/1.1 backend could take.
/// A field value follows RFC 9113 §8.2.1.
fn check_field(name: &[u8], value: &[u8]) -> Result<(), BhttpError> {
    if !is_token(name) {
        return Err(BhttpError::Malformed("invalid field name"));
    }
    let bad_edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if value.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
        || bad_edge(value.first())
        || bad_edge(value.last())
    {
        return Err(BhttpError::Malformed("invalid field value"));
    }
    Ok(())
}

/// Request control data: RFC 9113 §8.3.1 via RFC 9292 §3.4. Authority and path are kept to
/// visible ASCII so no control character or space can reach a request line downstream.
fn check_control(
    method: &[u8],
    scheme: &[u8],
    authority: &[u8],
    path: &[u8],
) -> Result<(), BhttpError> {
    if !is_token(method) {
        return Err(BhttpError::Malformed("invalid method"));
    }
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(BhttpError::Malformed("invalid scheme"));
    }
    let visible = |bytes: &[u8]| bytes.iter().all(|&b| b.is_ascii_graphic());
    if !visible(authority) {
        return Err(BhttpError::Malformed("invalid authority"));
    }
    if !visible(path) {
        return Err(BhttpError::Malformed("invalid path"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Lengths of in-memory buffers always fit in a varint's 62 bits.
fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

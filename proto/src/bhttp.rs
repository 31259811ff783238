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

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::varint;

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

/// Bytes `Length (i), Bytes (n)` takes.
fn prefixed_len(n: usize) -> usize {
    varint::encoded_len(to_u64(n)).saturating_add(n)
}

/// Writes a varint and returns its length.
fn put_varint(out: &mut impl BufMut, value: u64) -> usize {
    varint::put(out, value);
    varint::encoded_len(value)
}

/// Writes `Length (i), Bytes (..)` and returns its length.
fn put_prefixed(out: &mut impl BufMut, bytes: &[u8]) -> usize {
    put_varint(out, to_u64(bytes.len()));
    out.put_slice(bytes);
    prefixed_len(bytes.len())
}

fn field_lines_len(fields: &[Field]) -> usize {
    fields
        .iter()
        .map(|f| prefixed_len(f.name.len()).saturating_add(prefixed_len(f.value.len())))
        .fold(0, usize::saturating_add)
}

/// Writes the field lines, names lowercased, and returns their length.
fn put_field_lines(out: &mut impl BufMut, fields: &[Field]) -> usize {
    for field in fields {
        if field.name.iter().any(u8::is_ascii_uppercase) {
            put_varint(out, to_u64(field.name.len()));
            field
                .name
                .iter()
                .for_each(|b| out.put_u8(b.to_ascii_lowercase()));
        } else {
            put_prefixed(out, &field.name);
        }
        put_prefixed(out, &field.value);
    }
    field_lines_len(fields)
}

fn request_control_len(head: &RequestHead) -> usize {
    [&head.method, &head.scheme, &head.authority, &head.path]
        .into_iter()
        .map(|part| prefixed_len(part.len()))
        .fold(0, usize::saturating_add)
}

fn put_request_control(out: &mut impl BufMut, head: &RequestHead) -> usize {
    [&head.method, &head.scheme, &head.authority, &head.path]
        .into_iter()
        .map(|part| put_prefixed(out, part))
        .fold(0, usize::saturating_add)
}

/// Length of a known-length message after its control data, without padding:
/// header section, content, and an empty trailer section.
fn known_length_tail_len(fields: &[Field], body_len: usize) -> usize {
    prefixed_len(field_lines_len(fields))
        .saturating_add(prefixed_len(body_len))
        .saturating_add(1)
}

fn put_known_length_tail(out: &mut impl BufMut, fields: &[Field], body: &[u8]) {
    put_varint(out, to_u64(field_lines_len(fields)));
    put_field_lines(out, fields);
    put_prefixed(out, body);
    put_varint(out, 0); // Empty trailer section.
}

fn pad(out: &mut Vec<u8>, padded_len: usize) {
    if out.len() < padded_len {
        out.resize(padded_len, 0);
    }
}

/// Length of [`encode_request`]'s output before padding, so a caller can pick the padded
/// size (see [`crate::padding::bucket`]) before encoding.
#[must_use]
pub fn encoded_request_len(head: &RequestHead, body_len: usize) -> usize {
    1usize
        .saturating_add(request_control_len(head))
        .saturating_add(known_length_tail_len(&head.fields, body_len))
}

/// Length of [`encode_response`]'s output before padding.
#[must_use]
pub fn encoded_response_len(head: &ResponseHead, body_len: usize) -> usize {
    1usize
        .saturating_add(varint::encoded_len(u64::from(head.status)))
        .saturating_add(known_length_tail_len(&head.fields, body_len))
}

/// Encodes a known-length request (framing indicator 0), zero-padded to at least
/// `padded_len` bytes in total.
pub fn encode_request(
    head: &RequestHead,
    body: &[u8],
    padded_len: usize,
) -> Result<Vec<u8>, BhttpError> {
    head.validate()?;
    let mut out = Vec::with_capacity(encoded_request_len(head, body.len()).max(padded_len));
    put_varint(&mut out, KNOWN_LENGTH_REQUEST);
    put_request_control(&mut out, head);
    put_known_length_tail(&mut out, &head.fields, body);
    pad(&mut out, padded_len);
    Ok(out)
}

/// Encodes a known-length response (framing indicator 1), zero-padded to at least
/// `padded_len` bytes in total. The status must be final (200..=599).
pub fn encode_response(
    head: &ResponseHead,
    body: &[u8],
    padded_len: usize,
) -> Result<Vec<u8>, BhttpError> {
    head.validate()?;
    let mut out = Vec::with_capacity(encoded_response_len(head, body.len()).max(padded_len));
    put_varint(&mut out, KNOWN_LENGTH_RESPONSE);
    put_varint(&mut out, u64::from(head.status));
    put_known_length_tail(&mut out, &head.fields, body);
    pad(&mut out, padded_len);
    Ok(out)
}

/// Incremental encoder of an indeterminate-length message, for bodies that are produced (and
/// must be sent) piece by piece. Every method appends to a caller's buffer, so a hot path can
/// reuse one `BytesMut` or `Vec<u8>`:
///
/// ```
/// # use tokengo_proto::bhttp::{ResponseHead, StreamingEncoder};
/// let mut out = Vec::new();
/// let head = ResponseHead { status: 200, fields: Vec::new() };
/// let mut encoder = StreamingEncoder::response(&head, &mut out)?;
/// encoder.body(b"data: {}\n\n", &mut out);
/// encoder.end(0, &mut out);
/// # Ok::<(), tokengo_proto::bhttp::BhttpError>(())
/// ```
///
/// [`end`](Self::end) takes the encoder by value, so nothing can be written after it.
#[derive(Debug)]
#[must_use = "an indeterminate-length message is complete only after `end`"]
pub struct StreamingEncoder {
    written: usize,
}

impl StreamingEncoder {
    /// Writes the start of a request (framing indicator 2): control data and header section.
    pub fn request(head: &RequestHead, out: &mut impl BufMut) -> Result<Self, BhttpError> {
        head.validate()?;
        let written = put_varint(out, INDETERMINATE_LENGTH_REQUEST)
            .saturating_add(put_request_control(out, head))
            .saturating_add(put_indeterminate_section(out, &head.fields));
        Ok(Self { written })
    }

    /// Writes the start of a response (framing indicator 3): final status and header
    /// section. The status must be final (200..=599).
    pub fn response(head: &ResponseHead, out: &mut impl BufMut) -> Result<Self, BhttpError> {
        head.validate()?;
        let written = put_varint(out, INDETERMINATE_LENGTH_RESPONSE)
            .saturating_add(put_varint(out, u64::from(head.status)))
            .saturating_add(put_indeterminate_section(out, &head.fields));
        Ok(Self { written })
    }

    /// Writes `data` as one content chunk. Empty data writes nothing: a zero-length chunk
    /// would end the content.
    pub fn body(&mut self, data: &[u8], out: &mut impl BufMut) {
        if !data.is_empty() {
            self.written = self.written.saturating_add(put_prefixed(out, data));
        }
    }

    /// Bytes of the message written so far.
    #[must_use]
    pub fn written(&self) -> usize {
        self.written
    }

    /// Ends the message: the content terminator, an empty trailer section, then zero padding
    /// until the whole message is at least `padded_len` bytes (0: no padding). The message is
    /// `written() + 2` bytes before padding.
    pub fn end(self, padded_len: usize, out: &mut impl BufMut) {
        out.put_u8(0); // Content terminator.
        out.put_u8(0); // Empty trailer section.
        let total = self.written.saturating_add(2);
        out.put_bytes(0, padded_len.saturating_sub(total));
    }
}

fn put_indeterminate_section(out: &mut impl BufMut, fields: &[Field]) -> usize {
    put_field_lines(out, fields).saturating_add(put_varint(out, 0))
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// What an incremental decoder produces, in this order: one `Head`, any number of `Body`
/// pieces (their boundaries carry no meaning), one `End`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<H> {
    /// Control data and header fields.
    Head(H),
    /// The next piece of content.
    Body(Bytes),
    /// The message is complete (the trailer section was read, or omitted as RFC 9292 allows).
    End,
}

/// Events of a [`RequestDecoder`].
pub type RequestEvent = Event<RequestHead>;
/// Events of a [`ResponseDecoder`].
pub type ResponseEvent = Event<ResponseHead>;

/// Incremental decoder of a request (framing indicator 0 or 2), fed from a `BytesMut` as
/// bytes arrive, like a tokio `Decoder`.
#[derive(Debug)]
pub struct RequestDecoder(Core<RequestHead>);

/// Incremental decoder of a response (framing indicator 1 or 3). Informational (1xx)
/// responses are validated and skipped.
#[derive(Debug)]
pub struct ResponseDecoder(Core<ResponseHead>);

macro_rules! decoder_api {
    ($decoder:ident, $head:ident) => {
        impl $decoder {
            /// A decoder that enforces `limits`.
            #[must_use]
            pub fn new(limits: Limits) -> Self {
                Self(Core::new(limits))
            }

            /// Consumes what it can from the front of `buf` and returns the next event, or
            /// `Ok(None)` when it needs more input. Body bytes are returned as soon as they
            /// arrive, split off `buf` without copying. After `End`, zero padding is consumed
            /// and anything else is an error. Errors are final: later calls repeat them.
            pub fn decode(
                &mut self,
                buf: &mut BytesMut,
            ) -> Result<Option<Event<$head>>, BhttpError> {
                self.0.decode(buf)
            }

            /// Like [`decode`](Self::decode), for when the input has ended: what remains
            /// must complete the message, except that RFC 9292 lets a message end right
            /// after its control data, header section or content when the rest is empty;
            /// the events for the omitted parts are produced here. `Ok(None)` once `End` has
            /// been returned; `Truncated` if the input ended anywhere else.
            pub fn decode_eof(
                &mut self,
                buf: &mut BytesMut,
            ) -> Result<Option<Event<$head>>, BhttpError> {
                self.0.decode_eof(buf)
            }

            /// `Ok` once `End` has been returned; `Truncated` before (or the decoder's error).
            pub fn finish(&self) -> Result<(), BhttpError> {
                self.0.finish()
            }
        }

        impl Default for $decoder {
            fn default() -> Self {
                Self::new(Limits::DEFAULT)
            }
        }
    };
}

decoder_api!(RequestDecoder, RequestHead);
decoder_api!(ResponseDecoder, ResponseHead);

/// Decodes a complete request (framing indicator 0 or 2; trailers are checked and dropped,
/// padding must be zero).
pub fn decode_request(msg: &[u8], limits: &Limits) -> Result<(RequestHead, Vec<u8>), BhttpError> {
    decode_message(msg, limits)
}

/// Decodes a complete response (framing indicator 1 or 3), skipping informational responses.
pub fn decode_response(msg: &[u8], limits: &Limits) -> Result<(ResponseHead, Vec<u8>), BhttpError> {
    decode_message(msg, limits)
}

/// One parser serves both whole messages and streams, so the two cannot disagree about what
/// a message means.
fn decode_message<H: Head>(mut input: &[u8], limits: &Limits) -> Result<(H, Vec<u8>), BhttpError> {
    let mut core = Core::<H>::new(*limits);
    let mut head = None;
    let mut body = Vec::new();
    loop {
        let event = match core.step(input)? {
            Some((used, output)) => {
                let (used, rest) = input.split_at_checked(used).ok_or(INTERNAL)?;
                input = rest;
                match output {
                    Output::Nothing => continue,
                    Output::Head(h) => Event::Head(h),
                    Output::Body => {
                        body.extend_from_slice(used);
                        continue;
                    }
                    Output::End => Event::End,
                }
            }
            None => match core.end_of_input(input.len())? {
                Some(event) => event,
                None => break,
            },
        };
        if let Event::Head(h) = event {
            head = Some(h);
        }
    }
    Ok((head.ok_or(INTERNAL)?, body))
}

/// Stands in for states the parser cannot reach; returned rather than panicking.
const INTERNAL: BhttpError = BhttpError::Malformed("decoder invariant violated");

/// What distinguishes requests from responses on the wire.
trait Head: Sized {
    const KNOWN_LENGTH: u64;
    const INDETERMINATE_LENGTH: u64;

    /// Parses control data at the front of `input`: `Ok(None)` if incomplete, else its
    /// length and the head (without fields), or `None` for an informational response.
    fn parse_control(
        input: &[u8],
        limits: &Limits,
    ) -> Result<Option<(usize, Option<Self>)>, BhttpError>;

    fn set_fields(&mut self, fields: Vec<Field>);
}

impl Head for RequestHead {
    const KNOWN_LENGTH: u64 = KNOWN_LENGTH_REQUEST;
    const INDETERMINATE_LENGTH: u64 = INDETERMINATE_LENGTH_REQUEST;

    fn parse_control(
        input: &[u8],
        limits: &Limits,
    ) -> Result<Option<(usize, Option<Self>)>, BhttpError> {
        let mut cursor = Cursor::new(input);
        let mut parts = [&[][..]; 4];
        for part in &mut parts {
            let Some(bytes) =
                cursor.prefixed(limits.max_field_section, BhttpError::FieldSectionTooLarge)?
            else {
                return Ok(None);
            };
            *part = bytes;
        }
        // Validated only once complete, so a slowly arriving head is not re-scanned.
        let [method, scheme, authority, path] = parts;
        check_control(method, scheme, authority, path)?;
        let head = Self {
            method: method.to_vec(),
            scheme: scheme.to_vec(),
            authority: authority.to_vec(),
            path: path.to_vec(),
            fields: Vec::new(),
        };
        Ok(Some((cursor.pos, Some(head))))
    }

    fn set_fields(&mut self, fields: Vec<Field>) {
        self.fields = fields;
    }
}

impl Head for ResponseHead {
    const KNOWN_LENGTH: u64 = KNOWN_LENGTH_RESPONSE;
    const INDETERMINATE_LENGTH: u64 = INDETERMINATE_LENGTH_RESPONSE;

    fn parse_control(
        input: &[u8],
        _: &Limits,
    ) -> Result<Option<(usize, Option<Self>)>, BhttpError> {
        let mut cursor = Cursor::new(input);
        let Some(status) = cursor.varint() else {
            return Ok(None);
        };
        let head = match u16::try_from(status) {
            Ok(100..=199) => None,
            Ok(status @ 200..=599) => Some(Self {
                status,
                fields: Vec::new(),
            }),
            _ => return Err(BhttpError::InvalidStatus(status)),
        };
        Ok(Some((cursor.pos, head)))
    }

    fn set_fields(&mut self, fields: Vec<Field>) {
        self.fields = fields;
    }
}

/// A read position in a byte slice. Reads return `None` when the input ends early.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let (value, len) = varint::peek(self.input.get(self.pos..)?).ok()?;
        self.pos = self.pos.saturating_add(len);
        Some(value)
    }

    /// Reads `Length (i), Bytes (..)`, whose end must lie within `limit` bytes of the
    /// cursor's start, or else fails with `over` as soon as the length is known.
    fn prefixed(&mut self, limit: usize, over: BhttpError) -> Result<Option<&'a [u8]>, BhttpError> {
        let Some(len) = self.varint() else {
            return Ok(None);
        };
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .filter(|&end| end <= limit)
            .ok_or(over)?;
        let Some(bytes) = self.input.get(self.pos..end) else {
            return Ok(None);
        };
        self.pos = end;
        Ok(Some(bytes))
    }
}

/// What one parser step consumed.
enum Output<H> {
    /// Framing only.
    Nothing,
    /// Framing that completed the head.
    Head(H),
    /// Content bytes: exactly the bytes consumed.
    Body,
    /// Framing that completed the message.
    End,
}

#[derive(Debug)]
enum State {
    Framing,
    Control,
    /// A header section: the final one when `Core::head` is set, else an informational one.
    Header(Section),
    /// Known-length content, before its length.
    ContentLength,
    /// Indeterminate-length content, before a chunk length or the terminator; `first` until
    /// a chunk has been read (only empty content may be omitted).
    ChunkLength {
        first: bool,
    },
    /// Inside content: bytes left in the known-length content or the current chunk.
    Content {
        remaining: u64,
    },
    Trailer(Section),
    /// `End` was produced; only zero padding may follow.
    Padding,
    Failed(BhttpError),
}

/// Progress through one field section.
#[derive(Debug, Default)]
struct Section {
    /// Known-length: the section bytes not yet read, once its length has been read.
    remaining: Option<usize>,
    /// Indeterminate-length: the section bytes read so far.
    used: usize,
    /// Field lines read so far.
    count: usize,
    /// The field lines, when kept (the final header section's).
    fields: Vec<Field>,
}

impl Section {
    /// Nothing of the section has been read, so the message may end here.
    fn untouched(&self) -> bool {
        self.remaining.is_none() && self.count == 0
    }

    /// Reads the next item: the length (known-length), a field line, or the terminator
    /// (indeterminate-length). Returns the bytes used and whether the section is complete.
    fn read(
        &mut self,
        input: &[u8],
        indeterminate: bool,
        limits: &Limits,
        keep: bool,
    ) -> Result<Option<(usize, bool)>, BhttpError> {
        if indeterminate {
            self.read_indeterminate(input, limits, keep)
        } else {
            self.read_known(input, limits, keep)
        }
    }

    fn read_known(
        &mut self,
        input: &[u8],
        limits: &Limits,
        keep: bool,
    ) -> Result<Option<(usize, bool)>, BhttpError> {
        let mut cursor = Cursor::new(input);
        let Some(remaining) = self.remaining else {
            let Some(len) = cursor.varint() else {
                return Ok(None);
            };
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= limits.max_field_section)
                .ok_or(BhttpError::FieldSectionTooLarge)?;
            self.remaining = Some(len);
            return Ok(Some((cursor.pos, len == 0)));
        };
        let over = BhttpError::Malformed("field line overruns its section");
        let Some(used) = self.field_line(input, remaining, over, limits, keep)? else {
            return Ok(None);
        };
        let remaining = remaining.checked_sub(used).ok_or(INTERNAL)?;
        self.remaining = Some(remaining);
        Ok(Some((used, remaining == 0)))
    }

    fn read_indeterminate(
        &mut self,
        input: &[u8],
        limits: &Limits,
        keep: bool,
    ) -> Result<Option<(usize, bool)>, BhttpError> {
        let mut cursor = Cursor::new(input);
        match cursor.varint() {
            None => return Ok(None),
            Some(0) => return Ok(Some((cursor.pos, true))),
            Some(_) => {}
        }
        let budget = limits.max_field_section.saturating_sub(self.used);
        let Some(used) = self.field_line(
            input,
            budget,
            BhttpError::FieldSectionTooLarge,
            limits,
            keep,
        )?
        else {
            return Ok(None);
        };
        self.used = self.used.saturating_add(used);
        Ok(Some((used, false)))
    }

    /// Reads one field line that must fit in `budget` bytes (else `over`).
    fn field_line(
        &mut self,
        input: &[u8],
        budget: usize,
        over: BhttpError,
        limits: &Limits,
        keep: bool,
    ) -> Result<Option<usize>, BhttpError> {
        if self.count >= limits.max_fields {
            return Err(BhttpError::TooManyFields);
        }
        let mut cursor = Cursor::new(input);
        let Some(name) = cursor.prefixed(budget, over.clone())? else {
            return Ok(None);
        };
        let Some(value) = cursor.prefixed(budget, over)? else {
            return Ok(None);
        };
        // Validated only once complete, so a slowly arriving field is not re-scanned.
        check_field(name, value)?;
        self.count = self.count.saturating_add(1);
        if keep {
            self.fields.push(Field {
                name: name.to_ascii_lowercase(),
                value: value.to_vec(),
            });
        }
        Ok(Some(cursor.pos))
    }
}

/// The parser behind both decoders and the whole-message functions. It works on a slice and
/// reports how many bytes each step used; the callers own the buffers.
#[derive(Debug)]
struct Core<H> {
    limits: Limits,
    indeterminate: bool,
    /// The final head while its header section is read; `None` during informational ones.
    head: Option<H>,
    state: State,
}

impl<H: Head> Core<H> {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            indeterminate: false,
            head: None,
            state: State::Framing,
        }
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event<H>>, BhttpError> {
        while let Some((used, output)) = self.step(buf)? {
            // `step` never reports more than it was given; `min` keeps that a non-panic.
            let used = used.min(buf.len());
            match output {
                Output::Nothing => buf.advance(used),
                Output::Head(head) => {
                    buf.advance(used);
                    return Ok(Some(Event::Head(head)));
                }
                Output::Body => return Ok(Some(Event::Body(buf.split_to(used).freeze()))),
                Output::End => {
                    buf.advance(used);
                    return Ok(Some(Event::End));
                }
            }
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Event<H>>, BhttpError> {
        match self.decode(buf)? {
            Some(event) => Ok(Some(event)),
            None => self.end_of_input(buf.len()),
        }
    }

    fn finish(&self) -> Result<(), BhttpError> {
        match &self.state {
            State::Padding => Ok(()),
            State::Failed(error) => Err(error.clone()),
            _ => Err(BhttpError::Truncated),
        }
    }

    /// One parser step over `input`: `Ok(None)` when it needs more, else the bytes used
    /// (at least one, at most `input.len()`) and what they were. Errors are sticky.
    fn step(&mut self, input: &[u8]) -> Result<Option<(usize, Output<H>)>, BhttpError> {
        let result = self.advance(input);
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
        }
        result
    }

    fn advance(&mut self, input: &[u8]) -> Result<Option<(usize, Output<H>)>, BhttpError> {
        let limits = self.limits;
        let indeterminate = self.indeterminate;
        let mut cursor = Cursor::new(input);
        match &mut self.state {
            State::Failed(error) => Err(error.clone()),
            State::Framing => {
                let Some(framing) = cursor.varint() else {
                    return Ok(None);
                };
                self.indeterminate = match framing {
                    f if f == H::KNOWN_LENGTH => false,
                    f if f == H::INDETERMINATE_LENGTH => true,
                    other => return Err(BhttpError::UnknownFraming(other)),
                };
                self.state = State::Control;
                Ok(Some((cursor.pos, Output::Nothing)))
            }
            State::Control => {
                let Some((used, head)) = H::parse_control(input, &limits)? else {
                    return Ok(None);
                };
                self.head = head;
                self.state = State::Header(Section::default());
                Ok(Some((used, Output::Nothing)))
            }
            State::Header(section) => {
                let keep = self.head.is_some();
                let Some((used, done)) = section.read(input, indeterminate, &limits, keep)? else {
                    return Ok(None);
                };
                if !done {
                    return Ok(Some((used, Output::Nothing)));
                }
                let fields = std::mem::take(&mut section.fields);
                Ok(Some((used, self.header_done(fields))))
            }
            State::ContentLength => {
                let Some(len) = cursor.varint() else {
                    return Ok(None);
                };
                if usize::try_from(len).map_or(true, |len| len > limits.max_body) {
                    return Err(BhttpError::BodyTooLarge);
                }
                self.state = Self::content(len);
                Ok(Some((cursor.pos, Output::Nothing)))
            }
            State::ChunkLength { .. } => {
                let Some(len) = cursor.varint() else {
                    return Ok(None);
                };
                self.state = Self::content(len);
                Ok(Some((cursor.pos, Output::Nothing)))
            }
            State::Content { remaining } => {
                if input.is_empty() {
                    return Ok(None);
                }
                let used = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                *remaining = remaining.saturating_sub(to_u64(used));
                if *remaining == 0 {
                    self.state = if indeterminate {
                        State::ChunkLength { first: false }
                    } else {
                        State::Trailer(Section::default())
                    };
                }
                Ok(Some((used, Output::Body)))
            }
            State::Trailer(section) => {
                let Some((used, done)) = section.read(input, indeterminate, &limits, false)? else {
                    return Ok(None);
                };
                if !done {
                    return Ok(Some((used, Output::Nothing)));
                }
                self.state = State::Padding;
                Ok(Some((used, Output::End)))
            }
            State::Padding => {
                if input.is_empty() {
                    return Ok(None);
                }
                if input.iter().any(|&b| b != 0) {
                    return Err(BhttpError::NonZeroPadding);
                }
                Ok(Some((input.len(), Output::Nothing)))
            }
        }
    }

    /// After a header section: the head is complete, or an informational response is over.
    fn header_done(&mut self, fields: Vec<Field>) -> Output<H> {
        match self.head.take() {
            Some(mut head) => {
                head.set_fields(fields);
                self.state = self.content_start();
                Output::Head(head)
            }
            None => {
                self.state = State::Control;
                Output::Nothing
            }
        }
    }

    fn content_start(&self) -> State {
        if self.indeterminate {
            State::ChunkLength { first: true }
        } else {
            State::ContentLength
        }
    }

    /// The state after a content or chunk length: a length of zero ends the content.
    fn content(len: u64) -> State {
        if len == 0 {
            State::Trailer(Section::default())
        } else {
            State::Content { remaining: len }
        }
    }

    /// The input has ended with `leftover` unusable bytes: produce what RFC 9292 §3.8 says
    /// the omitted parts mean, or fail.
    fn end_of_input(&mut self, leftover: usize) -> Result<Option<Event<H>>, BhttpError> {
        let result = self.truncate(leftover);
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
        }
        result
    }

    fn truncate(&mut self, leftover: usize) -> Result<Option<Event<H>>, BhttpError> {
        if let State::Failed(error) = &self.state {
            return Err(error.clone());
        }
        if leftover > 0 {
            // The parser stopped inside an item.
            return Err(BhttpError::Truncated);
        }
        match &self.state {
            State::Padding => Ok(None),
            // Omitted header section (allowed when content and trailers are omitted too).
            State::Header(section) if section.untouched() => match self.head.take() {
                Some(head) => {
                    self.state = self.content_start();
                    Ok(Some(Event::Head(head)))
                }
                // A response cannot end inside its informational responses.
                None => Err(BhttpError::Truncated),
            },
            // Omitted empty content (and trailers), or omitted trailers.
            State::ContentLength | State::ChunkLength { first: true } => self.omitted_end(),
            State::Trailer(section) if section.untouched() => self.omitted_end(),
            _ => Err(BhttpError::Truncated),
        }
    }

    fn omitted_end(&mut self) -> Result<Option<Event<H>>, BhttpError> {
        self.state = State::Padding;
        Ok(Some(Event::End))
    }
}

#[cfg(test)]
mod tests;

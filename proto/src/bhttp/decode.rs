//! Decoding Binary HTTP: push-style incremental decoders for both forms, and whole-message
//! decoding on top of them; every length checked against the limits before it is buffered.

use bytes::{Buf, Bytes, BytesMut};

use super::*;

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
pub(super) trait Head: Sized {
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
pub(super) struct Core<H> {
    limits: Limits,
    indeterminate: bool,
    /// The final head while its header section is read; `None` during informational ones.
    head: Option<H>,
    state: State,
}

impl<H: Head> Core<H> {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            indeterminate: false,
            head: None,
            state: State::Framing,
        }
    }

    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event<H>>, BhttpError> {
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

    pub(super) fn decode_eof(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Event<H>>, BhttpError> {
        match self.decode(buf)? {
            Some(event) => Ok(Some(event)),
            None => self.end_of_input(buf.len()),
        }
    }

    pub(super) fn finish(&self) -> Result<(), BhttpError> {
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

//! Encoding Binary HTTP: known-length messages whole (with their padding) and
//! indeterminate-length messages piece by piece ([`StreamingEncoder`]).

use bytes::BufMut;

use super::*;

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

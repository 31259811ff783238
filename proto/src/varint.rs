//! QUIC variable-length integers (RFC 9000 §16), the length encoding of every TokenGo,
//! Binary HTTP and chunked-OHTTP format.

use bytes::{Buf, BufMut};

/// The largest value a QUIC varint can carry (2^62 - 1).
pub const MAX: u64 = (1 << 62) - 1;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    /// The buffer ends inside the integer; more input may complete it.
    #[error("varint truncated")]
    Incomplete,
}

/// Number of bytes `value` takes when encoded (1, 2, 4 or 8).
///
/// Values above [`MAX`] are not representable; callers never produce them because every
/// length we encode is a `usize` bounded far below 2^62.
#[must_use]
pub fn encoded_len(value: u64) -> usize {
    match value {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        _ => 8,
    }
}

/// Appends `value` in its shortest encoding. Values above [`MAX`] are clamped to [`MAX`]
/// (unreachable for lengths of in-memory buffers).
pub fn put(buf: &mut impl BufMut, value: u64) {
    let value = value.min(MAX);
    match encoded_len(value) {
        1 => buf.put_u8(value as u8),
        2 => buf.put_u16(0x4000 | value as u16),
        4 => buf.put_u32(0x8000_0000 | value as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | value),
    }
}

/// Reads a varint from the front of `buf` without consuming it.
/// Returns the value and the number of bytes it occupies.
pub fn peek(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let first = *buf.first().ok_or(VarintError::Incomplete)?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Err(VarintError::Incomplete);
    }
    let mut value = u64::from(first & 0x3f);
    for byte in &buf[1..len] {
        value = (value << 8) | u64::from(*byte);
    }
    Ok((value, len))
}

/// Reads and consumes a varint from `buf`. On [`VarintError::Incomplete`] nothing is consumed.
pub fn get(buf: &mut impl Buf) -> Result<u64, VarintError> {
    let chunk = buf.chunk();
    let (value, len) = if chunk.len() >= 8 || chunk.len() == buf.remaining() {
        peek(chunk)?
    } else {
        // Non-contiguous buffer: copy at most 8 bytes to look at.
        let mut head = [0u8; 8];
        let n = buf.remaining().min(8);
        let mut probe = buf.chunk();
        let mut copied = 0;
        while copied < n && !probe.is_empty() {
            let take = probe.len().min(n - copied);
            head[copied..copied + take].copy_from_slice(&probe[..take]);
            copied += take;
            probe = &probe[take..];
        }
        peek(&head[..copied])?
    };
    buf.advance(len);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 §A.1 sample encodings.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(peek(bytes), Ok((value, bytes.len())));
            let mut out = Vec::new();
            put(&mut out, value);
            assert_eq!(out, bytes);
        }
        // A non-minimal encoding still decodes (RFC 9000 allows it).
        assert_eq!(peek(&[0x40, 0x25]), Ok((37, 2)));
    }

    #[test]
    fn incomplete_consumes_nothing() {
        let mut buf: &[u8] = &[0x9d, 0x7f];
        assert_eq!(get(&mut buf), Err(VarintError::Incomplete));
        assert_eq!(buf.len(), 2);
        assert_eq!(peek(&[]), Err(VarintError::Incomplete));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(value in 0u64..=MAX) {
            let mut out = Vec::new();
            put(&mut out, value);
            proptest::prop_assert_eq!(out.len(), encoded_len(value));
            let mut slice = &out[..];
            proptest::prop_assert_eq!(get(&mut slice), Ok(value));
            proptest::prop_assert!(slice.is_empty());
        }
    }
}

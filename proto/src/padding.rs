//! Size buckets that inner (Binary HTTP) messages are padded to before encapsulation.
//!
//! The relay cannot read a message, but it sees every ciphertext length, and OHTTP adds a
//! fixed overhead, so an unpadded request reveals its exact plaintext size: which endpoint
//! was called, how long the prompt was, often enough to tell requests apart. RFC 9292 §3.8
//! allows any number of trailing zero bytes, so we round every inner message up to one of a
//! few sizes. The relay then learns only the bucket.
//!
//! The buckets are powers of two from 256 bytes to 64 KiB, then multiples of 64 KiB. That
//! bounds the cost: a message of `len` bytes is padded to at most `max(256, 2 * len)` while it
//! is small, and by less than 64 KiB once it is large, where a doubling would waste
//! megabytes while hiding little (large transfers are told apart by timing anyway).

/// The smallest bucket: any message is padded to at least this many bytes.
pub const MIN_BUCKET: usize = 256;

/// The largest power-of-two bucket; above it buckets are multiples of this size.
pub const LARGE_STEP: usize = 64 * 1024;

/// The padded size for an inner message of `len` bytes: the smallest of 256 B, 512 B, 1 KiB,
/// ..., 64 KiB that holds `len`, and beyond 64 KiB the next multiple of 64 KiB.
///
/// The result is never below `len` (for lengths within 64 KiB of `usize::MAX`, which no
/// message reaches, it saturates at `usize::MAX`), and `bucket(bucket(len)) == bucket(len)`.
#[must_use]
pub fn bucket(len: usize) -> usize {
    if len <= MIN_BUCKET {
        MIN_BUCKET
    } else if len <= LARGE_STEP {
        // Cannot overflow: len <= 64 KiB.
        len.next_power_of_two()
    } else {
        len.checked_next_multiple_of(LARGE_STEP)
            .unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bucket_boundaries() {
        let cases = [
            (0, 256),
            (1, 256),
            (256, 256),
            (257, 512),
            (512, 512),
            (513, 1024),
            (1024, 1024),
            (1025, 2048),
            (4097, 8192),
            (16 * 1024 + 1, 32 * 1024),
            (32 * 1024 + 1, 64 * 1024),
            (64 * 1024, 64 * 1024),
            (64 * 1024 + 1, 128 * 1024),
            (128 * 1024, 128 * 1024),
            (128 * 1024 + 1, 192 * 1024),
            (10 * 1024 * 1024 + 7, 10 * 1024 * 1024 + 64 * 1024),
        ];
        for (len, expected) in cases {
            assert_eq!(bucket(len), expected, "bucket({len})");
        }
    }

    #[test]
    fn bucket_saturates_instead_of_overflowing() {
        assert_eq!(bucket(usize::MAX), usize::MAX);
        assert_eq!(bucket(usize::MAX - 1), usize::MAX);
    }

    proptest! {
        /// The bucket holds the message, costs at most 2x (or the 256-byte floor) for small
        /// messages and less than 64 KiB for large ones, and re-bucketing changes nothing.
        #[test]
        fn bucket_fits_with_bounded_overhead(len in 0usize..64 * 1024 * 1024) {
            let padded = bucket(len);
            prop_assert!(padded >= len);
            if len <= LARGE_STEP {
                prop_assert!(padded <= MIN_BUCKET.max(2 * len));
                prop_assert!(padded.is_power_of_two());
            } else {
                prop_assert!(padded - len < LARGE_STEP);
                prop_assert_eq!(padded % LARGE_STEP, 0);
            }
            prop_assert_eq!(bucket(padded), padded);
        }

        #[test]
        fn bucket_is_monotonic(a in 0usize..1 << 24, b in 0usize..1 << 24) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(bucket(lo) <= bucket(hi));
        }
    }
}

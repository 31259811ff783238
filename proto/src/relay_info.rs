//! Relay discovery messages without I/O: the DHT provider key relays announce under, and the
//! `/tokengo/relay-info/1` request and response a relay answers over libp2p.
//!
//! The public DHT only stores provider records ("this PeerId provides key K"), so everything
//! richer than a PeerId (the relay's QUIC addresses, ALPNs, the exits it hosts) is fetched from
//! the provider itself with this exchange. Nothing in a [`RelayInfo`] is trusted on its word:
//! QUIC addresses must name the provider's own PeerId (the TLS handshake then proves it) and
//! every exit descriptor carries its own signature, checked by the receiver.
//!
//! ```text
//! Relay Info Request  { Version (8) = 1 }
//! Relay Info Response {
//!   Version (8) = 1,
//!   Address Count (i), Address Count x { Length (i), Multiaddr (..) },  // binary multiaddrs
//!   ALPN Count (i),    ALPN Count x    { Length (i), ALPN (..) },
//!   Exit Count (i),    Exit Count x    { Length (i), Signed Descriptor (..) },
//! }
//! ```

use bytes::BufMut as _;
use sha2::{Digest as _, Sha256};

use crate::varint;

/// Version byte of both messages.
pub const VERSION: u8 = 1;
/// The libp2p protocol name of the exchange.
pub const PROTOCOL: &str = "/tokengo/relay-info/1";
/// The versioned namespace relays provide on the DHT. A new major version of the relay
/// protocol gets a new namespace, so old and new relays never mix in one lookup.
pub const RELAY_NAMESPACE: &str = "/tokengo/relay/v1";
/// Largest response accepted by default (a relay with many exits; descriptors are at most 16 KiB).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Most addresses, ALPNs or exits in one response.
pub const MAX_ENTRIES: usize = 1024;
/// Multihash code of sha2-256.
const SHA2_256: u8 = 0x12;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayInfoError {
    /// The message ends early.
    #[error("relay-info message is truncated")]
    Truncated,
    /// A version this code does not speak.
    #[error("relay-info version {0} is not supported")]
    UnknownVersion(u8),
    /// The message is larger than the receiver accepts.
    #[error("relay-info message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A list has more entries than allowed.
    #[error("relay-info list of {count} entries exceeds the limit of {max}")]
    TooMany {
        /// Entries announced.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// Bytes follow the last field.
    #[error("bytes after the end of the relay-info message")]
    Trailing,
}

/// The DHT key relays provide: the sha2-256 multihash (code 0x12, length 32) of `namespace`.
/// A multihash, not raw bytes, because go-libp2p-kad-dht casts provider keys to CIDs and drops
/// anything that is not one.
#[must_use]
pub fn provider_key(namespace: &str) -> Vec<u8> {
    let digest = Sha256::digest(namespace.as_bytes());
    let mut key = Vec::with_capacity(2 + digest.len());
    key.push(SHA2_256);
    key.push(32);
    key.extend_from_slice(&digest);
    key
}

/// The request: only a version, so a relay cannot be made to do work by its content.
#[must_use]
pub fn encode_request() -> Vec<u8> {
    vec![VERSION]
}

/// Checks a request.
pub fn decode_request(bytes: &[u8]) -> Result<(), RelayInfoError> {
    match bytes {
        [] => Err(RelayInfoError::Truncated),
        [VERSION] => Ok(()),
        [VERSION, ..] => Err(RelayInfoError::Trailing),
        [other, ..] => Err(RelayInfoError::UnknownVersion(*other)),
    }
}

/// What a relay says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayInfo {
    /// The relay's QUIC addresses as binary multiaddrs, each ending in `/p2p/<its PeerId>`.
    pub quic_addrs: Vec<Vec<u8>>,
    /// ALPNs its QUIC endpoint accepts (`tokengo/1`, `tokengo-exit/1`).
    pub alpns: Vec<Vec<u8>>,
    /// Signed descriptors of the exits registered with it now (verified by the receiver).
    pub exits: Vec<Vec<u8>>,
}

impl RelayInfo {
    /// Encodes the response.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        for list in [&self.quic_addrs, &self.alpns, &self.exits] {
            varint::put(&mut out, len_u64(list.len()));
            for item in list {
                varint::put(&mut out, len_u64(item.len()));
                out.put_slice(item);
            }
        }
        out
    }

    /// Decodes a complete response of at most `max_len` bytes.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Self, RelayInfoError> {
        if bytes.len() > max_len {
            return Err(RelayInfoError::TooLarge {
                len: bytes.len(),
                max: max_len,
            });
        }
        let (&version, mut rest) = bytes.split_first().ok_or(RelayInfoError::Truncated)?;
        if version != VERSION {
            return Err(RelayInfoError::UnknownVersion(version));
        }
        let quic_addrs = decode_list(&mut rest)?;
        let alpns = decode_list(&mut rest)?;
        let exits = decode_list(&mut rest)?;
        if !rest.is_empty() {
            return Err(RelayInfoError::Trailing);
        }
        Ok(Self {
            quic_addrs,
            alpns,
            exits,
        })
    }
}

fn decode_list(bytes: &mut &[u8]) -> Result<Vec<Vec<u8>>, RelayInfoError> {
    let count = varint::get(bytes).map_err(|_| RelayInfoError::Truncated)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| n <= MAX_ENTRIES)
        .ok_or(RelayInfoError::TooMany {
            count,
            max: MAX_ENTRIES,
        })?;
    // Every entry takes at least one byte, so the input bounds the allocation too.
    let mut items = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let len = varint::get(bytes).map_err(|_| RelayInfoError::Truncated)?;
        let len = usize::try_from(len).map_err(|_| RelayInfoError::Truncated)?;
        let (item, rest) = bytes
            .split_at_checked(len)
            .ok_or(RelayInfoError::Truncated)?;
        items.push(item.to_vec());
        *bytes = rest;
    }
    Ok(items)
}

/// Lengths of in-memory buffers always fit in a varint's 62 bits.
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_response_round_trips(
            quic_addrs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            alpns in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..4),
            exits in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..8),
        ) {
            let info = RelayInfo { quic_addrs, alpns, exits };
            prop_assert_eq!(RelayInfo::decode(&info.encode(), MAX_RESPONSE_BYTES).unwrap(), info);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RelayInfo::decode(&bytes, MAX_RESPONSE_BYTES);
            let _ = decode_request(&bytes);
        }
    }

    #[test]
    fn provider_key_is_the_sha256_multihash_of_the_namespace() {
        let key = provider_key(RELAY_NAMESPACE);
        assert_eq!(key.len(), 34);
        assert_eq!(&key[..2], &[0x12, 0x20]);
        assert_eq!(&key[2..], Sha256::digest(b"/tokengo/relay/v1").as_slice());
        assert_ne!(key, provider_key("/tokengo/relay/v2"));
    }

    #[test]
    fn response_round_trips() {
        let info = RelayInfo {
            quic_addrs: vec![vec![4, 127, 0, 0, 1], vec![]],
            alpns: vec![b"tokengo/1".to_vec(), b"tokengo-exit/1".to_vec()],
            exits: vec![vec![7; 300]],
        };
        let bytes = info.encode();
        assert_eq!(RelayInfo::decode(&bytes, MAX_RESPONSE_BYTES).unwrap(), info);
        let empty = RelayInfo::default();
        assert_eq!(
            RelayInfo::decode(&empty.encode(), MAX_RESPONSE_BYTES).unwrap(),
            empty
        );
    }

    #[test]
    fn decode_enforces_limits_and_shape() {
        let info = RelayInfo {
            exits: vec![vec![1; 100]],
            ..RelayInfo::default()
        };
        let bytes = info.encode();
        assert!(matches!(
            RelayInfo::decode(&bytes, 50),
            Err(RelayInfoError::TooLarge { .. })
        ));
        for cut in 0..bytes.len() {
            assert!(RelayInfo::decode(&bytes[..cut], MAX_RESPONSE_BYTES).is_err());
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            RelayInfo::decode(&trailing, MAX_RESPONSE_BYTES),
            Err(RelayInfoError::Trailing)
        );
        let mut other = bytes;
        other[0] = 2;
        assert_eq!(
            RelayInfo::decode(&other, MAX_RESPONSE_BYTES),
            Err(RelayInfoError::UnknownVersion(2))
        );
        // A count far beyond the limit is refused before any allocation.
        let mut huge = vec![VERSION];
        varint::put(&mut huge, 1 << 40);
        assert!(matches!(
            RelayInfo::decode(&huge, MAX_RESPONSE_BYTES),
            Err(RelayInfoError::TooMany { .. })
        ));
    }

    #[test]
    fn request_is_one_version_byte() {
        assert_eq!(decode_request(&encode_request()), Ok(()));
        assert_eq!(decode_request(&[]), Err(RelayInfoError::Truncated));
        assert_eq!(decode_request(&[9]), Err(RelayInfoError::UnknownVersion(9)));
        assert_eq!(decode_request(&[1, 0]), Err(RelayInfoError::Trailing));
    }
}

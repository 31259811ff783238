//! Exit discovery messages without I/O: the DHT provider key exits announce under, and the
//! `/tokengo/exit-info/1` request and response an exit answers over libp2p.
//!
//! An exit that announces itself lets clients learn it independently of any single relay. The
//! DHT stores only "this PeerId provides key K"; the exit itself then answers with its signed
//! descriptor and the relays it is registered with, the whole answer signed by the exit's
//! identity. So no relay and no DHT peer can add, drop or swap a relay in that list, or pair the
//! exit with another exit's keys; only the exit decides where it says it can be reached.
//!
//! ```text
//! Exit Info Request  { Version (8) = 1 }
//! Exit Info Response {
//!   Version (8) = 1,
//!   Issued At (i),                                         // Unix seconds
//!   Descriptor Length (i), Signed Descriptor (..),         // the exit's, as in descriptor.rs
//!   Relay Count (i), Relay Count x { Length (i), Multiaddr (..) },  // binary, with /p2p/
//!   Signature Length (i), Signature (..),
//! }
//! ```
//!
//! The signature is Ed25519 by the key the descriptor's PeerId names (an Ed25519 PeerId embeds
//! its public key) over `"tokengo-exit-info/1\0"` followed by every byte before Signature
//! Length. Lengths use their shortest encoding, so one answer has exactly one byte form.

use libp2p_identity::{Keypair, PeerId, PublicKey};

use crate::descriptor::{self, Descriptor, DescriptorError, SignedDescriptor};
use crate::relay_info::{self, RelayInfoError};
use crate::varint;

/// Version byte of both messages.
pub const VERSION: u8 = 1;
/// The libp2p protocol name of the exchange.
pub const PROTOCOL: &str = "/tokengo/exit-info/1";
/// The versioned namespace exits provide on the DHT (its key: [`provider_key`]).
pub const EXIT_NAMESPACE: &str = "/tokengo/exit/v1";
/// Domain separation: this signature can never pass for a descriptor's, a TLS certificate's
/// or a libp2p record's made with the same identity key.
pub const SIGNATURE_CONTEXT: &[u8] = b"tokengo-exit-info/1\0";
/// Most relays one answer may name (an exit registers with at most 16).
pub const MAX_RELAYS: usize = 32;
/// Longest relay multiaddr accepted, in bytes.
pub const MAX_RELAY_ADDR_LEN: usize = 256;
/// Largest answer: a descriptor at its limit plus [`MAX_RELAYS`] addresses at theirs, so a
/// hostile provider can make a seeker buffer at most this much.
pub const MAX_RESPONSE_BYTES: usize =
    descriptor::MAX_DESCRIPTOR_LEN + MAX_RELAYS * (MAX_RELAY_ADDR_LEN + 2) + 128;
/// An answer older than this is refused: the relay list it names may be long gone. Exits sign
/// on demand (see [`RESIGN_AFTER_SECS`]), so an honest answer is always far younger.
pub const MAX_AGE_SECS: u64 = 3600;
/// An exit re-signs its answer when it is older than this (and whenever its relays or its
/// descriptor change).
pub const RESIGN_AFTER_SECS: u64 = 600;
/// Multihash code of the identity hash, under which an Ed25519 PeerId carries its key.
const IDENTITY_MULTIHASH: u64 = 0x00;

/// Why an exit-info message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitInfoError {
    /// The message ends early.
    #[error("exit-info message is truncated")]
    Truncated,
    /// A version this code does not speak.
    #[error("exit-info version {0} is not supported")]
    UnknownVersion(u8),
    /// The message is larger than [`MAX_RESPONSE_BYTES`].
    #[error("exit-info message of {len} bytes exceeds the limit of {MAX_RESPONSE_BYTES}")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// More relays than [`MAX_RELAYS`], or a relay address longer than [`MAX_RELAY_ADDR_LEN`].
    #[error(
        "exit-info names too many relays or too long an address (at most {MAX_RELAYS} of {MAX_RELAY_ADDR_LEN} bytes)"
    )]
    TooMany,
    /// A length is not in its shortest encoding, or bytes follow the signature.
    #[error("exit-info is not in its canonical encoding: {0}")]
    NonCanonical(&'static str),
    /// The descriptor inside is refused (bad signature, expired, malformed...).
    #[error("exit-info descriptor: {0}")]
    Descriptor(#[from] DescriptorError),
    /// The descriptor's PeerId does not carry an Ed25519 key (or, when signing, the keypair is
    /// not the descriptor's identity).
    #[error("exit-info is not signed by the descriptor's identity")]
    WrongSigner,
    /// The signature does not verify: something in the answer was changed after signing.
    #[error("exit-info signature does not verify")]
    BadSignature,
    /// `issued_at` is older than [`MAX_AGE_SECS`].
    #[error("exit-info is stale (issued {age} s ago, at most {MAX_AGE_SECS} s accepted)")]
    Stale {
        /// Its age in seconds.
        age: u64,
    },
    /// `issued_at` lies more than the allowed clock skew in the future.
    #[error("exit-info issued in the future")]
    NotYetValid,
    /// The identity key failed to sign.
    #[error("signing failed")]
    SigningFailed,
}

/// The DHT key exits provide: the sha2-256 multihash of [`EXIT_NAMESPACE`].
#[must_use]
pub fn provider_key() -> Vec<u8> {
    relay_info::provider_key(EXIT_NAMESPACE)
}

/// The request: only a version, so an exit cannot be made to do work by its content.
#[must_use]
pub fn encode_request() -> Vec<u8> {
    vec![VERSION]
}

/// Checks a request.
pub fn decode_request(bytes: &[u8]) -> Result<(), ExitInfoError> {
    relay_info::decode_request(bytes).map_err(|e| match e {
        RelayInfoError::UnknownVersion(v) => ExitInfoError::UnknownVersion(v),
        RelayInfoError::Trailing => ExitInfoError::NonCanonical("bytes after the version"),
        _ => ExitInfoError::Truncated,
    })
}

/// What an exit says about itself, before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// When this answer was made (Unix seconds).
    pub issued_at: u64,
    /// The exit's signed descriptor (wire bytes).
    pub descriptor: Vec<u8>,
    /// The relays the exit is registered with now: binary QUIC multiaddrs ending in `/p2p/`.
    pub relays: Vec<Vec<u8>>,
}

/// An exit-info answer in its signed wire form.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedExitInfo {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for SignedExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedExitInfo")
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// An answer that verified: the descriptor's contents, its bytes, and the relays as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedExitInfo {
    /// When the exit signed it (Unix seconds).
    pub issued_at: u64,
    /// The descriptor, verified (signature, PeerId, validity window).
    pub descriptor: Descriptor,
    /// The descriptor's wire bytes, as the exit signed them.
    pub descriptor_bytes: Vec<u8>,
    /// The relays as the exit named them (binary multiaddrs, not yet parsed or judged by any
    /// address policy).
    pub relays: Vec<Vec<u8>>,
}

impl SignedExitInfo {
    /// Signs `info` with the exit's identity key, which must be the Ed25519 identity the
    /// descriptor names. The descriptor must verify at `info.issued_at` (an exit never vouches
    /// for a descriptor that was not valid when it signed); the verifier checks it again at its
    /// own time.
    pub fn sign(info: &ExitInfo, key: &Keypair) -> Result<Self, ExitInfoError> {
        check_relays(&info.relays)?;
        let signer = SignedDescriptor::verify(&info.descriptor, info.issued_at)?.peer_id;
        if key.public().to_peer_id() != signer || key.public().try_into_ed25519().is_err() {
            return Err(ExitInfoError::WrongSigner);
        }
        let mut bytes = vec![VERSION];
        varint::put(&mut bytes, info.issued_at);
        put_prefixed(&mut bytes, &info.descriptor);
        varint::put(&mut bytes, len_u64(info.relays.len()));
        for relay in &info.relays {
            put_prefixed(&mut bytes, relay);
        }
        let signature = key
            .sign(&signed_message(&bytes))
            .map_err(|_| ExitInfoError::SigningFailed)?;
        put_prefixed(&mut bytes, &signature);
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(ExitInfoError::TooLarge { len: bytes.len() });
        }
        Ok(Self { bytes })
    }

    /// Wraps received bytes after the cheap checks (size); [`verify`](Self::verify) does the
    /// rest.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ExitInfoError> {
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(ExitInfoError::TooLarge { len: bytes.len() });
        }
        Ok(Self { bytes })
    }

    /// The wire bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Verifies an answer at time `now_unix`: canonical framing within the limits, the
    /// descriptor (its own signature, PeerId and validity window), the answer's signature by
    /// the descriptor's identity, and its age (at most [`MAX_AGE_SECS`], not more than the
    /// descriptor's clock skew in the future). Whether the signer is the peer that answered
    /// is the caller's check (it knows who answered).
    pub fn verify(&self, now_unix: u64) -> Result<VerifiedExitInfo, ExitInfoError> {
        let bytes = self.bytes.as_slice();
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(ExitInfoError::TooLarge { len: bytes.len() });
        }
        let (&version, mut rest) = bytes.split_first().ok_or(ExitInfoError::Truncated)?;
        if version != VERSION {
            return Err(ExitInfoError::UnknownVersion(version));
        }
        let issued_at = take_varint(&mut rest)?;
        let descriptor_bytes = take_prefixed(&mut rest)?;
        let count = take_varint(&mut rest)?;
        if count > len_u64(MAX_RELAYS) {
            return Err(ExitInfoError::TooMany);
        }
        let mut relays = Vec::new();
        for _ in 0..count {
            relays.push(take_prefixed(&mut rest)?.to_vec());
        }
        check_relays(&relays)?;
        let signed_len = bytes.len() - rest.len();
        let signature = take_prefixed(&mut rest)?;
        if !rest.is_empty() {
            return Err(ExitInfoError::NonCanonical("bytes after the signature"));
        }
        let descriptor = SignedDescriptor::verify(descriptor_bytes, now_unix)?;
        let key = ed25519_key_of(&descriptor.peer_id).ok_or(ExitInfoError::WrongSigner)?;
        if !key.verify(&signed_message(&bytes[..signed_len]), signature) {
            return Err(ExitInfoError::BadSignature);
        }
        if issued_at > now_unix.saturating_add(descriptor::MAX_CLOCK_SKEW_SECS) {
            return Err(ExitInfoError::NotYetValid);
        }
        let age = now_unix.saturating_sub(issued_at);
        if age > MAX_AGE_SECS {
            return Err(ExitInfoError::Stale { age });
        }
        Ok(VerifiedExitInfo {
            issued_at,
            descriptor,
            descriptor_bytes: descriptor_bytes.to_vec(),
            relays,
        })
    }
}

/// The Ed25519 public key an Ed25519 PeerId embeds (identity multihash of its protobuf
/// encoding); `None` for PeerIds that hash their key.
fn ed25519_key_of(peer: &PeerId) -> Option<PublicKey> {
    let hash = peer.as_ref();
    if hash.code() != IDENTITY_MULTIHASH {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    key.clone().try_into_ed25519().ok()?;
    Some(key)
}

fn check_relays(relays: &[Vec<u8>]) -> Result<(), ExitInfoError> {
    if relays.len() > MAX_RELAYS || relays.iter().any(|r| r.len() > MAX_RELAY_ADDR_LEN) {
        return Err(ExitInfoError::TooMany);
    }
    Ok(())
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, body].concat()
}

fn put_prefixed(out: &mut Vec<u8>, item: &[u8]) {
    varint::put(out, len_u64(item.len()));
    out.extend_from_slice(item);
}

/// Reads a varint in its shortest encoding.
fn take_varint(input: &mut &[u8]) -> Result<u64, ExitInfoError> {
    let (value, len) = varint::peek(input).map_err(|_| ExitInfoError::Truncated)?;
    if len != varint::encoded_len(value) {
        return Err(ExitInfoError::NonCanonical("non-minimal varint"));
    }
    *input = input.get(len..).unwrap_or_default();
    Ok(value)
}

fn take_prefixed<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], ExitInfoError> {
    let len = take_varint(input)?;
    let len = usize::try_from(len).map_err(|_| ExitInfoError::Truncated)?;
    let (item, rest) = input
        .split_at_checked(len)
        .ok_or(ExitInfoError::Truncated)?;
    *input = rest;
    Ok(item)
}

/// Lengths of in-memory buffers always fit in a varint's 62 bits.
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_config::KeyConfig;
    use proptest::prelude::*;
    use sha2::{Digest as _, Sha256};

    const NOW: u64 = 1_750_000_000;

    fn keypair(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).unwrap()
    }

    fn descriptor(key: &Keypair, issued_at: u64, expires_at: u64) -> Vec<u8> {
        let desc = Descriptor {
            peer_id: key.public().to_peer_id(),
            key_configs: vec![KeyConfig {
                key_id: 1,
                public_key: [0x11; 32],
            }],
            models: vec!["gemma3-270m".into()],
            issued_at,
            expires_at,
            max_streams: 64,
            access_token_required: false,
        };
        SignedDescriptor::sign(&desc, key)
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn info(key: &Keypair) -> ExitInfo {
        ExitInfo {
            issued_at: NOW - 10,
            descriptor: descriptor(key, NOW - 60, NOW + 3600),
            relays: vec![b"/relay/a".to_vec(), b"/relay/b".to_vec()],
        }
    }

    fn signed(key: &Keypair) -> SignedExitInfo {
        SignedExitInfo::sign(&info(key), key).unwrap()
    }

    #[test]
    fn provider_key_is_the_sha256_multihash_of_the_exit_namespace() {
        let key = provider_key();
        assert_eq!(&key[..2], &[0x12, 0x20]);
        assert_eq!(&key[2..], Sha256::digest(b"/tokengo/exit/v1").as_slice());
        assert_ne!(key, relay_info::provider_key(relay_info::RELAY_NAMESPACE));
    }

    #[test]
    fn sign_verify_round_trip() {
        let key = keypair(1);
        let info = info(&key);
        let verified = SignedExitInfo::sign(&info, &key)
            .unwrap()
            .verify(NOW)
            .unwrap();
        assert_eq!(verified.issued_at, info.issued_at);
        assert_eq!(verified.descriptor_bytes, info.descriptor);
        assert_eq!(verified.descriptor.peer_id, key.public().to_peer_id());
        assert_eq!(verified.relays, info.relays);
        let none = ExitInfo {
            relays: Vec::new(),
            ..info
        };
        let verified = SignedExitInfo::sign(&none, &key)
            .unwrap()
            .verify(NOW)
            .unwrap();
        assert!(verified.relays.is_empty());
    }

    #[test]
    fn wire_layout_matches_the_specification() {
        let key = keypair(1);
        let info = info(&key);
        let bytes = signed(&key).as_bytes().to_vec();
        let mut expected = vec![VERSION];
        varint::put(&mut expected, info.issued_at);
        put_prefixed(&mut expected, &info.descriptor);
        expected.push(2);
        for relay in &info.relays {
            put_prefixed(&mut expected, relay);
        }
        assert_eq!(&bytes[..expected.len()], expected.as_slice());
        let mut signature = &bytes[expected.len()..];
        let signature = take_prefixed(&mut signature).unwrap();
        let mut message = b"tokengo-exit-info/1\0".to_vec();
        message.extend_from_slice(&expected);
        assert!(key.public().verify(&message, signature));
        assert!(!key.public().verify(&expected, signature));
    }

    #[test]
    fn any_tampered_byte_fails() {
        let key = keypair(1);
        let bytes = signed(&key).as_bytes().to_vec();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            assert!(
                SignedExitInfo { bytes: tampered }.verify(NOW).is_err(),
                "byte {i} tampered and still verifies"
            );
        }
        for cut in 0..bytes.len() {
            let short = SignedExitInfo {
                bytes: bytes[..cut].to_vec(),
            };
            assert!(short.verify(NOW).is_err());
        }
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(
            SignedExitInfo { bytes: longer }.verify(NOW),
            Err(ExitInfoError::NonCanonical("bytes after the signature"))
        );
    }

    #[test]
    fn a_changed_relay_list_breaks_the_signature() {
        let key = keypair(1);
        let honest = signed(&key);
        // Re-encode with one relay swapped and the old signature kept: what a relay or DHT
        // peer passing the answer on could try.
        let mut forged = info(&key);
        forged.relays[1] = b"/relay/c".to_vec();
        let other = SignedExitInfo::sign(&forged, &key).unwrap();
        let signature_at = other.as_bytes().len() - 65;
        let honest_signature = &honest.as_bytes()[honest.as_bytes().len() - 65..];
        let mut bytes = other.as_bytes()[..signature_at].to_vec();
        bytes.extend_from_slice(honest_signature);
        assert_eq!(
            SignedExitInfo { bytes }.verify(NOW),
            Err(ExitInfoError::BadSignature)
        );
    }

    #[test]
    fn only_the_descriptors_identity_can_sign() {
        let (a, b) = (keypair(1), keypair(2));
        assert_eq!(
            SignedExitInfo::sign(&info(&a), &b),
            Err(ExitInfoError::WrongSigner)
        );
        // B's signature over A's descriptor, assembled by hand: refused.
        let mut bytes = vec![VERSION];
        let info = info(&a);
        varint::put(&mut bytes, info.issued_at);
        put_prefixed(&mut bytes, &info.descriptor);
        varint::put(&mut bytes, 0);
        let signature = b.sign(&signed_message(&bytes)).unwrap();
        put_prefixed(&mut bytes, &signature);
        assert_eq!(
            SignedExitInfo { bytes }.verify(NOW),
            Err(ExitInfoError::BadSignature)
        );
    }

    #[test]
    fn stale_or_future_answers_and_expired_descriptors_are_refused() {
        let key = keypair(1);
        let answer = signed(&key);
        let issued = NOW - 10;
        assert!(answer.verify(issued + MAX_AGE_SECS).is_ok());
        assert_eq!(
            answer.verify(issued + MAX_AGE_SECS + 1),
            Err(ExitInfoError::Stale {
                age: MAX_AGE_SECS + 1
            })
        );
        assert!(
            answer
                .verify(issued - descriptor::MAX_CLOCK_SKEW_SECS)
                .is_ok()
        );
        assert_eq!(
            answer.verify(issued - descriptor::MAX_CLOCK_SKEW_SECS - 1),
            Err(ExitInfoError::NotYetValid)
        );
        // A fresh answer around a descriptor that has expired since.
        let stale_descriptor = ExitInfo {
            issued_at: NOW - 150,
            descriptor: descriptor(&key, NOW - 200, NOW - 100),
            relays: vec![b"/relay/a".to_vec()],
        };
        let answer = SignedExitInfo::sign(&stale_descriptor, &key).unwrap();
        assert_eq!(
            answer.verify(NOW),
            Err(ExitInfoError::Descriptor(DescriptorError::Expired))
        );
        // An exit does not vouch for a descriptor that was not valid when it signed.
        let later = ExitInfo {
            issued_at: NOW,
            ..stale_descriptor
        };
        assert_eq!(
            SignedExitInfo::sign(&later, &key),
            Err(ExitInfoError::Descriptor(DescriptorError::Expired))
        );
    }

    #[test]
    fn limits_are_enforced_on_both_sides() {
        let key = keypair(1);
        let mut many = info(&key);
        many.relays = vec![vec![1; 8]; MAX_RELAYS + 1];
        assert_eq!(
            SignedExitInfo::sign(&many, &key),
            Err(ExitInfoError::TooMany)
        );
        many.relays = vec![vec![1; MAX_RELAY_ADDR_LEN + 1]];
        assert_eq!(
            SignedExitInfo::sign(&many, &key),
            Err(ExitInfoError::TooMany)
        );
        many.relays = vec![vec![1; MAX_RELAY_ADDR_LEN]; MAX_RELAYS];
        let full = SignedExitInfo::sign(&many, &key).unwrap();
        assert!(full.as_bytes().len() <= MAX_RESPONSE_BYTES);
        assert_eq!(full.verify(NOW).unwrap().relays.len(), MAX_RELAYS);
        // A count far beyond the limit is refused before any allocation.
        let mut huge = vec![VERSION];
        varint::put(&mut huge, NOW);
        put_prefixed(&mut huge, &info(&key).descriptor);
        varint::put(&mut huge, 1 << 40);
        assert_eq!(
            SignedExitInfo { bytes: huge }.verify(NOW),
            Err(ExitInfoError::TooMany)
        );
        assert!(matches!(
            SignedExitInfo::from_bytes(vec![0; MAX_RESPONSE_BYTES + 1]),
            Err(ExitInfoError::TooLarge { .. })
        ));
        let mut other = signed(&key).as_bytes().to_vec();
        other[0] = 2;
        assert_eq!(
            SignedExitInfo { bytes: other }.verify(NOW),
            Err(ExitInfoError::UnknownVersion(2))
        );
    }

    #[test]
    fn non_minimal_lengths_are_refused() {
        let key = keypair(1);
        let bytes = signed(&key).as_bytes().to_vec();
        // Re-encode `issued_at` (an 8-byte varint) is minimal; pad the relay count (1 byte)
        // into two bytes instead.
        let info = info(&key);
        let mut prefix = vec![VERSION];
        varint::put(&mut prefix, info.issued_at);
        put_prefixed(&mut prefix, &info.descriptor);
        let mut padded = prefix.clone();
        padded.extend_from_slice(&[0x40, 0x02]);
        padded.extend_from_slice(&bytes[prefix.len() + 1..]);
        assert_eq!(
            SignedExitInfo { bytes: padded }.verify(NOW),
            Err(ExitInfoError::NonCanonical("non-minimal varint"))
        );
    }

    #[test]
    fn request_is_one_version_byte() {
        assert_eq!(decode_request(&encode_request()), Ok(()));
        assert_eq!(decode_request(&[]), Err(ExitInfoError::Truncated));
        assert_eq!(decode_request(&[9]), Err(ExitInfoError::UnknownVersion(9)));
        assert!(decode_request(&[1, 0]).is_err());
    }

    #[test]
    fn hashed_peer_ids_carry_no_key() {
        let rsa_like = PeerId::random();
        // `PeerId::random` makes an identity-less sha256 PeerId.
        assert!(ed25519_key_of(&rsa_like).is_none());
        let key = keypair(4);
        assert_eq!(
            ed25519_key_of(&key.public().to_peer_id()),
            Some(key.public())
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), now in any::<u64>()) {
            let _ = SignedExitInfo { bytes: bytes.clone() }.verify(now);
            let _ = decode_request(&bytes);
        }

        #[test]
        fn any_relay_list_round_trips(
            relays in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..6),
            age in 0..MAX_AGE_SECS,
        ) {
            let key = keypair(5);
            let info = ExitInfo { issued_at: NOW - age, descriptor: descriptor(&key, NOW - MAX_AGE_SECS, NOW + 60), relays };
            let verified = SignedExitInfo::sign(&info, &key).unwrap().verify(NOW).unwrap();
            prop_assert_eq!(verified.relays, info.relays);
            prop_assert_eq!(verified.issued_at, info.issued_at);
        }

        /// Random edits of a valid answer never panic and never verify.
        #[test]
        fn edits_never_verify(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)) {
            let key = keypair(3);
            let original = signed(&key).as_bytes().to_vec();
            let mut bytes = original.clone();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ => bytes.insert(i, byte),
                }
            }
            let result = SignedExitInfo { bytes: bytes.clone() }.verify(NOW);
            prop_assert!(result.is_err() || bytes == original);
        }
    }
}

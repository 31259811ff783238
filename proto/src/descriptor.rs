//! Exit descriptors: an exit's key configurations, models and capacity, signed with the exit's
//! Ed25519 identity key (ARCHITECTURE.md, "Signed descriptor").
//!
//! The signature is what stops a relay from swapping an exit's OHTTP keys: a client accepts
//! key configurations only from a descriptor whose signing key hashes to the exit's PeerId.
//!
//! ```text
//! Signed Descriptor {
//!   Public Key Length (i), Public Key (..),   // libp2p protobuf encoding of the Ed25519 key
//!   Body Length (i), Body (..),               // UTF-8 JSON
//!   Signature Length (i), Signature (..),     // Ed25519 over "tokengo-exit-descriptor/1\0" || Body
//! }
//! ```
//!
//! The body's `access_token_required` is optional: written (as `true`) only by an exit that
//! requires a group access token, absent otherwise, so descriptors of exits without tokens are
//! byte for byte what older exits sign and older clients read. An older client refuses a body
//! with the field (unknown fields are refused), which is what it should do: it has no token.
//!
//! Verification accepts exactly one encoding of a descriptor (minimal length prefixes, the
//! canonical key encoding, no trailing bytes), so equal descriptors have equal bytes.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::key_config::{KeyConfig, KeyConfigError};
use crate::varint;

/// Domain separation for the signature, so it can never be replayed as a signature over
/// anything else the identity key signs (TLS certificates, libp2p records).
pub const SIGNATURE_CONTEXT: &[u8] = b"tokengo-exit-descriptor/1\0";
/// Largest signed descriptor, in bytes.
pub const MAX_DESCRIPTOR_LEN: usize = 16 * 1024;
/// Most models a descriptor may list.
pub const MAX_MODELS: usize = 256;
/// How far in the future `issued_at` may lie, to tolerate clock skew between exit and verifier.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// The body format version this code writes and reads.
pub const BODY_VERSION: u64 = 1;

/// Why a descriptor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The descriptor is (or, when signing, would be) larger than [`MAX_DESCRIPTOR_LEN`].
    #[error("descriptor larger than {MAX_DESCRIPTOR_LEN} bytes")]
    TooLarge,
    /// The wire framing or the JSON body is malformed; the reason says how.
    #[error("malformed descriptor: {0}")]
    Malformed(&'static str),
    /// The signing key is not a valid Ed25519 key in libp2p's protobuf encoding.
    #[error("descriptor key is not an Ed25519 key")]
    UnsupportedKey,
    /// The signature does not verify over the body.
    #[error("descriptor signature does not verify")]
    BadSignature,
    /// The body's PeerId is not the signing key's (when signing: the keypair is not the
    /// descriptor's identity).
    #[error("descriptor PeerId does not match its signing key")]
    PeerIdMismatch,
    /// The body's `version` is not [`BODY_VERSION`].
    #[error("unsupported descriptor version {0}")]
    UnsupportedVersion(u64),
    /// `expires_at` has passed.
    #[error("descriptor expired")]
    Expired,
    /// `issued_at` lies more than [`MAX_CLOCK_SKEW_SECS`] in the future.
    #[error("descriptor issued in the future")]
    NotYetValid,
    /// The key configurations are unusable (none we support, or malformed).
    #[error("descriptor key configurations: {0}")]
    KeyConfigs(#[from] KeyConfigError),
    /// Two key configurations share a key id, so a request's key id would be ambiguous.
    #[error("duplicate key id {0}")]
    DuplicateKeyId(u8),
    /// More than [`MAX_MODELS`] models.
    #[error("more than {MAX_MODELS} models")]
    TooManyModels,
    /// The identity key failed to sign.
    #[error("signing failed")]
    SigningFailed,
}

/// What an exit announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The exit's identity; also its exit id.
    pub peer_id: PeerId,
    /// The OHTTP keys the exit accepts (current and, during rotation, previous).
    pub key_configs: Vec<KeyConfig>,
    /// Model names the exit's backend serves.
    pub models: Vec<String>,
    /// When the descriptor was issued (Unix seconds).
    pub issued_at: u64,
    /// When the descriptor stops being valid (Unix seconds, exclusive).
    pub expires_at: u64,
    /// Concurrent streams the exit accepts: a capacity hint.
    pub max_streams: u32,
    /// Requests must carry a group access token (inside the encrypted request); a client
    /// without one skips this exit.
    pub access_token_required: bool,
}

/// The JSON body, in the field order of the specification.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    version: u64,
    peer_id: String,
    /// Hex of the `application/ohttp-keys` list.
    key_configs: String,
    models: Vec<String>,
    issued_at: u64,
    expires_at: u64,
    max_streams: u32,
    /// Present (and `true`) only when a token is required: one encoding per descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_required: Option<bool>,
}

/// Just the body's version, read before the body is held to that version's format.
#[derive(Deserialize)]
struct Versioned {
    version: u64,
}

/// A descriptor in its signed wire form.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedDescriptor {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for SignedDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedDescriptor")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl SignedDescriptor {
    /// Signs `desc` with the exit's identity key, which must be Ed25519 and must be the
    /// identity `desc.peer_id` names. Refuses descriptors that [`verify`](Self::verify) would
    /// refuse for reasons other than time.
    pub fn sign(desc: &Descriptor, key: &Keypair) -> Result<Self, DescriptorError> {
        let public = key.public();
        if public.clone().try_into_ed25519().is_err() {
            return Err(DescriptorError::UnsupportedKey);
        }
        if public.to_peer_id() != desc.peer_id {
            return Err(DescriptorError::PeerIdMismatch);
        }
        check_contents(desc)?;
        let body = Body {
            version: BODY_VERSION,
            peer_id: desc.peer_id.to_base58(),
            key_configs: hex::encode(KeyConfig::encode_list(&desc.key_configs)),
            models: desc.models.clone(),
            issued_at: desc.issued_at,
            expires_at: desc.expires_at,
            max_streams: desc.max_streams,
            access_token_required: desc.access_token_required.then_some(true),
        };
        let body = serde_json::to_vec(&body).map_err(|_| DescriptorError::Malformed("body"))?;
        let signature = key
            .sign(&signed_message(&body))
            .map_err(|_| DescriptorError::SigningFailed)?;
        let bytes = encode_wire(&public.encode_protobuf(), &body, &signature);
        if bytes.len() > MAX_DESCRIPTOR_LEN {
            return Err(DescriptorError::TooLarge);
        }
        Ok(Self { bytes })
    }

    /// The wire bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The wire bytes, by value.
    #[must_use]
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Verifies a signed descriptor at time `now_unix` and returns its contents.
    ///
    /// The signature is checked before the body is parsed, so unauthenticated JSON is never
    /// interpreted. Then: the body's PeerId is the signing key's, the version is
    /// [`BODY_VERSION`], the descriptor has not expired and was not issued more than
    /// [`MAX_CLOCK_SKEW_SECS`] in the future, the key configurations are usable with distinct
    /// key ids, and there are at most [`MAX_MODELS`] models.
    pub fn verify(bytes: &[u8], now_unix: u64) -> Result<Descriptor, DescriptorError> {
        if bytes.len() > MAX_DESCRIPTOR_LEN {
            return Err(DescriptorError::TooLarge);
        }
        let wire = Wire::parse(bytes)?;
        let public = decode_public_key(wire.public_key)?;
        if !public.verify(&signed_message(wire.body), wire.signature) {
            return Err(DescriptorError::BadSignature);
        }
        // The version first, so a newer format is reported as such rather than as malformed.
        let Versioned { version } = serde_json::from_slice(wire.body)
            .map_err(|_| DescriptorError::Malformed("body is not the expected JSON"))?;
        if version != BODY_VERSION {
            return Err(DescriptorError::UnsupportedVersion(version));
        }
        let body: Body = serde_json::from_slice(wire.body)
            .map_err(|_| DescriptorError::Malformed("body is not the expected JSON"))?;
        let peer_id: PeerId = body
            .peer_id
            .parse()
            .map_err(|_| DescriptorError::Malformed("peer_id"))?;
        if peer_id != public.to_peer_id() {
            return Err(DescriptorError::PeerIdMismatch);
        }
        if body.access_token_required == Some(false) {
            return Err(DescriptorError::Malformed(
                "access_token_required is written only when true",
            ));
        }
        let key_configs = hex::decode(&body.key_configs)
            .map_err(|_| DescriptorError::Malformed("key_configs is not hex"))?;
        let desc = Descriptor {
            peer_id,
            key_configs: KeyConfig::decode_list(&key_configs)?,
            models: body.models,
            issued_at: body.issued_at,
            expires_at: body.expires_at,
            max_streams: body.max_streams,
            access_token_required: body.access_token_required == Some(true),
        };
        check_contents(&desc)?;
        check_time(&desc, now_unix)?;
        Ok(desc)
    }
}

/// The three length-prefixed parts of the wire form.
struct Wire<'a> {
    public_key: &'a [u8],
    body: &'a [u8],
    signature: &'a [u8],
}

impl<'a> Wire<'a> {
    fn parse(mut input: &'a [u8]) -> Result<Self, DescriptorError> {
        let public_key = take_prefixed(&mut input)?;
        let body = take_prefixed(&mut input)?;
        let signature = take_prefixed(&mut input)?;
        if !input.is_empty() {
            return Err(DescriptorError::Malformed("bytes after the signature"));
        }
        Ok(Self {
            public_key,
            body,
            signature,
        })
    }
}

/// Takes one `Length (i), Bytes (..)` item, requiring the shortest length encoding so the
/// wire form stays canonical.
fn take_prefixed<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], DescriptorError> {
    let (len, prefix) = varint::peek(input).map_err(|_| DescriptorError::Malformed("truncated"))?;
    if prefix != varint::encoded_len(len) {
        return Err(DescriptorError::Malformed("non-minimal length"));
    }
    let rest = input.get(prefix..).unwrap_or_default();
    let len = usize::try_from(len).map_err(|_| DescriptorError::Malformed("truncated"))?;
    let (item, rest) = rest
        .split_at_checked(len)
        .ok_or(DescriptorError::Malformed("truncated"))?;
    *input = rest;
    Ok(item)
}

fn encode_wire(public_key: &[u8], body: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(public_key.len() + body.len() + signature.len() + 12);
    for part in [public_key, body, signature] {
        varint::put(&mut out, u64::try_from(part.len()).unwrap_or(u64::MAX));
        out.extend_from_slice(part);
    }
    out
}

/// An Ed25519 key in libp2p's protobuf encoding, in its one canonical form.
fn decode_public_key(bytes: &[u8]) -> Result<PublicKey, DescriptorError> {
    let key = PublicKey::try_decode_protobuf(bytes).map_err(|_| DescriptorError::UnsupportedKey)?;
    if key.clone().try_into_ed25519().is_err() {
        return Err(DescriptorError::UnsupportedKey);
    }
    // Protobuf admits several encodings of one key; the PeerId hashes the canonical one.
    if key.encode_protobuf() != bytes {
        return Err(DescriptorError::Malformed(
            "non-canonical public key encoding",
        ));
    }
    Ok(key)
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, body].concat()
}

/// Checks that do not depend on the clock, shared by signing and verification.
fn check_contents(desc: &Descriptor) -> Result<(), DescriptorError> {
    if desc.key_configs.is_empty() {
        return Err(KeyConfigError::Empty.into());
    }
    for (i, config) in desc.key_configs.iter().enumerate() {
        if desc
            .key_configs
            .iter()
            .skip(i + 1)
            .any(|other| other.key_id == config.key_id)
        {
            return Err(DescriptorError::DuplicateKeyId(config.key_id));
        }
    }
    if desc.models.len() > MAX_MODELS {
        return Err(DescriptorError::TooManyModels);
    }
    if desc.expires_at <= desc.issued_at {
        return Err(DescriptorError::Malformed(
            "expires_at is not after issued_at",
        ));
    }
    Ok(())
}

fn check_time(desc: &Descriptor, now_unix: u64) -> Result<(), DescriptorError> {
    if now_unix >= desc.expires_at {
        return Err(DescriptorError::Expired);
    }
    if desc.issued_at > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(DescriptorError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_750_000_000;

    fn keypair(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).unwrap()
    }

    fn descriptor(key: &Keypair) -> Descriptor {
        Descriptor {
            peer_id: key.public().to_peer_id(),
            key_configs: vec![
                KeyConfig {
                    key_id: 1,
                    public_key: [0x11; 32],
                },
                KeyConfig {
                    key_id: 2,
                    public_key: [0x22; 32],
                },
            ],
            models: vec!["gemma3-270m".into(), "llama-3.1-8b".into()],
            issued_at: NOW - 60,
            expires_at: NOW + 3600,
            max_streams: 64,
            access_token_required: false,
        }
    }

    /// Builds a wire descriptor from raw parts, for bodies `sign` would never produce.
    fn sign_raw(key: &Keypair, public_key: &[u8], body: &str) -> Vec<u8> {
        let signature = key.sign(&signed_message(body.as_bytes())).unwrap();
        encode_wire(public_key, body.as_bytes(), &signature)
    }

    fn body_json(peer_id: &PeerId, extra: &str) -> String {
        let keys = hex::encode(KeyConfig::encode_list(&[KeyConfig {
            key_id: 1,
            public_key: [9; 32],
        }]));
        format!(
            r#"{{"version":1,"peer_id":"{peer_id}","key_configs":"{keys}","models":["m"],"issued_at":{},"expires_at":{},"max_streams":4{extra}}}"#,
            NOW - 1,
            NOW + 100
        )
    }

    #[test]
    fn sign_verify_round_trip() {
        let key = keypair(1);
        let desc = descriptor(&key);
        let signed = SignedDescriptor::sign(&desc, &key).unwrap();
        assert_eq!(
            SignedDescriptor::verify(signed.as_bytes(), NOW).unwrap(),
            desc
        );
    }

    #[test]
    fn wire_layout_matches_the_specification() {
        let key = keypair(1);
        let desc = descriptor(&key);
        let signed = SignedDescriptor::sign(&desc, &key).unwrap();
        let wire = Wire::parse(signed.as_bytes()).unwrap();
        assert_eq!(wire.public_key, key.public().encode_protobuf());
        let expected_body = format!(
            r#"{{"version":1,"peer_id":"{}","key_configs":"{}","models":["gemma3-270m","llama-3.1-8b"],"issued_at":{},"expires_at":{},"max_streams":64}}"#,
            desc.peer_id.to_base58(),
            hex::encode(KeyConfig::encode_list(&desc.key_configs)),
            desc.issued_at,
            desc.expires_at
        );
        assert_eq!(std::str::from_utf8(wire.body).unwrap(), expected_body);
        let mut message = b"tokengo-exit-descriptor/1\0".to_vec();
        message.extend_from_slice(wire.body);
        assert!(key.public().verify(&message, wire.signature));
        // Without the domain separator the signature is worthless.
        assert!(!key.public().verify(wire.body, wire.signature));
    }

    #[test]
    fn any_tampered_byte_fails() {
        let key = keypair(1);
        let signed = SignedDescriptor::sign(&descriptor(&key), &key)
            .unwrap()
            .into_bytes();
        // One flipped bit per byte: any change to the key, the lengths, the signed body or the
        // signature must fail (and Ed25519 is slow in debug builds).
        for i in 0..signed.len() {
            let mut tampered = signed.clone();
            tampered[i] ^= 0x01;
            assert!(
                SignedDescriptor::verify(&tampered, NOW).is_err(),
                "byte {i} tampered and still verifies"
            );
        }
        let mut longer = signed.clone();
        longer.push(0);
        assert_eq!(
            SignedDescriptor::verify(&longer, NOW),
            Err(DescriptorError::Malformed("bytes after the signature"))
        );
        for cut in 0..signed.len() {
            assert!(SignedDescriptor::verify(&signed[..cut], NOW).is_err());
        }
    }

    #[test]
    fn cannot_claim_another_identity() {
        let (a, b) = (keypair(1), keypair(2));
        let a_id = a.public().to_peer_id();
        // B signs a body naming A, presenting its own key: the PeerId binding fails.
        let forged = sign_raw(&b, &b.public().encode_protobuf(), &body_json(&a_id, ""));
        assert_eq!(
            SignedDescriptor::verify(&forged, NOW),
            Err(DescriptorError::PeerIdMismatch)
        );
        // B signs, presenting A's key: the signature fails.
        let forged = sign_raw(&b, &a.public().encode_protobuf(), &body_json(&a_id, ""));
        assert_eq!(
            SignedDescriptor::verify(&forged, NOW),
            Err(DescriptorError::BadSignature)
        );
        // And `sign` refuses to produce either.
        assert_eq!(
            SignedDescriptor::sign(&descriptor(&a), &b),
            Err(DescriptorError::PeerIdMismatch)
        );
        // The honest version of the same body verifies.
        let honest = sign_raw(&a, &a.public().encode_protobuf(), &body_json(&a_id, ""));
        assert_eq!(
            SignedDescriptor::verify(&honest, NOW).unwrap().peer_id,
            a_id
        );
    }

    #[test]
    fn validity_window() {
        let key = keypair(1);
        let desc = descriptor(&key);
        let signed = SignedDescriptor::sign(&desc, &key).unwrap();
        let bytes = signed.as_bytes();
        assert!(SignedDescriptor::verify(bytes, desc.expires_at - 1).is_ok());
        assert_eq!(
            SignedDescriptor::verify(bytes, desc.expires_at),
            Err(DescriptorError::Expired)
        );
        assert_eq!(
            SignedDescriptor::verify(bytes, u64::MAX),
            Err(DescriptorError::Expired)
        );
        let skewed = desc.issued_at - MAX_CLOCK_SKEW_SECS;
        assert!(SignedDescriptor::verify(bytes, skewed).is_ok());
        assert_eq!(
            SignedDescriptor::verify(bytes, skewed - 1),
            Err(DescriptorError::NotYetValid)
        );
        let backwards = Descriptor {
            expires_at: desc.issued_at,
            ..desc
        };
        assert_eq!(
            SignedDescriptor::sign(&backwards, &key),
            Err(DescriptorError::Malformed(
                "expires_at is not after issued_at"
            ))
        );
    }

    #[test]
    fn content_limits() {
        let key = keypair(1);
        let desc = descriptor(&key);
        let duplicate = Descriptor {
            key_configs: vec![desc.key_configs[0], desc.key_configs[0]],
            ..desc.clone()
        };
        assert_eq!(
            SignedDescriptor::sign(&duplicate, &key),
            Err(DescriptorError::DuplicateKeyId(1))
        );
        let none = Descriptor {
            key_configs: Vec::new(),
            ..desc.clone()
        };
        assert_eq!(
            SignedDescriptor::sign(&none, &key),
            Err(DescriptorError::KeyConfigs(KeyConfigError::Empty))
        );
        let many = Descriptor {
            models: vec!["m".into(); MAX_MODELS + 1],
            ..desc.clone()
        };
        assert_eq!(
            SignedDescriptor::sign(&many, &key),
            Err(DescriptorError::TooManyModels)
        );
        let max = Descriptor {
            models: vec!["m".into(); MAX_MODELS],
            ..desc.clone()
        };
        assert!(SignedDescriptor::sign(&max, &key).is_ok());
        let long = Descriptor {
            models: vec!["m".repeat(100); 200],
            ..desc
        };
        assert_eq!(
            SignedDescriptor::sign(&long, &key),
            Err(DescriptorError::TooLarge)
        );
        assert_eq!(
            SignedDescriptor::verify(&vec![0; MAX_DESCRIPTOR_LEN + 1], NOW),
            Err(DescriptorError::TooLarge)
        );
    }

    #[test]
    fn refuses_bodies_sign_would_not_write() {
        let key = keypair(1);
        let pk = key.public().encode_protobuf();
        let id = key.public().to_peer_id();
        let verify = |body: &str| SignedDescriptor::verify(&sign_raw(&key, &pk, body), NOW);

        assert_eq!(
            verify(&body_json(&id, r#","extra":1"#)),
            Err(DescriptorError::Malformed("body is not the expected JSON"))
        );
        let v2 = body_json(&id, r#","new_field":true"#).replace(r#""version":1"#, r#""version":2"#);
        assert_eq!(verify(&v2), Err(DescriptorError::UnsupportedVersion(2)));
        // Duplicate JSON keys would let two parsers read different values: refused.
        let twice = body_json(&id, r#","max_streams":5"#);
        assert_eq!(
            verify(&twice),
            Err(DescriptorError::Malformed("body is not the expected JSON"))
        );
        let bad_hex = body_json(&id, "").replace("key_configs\":\"", "key_configs\":\"zz");
        assert_eq!(
            verify(&bad_hex),
            Err(DescriptorError::Malformed("key_configs is not hex"))
        );
        let bad_id = body_json(&id, "").replace(&id.to_base58(), "not-a-peer-id");
        assert_eq!(verify(&bad_id), Err(DescriptorError::Malformed("peer_id")));
        assert!(verify(&body_json(&id, "")).is_ok());
    }

    #[test]
    fn access_token_required_is_optional_and_canonical() {
        let key = keypair(1);
        let pk = key.public().encode_protobuf();
        let id = key.public().to_peer_id();
        // A body without the field (every exit before it existed) means no token.
        let old = SignedDescriptor::verify(&sign_raw(&key, &pk, &body_json(&id, "")), NOW);
        assert!(!old.unwrap().access_token_required);
        let required = body_json(&id, r#","access_token_required":true"#);
        assert!(
            SignedDescriptor::verify(&sign_raw(&key, &pk, &required), NOW)
                .unwrap()
                .access_token_required
        );
        // `false` is written by omission only: one encoding per descriptor.
        let explicit = body_json(&id, r#","access_token_required":false"#);
        assert_eq!(
            SignedDescriptor::verify(&sign_raw(&key, &pk, &explicit), NOW),
            Err(DescriptorError::Malformed(
                "access_token_required is written only when true"
            ))
        );
        // Signing writes the field only when a token is required, and it round-trips.
        let open = SignedDescriptor::sign(&descriptor(&key), &key).unwrap();
        let body = Wire::parse(open.as_bytes()).unwrap().body.to_vec();
        assert!(!String::from_utf8(body).unwrap().contains("access_token"));
        let gated = Descriptor {
            access_token_required: true,
            ..descriptor(&key)
        };
        let signed = SignedDescriptor::sign(&gated, &key).unwrap();
        assert_eq!(
            SignedDescriptor::verify(signed.as_bytes(), NOW).unwrap(),
            gated
        );
    }

    #[test]
    fn refuses_non_ed25519_and_non_canonical_keys() {
        let key = keypair(1);
        let body = body_json(&key.public().to_peer_id(), "");
        // A secp256k1 key (KeyType 2) in libp2p's protobuf encoding.
        let mut secp = vec![0x08, 0x02, 0x12, 0x21, 0x02];
        secp.extend_from_slice(&[0x55; 32]);
        assert_eq!(
            SignedDescriptor::verify(&sign_raw(&key, &secp, &body), NOW),
            Err(DescriptorError::UnsupportedKey)
        );
        assert_eq!(
            SignedDescriptor::verify(&sign_raw(&key, b"garbage", &body), NOW),
            Err(DescriptorError::UnsupportedKey)
        );
        // The same key with its two protobuf fields swapped: valid protobuf, other bytes.
        let canonical = key.public().encode_protobuf();
        let mut swapped = canonical[2..].to_vec();
        swapped.extend_from_slice(&canonical[..2]);
        assert_eq!(
            SignedDescriptor::verify(&sign_raw(&key, &swapped, &body), NOW),
            Err(DescriptorError::Malformed(
                "non-canonical public key encoding"
            ))
        );
        // A two-byte encoding of a one-byte length.
        let honest = sign_raw(&key, &canonical, &body);
        let mut padded_len = vec![0x40];
        padded_len.extend_from_slice(&honest);
        assert_eq!(
            SignedDescriptor::verify(&padded_len, NOW),
            Err(DescriptorError::Malformed("non-minimal length"))
        );
    }

    proptest! {
        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), now in any::<u64>()) {
            let _ = SignedDescriptor::verify(&bytes, now);
        }

        /// Random edits of a valid descriptor never panic and never verify.
        #[test]
        fn edits_never_verify(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)) {
            let key = keypair(3);
            let original = SignedDescriptor::sign(&descriptor(&key), &key).unwrap().into_bytes();
            let mut bytes = original.clone();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ => bytes.insert(i, byte),
                }
            }
            let result = SignedDescriptor::verify(&bytes, NOW);
            prop_assert!(result.is_err() || bytes == original);
        }
    }
}

//! Oblivious HTTP (RFC 9458 §4): encapsulated requests and responses as single messages.
//!
//! A client seals a request to a gateway's [`KeyConfig`] with [`encapsulate_request`] and keeps
//! the [`ResponseOpener`] for the answer. A [`Gateway`] holds the key pairs it accepts (the
//! current one and, during rotation, the previous one), opens requests with
//! [`Gateway::decapsulate`] and answers through the returned [`ResponseSealer`].
//!
//! The error type is shared with [`crate::chunked`], which reuses the header, key lookup and
//! response key derivation defined here.

use std::{fmt, sync::Arc};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{
    hpke::{self, ENC_LEN, HpkeError, KEY_LEN, NONCE_LEN, ReceiverContext, SenderContext, TAG_LEN},
    key_config::{AEAD_AES_128_GCM, KDF_HKDF_SHA256, KEM_X25519_HKDF_SHA256, KeyConfig, KeyPair},
};

/// Length of the request header `hdr`: key id, KEM id, KDF id, AEAD id.
pub const REQUEST_HEADER_LEN: usize = 7;
/// Length of everything in front of the request ciphertext: `hdr || enc`.
pub const REQUEST_PREFIX_LEN: usize = REQUEST_HEADER_LEN + ENC_LEN;
/// Length of the response nonce, `max(Nn, Nk)`.
pub const RESPONSE_NONCE_LEN: usize = if NONCE_LEN > KEY_LEN {
    NONCE_LEN
} else {
    KEY_LEN
};
/// Length of the secret exported for the response: `Nk` in RFC 9458 §4.4, `max(Nn, Nk)` in the
/// chunked draft, the same 16 bytes for AES-128-GCM.
pub(crate) const RESPONSE_SECRET_LEN: usize = KEY_LEN;
const _: () = assert!(RESPONSE_SECRET_LEN == RESPONSE_NONCE_LEN);

const REQUEST_INFO: &[u8] = b"message/bhttp request";
const RESPONSE_LABEL: &[u8] = b"message/bhttp response";

/// The suite ids as they follow the key id in a request header.
const SUITE: [u8; REQUEST_HEADER_LEN - 1] = {
    let kem = KEM_X25519_HKDF_SHA256.to_be_bytes();
    let kdf = KDF_HKDF_SHA256.to_be_bytes();
    let aead = AEAD_AES_128_GCM.to_be_bytes();
    [kem[0], kem[1], kdf[0], kdf[1], aead[0], aead[1]]
};

/// Why an OHTTP message (single or chunked) could not be built or opened.
///
/// Only [`UnknownKey`](Self::UnknownKey) deserves a distinct answer to the peer (so it refreshes
/// its key configurations); every other failure to open should look the same from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OhttpError {
    /// The request names a key id the gateway does not hold (e.g. a rotated-out key). The key
    /// id is public, so it can be reported.
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    /// The request names an HPKE suite other than X25519 / HKDF-SHA256 / AES-128-GCM.
    #[error("unsupported HPKE suite")]
    UnsupportedSuite,
    /// The message ends before its structure does (header, nonce, chunk or tag).
    #[error("message truncated")]
    Truncated,
    /// The framing is invalid, e.g. a chunk too short to hold an AEAD tag.
    #[error("message malformed")]
    Malformed,
    /// A public key yields an all-zero Diffie-Hellman output: the key configuration's key on
    /// the client, the encapsulated key on the gateway.
    #[error("invalid public key")]
    InvalidPublicKey,
    /// The AEAD tag did not verify: the message was altered, reordered, or not for this key.
    #[error("decryption failed")]
    Decrypt,
    /// A message or chunk exceeds the size allowed (see
    /// [`MAX_CHUNK_CIPHERTEXT`](crate::chunked::MAX_CHUNK_CIPHERTEXT)).
    #[error("message or chunk too large")]
    TooLarge,
    /// The AEAD's message counter is spent; no further chunk may be sealed or opened.
    #[error("sequence number exhausted")]
    SequenceExhausted,
    /// A non-final chunk with an empty plaintext, which the chunked format forbids (a sender
    /// must not produce one; a receiver treats one as a decryption error).
    #[error("empty non-final chunk")]
    EmptyChunk,
    /// The stream ended at a chunk boundary without the final chunk: it was truncated.
    #[error("stream ended without its final chunk")]
    MissingFinalChunk,
    /// Data followed the final chunk.
    #[error("data after the final chunk")]
    TrailingData,
    /// A chunk was sealed after the final chunk.
    #[error("message already finished")]
    Finished,
    /// The response was started before the request header was read.
    #[error("request header not read yet")]
    NotReady,
}

impl From<HpkeError> for OhttpError {
    fn from(error: HpkeError) -> Self {
        match error {
            HpkeError::InvalidPublicKey => Self::InvalidPublicKey,
            HpkeError::Open => Self::Decrypt,
            HpkeError::MessageLimit => Self::SequenceExhausted,
            HpkeError::TooLarge | HpkeError::ExportTooLong => Self::TooLarge,
        }
    }
}

/// Encapsulates `request` (a Binary HTTP message) to the gateway key `config`, with a fresh
/// ephemeral key. Returns the encapsulated request and what opens the response.
pub fn encapsulate_request(
    config: &KeyConfig,
    request: &[u8],
) -> Result<(Vec<u8>, ResponseOpener), OhttpError> {
    seal_request(config, request, None)
}

/// [`encapsulate_request`] with a given ephemeral private key, to reproduce test vectors.
/// Never reuse an ephemeral key: production code calls [`encapsulate_request`].
pub fn encapsulate_request_with_ephemeral(
    config: &KeyConfig,
    ephemeral_secret: [u8; 32],
    request: &[u8],
) -> Result<(Vec<u8>, ResponseOpener), OhttpError> {
    seal_request(config, request, Some(ephemeral_secret))
}

fn seal_request(
    config: &KeyConfig,
    request: &[u8],
    ephemeral: Option<[u8; 32]>,
) -> Result<(Vec<u8>, ResponseOpener), OhttpError> {
    let (header, enc, mut context) = setup_client(config, REQUEST_INFO, ephemeral)?;
    let mut out = Vec::with_capacity(REQUEST_PREFIX_LEN + request.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(&enc);
    context.seal_append(b"", request, &mut out)?;
    let secret = export_response_secret(|out| context.export(RESPONSE_LABEL, out))?;
    Ok((out, ResponseOpener { secret, enc }))
}

/// The client's key to the response of one request.
pub struct ResponseOpener {
    secret: Zeroizing<[u8; RESPONSE_SECRET_LEN]>,
    enc: [u8; ENC_LEN],
}

impl ResponseOpener {
    /// Opens an encapsulated response (`response_nonce || ciphertext`).
    pub fn open(self, enc_response: &[u8]) -> Result<Vec<u8>, OhttpError> {
        let (nonce, ciphertext) = enc_response
            .split_first_chunk::<RESPONSE_NONCE_LEN>()
            .ok_or(OhttpError::Truncated)?;
        if ciphertext.len() < TAG_LEN {
            return Err(OhttpError::Truncated);
        }
        let mut aead = response_aead(&self.secret, &self.enc, nonce);
        Ok(aead.open(b"", ciphertext)?)
    }
}

impl fmt::Debug for ResponseOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseOpener").finish_non_exhaustive()
    }
}

/// An OHTTP gateway: the key pairs it accepts requests for.
///
/// During a rotation it holds the current and the previous key under distinct key ids. Cloning
/// is cheap (the keys are shared), so every connection task can own one.
#[derive(Clone)]
pub struct Gateway {
    keys: Arc<[KeyPair]>,
}

impl Gateway {
    /// A gateway for `keys`. Key ids should be distinct; if two keys share one, the first is
    /// used.
    #[must_use]
    pub fn new(keys: Vec<KeyPair>) -> Self {
        Self { keys: keys.into() }
    }

    /// The public configurations of all keys, to publish as `application/ohttp-keys`.
    #[must_use]
    pub fn key_configs(&self) -> Vec<KeyConfig> {
        self.keys.iter().map(KeyPair::config).collect()
    }

    /// Opens an encapsulated request. Returns the request and what seals the response.
    ///
    /// The key id is checked first, so a client holding a rotated-out key learns
    /// [`OhttpError::UnknownKey`] whatever else is wrong with its message.
    pub fn decapsulate(&self, enc_request: &[u8]) -> Result<(Vec<u8>, ResponseSealer), OhttpError> {
        let key = find_key(&self.keys, enc_request)?.ok_or(OhttpError::Truncated)?;
        let (header, rest) = enc_request
            .split_first_chunk::<REQUEST_HEADER_LEN>()
            .ok_or(OhttpError::Truncated)?;
        let (enc, ciphertext) = rest
            .split_first_chunk::<ENC_LEN>()
            .ok_or(OhttpError::Truncated)?;
        if ciphertext.len() < TAG_LEN {
            return Err(OhttpError::Truncated);
        }
        let mut context = accept(key, header, enc, REQUEST_INFO)?;
        let request = context.open(b"", ciphertext)?;
        let secret = export_response_secret(|out| context.export(RESPONSE_LABEL, out))?;
        Ok((request, ResponseSealer { secret, enc: *enc }))
    }

    pub(crate) fn keys(&self) -> &Arc<[KeyPair]> {
        &self.keys
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").field("keys", &self.keys).finish()
    }
}

/// The encapsulated key `enc` of an encapsulated request, chunked or not (both start with
/// `hdr || enc`), or `None` if the message is too short to hold one.
///
/// OHTTP has no replay protection of its own (RFC 9458 §6.5); `enc` is fresh for every honest
/// request, so a gateway can refuse an `enc` it has already seen within a bounded window. Record
/// it only after the request opened, so unauthenticated garbage cannot fill the window.
#[must_use]
pub fn enc_of(enc_request: &[u8]) -> Option<&[u8; ENC_LEN]> {
    enc_request
        .get(REQUEST_HEADER_LEN..REQUEST_PREFIX_LEN)?
        .try_into()
        .ok()
}

/// The gateway's means to answer one request.
pub struct ResponseSealer {
    secret: Zeroizing<[u8; RESPONSE_SECRET_LEN]>,
    enc: [u8; ENC_LEN],
}

impl ResponseSealer {
    /// Encapsulates `response` (a Binary HTTP message) under a fresh random response nonce:
    /// `response_nonce || ciphertext`.
    ///
    /// Fails only with [`OhttpError::TooLarge`] for a response beyond AES-GCM's limit of
    /// 2^36 - 32 bytes.
    pub fn seal(self, response: &[u8]) -> Result<Vec<u8>, OhttpError> {
        self.seal_with_nonce(random_response_nonce(), response)
    }

    /// [`seal`](Self::seal) with a given response nonce, to reproduce test vectors. A nonce
    /// must never repeat for the same request.
    pub fn seal_with_nonce(
        self,
        nonce: [u8; RESPONSE_NONCE_LEN],
        response: &[u8],
    ) -> Result<Vec<u8>, OhttpError> {
        let mut aead = response_aead(&self.secret, &self.enc, &nonce);
        let mut out = Vec::with_capacity(RESPONSE_NONCE_LEN + response.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        aead.seal_append(b"", response, &mut out)?;
        Ok(out)
    }

    /// Seals a response built in the caller's buffer, so a large response exists once in
    /// memory: `out[start..start + RESPONSE_NONCE_LEN]` is room for the response nonce (a
    /// fresh random one is written there), the Binary HTTP message follows it and is
    /// encrypted where it lies, and the tag is appended. The result from `start` on is what
    /// [`seal`](Self::seal) returns for the same message and nonce.
    ///
    /// Fails with [`OhttpError::TooLarge`] when there is no room for the nonce or the
    /// response is beyond AES-GCM's limit; `out` is then unchanged.
    pub fn seal_in_place(self, out: &mut Vec<u8>, start: usize) -> Result<(), OhttpError> {
        self.seal_in_place_with_nonce(random_response_nonce(), out, start)
    }

    fn seal_in_place_with_nonce(
        self,
        nonce: [u8; RESPONSE_NONCE_LEN],
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), OhttpError> {
        let message_start = start
            .checked_add(RESPONSE_NONCE_LEN)
            .filter(|end| *end <= out.len())
            .ok_or(OhttpError::TooLarge)?;
        let mut aead = response_aead(&self.secret, &self.enc, &nonce);
        aead.seal_in_place(b"", out, message_start)?;
        out[start..message_start].copy_from_slice(&nonce);
        Ok(())
    }
}

impl fmt::Debug for ResponseSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseSealer").finish_non_exhaustive()
    }
}

/// Sets up the client's HPKE context for a request to `config` under the info label `label`:
/// returns `hdr`, `enc` and the context. `ephemeral` is `None` (a fresh key) except to
/// reproduce test vectors.
pub(crate) fn setup_client(
    config: &KeyConfig,
    label: &[u8],
    ephemeral: Option<[u8; 32]>,
) -> Result<([u8; REQUEST_HEADER_LEN], [u8; ENC_LEN], SenderContext), OhttpError> {
    let header = request_header(config.key_id);
    let info = request_info(label, &header);
    let (enc, context) = match ephemeral {
        Some(secret) => hpke::setup_sender_with_ephemeral(&config.public_key, &info, secret),
        None => hpke::setup_sender(&config.public_key, &info),
    }?;
    Ok((header, enc, context))
}

/// `hdr` (RFC 9458 §4.3): the key id and our suite ids.
pub(crate) fn request_header(key_id: u8) -> [u8; REQUEST_HEADER_LEN] {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    header[0] = key_id;
    header[1..].copy_from_slice(&SUITE);
    header
}

/// `info = label || 0x00 || hdr`.
pub(crate) fn request_info(label: &[u8], header: &[u8; REQUEST_HEADER_LEN]) -> Vec<u8> {
    let mut info = Vec::with_capacity(label.len() + 1 + REQUEST_HEADER_LEN);
    info.extend_from_slice(label);
    info.push(0);
    info.extend_from_slice(header);
    info
}

/// Checks as much of a request header as `prefix` holds, in the order a reader meets it: the
/// key id (so an unknown key is reported from the first byte), then the suite. Returns the key
/// once the key id is known.
pub(crate) fn find_key<'k>(
    keys: &'k [KeyPair],
    prefix: &[u8],
) -> Result<Option<&'k KeyPair>, OhttpError> {
    let Some(&key_id) = prefix.first() else {
        return Ok(None);
    };
    let key = keys
        .iter()
        .find(|key| key.key_id() == key_id)
        .ok_or(OhttpError::UnknownKey(key_id))?;
    if prefix
        .get(1..REQUEST_HEADER_LEN)
        .is_some_and(|suite| suite != SUITE)
    {
        return Err(OhttpError::UnsupportedSuite);
    }
    Ok(Some(key))
}

/// Sets up the HPKE receiver for a complete `hdr || enc`, whose `hdr` gave `key` through
/// [`find_key`].
pub(crate) fn accept(
    key: &KeyPair,
    header: &[u8; REQUEST_HEADER_LEN],
    enc: &[u8; ENC_LEN],
    label: &[u8],
) -> Result<ReceiverContext, OhttpError> {
    let info = request_info(label, header);
    Ok(hpke::setup_receiver(key.private_key(), enc, &info)?)
}

/// Exports the response secret from an HPKE context.
pub(crate) fn export_response_secret(
    export: impl FnOnce(&mut [u8]) -> Result<(), HpkeError>,
) -> Result<Zeroizing<[u8; RESPONSE_SECRET_LEN]>, OhttpError> {
    let mut secret = Zeroizing::new([0u8; RESPONSE_SECRET_LEN]);
    export(&mut secret[..])?;
    Ok(secret)
}

pub(crate) fn random_response_nonce() -> [u8; RESPONSE_NONCE_LEN] {
    let mut nonce = [0u8; RESPONSE_NONCE_LEN];
    hpke::fill_random(&mut nonce);
    nonce
}

/// The response AEAD (RFC 9458 §4.4, reused by chunked OHTTP):
/// `prk = Extract(enc || response_nonce, secret)`, `key = Expand(prk, "key", Nk)`,
/// `nonce = Expand(prk, "nonce", Nn)`.
pub(crate) fn response_aead(
    secret: &[u8; RESPONSE_SECRET_LEN],
    enc: &[u8; ENC_LEN],
    response_nonce: &[u8; RESPONSE_NONCE_LEN],
) -> hpke::SequencedAead {
    let (key, nonce) = response_key_material(secret, enc, response_nonce);
    hpke::SequencedAead::new(&key, nonce)
}

/// The response AEAD's key and base nonce; [`response_aead`] without the cipher.
pub(crate) fn response_key_material(
    secret: &[u8; RESPONSE_SECRET_LEN],
    enc: &[u8; ENC_LEN],
    response_nonce: &[u8; RESPONSE_NONCE_LEN],
) -> (Zeroizing<[u8; KEY_LEN]>, [u8; NONCE_LEN]) {
    let mut salt = [0u8; ENC_LEN + RESPONSE_NONCE_LEN];
    salt[..ENC_LEN].copy_from_slice(enc);
    salt[ENC_LEN..].copy_from_slice(response_nonce);
    let prk = Hkdf::<Sha256>::new(Some(&salt), secret);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    let mut nonce = [0u8; NONCE_LEN];
    // Cannot fail: HKDF-SHA256 expands up to 8160 bytes.
    let expanded = prk
        .expand(b"key", &mut key[..])
        .and_then(|()| prk.expand(b"nonce", &mut nonce));
    debug_assert!(expanded.is_ok());
    (key, nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hex_str: &str) -> Vec<u8> {
        hex::decode(hex_str.replace([' ', '\n'], "")).unwrap()
    }

    fn a<const N: usize>(hex_str: &str) -> [u8; N] {
        h(hex_str).try_into().unwrap()
    }

    // RFC 9458 Appendix A.
    const SK_R: &str = "3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a";
    const KEY_CONFIG: &str = "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003";
    const REQUEST: &str = "00034745540568747470730b6578616d706c652e636f6d012f";
    const SK_E: &str = "bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73";
    const PK_E: &str = "4b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b472";
    const INFO: &str = "6d6573736167652f626874747020726571756573740001002000010001";
    const ENC_REQUEST: &str = "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad1\
                               9dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e796\
                               5e7d86b83dd440b2c0185204b4d63525";
    const RESPONSE: &str = "0140c8";
    const SECRET: &str = "62d87a6ba569ee81014c2641f52bea36";
    const RESPONSE_NONCE: &str = "c789e7151fcba46158ca84b04464910d";
    const AEAD_KEY: &str = "5d0172a080e428b16d298c4ea0db620d";
    const AEAD_NONCE: &str = "f6bf1aeb88d6df87007fa263";
    const ENC_RESPONSE: &str =
        "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd";

    fn rfc_gateway() -> Gateway {
        Gateway::new(vec![KeyPair::from_secret(1, a(SK_R))])
    }

    #[test]
    fn rfc9458_appendix_a() {
        let config = KeyConfig::decode(&h(KEY_CONFIG)).unwrap();
        let gateway = rfc_gateway();
        assert_eq!(gateway.key_configs(), [config]);
        assert_eq!(request_info(REQUEST_INFO, &request_header(1)), h(INFO));

        // Client: the encapsulated request, byte for byte.
        let (enc_request, opener) =
            encapsulate_request_with_ephemeral(&config, a(SK_E), &h(REQUEST)).unwrap();
        assert_eq!(hex::encode(&enc_request), ENC_REQUEST);
        assert_eq!(enc_of(&enc_request), Some(&a(PK_E)));
        assert_eq!(*opener.secret, a(SECRET));

        // Gateway: opens it and derives the same response secret and keys.
        let (request, sealer) = gateway.decapsulate(&enc_request).unwrap();
        assert_eq!(request, h(REQUEST));
        assert_eq!(*sealer.secret, a(SECRET));
        let (key, nonce) = response_key_material(&sealer.secret, &sealer.enc, &a(RESPONSE_NONCE));
        assert_eq!(*key, a(AEAD_KEY));
        assert_eq!(nonce, a(AEAD_NONCE));

        let enc_response = sealer
            .seal_with_nonce(a(RESPONSE_NONCE), &h(RESPONSE))
            .unwrap();
        assert_eq!(hex::encode(&enc_response), ENC_RESPONSE);
        assert_eq!(opener.open(&enc_response).unwrap(), h(RESPONSE));
    }

    #[test]
    fn a_response_sealed_in_place_matches_the_rfc_vector() {
        let gateway = rfc_gateway();
        let config = gateway.key_configs()[0];
        let (enc_request, opener) =
            encapsulate_request_with_ephemeral(&config, a(SK_E), &h(REQUEST)).unwrap();
        let (_, sealer) = gateway.decapsulate(&enc_request).unwrap();
        // Framing in front (a status byte), room for the nonce, then the message.
        let mut out = vec![0x00];
        out.extend_from_slice(&[0; RESPONSE_NONCE_LEN]);
        out.extend_from_slice(&h(RESPONSE));
        sealer
            .seal_in_place_with_nonce(a(RESPONSE_NONCE), &mut out, 1)
            .unwrap();
        assert_eq!(out[0], 0x00, "bytes before `start` are left alone");
        assert_eq!(hex::encode(&out[1..]), ENC_RESPONSE);
        assert_eq!(opener.open(&out[1..]).unwrap(), h(RESPONSE));
    }

    #[test]
    fn sealing_in_place_without_room_for_the_nonce_changes_nothing() {
        let gateway = Gateway::new(vec![KeyPair::from_seed(9, &[4; 32])]);
        let (enc_request, _) = encapsulate_request(&gateway.key_configs()[0], b"r").unwrap();
        let (_, sealer) = gateway.decapsulate(&enc_request).unwrap();
        let mut out = vec![7; RESPONSE_NONCE_LEN - 1];
        assert!(matches!(
            sealer.seal_in_place(&mut out, 0),
            Err(OhttpError::TooLarge)
        ));
        assert_eq!(out, vec![7; RESPONSE_NONCE_LEN - 1]);
    }

    #[test]
    fn round_trip_with_random_ephemeral_and_nonce() {
        let gateway = Gateway::new(vec![KeyPair::from_seed(9, &[4; 32])]);
        let config = gateway.key_configs()[0];
        let (enc_request, opener) = encapsulate_request(&config, b"request").unwrap();
        let (again, _) = encapsulate_request(&config, b"request").unwrap();
        assert_ne!(
            enc_of(&enc_request),
            enc_of(&again),
            "a fresh ephemeral key every time"
        );
        let (request, sealer) = gateway.decapsulate(&enc_request).unwrap();
        assert_eq!(request, b"request");
        let enc_response = sealer.seal(b"").unwrap();
        assert_eq!(enc_response.len(), RESPONSE_NONCE_LEN + TAG_LEN);
        assert_eq!(opener.open(&enc_response).unwrap(), b"");
    }

    #[test]
    fn key_rotation_and_unknown_key() {
        let previous = KeyPair::from_seed(1, &[1; 32]);
        let current = KeyPair::from_seed(2, &[2; 32]);
        let (old_config, new_config) = (previous.config(), current.config());
        let gateway = Gateway::new(vec![current, previous]);
        for config in [old_config, new_config] {
            let (enc_request, _) = encapsulate_request(&config, b"hi").unwrap();
            assert_eq!(gateway.decapsulate(&enc_request).unwrap().0, b"hi");
        }
        let retired = KeyPair::from_seed(3, &[3; 32]).config();
        let (enc_request, _) = encapsulate_request(&retired, b"hi").unwrap();
        assert_eq!(
            gateway.decapsulate(&enc_request).err(),
            Some(OhttpError::UnknownKey(3))
        );
        // The key id is checked before anything else, even on a one-byte message.
        assert_eq!(
            gateway.decapsulate(&[3]).err(),
            Some(OhttpError::UnknownKey(3))
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let gateway = rfc_gateway();
        let good = h(ENC_REQUEST);
        assert_eq!(gateway.decapsulate(&[]).err(), Some(OhttpError::Truncated));
        for len in 1..REQUEST_PREFIX_LEN + TAG_LEN {
            assert_eq!(
                gateway.decapsulate(&good[..len]).err(),
                Some(OhttpError::Truncated)
            );
        }
        for (index, expected) in [
            (2, OhttpError::UnsupportedSuite),
            (4, OhttpError::UnsupportedSuite),
            (6, OhttpError::UnsupportedSuite),
            (10, OhttpError::Decrypt),
            (50, OhttpError::Decrypt),
            (good.len() - 1, OhttpError::Decrypt),
        ] {
            let mut bad = good.clone();
            bad[index] ^= 0x02;
            assert_eq!(
                gateway.decapsulate(&bad).err(),
                Some(expected),
                "byte {index}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            gateway.decapsulate(&longer).err(),
            Some(OhttpError::Decrypt)
        );
        let mut zero_enc = good;
        zero_enc[REQUEST_HEADER_LEN..REQUEST_PREFIX_LEN].fill(0);
        assert_eq!(
            gateway.decapsulate(&zero_enc).err(),
            Some(OhttpError::InvalidPublicKey)
        );
    }

    #[test]
    fn rejects_bad_responses() {
        let config = KeyConfig::decode(&h(KEY_CONFIG)).unwrap();
        let open = |response: &[u8]| {
            let (_, opener) =
                encapsulate_request_with_ephemeral(&config, a(SK_E), &h(REQUEST)).unwrap();
            opener.open(response)
        };
        let good = h(ENC_RESPONSE);
        for len in 0..RESPONSE_NONCE_LEN + TAG_LEN {
            assert_eq!(
                open(&good[..len]),
                Err(OhttpError::Truncated),
                "length {len}"
            );
        }
        for index in 0..good.len() {
            let mut bad = good.clone();
            bad[index] ^= 0x80;
            assert_eq!(open(&bad), Err(OhttpError::Decrypt), "byte {index}");
        }
        assert_eq!(open(&good), Ok(h(RESPONSE)));
    }

    #[test]
    fn rejects_small_order_key_config() {
        let config = KeyConfig {
            key_id: 1,
            public_key: [0; 32],
        };
        assert_eq!(
            encapsulate_request(&config, b"x").err(),
            Some(OhttpError::InvalidPublicKey)
        );
    }

    #[test]
    fn enc_of_needs_the_whole_prefix() {
        let good = h(ENC_REQUEST);
        assert_eq!(enc_of(&good[..REQUEST_PREFIX_LEN - 1]), None);
        assert_eq!(enc_of(&good[..REQUEST_PREFIX_LEN]), Some(&a(PK_E)));
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let gateway = rfc_gateway();
        let debug = format!("{gateway:?}");
        assert!(debug.contains("31e1f05a"));
        assert!(!debug.contains(&SK_R[..16]));
        let (_, sealer) = gateway.decapsulate(&h(ENC_REQUEST)).unwrap();
        assert_eq!(format!("{sealer:?}"), "ResponseSealer { .. }");
    }

    /// Interoperability with the `ohttp` crate (the RFC editor's implementation).
    mod interop {
        use ::ohttp::{
            ClientRequest, KeyConfig as TheirConfig, Server, SymmetricSuite,
            hpke::{Aead, Kdf, Kem},
        };

        use super::super::*;

        const IKM: [u8; 32] = [0x42; 32];

        fn their_config(key_id: u8) -> TheirConfig {
            TheirConfig::derive(
                key_id,
                Kem::X25519Sha256,
                vec![SymmetricSuite::new(Kdf::HkdfSha256, Aead::Aes128Gcm)],
                &IKM,
            )
            .unwrap()
        }

        #[test]
        fn same_seed_same_key() {
            let ours = KeyPair::from_seed(5, &IKM).config();
            assert_eq!(their_config(5).encode().unwrap(), ours.encode());
        }

        #[test]
        fn their_client_our_gateway() {
            let gateway = Gateway::new(vec![KeyPair::from_seed(5, &IKM)]);
            let encoded = gateway.key_configs()[0].encode();
            let client = ClientRequest::from_encoded_config(&encoded).unwrap();
            let (enc_request, client_response) = client.encapsulate(b"their request").unwrap();
            let (request, sealer) = gateway.decapsulate(&enc_request).unwrap();
            assert_eq!(request, b"their request");
            let enc_response = sealer.seal(b"our response").unwrap();
            assert_eq!(
                client_response.decapsulate(&enc_response).unwrap(),
                b"our response"
            );
        }

        #[test]
        fn our_client_their_server() {
            let server = Server::new(their_config(5)).unwrap();
            let ours = KeyPair::from_seed(5, &IKM).config();
            let (enc_request, opener) = encapsulate_request(&ours, b"our request").unwrap();
            let (request, server_response) = server.decapsulate(&enc_request).unwrap();
            assert_eq!(request, b"our request");
            let enc_response = server_response.encapsulate(b"their response").unwrap();
            assert_eq!(opener.open(&enc_response).unwrap(), b"their response");
        }
    }
}

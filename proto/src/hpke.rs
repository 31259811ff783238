//! HPKE (RFC 9180) in base mode for the one suite TokenGo speaks:
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM (0x0020 / 0x0001 / 0x0001).
//!
//! Only what OHTTP needs is here: `DeriveKeyPair`, `Encap`/`Decap`, the base-mode key schedule,
//! sequenced `Seal`/`Open` and `Export`. The sender's ephemeral secret is a parameter of
//! [`setup_sender_with_ephemeral`] so the RFC's test vectors can be reproduced byte for byte;
//! [`setup_sender`] draws a fresh one, which is what production code calls.
//!
//! Secrets owned here (private keys, shared secrets, AEAD keys, exporter secrets) are zeroized
//! on drop, and no `Debug` implementation prints them.

use std::fmt;

use aes_gcm::{AeadInOut, Aes128Gcm, KeyInit, aead::inout::InOutBuf};
use aws_lc_rs::agreement;
use hkdf::{Hkdf, HkdfExtract};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// HPKE KEM id of DHKEM(X25519, HKDF-SHA256).
pub const KEM_X25519_HKDF_SHA256: u16 = 0x0020;
/// HPKE KDF id of HKDF-SHA256.
pub const KDF_HKDF_SHA256: u16 = 0x0001;
/// HPKE AEAD id of AES-128-GCM.
pub const AEAD_AES_128_GCM: u16 = 0x0001;
/// Length of an X25519 public key (`Npk`).
pub const PUBLIC_KEY_LEN: usize = 32;

/// Length of an encapsulated key (`Nenc`): an X25519 public key.
pub const ENC_LEN: usize = 32;
/// Length of a serialized X25519 private key (`Nsk`).
pub const PRIVATE_KEY_LEN: usize = 32;
/// Length of the KEM shared secret (`Nsecret`).
pub const SHARED_SECRET_LEN: usize = 32;
/// AES-128-GCM key length (`Nk`).
pub const KEY_LEN: usize = 16;
/// AES-128-GCM nonce length (`Nn`).
pub const NONCE_LEN: usize = 12;
/// AES-128-GCM tag length (`Nt`): every ciphertext is this much longer than its plaintext.
pub const TAG_LEN: usize = 16;
/// HKDF-SHA256 output length (`Nh`).
const HASH_LEN: usize = 32;
/// The longest output `Export` can produce (`255 * Nh`, the limit of HKDF-Expand).
pub const MAX_EXPORT_LEN: usize = 255 * HASH_LEN;

const VERSION_LABEL: &[u8] = b"HPKE-v1";
const MODE_BASE: u8 = 0x00;

/// `suite_id` for the KEM's own derivations: `"KEM" || I2OSP(kem_id, 2)` (RFC 9180 §4.1).
const KEM_SUITE_ID: [u8; 5] = {
    let kem = KEM_X25519_HKDF_SHA256.to_be_bytes();
    [b'K', b'E', b'M', kem[0], kem[1]]
};

/// `suite_id` for the key schedule: `"HPKE" || kem_id || kdf_id || aead_id` (RFC 9180 §5.1).
const HPKE_SUITE_ID: [u8; 10] = {
    let kem = KEM_X25519_HKDF_SHA256.to_be_bytes();
    let kdf = KDF_HKDF_SHA256.to_be_bytes();
    let aead = AEAD_AES_128_GCM.to_be_bytes();
    [
        b'H', b'P', b'K', b'E', kem[0], kem[1], kdf[0], kdf[1], aead[0], aead[1],
    ]
};

/// Why an HPKE operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpkeError {
    /// The Diffie-Hellman output was all zeros: the peer's public key (the recipient's key, or
    /// the encapsulated key) has small order. RFC 9180 §7.1.4 requires rejecting it, since the
    /// shared secret would then be known to anyone.
    #[error("invalid public key (all-zero Diffie-Hellman output)")]
    InvalidPublicKey,
    /// The AEAD tag did not verify: wrong key, tampered ciphertext or AAD, or messages opened
    /// out of order.
    #[error("AEAD open failed")]
    Open,
    /// The context's sequence number is exhausted; no further message may be sealed or opened.
    #[error("message limit reached (sequence number exhausted)")]
    MessageLimit,
    /// A plaintext exceeds AES-GCM's per-message limit (2^36 - 32 bytes).
    #[error("message too large for AES-GCM")]
    TooLarge,
    /// An export longer than [`MAX_EXPORT_LEN`] was requested.
    #[error("export length exceeds {MAX_EXPORT_LEN} bytes")]
    ExportTooLong,
}

/// An X25519 private key with its public key, zeroized on drop.
///
/// The public key is computed once here because every decapsulation needs it
/// (`kem_context = enc || pkRm`).
pub struct PrivateKey {
    secret: StaticSecret,
    public: [u8; PUBLIC_KEY_LEN],
    /// The same scalar as aws-lc holds it, made once so that a decapsulation is one scalar
    /// multiplication (aws-lc derives the public key when it imports a private key). `None`
    /// only if aws-lc refused the key, which it does only for a wrong length.
    agreement: Option<agreement::PrivateKey>,
}

impl PrivateKey {
    /// Imports a serialized private key (`DeserializePrivateKey`: the 32 raw bytes; clamping
    /// happens inside every scalar multiplication).
    #[must_use]
    pub fn from_bytes(bytes: [u8; PRIVATE_KEY_LEN]) -> Self {
        let agreement = dh_key(&bytes).ok();
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self {
            secret,
            public,
            agreement,
        }
    }

    /// The serialized public key (`pkRm`).
    #[must_use]
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public_key", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// RFC 9180 §7.1.3 `DeriveKeyPair(ikm)` for X25519: the private key is
/// `LabeledExpand(LabeledExtract("", "dkp_prk", ikm), "sk", "", 32)`, used as is.
#[must_use]
pub fn derive_key_pair(ikm: &[u8]) -> PrivateKey {
    let dkp_prk = labeled_extract(&KEM_SUITE_ID, b"", b"dkp_prk", ikm);
    let sk = labeled_expand_array::<PRIVATE_KEY_LEN>(&dkp_prk, &KEM_SUITE_ID, b"sk", b"");
    PrivateKey::from_bytes(*sk)
}

/// `SetupBaseS(pkR, info)` with a fresh random ephemeral key. Returns `enc` and the context.
pub fn setup_sender(
    recipient: &[u8; PUBLIC_KEY_LEN],
    info: &[u8],
) -> Result<([u8; ENC_LEN], SenderContext), HpkeError> {
    let mut ephemeral = Zeroizing::new([0u8; PRIVATE_KEY_LEN]);
    fill_random(&mut ephemeral[..]);
    setup_sender_with_ephemeral(recipient, info, *ephemeral)
}

/// `SetupBaseS(pkR, info)` with the given serialized ephemeral private key (`skEm`).
///
/// This exists to reproduce test vectors. Reusing an ephemeral secret for two messages gives
/// them the same keys and nonces, which breaks AES-GCM: production code calls [`setup_sender`].
pub fn setup_sender_with_ephemeral(
    recipient: &[u8; PUBLIC_KEY_LEN],
    info: &[u8],
    ephemeral_secret: [u8; PRIVATE_KEY_LEN],
) -> Result<([u8; ENC_LEN], SenderContext), HpkeError> {
    let ephemeral = Zeroizing::new(ephemeral_secret);
    let (shared_secret, enc) = encap(recipient, &ephemeral)?;
    let context = key_schedule(&shared_secret, info).into_context();
    Ok((enc, SenderContext(context)))
}

/// `SetupBaseR(enc, skR, info)`.
pub fn setup_receiver(
    recipient: &PrivateKey,
    enc: &[u8; ENC_LEN],
    info: &[u8],
) -> Result<ReceiverContext, HpkeError> {
    let shared_secret = decap(enc, recipient)?;
    Ok(ReceiverContext(
        key_schedule(&shared_secret, info).into_context(),
    ))
}

/// The sender's half of an HPKE context: seals messages in order.
pub struct SenderContext(Context);

impl SenderContext {
    /// `ContextS.Seal(aad, pt)`: returns `ciphertext || tag`.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        self.seal_append(aad, plaintext, &mut out)?;
        Ok(out)
    }

    /// Like [`seal`](Self::seal), appending `ciphertext || tag` to `out`, so framing can be
    /// written in front of the ciphertext without a second copy. On error `out` is unchanged.
    pub fn seal_append(
        &mut self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), HpkeError> {
        self.0.aead.seal_append(aad, plaintext, out)
    }

    /// `Context.Export(exporter_context, L)` with `L = out.len()`.
    pub fn export(&self, exporter_context: &[u8], out: &mut [u8]) -> Result<(), HpkeError> {
        self.0.export(exporter_context, out)
    }

    pub(crate) fn aead_mut(&mut self) -> &mut SequencedAead {
        &mut self.0.aead
    }
}

impl fmt::Debug for SenderContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderContext")
            .field("seq", &self.0.aead.seq)
            .finish_non_exhaustive()
    }
}

/// The recipient's half of an HPKE context: opens messages in the order they were sealed.
pub struct ReceiverContext(Context);

impl ReceiverContext {
    /// `ContextR.Open(aad, ct)`: returns the plaintext.
    pub fn open(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        self.0.aead.open(aad, ciphertext)
    }

    /// `Context.Export(exporter_context, L)` with `L = out.len()`.
    pub fn export(&self, exporter_context: &[u8], out: &mut [u8]) -> Result<(), HpkeError> {
        self.0.export(exporter_context, out)
    }

    pub(crate) fn aead_mut(&mut self) -> &mut SequencedAead {
        &mut self.0.aead
    }
}

impl fmt::Debug for ReceiverContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverContext")
            .field("seq", &self.0.aead.seq)
            .finish_non_exhaustive()
    }
}

/// What both halves of a context hold.
struct Context {
    aead: SequencedAead,
    exporter_secret: Zeroizing<[u8; HASH_LEN]>,
}

impl Context {
    fn export(&self, exporter_context: &[u8], out: &mut [u8]) -> Result<(), HpkeError> {
        // `from_prk` only refuses keys shorter than Nh; the exporter secret is exactly Nh.
        let prk = Hkdf::<Sha256>::from_prk(&self.exporter_secret[..])
            .map_err(|_| HpkeError::ExportTooLong)?;
        labeled_expand(&prk, &HPKE_SUITE_ID, b"sec", exporter_context, out)
    }
}

/// AES-128-GCM with a base nonce and a message counter, the nonce of message `seq` being
/// `base_nonce XOR I2OSP(seq, Nn)` (RFC 9180 §5.2). HPKE contexts use it, and so do OHTTP
/// responses, whose chunks are counted the same way.
pub(crate) struct SequencedAead {
    cipher: Aes128Gcm,
    base_nonce: [u8; NONCE_LEN],
    seq: u64,
}

impl SequencedAead {
    pub(crate) fn new(key: &[u8; KEY_LEN], base_nonce: [u8; NONCE_LEN]) -> Self {
        Self {
            cipher: Aes128Gcm::new(key.into()),
            base_nonce,
            seq: 0,
        }
    }

    /// The nonce for the current message, or an error once the counter is spent.
    ///
    /// RFC 9180 allows 2^96 - 1 messages; a `u64` counter stops at 2^64 - 1, which no stream
    /// can reach but which keeps the check exact instead of wrapping.
    fn nonce(&self) -> Result<[u8; NONCE_LEN], HpkeError> {
        if self.seq == u64::MAX {
            return Err(HpkeError::MessageLimit);
        }
        let mut nonce = self.base_nonce;
        for (byte, seq) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *byte ^= seq;
        }
        Ok(nonce)
    }

    /// Seals the next message, appending `ciphertext || tag` to `out`.
    pub(crate) fn seal_append(
        &mut self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), HpkeError> {
        let start = out.len();
        out.reserve(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        self.seal_in_place(aad, out, start)
            .inspect_err(|_| out.truncate(start))
    }

    /// Seals the next message in place: `out[start..]` is the plaintext, encrypted where it
    /// lies, and the tag is appended. A large message then exists once in memory. On error
    /// `out` is unchanged.
    pub(crate) fn seal_in_place(
        &mut self,
        aad: &[u8],
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), HpkeError> {
        let nonce = self.nonce()?;
        let plaintext = out.get_mut(start..).ok_or(HpkeError::TooLarge)?;
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce.into(), aad, InOutBuf::from(plaintext))
            .map_err(|_| HpkeError::TooLarge)?;
        out.extend_from_slice(&tag);
        self.seq += 1;
        Ok(())
    }

    /// Opens the next message. The sequence number advances only on success, so a forged
    /// message cannot desynchronize the two ends.
    pub(crate) fn open(&mut self, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, HpkeError> {
        let nonce = self.nonce()?;
        let (sealed, tag) = ciphertext
            .split_last_chunk::<TAG_LEN>()
            .ok_or(HpkeError::Open)?;
        // Decrypt straight from the caller's buffer into the result: one pass, no extra copy.
        let mut plaintext = vec![0u8; sealed.len()];
        let buffer = InOutBuf::new(sealed, &mut plaintext).map_err(|_| HpkeError::Open)?;
        self.cipher
            .decrypt_inout_detached(&nonce.into(), aad, buffer, tag.into())
            .map_err(|_| HpkeError::Open)?;
        self.seq += 1;
        Ok(plaintext)
    }
}

impl fmt::Debug for SequencedAead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SequencedAead")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// Fills `buf` from the thread-local CSPRNG (ChaCha, seeded and periodically reseeded from the
/// OS), which avoids a system call per request.
pub(crate) fn fill_random(buf: &mut [u8]) {
    rand::fill(buf);
}

/// `Encap(pkR)` with the given ephemeral key: returns `(shared_secret, enc)`.
fn encap(
    recipient: &[u8; PUBLIC_KEY_LEN],
    ephemeral: &[u8; PRIVATE_KEY_LEN],
) -> Result<(Zeroizing<[u8; SHARED_SECRET_LEN]>, [u8; ENC_LEN]), HpkeError> {
    let ephemeral = dh_key(ephemeral)?;
    let enc: [u8; ENC_LEN] = ephemeral
        .compute_public_key()
        .ok()
        .and_then(|public| public.as_ref().try_into().ok())
        .ok_or(HpkeError::InvalidPublicKey)?;
    let shared_secret = dh(&ephemeral, recipient, |dh| {
        extract_and_expand(dh, &enc, recipient)
    })?;
    Ok((shared_secret, enc))
}

/// `Decap(enc, skR)`.
fn decap(
    enc: &[u8; ENC_LEN],
    recipient: &PrivateKey,
) -> Result<Zeroizing<[u8; SHARED_SECRET_LEN]>, HpkeError> {
    let imported;
    let secret = match &recipient.agreement {
        Some(secret) => secret,
        None => {
            imported = dh_key(&Zeroizing::new(recipient.secret.to_bytes()))?;
            &imported
        }
    };
    dh(secret, enc, |dh| {
        extract_and_expand(dh, enc, &recipient.public)
    })
}

/// An X25519 private key for [`dh`]. aws-lc holds (and clears) its copy of the scalar.
fn dh_key(secret: &[u8; PRIVATE_KEY_LEN]) -> Result<agreement::PrivateKey, HpkeError> {
    // Only a wrong length is refused, and the length is fixed here.
    agreement::PrivateKey::from_private_key(&agreement::X25519, secret)
        .map_err(|_| HpkeError::InvalidPublicKey)
}

/// `DH(sk, pk)` handed to `then`. The X25519 scalar multiplications are aws-lc's (the same
/// library that already does the node's TLS), whose assembly ladder costs about a third of
/// the portable one; the all-zero output of a small-order point is an error
/// (RFC 9180 §7.1.4), which aws-lc reports as a failed agreement.
fn dh<R>(
    secret: &agreement::PrivateKey,
    public: &[u8; PUBLIC_KEY_LEN],
    then: impl FnOnce(&[u8; 32]) -> R,
) -> Result<R, HpkeError> {
    agreement::agree(
        secret,
        agreement::UnparsedPublicKey::new(&agreement::X25519, public),
        HpkeError::InvalidPublicKey,
        |shared| {
            let shared: &[u8; 32] = shared.try_into().map_err(|_| HpkeError::InvalidPublicKey)?;
            Ok(then(shared))
        },
    )
}

/// DHKEM's `ExtractAndExpand(dh, kem_context)` with `kem_context = enc || pkRm`.
fn extract_and_expand(
    dh: &[u8; 32],
    enc: &[u8; ENC_LEN],
    recipient: &[u8; PUBLIC_KEY_LEN],
) -> Zeroizing<[u8; SHARED_SECRET_LEN]> {
    let mut kem_context = [0u8; ENC_LEN + PUBLIC_KEY_LEN];
    kem_context[..ENC_LEN].copy_from_slice(enc);
    kem_context[ENC_LEN..].copy_from_slice(recipient);
    let eae_prk = labeled_extract(&KEM_SUITE_ID, b"", b"eae_prk", dh);
    labeled_expand_array(&eae_prk, &KEM_SUITE_ID, b"shared_secret", &kem_context)
}

/// The outputs of `KeySchedule` (RFC 9180 §5.1), kept apart from the context so the test
/// vectors can check each one.
struct Schedule {
    key: Zeroizing<[u8; KEY_LEN]>,
    base_nonce: [u8; NONCE_LEN],
    exporter_secret: Zeroizing<[u8; HASH_LEN]>,
}

impl Schedule {
    fn into_context(self) -> Context {
        Context {
            aead: SequencedAead::new(&self.key, self.base_nonce),
            exporter_secret: self.exporter_secret,
        }
    }
}

/// `KeySchedule(mode_base, shared_secret, info, psk = "", psk_id = "")`.
fn key_schedule(shared_secret: &[u8; SHARED_SECRET_LEN], info: &[u8]) -> Schedule {
    let psk_id_hash = labeled_extract_prk(&HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract_prk(&HPKE_SUITE_ID, b"", b"info_hash", info);
    let mut context = [0u8; 1 + 2 * HASH_LEN];
    context[0] = MODE_BASE;
    context[1..=HASH_LEN].copy_from_slice(&psk_id_hash);
    context[1 + HASH_LEN..].copy_from_slice(&info_hash);

    let secret = labeled_extract(&HPKE_SUITE_ID, shared_secret, b"secret", b"");
    Schedule {
        key: labeled_expand_array(&secret, &HPKE_SUITE_ID, b"key", &context),
        base_nonce: *labeled_expand_array(&secret, &HPKE_SUITE_ID, b"base_nonce", &context),
        exporter_secret: labeled_expand_array(&secret, &HPKE_SUITE_ID, b"exp", &context),
    }
}

/// `LabeledExtract(salt, label, ikm)`, ready for expansion. The labeled input is fed to
/// HMAC in parts rather than concatenated, so no secret lands in a temporary buffer.
fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Hkdf<Sha256> {
    let mut extract = HkdfExtract::<Sha256>::new(Some(salt));
    for part in [VERSION_LABEL, suite_id, label, ikm] {
        extract.input_ikm(part);
    }
    extract.finalize().1
}

/// `LabeledExtract` when the pseudorandom key itself is wanted (the key schedule's public
/// `psk_id_hash` and `info_hash`).
fn labeled_extract_prk(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; HASH_LEN] {
    let mut extract = HkdfExtract::<Sha256>::new(Some(salt));
    for part in [VERSION_LABEL, suite_id, label, ikm] {
        extract.input_ikm(part);
    }
    extract.finalize().0.into()
}

/// `LabeledExpand(prk, label, info, L)` with `L = out.len()`.
fn labeled_expand(
    prk: &Hkdf<Sha256>,
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), HpkeError> {
    let len = u16::try_from(out.len())
        .ok()
        .filter(|_| out.len() <= MAX_EXPORT_LEN)
        .ok_or(HpkeError::ExportTooLong)?;
    prk.expand_multi_info(
        &[&len.to_be_bytes(), VERSION_LABEL, suite_id, label, info],
        out,
    )
    .map_err(|_| HpkeError::ExportTooLong)
}

/// `LabeledExpand` for the fixed lengths of the KEM and key schedule.
fn labeled_expand_array<const N: usize>(
    prk: &Hkdf<Sha256>,
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
) -> Zeroizing<[u8; N]> {
    const { assert!(N <= MAX_EXPORT_LEN) };
    let mut out = Zeroizing::new([0u8; N]);
    // Cannot fail: the only error is a length above MAX_EXPORT_LEN, excluded at compile time.
    let expanded = labeled_expand(prk, suite_id, label, info, &mut out[..]);
    debug_assert!(expanded.is_ok());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<const N: usize>(hex_str: &str) -> [u8; N] {
        hex::decode(hex_str).unwrap().try_into().unwrap()
    }

    // RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode.
    const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
    const IKM_E: &str = "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234";
    const PK_EM: &str = "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431";
    const SK_EM: &str = "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736";
    const IKM_R: &str = "6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037";
    const PK_RM: &str = "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d";
    const SK_RM: &str = "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8";
    const SHARED_SECRET: &str = "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc";
    const KEY: &str = "4531685d41d65f03dc48f6b8302c05b0";
    const BASE_NONCE: &str = "56d890e5accaaf011cff4b7d";
    const EXPORTER_SECRET: &str =
        "45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8";
    /// "Beauty is truth, truth beauty"
    const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
    /// (sequence number, nonce, ciphertext); the AAD is "Count-<seq>".
    const ENCRYPTIONS: [(u64, &str, &str); 6] = [
        (
            0,
            "56d890e5accaaf011cff4b7d",
            "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
        ),
        (
            1,
            "56d890e5accaaf011cff4b7c",
            "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab251c03d0c22a56b8ca42c2063b84",
        ),
        (
            2,
            "56d890e5accaaf011cff4b7f",
            "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb72516491588d96a19ad4a683518973dcc180",
        ),
        (
            4,
            "56d890e5accaaf011cff4b79",
            "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a09fc0012bc69fccaa251c0246d",
        ),
        (
            255,
            "56d890e5accaaf011cff4b82",
            "7175db9717964058640a3a11fb9007941a5d1757fda1a6935c805c21af32505bf106deefec4a49ac38d71c9e0a",
        ),
        (
            256,
            "56d890e5accaaf011cff4a7d",
            "957f9800542b0b8891badb026d79cc54597cb2d225b54c00c5238c25d05c30e3fbeda97d2e0e1aba483a2df9f2",
        ),
    ];
    /// (exporter_context, exported_value), L = 32.
    const EXPORTS: [(&str, &str); 3] = [
        (
            "",
            "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee",
        ),
        (
            "00",
            "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5",
        ),
        (
            "54657374436f6e74657874",
            "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931",
        ),
    ];

    fn count_aad(seq: u64) -> Vec<u8> {
        format!("Count-{seq}").into_bytes()
    }

    #[test]
    fn rfc9180_a11_key_derivation_and_schedule() {
        let info = hex::decode(INFO).unwrap();
        let ephemeral = derive_key_pair(&hex::decode(IKM_E).unwrap());
        assert_eq!(ephemeral.secret.to_bytes(), h::<32>(SK_EM));
        assert_eq!(ephemeral.public_key(), &h::<32>(PK_EM));
        let recipient = derive_key_pair(&hex::decode(IKM_R).unwrap());
        assert_eq!(recipient.secret.to_bytes(), h::<32>(SK_RM));
        assert_eq!(recipient.public_key(), &h::<32>(PK_RM));

        let (shared_secret, enc) = encap(recipient.public_key(), &h::<32>(SK_EM)).unwrap();
        assert_eq!(enc, h::<32>(PK_EM));
        assert_eq!(*shared_secret, h::<32>(SHARED_SECRET));
        assert_eq!(*decap(&enc, &recipient).unwrap(), h::<32>(SHARED_SECRET));

        let schedule = key_schedule(&shared_secret, &info);
        assert_eq!(*schedule.key, h::<16>(KEY));
        assert_eq!(schedule.base_nonce, h::<12>(BASE_NONCE));
        assert_eq!(*schedule.exporter_secret, h::<32>(EXPORTER_SECRET));
    }

    #[test]
    fn rfc9180_a11_encryptions_and_exports() {
        let info = hex::decode(INFO).unwrap();
        let recipient = PrivateKey::from_bytes(h(SK_RM));
        let (enc, mut sender) = setup_sender_with_ephemeral(&h(PK_RM), &info, h(SK_EM)).unwrap();
        assert_eq!(enc, h::<32>(PK_EM));
        let mut receiver = setup_receiver(&recipient, &enc, &info).unwrap();

        let pt = hex::decode(PT).unwrap();
        let mut expected = ENCRYPTIONS.iter().peekable();
        for seq in 0..=256u64 {
            assert_eq!(
                sender.0.aead.nonce().unwrap(),
                receiver.0.aead.nonce().unwrap()
            );
            let nonce = sender.0.aead.nonce().unwrap();
            let ct = sender.seal(&count_aad(seq), &pt).unwrap();
            if let Some((_, want_nonce, want_ct)) = expected.next_if(|(s, _, _)| *s == seq) {
                assert_eq!(nonce, h::<12>(want_nonce), "nonce {seq}");
                assert_eq!(hex::encode(&ct), *want_ct, "ciphertext {seq}");
            }
            assert_eq!(receiver.open(&count_aad(seq), &ct).unwrap(), pt);
        }
        assert!(expected.next().is_none());

        for (context, value) in EXPORTS {
            let context = hex::decode(context).unwrap();
            let mut ours = [0u8; 32];
            sender.export(&context, &mut ours).unwrap();
            assert_eq!(ours, h::<32>(value));
            receiver.export(&context, &mut ours).unwrap();
            assert_eq!(ours, h::<32>(value));
        }
    }

    #[test]
    fn open_rejects_tampering_wrong_aad_and_reordering() {
        let recipient = derive_key_pair(b"recipient");
        let (enc, mut sender) = setup_sender(recipient.public_key(), b"info").unwrap();
        let first = sender.seal(b"aad", b"first").unwrap();
        let second = sender.seal(b"aad", b"second").unwrap();

        let mut receiver = setup_receiver(&recipient, &enc, b"info").unwrap();
        // Out of order: the second message does not open as the first.
        assert_eq!(receiver.open(b"aad", &second), Err(HpkeError::Open));
        assert_eq!(receiver.open(b"other", &first), Err(HpkeError::Open));
        let mut flipped = first.clone();
        flipped[0] ^= 1;
        assert_eq!(receiver.open(b"aad", &flipped), Err(HpkeError::Open));
        assert_eq!(
            receiver.open(b"aad", &first[..TAG_LEN - 1]),
            Err(HpkeError::Open)
        );
        // Failures did not advance the counter.
        assert_eq!(receiver.open(b"aad", &first).unwrap(), b"first");
        assert_eq!(receiver.open(b"aad", &second).unwrap(), b"second");

        let mut wrong_info = setup_receiver(&recipient, &enc, b"other info").unwrap();
        assert_eq!(wrong_info.open(b"aad", &first), Err(HpkeError::Open));
    }

    #[test]
    fn sequence_number_exhaustion_is_an_error() {
        let recipient = derive_key_pair(b"recipient");
        let (enc, mut sender) = setup_sender(recipient.public_key(), b"").unwrap();
        let mut receiver = setup_receiver(&recipient, &enc, b"").unwrap();
        sender.0.aead.seq = u64::MAX - 1;
        receiver.0.aead.seq = u64::MAX - 1;
        let last = sender.seal(b"", b"last").unwrap();
        assert_eq!(receiver.open(b"", &last).unwrap(), b"last");
        let mut out = vec![7];
        assert_eq!(
            sender.seal_append(b"", b"more", &mut out),
            Err(HpkeError::MessageLimit)
        );
        assert_eq!(out, [7], "a failed seal leaves the output untouched");
        assert_eq!(receiver.open(b"", &last), Err(HpkeError::MessageLimit));
    }

    #[test]
    fn rejects_small_order_public_keys() {
        let recipient = derive_key_pair(b"recipient");
        // The identity point and a point of order 8 (RFC 7748 §6.1 small-order list).
        let zero = [0u8; 32];
        let order8 = h::<32>("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800");
        for bad in [zero, order8] {
            assert_eq!(
                setup_sender(&bad, b"").err(),
                Some(HpkeError::InvalidPublicKey)
            );
            assert_eq!(
                setup_receiver(&recipient, &bad, b"").err(),
                Some(HpkeError::InvalidPublicKey)
            );
        }
    }

    #[test]
    fn export_lengths() {
        let recipient = derive_key_pair(b"recipient");
        let (_, sender) = setup_sender(recipient.public_key(), b"").unwrap();
        let mut max = vec![0u8; MAX_EXPORT_LEN];
        sender.export(b"ctx", &mut max).unwrap();
        let mut short = [0u8; 7];
        sender.export(b"ctx", &mut short).unwrap();
        assert_ne!(short, [0u8; 7]);
        let mut too_long = vec![0u8; MAX_EXPORT_LEN + 1];
        assert_eq!(
            sender.export(b"ctx", &mut too_long),
            Err(HpkeError::ExportTooLong)
        );
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let key = PrivateKey::from_bytes(h(SK_RM));
        let debug = format!("{key:?}");
        assert!(debug.contains(PK_RM));
        assert!(!debug.contains(SK_RM));
        let (_, sender) = setup_sender(key.public_key(), b"").unwrap();
        assert_eq!(format!("{sender:?}"), "SenderContext { seq: 0, .. }");
    }

    /// Cross-check against the `hpke` crate, both directions, keys derived from the same ikm.
    mod interop {
        use ::hpke::{
            Deserializable, Kem as _, OpModeR, OpModeS, Serializable, aead::AesGcm128,
            kdf::HkdfSha256, kem::X25519HkdfSha256,
        };

        use super::super::*;

        const IKM: &[u8] = b"an input keying material of some length";
        const INFO: &[u8] = b"tokengo interop";

        #[test]
        fn derive_key_pair_matches() {
            let (their_sk, their_pk) = X25519HkdfSha256::derive_keypair(IKM);
            let ours = derive_key_pair(IKM);
            assert_eq!(their_pk.to_bytes().as_slice(), ours.public_key());
            assert_eq!(their_sk.to_bytes().as_slice(), ours.secret.as_bytes());
        }

        #[test]
        fn our_sender_their_receiver() {
            let (their_sk, _) = X25519HkdfSha256::derive_keypair(IKM);
            let ours = derive_key_pair(IKM);
            let (enc, mut sender) = setup_sender(ours.public_key(), INFO).unwrap();
            let encapped =
                <X25519HkdfSha256 as ::hpke::Kem>::EncappedKey::from_bytes(&enc).unwrap();
            let mut receiver = ::hpke::setup_receiver::<AesGcm128, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base,
                &their_sk,
                &encapped,
                INFO,
            )
            .unwrap();
            for i in 0..3u8 {
                let ct = sender.seal(&[i], &[i; 40]).unwrap();
                assert_eq!(receiver.open(&ct, &[i]).unwrap(), [i; 40]);
            }
            let (mut ours_exported, mut theirs_exported) = ([0u8; 48], [0u8; 48]);
            sender.export(b"label", &mut ours_exported).unwrap();
            receiver.export(b"label", &mut theirs_exported).unwrap();
            assert_eq!(ours_exported, theirs_exported);
        }

        #[test]
        fn their_sender_our_receiver() {
            let (_, their_pk) = X25519HkdfSha256::derive_keypair(IKM);
            let ours = derive_key_pair(IKM);
            let (encapped, mut sender) = ::hpke::setup_sender::<
                AesGcm128,
                HkdfSha256,
                X25519HkdfSha256,
            >(&OpModeS::Base, &their_pk, INFO)
            .unwrap();
            let enc: [u8; ENC_LEN] = encapped.to_bytes().as_slice().try_into().unwrap();
            let mut receiver = setup_receiver(&ours, &enc, INFO).unwrap();
            for i in 0..3u8 {
                let ct = sender.seal(&[i; 17], b"aad").unwrap();
                assert_eq!(receiver.open(b"aad", &ct).unwrap(), [i; 17]);
            }
            let (mut ours_exported, mut theirs_exported) = ([0u8; 16], [0u8; 16]);
            receiver.export(b"", &mut ours_exported).unwrap();
            sender.export(b"", &mut theirs_exported).unwrap();
            assert_eq!(ours_exported, theirs_exported);
        }
    }
}

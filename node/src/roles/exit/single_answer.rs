//! A single-message (RFC 9458) answer built in one buffer: the stream's status byte, room for
//! the response nonce, then the Binary HTTP response appended as the backend's body arrives
//! (indeterminate-length framing, so nothing moves when the body ends), sealed in place at
//! the end. The answer exists once in memory, and every byte of it is drawn from the exit's
//! answer budget before it is kept.

use bytes::Bytes;
use tokengo_proto::{
    bhttp::{BhttpError, ResponseHead, StreamingEncoder},
    frame::Status,
    ohttp::{OhttpError, RESPONSE_NONCE_LEN, ResponseSealer},
    padding, varint,
};

use super::answer_budget::{BudgetSpent, Claim};

/// Where the Binary HTTP message starts: after the status byte and the response nonce.
const MESSAGE_START: usize = 1 + RESPONSE_NONCE_LEN;
/// Claimed ahead beyond an announced body length: its pieces' length prefixes and the
/// padding (under 64 KiB).
const BODY_SLACK: usize = 128 * 1024;
/// What sealing adds at the end: the AEAD tag, and the message's end (content terminator,
/// empty trailers).
const SEAL_OVERHEAD: usize = 16 + 2;

/// Why an answer could not be built.
#[derive(Debug, thiserror::Error)]
pub(super) enum AnswerError {
    /// The budget stayed spent for as long as the answer may wait.
    #[error(transparent)]
    Budget(#[from] BudgetSpent),
    /// The head cannot be encoded (a status or field the backend should not have sent).
    #[error("response head: {0}")]
    Head(#[from] BhttpError),
    /// The body was not started with a head.
    #[error("response body before its head")]
    NoHead,
    /// Sealing failed (a response beyond AES-GCM's limit, which no budget holds).
    #[error("sealing the response: {0}")]
    Seal(#[from] OhttpError),
}

/// An answer being built.
#[derive(Debug)]
pub(super) struct SingleAnswer {
    out: Vec<u8>,
    encoder: Option<StreamingEncoder>,
    /// Where the value of the head's last field lies in `out`, to rewrite it once the body
    /// is in (the backend's time, known only then).
    last_value: Option<std::ops::Range<usize>>,
    claim: Claim,
    /// Bytes claimed ahead for a body of announced length, not yet used.
    prepaid: usize,
}

/// A sealed answer, ready to write, still holding its bytes of the budget until dropped.
#[derive(Debug)]
pub(super) struct SealedAnswer {
    /// The status byte and the encapsulated response.
    pub(super) bytes: Bytes,
    /// Given back when the answer is written, or its stream failed.
    pub(super) claim: Claim,
}

impl SingleAnswer {
    /// An empty answer drawing on `claim`.
    #[must_use]
    pub(super) fn new(claim: Claim) -> Self {
        Self {
            out: Vec::new(),
            encoder: None,
            last_value: None,
            claim,
            prepaid: 0,
        }
    }

    /// Starts the answer with `head`. When the backend announced the body's length
    /// (`expected_body`, its `Content-Length` within the size limit), the whole answer is
    /// claimed at once and the buffer sized once: answers then never hold part of the budget
    /// while waiting for the rest, which would let many concurrent ones starve each other.
    /// The length is only a hint: a longer body draws more as it arrives.
    pub(super) async fn head(
        &mut self,
        head: &ResponseHead,
        expected_body: Option<usize>,
    ) -> Result<(), AnswerError> {
        let mut encoded = Vec::new();
        let encoder = StreamingEncoder::response(head, &mut encoded)?;
        let start = MESSAGE_START + encoded.len() + SEAL_OVERHEAD;
        let body = expected_body.map_or(0, |len| len.saturating_add(BODY_SLACK));
        self.claim.grow(start.saturating_add(body)).await?;
        self.prepaid = body;
        self.out = Vec::with_capacity(start.saturating_add(body));
        self.out.push(Status::Ok as u8);
        self.out.resize(MESSAGE_START, 0);
        self.out.extend_from_slice(&encoded);
        // The header section ends in its one-byte terminator, right after the last value.
        self.last_value = head.fields.last().map(|field| {
            let end = self.out.len() - 1;
            end - field.value.len()..end
        });
        self.encoder = Some(encoder);
        Ok(())
    }

    /// Takes `bytes` from what was claimed ahead, claiming the rest.
    async fn draw(&mut self, bytes: usize) -> Result<(), AnswerError> {
        let prepaid = self.prepaid.min(bytes);
        self.prepaid -= prepaid;
        if bytes > prepaid {
            self.claim.grow(bytes - prepaid).await?;
        }
        Ok(())
    }

    /// Rewrites the value of the head's last field with `value` of the same length (the
    /// head is already in the buffer, ahead of the body). Returns whether it was rewritten.
    pub(super) fn rewrite_last_field(&mut self, value: &[u8]) -> bool {
        match self.last_value.clone() {
            Some(range) if range.len() == value.len() => {
                self.out[range].copy_from_slice(value);
                true
            }
            _ => false,
        }
    }

    /// Appends one piece of the body, once its bytes are drawn from the budget.
    pub(super) async fn body(&mut self, piece: &[u8]) -> Result<(), AnswerError> {
        if self.encoder.is_none() {
            return Err(AnswerError::NoHead);
        }
        if piece.is_empty() {
            return Ok(());
        }
        // The piece and its length prefix, which is what the encoder writes.
        let framing = varint::encoded_len(piece.len() as u64);
        self.draw(piece.len() + framing).await?;
        let encoder = self.encoder.as_mut().ok_or(AnswerError::NoHead)?;
        encoder.body(piece, &mut self.out);
        Ok(())
    }

    /// Ends the message and pads it to its size bucket, the padding drawn from the budget
    /// too; then only sealing is left, which cannot wait.
    pub(super) async fn end(&mut self) -> Result<(), AnswerError> {
        let encoder = self.encoder.take().ok_or(AnswerError::NoHead)?;
        let message = encoder.written() + 2;
        let padded = padding::bucket(message);
        self.draw(padded - message).await?;
        encoder.end(padded, &mut self.out);
        // What was claimed ahead and not used goes back now, not when the answer is written.
        self.claim.give_back(std::mem::take(&mut self.prepaid));
        Ok(())
    }

    /// Seals the ended answer in place.
    pub(super) fn seal(mut self, sealer: ResponseSealer) -> Result<SealedAnswer, AnswerError> {
        if self.out.len() < MESSAGE_START || self.encoder.is_some() {
            return Err(AnswerError::NoHead);
        }
        sealer.seal_in_place(&mut self.out, 1)?;
        Ok(SealedAnswer {
            bytes: Bytes::from(std::mem::take(&mut self.out)),
            claim: self.claim,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::gauge::Gauge;
    use tokengo_proto::{
        bhttp::{self, Field},
        key_config::KeyPair,
        ohttp,
    };

    use super::*;
    use crate::roles::exit::answer_budget::AnswerBudget;

    fn request() -> (ResponseSealer, ohttp::ResponseOpener) {
        let gateway = ohttp::Gateway::new(vec![KeyPair::from_seed(1, &[3; 32])]);
        let (enc, opener) =
            ohttp::encapsulate_request(&gateway.key_configs()[0], b"request").unwrap();
        (gateway.decapsulate(&enc).unwrap().1, opener)
    }

    fn head() -> ResponseHead {
        ResponseHead {
            status: 200,
            fields: vec![
                Field {
                    name: b"content-type".to_vec(),
                    value: b"application/json".to_vec(),
                },
                Field {
                    name: b"x-time".to_vec(),
                    value: b"000".to_vec(),
                },
            ],
        }
    }

    #[tokio::test]
    async fn an_answer_built_in_place_opens_and_its_claim_covers_every_byte() {
        let budget = AnswerBudget::new(
            64 << 20,
            Duration::from_secs(1),
            Gauge::default(),
            Gauge::default(),
        );
        let (sealer, opener) = request();
        let mut answer = SingleAnswer::new(budget.claim());
        answer.head(&head(), Some(300_000)).await.unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for piece in body.chunks(7_000) {
            answer.body(piece).await.unwrap();
        }
        assert!(answer.rewrite_last_field(b"123"));
        assert!(!answer.rewrite_last_field(b"1234"), "the length is fixed");
        answer.end().await.unwrap();
        let sealed = answer.seal(sealer).unwrap();
        assert!(sealed.claim.bytes() >= sealed.bytes.len());
        assert_eq!(budget.held(), sealed.claim.bytes());
        assert_eq!(sealed.bytes[0], Status::Ok as u8);
        let message = opener.open(&sealed.bytes[1..]).unwrap();
        assert_eq!(message.len(), padding::bucket(message.len()), "padded");
        let (got, got_body) = bhttp::decode_response(&message, &bhttp::Limits::default()).unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.fields[1].value, b"123");
        assert_eq!(got_body, body);
        drop(sealed);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_spent_budget_stops_the_answer_and_gives_its_bytes_back() {
        let budget = AnswerBudget::new(
            1 << 20,
            Duration::from_millis(20),
            Gauge::default(),
            Gauge::default(),
        );
        let mut answer = SingleAnswer::new(budget.claim());
        answer.head(&head(), None).await.unwrap();
        let piece = vec![0u8; 64 * 1024];
        let error = loop {
            if let Err(error) = answer.body(&piece).await {
                break error;
            }
        };
        assert!(matches!(error, AnswerError::Budget(_)), "{error}");
        assert!(budget.held() <= budget.limit() - budget.reserve());
        drop(answer);
        assert_eq!(budget.held(), 0);
    }
}

//! Single-message OHTTP at the exit: the request read whole and opened, the answer sealed
//! whole (held within the answer budget) and written at once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokengo_proto::{
    bhttp::{self, RequestHead, ResponseHead},
    frame::Status,
    ohttp, padding,
};
use tracing::Instrument as _;

use crate::{
    net::stream::{self, StreamReader},
    roles::exit::{backend::BackendRequest, single_answer::SingleAnswer},
    web::api_error::ApiError,
    web::http_message,
};

use super::{Accept, Answered, Gateway, Refusal, Tally, backend_span, response_head};

impl Gateway {
    /// RFC 9458 single message: the whole request, then the whole response.
    pub(super) async fn single(
        &self,
        reader: &mut StreamReader,
        send: &mut quinn::SendStream,
        tally: &mut Tally,
        accept: Accept,
    ) -> Result<Answered, Refusal> {
        let max = self.limits.max_request_body.saturating_add(64 * 1024);
        let encapsulated =
            tokio::time::timeout(self.backend.idle_timeout(), reader.read_to_end(max))
                .await
                .map_err(|_| Refusal::Malformed("request body timed out".into()))?
                .map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.not_replayed(ohttp::enc_of(&encapsulated))?;
        let keys = self.keys();
        self.metrics.decapsulations.inc();
        let (message, sealer) = keys
            .decapsulate(&encapsulated)
            .map_err(Refusal::from_ohttp)?;
        accept
            .announce(send, self.limits.write_stall_timeout)
            .await?;
        let limits = self.bhttp_limits();
        // Answered by the exit itself when unreadable, or refused by the gate (checked after
        // decapsulation, so only authentic requests can fill the replay window).
        let admitted = bhttp::decode_request(&message, &limits)
            .map_err(|error| self.failed(&ApiError::BadRequest(error.to_string())))
            .and_then(|(mut head, body)| {
                self.gate(ohttp::enc_of(&encapsulated), &mut head)?;
                Ok((head, body))
            });
        let (head, body) = match admitted {
            Ok(request) => request,
            Err((head, body)) => {
                write_single(
                    send,
                    sealer,
                    &head,
                    &body,
                    tally,
                    None,
                    self.limits.write_stall_timeout,
                )
                .await?;
                return Ok(Answered::ByExit);
            }
        };
        self.answer_single(send, sealer, &head, Bytes::from(body), tally)
            .await
    }

    /// Calls the backend and sends its answer as one sealed message, built under the
    /// exit's answer budget. When the budget stays spent the user gets an encrypted 503
    /// instead, and the bytes collected so far are given back at once.
    async fn answer_single(
        &self,
        send: &mut quinn::SendStream,
        sealer: ohttp::ResponseSealer,
        head: &RequestHead,
        body: Bytes,
        tally: &mut Tally,
    ) -> Result<Answered, Refusal> {
        let stall = self.limits.write_stall_timeout;
        let exchanged = self.exchange_single(head, body).await;
        let (answer, backend) = match exchanged {
            Ok(answered) => answered,
            Err(error) => {
                let (head, body) = self.failed(&error);
                write_single(send, sealer, &head, &body, tally, None, stall).await?;
                return Ok(Answered::ByExit);
            }
        };
        let sealed = answer
            .seal(sealer)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        tally.done(Some(backend));
        stream::write_bounded(send, sealed.bytes, stall)
            .await
            .map_err(|_| Refusal::Stream)?;
        let _ = send.finish();
        // Only now, with the relay holding the answer, are its bytes given back.
        drop(sealed.claim);
        Ok(Answered::ByBackend)
    }

    /// Calls the backend and collects its whole response into a [`SingleAnswer`] as it
    /// arrives, each piece drawn from the answer budget first (single-message mode). The
    /// response head tells the client the backend's time, written once the body is in.
    async fn exchange_single(
        &self,
        head: &RequestHead,
        body: Bytes,
    ) -> Result<(SingleAnswer, Duration), ApiError> {
        let request = BackendRequest::from_bhttp(head, body, self.backend.policy())?;
        tracing::Span::current().record("http.request.method", request.method.as_str());
        let span = backend_span();
        let exchange = async {
            let started = Instant::now();
            let response = self.call(request).await?;
            let mut head = response_head(&response);
            head.fields
                .push(http_message::backend_time_field_fixed(Duration::ZERO));
            let expected = response
                .content_length()
                .and_then(|len| usize::try_from(len).ok())
                .filter(|len| *len <= self.limits.max_response_body);
            let mut answer = SingleAnswer::new(self.answers.claim());
            answer
                .head(&head, expected)
                .await
                .map_err(|e| self.answer_failed(&e))?;
            let mut received = 0usize;
            let mut stream = response.bytes_stream();
            while let Some(chunk) = self.next_piece(&mut stream).await? {
                let chunk = chunk.map_err(|error| crate::roles::exit::backend::classify(&error))?;
                received = received.saturating_add(chunk.len());
                if received > self.limits.max_response_body {
                    return Err(ApiError::BackendFailed(format!(
                        "response larger than {} bytes; use streaming",
                        self.limits.max_response_body
                    )));
                }
                self.received(chunk.len());
                answer
                    .body(&chunk)
                    .await
                    .map_err(|e| self.answer_failed(&e))?;
            }
            let total = started.elapsed();
            answer.rewrite_last_field(&http_message::backend_time_fixed(total));
            answer.end().await.map_err(|e| self.answer_failed(&e))?;
            Ok::<_, ApiError>((answer, total, head.status))
        }
        .instrument(span.clone())
        .await;
        match exchange {
            Ok((answer, total, status)) => {
                tracing::Span::current().record("http.response.status_code", i64::from(status));
                Ok((answer, total))
            }
            Err(error) => {
                span.record("otel.status_code", "error");
                Err(error)
            }
        }
    }
}

async fn write_single(
    send: &mut quinn::SendStream,
    sealer: ohttp::ResponseSealer,
    head: &ResponseHead,
    body: &[u8],
    tally: &mut Tally,
    backend: Option<Duration>,
    stall: Duration,
) -> Result<(), Refusal> {
    let padded = padding::bucket(bhttp::encoded_response_len(head, body.len()));
    let message =
        bhttp::encode_response(head, body, padded).map_err(|e| Refusal::Internal(e.to_string()))?;
    let sealed = sealer
        .seal(&message)
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    let mut out = Vec::with_capacity(1 + sealed.len());
    out.push(Status::Ok as u8);
    out.extend_from_slice(&sealed);
    tally.done(backend);
    stream::write_bounded(send, Bytes::from(out), stall)
        .await
        .map_err(|_| Refusal::Stream)?;
    let _ = send.finish();
    Ok(())
}

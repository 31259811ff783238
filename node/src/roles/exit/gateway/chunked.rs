//! Chunked OHTTP at the exit: the request read chunk by chunk (its `enc` checked against
//! replay first), the answer sealed and sent one chunk per piece the backend produces.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokengo_proto::{
    bhttp::{RequestDecoder, RequestEvent, RequestHead, ResponseHead, StreamingEncoder},
    chunked::{ChunkedRequestOpener, ChunkedResponseSealer},
    frame::{self, Status},
    ohttp, padding,
};
use tracing::Instrument as _;

use crate::{
    net::stream::{self, ChunkError, StreamReader},
    ops::metrics::ErrorClass,
    roles::exit::backend::BackendRequest,
    web::api_error::ApiError,
    web::http_message,
};

use super::{Accept, Answered, Gateway, Refusal, Tally, backend_span, response_head};

impl Gateway {
    /// Reads a chunked request whole. Failures before anything decrypted are refusals (a
    /// status byte); once the request has opened, an unusable request is answered encrypted.
    async fn read_chunked(
        &self,
        reader: &mut StreamReader,
        opener: &mut ChunkedRequestOpener,
    ) -> Result<ChunkedRead, Refusal> {
        let mut decoder = RequestDecoder::new(self.bhttp_limits());
        let mut head = None;
        let mut body = BytesMut::new();
        let mut finished = false;
        let deadline = self.backend.idle_timeout();
        let unusable = |error: String| ChunkedRead::Unusable(ApiError::BadRequest(error));
        self.check_replay(reader, deadline).await?;
        while !finished {
            let chunk = reader
                .next_chunk(opener, deadline, |_| {})
                .await
                .map_err(|error| match error {
                    ChunkError::Open(error) => Refusal::from_ohttp(error),
                    ChunkError::Silent => Refusal::Malformed("request timed out".into()),
                    ChunkError::Stream(_) => Refusal::Stream,
                    ChunkError::Truncated => Refusal::Undecryptable("truncated request".into()),
                })?;
            finished = chunk.last;
            let mut plain = BytesMut::from(&chunk.data[..]);
            loop {
                // Only once the final chunk opened is the message known to be complete, and
                // may what is left finish it (RFC 9292 lets empty sections be omitted).
                let next = if finished {
                    decoder.decode_eof(&mut plain)
                } else {
                    decoder.decode(&mut plain)
                };
                let event = match next {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(error) => return Ok(unusable(error.to_string())),
                };
                match event {
                    RequestEvent::Head(h) => head = Some(h),
                    RequestEvent::Body(bytes) => {
                        if body.len() + bytes.len() > self.limits.max_request_body {
                            return Ok(ChunkedRead::Unusable(ApiError::PayloadTooLarge {
                                limit: self.limits.max_request_body,
                            }));
                        }
                        body.extend_from_slice(&bytes);
                    }
                    RequestEvent::End => {}
                }
            }
        }
        if let Err(error) = decoder.finish() {
            return Ok(unusable(error.to_string()));
        }
        Ok(match head {
            Some(head) => ChunkedRead::Request(head, body.freeze()),
            None => unusable("request without head".into()),
        })
    }

    /// Checks a chunked request's `enc` against replay before anything is decapsulated: it
    /// comes first, in the request header. A stream that ends before it is left to the chunk
    /// reader to report (as truncated).
    async fn check_replay(
        &self,
        reader: &mut StreamReader,
        deadline: Duration,
    ) -> Result<(), Refusal> {
        loop {
            if let Some(enc) = ohttp::enc_of(reader.buffer()) {
                self.not_replayed(Some(enc))?;
                self.metrics.decapsulations.inc();
                return Ok(());
            }
            let more = tokio::time::timeout(deadline, reader.fill())
                .await
                .map_err(|_| Refusal::Malformed("request timed out".into()))?
                .map_err(|_| Refusal::Stream)?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Chunked OHTTP: the request is read chunk by chunk; the response is sealed and sent one
    /// chunk per piece the backend produces, so every SSE event reaches the user at once.
    pub(super) async fn chunked(
        &self,
        reader: &mut StreamReader,
        send: &mut quinn::SendStream,
        tally: &mut Tally,
        accept: Accept,
    ) -> Result<Answered, Refusal> {
        let keys = self.keys();
        let mut opener = keys.chunked_request();
        let read = self.read_chunked(reader, &mut opener).await?;
        let (sealer, nonce) = opener.response_sealer().map_err(Refusal::from_ohttp)?;
        let mut out = ChunkedWriter {
            send,
            sealer,
            encoder: None,
            stall: self.limits.write_stall_timeout,
        };
        out.start(&nonce, accept).await?;
        let (mut head, body) = match read {
            ChunkedRead::Request(head, body) => (head, body),
            ChunkedRead::Unusable(error) => {
                out.whole(self.failed(&error), tally).await?;
                return Ok(Answered::ByExit);
            }
        };
        if let Err(answer) = self.gate(opener.enc(), &mut head) {
            out.whole(answer, tally).await?;
            return Ok(Answered::ByExit);
        }
        let request = match BackendRequest::from_bhttp(&head, body, self.backend.policy()) {
            Ok(request) => request,
            Err(error) => {
                out.whole(self.failed(&error), tally).await?;
                return Ok(Answered::ByExit);
            }
        };
        tracing::Span::current().record("http.request.method", request.method.as_str());
        let span = backend_span();
        let started = Instant::now();
        let response = match self.call(request).instrument(span.clone()).await {
            Ok(response) => response,
            Err(error) => {
                span.record("otel.status_code", "error");
                drop(span);
                out.whole(self.failed(&error), tally).await?;
                return Ok(Answered::ByExit);
            }
        };
        // The head goes out as soon as the backend's arrives, so the client learns the
        // backend's time to its response head; the full time only the exit's metrics see.
        let mut head = response_head(&response);
        head.fields
            .push(http_message::backend_time_field(started.elapsed()));
        tracing::Span::current().record("http.response.status_code", i64::from(head.status));
        let relayed = self
            .stream_answer(&mut out, &head, response, started)
            .instrument(span)
            .await?;
        out.finish(tally, Some(relayed)).await?;
        Ok(Answered::ByBackend)
    }

    /// The streaming half: the backend's response head, then each piece of its body sealed
    /// and sent as it arrives. Returns the backend's whole time. A backend that fails once the
    /// head went out can only break the stream, which the client reports as truncated.
    async fn stream_answer(
        &self,
        out: &mut ChunkedWriter<'_>,
        head: &ResponseHead,
        response: reqwest::Response,
        started: Instant,
    ) -> Result<Duration, Refusal> {
        out.head(head).await?;
        let mut stream = response.bytes_stream();
        loop {
            let piece = match self.next_piece(&mut stream).await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(error) => {
                    tracing::info!(%error, "backend went silent mid-response");
                    tracing::Span::current().record("otel.status_code", "error");
                    return Err(Refusal::Backend(ErrorClass::from(&error)));
                }
            };
            match piece {
                Ok(bytes) => {
                    self.received(bytes.len());
                    out.body(&bytes).await?;
                }
                Err(error) => {
                    let error = crate::roles::exit::backend::classify(&error);
                    tracing::info!(%error, "backend stream failed mid-response");
                    tracing::Span::current().record("otel.status_code", "error");
                    return Err(Refusal::Backend(ErrorClass::from(&error)));
                }
            }
        }
        Ok(started.elapsed())
    }
}

/// A chunked request read whole, or why it cannot be served.
enum ChunkedRead {
    Request(RequestHead, Bytes),
    /// Decrypted but unusable (malformed inside, too large): answered encrypted.
    Unusable(ApiError),
}

/// Seals and writes a chunked response.
struct ChunkedWriter<'a> {
    send: &'a mut quinn::SendStream,
    sealer: ChunkedResponseSealer,
    /// Set once the head is written.
    encoder: Option<StreamingEncoder>,
    /// How long a write may wait for a relay (and client) that takes no bytes.
    stall: Duration,
}

impl ChunkedWriter<'_> {
    /// Writes the status byte and the nonce, after `ACCEPTED` when `accept` says so (one
    /// write).
    async fn start(&mut self, nonce: &[u8], accept: Accept) -> Result<(), Refusal> {
        let mut first = Vec::with_capacity(2 + nonce.len());
        if accept.announce {
            first.push(frame::ACCEPTED);
        }
        first.push(Status::Ok as u8);
        first.extend_from_slice(nonce);
        self.write(first).await
    }

    async fn head(&mut self, head: &ResponseHead) -> Result<(), Refusal> {
        let mut plain = Vec::new();
        let encoder = StreamingEncoder::response(head, &mut plain)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        self.encoder = Some(encoder);
        self.seal(&plain).await
    }

    async fn body(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(Refusal::Stream);
        };
        if bytes.is_empty() {
            return Ok(());
        }
        let mut plain = Vec::with_capacity(bytes.len() + 8);
        encoder.body(bytes, &mut plain);
        self.seal(&plain).await
    }

    /// Seals and writes the final chunk; `tally` is completed right before it goes out.
    async fn finish(mut self, tally: &mut Tally, backend: Option<Duration>) -> Result<(), Refusal> {
        let encoder = self.encoder.take().ok_or(Refusal::Stream)?;
        // The padding hides the total size in a bucket; per-chunk sizes still show timing
        // and event sizes to the relay, which is the price of streaming.
        let padded = padding::bucket(encoder.written() + 2);
        let mut plain = Vec::new();
        encoder.end(padded, &mut plain);
        let sealed = self
            .sealer
            .seal_split(&plain, true)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        tally.done(backend);
        self.write(sealed).await?;
        let _ = self.send.finish();
        Ok(())
    }

    async fn whole(
        mut self,
        (head, body): (ResponseHead, Bytes),
        tally: &mut Tally,
    ) -> Result<(), Refusal> {
        self.head(&head).await?;
        self.body(&body).await?;
        self.finish(tally, None).await
    }

    async fn seal(&mut self, plain: &[u8]) -> Result<(), Refusal> {
        let sealed = self
            .sealer
            .seal_split(plain, false)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        self.write(sealed).await
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Refusal> {
        stream::write_bounded(self.send, Bytes::from(bytes), self.stall)
            .await
            .map_err(|_| Refusal::Stream)
    }
}

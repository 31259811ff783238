//! The exit's request path: decapsulate the OHTTP request arriving on a tunnel stream, call
//! the backend, and send the answer back encrypted as it arrives. Nothing readable ever leaves
//! here: backend failures travel as encrypted HTTP error responses.

use std::{sync::Arc, sync::RwLock, time::Duration};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use tokengo_proto::{
    bhttp::{self, RequestDecoder, RequestEvent, RequestHead, ResponseHead, StreamingEncoder},
    chunked::ChunkedResponseSealer,
    frame::{ExitRequest, MediaType, Status},
    ohttp::{self, OhttpError},
    padding,
};

use super::{
    backend::{Backend, BackendRequest},
    replay::ReplayWindow,
};
use crate::{
    api_error::ApiError,
    config::Limits,
    http_message,
    stream::{StreamReader, code},
};

/// How long the relay may take to deliver a stream's header.
const HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// Decapsulates requests and calls the backend.
#[derive(Debug)]
pub struct Gateway {
    ohttp: RwLock<Arc<ohttp::Gateway>>,
    backend: Backend,
    replay: ReplayWindow,
    limits: Limits,
}

/// Why a request stream failed before a response could be encrypted; answered with a status.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    #[error("cannot decapsulate: {0}")]
    Undecryptable(String),
    #[error("replayed request")]
    Replay,
    #[error("stream failed")]
    Stream,
}

impl Refusal {
    fn status(&self) -> Option<Status> {
        match self {
            Self::Malformed(_) => Some(Status::Malformed),
            Self::UnknownKey(_) => Some(Status::KeyUnknown),
            Self::Undecryptable(_) | Self::Replay => Some(Status::Undecryptable),
            Self::Stream => None,
        }
    }

    fn from_ohttp(error: OhttpError) -> Self {
        match error {
            OhttpError::UnknownKey(id) => Self::UnknownKey(id),
            other => Self::Undecryptable(other.to_string()),
        }
    }
}

impl Gateway {
    /// A gateway with `ohttp` keys calling `backend`.
    #[must_use]
    pub fn new(ohttp: ohttp::Gateway, backend: Backend, limits: Limits) -> Self {
        Self {
            ohttp: RwLock::new(Arc::new(ohttp)),
            backend,
            replay: ReplayWindow::new(Duration::from_secs(600), 1 << 18),
            limits,
        }
    }

    /// Swaps in new keys (rotation); requests in flight keep the keys they started with.
    pub fn set_keys(&self, ohttp: ohttp::Gateway) {
        *self
            .ohttp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ohttp);
    }

    fn keys(&self) -> Arc<ohttp::Gateway> {
        Arc::clone(
            &self
                .ohttp
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The backend.
    #[must_use]
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Serves one request stream opened by the relay.
    pub async fn handle(self: Arc<Self>, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut reader = StreamReader::new(recv);
        let outcome = match reader
            .decode(16, HEADER_DEADLINE, ExitRequest::decode)
            .await
        {
            Ok(ExitRequest {
                media: MediaType::Single,
            }) => self.single(&mut reader, &mut send).await,
            Ok(ExitRequest {
                media: MediaType::Chunked,
            }) => self.chunked(&mut reader, &mut send).await,
            Err(error) => Err(Refusal::Malformed(error.to_string())),
        };
        if let Err(refusal) = outcome {
            tracing::debug!(%refusal, "request refused");
            reader.stop(code::PROTOCOL);
            match refusal.status() {
                Some(status) => {
                    if send.write_all(&[status as u8]).await.is_ok() {
                        let _ = send.finish();
                    }
                }
                None => {
                    let _ = send.reset(code::ABANDONED);
                }
            }
        }
    }

    /// RFC 9458 single message: the whole request, then the whole response.
    async fn single(
        &self,
        reader: &mut StreamReader,
        send: &mut quinn::SendStream,
    ) -> Result<(), Refusal> {
        let max = self.limits.max_request_body.saturating_add(64 * 1024);
        let encapsulated =
            tokio::time::timeout(self.backend.idle_timeout(), reader.read_to_end(max))
                .await
                .map_err(|_| Refusal::Malformed("request body timed out".into()))?
                .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let keys = self.keys();
        let (message, sealer) = keys
            .decapsulate(&encapsulated)
            .map_err(Refusal::from_ohttp)?;
        // Checked after decapsulation so only authentic requests can fill the window.
        if !ohttp::enc_of(&encapsulated).is_some_and(|enc| self.replay.admit(enc)) {
            return Err(Refusal::Replay);
        }
        let limits = self.bhttp_limits();
        let (head, body) = match bhttp::decode_request(&message, &limits) {
            Ok(request) => request,
            Err(error) => {
                let (head, body) = error_response(&ApiError::BadRequest(error.to_string()));
                return write_single(send, sealer, &head, &body).await;
            }
        };
        let (head, body) = self.exchange_whole(&head, Bytes::from(body)).await;
        write_single(send, sealer, &head, &body).await
    }

    /// Calls the backend and collects the whole response (single-message mode).
    async fn exchange_whole(&self, head: &RequestHead, body: Bytes) -> (ResponseHead, Bytes) {
        let request = match BackendRequest::from_bhttp(head, body) {
            Ok(request) => request,
            Err(error) => return error_response(&error),
        };
        let response = match self.backend.send(request).await {
            Ok(response) => response,
            Err(error) => return error_response(&error),
        };
        let head = response_head(&response);
        let mut body = BytesMut::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) if body.len() + chunk.len() <= self.limits.max_response_body => {
                    body.extend_from_slice(&chunk);
                }
                Ok(_) => {
                    return error_response(&ApiError::BackendFailed(format!(
                        "response larger than {} bytes; use streaming",
                        self.limits.max_response_body
                    )));
                }
                Err(error) => return error_response(&super::backend::classify(&error)),
            }
        }
        (head, body.freeze())
    }

    /// Chunked OHTTP: the request is read chunk by chunk; the response is sealed and sent one
    /// chunk per piece the backend produces, so every SSE event reaches the user at once.
    async fn chunked(
        &self,
        reader: &mut StreamReader,
        send: &mut quinn::SendStream,
    ) -> Result<(), Refusal> {
        let keys = self.keys();
        let mut opener = keys.chunked_request();
        let mut decoder = RequestDecoder::new(self.bhttp_limits());
        let mut head = None;
        let mut body = BytesMut::new();
        let mut admitted = false;
        let mut finished = false;
        let deadline = self.backend.idle_timeout();
        while !finished {
            let chunk = if let Some(chunk) = opener
                .decode(reader.buffer())
                .map_err(Refusal::from_ohttp)?
            {
                chunk
            } else if tokio::time::timeout(deadline, reader.fill())
                .await
                .map_err(|_| Refusal::Malformed("request timed out".into()))?
                .map_err(|_| Refusal::Stream)?
            {
                continue;
            } else {
                match opener
                    .decode_eof(reader.buffer())
                    .map_err(Refusal::from_ohttp)?
                {
                    Some(chunk) => chunk,
                    None => return Err(Refusal::Undecryptable("truncated request".into())),
                }
            };
            if !admitted {
                let enc = opener
                    .enc()
                    .ok_or(Refusal::Undecryptable("no header".into()))?;
                if !self.replay.admit(enc) {
                    return Err(Refusal::Replay);
                }
                admitted = true;
            }
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
                let Some(event) = next.map_err(|e| Refusal::Malformed(e.to_string()))? else {
                    break;
                };
                match event {
                    RequestEvent::Head(h) => head = Some(h),
                    RequestEvent::Body(bytes) => {
                        if body.len() + bytes.len() > self.limits.max_request_body {
                            return Err(Refusal::Malformed("request body too large".into()));
                        }
                        body.extend_from_slice(&bytes);
                    }
                    RequestEvent::End => {}
                }
            }
        }
        decoder
            .finish()
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let head = head.ok_or_else(|| Refusal::Malformed("request without head".into()))?;
        let (sealer, nonce) = opener.response_sealer().map_err(Refusal::from_ohttp)?;
        let mut out = ChunkedWriter {
            send,
            sealer,
            encoder: None,
        };
        out.start(&nonce).await?;
        let request = match BackendRequest::from_bhttp(&head, body.freeze()) {
            Ok(request) => request,
            Err(error) => return out.whole(error_response(&error)).await,
        };
        let response = match self.backend.send(request).await {
            Ok(response) => response,
            Err(error) => return out.whole(error_response(&error)).await,
        };
        out.head(&response_head(&response)).await?;
        let mut stream = response.bytes_stream();
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(bytes) => out.body(&bytes).await?,
                Err(error) => {
                    // The status is already sent: the only honest signal left is to break the
                    // stream, which the client reports as a truncated response.
                    tracing::info!(error = %super::backend::classify(&error), "backend stream failed mid-response");
                    return Err(Refusal::Stream);
                }
            }
        }
        out.finish().await
    }

    fn bhttp_limits(&self) -> bhttp::Limits {
        bhttp::Limits {
            max_body: self.limits.max_request_body,
            ..bhttp::Limits::default()
        }
    }
}

/// Seals and writes a chunked response.
struct ChunkedWriter<'a> {
    send: &'a mut quinn::SendStream,
    sealer: ChunkedResponseSealer,
    /// Set once the head is written.
    encoder: Option<StreamingEncoder>,
}

impl ChunkedWriter<'_> {
    async fn start(&mut self, nonce: &[u8]) -> Result<(), Refusal> {
        let mut first = Vec::with_capacity(1 + nonce.len());
        first.push(Status::Ok as u8);
        first.extend_from_slice(nonce);
        self.write(first).await
    }

    async fn head(&mut self, head: &ResponseHead) -> Result<(), Refusal> {
        let mut plain = Vec::new();
        let encoder = StreamingEncoder::response(head, &mut plain)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
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

    async fn finish(mut self) -> Result<(), Refusal> {
        let encoder = self.encoder.take().ok_or(Refusal::Stream)?;
        // The padding hides the total size in a bucket; per-chunk sizes still show timing
        // and event sizes to the relay, which is the price of streaming.
        let padded = padding::bucket(encoder.written() + 2);
        let mut plain = Vec::new();
        encoder.end(padded, &mut plain);
        let sealed = self
            .sealer
            .seal_split(&plain, true)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.write(sealed).await?;
        let _ = self.send.finish();
        Ok(())
    }

    async fn whole(mut self, (head, body): (ResponseHead, Bytes)) -> Result<(), Refusal> {
        self.head(&head).await?;
        self.body(&body).await?;
        self.finish().await
    }

    async fn seal(&mut self, plain: &[u8]) -> Result<(), Refusal> {
        let sealed = self
            .sealer
            .seal_split(plain, false)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.write(sealed).await
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Refusal> {
        self.send
            .write_chunk(Bytes::from(bytes))
            .await
            .map_err(|_| Refusal::Stream)
    }
}

async fn write_single(
    send: &mut quinn::SendStream,
    sealer: ohttp::ResponseSealer,
    head: &ResponseHead,
    body: &[u8],
) -> Result<(), Refusal> {
    let padded = padding::bucket(bhttp::encoded_response_len(head, body.len()));
    let message = bhttp::encode_response(head, body, padded)
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let sealed = sealer
        .seal(&message)
        .map_err(|e| Refusal::Undecryptable(e.to_string()))?;
    let mut out = Vec::with_capacity(1 + sealed.len());
    out.push(Status::Ok as u8);
    out.extend_from_slice(&sealed);
    send.write_chunk(Bytes::from(out))
        .await
        .map_err(|_| Refusal::Stream)?;
    let _ = send.finish();
    Ok(())
}

fn response_head(response: &reqwest::Response) -> ResponseHead {
    ResponseHead {
        status: response.status().as_u16(),
        fields: http_message::to_fields(response.headers(), |_| false),
    }
}

/// An error as the HTTP response the user's tool will see (encrypted by the caller).
fn error_response(error: &ApiError) -> (ResponseHead, Bytes) {
    let head = ResponseHead {
        status: error.status().as_u16(),
        fields: vec![bhttp::Field {
            name: b"content-type".to_vec(),
            value: b"application/json".to_vec(),
        }],
    };
    (head, Bytes::from(error.body()))
}

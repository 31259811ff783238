//! The client's HTTP surface: any method and path, turned into an OHTTP request to an exit and
//! back. Single messages (RFC 9458) for answers that arrive whole; chunked OHTTP when the
//! answer may stream, so each event reaches the user's tool the moment the exit sends it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{body::Body, extract::State, response::Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderName, StatusCode, request::Parts};
use libp2p_identity::PeerId;
use tokengo_proto::{
    bhttp::{
        self, BhttpError, RequestHead, ResponseDecoder, ResponseEvent, ResponseHead,
        StreamingEncoder,
    },
    chunked::{self, ChunkedResponseOpener},
    frame::{self, AnswerEvent, AnswerStart, ClientRequest, MediaType, Status},
    ohttp, padding,
};
use tracing::{Instrument as _, field::Empty};

use super::{
    ClientState,
    access::{self, ClientPolicy},
    body,
    directory::Route,
};
use crate::{
    net::stream::{ChunkError, StreamReader, code},
    ops::metrics::{
        ClientMetrics, ErrorClass, Flow, InFlight, Media, MediaLabel, StatusClass, StatusLabel,
    },
    web::api_error::ApiError,
    web::http_message,
};

/// How much longer than the request timeout the client waits for the exit, so the exit
/// reports a backend timeout first.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(30);
/// Exits tried per request when the relay says an exit is gone or busy.
const MAX_ATTEMPTS: usize = 3;

/// Proxies one request.
pub(super) async fn handle(
    State(state): State<Arc<ClientState>>,
    request: http::Request<Body>,
) -> Response {
    if access::is_preflight(request.method(), request.headers()) {
        return preflight(&state, &request);
    }
    let cors_origin = state.policy.cors_origin(request.headers());
    let started = Instant::now();
    let metrics = &state.metrics;
    // Counted until the response body ends, so a long stream stays in flight while it runs.
    let in_flight = InFlight::start(&metrics.requests_in_flight);
    // A root span: whatever trace context the user's tool sent is not continued here (and
    // never forwarded: see `request_head`), and this span's ids never leave the client.
    let span = tracing::info_span!(
        parent: None,
        "client.request",
        otel.kind = "server",
        http.request.method = %request.method(),
        tokengo.media = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    let outcome = proxy(&state, request).instrument(span.clone()).await;
    let response = match outcome {
        Ok(Proxied {
            response,
            media,
            backend,
        }) => {
            if let Some(backend) = backend {
                let label = MediaLabel { media };
                metrics
                    .backend_latency
                    .get_or_create(&label)
                    .observe(backend);
                metrics
                    .gateway_overhead
                    .get_or_create(&label)
                    .observe(started.elapsed().saturating_sub(backend));
            }
            response
        }
        Err(error) => {
            metrics.error(ErrorClass::from(&error));
            span.record("otel.status_code", "error");
            error_response(&error)
        }
    };
    let mut response = response;
    if let Some(origin) = cors_origin {
        // A web page of an allowed origin may read the answer.
        let headers = response.headers_mut();
        headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.append(http::header::VARY, http::HeaderValue::from_static("Origin"));
    }
    let status = response.status().as_u16();
    span.record("http.response.status_code", i64::from(status));
    metrics
        .responses
        .get_or_create(&StatusLabel {
            status_class: StatusClass::of(status),
        })
        .inc();
    response.map(|inner| Body::new(body::Tracked::new(inner, in_flight)))
}

/// Answers a CORS preflight here: from an allowed origin (and host) with what the browser
/// needs to send the real request, from any other with the refusal.
fn preflight(state: &ClientState, request: &http::Request<Body>) -> Response {
    let authority = request.uri().authority().map(http::uri::Authority::as_str);
    if let Err(error) = state.policy.check(request.headers(), authority) {
        state.metrics.error(ErrorClass::from(&error));
        return error_response(&error);
    }
    let Some(origin) = state.policy.cors_origin(request.headers()) else {
        return error_response(&ApiError::Forbidden {
            code: "origin_not_allowed",
            message: "a preflight with more than one Origin".into(),
        });
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    *response.headers_mut() = access::preflight_headers(origin, request.headers());
    response
}

/// A response on its way to the user, with what the metrics need to know about it.
struct Proxied {
    response: Response,
    media: Media,
    /// The backend's time as the exit reported it (until the response head when streamed).
    backend: Option<Duration>,
}

/// The user's error as an HTTP response.
#[must_use]
pub(super) fn error_response(error: &ApiError) -> Response {
    tracing::debug!(%error, "request failed before reaching the backend");
    let mut response = Response::new(Body::from(error.body()));
    *response.status_mut() = error.status();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What went wrong with one exit, and whether another may be tried.
enum AttemptError {
    /// The exit never saw the request: safe to try again (another exit, or fresh keys).
    Retry(ApiError),
    /// The relay could not be reached: the exit never saw the request; another relay may
    /// reach it.
    RelayDown(ApiError),
    /// The exit no longer holds the key the request was encrypted to (it rotated): it
    /// never opened the request; the same exit is tried once more with its fresh keys.
    KeyUnknown(ApiError),
    /// Stop and report.
    Fatal(ApiError),
}

async fn proxy(state: &ClientState, request: http::Request<Body>) -> Result<Proxied, ApiError> {
    let (parts, body) = request.into_parts();
    state.policy.check(
        &parts.headers,
        parts.uri.authority().map(http::uri::Authority::as_str),
    )?;
    let limit = state.limits.max_request_body;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    let media = if may_stream(&parts, &body) {
        MediaType::Chunked
    } else {
        MediaType::Single
    };
    let kind = Media::from(media);
    tracing::Span::current().record("tokengo.media", kind.as_str());
    state
        .metrics
        .requests
        .get_or_create(&MediaLabel { media: kind })
        .inc();
    let head = request_head(&parts, &state.policy, std::time::SystemTime::now());
    let model = model_of(&body);
    let mut excluded: Vec<PeerId> = Vec::new();
    let mut last_error = ApiError::NoExit;
    let mut refresh = false;
    // An exit that answered "key unknown", to try again with its fresh keys before anything
    // else (once per request: it is not counted as an attempt).
    let mut fresh_keys: Option<(PeerId, Instant)> = None;
    let mut key_retried = false;
    let mut number = 0;
    while number < MAX_ATTEMPTS {
        let again = match fresh_keys.take() {
            Some((exit, since)) => state.directory.route_to(exit, since).await,
            None => None,
        };
        if again.is_none() {
            number += 1;
        }
        let route = match again {
            Some(route) => Ok(route),
            None => {
                state
                    .directory
                    .route(model.as_deref(), &excluded, refresh)
                    .await
            }
        };
        let route = match route {
            Ok(route) => route,
            // Nothing left to try: the last attempt's error says more than "no exit", unless
            // the user pinned exits (then the answer names them and what was tried).
            Err(ApiError::PinnedExitsUnavailable { pinned, mut tried }) => {
                if number > 1 {
                    tried = format!("{tried}; this request's last attempt: {last_error}");
                }
                return Err(ApiError::PinnedExitsUnavailable { pinned, tried });
            }
            Err(error) if number == 1 => return Err(error),
            Err(_) => break,
        };
        let span = tracing::info_span!(
            "client.attempt",
            tokengo.attempt = i64::try_from(number).unwrap_or(i64::MAX)
        );
        match attempt(state, &route, media, &head, &body)
            .instrument(span)
            .await
        {
            Ok((response, backend)) => {
                return Ok(Proxied {
                    response,
                    media: kind,
                    backend,
                });
            }
            Err(AttemptError::Fatal(error)) => return Err(error),
            Err(AttemptError::KeyUnknown(error)) if !key_retried => {
                tracing::debug!(exit = %route.exit.peer_id, "exit rotated its keys; retrying it with fresh keys");
                state.metrics.retries.inc();
                key_retried = true;
                fresh_keys = Some((route.exit.peer_id, Instant::now()));
                // Tried again at once, or (no longer usable) excluded like any failed exit.
                excluded.push(route.exit.peer_id);
                refresh = true;
                last_error = error;
            }
            Err(AttemptError::KeyUnknown(error) | AttemptError::Retry(error)) => {
                tracing::debug!(exit = %route.exit.peer_id, %error, "retrying with fresh exit lists");
                state.metrics.retries.inc();
                state.directory.exit_failed(route.exit.peer_id);
                excluded.push(route.exit.peer_id);
                refresh = true;
                last_error = error;
            }
            Err(AttemptError::RelayDown(error)) => {
                tracing::debug!(relay = %route.link.relay(), %error, "relay unreachable; trying another route");
                state.metrics.retries.inc();
                state.directory.relay_failed(route.link.relay().peer_id());
                last_error = error;
            }
        }
    }
    Err(last_error)
}

/// Whether the answer may be a stream the user wants incrementally.
fn may_stream(parts: &Parts, body: &[u8]) -> bool {
    let accepts_sse = parts.headers.get_all(http::header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
    });
    if accepts_sse {
        return true;
    }
    #[derive(serde::Deserialize)]
    struct StreamFlag {
        stream: Option<bool>,
    }
    let flag = serde_json::from_slice::<StreamFlag>(body)
        .ok()
        .and_then(|f| f.stream);
    // Ollama's native API streams unless told not to; OpenAI-style APIs only when asked.
    let streams_by_default = parts.uri.path().starts_with("/api/");
    flag.unwrap_or(streams_by_default && !body.is_empty())
}

fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ModelField {
        model: Option<String>,
    }
    serde_json::from_slice::<ModelField>(body).ok()?.model
}

/// The BHTTP request head. Only the headers `policy` forwards leave the client: what a tool
/// sends besides (its name and version, OS and runtime, organisation and project ids, the
/// page that made the request, languages, the user's own API key, trace context) would tell
/// the exit and the backend which user or tool is asking. `User-Agent` is the same for every
/// user of this version, and `Date` (`now`) lets the exit refuse replays.
fn request_head(parts: &Parts, policy: &ClientPolicy, now: std::time::SystemTime) -> RequestHead {
    let dropped = |name: &HeaderName| {
        !policy.forwards(name)
            || http_message::is_trace_context(name)
            || http_message::is_backend_time(name)
    };
    let mut fields = http_message::to_fields(&parts.headers, dropped);
    fields.push(bhttp::Field {
        name: b"user-agent".to_vec(),
        value: http_message::USER_AGENT.as_bytes().to_vec(),
    });
    fields.push(http_message::date_field(now));
    RequestHead {
        method: parts.method.as_str().as_bytes().to_vec(),
        scheme: b"https".to_vec(),
        authority: Vec::new(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .as_bytes()
            .to_vec(),
        fields,
    }
}

async fn attempt(
    state: &ClientState,
    route: &Route,
    media: MediaType,
    head: &RequestHead,
    body: &[u8],
) -> Result<(Response, Option<Duration>), AttemptError> {
    let started = Instant::now();
    let exit = &route.exit;
    let head = &state.directory.tokens().request_head(head, &exit.peer_id);
    let (mut send, recv) = route
        .link
        .open()
        .await
        .map_err(|e| AttemptError::RelayDown(e.into()))?;
    let mut out = Vec::with_capacity(body.len() + 512);
    ClientRequest::Forward {
        exit_id: exit.peer_id.to_bytes(),
        media,
    }
    .encode(&mut out);
    let opener = match media {
        MediaType::Single => {
            let padded = padding::bucket(bhttp::encoded_request_len(head, body.len()));
            let message = bhttp::encode_request(head, body, padded)
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            let (encapsulated, opener) = ohttp::encapsulate_request(&exit.key_config, &message)
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            out.extend_from_slice(&encapsulated);
            Opener::Single(opener)
        }
        MediaType::Chunked => {
            let (mut sealer, header) = chunked::start_request(&exit.key_config)
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            let mut message = Vec::with_capacity(body.len() + 1024);
            let mut encoder = StreamingEncoder::request(head, &mut message)
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            encoder.body(body, &mut message);
            let padded = padding::bucket(encoder.written() + 2);
            encoder.end(padded, &mut message);
            out.extend_from_slice(&header);
            let response = sealer
                .response_opener()
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            let sealed = sealer
                .seal_split(&message, true)
                .map_err(|e| AttemptError::Fatal(ApiError::BadRequest(e.to_string())))?;
            out.extend_from_slice(&sealed);
            Opener::Chunked(Box::new(response))
        }
    };
    state.metrics.bytes(Flow::ToRelay, out.len());
    match send.write_chunk(Bytes::from(out)).await {
        // The exit (or relay) stopped reading because it has answered already (a request it
        // refused before reading it whole): the answer follows.
        Ok(()) | Err(quinn::WriteError::Stopped(_)) => {}
        // The relay connection died (a restarted relay resets it): another route.
        Err(quinn::WriteError::ConnectionLost(e)) => {
            return Err(AttemptError::RelayDown(ApiError::RelayUnreachable(
                e.to_string(),
            )));
        }
        Err(e) => {
            return Err(AttemptError::Retry(ApiError::ExitUnavailable(
                e.to_string(),
            )));
        }
    }
    let _ = send.finish();
    let mut reader = StreamReader::new(recv);
    let (status, start_len) =
        read_status(&mut reader, state.limits.request_timeout + TIMEOUT_MARGIN).await?;
    state.metrics.bytes(Flow::FromRelay, start_len);
    match status {
        Status::Ok => state.directory.succeeded(route, started.elapsed()),
        Status::KeyUnknown => {
            state.metrics.key_refreshes.inc();
            return Err(AttemptError::KeyUnknown(ApiError::ExitUnavailable(
                "exit rotated its keys".into(),
            )));
        }
        Status::NoSuchExit => {
            return Err(AttemptError::Retry(ApiError::ExitUnavailable(
                "exit no longer registered".into(),
            )));
        }
        Status::ExitUnavailable => {
            return Err(AttemptError::Retry(ApiError::ExitUnavailable(
                "exit went away".into(),
            )));
        }
        Status::Overloaded => return Err(AttemptError::Retry(ApiError::Overloaded)),
        Status::Malformed | Status::Undecryptable => {
            return Err(AttemptError::Fatal(ApiError::ExitUnavailable(
                "the exit could not read the request (incompatible version?)".into(),
            )));
        }
    }
    match opener {
        Opener::Single(opener) => single_response(state, reader, opener)
            .await
            .map_err(AttemptError::Fatal),
        Opener::Chunked(opener) => chunked_response(
            reader,
            *opener,
            Arc::clone(&state.metrics),
            state.limits.request_timeout + TIMEOUT_MARGIN,
        )
        .await
        .map_err(AttemptError::Fatal),
    }
}

enum Opener {
    Single(ohttp::ResponseOpener),
    Chunked(Box<ChunkedResponseOpener>),
}

/// Reads the start of the answer (version 2: `ACCEPTED`, then the status byte) and decides
/// what a failure means. Before `ACCEPTED` the exit cannot have passed the request to its
/// backend, so a stream that breaks is another exit's (or, when the relay connection died,
/// another route's) to try; after it, the request may have reached the backend and is never
/// sent again: the user gets an error that says so. Returns the status and how many bytes
/// the answer's start took (the relay forwarded them too).
async fn read_status(
    reader: &mut StreamReader,
    wait: Duration,
) -> Result<(Status, usize), AttemptError> {
    let mut start = AnswerStart::new(frame::VERSION);
    loop {
        let event = reader
            .decode(1, wait, |buf| start.decode(buf))
            .await
            .map_err(|error| failed_before_answer(&error, start.accepted()))?;
        match event {
            AnswerEvent::Accepted => continue,
            AnswerEvent::Status(status) => {
                return Ok((status, 1 + usize::from(start.accepted())));
            }
        }
    }
}

/// What a failure while waiting for the answer's status means for the request.
fn failed_before_answer(
    error: &crate::net::stream::ReadError<frame::FrameError>,
    accepted: bool,
) -> AttemptError {
    use crate::net::stream::ReadError;
    match error {
        ReadError::Timeout => AttemptError::Fatal(ApiError::GatewayTimeout),
        ReadError::Decode(error) => AttemptError::Fatal(ApiError::ExitUnavailable(format!(
            "the answer does not start as the protocol says: {error}"
        ))),
        other if accepted => AttemptError::Fatal(ApiError::ExitLostRequest(other.to_string())),
        ReadError::Stream(quinn::ReadError::ConnectionLost(error)) => {
            AttemptError::RelayDown(ApiError::RelayUnreachable(error.to_string()))
        }
        other => AttemptError::Retry(ApiError::ExitUnavailable(format!(
            "the exit went away before it took the request ({other})"
        ))),
    }
}

async fn single_response(
    state: &ClientState,
    mut reader: StreamReader,
    opener: ohttp::ResponseOpener,
) -> Result<(Response, Option<Duration>), ApiError> {
    let max = state.limits.max_response_body.saturating_add(256 * 1024);
    let wait = state.limits.request_timeout + TIMEOUT_MARGIN;
    let encapsulated = tokio::time::timeout(wait, reader.read_to_end(max))
        .await
        .map_err(|_| ApiError::GatewayTimeout)?
        .map_err(|e| ApiError::ExitLostRequest(format!("response: {e}")))?;
    state.metrics.bytes(Flow::FromRelay, encapsulated.len());
    let message = opener
        .open(&encapsulated)
        .map_err(|e| ApiError::ExitUnavailable(format!("response does not decrypt: {e}")))?;
    let limits = bhttp::Limits {
        max_body: state.limits.max_response_body,
        ..bhttp::Limits::default()
    };
    let (head, body) = bhttp::decode_response(&message, &limits)
        .map_err(|e| ApiError::ExitUnavailable(format!("malformed response: {e}")))?;
    Ok((
        build_response(&head, Body::from(body)),
        http_message::backend_time(&head.fields),
    ))
}

/// Waits for the response head, then streams the body from a task that opens each chunk as it
/// arrives. A broken or truncated stream ends the user's body with an error, never with a
/// clean end.
async fn chunked_response(
    reader: StreamReader,
    opener: ChunkedResponseOpener,
    metrics: Arc<ClientMetrics>,
    wait: Duration,
) -> Result<(Response, Option<Duration>), ApiError> {
    let mut stream = PlainStream {
        reader,
        opener,
        plain: BytesMut::new(),
        decoder: ResponseDecoder::new(bhttp::Limits::default()),
        done: false,
        metrics,
        wait,
    };
    // What arrived with the status byte and is buffered already was not counted yet.
    let buffered = stream.reader.buffer().len();
    stream.metrics.bytes(Flow::FromRelay, buffered);
    let head = match stream
        .next()
        .await
        .map_err(|e| ApiError::ExitLostRequest(e.to_string()))?
    {
        Some(ResponseEvent::Head(head)) => head,
        Some(_) => {
            return Err(ApiError::ExitUnavailable(
                "response body before head".into(),
            ));
        }
        None => {
            return Err(ApiError::ExitUnavailable(
                "response ended before its head".into(),
            ));
        }
    };
    let (tx, body) = body::channel();
    tokio::spawn(async move {
        loop {
            match stream.next().await {
                Ok(Some(ResponseEvent::Body(bytes))) => {
                    if tx.send(Ok(bytes)).await.is_err() {
                        // The user's tool went away: stop the exit's work too.
                        stream.reader.stop(code::ABANDONED);
                        return;
                    }
                }
                Ok(Some(ResponseEvent::Head(_))) => {
                    let _ = tx
                        .send(Err(body::BodyError("second response head".into())))
                        .await;
                    return;
                }
                Ok(Some(ResponseEvent::End) | None) => return,
                Err(error) => {
                    tracing::info!(%error, "response stream broke");
                    stream.metrics.error(ErrorClass::StreamFailed);
                    let _ = tx.send(Err(body::BodyError(error.to_string()))).await;
                    return;
                }
            }
        }
    });
    let backend = http_message::backend_time(&head.fields);
    Ok((build_response(&head, Body::new(body)), backend))
}

/// Decrypted BHTTP events from a chunked OHTTP response stream.
struct PlainStream {
    reader: StreamReader,
    opener: ChunkedResponseOpener,
    plain: BytesMut,
    decoder: ResponseDecoder,
    done: bool,
    metrics: Arc<ClientMetrics>,
    /// Longest silence from the exit (the exit's own idle timeout ends a silent backend
    /// sooner; this bounds an exit that stops answering).
    wait: Duration,
}

/// Why a chunked response stream could not be read to its end.
#[derive(Debug, thiserror::Error)]
enum ResponseStreamError {
    /// The next chunk could not be read or opened.
    #[error("exit response: {0}")]
    Chunk(#[from] ChunkError),
    /// The opened bytes are not a Binary HTTP response.
    #[error("malformed response: {0}")]
    Malformed(#[from] BhttpError),
}

impl PlainStream {
    async fn next(&mut self) -> Result<Option<ResponseEvent>, ResponseStreamError> {
        loop {
            if self.done {
                // The final chunk opened, so the message is authentically complete: what is
                // left must finish it (RFC 9292 lets empty trailing sections be omitted).
                return Ok(self.decoder.decode_eof(&mut self.plain)?);
            }
            if let Some(event) = self.decoder.decode(&mut self.plain)? {
                return Ok(Some(event));
            }
            let metrics = &self.metrics;
            let chunk = self
                .reader
                .next_chunk(&mut self.opener, self.wait, |n| {
                    metrics.bytes(Flow::FromRelay, n);
                })
                .await?;
            self.done = chunk.last;
            self.plain.extend_from_slice(&chunk.data);
        }
    }
}

fn build_response(head: &ResponseHead, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = http_message::to_header_map(&head.fields);
    // The exit's report of the backend's time is for the client's metrics, not the user.
    headers.remove(http_message::BACKEND_TIME_FIELD);
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, accept: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Some(accept) = accept {
            builder = builder.header("accept", accept);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn chooses_streaming_when_the_answer_may_stream() {
        let post = parts("POST", "/v1/chat/completions", None);
        assert!(may_stream(&post, br#"{"model":"m","stream":true}"#));
        assert!(!may_stream(&post, br#"{"model":"m"}"#));
        assert!(!may_stream(&post, br#"{"stream":false}"#));
        assert!(may_stream(
            &parts("POST", "/api/chat", None),
            br#"{"model":"m"}"#
        ));
        assert!(!may_stream(
            &parts("POST", "/api/chat", None),
            br#"{"stream":false}"#
        ));
        assert!(may_stream(
            &parts("GET", "/v1/x", Some("text/event-stream")),
            b""
        ));
        assert!(!may_stream(&parts("GET", "/v1/models", None), b""));
    }

    #[test]
    fn request_head_keeps_query_and_drops_identifying_headers() {
        let mut p = parts("GET", "/v1/models?limit=2&x=%20", None);
        for (name, value) in [
            ("user-agent", "OpenAI/Python 1.55.0"),
            ("openai-organization", "org-123"),
            ("openai-project", "proj-456"),
            ("x-stainless-os", "Linux"),
            ("x-stainless-runtime-version", "3.12.1"),
            ("origin", "http://localhost:3000"),
            ("referer", "http://localhost:3000/chat"),
            ("x-api-key", "sk-ant-user"),
            ("accept-language", "de-CH"),
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
        ] {
            p.headers.insert(name, value.parse().unwrap());
        }
        p.headers
            .insert("authorization", "Bearer user-key".parse().unwrap());
        p.headers.insert("cookie", "a=b".parse().unwrap());
        p.headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        p.headers.insert("tracestate", "vendor=x".parse().unwrap());
        p.headers.insert("baggage", "user=alice".parse().unwrap());
        p.headers
            .insert("x-b3-traceid", "80f198ee56343ba8".parse().unwrap());
        p.headers.append("x-keep", "1".parse().unwrap());
        p.headers.append("x-keep", "2".parse().unwrap());
        p.headers.append("x-other", "3".parse().unwrap());
        let policy = ClientPolicy {
            forward_headers: vec![HeaderName::from_static("x-keep")],
            ..ClientPolicy::default()
        };
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let head = request_head(&p, &policy, now);
        assert_eq!(head.path, b"/v1/models?limit=2&x=%20");
        let fields: Vec<_> = head
            .fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(&f.name).into_owned(),
                    String::from_utf8_lossy(&f.value).into_owned(),
                )
            })
            .collect();
        let expected = [
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
            ("x-keep", "1"),
            ("x-keep", "2"),
            ("user-agent", http_message::USER_AGENT),
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
        ];
        let mut got = fields.clone();
        got.sort();
        let mut want: Vec<_> = expected
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            http_message::request_date(&head.fields),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn model_is_read_from_json() {
        assert_eq!(
            model_of(br#"{"model":"gemma","x":1}"#).as_deref(),
            Some("gemma")
        );
        assert_eq!(model_of(b"not json"), None);
    }
}

//! The exit's request path: decapsulate the OHTTP request arriving on a tunnel stream, call
//! the backend, and send the answer back encrypted as it arrives. Nothing readable ever leaves
//! here: backend failures travel as encrypted HTTP error responses.

mod chunked;
mod single;

use std::{
    sync::Arc,
    sync::RwLock,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokengo_proto::{
    bhttp::{self, RequestHead, ResponseHead},
    frame::{self, ExitRequest, MediaType, Status},
    ohttp::{self, OhttpError},
};
use tracing::{Instrument as _, field::Empty};

use super::{
    access::Access,
    answer_budget::AnswerBudget,
    backend::{Backend, BackendRequest},
    replay::{ReplayError, ReplayWindow},
    single_answer::AnswerError,
};
use crate::{
    clock::Clock,
    config::Limits,
    net::stream::{self, StreamReader, code},
    ops::metrics::{
        ErrorClass, ExitMetrics, Flow, FlowLabel, InFlight, KeyLabel, KeySlot, Media, MediaLabel,
        StatusClass, StatusLabel,
    },
    ops::status::KeyStatus,
    store::keyring::Keyring,
    web::api_error::ApiError,
    web::http_message,
};

/// How long the relay may take to deliver a stream's header.
const HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// Decapsulates requests and calls the backend.
#[derive(Debug)]
pub struct Gateway {
    ohttp: RwLock<Arc<ohttp::Gateway>>,
    /// Ids and ages of the keys in `ohttp`, for `/status`.
    key_ids: RwLock<Vec<KeyStatus>>,
    backend: Backend,
    replay: ReplayWindow,
    /// The clock request dates are checked against.
    clock: Clock,
    /// Who may use the exit (open unless tokens are required).
    access: Access,
    limits: Limits,
    /// What single-message answers may hold in memory, all together.
    answers: AnswerBudget,
    metrics: Arc<ExitMetrics>,
}

/// One request's bookkeeping. The request counts as in flight, and its timings are recorded,
/// until [`Tally::done`], which runs just before the last bytes of the answer are written:
/// whoever has received the end of an answer can rely on the metrics already showing it.
struct Tally {
    metrics: Arc<ExitMetrics>,
    started: Instant,
    media: Option<Media>,
    in_flight: Option<InFlight>,
}

impl Tally {
    fn start(metrics: &Arc<ExitMetrics>) -> Self {
        Self {
            metrics: Arc::clone(metrics),
            started: Instant::now(),
            media: None,
            in_flight: Some(InFlight::start(&metrics.streams_in_flight)),
        }
    }

    /// Records the request's times (when the backend answered: `backend` is the backend's
    /// own time) and ends its in-flight count. Only the first call counts.
    fn done(&mut self, backend: Option<Duration>) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        if let (Some(media), Some(backend)) = (self.media, backend) {
            let label = MediaLabel { media };
            self.metrics
                .backend_latency
                .get_or_create(&label)
                .observe(backend);
            self.metrics
                .gateway_overhead
                .get_or_create(&label)
                .observe(self.started.elapsed().saturating_sub(backend));
        }
        drop(in_flight);
    }
}

/// Who wrote the (encrypted) answer.
enum Answered {
    /// The backend's response.
    ByBackend,
    /// An error response made by the exit (the backend was not reached, or the request was
    /// unusable).
    ByExit,
}

/// Why a request stream failed: before a response could be encrypted it is answered with a
/// status; once the answer has begun, the stream is reset.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("unknown key id {0}")]
    UnknownKey(u8),
    #[error("cannot decapsulate: {0}")]
    Undecryptable(String),
    /// Its `enc` was already seen: refused before any HPKE work. It cannot be answered
    /// encrypted (only decapsulation yields the response key), and only a replayer sees it.
    #[error("encapsulated key already seen (replay)")]
    Replayed,
    #[error("stream failed")]
    Stream,
    /// The backend failed after the response head was sent.
    #[error("backend failed mid-response")]
    Backend(ErrorClass),
    /// The exit could not encode or seal its own answer: not the client's fault, so not
    /// counted as its malformed input; the stream is reset.
    #[error("cannot encode the answer: {0}")]
    Internal(String),
}

impl Refusal {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Malformed(_) => ErrorClass::Malformed,
            Self::UnknownKey(_) => ErrorClass::KeyUnknown,
            Self::Undecryptable(_) => ErrorClass::Undecryptable,
            Self::Replayed => ErrorClass::Replay,
            Self::Stream => ErrorClass::StreamFailed,
            Self::Backend(class) => *class,
            Self::Internal(_) => ErrorClass::Internal,
        }
    }

    fn status(&self) -> Option<Status> {
        match self {
            Self::Malformed(_) => Some(Status::Malformed),
            Self::UnknownKey(_) => Some(Status::KeyUnknown),
            Self::Undecryptable(_) | Self::Replayed => Some(Status::Undecryptable),
            Self::Stream | Self::Backend(_) | Self::Internal(_) => None,
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
    /// A gateway with the keys of `keyring` calling `backend`.
    #[must_use]
    pub fn new(
        keyring: &Keyring,
        backend: Backend,
        limits: Limits,
        metrics: Arc<ExitMetrics>,
    ) -> Self {
        let clock = Clock::system();
        let gateway = Self {
            ohttp: RwLock::new(Arc::new(ohttp::Gateway::new(keyring.key_pairs()))),
            key_ids: RwLock::new(Vec::new()),
            backend,
            replay: replay_window(&limits, &clock),
            clock,
            access: Access::default(),
            answers: budget_for(&limits, &metrics),
            limits,
            metrics,
        };
        gateway.record_keys(keyring);
        gateway
    }

    /// Checks request dates against `clock` (and counts the exit's start from its now).
    #[must_use]
    pub fn with_clock(self, clock: Clock) -> Self {
        Self {
            replay: replay_window(&self.limits, &clock),
            clock,
            ..self
        }
    }

    /// Returns once the clock is past the second the gateway started in: requests dated
    /// then are refused (a previous run may have seen them), so the exit should not offer
    /// itself before.
    pub async fn wait_until_accepting(&self) {
        while self.clock.unix_now() < self.replay.not_before() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Swaps in the keys of a rotated `keyring`; requests in flight keep the keys they
    /// started with.
    pub fn set_keys(&self, keyring: &Keyring) {
        *self
            .ohttp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(ohttp::Gateway::new(keyring.key_pairs()));
        self.record_keys(keyring);
        self.metrics.key_rotations.inc();
        tracing::info!(key_ids = ?keyring.key_ids().iter().map(|(id, _)| *id).collect::<Vec<_>>(), "OHTTP keys rotated");
    }

    /// Swaps in the keys of `keyring` after the previous key's overlap ended (not a
    /// rotation: not counted as one).
    pub fn retire_keys(&self, keyring: &Keyring) {
        *self
            .ohttp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(ohttp::Gateway::new(keyring.key_pairs()));
        self.record_keys(keyring);
        tracing::info!(key_ids = ?keyring.key_ids().iter().map(|(id, _)| *id).collect::<Vec<_>>(), "previous OHTTP key retired");
    }

    fn record_keys(&self, keyring: &Keyring) {
        self.metrics.ohttp_key_created.clear();
        let mut keys = Vec::new();
        for (index, (key_id, created_at)) in keyring.key_ids().into_iter().enumerate() {
            let slot = if index == 0 {
                KeySlot::Current
            } else {
                KeySlot::Previous
            };
            self.metrics
                .ohttp_key_created
                .get_or_create(&KeyLabel {
                    key_id: u32::from(key_id),
                    slot,
                })
                .set(i64::try_from(created_at).unwrap_or(i64::MAX));
            keys.push(KeyStatus {
                key_id,
                slot: slot.as_str().to_owned(),
                created_at,
            });
        }
        *self
            .key_ids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
    }

    /// The keys held now, current first.
    #[must_use]
    pub fn key_status(&self) -> Vec<KeyStatus> {
        self.key_ids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

    /// Who may use the exit.
    #[must_use]
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Serves one request stream opened by the relay.
    pub async fn handle(self: Arc<Self>, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut tally = Tally::start(&self.metrics);
        // A root span: the exit starts its own trace and continues no one's (nothing that
        // arrives from the relay or the client can name a parent).
        let span = tracing::info_span!(
            parent: None,
            "exit.request",
            otel.kind = "server",
            tokengo.media = Empty,
            http.request.method = Empty,
            http.response.status_code = Empty,
            tokengo.outcome = Empty,
            otel.status_code = Empty,
        );
        let mut reader = StreamReader::new(recv);
        let outcome = async {
            let (header, version) = reader
                .decode(16, HEADER_DEADLINE, ExitRequest::decode_versioned)
                .await
                .map_err(|error| Refusal::Malformed(error.to_string()))?;
            let accept = Accept {
                announce: version >= frame::VERSION_ACCEPTED,
            };
            let media = Media::from(header.media);
            tracing::Span::current().record("tokengo.media", media.as_str());
            self.metrics
                .requests
                .get_or_create(&MediaLabel { media })
                .inc();
            tally.media = Some(media);
            match header.media {
                MediaType::Single => {
                    self.single(&mut reader, &mut send, &mut tally, accept)
                        .await
                }
                MediaType::Chunked => {
                    self.chunked(&mut reader, &mut send, &mut tally, accept)
                        .await
                }
            }
        }
        .instrument(span.clone())
        .await;
        if outcome.is_ok() {
            // Held until the relay has acknowledged the whole answer: a draining exit closes
            // its endpoint once these tasks end, and closing drops data not yet acknowledged.
            let _ = tokio::time::timeout(self.limits.write_stall_timeout, send.stopped()).await;
        }
        match &outcome {
            Ok(Answered::ByBackend) => {
                span.record("tokengo.outcome", "ok");
            }
            Ok(Answered::ByExit) => {
                span.record("tokengo.outcome", "answered_by_exit");
            }
            Err(refusal) => {
                self.metrics.error(refusal.class());
                tally.done(None);
                span.record("tokengo.outcome", "refused");
                span.record("otel.status_code", "error");
            }
        }
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

    /// What the user learns when an answer could not be built: the budget stayed spent (an
    /// overloaded exit), or the backend's head cannot be encoded.
    fn answer_failed(&self, error: &AnswerError) -> ApiError {
        match error {
            AnswerError::Budget(spent) => {
                tracing::info!(%spent, "answer refused: the exit's answer budget is spent");
                ApiError::ExitOverloaded
            }
            other => ApiError::BackendFailed(other.to_string()),
        }
    }

    /// Sends a request to the backend, counting what it costs and whether the backend could
    /// be reached.
    async fn call(&self, request: BackendRequest) -> Result<reqwest::Response, ApiError> {
        self.metrics
            .forwarded_bytes
            .get_or_create(&FlowLabel {
                direction: Flow::ToBackend,
            })
            .inc_by(request.body.len() as u64);
        let sent = tokio::time::timeout(self.limits.request_timeout, self.backend.send(request))
            .await
            .unwrap_or(Err(ApiError::BackendTimeout));
        match sent {
            Ok(response) => {
                self.metrics.backend_up.set(1);
                let status = response.status().as_u16();
                self.metrics
                    .backend_responses
                    .get_or_create(&StatusLabel {
                        status_class: StatusClass::of(status),
                    })
                    .inc();
                tracing::Span::current().record("http.response.status_code", i64::from(status));
                Ok(response)
            }
            Err(error) => {
                if error == ApiError::BackendUnreachable {
                    self.metrics.backend_up.set(0);
                }
                Err(error)
            }
        }
    }

    /// The next piece of a backend body, or a timeout after the idle timeout's silence.
    async fn next_piece<S>(&self, stream: &mut S) -> Result<Option<S::Item>, ApiError>
    where
        S: futures_util::Stream + Unpin,
    {
        tokio::time::timeout(self.backend.idle_timeout(), stream.next())
            .await
            .map_err(|_| ApiError::BackendTimeout)
    }

    /// Refuses a request whose `enc` the replay window remembers, before decapsulating it:
    /// a replay flood then costs the exit a lookup per request, not an HPKE operation.
    fn not_replayed(&self, enc: Option<&[u8; 32]>) -> Result<(), Refusal> {
        if enc.is_some_and(|enc| self.replay.seen(enc)) {
            self.metrics.replays_refused_early.inc();
            return Err(Refusal::Replayed);
        }
        Ok(())
    }

    /// Checks a decapsulated request's date and encapsulated key against replay.
    fn admit(&self, enc: Option<&[u8; 32]>, head: &RequestHead) -> Result<(), ReplayError> {
        // A request that decapsulated always has its `enc`; refused all the same if not.
        let enc = enc.ok_or(ReplayError::Replayed)?;
        self.replay.admit(
            &enc[..],
            http_message::request_date(&head.fields),
            self.clock.unix_now(),
        )
    }

    /// What a decapsulated request must pass before it reaches the backend: a fresh date and
    /// an `enc` not seen before (replay), then the group token when one is required (its
    /// field is removed either way). On refusal, the encrypted answer to send instead.
    fn gate(
        &self,
        enc: Option<&[u8; 32]>,
        head: &mut RequestHead,
    ) -> Result<(), (ResponseHead, Bytes)> {
        self.admit(enc, head)
            .map_err(|error| self.refused(&error))?;
        self.access.admit(head).map_err(|error| self.failed(&error))
    }

    /// The encrypted answer to a request refused against replay, counted. A date problem
    /// carries the exit's `Date` so the client can tell how far off its clock is (RFC 9458
    /// §6.5.1).
    fn refused(&self, error: &ReplayError) -> (ResponseHead, Bytes) {
        tracing::debug!(%error, "request refused against replay");
        let api = match error {
            ReplayError::Replayed => ApiError::Replayed,
            ReplayError::Full => ApiError::ReplayWindowFull,
            other => ApiError::RequestExpired(other.to_string()),
        };
        let (mut head, body) = self.failed(&api);
        if matches!(api, ApiError::RequestExpired(_)) {
            head.fields.push(http_message::date_field(self.clock.now()));
        }
        (head, body)
    }

    fn received(&self, len: usize) {
        self.metrics
            .forwarded_bytes
            .get_or_create(&FlowLabel {
                direction: Flow::FromBackend,
            })
            .inc_by(len as u64);
    }

    /// The encrypted error response for `error`, counted.
    fn failed(&self, error: &ApiError) -> (ResponseHead, Bytes) {
        self.metrics.error(ErrorClass::from(error));
        tracing::Span::current().record(
            "http.response.status_code",
            i64::from(error.status().as_u16()),
        );
        error_response(error)
    }

    fn bhttp_limits(&self) -> bhttp::Limits {
        bhttp::Limits {
            max_body: self.limits.max_request_body,
            ..bhttp::Limits::default()
        }
    }
}

/// The answer budget for `limits`, reported through `metrics`.
fn budget_for(limits: &Limits, metrics: &ExitMetrics) -> AnswerBudget {
    metrics
        .answer_budget_bytes
        .set(i64::try_from(limits.answer_budget).unwrap_or(i64::MAX));
    AnswerBudget::new(
        limits.answer_budget,
        limits.answer_budget_wait,
        metrics.answer_bytes_held.clone(),
        metrics.answer_bytes_held_peak.clone(),
    )
}

/// The replay window for `limits`, counting the exit's start from `clock`'s now.
fn replay_window(limits: &Limits, clock: &Clock) -> ReplayWindow {
    ReplayWindow::new(
        limits.max_clock_skew.as_secs(),
        limits.replay_cache_entries,
        clock.unix_now(),
    )
}

/// Version 2 of the stream protocol: whether the exit says `ACCEPTED` (the client's header was
/// version 2). It is sent once a request has decrypted, before the exit does anything with
/// it, for every such request (also those the exit then answers itself, so the relay cannot
/// tell a refusal from a request the backend served). Until it is written the request can go
/// elsewhere; after it, the client never sends the request again.
#[derive(Debug, Clone, Copy)]
struct Accept {
    announce: bool,
}

impl Accept {
    /// Writes `ACCEPTED` (version 2). The request goes on only when this succeeded: a relay
    /// that gave up on the exit has stopped the stream, and the write fails.
    async fn announce(self, send: &mut quinn::SendStream, stall: Duration) -> Result<(), Refusal> {
        if !self.announce {
            return Ok(());
        }
        stream::write_bounded(send, Bytes::from_static(&[frame::ACCEPTED]), stall)
            .await
            .map_err(|_| Refusal::Stream)
    }
}

/// The span around one backend exchange (a child of `exit.request`).
fn backend_span() -> tracing::Span {
    tracing::info_span!(
        "exit.backend",
        otel.kind = "client",
        http.response.status_code = Empty,
        otel.status_code = Empty,
    )
}

fn response_head(response: &reqwest::Response) -> ResponseHead {
    ResponseHead {
        status: response.status().as_u16(),
        // The backend-time field is the exit's to set: a backend's own copy could mislead the
        // client's metrics.
        fields: http_message::to_fields(response.headers(), http_message::is_backend_time),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, RedactedHeaders};

    #[test]
    fn key_rotation_is_counted_and_both_keys_are_reported() {
        let backend = Backend::new(&BackendConfig {
            url: "http://127.0.0.1:9".parse().unwrap(),
            headers: RedactedHeaders::default(),
            idle_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            allow: crate::roles::exit::EndpointPolicy::default(),
        })
        .unwrap();
        let metrics = Arc::new(ExitMetrics::new());
        let mut keyring = Keyring::generate(1, 100).unwrap();
        let gateway = Gateway::new(&keyring, backend, Limits::default(), Arc::clone(&metrics));
        assert_eq!(gateway.key_status().len(), 1);
        assert_eq!(metrics.key_rotations.get(), 0);
        keyring.rotate(200).unwrap();
        gateway.set_keys(&keyring);
        assert_eq!(metrics.key_rotations.get(), 1);
        let keys = gateway.key_status();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[0].slot.as_str(), keys[0].created_at),
            ("current", 200)
        );
        assert_eq!((keys[1].key_id, keys[1].slot.as_str()), (1, "previous"));
        let created = |key_id, slot| {
            metrics
                .ohttp_key_created
                .get(&KeyLabel { key_id, slot })
                .map(|g| g.get())
        };
        assert_eq!(created(1, KeySlot::Previous), Some(100));
        assert_eq!(created(1, KeySlot::Current), None, "stale series removed");
        assert_eq!(
            created(u32::from(keys[0].key_id), KeySlot::Current),
            Some(200)
        );
    }
}

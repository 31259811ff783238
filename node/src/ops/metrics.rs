//! Prometheus metrics of each role, served on the admin listener (`/metrics`).
//!
//! Privacy by construction: every label value is one of the closed enums of `label`, so no
//! series can carry a client address, a prompt, a model name, an exit id next to a client, or
//! any other per-user value. There is no way to put a free-form string into a label.

use std::{sync::atomic::AtomicI64, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

mod histogram;
mod label;
mod rate;

pub use histogram::{HistogramSnapshot, LatencyHistogram};
pub use label::{
    ClassLabel, ConnectLabel, ConnectOutcome, DescriptorRefusal, ErrorClass, Flow, FlowLabel,
    KeyLabel, KeySlot, KindLabel, Media, MediaLabel, RefusalLabel, Registration, RegistrationLabel,
    RelayRequest, StatusClass, StatusLabel,
};
pub use rate::{RATE_WINDOW, RateWindow};

/// Increments a gauge for as long as the guard lives (requests and streams in flight), so
/// every early return and panic still decrements it.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl InFlight {
    /// Increments `gauge` until the guard is dropped.
    #[must_use]
    pub fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A gauge holding a Unix timestamp in seconds.
pub type TimestampGauge = Gauge<i64, AtomicI64>;

/// Sum of a counter family over every label value it has seen.
fn family_total<S>(family: &Family<S, Counter>, labels: impl IntoIterator<Item = S>) -> u64
where
    S: Clone + std::hash::Hash + Eq,
{
    labels
        .into_iter()
        .filter_map(|label| family.get(&label).map(|c| c.get()))
        .sum()
}

fn merged(family: &Family<MediaLabel, LatencyHistogram>) -> HistogramSnapshot {
    Media::ALL
        .iter()
        .filter_map(|media| {
            family
                .get(&MediaLabel { media: *media })
                .map(|h| h.snapshot())
        })
        .fold(HistogramSnapshot::empty(), |all, one| all.merge(&one))
}

/// Creates the series for every value of a closed label set, so they read 0 from the start
/// (a `rate()` over a series that appears late misses its first increase).
fn precreate<S, M, C>(family: &Family<S, M, C>, labels: impl IntoIterator<Item = S>)
where
    S: Clone + std::hash::Hash + Eq,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    for label in labels {
        drop(family.get_or_create(&label));
    }
}

fn error_labels(classes: &[ErrorClass]) -> Vec<ClassLabel> {
    classes
        .iter()
        .map(|class| ClassLabel { class: *class })
        .collect()
}

fn media_labels() -> Vec<MediaLabel> {
    Media::ALL
        .iter()
        .map(|media| MediaLabel { media: *media })
        .collect()
}

const RELAY_ERRORS: &[ErrorClass] = &[
    ErrorClass::Malformed,
    ErrorClass::NoSuchExit,
    ErrorClass::ExitUnavailable,
    ErrorClass::Overloaded,
    ErrorClass::StreamFailed,
];

const EXIT_ERRORS: &[ErrorClass] = &[
    ErrorClass::Malformed,
    ErrorClass::KeyUnknown,
    ErrorClass::Undecryptable,
    ErrorClass::Replay,
    ErrorClass::StreamFailed,
    ErrorClass::BackendUnreachable,
    ErrorClass::BackendTimeout,
    ErrorClass::BackendFailed,
    ErrorClass::BadRequest,
    ErrorClass::Forbidden,
    ErrorClass::Overloaded,
    ErrorClass::AccessDenied,
    ErrorClass::Internal,
];

const CLIENT_ERRORS: &[ErrorClass] = &[
    ErrorClass::NoExit,
    ErrorClass::RelayUnreachable,
    ErrorClass::ExitUnavailable,
    ErrorClass::GatewayTimeout,
    ErrorClass::PayloadTooLarge,
    ErrorClass::BadRequest,
    ErrorClass::Overloaded,
    ErrorClass::StreamFailed,
    ErrorClass::Forbidden,
];

/// Discovery on the DHT (`tokengo_<role>_dht_*`). No labels: no series names a peer.
#[derive(Debug, Clone, Default)]
pub struct DhtMetrics {
    /// 1 when the relay has a confirmed external address to announce (configured
    /// `external_addrs`, or loopback under the `loopback` policy); 0 means it is invisible.
    pub external_address_confirmed: Gauge,
    /// 1 after the provider record was published (and while it is republished).
    pub provider_published: Gauge,
    /// 1 when a fresh identity got the published record back and reached the node through
    /// it; 0 before, and when that check failed (see `/status` for why).
    pub provider_verified: Gauge,
    /// Dials the address policy refused.
    pub dials_refused: Counter,
    /// Relays that passed verification in the last discovery.
    pub relays_verified: Gauge,
}

impl DhtMetrics {
    /// The relay's view: announcement state and refused dials.
    pub fn register_announcer(&self, r: &mut Registry) {
        self.register_announcement(r);
        r.register(
            "dht_dials_refused",
            "Dials the DHT address policy refused",
            self.dials_refused.clone(),
        );
    }

    /// An exit's view: it seeks relays and announces itself.
    pub fn register_announcing_seeker(&self, r: &mut Registry) {
        self.register_announcement(r);
        self.register_seeker(r);
    }

    fn register_announcement(&self, r: &mut Registry) {
        r.register(
            "dht_external_address_confirmed",
            "1 when the node has a confirmed external address to announce on the DHT",
            self.external_address_confirmed.clone(),
        );
        r.register(
            "dht_provider_published",
            "1 after the node's provider record was published on the DHT",
            self.provider_published.clone(),
        );
        r.register(
            "dht_provider_verified",
            "1 when a fresh DHT identity found the node's record and reached the node through it",
            self.provider_verified.clone(),
        );
    }

    /// A client's or exit's view: verified relays and refused dials.
    pub fn register_seeker(&self, r: &mut Registry) {
        r.register(
            "dht_relays_verified",
            "Relays that passed verification in the last DHT discovery",
            self.relays_verified.clone(),
        );
        r.register(
            "dht_dials_refused",
            "Dials the DHT address policy refused",
            self.dials_refused.clone(),
        );
    }
}

/// The relay's metrics (`tokengo_relay_*`).
#[derive(Debug, Clone, Default)]
pub struct RelayMetrics {
    /// Client streams by kind.
    pub requests: Family<KindLabel, Counter>,
    /// Failed client streams by class.
    pub errors: Family<ClassLabel, Counter>,
    /// Streams being forwarded right now.
    pub streams_in_flight: Gauge,
    /// Bytes forwarded, by direction.
    pub forwarded_bytes: Family<FlowLabel, Counter>,
    /// Exits registered right now (kept by the exit registry itself).
    pub exits_registered: Gauge,
    /// Exit registrations by outcome.
    pub registrations: Family<RegistrationLabel, Counter>,
    /// Open client connections.
    pub client_connections: Gauge,
    /// From a forwarded request's header to the exit's first answer byte.
    pub exit_first_byte: LatencyHistogram,
    /// 1 while the relay accepts connections.
    pub accepting: Gauge,
    /// Connection attempts asked to prove their address first (QUIC Retry) because many
    /// handshakes were in progress.
    pub handshake_retries: Counter,
    /// Connection attempts refused or dropped before the handshake because their source
    /// address opened connections faster than `source_connections_per_sec`.
    pub source_connections_refused: Counter,
    /// Requests that waited for a slot of their exit: their source address held its fair
    /// part of the contended exit, or the exit was full.
    pub source_waits: Counter,
    /// Client connections closed because they sent too many malformed request headers.
    pub refusal_closes: Counter,
    /// DHT announcement (all zero while the relay does not announce).
    pub dht: DhtMetrics,
}

impl RelayMetrics {
    /// Metrics with every closed-label series created at zero.
    #[must_use]
    pub fn new() -> Self {
        let metrics = Self::default();
        precreate(
            &metrics.requests,
            [RelayRequest::Forward, RelayRequest::ListExits].map(|kind| KindLabel { kind }),
        );
        precreate(&metrics.errors, error_labels(RELAY_ERRORS));
        precreate(
            &metrics.forwarded_bytes,
            [Flow::ToExit, Flow::ToClient].map(|direction| FlowLabel { direction }),
        );
        precreate(
            &metrics.registrations,
            [
                Registration::New,
                Registration::Updated,
                Registration::Replaced,
                Registration::Refused,
            ]
            .map(|outcome| RegistrationLabel { outcome }),
        );
        metrics
    }

    /// Counts a failed stream.
    pub fn error(&self, class: ErrorClass) {
        self.errors.get_or_create(&ClassLabel { class }).inc();
    }

    /// Registers every metric under `tokengo_relay_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("relay");
        r.register("requests", "Client streams, by kind", self.requests.clone());
        r.register(
            "errors",
            "Client streams that failed, by class",
            self.errors.clone(),
        );
        r.register(
            "streams_in_flight",
            "Streams being forwarded now",
            self.streams_in_flight.clone(),
        );
        r.register_with_unit(
            "forwarded",
            "Bytes forwarded, by direction",
            Unit::Bytes,
            self.forwarded_bytes.clone(),
        );
        r.register(
            "exits_registered",
            "Exits registered now",
            self.exits_registered.clone(),
        );
        r.register(
            "exit_registrations",
            "Exit registrations, by outcome",
            self.registrations.clone(),
        );
        r.register(
            "client_connections",
            "Open client connections",
            self.client_connections.clone(),
        );
        r.register_with_unit(
            "exit_first_byte",
            "Time from a forwarded request's header to the exit's first answer byte",
            Unit::Seconds,
            self.exit_first_byte.clone(),
        );
        r.register(
            "accepting",
            "1 while the relay accepts connections",
            self.accepting.clone(),
        );
        r.register(
            "handshake_retries",
            "Connection attempts asked to validate their address (QUIC Retry) under load",
            self.handshake_retries.clone(),
        );
        r.register(
            "source_connections_refused",
            "Connection attempts refused before the handshake: their address opened connections too fast",
            self.source_connections_refused.clone(),
        );
        r.register(
            "source_waits",
            "Requests that waited for an exit's slot (their address's fair part was taken, or the exit was full)",
            self.source_waits.clone(),
        );
        r.register(
            "refusal_closes",
            "Client connections closed after too many malformed request headers",
            self.refusal_closes.clone(),
        );
        self.dht.register_announcer(r);
    }

    /// Forward requests so far.
    #[must_use]
    pub fn forwards_total(&self) -> u64 {
        family_total(
            &self.requests,
            [KindLabel {
                kind: RelayRequest::Forward,
            }],
        )
    }

    /// Failed streams so far.
    #[must_use]
    pub fn errors_total(&self) -> u64 {
        family_total(&self.errors, error_labels(RELAY_ERRORS))
    }
}

/// The exit's metrics (`tokengo_exit_*`).
#[derive(Debug, Clone, Default)]
pub struct ExitMetrics {
    /// Request streams by media type.
    pub requests: Family<MediaLabel, Counter>,
    /// Failed requests by class (refusals and backend failures).
    pub errors: Family<ClassLabel, Counter>,
    /// Requests being served right now.
    pub streams_in_flight: Gauge,
    /// Body bytes to and from the backend.
    pub forwarded_bytes: Family<FlowLabel, Counter>,
    /// Backend responses by status class.
    pub backend_responses: Family<StatusLabel, Counter>,
    /// From sending a request to the backend until its response body ended.
    pub backend_latency: Family<MediaLabel, LatencyHistogram>,
    /// Time the exit spent on a request beyond the backend's own time.
    pub gateway_overhead: Family<MediaLabel, LatencyHistogram>,
    /// 1 when the backend answered the last probe (each scrape and readiness check probes it)
    /// or request, 0 when it could not be reached.
    pub backend_up: Gauge,
    /// 1 while registered with the relay.
    pub relay_connected: Gauge,
    /// Attempts to connect and register, by outcome.
    pub relay_connects: Family<ConnectLabel, Counter>,
    /// Tunnels the exit keeps to relays now: one per relay, or per address of a relay given
    /// by DNS name (its replicas).
    pub relays: Gauge,
    /// Those of them registered now.
    pub relays_registered: Gauge,
    /// OHTTP key rotations applied while running.
    pub key_rotations: Counter,
    /// Creation time (Unix seconds) of each OHTTP key the exit holds.
    pub ohttp_key_created: Family<KeyLabel, TimestampGauge>,
    /// Expiry (Unix seconds) of the descriptor last registered.
    pub descriptor_expiry: TimestampGauge,
    /// Requests whose HPKE decapsulation was attempted (the exit's costliest step).
    pub decapsulations: Counter,
    /// Requests refused before decapsulation because their `enc` was already seen (replays).
    pub replays_refused_early: Counter,
    /// Relay discovery.
    pub dht: DhtMetrics,
    /// Bytes of single-message answers the exit holds now (collected from the backend and
    /// not yet taken by the relay), drawn from its answer budget.
    pub answer_bytes_held: Gauge,
    /// The most `answer_bytes_held` has been since the exit started.
    pub answer_bytes_held_peak: Gauge,
    /// The answer budget: the most `answer_bytes_held` may be.
    pub answer_budget_bytes: Gauge,
}

impl ExitMetrics {
    /// Metrics with every closed-label series created at zero.
    #[must_use]
    pub fn new() -> Self {
        let metrics = Self::default();
        precreate(&metrics.requests, media_labels());
        precreate(&metrics.errors, error_labels(EXIT_ERRORS));
        precreate(
            &metrics.forwarded_bytes,
            [Flow::ToBackend, Flow::FromBackend].map(|direction| FlowLabel { direction }),
        );
        precreate(&metrics.backend_latency, media_labels());
        precreate(&metrics.gateway_overhead, media_labels());
        precreate(
            &metrics.relay_connects,
            [ConnectOutcome::Registered, ConnectOutcome::Failed]
                .map(|outcome| ConnectLabel { outcome }),
        );
        metrics
    }

    /// Counts a failed request.
    pub fn error(&self, class: ErrorClass) {
        self.errors.get_or_create(&ClassLabel { class }).inc();
    }

    /// Registers every metric under `tokengo_exit_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("exit");
        self.dht.register_announcing_seeker(r);
        r.register(
            "decapsulations",
            "Requests whose HPKE decapsulation was attempted",
            self.decapsulations.clone(),
        );
        r.register(
            "replays_refused_early",
            "Requests refused before decapsulation: their encapsulated key was already seen",
            self.replays_refused_early.clone(),
        );
        r.register(
            "requests",
            "Request streams, by media type",
            self.requests.clone(),
        );
        r.register(
            "errors",
            "Requests that failed, by class",
            self.errors.clone(),
        );
        r.register(
            "streams_in_flight",
            "Requests being served now",
            self.streams_in_flight.clone(),
        );
        r.register_with_unit(
            "forwarded",
            "Body bytes sent to and received from the backend",
            Unit::Bytes,
            self.forwarded_bytes.clone(),
        );
        r.register(
            "backend_responses",
            "Backend responses, by status class",
            self.backend_responses.clone(),
        );
        r.register_with_unit(
            "backend_latency",
            "From sending a request to the backend until its response body ended",
            Unit::Seconds,
            self.backend_latency.clone(),
        );
        r.register_with_unit(
            "gateway_overhead",
            "Time the exit spent on a request beyond the backend's own time",
            Unit::Seconds,
            self.gateway_overhead.clone(),
        );
        r.register(
            "backend_up",
            "1 when the backend answered the last probe or request",
            self.backend_up.clone(),
        );
        r.register(
            "relay_connected",
            "1 while registered with the relay",
            self.relay_connected.clone(),
        );
        r.register(
            "relay_connects",
            "Attempts to connect to the relay and register, by outcome",
            self.relay_connects.clone(),
        );
        r.register(
            "relays",
            "Relay tunnels the exit keeps now (one per relay, or per address of a relay given by DNS name)",
            self.relays.clone(),
        );
        r.register(
            "relays_registered",
            "Relay tunnels of the exit registered now",
            self.relays_registered.clone(),
        );
        r.register(
            "key_rotations",
            "OHTTP key rotations applied while running",
            self.key_rotations.clone(),
        );
        r.register_with_unit(
            "ohttp_key_created_timestamp",
            "Creation time (Unix seconds) of each OHTTP key the exit holds",
            Unit::Seconds,
            self.ohttp_key_created.clone(),
        );
        r.register_with_unit(
            "descriptor_expiry_timestamp",
            "Expiry (Unix seconds) of the descriptor last registered",
            Unit::Seconds,
            self.descriptor_expiry.clone(),
        );
        r.register_with_unit(
            "answer_held",
            "Bytes of single-message answers held now, drawn from the answer budget",
            Unit::Bytes,
            self.answer_bytes_held.clone(),
        );
        r.register_with_unit(
            "answer_held_peak",
            "The most bytes of single-message answers held at once since the start",
            Unit::Bytes,
            self.answer_bytes_held_peak.clone(),
        );
        r.register_with_unit(
            "answer_budget",
            "The most bytes of single-message answers the exit may hold at once",
            Unit::Bytes,
            self.answer_budget_bytes.clone(),
        );
    }

    /// Requests so far.
    #[must_use]
    pub fn requests_total(&self) -> u64 {
        family_total(&self.requests, media_labels())
    }

    /// Failed requests so far.
    #[must_use]
    pub fn errors_total(&self) -> u64 {
        family_total(&self.errors, error_labels(EXIT_ERRORS))
    }

    /// Overhead of all media types together.
    #[must_use]
    pub fn overhead(&self) -> HistogramSnapshot {
        merged(&self.gateway_overhead)
    }

    /// Backend latency of all media types together.
    #[must_use]
    pub fn backend(&self) -> HistogramSnapshot {
        merged(&self.backend_latency)
    }
}

/// The client's metrics (`tokengo_client_*`).
#[derive(Debug, Clone, Default)]
pub struct ClientMetrics {
    /// Requests from the user's tools, by media type.
    pub requests: Family<MediaLabel, Counter>,
    /// Failed requests by class.
    pub errors: Family<ClassLabel, Counter>,
    /// Requests being served right now (until their response body ends).
    pub requests_in_flight: Gauge,
    /// Encrypted bytes to and from the relay (request streams only).
    pub forwarded_bytes: Family<FlowLabel, Counter>,
    /// Responses handed to the user's tools, by status class.
    pub responses: Family<StatusLabel, Counter>,
    /// The backend's own time as the exit reports it (inside the encrypted response).
    pub backend_latency: Family<MediaLabel, LatencyHistogram>,
    /// Time the whole private path added on top of the backend's own time.
    pub gateway_overhead: Family<MediaLabel, LatencyHistogram>,
    /// Requests an exit refused for an unknown key, so the client refreshed the exit list.
    pub key_refreshes: Counter,
    /// Requests tried again on another exit.
    pub retries: Counter,
    /// 1 while the connection to the relay is up.
    pub relay_connected: Gauge,
    /// Exits requests may go to now (verified, consistent, pinned when pinning).
    pub exits_available: Gauge,
    /// Exit descriptors not accepted from a source, by reason.
    pub descriptors_refused: Family<RefusalLabel, Counter>,
    /// Relay discovery.
    pub dht: DhtMetrics,
}

impl ClientMetrics {
    /// Metrics with every closed-label series created at zero.
    #[must_use]
    pub fn new() -> Self {
        let metrics = Self::default();
        precreate(&metrics.requests, media_labels());
        precreate(&metrics.errors, error_labels(CLIENT_ERRORS));
        precreate(
            &metrics.forwarded_bytes,
            [Flow::ToRelay, Flow::FromRelay].map(|direction| FlowLabel { direction }),
        );
        precreate(&metrics.backend_latency, media_labels());
        precreate(&metrics.gateway_overhead, media_labels());
        precreate(
            &metrics.descriptors_refused,
            [DescriptorRefusal::Rollback, DescriptorRefusal::KeyConflict]
                .map(|reason| RefusalLabel { reason }),
        );
        metrics
    }

    /// Counts a failed request.
    pub fn error(&self, class: ErrorClass) {
        self.errors.get_or_create(&ClassLabel { class }).inc();
    }

    /// Counts encrypted bytes.
    pub fn bytes(&self, direction: Flow, len: usize) {
        self.forwarded_bytes
            .get_or_create(&FlowLabel { direction })
            .inc_by(len as u64);
    }

    /// Registers every metric under `tokengo_client_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("client");
        self.dht.register_seeker(r);
        r.register(
            "requests",
            "Requests from the user's tools, by media type",
            self.requests.clone(),
        );
        r.register(
            "errors",
            "Requests that failed, by class",
            self.errors.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests being served now (until their response body ends)",
            self.requests_in_flight.clone(),
        );
        r.register_with_unit(
            "forwarded",
            "Encrypted bytes sent to and received from the relay",
            Unit::Bytes,
            self.forwarded_bytes.clone(),
        );
        r.register(
            "responses",
            "Responses handed to the user's tools, by status class",
            self.responses.clone(),
        );
        r.register_with_unit(
            "backend_latency",
            "The backend's own time as the exit reports it (streamed: until the response head)",
            Unit::Seconds,
            self.backend_latency.clone(),
        );
        r.register_with_unit(
            "gateway_overhead",
            "Time the private path added beyond the backend's own time (streamed: until the response head)",
            Unit::Seconds,
            self.gateway_overhead.clone(),
        );
        r.register(
            "key_refreshes",
            "Requests an exit refused for an unknown key (the client refreshed the exit list)",
            self.key_refreshes.clone(),
        );
        r.register(
            "retries",
            "Requests tried again on another exit",
            self.retries.clone(),
        );
        r.register(
            "relay_connected",
            "1 while the connection to the relay is up",
            self.relay_connected.clone(),
        );
        r.register(
            "exits_available",
            "Exits requests may go to now (verified, consistent, pinned when pinning)",
            self.exits_available.clone(),
        );
        r.register(
            "descriptors_refused",
            "Exit descriptors not accepted from a relay or the DHT because their keys differ from the newest seen for that exit (rollback, key_conflict); the exit is not used until sources agree",
            self.descriptors_refused.clone(),
        );
    }

    /// Requests so far.
    #[must_use]
    pub fn requests_total(&self) -> u64 {
        family_total(&self.requests, media_labels())
    }

    /// Failed requests so far.
    #[must_use]
    pub fn errors_total(&self) -> u64 {
        family_total(&self.errors, error_labels(CLIENT_ERRORS))
    }

    /// Overhead of all media types together.
    #[must_use]
    pub fn overhead(&self) -> HistogramSnapshot {
        merged(&self.gateway_overhead)
    }

    /// Backend latency of all media types together.
    #[must_use]
    pub fn backend(&self) -> HistogramSnapshot {
        merged(&self.backend_latency)
    }
}

/// Process-wide facts: version and start time.
#[derive(Debug)]
pub struct ProcessInfo {
    started: std::time::Instant,
    start_time: TimestampGauge,
    info: Family<BuildLabel, Gauge>,
}

/// `version="…"` of `tokengo_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

impl Default for ProcessInfo {
    fn default() -> Self {
        let info = Family::<BuildLabel, Gauge>::default();
        info.get_or_create(&BuildLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        let start_time = TimestampGauge::default();
        start_time.set(i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX));
        Self {
            started: std::time::Instant::now(),
            start_time,
            info,
        }
    }
}

impl ProcessInfo {
    /// Registers `tokengo_build_info` and `tokengo_start_time_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("build_info", "The running version", self.info.clone());
        registry.register_with_unit(
            "start_time",
            "When the process started (Unix seconds)",
            Unit::Seconds,
            self.start_time.clone(),
        );
    }

    /// Time since start.
    #[must_use]
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_closed_labels_and_histogram_buckets() {
        let mut registry = Registry::with_prefix("tokengo");
        let metrics = ExitMetrics::new();
        metrics.register(&mut registry);
        metrics
            .gateway_overhead
            .get_or_create(&MediaLabel {
                media: Media::Chunked,
            })
            .observe(Duration::from_millis(3));
        metrics.error(ErrorClass::BackendUnreachable);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("tokengo_exit_requests_total{media=\"single\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tokengo_exit_errors_total{class=\"backend_unreachable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "tokengo_exit_gateway_overhead_seconds_bucket{le=\"0.005\",media=\"chunked\"} 1"
            ) || text.contains(
                "tokengo_exit_gateway_overhead_seconds_bucket{media=\"chunked\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}

//! Structured logs on stderr (stdout is reserved for the few lines a user or script acts on,
//! like the relay's multiaddr). `RUST_LOG` filters as usual; the default is `info`. When trace
//! export is on, the same spans also feed OpenTelemetry (see `telemetry`), filtered on their
//! own so `RUST_LOG` does not decide what is exported.
//!
//! What is never logged, at any level: prompts, response bodies, request paths and headers,
//! credentials, and (at the relay) client addresses. Errors are logged by their message, which
//! carries no request content (backend URLs are cut out of HTTP errors).

use std::io::IsTerminal as _;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{FilterExt as _, Targets},
    layer::Filter,
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use crate::cli::LogFormat;

/// Installs the global subscriber: the log output, plus the OpenTelemetry layer when
/// `traces` is given. Safe to call once per process.
pub fn init(format: LogFormat, traces: Option<&SdkTracerProvider>) {
    let filter =
        filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let otel = traces.map(crate::ops::telemetry::layer);
    let result = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init();
    // A second init (tests that run several roles) keeps the first subscriber.
    drop(result);
}

/// The log filter: `directives` (as `RUST_LOG` gives them), with the QUIC libraries capped at
/// debug and libp2p at warn whatever the directives say. At trace level they log every packet with its peer's
/// address, and a relay must never log a client's address; nothing at debug or above names
/// one.
pub fn filter<S>(directives: EnvFilter) -> impl Filter<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let quic_cap = Targets::new()
        .with_default(Level::TRACE)
        .with_target("quinn", Level::DEBUG)
        .with_target("quinn_proto", Level::DEBUG)
        .with_target("quinn_udp", Level::DEBUG)
        // libp2p (discovery) names peers' addresses from debug on, and clients reach a relay's
        // swarm to ask for relay-info: its own logs stop at warnings. Discovery's progress is
        // logged by `tokengo::discovery`.
        .with_target("libp2p", Level::WARN)
        .with_target("multistream_select", Level::WARN);
    directives.and(quic_cap)
}

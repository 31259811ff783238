//! Trace context never crosses the privacy boundary. The whole chain runs with tracing
//! exported through the node's own OpenTelemetry layer; the user's tool sends trace headers
//! of its own. Neither those ids nor any trace or span id the client used (read from the
//! spans the client exported) appears in anything the relay forwarded or the exit received,
//! and the relay's and exit's spans start traces of their own.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Recorder, chain, contains, limits, start_backend};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tracing_subscriber::layer::SubscriberExt as _;

/// The user's tool's trace: W3C, B3, Jaeger and Sentry forms of it.
const USER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const USER_SPAN: &str = "00f067aa0ba902b7";

/// Keeps every span the SDK exports.
#[derive(Debug, Clone, Default)]
struct Exported(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Exported {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn hex_forms(trace: TraceId) -> Vec<Vec<u8>> {
    let hex = trace.to_string();
    vec![
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        trace.to_bytes().to_vec(),
        // B3's 64-bit form: the low half of the id.
        hex.as_bytes()[16..].to_vec(),
    ]
}

fn span_forms(span: SpanId) -> Vec<Vec<u8>> {
    let hex = span.to_string();
    vec![
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        span.to_bytes().to_vec(),
    ]
}

// The default current-thread runtime keeps every task of the chain on this thread, where the
// subscriber below is the default.
#[tokio::test]
async fn no_client_trace_or_span_id_reaches_the_relay_or_the_exit() {
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(tokengo::telemetry::layer(&provider));
    let _default = tracing::subscriber::set_default(subscriber);

    let backend = start_backend().await;
    let recorder = Arc::new(Recorder::default());
    let chain = chain(
        &backend.url,
        &limits(),
        Duration::from_secs(30),
        Some(recorder.clone()),
    )
    .await;
    let http = reqwest::Client::new();
    let mut received = Vec::new();
    for stream in [false, true] {
        let response = http
            .post(format!("{}/v1/chat/completions", chain.client.url))
            .header("traceparent", format!("00-{USER_TRACE}-{USER_SPAN}-01"))
            .header("tracestate", "congo=t61rcWkgMzE")
            .header("baggage", "userId=alice,isProduction=false")
            .header("b3", format!("{USER_TRACE}-{USER_SPAN}-1"))
            .header("x-b3-traceid", USER_TRACE)
            .header("x-b3-spanid", USER_SPAN)
            .header("x-b3-sampled", "1")
            .header("uber-trace-id", format!("{USER_TRACE}:{USER_SPAN}:0:1"))
            .header("uberctx-user", "alice")
            .header("sentry-trace", format!("{USER_TRACE}-{USER_SPAN}-1"))
            .header("openai-beta", "kept")
            .json(&serde_json::json!({"model": "m", "stream": stream, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // The exit's report of the backend's time is for the client alone.
        assert!(
            !response.headers().contains_key("tokengo-backend-ms"),
            "{:?}",
            response.headers()
        );
        received.push(response.text().await.unwrap());
    }
    // The exit ends its request span once it has sent the last byte, which can be after the
    // client has read it: wait (polling, bounded) until both requests' spans have ended.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        provider.force_flush().unwrap();
        let spans = exported.0.lock().unwrap().clone();
        let ended = |name: &str| spans.iter().filter(|s| s.name == name).count();
        let all_ended = [
            "client.request",
            "relay.forward",
            "exit.request",
            "exit.backend",
        ]
        .iter()
        .all(|name| ended(name) >= 2);
        if all_ended || tokio::time::Instant::now() >= deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let named = |prefix: &str| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect()
    };
    let client = named("client.");
    let relay = named("relay.");
    let exit = named("exit.");
    let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
    assert!(
        client.iter().filter(|s| s.name == "client.request").count() == 2
            && relay.iter().filter(|s| s.name == "relay.forward").count() == 2
            && exit.iter().filter(|s| s.name == "exit.request").count() == 2
            && exit.iter().filter(|s| s.name == "exit.backend").count() == 2,
        "{names:?}"
    );

    // What the client used: its trace ids and span ids, from its own exported spans.
    let client_traces: HashSet<TraceId> =
        client.iter().map(|s| s.span_context.trace_id()).collect();
    let client_spans: HashSet<SpanId> = client.iter().map(|s| s.span_context.span_id()).collect();
    assert_eq!(client_traces.len(), 2, "one trace per request");
    let user_trace = TraceId::from_hex(USER_TRACE).unwrap();
    assert!(
        !client_traces.contains(&user_trace),
        "the client continued the user's trace"
    );

    // The relay and the exit started traces of their own: no shared trace id, no parent
    // among the client's spans, nothing from the user's headers.
    for span in relay.iter().chain(&exit) {
        let trace = span.span_context.trace_id();
        assert!(
            !client_traces.contains(&trace),
            "{} joined a client trace",
            span.name
        );
        assert_ne!(trace, user_trace, "{} joined the user's trace", span.name);
        assert!(
            !client_spans.contains(&span.parent_span_id),
            "{} has a client span as parent",
            span.name
        );
        assert!(
            !span.parent_span_is_remote,
            "{} has a remote parent",
            span.name
        );
    }
    for span in relay
        .iter()
        .chain(exit.iter().filter(|s| s.name == "exit.request"))
    {
        assert_eq!(
            span.parent_span_id,
            SpanId::INVALID,
            "{} is not a root",
            span.name
        );
    }

    // The bytes: what the relay forwarded (both ways), and what reached the backend through
    // the exit (the echo backend returns the request headers it got).
    let to_exit = recorder.to_exit.lock().unwrap().clone();
    let to_client = recorder.to_client.lock().unwrap().clone();
    assert!(to_exit.len() > 256 && to_client.len() > 256);
    let mut forbidden: Vec<Vec<u8>> = hex_forms(user_trace);
    forbidden.extend(span_forms(SpanId::from_hex(USER_SPAN).unwrap()));
    for trace in &client_traces {
        forbidden.extend(hex_forms(*trace));
    }
    for span in &client_spans {
        forbidden.extend(span_forms(*span));
    }
    for needle in &forbidden {
        assert!(
            !contains(&to_exit, needle),
            "relay forwarded {needle:?} to the exit"
        );
        assert!(
            !contains(&to_client, needle),
            "relay forwarded {needle:?} to the client"
        );
    }
    for echoed in &received {
        let json: serde_json::Value = serde_json::from_str(echoed).unwrap();
        let headers = json["headers"].as_object().unwrap();
        assert_eq!(
            headers["openai-beta"],
            serde_json::json!(["kept"]),
            "{echoed}"
        );
        for name in headers.keys() {
            assert!(
                !tokengo::http_message::is_trace_context(&name.parse().unwrap()),
                "the backend received trace header {name}: {echoed}"
            );
        }
        for needle in &forbidden {
            assert!(
                !contains(echoed.as_bytes(), needle),
                "the exit received {:?}: {echoed}",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

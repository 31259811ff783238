//! The whole chain on loopback: client → relay → exit → backend over real QUIC and OHTTP.
//! What the relay sees, what survives the trip, and how long streams behave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Recorder, chain, contains, limits, start_backend};

const PROMPT: &str = "SECRET-PROMPT-a7c1e9: what is the airspeed of an unladen swallow?";

#[tokio::test]
async fn relay_forwards_only_ciphertext() {
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
    for stream in [false, true] {
        let body = serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]});
        let response = http
            .post(format!("{}/v1/chat/completions", chain.client.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        // The echo backend returns the prompt: the client got it back in clear...
        assert!(text.contains("SECRET-PROMPT-a7c1e9"), "{text}");
    }
    // ...and the relay forwarded plenty of bytes both ways, none of them readable.
    let to_exit = recorder.to_exit.lock().unwrap().clone();
    let to_client = recorder.to_client.lock().unwrap().clone();
    assert!(
        to_exit.len() > 256 && to_client.len() > 256,
        "{} / {}",
        to_exit.len(),
        to_client.len()
    );
    for needle in [
        &b"SECRET-PROMPT"[..],
        b"swallow",
        b"chat/completions",
        b"application/json",
        b"\"model\"",
    ] {
        assert!(
            !contains(&to_exit, needle),
            "relay saw {:?} going to the exit",
            String::from_utf8_lossy(needle)
        );
        assert!(
            !contains(&to_client, needle),
            "relay saw {:?} going to the client",
            String::from_utf8_lossy(needle)
        );
    }
}

#[tokio::test]
async fn query_strings_repeated_headers_and_statuses_survive() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let response = reqwest::Client::new()
        .get(format!(
            "{}/v1/anything/here?a=1&b=two%20words&status=418",
            chain.client.url
        ))
        // A repeated header from the forwarded list (others stay at the client).
        .header("accept", "first")
        .header("accept", "second")
        .header("x-rep", "not forwarded")
        .header("authorization", "Bearer user-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 418);
    let echoed: Vec<_> = response
        .headers()
        .get_all("x-echo")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(echoed, ["one", "two"]);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["path"], "/v1/anything/here");
    assert_eq!(json["query"], "a=1&b=two%20words&status=418");
    assert_eq!(
        json["headers"]["accept"],
        serde_json::json!(["first", "second"])
    );
    assert!(json["headers"].get("x-rep").is_none());
    assert!(
        json["headers"].get("authorization").is_none(),
        "the user's credential must not reach the backend"
    );
}

#[tokio::test]
async fn large_bodies_round_trip_both_ways() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let http = reqwest::Client::new();
    let upload = "x".repeat(3 << 20);
    let json: serde_json::Value = http
        .post(format!("{}/v1/upload", chain.client.url))
        .body(upload.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["body_len"], upload.len(), "{json}");
    let download = http
        .get(format!("{}/big?len={}", chain.client.url, 5 << 20))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(download.len(), 5 << 20);
    assert!(
        download
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8)
    );
}

/// A generation that keeps streaming outlives every idle timeout on the path: the backend
/// idle timeout (1 s) and the QUIC idle timeout (3 s) are both shorter than the stream (6 s).
#[tokio::test]
async fn streaming_outlives_idle_timeouts_while_bytes_flow() {
    let backend = start_backend().await;
    let limits = tokengo::config::Limits {
        quic_idle_timeout: Duration::from_secs(3),
        ..limits()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(1), None).await;
    let started = Instant::now();
    let mut response = reqwest::Client::new()
        .post(format!(
            "{}/slow?events=16&interval_ms=400",
            chain.client.url
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        arrivals.push(started.elapsed());
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let total = started.elapsed();
    for i in 0..16 {
        assert!(
            text.contains(&format!("{{\"event\":{i}}}")),
            "event {i} missing: {text}"
        );
    }
    assert!(total > Duration::from_secs(5), "stream took {total:?}");
    // Incremental: the first event reached the user long before the stream ended.
    assert!(
        arrivals[0] < total / 4,
        "first event at {:?} of {total:?}",
        arrivals[0]
    );
    assert!(
        arrivals.len() >= 8,
        "events were batched: {} reads",
        arrivals.len()
    );
}

/// When the backend dies mid-stream the user sees a broken response, never a short success.
#[tokio::test]
async fn backend_failure_mid_stream_is_an_error_not_a_short_success() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let mut response = reqwest::Client::new()
        .post(format!(
            "{}/slow?events=10&interval_ms=50&fail_after=3",
            chain.client.url
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let outcome = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    // The events before the failure arrived (the last one may die with the backend's socket).
    assert!(text.contains("{\"event\":1}"), "{text}");
    assert!(
        outcome.is_err(),
        "a truncated stream must fail, got a clean end after {text:?}"
    );
}

#[tokio::test]
async fn backend_down_is_an_openai_shaped_502() {
    let url = format!("http://{}", common::closed_port());
    let chain = chain(&url, &limits(), Duration::from_secs(30), None).await;
    for stream in [false, true] {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", chain.client.url))
            .json(&serde_json::json!({"model": "m", "stream": stream, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        let json: serde_json::Value = response.json().await.unwrap();
        assert_eq!(json["error"]["code"], "backend_unreachable", "{json}");
        assert_eq!(json["error"]["type"], "api_error");
        assert!(
            json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unreachable")
        );
    }
}

#[tokio::test]
async fn oversized_request_is_413_and_the_client_keeps_serving() {
    let backend = start_backend().await;
    let limits = tokengo::config::Limits {
        max_request_body: 1024,
        ..limits()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(30), None).await;
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/v1/x", chain.client.url))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["error"]["code"], "payload_too_large");
    let ok = http
        .get(format!("{}/v1/x", chain.client.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn no_exit_is_503() {
    common::init();
    let relay = common::start_relay(&limits(), None).await;
    let client = common::start_client(&relay.addr, &limits()).await;
    let response = reqwest::get(format!("{}/v1/models", client.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["error"]["code"], "no_exit_available");
}

/// When the exit goes away the relay forgets it and the user gets a clean 503.
#[tokio::test]
async fn exit_disconnect_is_noticed_and_requests_fail_cleanly() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/v1/a", chain.client.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    chain.exit.stop.cancel();
    chain.exit.task.await.unwrap().unwrap();
    // The relay drops the exit once its tunnel closes.
    let mut count = chain.relay.registry.subscribe();
    tokio::time::timeout(Duration::from_secs(10), count.wait_for(|n| *n == 0))
        .await
        .expect("relay kept a dead exit")
        .unwrap();
    let response = http
        .get(format!("{}/v1/a", chain.client.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
}

/// The exit notices a relay restart, reconnects with backoff and registers again; requests
/// then flow through the new relay process.
#[tokio::test]
async fn exit_reregisters_after_a_relay_restart() {
    common::init();
    let backend = start_backend().await;
    let identity = libp2p_identity::Keypair::generate_ed25519();
    let relay =
        common::start_relay_with(&identity, "127.0.0.1:0".parse().unwrap(), &limits(), None).await;
    let port: u16 = relay
        .addr
        .to_string()
        .split('/')
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    let mut exit = common::start_exit(
        &relay.addr,
        common::backend_config(&backend.url, Duration::from_secs(30)),
        &limits(),
    )
    .await;

    relay.stop.cancel();
    relay.task.await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), exit.registered.wait_for(|r| !*r))
        .await
        .expect("exit did not notice the relay going away")
        .unwrap();

    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    let relay = common::start_relay_with(&identity, listen, &limits(), None).await;
    tokio::time::timeout(Duration::from_secs(30), exit.registered.wait_for(|r| *r))
        .await
        .expect("exit did not re-register")
        .unwrap();
    assert_eq!(relay.registry.len(), 1);
    let client = common::start_client(&relay.addr, &limits()).await;
    let response = reqwest::get(format!("{}/v1/after-restart", client.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

//! What clients can make an exit hold in memory, over real QUIC and OHTTP: single-message
//! answers are sealed whole, so clients that ask for large answers and never read them make
//! the exit hold those answers. The exit's answer budget bounds the bytes held (measured by
//! the exit's own gauge, not by timing) while well-behaved clients keep getting answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{chain, start_backend};
use libp2p_identity::{Keypair, PeerId};
use tokengo::{
    config::Limits,
    http_message,
    transport::{self, RelayAddr, TransportParams},
};
use tokengo_proto::{
    bhttp,
    descriptor::SignedDescriptor,
    frame::{self, ClientRequest, MediaType, Status},
    key_config::KeyConfig,
    ohttp,
};

/// Generous: the machine running the tests may be loaded.
const PATIENCE: Duration = Duration::from_secs(60);
/// The answer each stalled reader asks for.
const LARGE: usize = 1 << 20;
/// Stalled readers: far more than the budget holds.
const STALLED: usize = 24;

async fn dial(relay: &RelayAddr) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = transport::client_endpoint(false).unwrap();
    let params = TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams: 0,
        keep_alive: true,
    };
    let connection = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        relay,
        tokengo_proto::frame::ALPN_CLIENT,
        params,
    )
    .await
    .unwrap();
    (endpoint, connection)
}

/// Waits until `done` holds, checking every 20 ms, failing after [`PATIENCE`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The relay's only exit: its id and key.
async fn exit_key(client: &quinn::Connection) -> (PeerId, KeyConfig) {
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    let mut header = Vec::new();
    ClientRequest::ListExits.encode(&mut header);
    send.write_all(&header).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(4 << 20).await.unwrap();
    assert_eq!(answer[0], Status::Ok as u8);
    let list = frame::decode_exit_list(&answer[1..], 1024).unwrap();
    let descriptor = SignedDescriptor::verify(&list[0], tokengo::clock::unix_now()).unwrap();
    (descriptor.peer_id, descriptor.key_configs[0])
}

/// A whole single-message request for `GET /big?len=LEN` (a body of `len` bytes), ready to
/// send on a fresh stream.
fn big_request(exit: PeerId, key: &KeyConfig, len: usize) -> (Vec<u8>, ohttp::ResponseOpener) {
    let head = bhttp::RequestHead {
        method: b"GET".to_vec(),
        scheme: b"https".to_vec(),
        authority: b"localhost".to_vec(),
        path: format!("/big?len={len}").into_bytes(),
        fields: vec![http_message::date_field(std::time::SystemTime::now())],
    };
    let message = bhttp::encode_request(&head, b"", 0).unwrap();
    let (encapsulated, opener) = ohttp::encapsulate_request(key, &message).unwrap();
    let mut bytes = Vec::new();
    ClientRequest::Forward {
        exit_id: exit.to_bytes(),
        media: MediaType::Single,
    }
    .encode(&mut bytes);
    bytes.extend_from_slice(&encapsulated);
    (bytes, opener)
}

#[tokio::test]
async fn clients_that_never_read_cannot_make_the_exit_hold_more_than_its_answer_budget() {
    let backend = start_backend().await;
    let limits = Limits {
        max_response_body: 2 << 20,
        answer_budget: 8 << 20,
        answer_budget_wait: Duration::from_secs(1),
        // Stalled readers are never cut during the test: only the budget bounds them.
        write_stall_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(300), None).await;
    let exit = chain.exit.probe.clone();
    let (_endpoint, attacker) = dial(&chain.relay.addr).await;
    let (exit_id, key) = exit_key(&attacker).await;
    // Each asks for a large answer and never reads a byte of it.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let (bytes, _) = big_request(exit_id, &key, LARGE);
        let (mut send, recv) = attacker.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        stalled.push((send, recv));
    }
    // Every stalled request is past the backend: its answer is held, or was refused.
    eventually("every stalled request to be answered or refused", || {
        let metrics = exit.metrics();
        metrics.requests_total() == STALLED as u64 && metrics.streams_in_flight.get() == 0
    })
    .await;
    let metrics = exit.metrics();
    let peak = metrics.answer_bytes_held_peak.get();
    let held = metrics.answer_bytes_held.get();
    let refused = metrics
        .errors
        .get_or_create(&tokengo::metrics::ClassLabel {
            class: tokengo::metrics::ErrorClass::Overloaded,
        })
        .get();
    println!(
        "{STALLED} stalled readers of {LARGE}-byte answers: peak held {peak} bytes, {held} \
         held now, {refused} refused, budget {}",
        limits.answer_budget
    );
    assert!(
        peak <= limits.answer_budget as i64,
        "the exit held {peak} bytes of answers, over its budget of {}",
        limits.answer_budget
    );
    assert!(
        held >= LARGE as i64,
        "the stalled answers are still held: the budget, not the readers, bounded them"
    );
    assert!(
        refused > 0,
        "the attack asked for more than the budget holds"
    );
    assert_eq!(
        metrics.answer_budget_bytes.get(),
        limits.answer_budget as i64
    );

    // A well-behaved client still gets its (small) answer through the real client...
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{}/big?len=20000", chain.client.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().len(), 20000);

    // ... and once the readers go away, their bytes come back and a large answer fits again.
    drop(stalled);
    attacker.close(quinn::VarInt::from_u32(0), b"done");
    eventually("the stalled answers' bytes to come back", || {
        exit.metrics().answer_bytes_held.get() == 0
    })
    .await;
    let response = http
        .get(format!("{}/big?len={LARGE}", chain.client.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().len(), LARGE);
}

#[tokio::test]
async fn an_answer_refused_for_memory_is_an_encrypted_503_that_says_so() {
    let backend = start_backend().await;
    let limits = Limits {
        max_response_body: 2 << 20,
        answer_budget: 4 << 20,
        answer_budget_wait: Duration::from_secs(1),
        write_stall_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(300), None).await;
    let exit = chain.exit.probe.clone();
    let (_endpoint, attacker) = dial(&chain.relay.addr).await;
    let (exit_id, key) = exit_key(&attacker).await;
    // Two stalled 1.5 MiB answers fill what large answers may use (3.5 MiB).
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (bytes, _) = big_request(exit_id, &key, 1_500_000);
        let (mut send, recv) = attacker.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        stalled.push((send, recv));
    }
    eventually("both stalled answers to be held", || {
        exit.metrics().answer_bytes_held.get() >= 3_000_000
    })
    .await;
    let (bytes, opener) = big_request(exit_id, &key, 1_500_000);
    let (mut send, mut recv) = attacker.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(PATIENCE, recv.read_to_end(4 << 20))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(answer[..2], [frame::ACCEPTED, Status::Ok as u8]);
    let message = opener.open(&answer[2..]).unwrap();
    let (head, body) = bhttp::decode_response(&message, &bhttp::Limits::default()).unwrap();
    assert_eq!(head.status, 503);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "exit_overloaded", "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream"),
        "{json}"
    );
    drop(stalled);
}

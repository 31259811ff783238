//! Bad input at every boundary: malformed frames, garbage after valid headers, unknown key
//! ids, truncated chunked streams, replays, forged registrations and the wrong relay identity.
//! Each gets a clear answer, and the relay and exit keep serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{chain, limits, start_backend};
use libp2p_identity::{Keypair, PeerId};
use tokengo::transport::{self, ConnectError, RelayAddr, TransportParams};
use tokengo_proto::{
    bhttp, chunked,
    descriptor::{Descriptor, SignedDescriptor},
    frame::{self, ClientRequest, ControlFrame, MediaType, Status},
    key_config::KeyConfig,
    ohttp,
};

fn params() -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(10),
        max_incoming_streams: 16,
        keep_alive: false,
    }
}

/// A client speaking the wire protocol directly, to send what a well-behaved client never would.
struct RawClient {
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl RawClient {
    async fn connect(relay: &RelayAddr, alpn: &[u8], identity: &Keypair) -> Self {
        let endpoint = transport::client_endpoint(false).unwrap();
        let connection = transport::connect(&endpoint, identity, relay, alpn, params())
            .await
            .unwrap();
        Self {
            connection,
            _endpoint: endpoint,
        }
    }

    /// Sends `bytes` on a new stream, finishes it, and returns everything the peer answered.
    /// The peer may answer and stop reading before all was sent (a request it refuses early).
    async fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let (mut send, mut recv) = self.connection.open_bi().await.unwrap();
        match send.write_all(bytes).await {
            Ok(()) => send.finish().unwrap(),
            Err(quinn::WriteError::Stopped(_)) => {}
            Err(e) => panic!("sending failed: {e}"),
        }
        tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 24))
            .await
            .expect("peer did not answer")
            .unwrap()
    }

    async fn exits(&self) -> Vec<Descriptor> {
        let mut header = Vec::new();
        ClientRequest::ListExits.encode(&mut header);
        let answer = self.exchange(&header).await;
        assert_eq!(answer[0], Status::Ok as u8);
        frame::decode_exit_list(&answer[1..], 64)
            .unwrap()
            .iter()
            .map(|d| SignedDescriptor::verify(d, now()).unwrap())
            .collect()
    }
}

fn now() -> u64 {
    tokengo::clock::unix_now()
}

fn forward(exit: PeerId, media: MediaType, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ClientRequest::Forward {
        exit_id: exit.to_bytes(),
        media,
    }
    .encode(&mut out);
    out.extend_from_slice(body);
    out
}

/// A request head for `path`, dated now (the exit refuses undated requests).
fn dated_head(path: &[u8]) -> bhttp::RequestHead {
    bhttp::RequestHead {
        method: b"GET".to_vec(),
        scheme: b"https".to_vec(),
        authority: Vec::new(),
        path: path.to_vec(),
        fields: vec![tokengo::http_message::date_field(
            std::time::SystemTime::now(),
        )],
    }
}

fn get_request() -> Vec<u8> {
    bhttp::encode_request(&dated_head(b"/v1/ping"), b"", 0).unwrap()
}

/// Sends `inner` as a single OHTTP request to `exit` and opens the answer: status and body.
async fn exchange_single(raw: &RawClient, exit: &Descriptor, inner: &[u8]) -> (u16, String) {
    let (encapsulated, opener) = ohttp::encapsulate_request(&exit.key_configs[0], inner).unwrap();
    let answer = raw
        .exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
        .await;
    assert_eq!(
        answer[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8],
        "an encrypted answer"
    );
    let (head, body) = bhttp::decode_response(
        &opener.open(&answer[2..]).unwrap(),
        &bhttp::Limits::default(),
    )
    .unwrap();
    (head.status, String::from_utf8_lossy(&body).into_owned())
}

/// Opens a whole chunked answer (after its status byte): the response head and body.
fn open_chunked(opener: &mut chunked::ChunkedResponseOpener, answer: &[u8]) -> (u16, Vec<u8>) {
    let mut sealed = BytesMut::from(answer);
    let mut plain = BytesMut::new();
    loop {
        let chunk = match opener.decode(&mut sealed).unwrap() {
            Some(chunk) => chunk,
            None => opener
                .decode_eof(&mut sealed)
                .unwrap()
                .expect("truncated answer"),
        };
        plain.extend_from_slice(&chunk.data);
        if chunk.last {
            break;
        }
    }
    let mut decoder = bhttp::ResponseDecoder::new(bhttp::Limits::default());
    let (mut status, mut body) = (0, Vec::new());
    while let Some(event) = decoder.decode_eof(&mut plain).unwrap() {
        match event {
            bhttp::ResponseEvent::Head(head) => status = head.status,
            bhttp::ResponseEvent::Body(bytes) => body.extend_from_slice(&bytes),
            bhttp::ResponseEvent::End => break,
        }
    }
    (status, body)
}

/// Sends a good single-message request and checks the answer decrypts to a 200.
async fn assert_still_serving(raw: &RawClient, exit: &Descriptor) {
    let (encapsulated, opener) =
        ohttp::encapsulate_request(&exit.key_configs[0], &get_request()).unwrap();
    let answer = raw
        .exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
        .await;
    assert_eq!(
        answer[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8],
        "good request refused after bad input"
    );
    let message = opener.open(&answer[2..]).unwrap();
    let (head, _) = bhttp::decode_response(&message, &bhttp::Limits::default()).unwrap();
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn malformed_stream_headers_get_a_status_and_the_relay_keeps_serving() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let raw = RawClient::connect(
        &chain.relay.addr,
        tokengo_proto::frame::ALPN_CLIENT,
        &Keypair::generate_ed25519(),
    )
    .await;
    let exit = raw.exits().await.remove(0);
    // Unknown version, unknown kind, an exit id longer than allowed, a bad media type.
    let mut long_id = vec![1, 2];
    tokengo_proto::varint::put(&mut long_id, 10_000);
    long_id.extend(std::iter::repeat_n(7u8, 100));
    for bad in [
        vec![9u8, 1],
        vec![1, 0x7f],
        long_id,
        forward(exit.peer_id, MediaType::Single, b"")[..3].to_vec(),
    ] {
        let answer = raw.exchange(&bad).await;
        assert_eq!(answer, [Status::Malformed as u8], "for {bad:?}");
    }
    // A well-formed header naming no registered exit.
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    assert_eq!(
        raw.exchange(&forward(stranger, MediaType::Single, b"x"))
            .await,
        [Status::NoSuchExit as u8]
    );
    assert_still_serving(&raw, &exit).await;
}

#[tokio::test]
async fn exit_refuses_garbage_unknown_keys_truncation_and_replays() {
    let backend = start_backend().await;
    // A small body limit, so an oversized request is quick to build and send.
    let limits = tokengo::config::Limits {
        max_request_body: 1 << 20,
        ..limits()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(30), None).await;
    let raw = RawClient::connect(
        &chain.relay.addr,
        tokengo_proto::frame::ALPN_CLIENT,
        &Keypair::generate_ed25519(),
    )
    .await;
    let exit = raw.exits().await.remove(0);
    let key = exit.key_configs[0];
    let undecryptable = [Status::Undecryptable as u8];

    // Garbage where the encapsulated request should be: the first byte is taken as a key id.
    assert_eq!(
        raw.exchange(&forward(
            exit.peer_id,
            MediaType::Single,
            b"garbage garbage garbage garbage garbage"
        ))
        .await,
        [Status::KeyUnknown as u8]
    );
    let mut garbage = vec![key.key_id];
    garbage.extend_from_slice(&[0x42; 80]);
    assert_eq!(
        raw.exchange(&forward(exit.peer_id, MediaType::Single, &garbage))
            .await,
        undecryptable
    );

    // A valid request followed by garbage: the AEAD covers the whole message, so it fails.
    let (mut encapsulated, _) = ohttp::encapsulate_request(&key, &get_request()).unwrap();
    encapsulated.extend_from_slice(b"trailing");
    assert_eq!(
        raw.exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
            .await,
        undecryptable
    );

    // An unknown key id gets the distinct "key unknown" answer, for both media types.
    let stale = KeyConfig {
        key_id: key.key_id.wrapping_add(100),
        ..key
    };
    let (encapsulated, _) = ohttp::encapsulate_request(&stale, &get_request()).unwrap();
    assert_eq!(
        raw.exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
            .await,
        [Status::KeyUnknown as u8]
    );
    let (_, header) = chunked::start_request(&stale).unwrap();
    assert_eq!(
        raw.exchange(&forward(exit.peer_id, MediaType::Chunked, &header))
            .await,
        [Status::KeyUnknown as u8]
    );

    // A chunked request cut before its final chunk is refused, never served short.
    let (mut sealer, header) = chunked::start_request(&key).unwrap();
    let mut truncated = header;
    truncated.extend_from_slice(&sealer.seal_chunk(&get_request()).unwrap());
    assert_eq!(
        raw.exchange(&forward(exit.peer_id, MediaType::Chunked, &truncated))
            .await,
        undecryptable
    );

    // The same encapsulated request again: a replay, refused before any HPKE work (its
    // `enc` is remembered from the first, which decapsulated), for both media types. The
    // refusal is a status byte: only decapsulation yields a key to encrypt an answer with,
    // and only the replayer sees it.
    let metrics = chain.exit.probe.metrics();
    let (encapsulated, opener) = ohttp::encapsulate_request(&key, &get_request()).unwrap();
    let first = raw
        .exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
        .await;
    assert_eq!(
        first[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8]
    );
    opener.open(&first[2..]).unwrap();
    let mut inner = Vec::new();
    bhttp::StreamingEncoder::request(&dated_head(b"/v1/ping"), &mut inner)
        .unwrap()
        .end(0, &mut inner);
    let (mut sealer, mut chunked_request) = chunked::start_request(&key).unwrap();
    chunked_request.extend_from_slice(&sealer.seal_split(&inner, true).unwrap());
    let first = raw
        .exchange(&forward(exit.peer_id, MediaType::Chunked, &chunked_request))
        .await;
    assert_eq!(
        first[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8]
    );
    let decapsulated = metrics.decapsulations.get();
    let refused = metrics.replays_refused_early.get();
    for _ in 0..3 {
        for (media, body) in [
            (MediaType::Single, &encapsulated),
            (MediaType::Chunked, &chunked_request),
        ] {
            let again = raw.exchange(&forward(exit.peer_id, media, body)).await;
            assert_eq!(again, undecryptable, "{media:?}");
        }
    }
    assert_eq!(metrics.decapsulations.get(), decapsulated);
    assert_eq!(metrics.replays_refused_early.get(), refused + 6);

    // Undated, or dated outside the window: an encrypted 400 that says why.
    let stale = std::time::SystemTime::now() - Duration::from_secs(600);
    for fields in [vec![], vec![tokengo::http_message::date_field(stale)]] {
        let head = bhttp::RequestHead {
            fields,
            ..dated_head(b"/v1/ping")
        };
        let inner = bhttp::encode_request(&head, b"", 0).unwrap();
        let (status, body) = exchange_single(&raw, &exit, &inner).await;
        assert_eq!(status, 400);
        assert!(body.contains("request_expired"), "{body}");
    }

    // Chunked: a request that opens but is malformed inside, or too large, is answered
    // encrypted too (not with a status byte the relay can read).
    let mut oversized = Vec::new();
    let mut encoder = bhttp::StreamingEncoder::request(
        &bhttp::RequestHead {
            method: b"POST".to_vec(),
            ..dated_head(b"/v1/chat/completions")
        },
        &mut oversized,
    )
    .unwrap();
    encoder.body(&vec![b'x'; limits.max_request_body + 1], &mut oversized);
    encoder.end(0, &mut oversized);
    for (inner, status, code) in [
        (b"\x05 not binary http".to_vec(), 400, "bad_request"),
        (oversized, 413, "payload_too_large"),
    ] {
        let (mut sealer, mut request) = chunked::start_request(&key).unwrap();
        let mut opener = sealer.response_opener().unwrap();
        request.extend_from_slice(&sealer.seal_split(&inner, true).unwrap());
        let answer = raw
            .exchange(&forward(exit.peer_id, MediaType::Chunked, &request))
            .await;
        assert_eq!(
            answer[..2],
            [tokengo_proto::frame::ACCEPTED, Status::Ok as u8],
            "{code}"
        );
        let (got, body) = open_chunked(&mut opener, &answer[2..]);
        assert_eq!(got, status);
        assert!(String::from_utf8_lossy(&body).contains(code), "{code}");
    }

    // Valid OHTTP around an invalid BHTTP message: an encrypted 400 the user can read.
    let (status, body) = exchange_single(&raw, &exit, b"\x05 not binary http").await;
    assert_eq!(status, 400);
    assert!(body.contains("bad_request"), "{body}");

    // Field section larger than the exit accepts: also an encrypted 400, nothing crashes.
    let mut head = dated_head(b"/");
    head.fields.push(bhttp::Field::new(
        b"x-huge".to_vec(),
        vec![b'a'; 200 * 1024],
    ));
    let (encapsulated, opener) =
        ohttp::encapsulate_request(&key, &bhttp::encode_request(&head, b"", 0).unwrap()).unwrap();
    let answer = raw
        .exchange(&forward(exit.peer_id, MediaType::Single, &encapsulated))
        .await;
    assert_eq!(
        answer[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8]
    );
    let (head, _) = bhttp::decode_response(
        &opener.open(&answer[2..]).unwrap(),
        &bhttp::Limits::default(),
    )
    .unwrap();
    assert_eq!(head.status, 400);

    assert_still_serving(&raw, &exit).await;
}

#[tokio::test]
async fn forged_registrations_are_refused_not_evictions() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let victim = chain.exit.peer_id;
    let attacker = Keypair::generate_ed25519();
    let raw_exit = RawClient::connect(
        &chain.relay.addr,
        tokengo_proto::frame::ALPN_EXIT,
        &attacker,
    )
    .await;

    // The attacker signs a descriptor with its own key but claims the victim's id: the
    // signature binds the key, the key gives a different PeerId, so it cannot verify.
    let forged = Descriptor {
        peer_id: attacker.public().to_peer_id(),
        key_configs: vec![KeyConfig {
            key_id: 1,
            public_key: [7; 32],
        }],
        models: Vec::new(),
        issued_at: now(),
        expires_at: now() + 3600,
        max_streams: 8,
        access_token_required: false,
    };
    let own = SignedDescriptor::sign(&forged, &attacker).unwrap();
    // Replace the peer id inside the signed body: breaks the signature.
    let tampered = String::from_utf8_lossy(own.as_bytes())
        .replace(
            &attacker.public().to_peer_id().to_string(),
            &victim.to_string(),
        )
        .into_bytes();

    let (mut send, recv) = raw_exit.connection.open_bi().await.unwrap();
    let mut reader = tokengo::stream::StreamReader::new(recv);
    let mut frame = Vec::new();
    ControlFrame::Register(tampered).encode(&mut frame);
    send.write_all(&frame).await.unwrap();
    let ack = reader
        .decode(4096, Duration::from_secs(10), |b: &mut BytesMut| {
            ControlFrame::decode(b, 4096)
        })
        .await
        .unwrap();
    let ControlFrame::Ack { status, reason } = ack else {
        panic!("expected an ack")
    };
    assert_ne!(status, Status::Ok);
    assert!(!reason.is_empty());

    // The victim is still registered and reachable: refused, not evicted.
    let raw = RawClient::connect(
        &chain.relay.addr,
        tokengo_proto::frame::ALPN_CLIENT,
        &Keypair::generate_ed25519(),
    )
    .await;
    let exits = raw.exits().await;
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0].peer_id, victim);
    assert_still_serving(&raw, &exits[0]).await;

    // A descriptor validly signed by the victim's *key*, replayed by the attacker over its
    // own connection, is refused because the connection proves a different identity.
    let victim_descriptor = raw.exits_raw().await.remove(0);
    let mut frame = Vec::new();
    ControlFrame::Register(victim_descriptor).encode(&mut frame);
    send.write_all(&frame).await.unwrap();
    let ack = reader
        .decode(4096, Duration::from_secs(10), |b: &mut BytesMut| {
            ControlFrame::decode(b, 4096)
        })
        .await
        .unwrap();
    let ControlFrame::Ack { status, reason } = ack else {
        panic!("expected an ack")
    };
    assert_ne!(status, Status::Ok);
    assert!(reason.contains("proved"), "{reason}");
    assert_eq!(raw.exits().await[0].peer_id, victim);
    assert_still_serving(&raw, &raw.exits().await[0]).await;
}

impl RawClient {
    async fn exits_raw(&self) -> Vec<Vec<u8>> {
        let mut header = Vec::new();
        ClientRequest::ListExits.encode(&mut header);
        let answer = self.exchange(&header).await;
        frame::decode_exit_list(&answer[1..], 64).unwrap()
    }
}

fn with_other_peer(relay: &RelayAddr) -> (RelayAddr, PeerId) {
    let other = Keypair::generate_ed25519().public().to_peer_id();
    let text = relay
        .to_string()
        .replace(&relay.peer_id().to_string(), &other.to_string());
    (text.parse().unwrap(), other)
}

#[tokio::test]
async fn wrong_relay_peer_id_is_refused_by_exit_and_client() {
    common::init();
    let relay = common::start_relay(&limits(), None).await;
    let (wrong, expected) = with_other_peer(&relay.addr);

    let endpoint = transport::client_endpoint(false).unwrap();
    let error = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        &wrong,
        tokengo_proto::frame::ALPN_CLIENT,
        params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, ConnectError::WrongPeer { .. }), "{error:?}");
    assert!(error.to_string().contains(&expected.to_string()), "{error}");

    let backend = start_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = tokengo::data_dir::DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let exit = tokengo::exit::Exit::load(
        &data_dir,
        &common::backend_config(&backend.url, Duration::from_secs(5)),
        limits(),
    )
    .unwrap();
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        exit.run(
            wrong.clone(),
            tx,
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("exit kept retrying a relay with the wrong identity");
    let message = format!("{:#}", outcome.unwrap_err());
    assert!(message.contains("different PeerId"), "{message}");

    let client = tokengo::client::Client::bind("127.0.0.1:0".parse().unwrap(), wrong, limits())
        .await
        .unwrap();
    let message = format!("{:#}", client.check_relay().await.unwrap_err());
    assert!(message.contains("different PeerId"), "{message}");
    assert!(relay.registry.is_empty());
}

/// The same refusal from the command line, with the message an operator reads.
#[tokio::test]
async fn cli_exit_and_client_refuse_a_wrong_relay_identity() {
    common::init();
    let relay = common::start_relay(&limits(), None).await;
    let (wrong, expected) = with_other_peer(&relay.addr);
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec![
            "exit",
            "--relay",
            &wrong.to_string(),
            "--backend",
            "http://127.0.0.1:9",
        ],
        vec![
            "client",
            "--relay",
            &wrong.to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .expect("did not stop")
            .unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&expected.to_string()) && stderr.contains("different PeerId"),
            "{args:?}: {stderr}"
        );
    }
}

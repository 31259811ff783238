//! Abuse limits at the relay, over real QUIC: a wedged exit, a client that stops reading, a
//! trickled request body, one client taking an exit's slots, registration floods, windows
//! that cap what one connection makes the relay buffer, and address validation under load.
//! Each attacker is a raw peer speaking the wire protocol; the relay must answer or cut it
//! in bounded time and keep serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use common::{Chain, chain, init, start_backend, start_relay};
use futures_util::StreamExt as _;
use libp2p_identity::{Keypair, PeerId};
use tokengo::{
    config::Limits,
    transport::{self, RelayAddr, TransportParams},
};
use tokengo_proto::{
    bhttp,
    descriptor::{Descriptor, SignedDescriptor},
    frame::{self, ClientRequest, ControlFrame, MediaType, Status},
    key_config::{KeyConfig, KeyPair},
    ohttp,
};
use tokio::sync::watch;

/// Generous: the machine running the tests may be loaded.
const PATIENCE: Duration = Duration::from_secs(60);

fn params(max_incoming_streams: u32) -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams,
        keep_alive: true,
    }
}

async fn dial(
    relay: &RelayAddr,
    alpn: &[u8],
    incoming: u32,
) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = transport::client_endpoint(false).unwrap();
    let connection = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        relay,
        alpn,
        params(incoming),
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

/// An exit speaking the wire protocol itself: registers a descriptor and keeps its control
/// stream open; the request streams the relay opens are counted and held, never answered,
/// unless their body ends in `now` (answered `OK pong`). With `read` false it never reads
/// them either.
struct RawExit {
    peer_id: PeerId,
    status: Status,
    streams: watch::Receiver<usize>,
    _tunnel: quinn::Connection,
}

impl RawExit {
    /// Registers an exit claiming `max_streams` whose transport grants the relay
    /// `tunnel_streams` streams.
    async fn register(
        endpoint: &quinn::Endpoint,
        relay: &RelayAddr,
        max_streams: u32,
        tunnel_streams: u32,
        read: bool,
    ) -> Self {
        let identity = Keypair::generate_ed25519();
        let peer_id = identity.public().to_peer_id();
        let tunnel = transport::connect(
            endpoint,
            &identity,
            relay,
            tokengo_proto::frame::ALPN_EXIT,
            params(tunnel_streams),
        )
        .await
        .unwrap();
        let now = tokengo::clock::unix_now();
        let descriptor = Descriptor {
            peer_id,
            key_configs: vec![KeyPair::from_seed(1, &[7; 32]).config()],
            models: Vec::new(),
            issued_at: now,
            expires_at: now + 3600,
            max_streams,
            access_token_required: false,
        };
        let signed = SignedDescriptor::sign(&descriptor, &identity).unwrap();
        let (mut send, recv) = tunnel.open_bi().await.unwrap();
        let mut frame = Vec::new();
        ControlFrame::Register(signed.into_bytes()).encode(&mut frame);
        send.write_all(&frame).await.unwrap();
        let mut reader = tokengo::stream::StreamReader::new(recv);
        let ack = reader
            .decode(4096, PATIENCE, |b: &mut BytesMut| {
                ControlFrame::decode(b, 4096)
            })
            .await
            .unwrap();
        let ControlFrame::Ack { status, .. } = ack else {
            panic!("expected an ack, got {ack:?}")
        };
        let (count, streams) = watch::channel(0usize);
        let accepting = tunnel.clone();
        tokio::spawn(async move {
            // Keeps the control stream open: the relay drops an exit whose control stream ends.
            let _control = (send, reader);
            while let Ok((mut send, mut recv)) = accepting.accept_bi().await {
                count.send_modify(|n| *n += 1);
                tokio::spawn(async move {
                    if read
                        && let Ok(body) = recv.read_to_end(1 << 20).await
                        && body.ends_with(b"now")
                    {
                        let _ = send.write_all(&[Status::Ok as u8]).await;
                        let _ = send.write_all(b"pong").await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                        return;
                    }
                    // Held: dropping the streams would end them.
                    std::future::pending::<()>().await;
                    drop((send, recv));
                });
            }
        });
        Self {
            peer_id,
            status,
            streams,
            _tunnel: tunnel,
        }
    }
}

fn forward_header(exit: PeerId) -> Vec<u8> {
    let mut out = Vec::new();
    ClientRequest::Forward {
        exit_id: exit.to_bytes(),
        media: MediaType::Single,
    }
    .encode(&mut out);
    out
}

/// Sends a whole request (header and `body`) and returns the answer, or `None` when the
/// stream failed.
async fn exchange(client: &quinn::Connection, exit: PeerId, body: &[u8]) -> Option<Vec<u8>> {
    let (mut send, mut recv) = client.open_bi().await.ok()?;
    let mut bytes = forward_header(exit);
    bytes.extend_from_slice(body);
    send.write_all(&bytes).await.ok()?;
    send.finish().ok()?;
    recv.read_to_end(1 << 20).await.ok()
}

#[tokio::test]
async fn an_exit_that_grants_no_stream_gets_exit_unavailable_in_bounded_time() {
    init();
    let limits = Limits {
        stream_open_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    // The exit's transport lets the relay open no stream at all: `open_bi` never completes.
    let endpoint = transport::client_endpoint(false).unwrap();
    let exit = RawExit::register(&endpoint, &relay.addr, 8, 0, true).await;
    assert_eq!(exit.status, Status::Ok);
    let (_endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let answer = tokio::time::timeout(PATIENCE, exchange(&client, exit.peer_id, b"now"))
        .await
        .expect("the relay waited for the exit without a bound");
    assert_eq!(answer, Some(vec![Status::ExitUnavailable as u8]));
    assert_eq!(relay.probe.metrics().streams_in_flight.get(), 0);
}

#[tokio::test]
async fn one_client_cannot_take_every_slot_of_an_exit() {
    init();
    let relay = start_relay(&Limits::default(), None).await;
    // An exit of 64 slots: a connection may hold 16 of them.
    let endpoint = transport::client_endpoint(false).unwrap();
    let exit = RawExit::register(&endpoint, &relay.addr, 64, 1024, true).await;
    assert_eq!(exit.status, Status::Ok);
    // One client, three connections, 40 requests each, all held open by the exit.
    let overloaded = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::new();
    for _ in 0..3 {
        let (endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
        for _ in 0..40 {
            let (client, overloaded) = (client.clone(), Arc::clone(&overloaded));
            tokio::spawn(async move {
                if exchange(&client, exit.peer_id, b"hold").await
                    == Some(vec![Status::Overloaded as u8])
                {
                    overloaded.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        connections.push((endpoint, client));
    }
    eventually("72 requests answered Overloaded", || {
        overloaded.load(Ordering::SeqCst) == 72
    })
    .await;
    let mut streams = exit.streams.clone();
    tokio::time::timeout(PATIENCE, streams.wait_for(|n| *n == 48))
        .await
        .expect("48 streams at the exit")
        .unwrap();
    // Another client is served at once.
    let (_endpoint, other) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let answer = tokio::time::timeout(PATIENCE, exchange(&other, exit.peer_id, b"now"))
        .await
        .expect("the other client was not served");
    assert_eq!(answer.as_deref(), Some(&b"\x00pong"[..]));
    assert_eq!(*exit.streams.borrow(), 49);
}

#[tokio::test]
async fn registrations_beyond_the_rate_and_the_cap_are_refused_as_overloaded() {
    init();
    let limits = Limits {
        registration_burst: 3,
        registrations_per_sec: 0,
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    let endpoint = transport::client_endpoint(false).unwrap();
    let mut exits = Vec::new();
    for expected in [Status::Ok, Status::Ok, Status::Ok, Status::Overloaded] {
        let exit = RawExit::register(&endpoint, &relay.addr, 8, 8, true).await;
        assert_eq!(exit.status, expected);
        exits.push(exit);
    }
    assert_eq!(relay.registry.len(), 3);

    // A flood of throwaway identities at default limits: the list never grows past what a
    // client accepts (1024 entries), so the relay stays usable.
    let limits = Limits {
        registration_burst: 2000,
        // All 1025 come from one address: this is about the registry's caps.
        source_connections_per_sec: 0.0,
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    let addr = relay.addr.clone();
    let statuses: Vec<(Status, RawExit)> = futures_util::stream::iter(0..1025)
        .map(|_| {
            let (addr, endpoint) = (addr.clone(), endpoint.clone());
            async move {
                let exit = RawExit::register(&endpoint, &addr, 8, 8, true).await;
                (exit.status, exit)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let refused = statuses
        .iter()
        .filter(|(s, _)| *s == Status::Overloaded)
        .count();
    assert_eq!(refused, 1025 - tokengo::config::MAX_EXITS_CEILING);
    let (_endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    // The client's own limit: 1024 entries, 4 MiB.
    let list = list_exits(&client).await;
    assert_eq!(list.len(), tokengo::config::MAX_EXITS_CEILING);
}

/// The relay's exit list, decoded as a client would (at most 1024 entries, 4 MiB).
async fn list_exits(client: &quinn::Connection) -> Vec<Vec<u8>> {
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    let mut header = Vec::new();
    ClientRequest::ListExits.encode(&mut header);
    send.write_all(&header).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(4 << 20).await.unwrap();
    assert_eq!(answer[0], Status::Ok as u8);
    frame::decode_exit_list(&answer[1..], 1024).unwrap()
}

/// Lists the chain's exit and returns its key config and id.
async fn exit_key(client: &quinn::Connection) -> (PeerId, KeyConfig) {
    let list = list_exits(client).await;
    let descriptor = SignedDescriptor::verify(&list[0], tokengo::clock::unix_now()).unwrap();
    (descriptor.peer_id, descriptor.key_configs[0])
}

/// An HTTP date (RFC 9110 IMF-fixdate) for `unix` seconds.
fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A chat request whose echoed answer is about `len` bytes.
fn large_chat_request(len: usize) -> Vec<u8> {
    let head = bhttp::RequestHead {
        method: b"POST".to_vec(),
        scheme: b"https".to_vec(),
        authority: b"localhost".to_vec(),
        path: b"/v1/chat/completions".to_vec(),
        fields: vec![
            bhttp::Field {
                name: b"content-type".to_vec(),
                value: b"application/json".to_vec(),
            },
            bhttp::Field {
                name: b"date".to_vec(),
                value: http_date(tokengo::clock::unix_now()).into_bytes(),
            },
        ],
    };
    let body = format!(
        "{{\"model\":\"m\",\"messages\":[],\"pad\":\"{}\"}}",
        "a".repeat(len)
    );
    bhttp::encode_request(&head, body.as_bytes(), 0).unwrap()
}

async fn in_flight_settles(chain: &Chain) {
    let relay = chain.relay.probe.clone();
    eventually("the relay's stream to end", || {
        relay.metrics().streams_in_flight.get() == 0
    })
    .await;
    let exit = chain.exit.probe.clone();
    eventually("the exit's stream to end", || {
        exit.metrics().streams_in_flight.get() == 0
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_the_exit_is_freed() {
    let backend = start_backend().await;
    let limits = Limits {
        write_stall_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(300), None).await;
    let (_endpoint, client) = dial(&chain.relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let (exit, key) = exit_key(&client).await;
    let (encapsulated, _opener) =
        ohttp::encapsulate_request(&key, &large_chat_request(8 << 20)).unwrap();
    let (mut send, recv) = client.open_bi().await.unwrap();
    let mut bytes = forward_header(exit);
    bytes.extend_from_slice(&encapsulated);
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    // The answer (the 8 MiB echoed) is never read.
    let relay = chain.relay.probe.clone();
    eventually("the relay to forward the request", || {
        relay.metrics().streams_in_flight.get() == 1
    })
    .await;
    in_flight_settles(&chain).await;
    drop(recv);
    // The relay still serves: the client's own request, read this time, is answered.
    let (encapsulated, opener) = ohttp::encapsulate_request(&key, &large_chat_request(16)).unwrap();
    let answer = exchange(&client, exit, &encapsulated).await.unwrap();
    assert_eq!(
        answer[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8]
    );
    let message = opener.open(&answer[2..]).unwrap();
    let (head, _) = bhttp::decode_response(&message, &bhttp::Limits::default()).unwrap();
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn a_trickled_request_body_is_cut_at_the_relay() {
    let backend = start_backend().await;
    let limits = Limits {
        request_body_grace: Duration::from_secs(2),
        min_request_body_rate: 1000,
        ..Limits::default()
    };
    let chain = chain(&backend.url, &limits, Duration::from_secs(300), None).await;
    let (_endpoint, client) = dial(&chain.relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let (exit, _) = exit_key(&client).await;
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    let mut bytes = forward_header(exit);
    bytes.extend_from_slice(&[0x01; 100]);
    send.write_all(&bytes).await.unwrap();
    // ... and nothing more, without finishing.
    let relay = chain.relay.probe.clone();
    eventually("the relay to forward the stream", || {
        relay.metrics().streams_in_flight.get() == 1
    })
    .await;
    in_flight_settles(&chain).await;
    // The client learns: its stream is stopped or answered with a refusal, never left open.
    let answer = tokio::time::timeout(PATIENCE, recv.read_to_end(1024))
        .await
        .expect("the client's stream was left open");
    assert!(
        !matches!(answer.as_deref(), Ok([status]) if *status == Status::Ok as u8),
        "{answer:?}"
    );
}

#[tokio::test]
async fn one_connection_cannot_make_the_relay_buffer_more_than_its_windows() {
    init();
    let limits = Limits {
        request_body_grace: Duration::from_secs(600),
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    // The exit takes every stream and never reads one.
    let endpoint = transport::client_endpoint(false).unwrap();
    let exit = RawExit::register(&endpoint, &relay.addr, 1024, 1024, false).await;
    let (_endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let piece = Bytes::from(vec![0x42; 64 * 1024]);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, accepted, piece) = (client.clone(), Arc::clone(&accepted), piece.clone());
        tasks.push(tokio::spawn(async move {
            let (mut send, recv) = client.open_bi().await.unwrap();
            // Once the connection's window is spent, even a header may not get through (and
            // the relay stops the stream when it does not arrive in time).
            let mut first = Bytes::from(forward_header(exit.peer_id));
            // Writes until the relay grants no more credit for 3 s.
            while let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(3), send.write_chunk(first.clone())).await
            {
                accepted.fetch_add(first.len(), Ordering::SeqCst);
                first = piece.clone();
            }
            (send, recv)
        }));
    }
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(task.await.unwrap());
    }
    // quinn's defaults let this connection push 64 x 1.25 MB into the relay (and as much
    // again into the exit); now the relay's connection window and the exit's bound it.
    let total = accepted.load(Ordering::SeqCst);
    assert!(
        total <= 24 << 20,
        "one connection pushed {} MiB into the relay",
        total >> 20
    );
}

#[tokio::test]
async fn many_handshakes_in_progress_make_the_relay_ask_for_address_validation() {
    init();
    let limits = Limits {
        retry_above_handshakes: 0,
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    // With the threshold at zero every new peer is asked to validate; quinn clients answer
    // the Retry and connect as usual.
    let (_endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    assert!(list_exits(&client).await.is_empty());
    assert!(relay.probe.metrics().handshake_retries.get() >= 1);
}

/// A client endpoint on `ip` (a loopback address of its own: the relay tells sources apart
/// by address).
fn endpoint_on(ip: [u8; 4]) -> quinn::Endpoint {
    quinn::Endpoint::client(std::net::SocketAddr::from((ip, 0))).unwrap()
}

async fn dial_from(ip: [u8; 4], relay: &RelayAddr) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = endpoint_on(ip);
    let connection = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        relay,
        tokengo_proto::frame::ALPN_CLIENT,
        params(0),
    )
    .await
    .unwrap();
    (endpoint, connection)
}

#[tokio::test]
async fn a_flooding_address_keeps_only_its_fair_part_of_a_contended_exit() {
    init();
    let limits = Limits {
        contended_streams: 8,
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    // An exit of 64 slots that holds every request open (a slow backend).
    let endpoint = transport::client_endpoint(false).unwrap();
    let exit = RawExit::register(&endpoint, &relay.addr, 64, 1024, true).await;
    assert_eq!(exit.status, Status::Ok);
    let mut streams = exit.streams.clone();
    // A good client (127.0.0.1) has one request in flight.
    let (_good_endpoint, good) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    let held = good.clone();
    tokio::spawn(async move { exchange(&held, exit.peer_id, b"hold").await });
    tokio::time::timeout(PATIENCE, streams.wait_for(|n| *n == 1))
        .await
        .expect("the good request at the exit")
        .unwrap();
    // Another address floods: 40 requests at once on one connection.
    let (_flood_endpoint, flood) = dial_from([127, 0, 0, 2], &relay.addr).await;
    for _ in 0..40 {
        let flood = flood.clone();
        tokio::spawn(async move { exchange(&flood, exit.peer_id, b"hold").await });
    }
    // Until 8 are in flight the flood takes free slots (7); then it waits for its own.
    let probe = relay.probe.clone();
    eventually("33 flood requests waiting", || {
        probe.metrics().source_waits.get() == 33
    })
    .await;
    tokio::time::timeout(PATIENCE, streams.wait_for(|n| *n == 8))
        .await
        .expect("8 streams at the exit")
        .unwrap();
    assert_eq!(relay.probe.metrics().streams_in_flight.get(), 8);
    // The good client is still served at once, past the flood's queue.
    let answer = tokio::time::timeout(PATIENCE, exchange(&good, exit.peer_id, b"now"))
        .await
        .expect("the good client was not served");
    assert_eq!(answer.as_deref(), Some(&b"\x00pong"[..]));
    assert_eq!(*exit.streams.borrow(), 9);
}

#[tokio::test]
async fn an_address_opening_connections_too_fast_is_refused_before_the_handshake() {
    init();
    let limits = Limits {
        source_connection_burst: 2,
        source_connections_per_sec: 0.001,
        ..Limits::default()
    };
    let relay = start_relay(&limits, None).await;
    let endpoint = endpoint_on([127, 0, 0, 3]);
    let identity = Keypair::generate_ed25519();
    let connect = || {
        transport::connect(
            &endpoint,
            &identity,
            &relay.addr,
            tokengo_proto::frame::ALPN_CLIENT,
            params(0),
        )
    };
    // Two at once, two more once the address proved itself (QUIC Retry), then refused.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(connect().await.unwrap());
    }
    let refused = connect().await;
    assert!(refused.is_err(), "a fifth connection was accepted");
    let metrics = relay.probe.metrics();
    assert!(metrics.source_connections_refused.get() >= 1);
    assert!(metrics.handshake_retries.get() >= 2);
    // Another address connects as usual, and the open connections still work.
    let (_other_endpoint, other) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    assert!(list_exits(&other).await.is_empty());
    assert!(list_exits(&open[0]).await.is_empty());
}

#[tokio::test]
async fn a_connection_sending_malformed_headers_is_closed() {
    init();
    let relay = start_relay(&Limits::default(), None).await;
    let (_endpoint, client) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    // The budget refills at 2 a second: however slowly this loop runs, it spends faster than
    // that only if it keeps going, so it goes on until the relay closes the connection.
    let mut answered = 0;
    for _ in 0..10_000 {
        let Ok((mut send, mut recv)) = client.open_bi().await else {
            break;
        };
        // The relay may stop reading once it has answered: write errors do not matter.
        if send.write_all(&[9, 9, 9]).await.is_ok() {
            let _ = send.finish();
        }
        match recv.read_to_end(16).await {
            Ok(answer) if answer == [Status::Malformed as u8] => answered += 1,
            _ => break,
        }
    }
    let reason = tokio::time::timeout(PATIENCE, client.closed())
        .await
        .expect("the connection was not closed");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(close) if close.reason[..] == b"too many refused requests"[..]),
        "{reason}"
    );
    assert!(answered >= 16, "{answered} answered");
    assert_eq!(relay.probe.metrics().refusal_closes.get(), 1);
    // The relay serves others.
    let (_endpoint, other) = dial(&relay.addr, tokengo_proto::frame::ALPN_CLIENT, 0).await;
    assert!(list_exits(&other).await.is_empty());
}

//! Attackers for `bench/attack`: each runs one kind of abuse against a relay (and the exit
//! registered with it) for a while, counts what the relay answered, and prints one JSON line.
//! They speak the wire protocol directly (the node library's transport and the proto
//! crate's framing and OHTTP), so they can do what a real client never would.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use libp2p_identity::{Keypair, PeerId};
use tokengo::transport::{self, RelayAddr, TransportParams};
use tokengo_proto::{
    bhttp,
    descriptor::{Descriptor, SignedDescriptor},
    frame::{self, ClientRequest, ControlFrame, MediaType, Status},
    key_config::{KeyConfig, KeyPair},
    ohttp,
};

/// What an attacker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// Requests with large answers that are never read.
    Stall,
    /// As many concurrent requests as the connections allow, in a closed loop.
    Flood,
    /// New exit identities registering as fast as they can.
    Register,
    /// Request bodies trickled a byte at a time.
    SlowUpload,
    /// Malformed headers, random bodies, undecryptable requests.
    Garbage,
    /// One valid encapsulated request sent again and again.
    Replay,
}

/// Tallies of what the relay answered.
#[derive(Debug, Default)]
struct Tally {
    counts: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn add(tally: &Mutex<Self>, what: &'static str) {
        *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counts
            .entry(what)
            .or_insert(0) += 1;
    }
}

fn status_name(byte: Option<u8>) -> &'static str {
    // Version 2: an exit says ACCEPTED before it calls its backend; the status follows.
    if byte == Some(frame::ACCEPTED) {
        return "accepted";
    }
    match byte.map(Status::try_from) {
        None => "empty",
        Some(Ok(Status::Ok)) => "ok",
        Some(Ok(Status::NoSuchExit)) => "no_such_exit",
        Some(Ok(Status::ExitUnavailable)) => "exit_unavailable",
        Some(Ok(Status::Malformed)) => "malformed",
        Some(Ok(Status::Overloaded)) => "overloaded",
        Some(Ok(Status::KeyUnknown)) => "key_unknown",
        Some(Ok(Status::Undecryptable)) => "undecryptable",
        Some(Err(_)) => "unknown_status",
    }
}

/// The attacker's UDP endpoint: on `bind` (its own loopback address in the harness, as an
/// attacker on the network has its own), or on any address.
fn endpoint(bind: Option<std::net::IpAddr>) -> anyhow::Result<quinn::Endpoint> {
    match bind {
        Some(ip) => Ok(quinn::Endpoint::client(std::net::SocketAddr::new(ip, 0))?),
        None => Ok(transport::client_endpoint(false)?),
    }
}

fn params(incoming: u32) -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams: incoming,
        keep_alive: true,
    }
}

/// The exit to attack (`wanted`, or the first listed): its id and key.
async fn target(
    connection: &quinn::Connection,
    wanted: Option<PeerId>,
) -> anyhow::Result<(PeerId, KeyConfig)> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut header = Vec::new();
    ClientRequest::ListExits.encode(&mut header);
    send.write_all(&header).await?;
    send.finish()?;
    let answer = recv.read_to_end(4 << 20).await?;
    if answer.first() != Some(&(Status::Ok as u8)) {
        bail!(
            "exit list answered {}",
            status_name(answer.first().copied())
        );
    }
    let list = frame::decode_exit_list(&answer[1..], 1024)?;
    let now = tokengo::clock::unix_now();
    for bytes in list {
        if let Ok(descriptor) = SignedDescriptor::verify(&bytes, now)
            && wanted.is_none_or(|id| id == descriptor.peer_id)
            && let Some(key) = descriptor.key_configs.first()
        {
            return Ok((descriptor.peer_id, *key));
        }
    }
    bail!("the relay lists no such exit")
}

/// A chat (or embeddings) request as the exit's backend expects it, encapsulated afresh.
fn encapsulated(key: &KeyConfig, path: &str) -> anyhow::Result<Vec<u8>> {
    let head = bhttp::RequestHead {
        method: b"POST".to_vec(),
        scheme: b"https".to_vec(),
        authority: b"localhost".to_vec(),
        path: path.as_bytes().to_vec(),
        // Dated like a real client's request, so the exit's replay window admits it and the
        // backend does the work (an undated request is refused after decapsulation).
        fields: vec![
            bhttp::Field {
                name: b"content-type".to_vec(),
                value: b"application/json".to_vec(),
            },
            tokengo::http_message::date_field(std::time::SystemTime::now()),
        ],
    };
    let body =
        br#"{"model":"bench","messages":[{"role":"user","content":"attack"}],"max_tokens":16}"#;
    let message = bhttp::encode_request(&head, body, 0)?;
    Ok(ohttp::encapsulate_request(key, &message)?.0)
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

/// Sends `bytes` on a new stream and returns the first answer byte's meaning.
async fn request(connection: &quinn::Connection, bytes: Vec<u8>) -> &'static str {
    let Ok((mut send, mut recv)) = connection.open_bi().await else {
        return "open_failed";
    };
    if send.write_chunk(Bytes::from(bytes)).await.is_err() || send.finish().is_err() {
        return "write_failed";
    }
    match recv.read_to_end(1 << 20).await {
        Ok(answer) => status_name(answer.first().copied()),
        Err(_) => "reset",
    }
}

/// A client connection that the attacker dials again whenever the relay closes it, as a
/// determined attacker would.
struct Redial {
    endpoint: quinn::Endpoint,
    identity: Keypair,
    relay: RelayAddr,
    current: tokio::sync::Mutex<quinn::Connection>,
}

impl Redial {
    async fn dial(
        endpoint: &quinn::Endpoint,
        identity: &Keypair,
        relay: &RelayAddr,
    ) -> Result<quinn::Connection, transport::ConnectError> {
        transport::connect(
            endpoint,
            identity,
            relay,
            tokengo_proto::frame::ALPN_CLIENT,
            params(0),
        )
        .await
    }

    /// The open connection, dialled again (once, whoever asks first) when it was closed.
    async fn get(&self, tally: &Mutex<Tally>) -> quinn::Connection {
        let mut current = self.current.lock().await;
        if current.close_reason().is_some() {
            match Self::dial(&self.endpoint, &self.identity, &self.relay).await {
                Ok(connection) => {
                    Tally::add(tally, "redialled");
                    *current = connection;
                }
                Err(_) => Tally::add(tally, "redial_refused"),
            }
        }
        current.clone()
    }
}

/// Runs `kind` against `relay` for `seconds`, with `connections` client connections of
/// `streams` concurrent streams each, from `bind` when given; prints a JSON line of what the
/// relay answered.
pub(crate) async fn run(
    relay: &RelayAddr,
    exit: Option<PeerId>,
    kind: Kind,
    seconds: f64,
    connections: usize,
    streams: usize,
    bind: Option<std::net::IpAddr>,
) -> anyhow::Result<()> {
    let endpoint = endpoint(bind).context("binding a UDP socket")?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let identity = Keypair::generate_ed25519();
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let connection = Redial::dial(&endpoint, &identity, relay)
            .await
            .context("connecting to the relay")?;
        clients.push(Arc::new(Redial {
            endpoint: endpoint.clone(),
            identity: identity.clone(),
            relay: relay.clone(),
            current: tokio::sync::Mutex::new(connection),
        }));
    }
    let first = clients[0].get(&tally).await;
    let (exit, key) = target(&first, exit).await?;
    let mut tasks = tokio::task::JoinSet::new();
    match kind {
        Kind::Register => {
            for _ in 0..streams.max(1) {
                let (endpoint, relay, tally) =
                    (endpoint.clone(), relay.clone(), Arc::clone(&tally));
                tasks.spawn(async move {
                    let mut held = Vec::new();
                    while Instant::now() < deadline {
                        let outcome = register(&endpoint, &relay).await;
                        Tally::add(&tally, outcome.as_ref().map_or("failed", |(s, _)| s));
                        if let Ok((_, tunnel)) = outcome {
                            held.push(tunnel);
                        }
                    }
                    drop(held);
                });
            }
        }
        _ => {
            for client in &clients {
                for _ in 0..streams.max(1) {
                    let (client, tally) = (Arc::clone(client), Arc::clone(&tally));
                    tasks.spawn(async move {
                        while Instant::now() < deadline {
                            let outcome = tokio::time::timeout_at(deadline.into(), async {
                                let connection = client.get(&tally).await;
                                one(kind, &connection, exit, &key).await
                            })
                            .await
                            .unwrap_or("cut_by_harness");
                            Tally::add(&tally, outcome);
                        }
                    });
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let counts = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .counts
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("{{\"kind\": \"{kind:?}\", \"answers\": {{{counts}}}}}");
    endpoint.close(quinn::VarInt::from_u32(0), b"attack over");
    Ok(())
}

/// One attempt of `kind`.
async fn one(
    kind: Kind,
    client: &quinn::Connection,
    exit: PeerId,
    key: &KeyConfig,
) -> &'static str {
    match kind {
        Kind::Flood => {
            let Ok(body) = encapsulated(key, "/v1/chat/completions") else {
                return "encapsulation_failed";
            };
            let mut bytes = forward_header(exit);
            bytes.extend_from_slice(&body);
            request(client, bytes).await
        }
        Kind::Stall => stall(client, exit, key).await,
        Kind::SlowUpload => slow_upload(client, exit).await,
        Kind::Garbage => garbage(client, exit).await,
        Kind::Replay => {
            // Every attempt repeats the same request: the exit must refuse all but one.
            static REPLAYED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let Some(body) = REPLAYED
                .get()
                .cloned()
                .or_else(|| encapsulated(key, "/v1/chat/completions").ok())
            else {
                return "encapsulation_failed";
            };
            let body = REPLAYED.get_or_init(|| body).clone();
            let mut bytes = forward_header(exit);
            bytes.extend_from_slice(&body);
            request(client, bytes).await
        }
        Kind::Register => "unreachable",
    }
}

/// Asks for a large answer (the backend's `/v1/embeddings` in the harness) and never reads
/// it; ends when the relay cuts the stream.
async fn stall(client: &quinn::Connection, exit: PeerId, key: &KeyConfig) -> &'static str {
    let Ok(body) = encapsulated(key, "/v1/embeddings") else {
        return "encapsulation_failed";
    };
    let Ok((mut send, recv)) = client.open_bi().await else {
        return "open_failed";
    };
    let mut bytes = forward_header(exit);
    bytes.extend_from_slice(&body);
    if send.write_chunk(Bytes::from(bytes)).await.is_err() || send.finish().is_err() {
        return "write_failed";
    }
    // Never read: wait until the relay resets the answer (its write stall timeout).
    let mut recv = recv;
    match recv.received_reset().await {
        Ok(Some(_)) => "stalled_then_reset",
        Ok(None) => "stalled_then_finished",
        Err(_) => "stalled_then_lost",
    }
}

/// Sends the header and then one byte every 500 ms, never finishing.
async fn slow_upload(client: &quinn::Connection, exit: PeerId) -> &'static str {
    let Ok((mut send, mut recv)) = client.open_bi().await else {
        return "open_failed";
    };
    if send.write_all(&forward_header(exit)).await.is_err() {
        return "write_failed";
    }
    loop {
        tokio::select! {
            answer = recv.read_to_end(1024) => {
                return match answer {
                    Ok(answer) => status_name(answer.first().copied()),
                    Err(_) => "trickle_cut",
                };
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if send.write_all(&[0x01]).await.is_err() {
                    return "trickle_cut";
                }
            }
        }
    }
}

/// Rotates through malformed headers, a header with a random body (undecryptable at the
/// exit) and an unknown exit.
async fn garbage(client: &quinn::Connection, exit: PeerId) -> &'static str {
    let n = rand_u64();
    let bytes = match n % 4 {
        0 => (0..64).map(|i| (n >> (i % 56)) as u8).collect(),
        1 => vec![1, 0x7f, 3, 4],
        2 => {
            let mut bytes = forward_header(exit);
            bytes.extend((0..512).map(|i| (n.rotate_left(i % 64) & 0xff) as u8));
            bytes
        }
        _ => forward_header(Keypair::generate_ed25519().public().to_peer_id()),
    };
    request(client, bytes).await
}

fn rand_u64() -> u64 {
    // Enough randomness for garbage: the hash of a fresh random state.
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    hasher.finish()
}

/// Registers a fresh exit identity; returns the relay's answer and the tunnel to hold.
async fn register(
    endpoint: &quinn::Endpoint,
    relay: &RelayAddr,
) -> anyhow::Result<(&'static str, quinn::Connection)> {
    let identity = Keypair::generate_ed25519();
    let peer_id = identity.public().to_peer_id();
    let tunnel = transport::connect(
        endpoint,
        &identity,
        relay,
        tokengo_proto::frame::ALPN_EXIT,
        params(8),
    )
    .await?;
    let now = tokengo::clock::unix_now();
    let descriptor = Descriptor {
        peer_id,
        key_configs: vec![KeyPair::from_seed(1, &[9; 32]).config()],
        models: Vec::new(),
        issued_at: now,
        expires_at: now + 3600,
        max_streams: 8,
        access_token_required: false,
    };
    let signed = SignedDescriptor::sign(&descriptor, &identity)?;
    let (mut send, recv) = tunnel.open_bi().await?;
    let mut frame = Vec::new();
    ControlFrame::Register(signed.into_bytes()).encode(&mut frame);
    send.write_all(&frame).await?;
    let mut reader = tokengo::stream::StreamReader::new(recv);
    let ack = reader
        .decode(4096, Duration::from_secs(10), |b| {
            ControlFrame::decode(b, 4096)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let answer = match ack {
        ControlFrame::Ack { status, .. } => status_name(Some(status as u8)),
        ControlFrame::Register(_) => "unexpected",
    };
    // The control stream stays open with the tunnel (the relay drops an exit whose control
    // stream ends): both are leaked into a task that lives as long as the connection.
    let held = tunnel.clone();
    tokio::spawn(async move {
        let _control = (send, reader);
        held.closed().await;
    });
    Ok((answer, tunnel))
}

//! Load generators for `bench/run` that need QUIC and so cannot be `wrk`: they speak TokenGo's
//! own transport (the node library's `transport` module, so the same libp2p-TLS handshake and
//! PeerId check as a real client or exit) to a relay running in another process.
//!
//! - `conns`: opens many idle client connections from one UDP endpoint and holds them until
//!   standard input closes, so the driver can read the relay's memory in between.
//! - `forward`: registers a sink exit with the relay and pushes large bodies through it in
//!   both directions, measuring what the relay alone forwards (no OHTTP, no backend).
//!
//! - `attack`: one kind of abuse (stalled readers, stream floods, registration floods, slow
//!   uploads, garbage, replays) against a relay and its exit for `bench/attack`.
//! - `udp-link`: a UDP forwarder with delay, loss and reordering between network namespaces,
//!   for the fault suite (`bench/faults`), since the kernel it runs on has no `tc netem`.
//!
//! Each prints one JSON line on standard output; progress and errors go to standard error.
//! Everything they dial is the relay address given, which `bench/run` binds on loopback.

mod attack;
mod udp_link;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures_util::{StreamExt as _, stream};
use libp2p_identity::Keypair;
use tokengo::transport::{self, RelayAddr, TransportParams};
use tokengo_proto::{
    descriptor::{Descriptor, SignedDescriptor},
    frame::{ClientRequest, ControlFrame, MediaType, Status},
    key_config::KeyPair,
};

/// QUIC idle timeout of the generated connections: the node's default, with keep-alives at a
/// third of it like a real client's, so idle connections stay open as long as needed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The piece size bodies are written in.
const PIECE: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(about = "QUIC load generators for bench/run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open COUNT idle client connections to the relay; print a JSON line when all are open
    /// and hold them until standard input closes.
    Conns {
        /// The relay's multiaddr (with /p2p/).
        #[arg(long)]
        relay: RelayAddr,
        /// How many connections.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
    /// Register a sink exit and send STREAMS bodies of BODY_MIB MiB through the relay to it,
    /// each answered with as many bytes; print the bytes forwarded and the time taken.
    Forward {
        /// The relay's multiaddr (with /p2p/).
        #[arg(long)]
        relay: RelayAddr,
        /// Size of each request body and of each answer, in MiB.
        #[arg(long, default_value_t = 16)]
        body_mib: usize,
        /// How many request streams.
        #[arg(long, default_value_t = 16)]
        streams: usize,
        /// Streams in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Run one kind of attack against the relay and the exit registered with it for SECONDS;
    /// print a JSON line of what the relay answered.
    Attack {
        /// The relay's multiaddr (with /p2p/).
        #[arg(long)]
        relay: RelayAddr,
        /// The exit to attack (default: the first the relay lists).
        #[arg(long)]
        exit: Option<libp2p_identity::PeerId>,
        /// What to do.
        #[arg(long, value_enum)]
        kind: attack::Kind,
        /// How long.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Client connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Concurrent streams per connection (for `register`: concurrent registrations).
        #[arg(long, default_value_t = 64)]
        streams: usize,
        /// Local address to attack from (e.g. 127.0.0.2: an address of its own, not the good
        /// clients'). Default: any.
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Forward UDP from LISTEN to TO and back, with delay, loss and reordering each way;
    /// print a JSON line of the datagram counts on SIGTERM.
    UdpLink {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Where datagrams go.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// One-way delay of every datagram, in milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Probability that a datagram is lost (0..=1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Probability that a datagram is held back so later ones overtake it (0..=1).
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        /// How much longer a held-back datagram waits, in milliseconds (default: the delay,
        /// at least 5).
        #[arg(long)]
        reorder_ms: Option<u64>,
        /// Seed of the loss and reorder draws (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    transport::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Conns {
                relay,
                count,
                parallel,
            } => conns(&relay, count, parallel).await,
            Command::Forward {
                relay,
                body_mib,
                streams,
                concurrency,
            } => forward(&relay, body_mib * 1024 * 1024, streams, concurrency).await,
            Command::Attack {
                relay,
                exit,
                kind,
                seconds,
                connections,
                streams,
                bind,
            } => attack::run(&relay, exit, kind, seconds, connections, streams, bind).await,
            Command::UdpLink {
                listen,
                to,
                delay_ms,
                loss,
                reorder,
                reorder_ms,
                seed,
            } => {
                let policy = udp_link::LinkPolicy::new(
                    Duration::from_millis(delay_ms),
                    loss,
                    reorder,
                    reorder_ms.map(Duration::from_millis),
                )?;
                let seed = seed.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |elapsed| {
                            elapsed.as_secs() ^ u64::from(elapsed.subsec_nanos())
                        })
                });
                udp_link::run(listen, to, policy, seed).await
            }
        }
    })
}

fn client_params() -> TransportParams {
    TransportParams {
        idle_timeout: IDLE_TIMEOUT,
        max_incoming_streams: 0,
        keep_alive: true,
    }
}

/// Opens `count` client connections from one endpoint, `parallel` handshakes at a time.
async fn conns(relay: &RelayAddr, count: usize, parallel: usize) -> anyhow::Result<()> {
    let endpoint = transport::client_endpoint(false).context("binding a UDP socket")?;
    // One identity for all: the relay keeps nothing per client identity, and generating 10k
    // Ed25519 keys would only slow the generator.
    let identity = Keypair::generate_ed25519();
    let started = Instant::now();
    let mut results = stream::iter(0..count)
        .map(|_| {
            transport::connect(
                &endpoint,
                &identity,
                relay,
                tokengo_proto::frame::ALPN_CLIENT,
                client_params(),
            )
        })
        .buffer_unordered(parallel.max(1));
    let mut connections = Vec::with_capacity(count);
    while let Some(result) = results.next().await {
        connections.push(result.context("connecting to the relay")?);
        if connections.len() % 1000 == 0 {
            eprintln!("conns: {} open", connections.len());
        }
    }
    drop(results);
    let open_secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"connections\": {}, \"open_seconds\": {open_secs:.3}}}",
        connections.len()
    );
    // Hold until the driver has read the relay's memory and closes our standard input.
    // (A blocking read on its own thread: tokio's stdin would need another tokio feature,
    // which would rebuild the whole workspace's tokio for this one binary.)
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await
    .context("waiting for standard input")?
    .context("reading standard input")?;
    let alive = connections
        .iter()
        .filter(|c| c.close_reason().is_none())
        .count();
    if alive != connections.len() {
        bail!(
            "{} of {} connections closed while idle",
            connections.len() - alive,
            connections.len()
        );
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"bench done");
    endpoint.wait_idle().await;
    Ok(())
}

/// Registers a sink exit, then forwards `streams` bodies of `body` bytes both ways.
async fn forward(
    relay: &RelayAddr,
    body: usize,
    streams: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let endpoint = transport::client_endpoint(false).context("binding a UDP socket")?;
    let exit_id = sink_exit(&endpoint, relay).await?;
    let client = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        relay,
        tokengo_proto::frame::ALPN_CLIENT,
        client_params(),
    )
    .await
    .context("connecting to the relay as a client")?;
    let piece = Bytes::from(vec![0x5a; PIECE]);
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = stream::iter(0..streams)
        .map(|_| {
            let (client, piece, received, exit_id) = (
                client.clone(),
                piece.clone(),
                Arc::clone(&received),
                exit_id.clone(),
            );
            async move {
                let (mut send, mut recv) = client.open_bi().await.context("opening a stream")?;
                let mut head = Vec::new();
                ClientRequest::Forward {
                    exit_id,
                    media: MediaType::Single,
                }
                .encode(&mut head);
                send.write_all(&head).await?;
                let mut left = body;
                while left > 0 {
                    let n = left.min(PIECE);
                    send.write_chunk(piece.slice(..n)).await?;
                    left -= n;
                }
                send.finish()?;
                let mut got = 0u64;
                while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                    got += chunk.bytes.len() as u64;
                }
                // The answer is the status byte and `body` bytes.
                if got != body as u64 + 1 {
                    bail!("answer of {got} bytes, expected {}", body + 1);
                }
                received.fetch_add(got - 1, Ordering::Relaxed);
                Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    for result in results {
        result?;
    }
    let down = received.load(Ordering::Relaxed);
    let up = (body * streams) as u64;
    println!(
        "{{\"bytes_to_exit\": {up}, \"bytes_to_client\": {down}, \"seconds\": {seconds:.4}, \"streams\": {streams}, \"body_bytes\": {body}}}"
    );
    // Closes the client connection and the sink exit's tunnel alike.
    endpoint.close(quinn::VarInt::from_u32(0), b"bench done");
    endpoint.wait_idle().await;
    Ok(())
}

/// Registers an exit that reads each request to its end and answers `OK` followed by as many
/// bytes as the request body had. Returns its exit id.
async fn sink_exit(endpoint: &quinn::Endpoint, relay: &RelayAddr) -> anyhow::Result<Vec<u8>> {
    let identity = Keypair::generate_ed25519();
    let peer_id = identity.public().to_peer_id();
    let params = TransportParams {
        idle_timeout: IDLE_TIMEOUT,
        max_incoming_streams: 1024,
        keep_alive: true,
    };
    let tunnel = transport::connect(
        endpoint,
        &identity,
        relay,
        tokengo_proto::frame::ALPN_EXIT,
        params,
    )
    .await
    .context("connecting to the relay as an exit")?;
    let now = tokengo::clock::unix_now();
    let descriptor = Descriptor {
        peer_id,
        key_configs: vec![KeyPair::from_seed(1, &[7; 32]).config()],
        models: Vec::new(),
        issued_at: now,
        expires_at: now + 3600,
        max_streams: 1024,
        access_token_required: false,
    };
    let signed = SignedDescriptor::sign(&descriptor, &identity).context("signing")?;
    let (mut send, mut recv) = tunnel.open_bi().await?;
    let mut frame = Vec::new();
    ControlFrame::Register(signed.into_bytes()).encode(&mut frame);
    send.write_all(&frame).await?;
    let mut buf = BytesMut::new();
    let ack = loop {
        if let Some(frame) = ControlFrame::decode(&mut buf, 64 * 1024)? {
            break frame;
        }
        match recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => bail!("relay closed the control stream"),
        }
    };
    match ack {
        ControlFrame::Ack {
            status: Status::Ok, ..
        } => {}
        other => bail!("registration refused: {other:?}"),
    }
    tokio::spawn(async move {
        // Keeps the control stream open: the relay drops an exit whose control stream ends.
        let _control = (send, recv);
        while let Ok((send, recv)) = tunnel.accept_bi().await {
            tokio::spawn(sink_stream(send, recv));
        }
    });
    Ok(peer_id.to_bytes())
}

async fn sink_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    // The exit request header is 2 bytes (version, media type); the rest is the body.
    const HEADER: u64 = 2;
    let mut got = 0u64;
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => got += chunk.bytes.len() as u64,
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let mut left = usize::try_from(got.saturating_sub(HEADER)).unwrap_or(0);
    if send.write_all(&[Status::Ok as u8]).await.is_err() {
        return;
    }
    let piece = Bytes::from(vec![0xa5; PIECE]);
    while left > 0 {
        let n = left.min(PIECE);
        if send.write_chunk(piece.slice(..n)).await.is_err() {
            return;
        }
        left -= n;
    }
    let _ = send.finish();
}

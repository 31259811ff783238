//! A go-like Kademlia DHT server for tests: answers the kad wire protocol the way
//! go-libp2p-kad-dht (v0.35) does with go-libp2p's peerstore and identify, which is what the
//! public Amino DHT is made of. rust-libp2p's `MemoryStore` servers keep a provider's
//! addresses inside its record; go servers do not:
//!
//! - GET_PROVIDERS answers each provider with the addresses the *peerstore* holds for it now.
//!   Addresses a peer reports through identify are kept while it is connected and for
//!   `recently_connected_ttl` (go: 15 minutes) after its last connection closed; addresses
//!   from an ADD_PROVIDER message get `provider_addr_ttl` (go: 24 h) unless identify already
//!   holds them longer (then they expire with the connection, as in go). A provider whose
//!   addresses expired is still listed, with none.
//! - FIND_NODE answers the closest routing-table peers that have addresses, plus the target
//!   itself when the peerstore has addresses for it.
//! - Answers hold every stored provider (no cap per key, no size cap up to go's 4 MiB).
//! - ADD_PROVIDER without addresses, or for another peer than the sender, is dropped.
//!
//! Built on rust-libp2p's swarm, QUIC, identify and request-response; the kad protobuf
//! messages are encoded here (rust-libp2p keeps its own codec private). Time is real; tests
//! configure short TTLs (a scaled clock) instead of waiting 15 minutes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm,
    futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    identify,
    kad::KBucketKey,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, SwarmEvent},
};
use libp2p_identity::Keypair;
use tokio_util::sync::CancellationToken;

/// go-libp2p-kad-dht's largest message.
const MAX_MESSAGE: usize = 4 << 20;
/// Peers per answer (k).
const K: usize = 20;

const ADD_PROVIDER: i32 = 2;
const GET_PROVIDERS: i32 = 3;
const FIND_NODE: i32 = 4;
const PING: i32 = 5;

/// The lifetimes a go server applies (go's values by default; tests shorten them).
#[derive(Debug, Clone)]
pub struct GoDhtConfig {
    /// The kad protocol name.
    pub protocol: StreamProtocol,
    /// go-libp2p `RecentlyConnectedAddrTTL`: how long identify's addresses outlive the last
    /// connection. go: 15 minutes.
    pub recently_connected_ttl: Duration,
    /// go-libp2p `ProviderAddrTTL`: addresses from ADD_PROVIDER. go: 24 h.
    pub provider_addr_ttl: Duration,
    /// Provider record lifetime. go: 48 h.
    pub provider_record_ttl: Duration,
    /// This server closes connections idle this long (the peer's own idle timeout is what
    /// closes them on Amino; a test shortens it with the TTLs).
    pub idle_timeout: Duration,
}

impl GoDhtConfig {
    /// go's lifetimes scaled so that `minute` of real time stands for a minute.
    pub fn scaled(protocol: &str, minute: Duration) -> Self {
        Self {
            protocol: StreamProtocol::try_from_owned(protocol.to_owned()).unwrap(),
            recently_connected_ttl: minute * 15,
            provider_addr_ttl: minute * 24 * 60,
            provider_record_ttl: minute * 48 * 60,
            idle_timeout: minute,
        }
    }
}

/// One kad protobuf message (the fields a provider record and peer lookups use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KadMessage {
    pub kind: i32,
    pub key: Vec<u8>,
    pub closer: Vec<WirePeer>,
    pub providers: Vec<WirePeer>,
}

/// A `Message.Peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WirePeer {
    pub id: Vec<u8>,
    pub addrs: Vec<Vec<u8>>,
    pub connection: i32,
}

// ------------------------------------------------------------------------------- protobuf

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int(out: &mut Vec<u8>, field: u32, value: i32) {
    put_varint(out, u64::from(field << 3));
    put_varint(out, value as i64 as u64);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> io::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or_else(|| invalid("truncated varint"))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(invalid("varint too long"))
}

/// Iterates `(field, wire type, payload)`; varints come back as their value bytes.
fn fields(bytes: &[u8]) -> io::Result<Vec<(u32, Field<'_>)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let tag = get_varint(bytes, &mut at)?;
        let field = u32::try_from(tag >> 3).map_err(invalid)?;
        match tag & 7 {
            0 => out.push((field, Field::Int(get_varint(bytes, &mut at)?))),
            1 => at += 8,
            2 => {
                let len = usize::try_from(get_varint(bytes, &mut at)?).map_err(invalid)?;
                let end = at.checked_add(len).filter(|e| *e <= bytes.len());
                let end = end.ok_or_else(|| invalid("truncated field"))?;
                out.push((field, Field::Bytes(&bytes[at..end])));
                at = end;
            }
            5 => at += 4,
            other => return Err(invalid(format!("wire type {other}"))),
        }
    }
    Ok(out)
}

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl WirePeer {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, &self.id);
        for addr in &self.addrs {
            put_bytes(&mut out, 2, addr);
        }
        put_int(&mut out, 3, self.connection);
        out
    }

    fn decode(bytes: &[u8]) -> io::Result<Self> {
        let mut peer = Self::default();
        for (field, value) in fields(bytes)? {
            match (field, value) {
                (1, Field::Bytes(b)) => peer.id = b.to_vec(),
                (2, Field::Bytes(b)) => peer.addrs.push(b.to_vec()),
                (3, Field::Int(v)) => peer.connection = v as i32,
                _ => {}
            }
        }
        Ok(peer)
    }
}

impl KadMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_int(&mut out, 1, self.kind);
        if !self.key.is_empty() {
            put_bytes(&mut out, 2, &self.key);
        }
        for peer in &self.closer {
            put_bytes(&mut out, 8, &peer.encode());
        }
        for peer in &self.providers {
            put_bytes(&mut out, 9, &peer.encode());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        let mut message = Self::default();
        for (field, value) in fields(bytes)? {
            match (field, value) {
                (1, Field::Int(v)) => message.kind = v as i32,
                (2, Field::Bytes(b)) => message.key = b.to_vec(),
                (8, Field::Bytes(b)) => message.closer.push(WirePeer::decode(b)?),
                (9, Field::Bytes(b)) => message.providers.push(WirePeer::decode(b)?),
                _ => {}
            }
        }
        Ok(message)
    }
}

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

/// Length-prefixed (unsigned varint) kad messages, one request and one answer per stream.
#[derive(Debug, Clone, Default)]
pub struct KadCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<KadMessage> {
    let mut len = 0usize;
    for shift in (0..35).step_by(7) {
        let mut byte = [0u8];
        io.read_exact(&mut byte).await?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    if len > MAX_MESSAGE {
        return Err(invalid("message over 4 MiB"));
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    KadMessage::decode(&bytes)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    message: &KadMessage,
) -> io::Result<()> {
    let body = message.encode();
    let mut out = Vec::with_capacity(body.len() + 5);
    put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.close().await
}

impl request_response::Codec for KadCodec {
    type Protocol = StreamProtocol;
    type Request = KadMessage;
    type Response = KadMessage;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<KadMessage>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<KadMessage>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: KadMessage,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: KadMessage,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &response).await
    }
}

// ------------------------------------------------------------------------------ peerstore

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ttl {
    /// Held while the peer is connected (go's `ConnectedAddrTTL`).
    Connected,
    Until(Instant),
}

#[derive(Debug, Default)]
struct PeerEntry {
    addrs: HashMap<Multiaddr, Ttl>,
    connections: usize,
}

/// What the server holds, shared with the test for assertions.
#[derive(Debug, Default)]
pub struct GoDhtState {
    peers: HashMap<PeerId, PeerEntry>,
    /// key -> provider -> record expiry.
    providers: HashMap<Vec<u8>, HashMap<PeerId, Instant>>,
    /// Kad servers (identify listed the protocol) and the other test servers.
    routing: HashSet<PeerId>,
    /// ADD_PROVIDER messages dropped (no address, or naming another peer).
    pub dropped_add_provider: usize,
    /// GET_PROVIDERS answers that listed a provider without any address.
    pub answered_without_addrs: usize,
}

impl GoDhtState {
    fn addrs(&self, peer: &PeerId, now: Instant) -> Vec<Multiaddr> {
        self.peers.get(peer).map_or_else(Vec::new, |entry| {
            entry
                .addrs
                .iter()
                .filter(|(_, ttl)| match ttl {
                    Ttl::Connected => true,
                    Ttl::Until(t) => *t > now,
                })
                .map(|(a, _)| a.clone())
                .collect()
        })
    }

    /// Providers stored for `key` (expired records left out).
    pub fn providers(&self, key: &[u8]) -> Vec<PeerId> {
        let now = Instant::now();
        self.providers.get(key).map_or_else(Vec::new, |p| {
            p.iter()
                .filter(|(_, t)| **t > now)
                .map(|(p, _)| *p)
                .collect()
        })
    }

    /// The addresses the peerstore would answer for `peer` now.
    pub fn addrs_now(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.addrs(peer, Instant::now())
    }

    /// Stores a provider record for `key` as if `peer` had sent ADD_PROVIDER with `addrs`
    /// (none: a provider whose addresses the peerstore no longer holds), without any network
    /// traffic: for tests that need many records fast. Record and addresses last `ttl`.
    pub fn plant_provider(
        &mut self,
        key: &[u8],
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        ttl: Duration,
    ) {
        self.add_addrs(peer, addrs, ttl);
        self.providers
            .entry(key.to_vec())
            .or_default()
            .insert(peer, Instant::now() + ttl);
    }

    /// The providers part of the GET_PROVIDERS answer for `key` this server would send now
    /// (without closer peers), for tests that check its size.
    pub fn provider_answer(&self, key: &[u8]) -> KadMessage {
        let now = Instant::now();
        KadMessage {
            kind: GET_PROVIDERS,
            key: key.to_vec(),
            closer: Vec::new(),
            providers: self
                .providers(key)
                .into_iter()
                .map(|peer| wire_peer(self, peer, self.addrs(&peer, now)))
                .collect(),
        }
    }

    fn connected(&mut self, peer: PeerId) {
        self.peers.entry(peer).or_default().connections += 1;
    }

    fn disconnected(&mut self, peer: PeerId, remaining: usize, ttl: Duration) {
        let Some(entry) = self.peers.get_mut(&peer) else {
            return;
        };
        entry.connections = remaining;
        if remaining == 0 {
            let until = Instant::now() + ttl;
            for value in entry.addrs.values_mut() {
                if *value == Ttl::Connected {
                    *value = Ttl::Until(until);
                }
            }
        }
    }

    fn identified(&mut self, peer: PeerId, listen: Vec<Multiaddr>) {
        let entry = self.peers.entry(peer).or_default();
        if entry.connections == 0 {
            return;
        }
        // go: connected addresses not listed again are dropped, the listed ones are held
        // while connected.
        entry.addrs.retain(|_, ttl| *ttl != Ttl::Connected);
        for addr in listen {
            entry.addrs.insert(addr, Ttl::Connected);
        }
    }

    fn add_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, ttl: Duration) {
        let until = Instant::now() + ttl;
        let entry = self.peers.entry(peer).or_default();
        for addr in addrs {
            let slot = entry.addrs.entry(addr).or_insert(Ttl::Until(until));
            if let Ttl::Until(t) = slot
                && *t < until
            {
                *slot = Ttl::Until(until);
            }
        }
    }
}

// --------------------------------------------------------------------------------- server

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    kad: request_response::Behaviour<KadCodec>,
}

/// Known test servers: every server lists the others in its routing table.
pub type Directory = Arc<Mutex<HashMap<PeerId, Vec<Multiaddr>>>>;

/// A running go-like server.
pub struct GoDhtServer {
    pub peer_id: PeerId,
    pub addr: Multiaddr,
    pub state: Arc<Mutex<GoDhtState>>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl GoDhtServer {
    /// Starts a server on `127.0.0.1`, registered in `directory`.
    pub async fn start(config: GoDhtConfig, directory: Directory) -> Self {
        let identity = Keypair::generate_ed25519();
        let protocol = config.protocol.clone();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_quic()
            .with_behaviour(|key| Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/ipfs/id/1.0.0".to_owned(),
                    key.public(),
                )),
                kad: request_response::Behaviour::with_codec(
                    KadCodec,
                    [(protocol, ProtocolSupport::Inbound)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                ),
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        let peer_id = *swarm.local_peer_id();
        directory
            .lock()
            .unwrap()
            .insert(peer_id, vec![addr.clone()]);
        let state = Arc::new(Mutex::new(GoDhtState::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            swarm,
            config,
            directory,
            Arc::clone(&state),
            stop.clone(),
        ));
        Self {
            peer_id,
            addr: addr.with(libp2p::multiaddr::Protocol::P2p(peer_id)),
            state,
            stop,
            task,
        }
    }
}

async fn serve(
    mut swarm: Swarm<Behaviour>,
    config: GoDhtConfig,
    directory: Directory,
    state: Arc<Mutex<GoDhtState>>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = swarm.select_next_some() => event,
        };
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                state.lock().unwrap().connected(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                state.lock().unwrap().disconnected(
                    peer_id,
                    num_established as usize,
                    config.recently_connected_ttl,
                );
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let mut state = state.lock().unwrap();
                state.identified(peer_id, info.listen_addrs);
                if info.protocols.contains(&config.protocol) {
                    state.routing.insert(peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let local = *swarm.local_peer_id();
                let answer = answer(&config, &directory, &state, local, peer, request);
                if let Some(answer) = answer {
                    let _ = swarm.behaviour_mut().kad.send_response(channel, answer);
                }
            }
            _ => {}
        }
    }
}

/// The answer to one request (`None`: ADD_PROVIDER, which go never answers).
fn answer(
    config: &GoDhtConfig,
    directory: &Directory,
    state: &Mutex<GoDhtState>,
    local: PeerId,
    from: PeerId,
    request: KadMessage,
) -> Option<KadMessage> {
    let mut state = state.lock().unwrap();
    let now = Instant::now();
    match request.kind {
        ADD_PROVIDER => {
            for provider in request.providers {
                let addrs: Vec<Multiaddr> = provider
                    .addrs
                    .iter()
                    .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                    .collect();
                if PeerId::from_bytes(&provider.id).ok() != Some(from) || addrs.is_empty() {
                    state.dropped_add_provider += 1;
                    continue;
                }
                state.add_addrs(from, addrs, config.provider_addr_ttl);
                state
                    .providers
                    .entry(request.key.clone())
                    .or_default()
                    .insert(from, now + config.provider_record_ttl);
            }
            None
        }
        GET_PROVIDERS => {
            let stored: Vec<PeerId> = state.providers(&request.key);
            let mut providers = Vec::new();
            for peer in stored {
                let addrs = state.addrs(&peer, now);
                if addrs.is_empty() {
                    state.answered_without_addrs += 1;
                }
                providers.push(wire_peer(&state, peer, addrs));
            }
            let closer = closest(&state, directory, local, from, &request.key, None, now);
            Some(KadMessage {
                kind: GET_PROVIDERS,
                key: request.key,
                closer,
                providers,
            })
        }
        FIND_NODE => {
            let target = PeerId::from_bytes(&request.key).ok();
            let closer = closest(&state, directory, local, from, &request.key, target, now);
            Some(KadMessage {
                kind: FIND_NODE,
                key: request.key,
                closer,
                providers: Vec::new(),
            })
        }
        PING => Some(KadMessage {
            kind: PING,
            ..KadMessage::default()
        }),
        _ => None,
    }
}

fn wire_peer(state: &GoDhtState, peer: PeerId, addrs: Vec<Multiaddr>) -> WirePeer {
    let connected = state.peers.get(&peer).is_some_and(|e| e.connections > 0);
    WirePeer {
        id: peer.to_bytes(),
        addrs: addrs.iter().map(|a| a.to_vec()).collect(),
        connection: i32::from(connected),
    }
}

/// go's `betterPeersToQuery` (+ the FIND_NODE target): the k closest known peers with
/// addresses, never the asker or this server.
fn closest(
    state: &GoDhtState,
    directory: &Directory,
    local: PeerId,
    from: PeerId,
    key: &[u8],
    target: Option<PeerId>,
    now: Instant,
) -> Vec<WirePeer> {
    let directory = directory.lock().unwrap().clone();
    let mut candidates: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    for (peer, addrs) in &directory {
        candidates.insert(*peer, addrs.clone());
    }
    for peer in state.routing.iter().chain(target.iter()) {
        let addrs = state.addrs(peer, now);
        if !addrs.is_empty() {
            candidates.entry(*peer).or_default().extend(addrs);
        }
    }
    candidates.remove(&local);
    candidates.remove(&from);
    let key = KBucketKey::new(key.to_vec());
    let mut sorted: Vec<(PeerId, Vec<Multiaddr>)> = candidates.into_iter().collect();
    sorted.sort_by_key(|(peer, _)| KBucketKey::new(peer.to_bytes()).distance(&key));
    sorted
        .into_iter()
        .take(K)
        .map(|(peer, addrs)| wire_peer(state, peer, addrs))
        .collect()
}

/// Three go-like servers that know each other, and their bootstrap addresses.
pub struct GoNet {
    pub servers: Vec<GoDhtServer>,
}

impl GoNet {
    pub async fn start(config: &GoDhtConfig, count: usize) -> Self {
        let directory: Directory = Arc::default();
        let mut servers = Vec::new();
        for _ in 0..count {
            servers.push(GoDhtServer::start(config.clone(), Arc::clone(&directory)).await);
        }
        Self { servers }
    }

    pub fn bootstrap(&self) -> Vec<Multiaddr> {
        self.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// How many servers store `provider` for `key`, and how many of those would answer it
    /// with addresses now.
    pub fn stored(&self, key: &[u8], provider: &PeerId) -> (usize, usize) {
        let mut stored = 0;
        let mut with_addrs = 0;
        for server in &self.servers {
            let state = server.state.lock().unwrap();
            if state.providers(key).contains(provider) {
                stored += 1;
                if !state.addrs_now(provider).is_empty() {
                    with_addrs += 1;
                }
            }
        }
        (stored, with_addrs)
    }

    pub fn dropped_add_provider(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.state.lock().unwrap().dropped_add_provider)
            .sum()
    }

    pub fn answered_without_addrs(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.state.lock().unwrap().answered_without_addrs)
            .sum()
    }

    pub async fn stop(self) {
        for server in self.servers {
            server.stop.cancel();
            let _ = server.task.await;
        }
    }
}

#[test]
fn kad_messages_round_trip() {
    let message = KadMessage {
        kind: GET_PROVIDERS,
        key: vec![0x12, 0x20, 1, 2, 3],
        closer: vec![WirePeer {
            id: PeerId::random().to_bytes(),
            addrs: vec![
                "/ip4/127.0.0.1/udp/1/quic-v1"
                    .parse::<Multiaddr>()
                    .unwrap()
                    .to_vec(),
            ],
            connection: 1,
        }],
        providers: vec![WirePeer {
            id: PeerId::random().to_bytes(),
            addrs: Vec::new(),
            connection: 0,
        }],
    };
    assert_eq!(KadMessage::decode(&message.encode()).unwrap(), message);
}

//! QUIC transport: endpoints whose TLS certificates are bound to node identities (libp2p TLS),
//! relay multiaddrs, and the checks that a peer is who the multiaddr says it is.
//!
//! There is no way to skip certificate verification: every connection to a relay names the
//! PeerId it expects, and the handshake fails unless the relay proves it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use hmac::{Hmac, Mac as _};
use libp2p_identity::{Keypair, PeerId};
use multiaddr::{Multiaddr, Protocol};
use quinn::{
    ConnectionError, IdleTimeout, TransportConfig, VarInt,
    crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig},
};
use sha2::Sha256;
use tokengo_proto::frame;

use crate::net::resolve::{Resolve, ResolveError, SystemResolver};

/// The receive and send windows (per stream, per connection, an exit's tunnel at the relay).
pub use crate::config::defaults::{CONNECTION_WINDOW, SEND_WINDOW, STREAM_WINDOW, TUNNEL_WINDOW};

/// Installs aws-lc-rs as the process's rustls provider. libp2p-tls builds its configurations
/// with aws-lc-rs; installing the same one explicitly means nothing else (reqwest) can pick a
/// different default. Calling it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A malformed relay address.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// Not a multiaddr at all.
    #[error("`{0}` is not a multiaddr; expected /ip4/HOST/udp/PORT/quic-v1/p2p/PEERID")]
    Syntax(String),
    /// A multiaddr, but not of the QUIC-with-PeerId shape.
    #[error("`{addr}` {problem}; expected /ip4/HOST/udp/PORT/quic-v1/p2p/PEERID")]
    Shape {
        /// The address.
        addr: String,
        /// What is missing.
        problem: &'static str,
    },
}

/// Where a relay's host is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    /// A DNS name and which addresses of it to use (`/dns`, `/dns4`, `/dns6`).
    Dns(String, Family),
}

/// The address family a DNS multiaddr asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `/dns`: any.
    Any,
    /// `/dns4`: IPv4 (A records).
    V4,
    /// `/dns6`: IPv6 (AAAA records).
    V6,
}

impl Family {
    fn admits(self, addr: &SocketAddr) -> bool {
        match self {
            Self::Any => true,
            Self::V4 => addr.is_ipv4(),
            Self::V6 => addr.is_ipv6(),
        }
    }
}

/// A relay address: where to reach it and which identity it must prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    host: Host,
    port: u16,
    peer_id: PeerId,
}

impl RelayAddr {
    /// The address of a relay listening on `socket` with identity `peer_id`.
    #[must_use]
    pub fn new(socket: SocketAddr, peer_id: PeerId) -> Self {
        Self {
            host: Host::Ip(socket.ip()),
            port: socket.port(),
            peer_id,
        }
    }

    /// The identity the relay must prove.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The UDP port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The DNS name, when the relay is given by name (`/dns4/NAME/...`); `None` for an IP.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            Host::Dns(name, _) => Some(name),
            Host::Ip(_) => None,
        }
    }

    /// The same relay (same PeerId to prove) at `socket`, one of the addresses its name
    /// resolved to: what a tunnel to one member of a named relay dials.
    #[must_use]
    pub fn at(&self, socket: SocketAddr) -> Self {
        Self::new(socket, self.peer_id)
    }

    /// Every address the relay can be dialled at: its IP, or each address its name resolves
    /// to through `resolver` (sorted, never empty).
    pub async fn resolve_all(
        &self,
        resolver: &dyn Resolve,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Dns(name, family) => {
                let found: Vec<SocketAddr> = resolver
                    .lookup(name, self.port)
                    .await?
                    .into_iter()
                    .filter(|addr| family.admits(addr))
                    .collect();
                if found.is_empty() {
                    return Err(ResolveError::NoAddress { name: name.clone() });
                }
                Ok(found)
            }
        }
    }

    /// The address to dial: the IP, or the first address the name resolves to through the
    /// system resolver (a client's relay link; an exit resolves every address of a name,
    /// see [`RelayAddr::resolve_all`]).
    pub async fn resolve(&self) -> Result<SocketAddr, ConnectError> {
        self.resolve_all(&SystemResolver)
            .await
            .map_err(|error| ConnectError::Resolve(error.to_string()))?
            .first()
            .copied()
            .ok_or_else(|| ConnectError::Resolve(format!("{self}: no address")))
    }

    /// The multiaddr form.
    #[must_use]
    pub fn to_multiaddr(&self) -> Multiaddr {
        let host = match &self.host {
            Host::Ip(IpAddr::V4(ip)) => Protocol::Ip4(*ip),
            Host::Ip(IpAddr::V6(ip)) => Protocol::Ip6(*ip),
            Host::Dns(name, Family::Any) => Protocol::Dns(name.clone().into()),
            Host::Dns(name, Family::V4) => Protocol::Dns4(name.clone().into()),
            Host::Dns(name, Family::V6) => Protocol::Dns6(name.clone().into()),
        };
        Multiaddr::empty()
            .with(host)
            .with(Protocol::Udp(self.port))
            .with(Protocol::QuicV1)
            .with(Protocol::P2p(self.peer_id))
    }
}

impl std::fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_multiaddr().fmt(f)
    }
}

impl FromStr for RelayAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr: Multiaddr = s
            .trim()
            .parse()
            .map_err(|_| AddrError::Syntax(s.to_owned()))?;
        let shape = |problem| AddrError::Shape {
            addr: s.to_owned(),
            problem,
        };
        let mut parts = addr.iter();
        let host = match parts.next() {
            Some(Protocol::Ip4(ip)) => Host::Ip(ip.into()),
            Some(Protocol::Ip6(ip)) => Host::Ip(ip.into()),
            Some(Protocol::Dns(n)) => Host::Dns(n.to_string(), Family::Any),
            Some(Protocol::Dns4(n)) => Host::Dns(n.to_string(), Family::V4),
            Some(Protocol::Dns6(n)) => Host::Dns(n.to_string(), Family::V6),
            _ => return Err(shape("does not start with /ip4, /ip6 or /dns")),
        };
        let port = match parts.next() {
            Some(Protocol::Udp(port)) if port != 0 => port,
            _ => return Err(shape("has no /udp/PORT")),
        };
        if !matches!(parts.next(), Some(Protocol::QuicV1)) {
            return Err(shape("is not /quic-v1"));
        }
        let peer_id = match parts.next() {
            Some(Protocol::P2p(peer_id)) => peer_id,
            _ => {
                return Err(shape(
                    "has no /p2p/PEERID, so the relay could not be verified",
                ));
            }
        };
        if parts.next().is_some() {
            return Err(shape("has extra components after /p2p"));
        }
        Ok(Self {
            host,
            port,
            peer_id,
        })
    }
}

/// The address to print for a relay bound to `local`: an unspecified bind address is shown
/// as loopback, which works on this machine; operators substitute their public address.
#[must_use]
pub fn dialable(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), local.port())
        }
        _ => local,
    }
}

/// Why a connection to a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The relay answered with a certificate for another identity.
    #[error(
        "relay at {addr} is not {expected}: its TLS certificate proves a different PeerId; check the /p2p/ part of the relay address"
    )]
    WrongPeer {
        /// The address dialled.
        addr: SocketAddr,
        /// The PeerId the multiaddr named.
        expected: PeerId,
    },
    /// The relay did not answer in time.
    #[error("relay at {0} did not answer (is it running and is UDP reachable?)")]
    Timeout(SocketAddr),
    /// The handshake or connection failed for another reason.
    #[error("connecting to relay at {addr}: {reason}")]
    Failed {
        /// The address dialled.
        addr: SocketAddr,
        /// The transport's explanation.
        reason: String,
    },
    /// The relay's DNS name did not resolve.
    #[error("{0}")]
    Resolve(String),
    /// TLS configuration could not be built from the identity.
    #[error("building TLS configuration: {0}")]
    Tls(String),
}

/// Transport parameters of one side of a connection.
#[derive(Debug, Clone, Copy)]
pub struct TransportParams {
    /// Silence after which the connection is dead.
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams the peer may open to us.
    pub max_incoming_streams: u32,
    /// Whether we send keep-alives (a third of the idle timeout) to keep NAT mappings and
    /// the connection alive without application heartbeats.
    pub keep_alive: bool,
}

/// Widens the receive window of an exit's tunnel (see [`TUNNEL_WINDOW`]).
pub fn widen_for_tunnel(connection: &quinn::Connection) {
    connection.set_receive_window(VarInt::from_u32(TUNNEL_WINDOW));
}

impl TransportParams {
    fn build(self) -> Arc<TransportConfig> {
        let mut config = TransportConfig::default();
        config.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
        config.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
        config.send_window(SEND_WINDOW);
        // An idle timeout under 2^62 ms always converts; fall back to none only if it did not.
        config.max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        if self.keep_alive {
            config.keep_alive_interval(Some(self.idle_timeout / 3));
        }
        config.max_concurrent_bidi_streams(VarInt::from_u32(self.max_incoming_streams));
        config.max_concurrent_uni_streams(VarInt::from_u32(0));
        Arc::new(config)
    }
}

/// The HKDF label (info) under which a node's QUIC stateless-reset key is derived from its
/// identity key. A distinct label means the reset key reveals nothing about the identity key
/// and serves no other purpose.
const RESET_KEY_LABEL: &[u8] = b"tokengo/quic-stateless-reset-key/1";

/// The key a node signs QUIC stateless-reset tokens with (HMAC-SHA256), derived from its
/// identity key. quinn's default key is random per process, so a restarted node could not
/// reset the connections its previous run left open, and its peers waited for their idle
/// timeout (30 s measured). With a key derived from the identity, a restarted relay or exit
/// answers the first packet of a stale connection with a reset the peer recognises, and the
/// peer reconnects at once.
struct ResetKey(Hmac<Sha256>);

impl ResetKey {
    /// The reset key of `identity`; `None` for a key type that cannot derive secrets (only
    /// Ed25519 identities are loaded, so not in practice).
    fn derive(identity: &Keypair) -> Option<Self> {
        let secret = zeroize::Zeroizing::new(identity.derive_secret(RESET_KEY_LABEL)?);
        <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&secret[..])
            .ok()
            .map(Self)
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], out: &mut [u8]) {
        let mut mac = self.0.clone();
        mac.update(data);
        let tag = mac.finalize().into_bytes();
        let len = out.len().min(tag.len());
        out[..len].copy_from_slice(&tag[..len]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// The endpoint configuration of a node with `identity`: its stateless-reset key derived
/// from the identity (see [`ResetKey`]); without one (no identity), quinn's random key.
fn endpoint_config(identity: Option<&Keypair>) -> quinn::EndpointConfig {
    let Some(key) = identity.and_then(ResetKey::derive) else {
        return quinn::EndpointConfig::default();
    };
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    config.cid_generator(|| Box::new(RandomCids));
    config
}

/// Connection IDs a restarted node still answers with a stateless reset. quinn's default
/// generator signs its IDs with a key random per process and silently drops a packet whose ID
/// it did not sign, so a restarted relay never sent the reset [`ResetKey`] makes possible
/// (found by the relay-restart fault test). These are plain random IDs (quinn's
/// `RandomConnectionIdGenerator`, which quinn does not re-export): every short-header packet
/// for an unknown connection is answered with a reset, rate-limited by quinn and never larger
/// than the packet that caused it.
#[derive(Clone, Copy, Debug)]
struct RandomCids;

impl RandomCids {
    const LEN: usize = 8;
}

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let id: [u8; Self::LEN] = rand::random();
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        Self::LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Binds a relay's server endpoint with the identity-bound certificate.
pub fn server_endpoint(
    listen: SocketAddr,
    identity: &Keypair,
    params: TransportParams,
) -> Result<quinn::Endpoint, ServerError> {
    let mut tls =
        libp2p_tls::make_server_config(identity).map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![frame::ALPN_CLIENT.to_vec(), frame::ALPN_EXIT.to_vec()];
    // libp2p-tls honours SSLKEYLOGFILE; a relay must never write session keys anywhere.
    tls.key_log = Arc::new(NoKeyLog);
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(params.build());
    let socket = udp_socket(listen).map_err(|source| ServerError::Bind { listen, source })?;
    quinn::Endpoint::new(
        endpoint_config(Some(identity)),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| ServerError::Bind { listen, source })
}

/// What the UDP socket of an endpoint asks the kernel to buffer each way. Every connection of
/// an endpoint shares its one socket, and the kernel's default (about 208 KiB on Linux) holds
/// only a few requests of 32 KiB: bursts beyond it are dropped, and QUIC takes each drop for
/// congestion (measured in bench/run: hundreds of drops per second at 64 concurrent 32 KiB
/// requests, and a tenth of the throughput). The kernel caps the value at
/// `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Binds a UDP socket with the larger buffers. Failing to enlarge them is not an error: the
/// endpoint works as before, only with more loss under bursts.
fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let sock = socket2::SockRef::from(&socket);
    for (what, result) in [
        ("receive", sock.set_recv_buffer_size(UDP_BUFFER_BYTES)),
        ("send", sock.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(error) = result {
            tracing::debug!(%error, "cannot enlarge the UDP {what} buffer");
        }
    }
    Ok(socket)
}

/// Never logs TLS secrets, whatever the environment says.
#[derive(Debug)]
struct NoKeyLog;

impl rustls::KeyLog for NoKeyLog {
    fn log(&self, _label: &str, _client_random: &[u8], _secret: &[u8]) {}
}

/// Why a server endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS configuration could not be built from the identity.
    #[error("building TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error(
        "cannot listen on UDP {listen}: {source} (is another relay running there? choose another port with --listen)"
    )]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A client-side endpoint (exits and clients dial out; nothing listens).
pub fn client_endpoint(ipv6: bool) -> std::io::Result<quinn::Endpoint> {
    bind_client(ipv6, None)
}

/// A client-side endpoint of a node with a lasting identity (an exit): its stateless-reset
/// key is derived from the identity, so after a restart the node resets what its previous
/// run left open (see [`ResetKey`]). Clients, whose identity is new at every start, use
/// [`client_endpoint`].
pub fn node_endpoint(ipv6: bool, identity: &Keypair) -> std::io::Result<quinn::Endpoint> {
    bind_client(ipv6, Some(identity))
}

fn bind_client(ipv6: bool, identity: Option<&Keypair>) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if ipv6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::new(
        endpoint_config(identity),
        None,
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Dials `relay` with `alpn`, presenting `identity`, and succeeds only if the relay proves the
/// PeerId in its address.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    identity: &Keypair,
    relay: &RelayAddr,
    alpn: &[u8],
    params: TransportParams,
) -> Result<quinn::Connection, ConnectError> {
    let addr = relay.resolve().await?;
    let mut tls = libp2p_tls::make_client_config(identity, Some(relay.peer_id()))
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.key_log = Arc::new(NoKeyLog);
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(params.build());
    // The server name is not checked (identity comes from the certificate extension), but
    // QUIC requires a syntactically valid one. The dial runs on a task of its own: quinn's
    // connection driver keeps whatever span is current when it starts for the connection's
    // whole life, and a user request's span (the client dials on first use) must neither be
    // held open by a long-lived connection nor be its parent.
    let dialer = endpoint.clone();
    let connecting = tokio::spawn(async move { dialer.connect_with(config, addr, "tokengo") })
        .await
        .map_err(|e| ConnectError::Failed {
            addr,
            reason: e.to_string(),
        })?
        .map_err(|e| ConnectError::Failed {
            addr,
            reason: e.to_string(),
        })?;
    let handshake_deadline = params.idle_timeout.min(Duration::from_secs(10));
    match tokio::time::timeout(handshake_deadline, connecting).await {
        Err(_) => Err(ConnectError::Timeout(addr)),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(classify(error, addr, relay.peer_id())),
    }
}

fn classify(error: ConnectionError, addr: SocketAddr, expected: PeerId) -> ConnectError {
    // rustls reports a certificate for the wrong PeerId as ApplicationVerificationFailure,
    // which TLS sends as the access_denied alert (49).
    const ACCESS_DENIED: u8 = 49;
    match &error {
        ConnectionError::TransportError(e)
            if e.code == quinn::TransportErrorCode::crypto(ACCESS_DENIED) =>
        {
            ConnectError::WrongPeer { addr, expected }
        }
        ConnectionError::TimedOut => ConnectError::Timeout(addr),
        _ => ConnectError::Failed {
            addr,
            reason: error.to_string(),
        },
    }
}

/// The ALPN a connection negotiated.
#[must_use]
pub fn alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// The PeerId the peer proved with its certificate.
#[must_use]
pub fn peer_id(connection: &quinn::Connection) -> Option<PeerId> {
    let certs = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = libp2p_tls::certificate::parse(certs.first()?).ok()?;
    Some(cert.peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_relay_multiaddrs() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let text = format!("/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{peer}");
        let addr: RelayAddr = text.parse().unwrap();
        assert_eq!(addr.peer_id(), peer);
        assert_eq!(addr.to_string(), text);
        let text = format!("/dns4/relay.example/udp/4433/quic-v1/p2p/{peer}");
        let dns: RelayAddr = text.parse().unwrap();
        assert_eq!(dns.port(), 4433);
        assert_eq!(dns.name(), Some("relay.example"));
        assert_eq!(dns.to_string(), text, "a /dns4 name prints as it was given");
        let member = dns.at("10.1.2.3:4433".parse().unwrap());
        assert_eq!(member.name(), None);
        assert_eq!(member.peer_id(), peer);
        assert_eq!(
            member.to_string(),
            format!("/ip4/10.1.2.3/udp/4433/quic-v1/p2p/{peer}")
        );
    }

    #[tokio::test]
    async fn a_name_resolves_to_every_address_of_its_family() {
        use crate::net::resolve::FixedTable;
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let table = FixedTable::new();
        let ips: Vec<IpAddr> = ["127.0.0.2", "::1", "127.0.0.1"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        table.set("relays.test", &ips);
        async fn resolve_in(table: &FixedTable, text: String) -> Result<Vec<String>, ResolveError> {
            text.parse::<RelayAddr>()
                .unwrap()
                .resolve_all(table)
                .await
                .map(|found| found.iter().map(ToString::to_string).collect())
        }
        let resolve = |text: String| resolve_in(&table, text);
        assert_eq!(
            resolve(format!("/dns4/relays.test/udp/7/quic-v1/p2p/{peer}"))
                .await
                .unwrap(),
            ["127.0.0.1:7", "127.0.0.2:7"]
        );
        assert_eq!(
            resolve(format!("/dns6/relays.test/udp/7/quic-v1/p2p/{peer}"))
                .await
                .unwrap(),
            ["[::1]:7"]
        );
        assert_eq!(
            resolve(format!("/dns/relays.test/udp/7/quic-v1/p2p/{peer}"))
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            resolve(format!("/ip4/10.0.0.1/udp/7/quic-v1/p2p/{peer}"))
                .await
                .unwrap(),
            ["10.0.0.1:7"]
        );
        table.set("relays.test", &["::1".parse().unwrap()]);
        let error = resolve(format!("/dns4/relays.test/udp/7/quic-v1/p2p/{peer}"))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no address"), "{error}");
    }

    #[test]
    fn rejects_addresses_that_cannot_be_verified() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        for (text, needle) in [
            ("127.0.0.1:4433".to_owned(), "not a multiaddr"),
            ("/ip4/127.0.0.1/udp/4433/quic-v1".to_owned(), "/p2p/"),
            (
                format!("/ip4/127.0.0.1/tcp/4433/quic-v1/p2p/{peer}"),
                "/udp/",
            ),
            (
                format!("/ip4/127.0.0.1/udp/4433/quic/p2p/{peer}"),
                "quic-v1",
            ),
            (format!("/ip4/127.0.0.1/udp/0/quic-v1/p2p/{peer}"), "/udp/"),
        ] {
            let error = text.parse::<RelayAddr>().unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn reset_key_is_derived_from_the_identity_and_is_not_the_key_itself() {
        use quinn::crypto::HmacKey as _;
        let identity = Keypair::generate_ed25519();
        let sign = |key: &ResetKey| {
            let mut out = [0u8; 32];
            key.sign(b"connection id", &mut out);
            out
        };
        let first = ResetKey::derive(&identity).unwrap();
        let again = ResetKey::derive(&identity).unwrap();
        // A restarted node (same identity) signs the same tokens: it can reset old connections.
        assert_eq!(sign(&first), sign(&again));
        assert!(again.verify(b"connection id", &sign(&first)).is_ok());
        assert!(again.verify(b"other id", &sign(&first)).is_err());
        // Another identity signs other tokens.
        let other = ResetKey::derive(&Keypair::generate_ed25519()).unwrap();
        assert_ne!(sign(&first), sign(&other));
        // The HMAC key is not the identity's secret: keyed with that, tokens would differ.
        let secret = identity
            .clone()
            .try_into_ed25519()
            .unwrap()
            .secret()
            .as_ref()
            .to_vec();
        let raw = ResetKey(<Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&secret).unwrap());
        assert_ne!(sign(&first), sign(&raw));
        assert_eq!(first.signature_len(), 32);
    }

    #[test]
    fn unspecified_bind_prints_as_loopback() {
        assert_eq!(
            dialable("0.0.0.0:4433".parse().unwrap()),
            "127.0.0.1:4433".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            dialable("10.1.2.3:4433".parse().unwrap()),
            "10.1.2.3:4433".parse::<SocketAddr>().unwrap()
        );
    }
}

//! The libp2p swarm every discovery node runs: its behaviour (kad, identify, the two info
//! protocols, the provider gate), how it is built and tuned for each role, the bootstrap peers
//! it starts from, and the listen and external addresses it announces.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    time::Duration,
};

use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm,
    core::{Transport as _, muxing::StreamMuxerBox, transport::Boxed},
    identify,
    identity::Keypair,
    kad,
    multiaddr::Protocol,
    request_response::{self, ProtocolSupport},
    swarm::NetworkBehaviour,
};
use tokengo_proto::{exit_info, relay_info};

use super::{
    AnnounceSchedule, DhtConfig, DiscoveryError, codec,
    gate::ProviderGate,
    policy::{self, AddressPolicy, DialGuard},
    store::{self, ProviderStore},
};

/// kad republishes provider records this often on lookups' swarms (they provide nothing).
const PROVIDER_PUBLICATION_INTERVAL: Duration = Duration::from_secs(12 * 3600);
/// Requests in flight per announcing query (Amino's go nodes use 10; kad's default is 3).
const PROVIDE_PARALLELISM: usize = 10;
/// Provider record lifetime (Amino's).
const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(48 * 3600);
/// A relay-info or exit-info request may take this long.
const INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest kad message a seeker decodes: go-libp2p's own message limit (4 MiB), so any
/// answer a go server can send is readable. go servers answer GET_PROVIDERS with every stored
/// provider; kad's default of 16 KiB made a few hundred records (or a handful with long
/// address lists) turn every answer for the key into an error, and discovery into nothing.
/// Memory: kad reads at most `parallelism` (3) such answers at once.
pub const MAX_KAD_PACKET: usize = 4 * 1024 * 1024;
/// Largest kad message a DHT server decodes: it is asked, and requests are small (an
/// ADD_PROVIDER of a relay lists a few addresses); answers it sends are not limited by this.
const MAX_KAD_REQUEST: usize = 64 * 1024;
/// Identify's protocol name (the standard one; kad learns peers' protocols through it).
const IDENTIFY_PROTOCOL: &str = "/ipfs/id/1.0.0";

/// A seeker's QUIC handshake timeout (see [`KadTuning`]).
const SEEKER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// libp2p-quic's default handshake timeout, kept by announcers and DHT servers.
const LIBP2P_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// kad settings that differ between a swarm that looks up and one that announces.
#[derive(Debug, Clone, Copy)]
pub(super) struct KadTuning {
    role: KadRole,
    /// QUIC handshake timeout of every libp2p dial. A seeker's is short (3 s): a provider
    /// record naming a silent address holds a contact slot this long, and a relay that
    /// takes longer to answer a handshake is a poor relay anyway. Others keep libp2p's 5 s.
    handshake_timeout: Duration,
    query_timeout: Duration,
    parallelism: Option<NonZeroUsize>,
    publication_interval: Duration,
}

impl KadTuning {
    pub(super) fn lookup(config: &DhtConfig) -> Self {
        Self {
            role: KadRole::Peer,
            handshake_timeout: SEEKER_HANDSHAKE_TIMEOUT,
            query_timeout: config.timeout,
            parallelism: None,
            publication_interval: PROVIDER_PUBLICATION_INTERVAL,
        }
    }

    /// `tokengo bootstrap`: a lookup's timings, storing and answering for everyone.
    pub(super) fn storage(config: &DhtConfig) -> Self {
        Self {
            role: KadRole::Storage,
            handshake_timeout: LIBP2P_HANDSHAKE_TIMEOUT,
            ..Self::lookup(config)
        }
    }

    pub(super) fn announce(schedule: &AnnounceSchedule) -> Self {
        Self {
            role: KadRole::Peer,
            handshake_timeout: LIBP2P_HANDSHAKE_TIMEOUT,
            query_timeout: schedule.provide_timeout,
            parallelism: NonZeroUsize::new(PROVIDE_PARALLELISM),
            publication_interval: schedule.republish,
        }
    }
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) kad: kad::Behaviour<ProviderStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) info: request_response::Behaviour<codec::RelayInfoCodec>,
    pub(super) exit_info: request_response::Behaviour<codec::ExitInfoCodec>,
    pub(super) gate: ProviderGate,
}

/// Which side of the two info protocols a swarm takes.
#[derive(Debug, Clone)]
pub(super) struct InfoSupport {
    pub(super) relay: ProtocolSupport,
    pub(super) exit: ProtocolSupport,
}

impl InfoSupport {
    /// Asks, never answers (seekers and DHT servers).
    pub(super) const ASK: Self = Self {
        relay: ProtocolSupport::Outbound,
        exit: ProtocolSupport::Outbound,
    };
}

pub(super) fn build_swarm(
    identity: Keypair,
    config: &DhtConfig,
    guard: DialGuard,
    mode: kad::Mode,
    support: InfoSupport,
) -> Result<Swarm<Behaviour>, DiscoveryError> {
    build_swarm_with(
        identity,
        config,
        guard,
        mode,
        support,
        KadTuning::lookup(config),
    )
}

/// How a swarm's kad is tuned beyond its mode and timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KadRole {
    /// Announcers and seekers: read answers up to [`MAX_KAD_PACKET`].
    Peer,
    /// `tokengo bootstrap`: answers with every stored provider (kad caps an answer at its
    /// replication factor, 20 by default, first come), reads requests up to
    /// [`MAX_KAD_REQUEST`].
    Storage,
}

pub(super) fn build_swarm_with(
    identity: Keypair,
    config: &DhtConfig,
    guard: DialGuard,
    mode: kad::Mode,
    support: InfoSupport,
    tuning: KadTuning,
) -> Result<Swarm<Behaviour>, DiscoveryError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_other_transport(|key| transport(key, config, tuning.handshake_timeout, guard))
        .map_err(|e| DiscoveryError::Swarm(e.to_string()))?
        .with_behaviour(|key| behaviour(key, config, mode, support, tuning))
        .map_err(|e| DiscoveryError::Swarm(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// The swarm's transport: QUIC behind the address policy, with a DNS resolver in front when
/// a bootstrap peer is named by DNS.
fn transport(
    key: &Keypair,
    config: &DhtConfig,
    handshake_timeout: Duration,
    guard: DialGuard,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let mut quic_config = libp2p::quic::Config::new(key);
    quic_config.handshake_timeout = handshake_timeout;
    let quic = libp2p::quic::tokio::Transport::new(quic_config);
    let named_guard = guard.clone();
    let guarded = policy::GuardedDials::new(quic, config.policy, guard)
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
    // DNS sits outside the policy, so the policy judges the resolved IP addresses; only the
    // bootstrap peers' names reach the resolver. Only networks that name a peer by DNS pay
    // for reading the system resolver.
    if !config.bootstrap.iter().any(is_dns_named) {
        return Ok(guarded.boxed());
    }
    match libp2p::dns::tokio::Transport::system(guarded) {
        Ok(resolving) => {
            let names = policy::BootstrapNames::of(&config.bootstrap);
            Ok(policy::GuardedDials::new(resolving, names, named_guard).boxed())
        }
        Err(e) => Err(NoResolver(e).into()),
    }
}

/// The swarm's behaviour: kad as `tuning` says, identify, both info protocols on the sides
/// `support` says, and the provider gate.
fn behaviour(
    key: &Keypair,
    config: &DhtConfig,
    mode: kad::Mode,
    support: InfoSupport,
    tuning: KadTuning,
) -> Behaviour {
    let peer = key.public().to_peer_id();
    let mut kad = kad::Behaviour::with_config(
        peer,
        ProviderStore::new(peer),
        kad_config(config.protocol.clone(), tuning),
    );
    kad.set_mode(Some(mode));
    Behaviour {
        kad,
        identify: identify::Behaviour::new(identify::Config::new(
            IDENTIFY_PROTOCOL.to_owned(),
            key.public(),
        )),
        info: request_response::Behaviour::with_codec(
            codec::RelayInfoCodec::default(),
            [(StreamProtocol::new(relay_info::PROTOCOL), support.relay)],
            request_response::Config::default().with_request_timeout(INFO_TIMEOUT),
        ),
        exit_info: request_response::Behaviour::with_codec(
            codec::ExitInfoCodec::default(),
            [(StreamProtocol::new(exit_info::PROTOCOL), support.exit)],
            request_response::Config::default().with_request_timeout(INFO_TIMEOUT),
        ),
        gate: ProviderGate::default(),
    }
}

/// kad's configuration on `protocol` as `tuning` says.
fn kad_config(protocol: StreamProtocol, tuning: KadTuning) -> kad::Config {
    let mut kad_config = kad::Config::new(protocol);
    kad_config.set_query_timeout(tuning.query_timeout);
    if let Some(parallelism) = tuning.parallelism {
        kad_config.set_parallelism(parallelism);
    }
    kad_config.set_provider_publication_interval(Some(tuning.publication_interval));
    kad_config.set_provider_record_ttl(Some(PROVIDER_RECORD_TTL));
    match tuning.role {
        KadRole::Peer => {
            kad_config.set_max_packet_size(MAX_KAD_PACKET);
        }
        KadRole::Storage => {
            kad_config.set_max_packet_size(MAX_KAD_REQUEST);
            if let Some(all) = std::num::NonZeroUsize::new(store::MAX_PROVIDERS_PER_KEY) {
                kad_config.set_replication_factor(all);
            }
        }
    }
    kad_config
}

/// A bootstrap peer is named by DNS but the system resolver cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "a bootstrap peer is named by DNS but the system resolver configuration cannot be read ({0}); give --bootstrap addresses with IPs"
)]
struct NoResolver(std::io::Error);

/// Whether an address names its host by DNS (`/dns`, `/dns4`, `/dns6`, `/dnsaddr`).
fn is_dns_named(addr: &Multiaddr) -> bool {
    matches!(
        addr.iter().next(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_))
    )
}

/// Splits `/…/p2p/ID` into the PeerId and the address without it.
fn split_peer(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => Some((peer, base)),
        _ => None,
    }
}

/// Whether a swarm walks the DHT to fill its routing table after adding the bootstrap peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// Announcers and DHT servers: they store and serve records, so they need a full table.
    Bootstrap,
    /// Throwaway seekers: their one lookup walks towards the key anyway, and a full
    /// bootstrap walk would cost dozens of dials per client start for nothing.
    LookupOnly,
}

/// Adds the bootstrap peers to kad's routing table; returns how many were usable.
pub(super) fn add_bootstrap(swarm: &mut Swarm<Behaviour>, config: &DhtConfig, walk: Walk) -> usize {
    let mut added = 0;
    for addr in &config.bootstrap {
        match split_peer(addr) {
            Some((peer, base)) if peer != *swarm.local_peer_id() => {
                swarm.behaviour_mut().kad.add_address(&peer, base);
                added += 1;
            }
            Some(_) => {}
            None => tracing::warn!(%addr, "bootstrap address without /p2p/PEERID ignored"),
        }
    }
    if added > 0 && walk == Walk::Bootstrap {
        // Fills the routing table beyond the bootstrap peers; failures only mean fewer peers.
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
    added
}

/// Feeds what identify learned into kad: the peer's listen addresses (those the policy
/// allows) when it speaks our DHT protocol. kad does not learn addresses on its own.
pub(super) fn on_identify(
    swarm: &mut Swarm<Behaviour>,
    config: &DhtConfig,
    event: identify::Event,
) {
    if let identify::Event::Received { peer_id, info, .. } = event
        && info.protocols.contains(&config.protocol)
    {
        for addr in info.listen_addrs {
            if config.policy.allows(&addr) {
                swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
        }
    }
}

/// The libp2p listen multiaddr of a UDP socket address.
#[must_use]
pub fn quic_multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(addr.ip().into())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

pub(super) fn udp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

/// The external addresses to announce for a listener: each configured IP with the bound
/// port when the listener can be reached on its IP family (an IPv4 socket cannot answer on
/// IPv6 and vice versa; `[::]` takes both on a dual-stack host); the others come back apart.
pub(super) fn external_for(listener: &Multiaddr, ips: &[IpAddr]) -> (Vec<Multiaddr>, Vec<IpAddr>) {
    let Some(bound) = policy::ip_of(listener) else {
        return (Vec::new(), ips.to_vec());
    };
    let port = udp_port(listener).unwrap_or(0);
    let reachable = |ip: &IpAddr| match bound {
        IpAddr::V4(_) => ip.is_ipv4(),
        IpAddr::V6(v6) => ip.is_ipv6() || v6.is_unspecified(),
    };
    let (usable, skipped): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|ip| reachable(ip));
    let usable = usable
        .into_iter()
        .map(|ip| quic_multiaddr(SocketAddr::new(ip, port)))
        .collect();
    (usable, skipped)
}

/// Whether a listen address counts as confirmed without configuration: only loopback under
/// the `loopback` policy (a private network on one host, as in the tests). Anything else
/// needs `external_addrs`, because a wrong address makes the relay silently unreachable.
pub(super) fn auto_confirmed(policy: AddressPolicy, addr: &Multiaddr) -> bool {
    policy == AddressPolicy::Loopback && policy::ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::discovery::PUBLIC_BOOTSTRAP;

    #[test]
    fn bootstrap_addresses_split_and_public_defaults_parse() {
        let config = DhtConfig::public();
        assert_eq!(config.bootstrap.len(), PUBLIC_BOOTSTRAP.len());
        assert!(config.bootstrap.iter().all(|a| split_peer(a).is_some()));
        assert_eq!(config.protocol.as_ref(), "/ipfs/kad/1.0.0");
        assert_eq!(config.policy, AddressPolicy::Public);
        assert!(split_peer(&"/ip4/1.2.3.4/udp/1/quic-v1".parse().unwrap()).is_none());
    }

    #[test]
    fn public_defaults_name_the_standard_peers_and_need_dns() {
        let config = DhtConfig::public();
        assert!(config.bootstrap.iter().filter(|a| is_dns_named(a)).count() >= 4);
        assert!(config.bootstrap.iter().any(|a| !is_dns_named(a)));
        assert!(!is_dns_named(
            &"/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap()
        ));
        assert!(is_dns_named(
            &"/dns4/relay.example/udp/1/quic-v1".parse().unwrap()
        ));
    }

    #[tokio::test]
    async fn a_swarm_for_the_public_dht_builds_without_dialling() {
        // Reads the system resolver configuration only; nothing is sent anywhere.
        let swarm = build_swarm(
            Keypair::generate_ed25519(),
            &DhtConfig::public(),
            DialGuard::default(),
            kad::Mode::Client,
            InfoSupport::ASK,
        );
        assert!(swarm.is_ok(), "{:?}", swarm.err());
    }

    #[test]
    fn external_addresses_follow_the_listeners_ip_family() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let ips = [v4, v6];
        let on_v4: Multiaddr = "/ip4/0.0.0.0/udp/4001/quic-v1".parse().unwrap();
        let (usable, skipped) = external_for(&on_v4, &ips);
        assert_eq!(
            usable,
            vec![
                "/ip4/203.0.113.7/udp/4001/quic-v1"
                    .parse::<Multiaddr>()
                    .unwrap()
            ]
        );
        assert_eq!(skipped, vec![v6]);
        let on_v6: Multiaddr = "/ip6/2001:db8::1/udp/4002/quic-v1".parse().unwrap();
        let (usable, skipped) = external_for(&on_v6, &ips);
        assert_eq!(
            usable,
            vec![
                "/ip6/2001:db8::7/udp/4002/quic-v1"
                    .parse::<Multiaddr>()
                    .unwrap()
            ]
        );
        assert_eq!(skipped, vec![v4]);
        let dual: Multiaddr = "/ip6/::/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(external_for(&dual, &ips).0.len(), 2);
    }

    #[test]
    fn only_loopback_under_the_loopback_policy_confirms_itself() {
        let lo: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        let lan: Multiaddr = "/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert!(auto_confirmed(AddressPolicy::Loopback, &lo));
        assert!(!auto_confirmed(AddressPolicy::Loopback, &lan));
        assert!(!auto_confirmed(AddressPolicy::Any, &lo));
        assert!(!auto_confirmed(AddressPolicy::Public, &lo));
    }
}

//! `tokengo bootstrap`'s DHT server: kad in server mode with a persisted identity, storing
//! and answering provider records for a private network.

use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, Swarm, identity::Keypair, kad, multiaddr::Protocol, swarm::SwarmEvent,
};
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, DiscoveryError,
    policy::{self, AddressPolicy, DialGuard},
    swarm::{
        Behaviour, BehaviourEvent, InfoSupport, KadTuning, Walk, add_bootstrap, auto_confirmed,
        build_swarm_with, external_for, on_identify, quic_multiaddr, udp_port,
    },
};

/// A DHT server node (`tokengo bootstrap`): kad in server mode, a persisted identity.
pub struct DhtServer {
    swarm: Swarm<Behaviour>,
    config: DhtConfig,
    addrs: Vec<Multiaddr>,
}

impl std::fmt::Debug for DhtServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtServer")
            .field("peer_id", self.swarm.local_peer_id())
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl DhtServer {
    /// Listens on `listen` and waits until the socket is bound. `external_ips` are announced
    /// with the bound port; under the `loopback` policy loopback addresses count as external.
    pub async fn start(
        config: &DhtConfig,
        identity: Keypair,
        listen: SocketAddr,
        external_ips: &[IpAddr],
        guard: DialGuard,
    ) -> Result<Self, DiscoveryError> {
        let mut swarm = build_swarm_with(
            identity,
            config,
            guard,
            kad::Mode::Server,
            InfoSupport::ASK,
            KadTuning::storage(config),
        )?;
        let bound = listen_bound(&mut swarm, quic_multiaddr(listen)).await?;
        confirm_external(&mut swarm, config, &bound, external_ips);
        add_bootstrap(&mut swarm, config, Walk::Bootstrap);
        let addrs = bootstrap_addrs(&swarm, bound);
        Ok(Self {
            swarm,
            config: config.clone(),
            addrs,
        })
    }

    /// The server's multiaddrs with `/p2p/<PeerId>`, what other nodes pass as `--bootstrap`.
    #[must_use]
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The server's PeerId.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Serves the DHT until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => event,
            };
            if let SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) = event {
                on_identify(&mut self.swarm, &self.config, event);
            }
        }
    }
}

/// Listens on `addr` and waits until the socket is bound: the bound address.
async fn listen_bound(
    swarm: &mut Swarm<Behaviour>,
    addr: Multiaddr,
) -> Result<Multiaddr, DiscoveryError> {
    swarm
        .listen_on(addr.clone())
        .map_err(|e| DiscoveryError::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => return Ok(address),
            SwarmEvent::ListenerError { error, .. }
            | SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            } => {
                return Err(DiscoveryError::Listen {
                    addr,
                    reason: error.to_string(),
                });
            }
            _ => {}
        }
    }
}

/// Adds the external addresses the server is reached at: `external_ips` with the bound port
/// (those of the listener's IP family), and loopback under the `loopback` policy.
fn confirm_external(
    swarm: &mut Swarm<Behaviour>,
    config: &DhtConfig,
    bound: &Multiaddr,
    external_ips: &[IpAddr],
) {
    let (usable, skipped) = external_for(bound, external_ips);
    if !skipped.is_empty() {
        tracing::warn!(listen = %bound, ?skipped, "external addresses of another IP family than the listener are not announced");
    }
    for addr in usable {
        swarm.add_external_address(addr);
    }
    if auto_confirmed(config.policy, bound) {
        swarm.add_external_address(bound.clone());
    } else if bound_is_unspecified_loopback(config, bound) {
        swarm.add_external_address(printable(bound.clone()));
    }
}

/// What other nodes pass as `--bootstrap`: the external addresses (the bound one without
/// any), printable, with `/p2p/<PeerId>`.
fn bootstrap_addrs(swarm: &Swarm<Behaviour>, bound: Multiaddr) -> Vec<Multiaddr> {
    let peer = *swarm.local_peer_id();
    let mut addrs: Vec<Multiaddr> = swarm.external_addresses().cloned().collect();
    if addrs.is_empty() {
        addrs.push(bound);
    }
    addrs
        .into_iter()
        .map(|a| printable(a).with(Protocol::P2p(peer)))
        .collect()
}

/// An unspecified bind under the loopback policy: peers reach it on loopback.
fn bound_is_unspecified_loopback(config: &DhtConfig, bound: &Multiaddr) -> bool {
    config.policy == AddressPolicy::Loopback
        && policy::ip_of(bound).is_some_and(|ip| ip.is_unspecified())
}

/// An unspecified address printed as loopback (which works on this host).
fn printable(addr: Multiaddr) -> Multiaddr {
    let Some(ip) = policy::ip_of(&addr).filter(IpAddr::is_unspecified) else {
        return addr;
    };
    let port = udp_port(&addr).unwrap_or(0);
    quic_multiaddr(SocketAddr::new(policy::loopback_like(ip), port))
}

//! Verifying one relay candidate before it is used: the QUIC address to probe, picked from a
//! relay-info answer, then a probe over identity-bound QUIC TLS that reads the relay's exit
//! list; and, typed, why a candidate was not used.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId};
use tokengo_proto::{frame, relay_info::RelayInfo};
use tokio::task::JoinSet;

use super::{
    cache::VerifiedRelay,
    policy::{self, AddressPolicy, DialGuard},
    selection::Selection,
};
use crate::net::{
    relay_link::{self, LinkError, RelayLink},
    transport::{RelayAddr, TransportParams},
};

/// Verification of one relay (QUIC handshake and exit list) may take this long.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay candidate was not used. The messages are what the seeker logs after "relay
/// skipped: ".
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Its address is outside the address policy (a cached relay's may be).
    #[error("address outside the address policy")]
    OutsidePolicy,
    /// The probe took longer than its timeout (10 s).
    #[error("verification timed out")]
    TimedOut,
    /// Probes to this IP already failed too often in this discovery, so relay-info naming it
    /// is not believed again (it may name a victim).
    #[error("probes to {ip} already failed too often in this discovery")]
    IpExhausted {
        /// The IP.
        ip: IpAddr,
    },
    /// The relay-info answer does not offer the client ALPN (`tokengo/1`).
    #[error("relay-info lists no tokengo/1 ALPN")]
    NoClientAlpn,
    /// No QUIC address in the relay-info answer names the provider's PeerId and passes the
    /// address policy.
    #[error(
        "relay-info has no usable QUIC address for this PeerId ({listed} listed, {refused} outside the address policy)"
    )]
    NoQuicAddress {
        /// Addresses listed.
        listed: usize,
        /// Addresses of the provider the address policy refused.
        refused: usize,
    },
    /// The probe's local QUIC endpoint could not be opened.
    #[error(transparent)]
    Endpoint(#[from] std::io::Error),
    /// The relay could not be reached, did not prove its PeerId, or its exit list failed.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Where a verification candidate came from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    Cache,
    Dht,
}

/// A finished probe of one relay.
#[derive(Debug)]
pub(super) struct Probed {
    pub(super) source: Source,
    pub(super) peer: PeerId,
    pub(super) outcome: Result<VerifiedRelay, ProbeError>,
}

/// The QUIC address to verify from a relay-info answer: the first one that names the
/// provider's own PeerId (anything else could never pass the TLS check, or would be a
/// different relay vouched for by this one) and that the policy allows.
pub(super) fn quic_candidates(
    info: &RelayInfo,
    provider: PeerId,
    policy: AddressPolicy,
    guard: &DialGuard,
) -> Result<RelayAddr, ProbeError> {
    if !info.alpns.iter().any(|a| a == frame::ALPN_CLIENT) {
        return Err(ProbeError::NoClientAlpn);
    }
    let mut refused = 0;
    for bytes in &info.quic_addrs {
        let Ok(addr) = Multiaddr::try_from(bytes.clone()) else {
            continue;
        };
        let Ok(relay) = addr.to_string().parse::<RelayAddr>() else {
            continue;
        };
        if relay.peer_id() != provider {
            continue;
        }
        if !policy.allows(&addr) {
            refused += 1;
            if let Some(observer) = &guard.observer {
                observer(&addr, false);
            }
            guard.refused.inc();
            continue;
        }
        return Ok(relay);
    }
    Err(ProbeError::NoQuicAddress {
        listed: info.quic_addrs.len(),
        refused,
    })
}

/// A relay's QUIC address is probed only while its IP has not failed too often in this
/// discovery (relay-info is the provider's word: it may name a victim).
pub(super) fn probe_budget(
    selection: &Selection,
    addr: RelayAddr,
) -> Result<RelayAddr, ProbeError> {
    match policy::ip_of(&addr.to_multiaddr()) {
        Some(ip) if selection.ip_exhausted(ip) => Err(ProbeError::IpExhausted { ip }),
        _ => Ok(addr),
    }
}

/// Starts verifying the relay at `addr` (an address outside the policy fails at once, counted
/// and shown to the observer like a refused dial).
pub(super) fn spawn_verify(
    probes: &mut JoinSet<Probed>,
    source: Source,
    addr: RelayAddr,
    guard: &DialGuard,
    params: TransportParams,
    policy: AddressPolicy,
) {
    let peer = addr.peer_id();
    let allowed = policy.allows(&addr.to_multiaddr());
    if let Some(observer) = &guard.observer {
        observer(&addr.to_multiaddr(), allowed);
    }
    if !allowed {
        guard.refused.inc();
        probes.spawn(async move {
            Probed {
                source,
                peer,
                outcome: Err(ProbeError::OutsidePolicy),
            }
        });
        return;
    }
    probes.spawn(async move {
        let outcome = tokio::time::timeout(VERIFY_TIMEOUT, verify(addr, params))
            .await
            .unwrap_or(Err(ProbeError::TimedOut));
        Probed {
            source,
            peer,
            outcome,
        }
    });
}

/// Verifies one relay: QUIC with identity-bound TLS (the handshake fails unless the relay
/// proves the PeerId in `addr`), then its exit list, each descriptor's signature checked.
/// The probe's time is the relay's latency.
pub async fn verify(addr: RelayAddr, params: TransportParams) -> Result<VerifiedRelay, ProbeError> {
    let started = Instant::now();
    let link = RelayLink::new(addr.clone(), params)?;
    let outcome = relay_link::list_exits(&link).await;
    let rtt = started.elapsed();
    // Never wait long for the goodbye.
    let _ = tokio::time::timeout(Duration::from_millis(500), link.close()).await;
    let exits = outcome?;
    Ok(VerifiedRelay {
        addr,
        rtt,
        exits: exits.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    #[test]
    fn quic_candidates_require_the_providers_peer_id_and_the_policy() {
        let provider = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let addr = |ip: [u8; 4], peer| {
            RelayAddr::new((ip, 4433).into(), peer)
                .to_multiaddr()
                .to_vec()
        };
        let alpns = vec![frame::ALPN_CLIENT.to_vec()];
        let guard = DialGuard::default();
        let info = RelayInfo {
            quic_addrs: vec![
                addr([127, 0, 0, 1], other),
                addr([10, 0, 0, 1], provider),
                addr([127, 0, 0, 1], provider),
            ],
            alpns: alpns.clone(),
            exits: vec![],
        };
        let chosen = quic_candidates(&info, provider, AddressPolicy::Loopback, &guard).unwrap();
        assert_eq!(chosen.peer_id(), provider);
        assert_eq!(
            chosen.to_multiaddr().to_vec(),
            addr([127, 0, 0, 1], provider)
        );
        assert_eq!(guard.refused.get(), 1);
        let only_other = RelayInfo {
            quic_addrs: vec![addr([127, 0, 0, 1], other)],
            alpns,
            exits: vec![],
        };
        assert!(matches!(
            quic_candidates(&only_other, provider, AddressPolicy::Any, &guard),
            Err(ProbeError::NoQuicAddress {
                listed: 1,
                refused: 0
            })
        ));
        let no_alpn = RelayInfo {
            alpns: vec![],
            ..info
        };
        assert!(matches!(
            quic_candidates(&no_alpn, provider, AddressPolicy::Any, &guard),
            Err(ProbeError::NoClientAlpn)
        ));
    }

    #[test]
    fn probe_errors_read_as_the_log_lines_always_did() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(
            ProbeError::OutsidePolicy.to_string(),
            "address outside the address policy"
        );
        assert_eq!(ProbeError::TimedOut.to_string(), "verification timed out");
        assert_eq!(
            ProbeError::IpExhausted { ip }.to_string(),
            "probes to 10.0.0.1 already failed too often in this discovery"
        );
        assert_eq!(
            ProbeError::NoClientAlpn.to_string(),
            "relay-info lists no tokengo/1 ALPN"
        );
        assert_eq!(
            ProbeError::NoQuicAddress {
                listed: 3,
                refused: 1
            }
            .to_string(),
            "relay-info has no usable QUIC address for this PeerId (3 listed, 1 outside the address policy)"
        );
        assert_eq!(
            ProbeError::from(LinkError::ListEmpty).to_string(),
            LinkError::ListEmpty.to_string()
        );
    }
}

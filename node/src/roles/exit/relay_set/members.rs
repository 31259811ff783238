//! The pure part of an exit's relay set: what one tunnel is (a [`Member`]), which tunnels may
//! run side by side, and what to change when a relay's name resolves to other addresses
//! ([`plan`]). No I/O: the set's supervisor applies what these decide.

use std::net::SocketAddr;

use crate::net::transport::RelayAddr;

/// One tunnel the exit keeps: the relay as it was given (or discovered) and the address the
/// tunnel dials. For a relay given by IP, or discovered, both are the same; for a relay given
/// by DNS name, `dial` is one of the addresses the name resolves to, with the same PeerId to
/// prove (every replica of a relay behind one name shares its identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The relay as given: a name's multiaddr, or the relay's own.
    pub(crate) given: RelayAddr,
    /// The address dialled (always an IP).
    pub(crate) dial: RelayAddr,
    /// For a member of a name: the socket address it resolved to.
    resolved: Option<SocketAddr>,
}

impl Member {
    /// A relay dialled as given (an IP, or a discovered relay).
    pub(crate) fn direct(relay: RelayAddr) -> Self {
        Self {
            given: relay.clone(),
            dial: relay,
            resolved: None,
        }
    }

    /// The member of the relay named `given` at `at`, one of the addresses its name resolved
    /// to.
    pub(crate) fn of_name(given: &RelayAddr, at: SocketAddr) -> Self {
        Self {
            given: given.clone(),
            dial: given.at(at),
            resolved: Some(at),
        }
    }

    /// The address its name resolved to; `None` for a relay dialled as given.
    pub(crate) fn resolved(&self) -> Option<SocketAddr> {
        self.resolved
    }

    /// Whether it is a member of the relay named `name`.
    pub(crate) fn of(&self, name: &RelayAddr) -> bool {
        self.resolved.is_some() && self.given == *name
    }
}

/// Whether a tunnel to `candidate` may start beside the `held` ones. A member of a name is
/// one tunnel per address (replicas share a PeerId, so the PeerId cannot tell them apart); a
/// relay dialled as given is one tunnel per PeerId, as before names resolved to several
/// addresses (a discovered relay found twice, or listed under two addresses, is one relay).
pub(crate) fn admits(held: &[&Member], candidate: &Member) -> bool {
    if candidate.resolved.is_some() {
        !held.iter().any(|m| m.dial == candidate.dial)
    } else {
        !held
            .iter()
            .any(|m| m.dial.peer_id() == candidate.dial.peer_id())
    }
}

/// What to change so that a name's tunnels match what it resolves to now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Addresses resolved now that have no tunnel: start one each.
    pub(crate) start: Vec<SocketAddr>,
    /// Addresses with a tunnel that are no longer resolved: retire it.
    pub(crate) retire: Vec<SocketAddr>,
}

impl Plan {
    /// Whether nothing changes.
    pub(crate) fn is_empty(&self) -> bool {
        self.start.is_empty() && self.retire.is_empty()
    }
}

/// The difference between the addresses a name's tunnels dial (`held`) and the addresses it
/// resolves to now (`resolved`), both in the order given. Only a successful resolution makes
/// a plan: a failed one changes nothing, so a DNS outage never drops working tunnels.
pub(crate) fn plan(held: &[SocketAddr], resolved: &[SocketAddr]) -> Plan {
    let mut start: Vec<SocketAddr> = Vec::new();
    for addr in resolved {
        if !held.contains(addr) && !start.contains(addr) {
            start.push(*addr);
        }
    }
    Plan {
        start,
        retire: held
            .iter()
            .filter(|addr| !resolved.contains(addr))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use libp2p_identity::Keypair;

    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_plan_starts_new_addresses_and_retires_vanished_ones() {
        let held = addrs(&["10.0.0.1:4433", "10.0.0.2:4433"]);
        // A pod left and another came.
        let now = addrs(&["10.0.0.2:4433", "10.0.0.3:4433"]);
        assert_eq!(
            plan(&held, &now),
            Plan {
                start: addrs(&["10.0.0.3:4433"]),
                retire: addrs(&["10.0.0.1:4433"]),
            }
        );
        // Nothing changed.
        assert!(plan(&held, &held).is_empty());
        // The first resolution: every address starts; an address listed twice starts once.
        let twice = addrs(&["10.0.0.1:4433", "10.0.0.1:4433", "10.0.0.2:4433"]);
        assert_eq!(plan(&[], &twice).start, held);
        // The same IP on another port is another address.
        assert_eq!(
            plan(&held, &addrs(&["10.0.0.1:4434", "10.0.0.2:4433"])),
            Plan {
                start: addrs(&["10.0.0.1:4434"]),
                retire: addrs(&["10.0.0.1:4433"]),
            }
        );
    }

    #[test]
    fn members_of_a_name_are_one_per_address_and_direct_relays_one_per_peer() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let name: RelayAddr = format!("/dns4/relays.test/udp/4433/quic-v1/p2p/{peer}")
            .parse()
            .unwrap();
        let [a, b] = [addrs(&["10.0.0.1:4433"])[0], addrs(&["10.0.0.2:4433"])[0]];
        let first = Member::of_name(&name, a);
        assert_eq!(first.resolved(), Some(a));
        assert!(first.of(&name));
        assert_eq!(first.dial, RelayAddr::new(a, peer));
        // Another replica of the same relay (same PeerId) at another address: admitted.
        assert!(admits(&[&first], &Member::of_name(&name, b)));
        // The same address again: not.
        assert!(!admits(&[&first], &Member::of_name(&name, a)));
        // A relay dialled as given is one tunnel per PeerId, whatever its address.
        let direct = Member::direct(RelayAddr::new(b, peer));
        assert!(!direct.of(&name));
        assert_eq!(direct.resolved(), None);
        assert!(!admits(&[&first], &direct));
        let other = Member::direct(RelayAddr::new(
            b,
            Keypair::generate_ed25519().public().to_peer_id(),
        ));
        assert!(admits(&[&first, &direct], &other));
        assert!(admits(&[], &direct));
    }
}

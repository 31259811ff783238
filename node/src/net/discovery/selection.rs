//! Which DHT providers a seeker contacts, at which addresses and in what order: bounded and
//! Sybil-aware, without I/O.
//!
//! Anyone can put a provider record on the DHT, with any PeerId and any addresses. Contacting
//! every provider is how a few hundred fake records turn into a few hundred dials, relay-info
//! reads and QUIC probes per client, and how records naming a victim's IP make every client
//! send QUIC Initials there. So a discovery contacts providers
//! - a few at a time ([`SelectionLimits::in_flight`]) and at most
//!   [`SelectionLimits::per_discovery`] in total;
//! - in random order, first choosing an IP at random and then a provider at that IP, so a
//!   thousand records naming one IP weigh as much as one record at another;
//! - never at an IP where [`SelectionLimits::failures_per_ip`] attempts already failed, and
//!   never at two providers of one IP at once until a provider was reached there (silence
//!   and failures are what a victim's IP yields; an IP where a provider answered runs libp2p
//!   for it, and several relays sharing a host must not be contacted one by one);
//! - never at an endpoint another PeerId proved to own (a dial that reached the wrong PeerId
//!   tells who is really there: records copying a relay's addresses are then dropped, and the
//!   owner, when it is a provider too, is contacted next);
//! - not at all when a record lists an absurd number of addresses
//!   ([`SelectionLimits::max_listed_addrs`]); otherwise at its first
//!   [`SelectionLimits::dial_addrs`] allowed addresses.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use super::policy::{AddressPolicy, ip_of};

/// Bounds of one discovery's provider contacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionLimits {
    /// Providers being contacted at once (dial, relay-info, verification). Default 16: a
    /// silent address costs a slot for the seeker's handshake timeout (3 s), so records
    /// naming a hundred silent IPs must not outlast the discovery timeout (30 s).
    pub in_flight: usize,
    /// Providers contacted in one discovery, lookup repetitions included. Default 160: with
    /// at most `failures_per_ip` failures per IP, silent records spread over up to about 80
    /// IPs cannot use it all up before the honest relay's IP is drawn.
    pub per_discovery: usize,
    /// A record listing more addresses than this is not contacted. Default 32 (a go peer
    /// lists a dozen or so; a TokenGo relay one or two).
    pub max_listed_addrs: usize,
    /// Addresses dialled per provider. Default 4.
    pub dial_addrs: usize,
    /// Failed attempts at one IP after which no other provider there is tried. Default 2.
    pub failures_per_ip: usize,
}

impl Default for SelectionLimits {
    fn default() -> Self {
        Self {
            in_flight: 16,
            per_discovery: 160,
            max_listed_addrs: 32,
            dial_addrs: 4,
            failures_per_ip: 2,
        }
    }
}

/// What became of a provider the lookup reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Waits for its turn.
    Queued,
    /// Already queued, contacted, or contacted with these very addresses.
    Known,
    /// The record names no address the policy allows.
    NoAddress,
    /// The record lists more addresses than [`SelectionLimits::max_listed_addrs`].
    Absurd,
}

/// How contacting a provider ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The dial reached it (whatever its relay-info was worth, if any came).
    Answered,
    /// Nothing answered at the addresses dialled.
    Failed,
    /// The dial at `addr` reached `obtained`, not the provider.
    WrongPeer {
        /// The address dialled.
        addr: Multiaddr,
        /// Who proved to be there.
        obtained: PeerId,
    },
}

/// A provider to contact now, at these addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The provider.
    pub peer: PeerId,
    /// Where to dial it (allowed by the policy, at most [`SelectionLimits::dial_addrs`]).
    pub addrs: Vec<Multiaddr>,
}

/// Counts of what the selection did, for logs and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelectionStats {
    /// Providers contacted.
    pub contacted: usize,
    /// Records not contacted for an absurd address list.
    pub absurd: usize,
    /// Records without an allowed address.
    pub no_address: usize,
    /// Records dropped because another PeerId owns every address they list.
    pub impostors: usize,
    /// Records dropped because their IPs failed too often.
    pub ip_exhausted: usize,
}

/// Chooses a random index below its argument (a seeded one in tests).
pub type Pick = Box<dyn FnMut(usize) -> usize + Send>;

/// The provider selection of one discovery.
pub struct Selection {
    limits: SelectionLimits,
    policy: AddressPolicy,
    pick: Pick,
    queued: HashMap<PeerId, Vec<Multiaddr>>,
    /// Addresses each contacted provider was dialled at.
    contacted: HashMap<PeerId, Vec<Multiaddr>>,
    in_flight: HashMap<PeerId, Vec<IpAddr>>,
    busy_ips: HashMap<IpAddr, usize>,
    /// IPs where a dial reached the provider it was meant for.
    reached: HashSet<IpAddr>,
    failures: HashMap<IpAddr, usize>,
    owners: HashMap<Multiaddr, PeerId>,
    stats: SelectionStats,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("limits", &self.limits)
            .field("queued", &self.queued.len())
            .field("in_flight", &self.in_flight.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Selection {
    /// A selection choosing at random.
    #[must_use]
    pub fn new(limits: SelectionLimits, policy: AddressPolicy) -> Self {
        Self::with_pick(
            limits,
            policy,
            Box::new(|n| rand::random_range(0..n.max(1))),
        )
    }

    /// A selection choosing with `pick`.
    #[must_use]
    pub fn with_pick(limits: SelectionLimits, policy: AddressPolicy, pick: Pick) -> Self {
        Self {
            limits,
            policy,
            pick,
            queued: HashMap::new(),
            contacted: HashMap::new(),
            in_flight: HashMap::new(),
            busy_ips: HashMap::new(),
            reached: HashSet::new(),
            failures: HashMap::new(),
            owners: HashMap::new(),
            stats: SelectionStats::default(),
        }
    }

    /// A provider the lookup reported, with the addresses its record lists. A provider
    /// contacted before is queued again only when its record lists other addresses (a relay
    /// that moved).
    pub fn offer(&mut self, peer: PeerId, listed: &[Multiaddr]) -> Offered {
        if listed.len() > self.limits.max_listed_addrs {
            self.stats.absurd += 1;
            return Offered::Absurd;
        }
        let addrs: Vec<Multiaddr> = listed
            .iter()
            .filter(|a| self.policy.allows(a))
            .map(|a| without_peer(a.clone()))
            .fold(Vec::new(), |mut unique, a| {
                if !unique.contains(&a) {
                    unique.push(a);
                }
                unique
            });
        if addrs.is_empty() {
            self.stats.no_address += 1;
            return Offered::NoAddress;
        }
        if self.queued.contains_key(&peer)
            || self.in_flight.contains_key(&peer)
            || self
                .contacted
                .get(&peer)
                .is_some_and(|before| addrs.iter().all(|a| before.contains(a)))
        {
            return Offered::Known;
        }
        self.queued.insert(peer, addrs);
        Offered::Queued
    }

    /// The next provider to contact, if a slot is free and one is eligible. Records that can
    /// never be contacted (every address owned by another PeerId or at an exhausted IP) are
    /// dropped on the way.
    pub fn next_contact(&mut self) -> Option<Contact> {
        if self.in_flight.len() >= self.limits.in_flight
            || self.stats.contacted >= self.limits.per_discovery
        {
            return None;
        }
        self.drop_hopeless();
        // A provider proven to own its endpoint goes first: it already answered there.
        let proven = self
            .queued
            .iter()
            .filter(|(peer, addrs)| addrs.iter().any(|a| self.owners.get(a) == Some(peer)))
            .map(|(peer, _)| *peer)
            .next();
        let peer = match proven {
            Some(peer) => peer,
            None => self.random_by_ip()?,
        };
        let listed = self.queued.remove(&peer)?;
        let addrs: Vec<Multiaddr> = listed
            .into_iter()
            .filter(|a| self.usable(&peer, a))
            .take(self.limits.dial_addrs)
            .collect();
        let ips: Vec<IpAddr> = addrs.iter().filter_map(ip_of).collect();
        for ip in &ips {
            *self.busy_ips.entry(*ip).or_default() += 1;
        }
        self.in_flight.insert(peer, ips);
        self.contacted.insert(peer, addrs.clone());
        self.stats.contacted += 1;
        Some(Contact { peer, addrs })
    }

    /// Contacting `peer` ended: frees its slot and learns from how it ended.
    pub fn finished(&mut self, peer: PeerId, outcome: &Outcome) {
        let Some(ips) = self.in_flight.remove(&peer) else {
            return;
        };
        for ip in &ips {
            if let Some(busy) = self.busy_ips.get_mut(ip) {
                *busy = busy.saturating_sub(1);
            }
        }
        match outcome {
            Outcome::Answered => {}
            Outcome::Failed => {
                for ip in ips {
                    *self.failures.entry(ip).or_default() += 1;
                }
            }
            Outcome::WrongPeer { addr, obtained } => {
                // Someone answered there: the IP is alive, only the record lied.
                self.owners.insert(without_peer(addr.clone()), *obtained);
            }
        }
    }

    /// A dial reached the provider it was meant for at `ip`: more providers there may be
    /// contacted at once from now on.
    pub fn reached(&mut self, ip: IpAddr) {
        self.reached.insert(ip);
    }

    /// A verification probe to the QUIC address at `ip` that `peer`'s relay-info named
    /// failed. It counts against `ip` unless the provider itself was reached there: relay-info
    /// is the provider's word and may name a victim elsewhere, while a provider that lies
    /// about its own host harms nobody else (and must not use up the budget of an honest
    /// relay sharing the IP).
    pub fn probe_failed(&mut self, peer: PeerId, ip: IpAddr) {
        let own = self
            .contacted
            .get(&peer)
            .is_some_and(|addrs| addrs.iter().any(|a| ip_of(a) == Some(ip)));
        if !own {
            *self.failures.entry(ip).or_default() += 1;
        }
    }

    /// Whether `ip` already failed too often to be tried again in this discovery.
    #[must_use]
    pub fn ip_exhausted(&self, ip: IpAddr) -> bool {
        self.failures.get(&ip).copied().unwrap_or(0) >= self.limits.failures_per_ip
    }

    /// Whether nothing is queued or in flight.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.queued.is_empty()
    }

    /// Whether this discovery may still contact another provider.
    #[must_use]
    pub fn has_budget(&self) -> bool {
        self.stats.contacted < self.limits.per_discovery
    }

    /// What the selection did so far.
    #[must_use]
    pub fn stats(&self) -> SelectionStats {
        self.stats
    }

    fn usable(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        if self.owners.get(addr).is_some_and(|owner| owner != peer) {
            return false;
        }
        // The proven owner of an endpoint may be dialled there whatever its IP's record.
        if self.owners.get(addr) == Some(peer) {
            return true;
        }
        ip_of(addr).is_none_or(|ip| !self.ip_exhausted(ip))
    }

    fn drop_hopeless(&mut self) {
        let hopeless: Vec<(PeerId, bool)> = self
            .queued
            .iter()
            .filter(|(peer, addrs)| !addrs.iter().any(|a| self.usable(peer, a)))
            .map(|(peer, addrs)| {
                let impostor = addrs
                    .iter()
                    .any(|a| self.owners.get(a).is_some_and(|owner| owner != peer));
                (*peer, impostor)
            })
            .collect();
        for (peer, impostor) in hopeless {
            self.queued.remove(&peer);
            if impostor {
                self.stats.impostors += 1;
            } else {
                self.stats.ip_exhausted += 1;
            }
        }
    }

    /// A random IP among those with a queued provider and either no provider in flight or a
    /// provider reached there before, then a random provider whose first usable address is
    /// there.
    fn random_by_ip(&mut self) -> Option<PeerId> {
        let mut by_ip: HashMap<Option<IpAddr>, Vec<PeerId>> = HashMap::new();
        for (peer, addrs) in &self.queued {
            let Some(first) = addrs.iter().find(|a| self.usable(peer, a)) else {
                continue;
            };
            let ip = ip_of(first);
            if ip.is_some_and(|ip| {
                !self.reached.contains(&ip) && self.busy_ips.get(&ip).copied().unwrap_or(0) > 0
            }) {
                continue;
            }
            by_ip.entry(ip).or_default().push(*peer);
        }
        let mut ips: Vec<Option<IpAddr>> = by_ip.keys().copied().collect();
        if ips.is_empty() {
            return None;
        }
        // HashMap order is arbitrary but not random: sort, then let `pick` choose.
        ips.sort_unstable();
        let ip = ips[(self.pick)(ips.len()).min(ips.len() - 1)];
        let mut peers = by_ip.remove(&ip).unwrap_or_default();
        peers.sort_unstable();
        let at = (self.pick)(peers.len()).min(peers.len().saturating_sub(1));
        peers.get(at).copied()
    }
}

/// The address without a trailing `/p2p/…`, so records that spell it either way compare equal.
fn without_peer(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// Distinct IPs among `addrs` (for logs).
#[must_use]
pub fn distinct_ips<'a>(addrs: impl IntoIterator<Item = &'a Multiaddr>) -> usize {
    addrs
        .into_iter()
        .filter_map(ip_of)
        .collect::<HashSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn at(ip: &str, port: u16) -> Multiaddr {
        format!("/ip4/{ip}/udp/{port}/quic-v1").parse().unwrap()
    }

    fn first() -> Pick {
        Box::new(|_| 0)
    }

    fn selection(limits: SelectionLimits) -> Selection {
        Selection::with_pick(limits, AddressPolicy::Loopback, first())
    }

    #[test]
    fn absurd_and_addressless_records_are_not_contacted() {
        let mut s = selection(SelectionLimits::default());
        let many: Vec<Multiaddr> = (0..33).map(|p| at("127.0.0.1", 1000 + p)).collect();
        assert_eq!(s.offer(peer(), &many), Offered::Absurd);
        assert_eq!(s.offer(peer(), &[]), Offered::NoAddress);
        // Outside the policy counts as no address.
        assert_eq!(s.offer(peer(), &[at("10.0.0.1", 1)]), Offered::NoAddress);
        assert!(s.next_contact().is_none());
        let stats = s.stats();
        assert_eq!((stats.absurd, stats.no_address, stats.contacted), (1, 2, 0));
    }

    #[test]
    fn contacts_are_bounded_in_flight_and_per_discovery() {
        let limits = SelectionLimits {
            in_flight: 2,
            per_discovery: 3,
            ..SelectionLimits::default()
        };
        let mut s = selection(limits);
        let peers: Vec<PeerId> = (0..5).map(|_| peer()).collect();
        for (i, p) in peers.iter().enumerate() {
            let ip = format!("127.0.0.{}", i + 1);
            assert_eq!(s.offer(*p, &[at(&ip, 1)]), Offered::Queued);
        }
        let a = s.next_contact().unwrap();
        let b = s.next_contact().unwrap();
        assert!(s.next_contact().is_none(), "two in flight at most");
        s.finished(a.peer, &Outcome::Answered);
        let c = s.next_contact().unwrap();
        s.finished(b.peer, &Outcome::Answered);
        s.finished(c.peer, &Outcome::Answered);
        assert!(s.next_contact().is_none(), "three per discovery at most");
        assert!(!s.has_budget());
        assert_eq!(s.stats().contacted, 3);
    }

    #[test]
    fn many_records_at_one_ip_weigh_as_much_as_one_record_elsewhere() {
        let limits = SelectionLimits {
            in_flight: 1,
            ..SelectionLimits::default()
        };
        // Always the last IP in sorted order: 127.0.0.9 (one honest record) after 127.0.0.5
        // (a hundred Sybils).
        let mut s = Selection::with_pick(limits, AddressPolicy::Loopback, Box::new(|n| n - 1));
        for port in 0..100 {
            s.offer(peer(), &[at("127.0.0.5", 2000 + port)]);
        }
        let honest = peer();
        s.offer(honest, &[at("127.0.0.9", 1)]);
        assert_eq!(s.next_contact().unwrap().peer, honest);
    }

    #[test]
    fn an_ip_that_failed_twice_is_not_tried_again_and_one_at_a_time_per_ip() {
        let mut s = selection(SelectionLimits::default());
        let victims: Vec<PeerId> = (0..50).map(|_| peer()).collect();
        for (i, p) in victims.iter().enumerate() {
            s.offer(*p, &[at("127.0.0.66", 3000 + u16::try_from(i).unwrap())]);
        }
        let one = s.next_contact().unwrap();
        assert!(s.next_contact().is_none(), "one provider per IP at a time");
        s.finished(one.peer, &Outcome::Failed);
        let two = s.next_contact().unwrap();
        s.finished(two.peer, &Outcome::Failed);
        assert!(
            s.next_contact().is_none(),
            "the IP failed twice: nobody else there"
        );
        assert!(s.ip_exhausted("127.0.0.66".parse().unwrap()));
        assert_eq!(s.stats().ip_exhausted, 48);
        assert_eq!(s.stats().contacted, 2);
        assert!(s.is_idle());
    }

    #[test]
    fn an_ip_where_a_provider_was_reached_gets_several_in_flight() {
        let limits = SelectionLimits::default();
        let mut s = selection(limits);
        for port in 0..u16::try_from(limits.in_flight + 4).unwrap() {
            s.offer(peer(), &[at("127.0.0.1", 5000 + port)]);
        }
        let one = s.next_contact().unwrap();
        assert!(
            s.next_contact().is_none(),
            "one at a time before anyone answered"
        );
        s.reached("127.0.0.1".parse().unwrap());
        let more: Vec<Contact> = std::iter::from_fn(|| s.next_contact()).collect();
        assert_eq!(
            more.len(),
            limits.in_flight - 1,
            "the in-flight bound still holds"
        );
        s.finished(one.peer, &Outcome::Answered);
        assert!(s.next_contact().is_some());
    }

    #[test]
    fn records_copying_a_relays_endpoint_are_dropped_once_its_owner_answers_there() {
        let mut s = selection(SelectionLimits::default());
        let honest = peer();
        let endpoint = at("127.0.0.1", 4001);
        let liars: Vec<PeerId> = (0..20).map(|_| peer()).collect();
        for liar in &liars {
            s.offer(*liar, std::slice::from_ref(&endpoint));
        }
        let contact = s.next_contact().unwrap();
        assert_ne!(contact.peer, honest);
        s.finished(
            contact.peer,
            &Outcome::WrongPeer {
                addr: endpoint.clone().with(Protocol::P2p(contact.peer)),
                obtained: honest,
            },
        );
        // The liars' records name an endpoint that is proven to be someone else's.
        assert!(s.next_contact().is_none());
        assert_eq!(s.stats().impostors, 19);
        // The owner's own record arrives: it is contacted, whatever else is queued.
        s.offer(peer(), &[at("127.0.0.7", 1)]);
        s.offer(honest, std::slice::from_ref(&endpoint));
        assert_eq!(s.next_contact().unwrap().peer, honest);
        // A wrong PeerId is no failure of the IP: someone answered.
        assert!(!s.ip_exhausted("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn probe_failures_count_against_an_ip_only_when_it_is_not_the_providers_own() {
        let mut s = selection(SelectionLimits::default());
        let p = peer();
        s.offer(p, &[at("127.0.0.1", 1)]);
        s.next_contact().unwrap();
        let own: IpAddr = "127.0.0.1".parse().unwrap();
        let victim: IpAddr = "127.0.0.99".parse().unwrap();
        for _ in 0..3 {
            s.probe_failed(p, own);
        }
        assert!(!s.ip_exhausted(own));
        s.probe_failed(p, victim);
        s.probe_failed(p, victim);
        assert!(s.ip_exhausted(victim));
    }

    #[test]
    fn a_contacted_provider_is_queued_again_only_with_new_addresses() {
        let mut s = selection(SelectionLimits::default());
        let p = peer();
        s.offer(p, &[at("127.0.0.1", 1)]);
        assert_eq!(s.offer(p, &[at("127.0.0.1", 1)]), Offered::Known);
        let contact = s.next_contact().unwrap();
        assert_eq!(contact.addrs, vec![at("127.0.0.1", 1)]);
        assert_eq!(s.offer(p, &[at("127.0.0.1", 1)]), Offered::Known);
        s.finished(p, &Outcome::Failed);
        assert_eq!(s.offer(p, &[at("127.0.0.1", 1)]), Offered::Known);
        assert_eq!(s.offer(p, &[at("127.0.0.2", 1)]), Offered::Queued);
        assert_eq!(s.next_contact().unwrap().addrs, vec![at("127.0.0.2", 1)]);
    }

    #[test]
    fn at_most_dial_addrs_are_dialled_and_p2p_suffixes_compare_equal() {
        let mut s = selection(SelectionLimits::default());
        let p = peer();
        let mut addrs: Vec<Multiaddr> = (1..=6).map(|i| at(&format!("127.0.0.{i}"), 9)).collect();
        addrs.push(at("127.0.0.1", 9).with(Protocol::P2p(p)));
        s.offer(p, &addrs);
        let contact = s.next_contact().unwrap();
        assert_eq!(contact.addrs, addrs[..4].to_vec());
        assert_eq!(distinct_ips(&contact.addrs), 4);
    }
}

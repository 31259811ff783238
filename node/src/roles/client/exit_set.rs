//! The exits a client knows and who vouches for each: every source (each relay's exit list,
//! the DHT) reports verified descriptors; the set keeps, per exit, the newest descriptor ever
//! seen and each source's latest claim. No I/O.
//!
//! The rules that keep a relay from steering or tagging a client:
//! - keys come from the newest descriptor seen for an exit (`issued_at`), never an older one;
//! - an exit whose sources disagree on its key configurations is held (not used) until they
//!   agree: a relay that hands one client its own key list for an exit (to recognise that
//!   client's requests at a colluding exit) or an outdated one gets the exit dropped, not used;
//! - an exit listed by one source only is marked so, and the choice avoids it while
//!   corroborated exits exist.
//!
//! An exit signs a fresh descriptor for every relay it registers with, so claims from
//! different sources carry different `issued_at` with the same keys; that is agreement.

use std::collections::{BTreeMap, HashMap};

use libp2p_identity::PeerId;
use tokengo_proto::{descriptor::Descriptor, key_config::KeyConfig};

use crate::net::transport::RelayAddr;

/// Where the client learnt of an exit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    /// The exit list of the relay with this identity.
    Relay(PeerId),
    /// An exit record on the DHT (answered by the exit itself).
    Dht,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Relay(peer) => write!(f, "relay {peer}"),
            Self::Dht => f.write_str("the DHT"),
        }
    }
}

/// What one source says about one exit: its verified descriptor and the relays it can be
/// reached through (for a relay's list: that relay; none for the DHT, which names relays but
/// cannot show that they host the exit).
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    /// The descriptor, signature already verified.
    pub(crate) descriptor: Descriptor,
    /// Relays that host the exit, according to this source.
    pub(crate) relays: Vec<RelayAddr>,
}

/// Why a source's descriptor was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// Older than one already seen for the exit, with other keys.
    Rollback,
    /// As new as the newest seen, with other keys.
    KeyConflict,
}

/// A refused descriptor, for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The exit.
    pub(crate) exit: PeerId,
    /// Who served it.
    pub(crate) source: Source,
    /// Why.
    pub(crate) reason: Refusal,
}

/// An exit the client may use.
#[derive(Debug, Clone)]
pub(crate) struct Usable {
    /// The newest descriptor; its keys are the ones to encrypt to.
    pub(crate) descriptor: Descriptor,
    /// The sources whose claims agree (all of them: otherwise it would be held).
    pub(crate) vouched_by: Vec<Source>,
    /// Relays that host it, from every source's claim, without duplicates.
    pub(crate) relays: Vec<RelayAddr>,
}

impl Usable {
    /// Vouched for by two or more sources.
    pub(crate) fn corroborated(&self) -> bool {
        self.vouched_by.len() >= 2
    }
}

/// The state of one known exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Usable, vouched for by these sources.
    Usable(Vec<Source>),
    /// Not used: a source's claim disagrees with the newest descriptor's keys.
    Held(Refused),
    /// No source lists it now (its newest descriptor is remembered until it expires).
    Unlisted,
}

#[derive(Debug, Clone)]
struct Claim {
    issued_at: u64,
    expires_at: u64,
    key_configs: Vec<KeyConfig>,
    relays: Vec<RelayAddr>,
}

#[derive(Debug, Clone)]
struct Record {
    newest: Descriptor,
    claims: BTreeMap<Source, Claim>,
}

/// Every exit the client has heard of.
#[derive(Debug, Default)]
pub(crate) struct ExitSet {
    exits: HashMap<PeerId, Record>,
}

impl ExitSet {
    /// Replaces everything `source` said before with `listings` (an empty list: the source
    /// lists nothing now, or could not be asked). A claim whose keys differ from the newest
    /// descriptor's is kept, so that it holds the exit (see [`ExitSet::held`]).
    pub(crate) fn observe(&mut self, source: &Source, listings: Vec<Listing>) {
        for record in self.exits.values_mut() {
            record.claims.remove(source);
        }
        for Listing { descriptor, relays } in listings {
            let exit = descriptor.peer_id;
            let claim = Claim {
                issued_at: descriptor.issued_at,
                expires_at: descriptor.expires_at,
                key_configs: descriptor.key_configs.clone(),
                relays,
            };
            let record = self.exits.entry(exit).or_insert_with(|| Record {
                newest: descriptor.clone(),
                claims: BTreeMap::new(),
            });
            if descriptor.issued_at > record.newest.issued_at {
                record.newest = descriptor;
            }
            record.claims.insert(source.clone(), claim);
        }
    }

    /// Drops claims and exits whose descriptors expired by `now` (Unix seconds).
    pub(crate) fn expire(&mut self, now: u64) {
        for record in self.exits.values_mut() {
            record.claims.retain(|_, claim| claim.expires_at > now);
        }
        self.exits
            .retain(|_, record| record.newest.expires_at > now || !record.claims.is_empty());
    }

    /// The exits that may be used now.
    pub(crate) fn usable(&self) -> Vec<Usable> {
        let mut usable: Vec<Usable> = self
            .exits
            .values()
            .filter_map(|record| {
                let Standing::Usable(vouched_by) = record.standing() else {
                    return None;
                };
                let mut relays: Vec<RelayAddr> = Vec::new();
                for relay in record.claims.values().flat_map(|c| &c.relays) {
                    if !relays.contains(relay) {
                        relays.push(relay.clone());
                    }
                }
                Some(Usable {
                    descriptor: record.newest.clone(),
                    vouched_by,
                    relays,
                })
            })
            .collect();
        usable.sort_by_key(|u| u.descriptor.peer_id);
        usable
    }

    /// Where `exit` stands, or `None` if no source ever listed it.
    pub(crate) fn standing(&self, exit: &PeerId) -> Option<Standing> {
        self.exits.get(exit).map(Record::standing)
    }

    /// Every exit held back, with the first disagreeing claim (its descriptor is refused).
    pub(crate) fn held(&self) -> Vec<Refused> {
        self.exits
            .values()
            .filter_map(|record| match record.standing() {
                Standing::Held(refused) => Some(refused),
                _ => None,
            })
            .collect()
    }
}

impl Record {
    fn standing(&self) -> Standing {
        if self.claims.is_empty() {
            return Standing::Unlisted;
        }
        if let Some((source, reason)) = self
            .claims
            .keys()
            .find_map(|source| Some((source, self.disagreement(source)?)))
        {
            return Standing::Held(Refused {
                exit: self.newest.peer_id,
                source: source.clone(),
                reason,
            });
        }
        Standing::Usable(self.claims.keys().cloned().collect())
    }

    /// Whether `source`'s claim disagrees with the newest descriptor's keys, and how.
    fn disagreement(&self, source: &Source) -> Option<Refusal> {
        let claim = self.claims.get(source)?;
        if claim.key_configs == self.newest.key_configs {
            None
        } else if claim.issued_at < self.newest.issued_at {
            Some(Refusal::Rollback)
        } else {
            Some(Refusal::KeyConflict)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn descriptor(exit: PeerId, issued_at: u64, key_id: u8) -> Descriptor {
        Descriptor {
            peer_id: exit,
            key_configs: vec![KeyConfig {
                key_id,
                public_key: [key_id; 32],
            }],
            models: vec!["m".into()],
            issued_at,
            expires_at: issued_at + 1000,
            max_streams: 8,
            access_token_required: false,
        }
    }

    fn relay_source() -> (Source, RelayAddr) {
        let peer = peer();
        (
            Source::Relay(peer),
            RelayAddr::new(([127, 0, 0, 1], 4433).into(), peer),
        )
    }

    fn listing(descriptor: Descriptor, relay: &RelayAddr) -> Listing {
        Listing {
            descriptor,
            relays: vec![relay.clone()],
        }
    }

    #[test]
    fn agreeing_sources_corroborate_and_different_issue_times_are_agreement() {
        let exit = peer();
        let (a, relay_a) = relay_source();
        let (b, relay_b) = relay_source();
        let mut set = ExitSet::default();
        set.observe(&a, vec![listing(descriptor(exit, 100, 1), &relay_a)]);
        let usable = set.usable();
        assert_eq!(usable.len(), 1);
        assert!(!usable[0].corroborated());
        set.observe(&b, vec![listing(descriptor(exit, 101, 1), &relay_b)]);
        assert!(set.held().is_empty());
        let usable = set.usable();
        assert!(usable[0].corroborated());
        assert_eq!(usable[0].relays.len(), 2);
        assert!(usable[0].relays.contains(&relay_a) && usable[0].relays.contains(&relay_b));
        assert_eq!(usable[0].descriptor.issued_at, 101);
    }

    #[test]
    fn an_older_descriptor_with_other_keys_is_refused_and_holds_the_exit() {
        let exit = peer();
        let (a, relay_a) = relay_source();
        let (b, relay_b) = relay_source();
        let mut set = ExitSet::default();
        set.observe(&a, vec![listing(descriptor(exit, 200, 2), &relay_a)]);
        set.observe(&b, vec![listing(descriptor(exit, 100, 1), &relay_b)]);
        assert_eq!(
            set.held(),
            vec![Refused {
                exit,
                source: b.clone(),
                reason: Refusal::Rollback
            }]
        );
        assert!(set.usable().is_empty());
        assert!(matches!(set.standing(&exit), Some(Standing::Held(_))));
        // The source that saw the newest goes away: the old keys are still never used.
        set.observe(&a, Vec::new());
        assert!(set.usable().is_empty());
        // The lagging source catches up: usable again, with the newest keys.
        set.observe(&b, vec![listing(descriptor(exit, 201, 2), &relay_b)]);
        let usable = set.usable();
        assert_eq!(usable[0].descriptor.key_configs[0].key_id, 2);
    }

    #[test]
    fn a_newer_descriptor_with_other_keys_from_one_source_holds_the_exit_until_all_agree() {
        // Key rotation and a tagging relay look alike to a client: both hold the exit until
        // every source serves the same keys.
        let exit = peer();
        let (a, relay_a) = relay_source();
        let (b, relay_b) = relay_source();
        let mut set = ExitSet::default();
        set.observe(&a, vec![listing(descriptor(exit, 100, 1), &relay_a)]);
        set.observe(&b, vec![listing(descriptor(exit, 100, 1), &relay_b)]);
        set.observe(&b, vec![listing(descriptor(exit, 300, 3), &relay_b)]);
        assert!(set.usable().is_empty());
        assert_eq!(
            set.held(),
            vec![Refused {
                exit,
                source: a.clone(),
                reason: Refusal::Rollback
            }]
        );
        // A claim as new as the newest with other keys is a conflict.
        set.observe(&a, vec![listing(descriptor(exit, 300, 4), &relay_a)]);
        assert_eq!(set.held()[0].reason, Refusal::KeyConflict);
        assert!(set.usable().is_empty());
        set.observe(&a, vec![listing(descriptor(exit, 301, 3), &relay_a)]);
        assert_eq!(set.usable().len(), 1);
    }

    #[test]
    fn unlisted_exits_are_remembered_until_they_expire() {
        let exit = peer();
        let (a, relay_a) = relay_source();
        let mut set = ExitSet::default();
        set.observe(&a, vec![listing(descriptor(exit, 100, 2), &relay_a)]);
        set.observe(&a, Vec::new());
        assert_eq!(set.standing(&exit), Some(Standing::Unlisted));
        set.expire(1099);
        // Still remembered: an older descriptor is refused.
        set.observe(&a, vec![listing(descriptor(exit, 50, 1), &relay_a)]);
        assert_eq!(set.held()[0].reason, Refusal::Rollback);
        set.observe(&a, Vec::new());
        set.expire(1100);
        assert_eq!(set.standing(&exit), None);
    }

    #[test]
    fn the_dht_vouches_but_hosts_nothing() {
        let exit = peer();
        let dht_only = peer();
        let (a, relay_a) = relay_source();
        let mut set = ExitSet::default();
        set.observe(&a, vec![listing(descriptor(exit, 100, 1), &relay_a)]);
        let from_dht = |d| Listing {
            descriptor: d,
            relays: Vec::new(),
        };
        set.observe(
            &Source::Dht,
            vec![
                from_dht(descriptor(exit, 150, 1)),
                from_dht(descriptor(dht_only, 150, 1)),
            ],
        );
        let usable = set.usable();
        let corroborated = usable
            .iter()
            .find(|u| u.descriptor.peer_id == exit)
            .unwrap();
        assert_eq!(corroborated.vouched_by, vec![a.clone(), Source::Dht]);
        assert!(corroborated.corroborated());
        assert_eq!(corroborated.relays, vec![relay_a]);
        let unhosted = usable
            .iter()
            .find(|u| u.descriptor.peer_id == dht_only)
            .unwrap();
        assert!(unhosted.relays.is_empty());
        // A relay serving other keys than the DHT's record holds the exit.
        set.observe(&Source::Dht, vec![from_dht(descriptor(exit, 200, 9))]);
        assert_eq!(set.held()[0].source, a);
    }
}

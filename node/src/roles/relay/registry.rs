//! The relay's table of registered exits, keyed by the PeerId each exit proved with its TLS
//! certificate. Only the relay's own tasks touch it; lookups are on the path of every request,
//! so it is a plain map under a short-held lock.
//!
//! Registrations are capped in number, in bytes and in rate so that the exit list a client
//! fetches always fits what clients accept (1024 entries, 4 MiB): a flood of throwaway
//! identities is refused, it can never make the list unusable. The list and the relay-info
//! descriptor set are built once per change (or expiry), not per request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use libp2p_identity::PeerId;
use prometheus_client::metrics::gauge::Gauge;
use tokengo_proto::frame::{self, Status};

use super::{slots::Slots, token_bucket::TokenBucket};
use crate::{config::Limits, net::relay_link};

/// Byte budget of all registered descriptors: the exit list (status byte, counts and lengths
/// included) stays well under the 4 MiB a client reads.
pub const MAX_LIST_BYTES: usize = 3 << 20;
/// Byte budget of the descriptors a relay-info answer carries: its whole message must stay
/// under `tokengo_proto::relay_info::MAX_RESPONSE_BYTES` (1 MiB). Exits beyond it are left
/// out of relay-info (clients get them from the exit list over QUIC).
pub const MAX_INFO_BYTES: usize = 900 * 1024;
// The largest list the caps allow is one a client accepts (`net::relay_link` reads at most
// 1024 entries and 4 MiB): the most entries, each with up to 8 bytes of count and length
// prefixes, plus the byte budget and the status byte. Relay-info's descriptors, with room
// for its addresses and ALPNs, stay under its 1 MiB answer. Checked when compiling.
const _: () = {
    assert!(crate::config::MAX_EXITS_CEILING <= relay_link::MAX_EXITS);
    assert!(
        1 + 8 * crate::config::MAX_EXITS_CEILING + MAX_LIST_BYTES <= relay_link::MAX_LIST_BYTES
    );
    assert!(MAX_INFO_BYTES + 64 * 1024 <= tokengo_proto::relay_info::MAX_RESPONSE_BYTES);
};

/// Most stream slots the relay accounts for one exit, whatever its descriptor claims.
const MAX_EXIT_SLOTS: u32 = 1024;

/// One registered exit.
#[derive(Debug, Clone)]
struct Entry {
    connection: quinn::Connection,
    descriptor: Bytes,
    expires_at: u64,
    slots: Arc<Slots>,
}

/// A registered exit as a request sees it.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Its tunnel.
    pub(crate) connection: quinn::Connection,
    /// Its stream slots.
    pub(crate) slots: Arc<Slots>,
}

/// What the exit list and relay-info are built from, built once per change.
#[derive(Debug, Clone)]
struct Snapshot {
    /// The LIST_EXITS answer: status byte and encoded list.
    list: Bytes,
    /// The descriptors relay-info carries (within [`MAX_INFO_BYTES`]).
    info: Arc<Vec<Vec<u8>>>,
    /// The snapshot is stale from this Unix time on (the first expiry among its exits).
    valid_until: u64,
}

#[derive(Debug)]
struct Table {
    exits: HashMap<PeerId, Entry>,
    /// Sum of the descriptors' lengths.
    bytes: usize,
    snapshot: Option<Snapshot>,
    new_identities: TokenBucket,
}

/// Registered exits.
#[derive(Debug)]
pub struct Registry {
    table: Mutex<Table>,
    max_exits: usize,
    /// Streams in flight at an exit from which its slots are shared by source.
    contended_streams: usize,
    /// Number of registered exits, for whoever waits on changes (readiness, tests).
    count: tokio::sync::watch::Sender<usize>,
    /// The same number as a metric, set under the lock so concurrent changes cannot leave it
    /// at a stale value.
    gauge: Gauge,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&Limits::default())
    }
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// First registration of this exit.
    New,
    /// Same connection, new descriptor (key rotation, refresh).
    Updated,
    /// The same identity registered from a new connection (the exit restarted or
    /// reconnected); the old connection is closed.
    Replaced,
}

impl From<&Registered> for crate::ops::metrics::Registration {
    fn from(registered: &Registered) -> Self {
        use crate::ops::metrics::Registration;
        match registered {
            Registered::New => Registration::New,
            Registered::Updated => Registration::Updated,
            Registered::Replaced => Registration::Replaced,
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The relay holds as many exits as it may.
    #[error("relay is full ({0} exits); try another relay")]
    Full(usize),
    /// The descriptors would exceed the exit list's byte budget.
    #[error("relay's exit list is full ({0} bytes); try another relay")]
    TooManyBytes(usize),
    /// New identities arrive faster than the relay admits them.
    #[error("too many new exits at once; retry later")]
    TooFast,
}

impl Refused {
    /// The status the acknowledgement carries: every refusal is temporary, so the exit backs
    /// off and retries (or tries another relay) rather than giving up.
    #[must_use]
    pub fn status(&self) -> Status {
        Status::Overloaded
    }
}

impl Registry {
    /// An empty table with the caps of `limits`.
    #[must_use]
    pub fn new(limits: &Limits) -> Self {
        Self {
            table: Mutex::new(Table {
                exits: HashMap::new(),
                bytes: 0,
                snapshot: None,
                new_identities: TokenBucket::new(
                    limits.registration_burst,
                    f64::from(limits.registrations_per_sec),
                ),
            }),
            max_exits: limits.max_exits.clamp(1, crate::config::MAX_EXITS_CEILING),
            contended_streams: limits.contended_streams,
            count: tokio::sync::watch::Sender::new(0),
            gauge: Gauge::default(),
        }
    }

    /// Records `descriptor` for `peer` on `connection`, if the caps allow. The caller has
    /// verified the descriptor and that `peer` is the identity `connection`'s certificate
    /// proves.
    pub fn register(
        &self,
        peer: PeerId,
        connection: &quinn::Connection,
        descriptor: Bytes,
        expires_at: u64,
        max_streams: u32,
    ) -> Result<Registered, Refused> {
        let previous = {
            let mut table = self.lock();
            let old_len = table.exits.get(&peer).map(|e| e.descriptor.len());
            let bytes = table.bytes - old_len.unwrap_or(0) + descriptor.len();
            if old_len.is_none() && table.exits.len() >= self.max_exits {
                return Err(Refused::Full(self.max_exits));
            }
            if bytes > MAX_LIST_BYTES {
                return Err(Refused::TooManyBytes(MAX_LIST_BYTES));
            }
            if old_len.is_none() && !table.new_identities.take(Instant::now()) {
                return Err(Refused::TooFast);
            }
            // Same connection: the slots (and the streams holding them) carry on.
            let slots = match table.exits.get(&peer) {
                Some(old) if old.connection.stable_id() == connection.stable_id() => {
                    Arc::clone(&old.slots)
                }
                _ => Slots::new(
                    max_streams.clamp(1, MAX_EXIT_SLOTS) as usize,
                    self.contended_streams,
                ),
            };
            let entry = Entry {
                connection: connection.clone(),
                descriptor,
                expires_at,
                slots,
            };
            let previous = table.exits.insert(peer, entry);
            table.bytes = bytes;
            table.snapshot = None;
            self.counted(table.exits.len());
            previous
        };
        Ok(match previous {
            None => Registered::New,
            Some(old) if old.connection.stable_id() == connection.stable_id() => {
                Registered::Updated
            }
            Some(old) => {
                old.connection.close(
                    crate::net::stream::code::PEER_GONE,
                    b"replaced by a newer connection",
                );
                Registered::Replaced
            }
        })
    }

    /// Removes `peer` if it is still registered on `connection` (a newer connection of the
    /// same exit stays).
    pub fn remove(&self, peer: &PeerId, connection: &quinn::Connection) -> bool {
        let mut table = self.lock();
        if table
            .exits
            .get(peer)
            .is_some_and(|e| e.connection.stable_id() == connection.stable_id())
        {
            if let Some(old) = table.exits.remove(peer) {
                table.bytes -= old.descriptor.len();
            }
            table.snapshot = None;
            self.counted(table.exits.len());
            true
        } else {
            false
        }
    }

    /// The tunnel and slots of a registered, unexpired exit.
    pub(crate) fn route(&self, peer: &PeerId, now: u64) -> Option<Route> {
        self.lock()
            .exits
            .get(peer)
            .filter(|e| e.expires_at > now)
            .map(|e| Route {
                connection: e.connection.clone(),
                slots: Arc::clone(&e.slots),
            })
    }

    /// The tunnel connection of a registered, unexpired exit.
    #[must_use]
    pub fn connection(&self, peer: &PeerId, now: u64) -> Option<quinn::Connection> {
        self.route(peer, now).map(|r| r.connection)
    }

    /// The LIST_EXITS answer (status byte and encoded list of every unexpired exit).
    #[must_use]
    pub fn exit_list(&self, now: u64) -> Bytes {
        self.snapshot(now).list
    }

    /// The signed descriptors relay-info carries: unexpired exits, as many as fit in
    /// [`MAX_INFO_BYTES`].
    #[must_use]
    pub fn info_descriptors(&self, now: u64) -> Arc<Vec<Vec<u8>>> {
        self.snapshot(now).info
    }

    /// Signed descriptors of every unexpired exit.
    #[must_use]
    pub fn descriptors(&self, now: u64) -> Vec<Bytes> {
        self.lock()
            .exits
            .values()
            .filter(|e| e.expires_at > now)
            .map(|e| e.descriptor.clone())
            .collect()
    }

    fn snapshot(&self, now: u64) -> Snapshot {
        let mut table = self.lock();
        if let Some(snapshot) = &table.snapshot
            && now < snapshot.valid_until
        {
            return snapshot.clone();
        }
        let live: Vec<&Entry> = table
            .exits
            .values()
            .filter(|e| e.expires_at > now)
            .collect();
        let refs: Vec<&[u8]> = live.iter().map(|e| e.descriptor.as_ref()).collect();
        let mut list = vec![Status::Ok as u8];
        list.extend_from_slice(&frame::encode_exit_list(&refs));
        let mut info = Vec::new();
        let mut info_bytes = 0usize;
        for descriptor in &refs {
            // Each entry also costs its length prefix (at most 4 bytes at these sizes).
            info_bytes += descriptor.len() + 4;
            if info_bytes > MAX_INFO_BYTES {
                break;
            }
            info.push(descriptor.to_vec());
        }
        let snapshot = Snapshot {
            list: Bytes::from(list),
            info: Arc::new(info),
            valid_until: live.iter().map(|e| e.expires_at).min().unwrap_or(u64::MAX),
        };
        table.snapshot = Some(snapshot.clone());
        snapshot
    }

    /// Watches the number of registered exits.
    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// The number of registered exits as a metric (`tokengo_relay_exits_registered`).
    #[must_use]
    pub fn gauge(&self) -> Gauge {
        self.gauge.clone()
    }

    fn counted(&self, len: usize) {
        self.count.send_replace(len);
        self.gauge.set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// Whether `peer` is registered.
    #[must_use]
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.lock().exits.contains_key(peer)
    }

    /// Number of registered exits.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().exits.len()
    }

    /// Whether no exit is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

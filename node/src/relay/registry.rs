//! The relay's table of registered exits, keyed by the PeerId each exit proved with its TLS
//! certificate. Only the relay's own tasks touch it; lookups are on the path of every request,
//! so it is a plain map under a short-held lock.

use std::{collections::HashMap, sync::Mutex};

use bytes::Bytes;
use libp2p_identity::PeerId;
use prometheus_client::metrics::gauge::Gauge;

/// One registered exit.
#[derive(Debug, Clone)]
struct Entry {
    connection: quinn::Connection,
    descriptor: Bytes,
    expires_at: u64,
}

/// Registered exits.
#[derive(Debug)]
pub struct Registry {
    exits: Mutex<HashMap<PeerId, Entry>>,
    /// Number of registered exits, for whoever waits on changes (readiness, tests).
    count: tokio::sync::watch::Sender<usize>,
    /// The same number as a metric, set under the lock so concurrent changes cannot leave it
    /// at a stale value.
    gauge: Gauge,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            exits: Mutex::default(),
            count: tokio::sync::watch::Sender::new(0),
            gauge: Gauge::default(),
        }
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

impl Registry {
    /// Records `descriptor` for `peer` on `connection`. The caller has verified the descriptor
    /// and that `peer` is the identity `connection`'s certificate proves.
    pub fn register(
        &self,
        peer: PeerId,
        connection: &quinn::Connection,
        descriptor: Bytes,
        expires_at: u64,
    ) -> Registered {
        let entry = Entry {
            connection: connection.clone(),
            descriptor,
            expires_at,
        };
        let previous = {
            let mut exits = self.lock();
            let previous = exits.insert(peer, entry);
            self.counted(exits.len());
            previous
        };
        match previous {
            None => Registered::New,
            Some(old) if old.connection.stable_id() == connection.stable_id() => {
                Registered::Updated
            }
            Some(old) => {
                old.connection.close(
                    crate::stream::code::PEER_GONE,
                    b"replaced by a newer connection",
                );
                Registered::Replaced
            }
        }
    }

    /// Removes `peer` if it is still registered on `connection` (a newer connection of the
    /// same exit stays).
    pub fn remove(&self, peer: &PeerId, connection: &quinn::Connection) -> bool {
        let mut exits = self.lock();
        if exits
            .get(peer)
            .is_some_and(|e| e.connection.stable_id() == connection.stable_id())
        {
            exits.remove(peer);
            self.counted(exits.len());
            true
        } else {
            false
        }
    }

    /// The tunnel connection of a registered, unexpired exit.
    #[must_use]
    pub fn connection(&self, peer: &PeerId, now: u64) -> Option<quinn::Connection> {
        self.lock()
            .get(peer)
            .filter(|e| e.expires_at > now)
            .map(|e| e.connection.clone())
    }

    /// Signed descriptors of every unexpired exit.
    #[must_use]
    pub fn descriptors(&self, now: u64) -> Vec<Bytes> {
        self.lock()
            .values()
            .filter(|e| e.expires_at > now)
            .map(|e| e.descriptor.clone())
            .collect()
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
        self.lock().contains_key(peer)
    }

    /// Number of registered exits.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no exit is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.exits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

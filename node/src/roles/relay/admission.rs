//! Admission by source at the relay: what one network party may cost the relay before any of
//! its work is forwarded. Two gates, both pure bookkeeping (times are passed in):
//!
//! - [`ConnectionGate`]: new QUIC connections per source address (an IPv4 address, an IPv6
//!   /64), a token bucket checked before the handshake, the costliest step (TLS signatures,
//!   and an exit's descriptor check after it). Over the rate, an address that has not proved
//!   it owns itself is asked to (QUIC Retry, stateless); a proven one is refused
//!   (`CONNECTION_REFUSED`, which a client reports and retries later); one that keeps coming
//!   after its refusals is ignored, so a connection flood costs one packet decryption each.
//!   Proven and unproven attempts draw on separate buckets, so spoofed packets in another's
//!   name cannot use up that address's connections.
//! - [`RefusalBudget`]: malformed request headers a connection may send before the relay
//!   closes it. An honest client sends none; garbage then costs the sender a handshake
//!   each, which the connection gate limits.
//!
//! Requests in flight per source are shared out in `relay::slots`, which keys on the same [`Source`].

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{source::Source, token_bucket::TokenBucket};

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on with the handshake.
    Accept,
    /// Ask the peer to prove its address first (QUIC Retry).
    Retry,
    /// Refuse it (QUIC `CONNECTION_REFUSED`).
    Refuse,
    /// Drop it without an answer: the address keeps coming after its refusals.
    Ignore,
}

/// Most sources the connection gate remembers; beyond it the idle ones are forgotten, and
/// when none is idle new sources pass unchecked (the relay's Retry above
/// `retry_above_handshakes` still stands) rather than grow the table without bound.
const MAX_SOURCES: usize = 65_536;
/// Refusals (`CONNECTION_REFUSED`) an address gets beyond its rate, a burst then per second;
/// after them its attempts are dropped unanswered.
const REFUSAL_BURST: u32 = 16;
const REFUSALS_PER_SEC: f64 = 4.0;

/// New connections per source address.
#[derive(Debug)]
pub(crate) struct ConnectionGate {
    burst: u32,
    per_sec: f64,
    sources: Mutex<HashMap<Source, Buckets>>,
}

#[derive(Debug)]
struct Buckets {
    proven: TokenBucket,
    unproven: TokenBucket,
    refusals: TokenBucket,
    last: Instant,
}

impl ConnectionGate {
    /// A gate of `burst` connections, then `per_sec` a second, per source; `per_sec` 0 turns
    /// it off.
    pub(crate) fn new(burst: u32, per_sec: f64) -> Self {
        Self {
            burst: burst.max(1),
            per_sec,
            sources: Mutex::default(),
        }
    }

    /// Decides on an attempt from `source`; `proven` when its address is validated (it
    /// answered a Retry), `can_retry` when a Retry may still be sent.
    pub(crate) fn admit(
        &self,
        source: Source,
        proven: bool,
        can_retry: bool,
        now: Instant,
    ) -> Verdict {
        if self.per_sec <= 0.0 {
            return Verdict::Accept;
        }
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            // A bucket left alone this long is full again: forgetting it changes nothing.
            let idle = Duration::from_secs_f64((f64::from(self.burst) / self.per_sec).min(3600.0));
            sources.retain(|_, b| now.saturating_duration_since(b.last) <= idle);
            if sources.len() >= MAX_SOURCES {
                return Verdict::Accept;
            }
        }
        let rate = self.per_sec;
        let buckets = sources.entry(source).or_insert_with(|| Buckets {
            proven: TokenBucket::new(self.burst, rate),
            unproven: TokenBucket::new(self.burst, rate),
            refusals: TokenBucket::new(REFUSAL_BURST, REFUSALS_PER_SEC),
            last: now,
        });
        buckets.last = now;
        let bucket = if proven {
            &mut buckets.proven
        } else {
            &mut buckets.unproven
        };
        if bucket.take(now) {
            Verdict::Accept
        } else if !proven && can_retry {
            Verdict::Retry
        } else if buckets.refusals.take(now) {
            Verdict::Refuse
        } else {
            Verdict::Ignore
        }
    }
}

/// Malformed requests the relay answers on one connection: a burst, then a rate; spent, the
/// connection is closed.
#[derive(Debug)]
pub(crate) struct RefusalBudget(Mutex<TokenBucket>);

/// Refusals one connection may draw at once, then per second.
const CONNECTION_REFUSAL_BURST: u32 = 16;
const CONNECTION_REFUSALS_PER_SEC: f64 = 2.0;

impl Default for RefusalBudget {
    fn default() -> Self {
        Self(Mutex::new(TokenBucket::new(
            CONNECTION_REFUSAL_BURST,
            CONNECTION_REFUSALS_PER_SEC,
        )))
    }
}

impl RefusalBudget {
    /// Counts one refusal; false once the budget is spent (close the connection).
    pub(crate) fn spend(&self, now: Instant) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(ip: &str) -> Source {
        Source::of(std::net::SocketAddr::new(ip.parse().unwrap(), 1))
    }

    #[test]
    fn connections_beyond_the_rate_are_retried_then_refused_then_ignored() {
        let gate = ConnectionGate::new(2, 1.0);
        let (attacker, other) = (source("192.0.2.1"), source("192.0.2.2"));
        let t = Instant::now();
        assert_eq!(gate.admit(attacker, false, true, t), Verdict::Accept);
        assert_eq!(gate.admit(attacker, false, true, t), Verdict::Accept);
        // Unproven: asked to prove its address; proven, it has a bucket of its own.
        assert_eq!(gate.admit(attacker, false, true, t), Verdict::Retry);
        assert_eq!(gate.admit(attacker, true, false, t), Verdict::Accept);
        assert_eq!(gate.admit(attacker, true, false, t), Verdict::Accept);
        let refused = (0..100)
            .map(|_| gate.admit(attacker, true, false, t))
            .filter(|v| *v == Verdict::Refuse)
            .count();
        assert_eq!(refused, REFUSAL_BURST as usize);
        assert_eq!(gate.admit(attacker, true, false, t), Verdict::Ignore);
        // Another address is untouched, and the rate comes back.
        assert_eq!(gate.admit(other, false, true, t), Verdict::Accept);
        let later = t + Duration::from_secs(1);
        assert_eq!(gate.admit(attacker, true, false, later), Verdict::Accept);
        // Off: everything passes.
        let off = ConnectionGate::new(1, 0.0);
        assert!((0..100).all(|_| off.admit(attacker, true, false, t) == Verdict::Accept));
    }

    #[test]
    fn a_connection_s_refusal_budget_is_a_burst_then_a_rate() {
        let budget = RefusalBudget::default();
        let t = Instant::now();
        assert!((0..CONNECTION_REFUSAL_BURST).all(|_| budget.spend(t)));
        assert!(!budget.spend(t));
        assert!(budget.spend(t + Duration::from_secs(1)));
    }
}

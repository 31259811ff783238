//! Fair sharing of one exit's concurrent stream slots among the sources (client addresses,
//! `relay::source::Source`) and connections that use it. An exit serves at most as many
//! streams at once as its descriptor says (`max_streams`); without sharing, one client with a
//! few connections could hold every slot and starve everyone else, and one flooding address
//! could keep hundreds of requests queued ahead of everyone else's in the exit and its
//! backend. The rules:
//!
//! - a client connection never holds more than an eighth of the exit's slots (at least 16);
//! - a source alone at the exit (no other source held, waited for or released a slot in the
//!   last second) is limited by nothing else: one heavy client is never capped;
//! - while fewer than `contended` streams are in flight at the exit, a request takes a free
//!   slot at once;
//! - from `contended` on, with two or more sources active, a source holds at most its fair
//!   part of `contended` (divided among the active sources, at least 4); beyond it its
//!   requests wait for its own releases, costing nothing but memory, so a flood keeps few
//!   requests ahead of anyone else's;
//! - when the exit is full, a source below its share of all slots waits for the next slot
//!   released, and released slots go to the eligible waiter whose source holds the fewest; a
//!   source at or above that share is refused at once (`Overloaded`).
//!
//! Pure bookkeeping: times are passed in, and the caller bounds the wait (the receiver of
//! [`Admission::Wait`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::source::Source;

/// Who holds slots: a client connection (its QUIC stable id) and its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder {
    /// The connection's stable id.
    pub(crate) connection: usize,
    /// Where it comes from.
    pub(crate) source: Source,
}

/// The smallest per-connection cap, so a small exit is still usable by one busy client.
const MIN_PER_HOLDER: usize = 16;
/// A connection holds at most this fraction of an exit's slots.
const PER_HOLDER_DIVISOR: usize = 8;
/// The smallest fair part of a contended exit a source always gets.
const MIN_PER_SOURCE: usize = 4;
/// A source counts as active this long after its last request or release.
const ACTIVE_WINDOW: Duration = Duration::from_secs(1);

/// One exit's slots.
#[derive(Debug)]
pub(crate) struct Slots {
    capacity: usize,
    per_holder: usize,
    /// In-flight streams from which fair shares by source apply (0: never).
    contended: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_use: usize,
    /// Slots held per connection.
    held: HashMap<usize, usize>,
    sources: HashMap<Source, SourceState>,
    waiting: VecDeque<Waiter>,
    /// When idle sources and abandoned waiters were last cleared away.
    pruned: Option<Instant>,
}

#[derive(Debug)]
struct SourceState {
    held: usize,
    waiting: usize,
    last: Instant,
}

#[derive(Debug)]
struct Waiter {
    holder: Holder,
    grant: oneshot::Sender<Slot>,
}

/// The answer to a request for a slot.
#[derive(Debug)]
pub(crate) enum Admission {
    /// A slot, held until dropped.
    Granted(Slot),
    /// The request must wait: a slot arrives on this receiver when one is released to it.
    /// Dropping the receiver gives up (a slot already sent is released again).
    Wait(oneshot::Receiver<Slot>),
    /// The connection or source already holds its share: answer `Overloaded`.
    Refused,
}

/// A held slot; released when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    holder: Holder,
    /// False for a slot that never reached its waiter (its counts were undone by hand).
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.slots.release(self.holder, Instant::now());
        }
    }
}

impl Slots {
    /// Slots for an exit that serves `capacity` streams at once, shared by source from
    /// `contended` streams in flight on (0: only when full).
    pub(crate) fn new(capacity: usize, contended: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            capacity,
            per_holder: (capacity / PER_HOLDER_DIVISOR)
                .max(MIN_PER_HOLDER)
                .min(capacity),
            contended,
            state: Mutex::default(),
        })
    }

    /// Most slots one connection may hold.
    #[cfg(test)]
    fn per_holder(&self) -> usize {
        self.per_holder
    }

    /// Asks for a slot for `holder` at `now`.
    pub(crate) fn acquire(self: &Arc<Self>, holder: Holder, now: Instant) -> Admission {
        let mut state = self.lock();
        state.touch(holder.source, now);
        if state.held.get(&holder.connection).copied().unwrap_or(0) >= self.per_holder {
            return Admission::Refused;
        }
        let active = state.active(now);
        if self.may_take(&state, holder.source, active) {
            return Admission::Granted(self.grant(&mut state, holder));
        }
        if state.in_use >= self.capacity
            && state.source_held(holder.source) >= self.capacity.div_ceil(active.max(1))
        {
            return Admission::Refused;
        }
        let (grant, receiver) = oneshot::channel();
        state.waiting.push_back(Waiter { holder, grant });
        if let Some(source) = state.sources.get_mut(&holder.source) {
            source.waiting += 1;
        }
        Admission::Wait(receiver)
    }

    /// Whether `source` may take a free slot now, with `active` sources at the exit.
    fn may_take(&self, state: &State, source: Source, active: usize) -> bool {
        if state.in_use >= self.capacity {
            return false;
        }
        if active <= 1 || self.contended == 0 || state.in_use < self.contended {
            return true;
        }
        state.source_held(source) < (self.contended / active).max(MIN_PER_SOURCE)
    }

    /// Slots in use (for tests and status).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.lock().in_use
    }

    fn grant(self: &Arc<Self>, state: &mut State, holder: Holder) -> Slot {
        state.in_use += 1;
        *state.held.entry(holder.connection).or_insert(0) += 1;
        if let Some(source) = state.sources.get_mut(&holder.source) {
            source.held += 1;
        }
        Slot {
            slots: Arc::clone(self),
            holder,
            armed: true,
        }
    }

    fn release(self: &Arc<Self>, holder: Holder, now: Instant) {
        let mut state = self.lock();
        state.forget_one(holder);
        state.in_use -= 1;
        state.touch(holder.source, now);
        self.hand_on(&mut state, now);
        state.prune(now);
    }

    /// Hands free slots to waiters that may take them, the one whose source holds the fewest
    /// first (the earliest among equals); waiters that gave up are skipped.
    fn hand_on(self: &Arc<Self>, state: &mut State, now: Instant) {
        let active = state.active(now);
        loop {
            let next = state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| self.may_take(state, w.holder.source, active))
                .min_by_key(|(index, w)| (state.source_held(w.holder.source), *index))
                .map(|(index, _)| index);
            let Some(waiter) = next.and_then(|index| state.waiting.remove(index)) else {
                return;
            };
            if let Some(source) = state.sources.get_mut(&waiter.holder.source) {
                source.waiting = source.waiting.saturating_sub(1);
            }
            let slot = self.grant(state, waiter.holder);
            if let Err(mut slot) = waiter.grant.send(slot) {
                // Undone here: dropping it armed would take this lock again.
                slot.armed = false;
                state.forget_one(waiter.holder);
                state.in_use -= 1;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is a few counter updates that cannot panic halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn touch(&mut self, source: Source, now: Instant) {
        self.sources
            .entry(source)
            .and_modify(|s| s.last = now)
            .or_insert(SourceState {
                held: 0,
                waiting: 0,
                last: now,
            });
    }

    fn source_held(&self, source: Source) -> usize {
        self.sources.get(&source).map_or(0, |s| s.held)
    }

    /// Sources holding, waiting, or seen in the last [`ACTIVE_WINDOW`].
    fn active(&self, now: Instant) -> usize {
        self.sources.values().filter(|s| s.is_active(now)).count()
    }

    fn forget_one(&mut self, holder: Holder) {
        if let Some(count) = self.held.get_mut(&holder.connection) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&holder.connection);
            }
        }
        if let Some(source) = self.sources.get_mut(&holder.source) {
            source.held = source.held.saturating_sub(1);
        }
    }

    /// Now and then, forgets waiters that gave up and sources no longer active, so the
    /// tables hold only what matters now.
    fn prune(&mut self, now: Instant) {
        const EVERY: Duration = Duration::from_millis(100);
        if self
            .pruned
            .is_some_and(|last| now.saturating_duration_since(last) < EVERY)
        {
            return;
        }
        self.pruned = Some(now);
        let sources = &mut self.sources;
        self.waiting.retain(|w| {
            let live = !w.grant.is_closed();
            if !live && let Some(source) = sources.get_mut(&w.holder.source) {
                source.waiting = source.waiting.saturating_sub(1);
            }
            live
        });
        self.sources.retain(|_, s| s.is_active(now));
    }
}

impl SourceState {
    fn is_active(&self, now: Instant) -> bool {
        self.held > 0
            || self.waiting > 0
            || now.saturating_duration_since(self.last) < ACTIVE_WINDOW
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    /// Connection `connection` from 127.0.0.`source`.
    fn holder(connection: usize, source: u8) -> Holder {
        Holder {
            connection,
            source: Source::of(SocketAddr::from((Ipv4Addr::new(127, 0, 0, source), 1))),
        }
    }

    fn granted(admission: Admission) -> Slot {
        match admission {
            Admission::Granted(slot) => slot,
            other => panic!("expected a slot, got {other:?}"),
        }
    }

    #[test]
    fn one_connection_cannot_take_more_than_an_eighth() {
        let slots = Slots::new(1024, 16);
        let t = Instant::now();
        assert_eq!(slots.per_holder(), 128);
        // Four connections of one client, each asking for 256.
        let mut held = Vec::new();
        for connection in 0..4 {
            let mut refused = 0;
            for _ in 0..256 {
                match slots.acquire(holder(connection, 1), t) {
                    Admission::Granted(slot) => held.push(slot),
                    Admission::Refused => refused += 1,
                    Admission::Wait(_) => panic!("must not wait while slots are free"),
                }
            }
            assert_eq!(refused, 128);
        }
        assert_eq!(slots.in_use(), 512);
        // Another client still gets a slot at once.
        let _slot = granted(slots.acquire(holder(99, 2), t));
        assert_eq!(Slots::new(8, 16).per_holder(), 8);
    }

    #[test]
    fn when_full_released_slots_go_to_the_source_below_its_share() {
        let slots = Slots::new(32, 0);
        let t = Instant::now();
        assert_eq!(slots.per_holder(), 16);
        let mut a: Vec<Slot> = (0..16)
            .map(|_| granted(slots.acquire(holder(1, 1), t)))
            .collect();
        let _b: Vec<Slot> = (0..16)
            .map(|_| granted(slots.acquire(holder(2, 2), t)))
            .collect();
        // Full: a third source (share 11) waits; the first ones (at 16) are refused.
        let Admission::Wait(mut waiting) = slots.acquire(holder(3, 3), t) else {
            panic!("expected to wait")
        };
        assert!(matches!(slots.acquire(holder(4, 1), t), Admission::Refused));
        assert!(waiting.try_recv().is_err());
        drop(a.pop());
        let slot = waiting
            .try_recv()
            .expect("the released slot was handed over");
        assert_eq!(slot.holder, holder(3, 3));
        assert_eq!(slots.in_use(), 32);
        drop(slot);
        assert_eq!(slots.in_use(), 31);
    }

    #[test]
    fn a_waiter_that_gave_up_does_not_leak_the_slot() {
        let slots = Slots::new(16, 0);
        let t = Instant::now();
        let mut a: Vec<Slot> = (0..16)
            .map(|_| granted(slots.acquire(holder(1, 1), t)))
            .collect();
        let Admission::Wait(gone) = slots.acquire(holder(2, 2), t) else {
            panic!("expected to wait")
        };
        let Admission::Wait(mut stays) = slots.acquire(holder(3, 3), t) else {
            panic!("expected to wait")
        };
        drop(gone);
        drop(a.pop());
        assert_eq!(stays.try_recv().unwrap().holder, holder(3, 3));
        drop(a);
        assert_eq!(slots.in_use(), 0);
        let Admission::Wait(late) = ({
            let full: Vec<Slot> = (0..16)
                .map(|_| granted(slots.acquire(holder(4, 4), t)))
                .collect();
            let waiting = slots.acquire(holder(5, 5), t);
            drop(full);
            waiting
        }) else {
            panic!("expected to wait")
        };
        // The slot sent to a receiver that is dropped unread is released with it.
        drop(late);
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn a_lone_source_is_never_capped() {
        let slots = Slots::new(1024, 16);
        let t = Instant::now();
        let held: Vec<Slot> = (0..4)
            .flat_map(|connection| (0..100).map(move |_| holder(connection, 1)))
            .map(|h| granted(slots.acquire(h, t)))
            .collect();
        assert_eq!(held.len(), 400);
    }

    #[test]
    fn on_a_contended_exit_a_flooding_source_keeps_its_fair_part_and_waits() {
        let slots = Slots::new(1024, 16);
        let t = Instant::now();
        let (good, flood) = (holder(1, 1), holder(2, 2));
        let mut good_held = vec![granted(slots.acquire(good, t))];
        // The flood takes free slots until 16 are in flight, then waits.
        let mut flood_held = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..100 {
            match slots.acquire(flood, t) {
                Admission::Granted(slot) => flood_held.push(slot),
                Admission::Wait(receiver) => waiting.push(receiver),
                Admission::Refused => panic!("a flood below the exit's size waits"),
            }
        }
        assert_eq!(flood_held.len(), 15);
        assert_eq!(waiting.len(), 85);
        // The other source still takes slots at once, below its part (16 / 2).
        good_held.extend((0..4).map(|_| granted(slots.acquire(good, t))));
        assert_eq!(slots.in_use(), 20);
        // The flood's releases do not go to its waiters while the exit is contended and it
        // holds more than its part...
        drop(flood_held.pop());
        assert!(waiting.iter_mut().all(|w| w.try_recv().is_err()));
        // ...and when the other source leaves, the flood's waiters fill the exit up to the
        // contended level only, earliest first.
        drop(good_held);
        let handed: Vec<usize> = waiting
            .iter_mut()
            .enumerate()
            .filter_map(|(index, w)| {
                w.try_recv()
                    .ok()
                    .map(|slot| flood_held.push(slot))
                    .map(|()| index)
            })
            .collect();
        assert_eq!(handed, [0, 1]);
        assert_eq!(slots.in_use(), 16);
        // Once the other source has been gone a while, the flood is alone and uncapped.
        let later = t + ACTIVE_WINDOW + Duration::from_secs(60);
        let _more: Vec<Slot> = (0..20)
            .map(|_| granted(slots.acquire(holder(3, 2), later)))
            .collect();
    }
}

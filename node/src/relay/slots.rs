//! Fair sharing of one exit's concurrent stream slots among the client connections that use
//! it. An exit serves at most as many streams at once as its descriptor says (`max_streams`);
//! without sharing, one client with a few connections could hold every slot and starve
//! everyone else. Three rules:
//!
//! - a client connection never holds more than an eighth of the exit's slots (at least 16);
//! - while slots are free and nobody waits, a request takes one at once;
//! - when the exit is full, a connection below its fair share (the slots divided by the
//!   connections holding or waiting) waits for the next slot released, and released slots go
//!   to the waiting connection that holds the fewest; a connection at or above its share is
//!   refused at once (`Overloaded`), so its own releases go to the others.
//!
//! Pure bookkeeping: the caller bounds the wait (the receiver of [`Admission::Wait`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;

/// Who holds slots: a client connection (its QUIC stable id).
pub(crate) type Holder = usize;

/// The smallest per-connection cap, so a small exit is still usable by one busy client.
const MIN_PER_HOLDER: usize = 16;
/// A connection holds at most this fraction of an exit's slots.
const PER_HOLDER_DIVISOR: usize = 8;

/// One exit's slots.
#[derive(Debug)]
pub(crate) struct Slots {
    capacity: usize,
    per_holder: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_use: usize,
    held: HashMap<Holder, usize>,
    waiting: VecDeque<Waiter>,
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
    /// The exit is full and the connection is below its share: a slot arrives on this
    /// receiver when one is released. Dropping the receiver gives up (a slot already sent is
    /// released again).
    Wait(oneshot::Receiver<Slot>),
    /// The connection already holds its share: answer `Overloaded`.
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
            self.slots.release(self.holder);
        }
    }
}

impl Slots {
    /// Slots for an exit that serves `capacity` streams at once.
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            capacity,
            per_holder: (capacity / PER_HOLDER_DIVISOR)
                .max(MIN_PER_HOLDER)
                .min(capacity),
            state: Mutex::default(),
        })
    }

    /// Most slots one connection may hold.
    #[cfg(test)]
    fn per_holder(&self) -> usize {
        self.per_holder
    }

    /// Asks for a slot for `holder`.
    pub(crate) fn acquire(self: &Arc<Self>, holder: Holder) -> Admission {
        let mut state = self.lock();
        let held = state.held.get(&holder).copied().unwrap_or(0);
        if held >= self.per_holder {
            return Admission::Refused;
        }
        if state.in_use < self.capacity && state.waiting.is_empty() {
            return Admission::Granted(self.grant(&mut state, holder));
        }
        if held >= self.fair_share(&state, holder) {
            return Admission::Refused;
        }
        if state.in_use < self.capacity {
            return Admission::Granted(self.grant(&mut state, holder));
        }
        let (grant, receiver) = oneshot::channel();
        state.waiting.push_back(Waiter { holder, grant });
        Admission::Wait(receiver)
    }

    /// Slots in use (for tests and status).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.lock().in_use
    }

    fn grant(self: &Arc<Self>, state: &mut State, holder: Holder) -> Slot {
        state.in_use += 1;
        *state.held.entry(holder).or_insert(0) += 1;
        Slot {
            slots: Arc::clone(self),
            holder,
            armed: true,
        }
    }

    /// The slots divided among the connections holding or waiting, `holder` included.
    fn fair_share(&self, state: &State, holder: Holder) -> usize {
        let mut contenders: Vec<Holder> = state.held.keys().copied().collect();
        contenders.extend(state.waiting.iter().map(|w| w.holder));
        contenders.push(holder);
        contenders.sort_unstable();
        contenders.dedup();
        self.capacity.div_ceil(contenders.len().max(1))
    }

    fn release(self: &Arc<Self>, holder: Holder) {
        let mut state = self.lock();
        forget_one(&mut state, holder);
        // Hand the slot on to the waiter whose connection holds the fewest (the earliest among
        // equals); waiters that gave up are skipped.
        loop {
            let next = state
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(index, w)| (state.held.get(&w.holder).copied().unwrap_or(0), *index))
                .map(|(index, _)| index);
            let Some(waiter) = next.and_then(|index| state.waiting.remove(index)) else {
                state.in_use -= 1;
                return;
            };
            *state.held.entry(waiter.holder).or_insert(0) += 1;
            let slot = Slot {
                slots: Arc::clone(self),
                holder: waiter.holder,
                armed: true,
            };
            match waiter.grant.send(slot) {
                Ok(()) => return,
                Err(mut slot) => {
                    // Undone here: dropping it armed would take this lock again.
                    slot.armed = false;
                    forget_one(&mut state, waiter.holder);
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is a few counter updates that cannot panic halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn forget_one(state: &mut State, holder: Holder) {
    if let Some(count) = state.held.get_mut(&holder) {
        *count -= 1;
        if *count == 0 {
            state.held.remove(&holder);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn granted(admission: Admission) -> Slot {
        match admission {
            Admission::Granted(slot) => slot,
            other => panic!("expected a slot, got {other:?}"),
        }
    }

    #[test]
    fn one_connection_cannot_take_more_than_an_eighth() {
        let slots = Slots::new(1024);
        assert_eq!(slots.per_holder(), 128);
        // Four connections of one client, each asking for 256.
        let mut held = Vec::new();
        for holder in 0..4 {
            let mut refused = 0;
            for _ in 0..256 {
                match slots.acquire(holder) {
                    Admission::Granted(slot) => held.push(slot),
                    Admission::Refused => refused += 1,
                    Admission::Wait(_) => panic!("must not wait while slots are free"),
                }
            }
            assert_eq!(refused, 128);
        }
        assert_eq!(slots.in_use(), 512);
        // Another client still gets a slot at once.
        let _slot = granted(slots.acquire(99));
        assert_eq!(Slots::new(8).per_holder(), 8);
    }

    #[test]
    fn when_full_released_slots_go_to_the_connection_below_its_share() {
        let slots = Slots::new(32);
        assert_eq!(slots.per_holder(), 16);
        let mut a: Vec<Slot> = (0..16).map(|_| granted(slots.acquire(1))).collect();
        let _b: Vec<Slot> = (0..16).map(|_| granted(slots.acquire(2))).collect();
        // Full: a third connection (share 11) waits; the first ones (at 16) are refused.
        let Admission::Wait(mut waiting) = slots.acquire(3) else {
            panic!("expected to wait")
        };
        assert!(matches!(slots.acquire(1), Admission::Refused));
        assert!(waiting.try_recv().is_err());
        drop(a.pop());
        let slot = waiting
            .try_recv()
            .expect("the released slot was handed over");
        assert_eq!(slot.holder, 3);
        assert_eq!(slots.in_use(), 32);
        drop(slot);
        assert_eq!(slots.in_use(), 31);
    }

    #[test]
    fn a_waiter_that_gave_up_does_not_leak_the_slot() {
        let slots = Slots::new(16);
        let mut a: Vec<Slot> = (0..16).map(|_| granted(slots.acquire(1))).collect();
        let Admission::Wait(gone) = slots.acquire(2) else {
            panic!("expected to wait")
        };
        let Admission::Wait(mut stays) = slots.acquire(3) else {
            panic!("expected to wait")
        };
        drop(gone);
        drop(a.pop());
        assert_eq!(stays.try_recv().unwrap().holder, 3);
        drop(a);
        assert_eq!(slots.in_use(), 0);
        let Admission::Wait(late) = ({
            let full: Vec<Slot> = (0..16).map(|_| granted(slots.acquire(4))).collect();
            let waiting = slots.acquire(5);
            drop(full);
            waiting
        }) else {
            panic!("expected to wait")
        };
        // The slot sent to a receiver that is dropped unread is released with it.
        drop(late);
        assert_eq!(slots.in_use(), 0);
    }
}

//! The exit-wide budget of answer bytes held in memory. A single-message (RFC 9458) answer is
//! one AEAD seal, so the exit holds it whole until the relay has taken it; a client that
//! never reads keeps it held until the write stall timeout. The budget bounds what all such
//! answers hold together, whatever clients do: each answer draws its bytes before it keeps
//! them, waits a bounded time when the budget is spent, and gives them back when it is
//! written, refused or reset.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::Notify, time::Instant};

/// The first bytes of every answer may come from the whole budget; bytes beyond them only
/// while an eighth of the budget stays free ([`AnswerBudget::reserve`]). So large answers
/// (a stalled reader's among them) can never take the memory that keeps small answers, a
/// chat completion or an error, flowing.
pub(super) const SMALL_ANSWER: usize = 256 * 1024;

/// Why an answer could not draw more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the exit's answer budget ({limit} bytes) stayed spent for {waited:?}")]
pub(super) struct BudgetSpent {
    /// The budget in bytes.
    pub(super) limit: usize,
    /// How long the answer waited for bytes to be given back.
    pub(super) waited: Duration,
}

/// The budget, shared by every request stream of an exit (all its relays).
#[derive(Debug, Clone)]
pub(super) struct AnswerBudget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limit: usize,
    /// How long one answer may wait in all for bytes.
    wait: Duration,
    held: Mutex<usize>,
    given_back: Notify,
    gauge: Gauge,
    peak: Gauge,
}

impl AnswerBudget {
    /// A budget of `limit` bytes; an answer waits at most `wait` in all for bytes. `gauge`
    /// follows the bytes held, `peak` the most ever held.
    #[must_use]
    pub(super) fn new(limit: usize, wait: Duration, gauge: Gauge, peak: Gauge) -> Self {
        Self {
            shared: Arc::new(Shared {
                limit,
                wait,
                held: Mutex::new(0),
                given_back: Notify::new(),
                gauge,
                peak,
            }),
        }
    }

    /// The budget in bytes.
    #[must_use]
    #[cfg(test)]
    pub(super) fn limit(&self) -> usize {
        self.shared.limit
    }

    /// The part of the budget only the first [`SMALL_ANSWER`] bytes of answers may use.
    #[must_use]
    #[cfg(test)]
    pub(super) fn reserve(&self) -> usize {
        reserve_of(self.shared.limit)
    }

    /// Bytes held now.
    #[must_use]
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        *self.shared.lock()
    }

    /// An empty claim for one answer, grown as its bytes arrive.
    #[must_use]
    pub(super) fn claim(&self) -> Claim {
        Claim {
            shared: Arc::clone(&self.shared),
            bytes: 0,
            deadline: None,
        }
    }
}

/// The reserve kept for small answers out of a budget of `limit` bytes.
#[must_use]
pub(super) const fn reserve_of(limit: usize) -> usize {
    limit / 8
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `more` bytes for an answer already holding `already`, if they fit.
    fn try_take(&self, already: usize, more: usize) -> bool {
        let mut held = self.lock();
        let Some(after) = held.checked_add(more) else {
            return false;
        };
        let beyond_small = already.saturating_add(more) > SMALL_ANSWER;
        let ceiling = if beyond_small {
            self.limit - reserve_of(self.limit)
        } else {
            self.limit
        };
        if after > ceiling {
            return false;
        }
        *held = after;
        set(&self.gauge, after);
        if i64::try_from(after).unwrap_or(i64::MAX) > self.peak.get() {
            set(&self.peak, after);
        }
        true
    }

    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut held = self.lock();
        *held = held.saturating_sub(bytes);
        set(&self.gauge, *held);
        drop(held);
        self.given_back.notify_waiters();
    }
}

fn set(gauge: &Gauge, bytes: usize) {
    gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// The bytes one answer holds; given back when dropped.
#[derive(Debug)]
pub(super) struct Claim {
    shared: Arc<Shared>,
    bytes: usize,
    /// Set at the first wait: the waits of one answer add up to the budget's `wait`.
    deadline: Option<Instant>,
}

impl Claim {
    /// Draws `more` bytes, waiting for other answers to give bytes back when the budget is
    /// spent; fails once this answer has waited the budget's `wait` in all.
    pub(super) async fn grow(&mut self, more: usize) -> Result<(), BudgetSpent> {
        loop {
            // Registered before the check, so bytes given back in between are not missed.
            let given_back = self.shared.given_back.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            if self.shared.try_take(self.bytes, more) {
                self.bytes += more;
                return Ok(());
            }
            let deadline = *self
                .deadline
                .get_or_insert_with(|| Instant::now() + self.shared.wait);
            if tokio::time::timeout_at(deadline, given_back).await.is_err() {
                return Err(BudgetSpent {
                    limit: self.shared.limit,
                    waited: self.shared.wait,
                });
            }
        }
    }

    /// Bytes held by this answer.
    #[must_use]
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back up to `bytes` of what this answer holds.
    pub(super) fn give_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.shared.give_back(bytes);
    }

    /// Gives back everything held.
    pub(super) fn release(&mut self) {
        self.give_back(self.bytes);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize, wait: Duration) -> AnswerBudget {
        AnswerBudget::new(limit, wait, Gauge::default(), Gauge::default())
    }

    #[tokio::test]
    async fn an_answer_beyond_the_budget_waits_then_fails_and_holds_nothing() {
        let budget = budget(8 << 20, Duration::from_millis(20));
        let mut big = budget.claim();
        big.grow(7 << 20).await.unwrap();
        let mut other = budget.claim();
        let spent = other.grow(1 << 20).await.unwrap_err();
        assert_eq!(spent.limit, 8 << 20);
        assert_eq!(budget.held(), 7 << 20);
        drop(other);
        drop(big);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.shared.peak.get(), 7 << 20);
        assert_eq!(budget.shared.gauge.get(), 0);
    }

    #[tokio::test]
    async fn bytes_given_back_wake_a_waiting_answer() {
        let budget = budget(8 << 20, Duration::from_secs(3600));
        let mut first = budget.claim();
        first.grow(7 << 20).await.unwrap();
        let (waiting_tx, waiting) = tokio::sync::oneshot::channel();
        let second = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut second = budget.claim();
                let _ = waiting_tx.send(());
                second.grow(1 << 20).await.map(|()| second.bytes())
            })
        };
        waiting.await.unwrap();
        assert_eq!(budget.held(), 7 << 20, "the large tier is full");
        first.release();
        assert_eq!(second.await.unwrap(), Ok(1 << 20));
    }

    #[tokio::test]
    async fn large_answers_leave_the_reserve_to_small_ones() {
        let limit = 8 << 20;
        let budget = budget(limit, Duration::from_millis(10));
        let mut large = budget.claim();
        large.grow(limit - budget.reserve()).await.unwrap();
        // More for the large answer: refused, though the reserve is free.
        assert!(large.grow(1).await.is_err());
        // Small answers still get bytes, up to the whole budget.
        let mut smalls = Vec::new();
        for _ in 0..budget.reserve() / SMALL_ANSWER {
            let mut small = budget.claim();
            small.grow(SMALL_ANSWER).await.unwrap();
            smalls.push(small);
        }
        assert_eq!(budget.held(), limit);
        assert!(
            budget.claim().grow(1).await.is_err(),
            "never beyond the limit"
        );
    }
}

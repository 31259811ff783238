//! Leader election over a `coordination.k8s.io/v1` Lease, so two operator replicas never both
//! act. Every write carries the resourceVersion it read (optimistic concurrency): of two
//! replicas racing for an expired lease, exactly one write succeeds. Another holder's lease is
//! judged expired by this replica's own monotonic clock (how long since it last saw the lease
//! change), never by comparing the holder's `renewTime` with the local wall clock, so clock skew
//! between nodes cannot make two leaders. Every API call has a timeout, and a leader that cannot
//! renew within the renew deadline stops acting; a leader that shuts down releases the lease so
//! a standby takes over at once.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lease timing, as client-go's leader election names it. Built by [`LeaseTiming::new`], which
/// refuses timings under which a leader could act after its lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a lease is valid after its last renewal, written into the Lease
    /// (`leaseDurationSeconds`, whole seconds, at least 1). Standbys wait this long, on their
    /// own clock, after the lease last changed before taking it. Default 15 s.
    duration: Duration,
    /// How long the leader keeps acting without a successful renewal; then it stops (and the
    /// process exits to re-enter the election). Shorter than `duration`, so the leader stops
    /// before a standby may take over. Default 10 s.
    renew_deadline: Duration,
    /// How often the leader renews and standbys retry. Shorter than `renew_deadline`, so a
    /// leader gets several tries before its deadline. Default 2 s.
    retry_period: Duration,
}

/// Why lease timings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseTimingError {
    /// The lease duration is not a whole number of seconds between 1 and i32::MAX.
    #[error("the lease duration must be a whole number of seconds, at least 1 (got {0:?})")]
    Duration(Duration),
    /// The renew deadline is not shorter than the lease duration.
    #[error(
        "the renew deadline ({deadline:?}) must be shorter than the lease duration ({duration:?})"
    )]
    Deadline {
        /// The renew deadline given.
        deadline: Duration,
        /// The lease duration given.
        duration: Duration,
    },
    /// The retry period is zero or not shorter than the renew deadline.
    #[error(
        "the retry period ({retry:?}) must be above zero and shorter than the renew deadline ({deadline:?})"
    )]
    Retry {
        /// The retry period given.
        retry: Duration,
        /// The renew deadline given.
        deadline: Duration,
    },
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTiming {
    /// Checked timings: `retry_period < renew_deadline < duration`, `duration` in whole seconds.
    pub fn new(
        duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, LeaseTimingError> {
        if duration.subsec_nanos() != 0
            || duration.is_zero()
            || i32::try_from(duration.as_secs()).is_err()
        {
            return Err(LeaseTimingError::Duration(duration));
        }
        if renew_deadline >= duration {
            return Err(LeaseTimingError::Deadline {
                deadline: renew_deadline,
                duration,
            });
        }
        if retry_period.is_zero() || retry_period >= renew_deadline {
            return Err(LeaseTimingError::Retry {
                retry: retry_period,
                deadline: renew_deadline,
            });
        }
        Ok(Self {
            duration,
            renew_deadline,
            retry_period,
        })
    }

    /// The lease duration.
    #[must_use]
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The renew deadline.
    #[must_use]
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// The retry period.
    #[must_use]
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }

    /// The timeout of one API call (a read or a write of the lease): half the renew deadline,
    /// so one attempt (a read and a write) fits in it.
    #[must_use]
    pub fn call_timeout(&self) -> Duration {
        self.renew_deadline / 2
    }

    fn duration_seconds(&self) -> i32 {
        // `new` checked that it fits; the default does.
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The API call did not answer within the call timeout.
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

/// What a lease looks like to a candidate at some instant.
#[derive(Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody holds it, or the holder let it expire.
    Free,
    /// This candidate holds it.
    Us,
    /// Another candidate holds it.
    Other(String),
}

/// The last version of another holder's lease this replica saw, and when (its own clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    holder: String,
    renew_time: Option<MicroTime>,
    seen_at: Instant,
}

/// Judges leases by what this replica saw and when: a lease held by another is expired once it
/// has not changed (holder or renewTime) for its `leaseDurationSeconds` of local monotonic time.
/// The remote timestamps are compared only for equality, never with the local clock. Pure (the
/// time is passed in), so the rules are unit-tested with made-up instants.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<Observation>,
}

impl Observer {
    /// Who holds `lease` at `now`, as seen by `identity`, remembering the lease's state.
    pub fn judge(&mut self, lease: &Lease, identity: &str, now: Instant) -> Holder {
        let Some(spec) = &lease.spec else {
            self.last = None;
            return Holder::Free;
        };
        let Some(who) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
            self.last = None;
            return Holder::Free;
        };
        if who == identity {
            self.last = None;
            return Holder::Us;
        }
        let renew_time = spec.renew_time.clone().or(spec.acquire_time.clone());
        let changed = self
            .last
            .as_ref()
            .is_none_or(|last| last.holder != who || last.renew_time != renew_time);
        if changed {
            self.last = Some(Observation {
                holder: who.to_owned(),
                renew_time,
                seen_at: now,
            });
        }
        let seconds = spec.lease_duration_seconds.unwrap_or(15).max(1);
        let duration = Duration::from_secs(u64::from(seconds.unsigned_abs()));
        let unchanged_for = self.last.as_ref().map_or(Duration::ZERO, |last| {
            now.saturating_duration_since(last.seen_at)
        });
        if unchanged_for >= duration {
            Holder::Free
        } else {
            Holder::Other(who.to_owned())
        }
    }
}

/// One candidate for leadership.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observer: Arc<Mutex<Observer>>,
}

impl Elector {
    /// A candidate named `identity` (e.g. the pod name) for the Lease `name` in `api`'s namespace.
    #[must_use]
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observer: Arc::new(Mutex::new(Observer::default())),
        }
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        // The timestamps are informative for people (and other tools); this code never compares
        // them with a clock.
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.duration_seconds()),
            acquire_time: Some(acquire_time.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Runs one API call with the call timeout.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        let limit = self.timing.call_timeout();
        match tokio::time::timeout(limit, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(LeaseError::Timeout(limit)),
        }
    }

    fn judge(&self, lease: &Lease) -> Holder {
        let now = Instant::now();
        match self.observer.lock() {
            Ok(mut observer) => observer.judge(lease, &self.identity, now),
            // A panic elsewhere while judging: start observing afresh (the safe direction: a
            // fresh observation waits a whole lease duration).
            Err(poisoned) => {
                let mut observer = poisoned.into_inner();
                *observer = Observer::default();
                observer.judge(lease, &self.identity, now)
            }
        }
    }

    /// One attempt to take or renew the lease. `Ok(true)` when this candidate now holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        let Some(current) = self.call(self.api.get_opt(&self.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self
                .call(self.api.create(&PostParams::default(), &lease))
                .await
            {
                Ok(_) => Ok(true),
                Err(LeaseError::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let previous = current.spec.clone().unwrap_or_default();
        let (acquire_time, transitions) = match self.judge(&current) {
            Holder::Other(_) => return Ok(false),
            Holder::Us => (
                previous.acquire_time,
                previous.lease_transitions.unwrap_or(0),
            ),
            Holder::Free => (
                None,
                previous.lease_transitions.unwrap_or(0).saturating_add(1),
            ),
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(acquire_time, transitions));
        match self
            .call(self.api.replace(&self.name, &PostParams::default(), &next))
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote in between: they won this round.
            Err(LeaseError::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this candidate holds the lease (`true`) or `cancel` fires (`false`).
    pub async fn acquire(&self, cancel: &CancellationToken) -> bool {
        let mut tick = tokio::time::interval(self.timing.retry_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return false,
                _ = tick.tick() => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, lease = %self.name, "leader election: cannot read or write the lease")
                }
            }
        }
    }

    /// Renews the lease every retry period until `cancel` fires (returns `true`) or no renewal
    /// succeeded within the renew deadline (returns `false`: stop acting, since a standby may
    /// take over once the lease duration has passed). An attempt still running at the deadline
    /// is abandoned, so a hanging API call cannot keep this replica acting past it.
    pub async fn hold(&self, cancel: &CancellationToken) -> bool {
        let mut tick = tokio::time::interval(self.timing.retry_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = Instant::now() + self.timing.renew_deadline;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return true,
                _ = tick.tick() => {}
            }
            let attempt = tokio::select! {
                () = cancel.cancelled() => return true,
                attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()) => attempt,
            };
            match attempt {
                Ok(Ok(true)) => deadline = Instant::now() + self.timing.renew_deadline,
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %self.name, "leader election: the lease was taken over");
                    return false;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, lease = %self.name, "leader election: renewing failed")
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    lease = %self.name,
                    deadline = ?self.timing.renew_deadline,
                    "leader election: no renewal within the renew deadline"
                );
                return false;
            }
        }
    }

    /// Gives the lease up (if still ours) so a standby can take over without waiting.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.call(self.api.get_opt(&self.name)).await? else {
            return Ok(());
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
        }
        match self
            .call(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
        {
            Ok(_) => Ok(()),
            Err(LeaseError::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: &str, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(secs),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                ..Default::default()
            }),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_lease_renewed_long_ago_by_the_remote_clock_is_still_held_when_first_seen() {
        // The holder's clock is a year behind ours: its renewTime says nothing about expiry.
        let t0 = Instant::now();
        let mut observer = Observer::default();
        let old = lease(Some("a"), "2000-01-01T00:00:00Z", 15);
        assert_eq!(observer.judge(&old, "b", t0), Holder::Other("a".into()));
        assert_eq!(
            observer.judge(&old, "b", t0 + S(14)),
            Holder::Other("a".into())
        );
        // Unchanged for a whole lease duration of our own time: expired.
        assert_eq!(observer.judge(&old, "b", t0 + S(15)), Holder::Free);
    }

    #[test]
    fn a_lease_renewed_in_the_future_by_the_remote_clock_still_expires() {
        // The holder's clock is a year ahead: a wall-clock comparison would never expire it.
        let t0 = Instant::now();
        let mut observer = Observer::default();
        let ahead = lease(Some("a"), "2100-01-01T00:00:00Z", 5);
        assert_eq!(observer.judge(&ahead, "b", t0), Holder::Other("a".into()));
        assert_eq!(observer.judge(&ahead, "b", t0 + S(5)), Holder::Free);
    }

    #[test]
    fn a_renewal_or_a_new_holder_restarts_the_local_count() {
        let t0 = Instant::now();
        let mut observer = Observer::default();
        let first = lease(Some("a"), "2024-01-01T00:00:00Z", 10);
        let renewed = lease(Some("a"), "2024-01-01T00:00:02Z", 10);
        let other = lease(Some("c"), "2024-01-01T00:00:02Z", 10);
        assert_eq!(observer.judge(&first, "b", t0), Holder::Other("a".into()));
        assert_eq!(
            observer.judge(&renewed, "b", t0 + S(8)),
            Holder::Other("a".into())
        );
        // 12 s after the first sight but only 4 s after the renewal: still held.
        assert_eq!(
            observer.judge(&renewed, "b", t0 + S(12)),
            Holder::Other("a".into())
        );
        assert_eq!(observer.judge(&renewed, "b", t0 + S(18)), Holder::Free);
        // A new holder with the same renewTime is a change too.
        assert_eq!(
            observer.judge(&other, "b", t0 + S(19)),
            Holder::Other("c".into())
        );
        assert_eq!(
            observer.judge(&other, "b", t0 + S(28)),
            Holder::Other("c".into())
        );
        assert_eq!(observer.judge(&other, "b", t0 + S(29)), Holder::Free);
    }

    #[test]
    fn our_own_and_released_leases() {
        let t0 = Instant::now();
        let mut observer = Observer::default();
        assert_eq!(
            observer.judge(&lease(Some("a"), "2024-01-01T00:00:00Z", 5), "a", t0),
            Holder::Us
        );
        assert_eq!(
            observer.judge(&lease(None, "2024-01-01T00:00:09Z", 15), "b", t0),
            Holder::Free,
            "released"
        );
        assert_eq!(
            observer.judge(&lease(Some(""), "2024-01-01T00:00:09Z", 15), "b", t0),
            Holder::Free,
            "empty holder"
        );
        assert_eq!(observer.judge(&Lease::default(), "b", t0), Holder::Free);
        // After a release, a new holder is watched from scratch.
        let held = lease(Some("a"), "2024-01-01T00:00:00Z", 5);
        assert_eq!(
            observer.judge(&held, "b", t0 + S(100)),
            Holder::Other("a".into())
        );
    }

    #[test]
    fn timings_that_could_make_two_leaders_are_refused() {
        assert_eq!(
            LeaseTiming::new(S(15), S(10), S(2)).unwrap(),
            LeaseTiming::default()
        );
        assert_eq!(LeaseTiming::default().call_timeout(), S(5));
        assert!(matches!(
            LeaseTiming::new(S(10), S(10), S(2)),
            Err(LeaseTimingError::Deadline { .. })
        ));
        assert!(matches!(
            LeaseTiming::new(S(15), S(10), S(10)),
            Err(LeaseTimingError::Retry { .. })
        ));
        assert!(matches!(
            LeaseTiming::new(S(15), S(10), Duration::ZERO),
            Err(LeaseTimingError::Retry { .. })
        ));
        assert!(matches!(
            LeaseTiming::new(
                Duration::from_millis(1500),
                S(1),
                Duration::from_millis(200)
            ),
            Err(LeaseTimingError::Duration(_))
        ));
        assert!(matches!(
            LeaseTiming::new(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            Err(LeaseTimingError::Duration(_))
        ));
    }
}

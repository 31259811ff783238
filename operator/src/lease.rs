//! Leader election over a `coordination.k8s.io/v1` Lease, so two operator replicas never both
//! act. Every write carries the resourceVersion it read (optimistic concurrency): of two
//! replicas racing for an expired lease, exactly one write succeeds. A leader that cannot renew
//! before its lease would expire stops acting; a leader that shuts down releases the lease so a
//! standby takes over at once.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio_util::sync::CancellationToken;

/// Lease timing.
#[derive(Debug, Clone)]
pub struct LeaseTiming {
    /// How long a lease is valid after its last renewal.
    pub duration: Duration,
    /// How often the leader renews (and standbys retry).
    pub renew_every: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
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

/// Who holds `lease` at `now`, as seen by `identity`. Pure, so the rules are unit-tested.
#[must_use]
pub fn holder(lease: &Lease, identity: &str, now: Timestamp) -> Holder {
    let Some(spec) = &lease.spec else {
        return Holder::Free;
    };
    let Some(who) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
        return Holder::Free;
    };
    if who == identity {
        return Holder::Us;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(at) if at.checked_add(duration).is_ok_and(|end| end > now) => {
            Holder::Other(who.to_owned())
        }
        _ => Holder::Free,
    }
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
        }
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timing.duration.as_secs()).unwrap_or(15),
            ),
            acquire_time: Some(acquire_time.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease. `Ok(true)` when this candidate now holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let previous = current.spec.clone().unwrap_or_default();
        let (acquire_time, transitions) = match holder(&current, &self.identity, Timestamp::now()) {
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
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote in between: they won this round.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this candidate holds the lease (`true`) or `cancel` fires (`false`).
    pub async fn acquire(&self, cancel: &CancellationToken) -> bool {
        let mut tick = tokio::time::interval(self.timing.renew_every);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return false,
                _ = tick.tick() => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "leader election: cannot read or write the lease")
                }
            }
        }
    }

    /// Renews the lease until `cancel` fires (returns `true`) or renewing fails for longer than
    /// the lease lasts (returns `false`: another replica may be leader by now, so stop acting).
    pub async fn hold(&self, cancel: &CancellationToken) -> bool {
        let mut tick = tokio::time::interval(self.timing.renew_every);
        let mut last_renewed = tokio::time::Instant::now();
        // Stop a margin before expiry, so our last action happens while the lease is ours.
        let give_up = self
            .timing
            .duration
            .saturating_sub(self.timing.renew_every / 2);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return true,
                _ = tick.tick() => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!("leader election: the lease was taken over");
                    return false;
                }
                Err(error) => tracing::warn!(%error, "leader election: renewing failed"),
            }
            if last_renewed.elapsed() >= give_up {
                return false;
            }
        }
    }

    /// Gives the lease up (if still ours) so a standby can take over without waiting.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        if holder(&lease, &self.identity, Timestamp::now()) != Holder::Us {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
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

    #[test]
    fn holder_rules() {
        let now: Timestamp = "2024-01-01T00:00:10Z".parse().unwrap();
        assert_eq!(
            holder(&lease(Some("a"), "2024-01-01T00:00:00Z", 15), "b", now),
            Holder::Other("a".into())
        );
        assert_eq!(
            holder(&lease(Some("a"), "2024-01-01T00:00:00Z", 5), "b", now),
            Holder::Free,
            "expired"
        );
        assert_eq!(
            holder(&lease(Some("a"), "2024-01-01T00:00:00Z", 5), "a", now),
            Holder::Us
        );
        assert_eq!(
            holder(&lease(None, "2024-01-01T00:00:09Z", 15), "b", now),
            Holder::Free,
            "released"
        );
        assert_eq!(holder(&Lease::default(), "b", now), Holder::Free);
    }
}

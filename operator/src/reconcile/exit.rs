//! Reconciles one `TokenGoExit`: key Secret (one identity and keyring per replica, each
//! created once; every keyring rotated on schedule or on request, keeping the previous key),
//! relay resolution (a named relay, addresses, or DHT discovery left to the node), the
//! StatefulSet (replacing a Deployment an earlier operator version made), status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        core::v1::Secret,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
    jiff::Timestamp,
};
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{DeleteParams, PostParams},
    runtime::{controller::Action, events::EventType},
};

use super::{Context, ReconcileError, apply, ensure_secret, namespaced, object_key, write_status};
use crate::{
    keys::PublicKey,
    manifest::{
        MAX_NAME_LEN,
        exit::{self as desired, RelaySource},
        exit_keys::{ExitKeySet, KeySetError},
        key_secret_owners, relay as relay_manifest,
    },
    resource::{
        TokenGoExit, TokenGoExitStatus, TokenGoRelay,
        exit::{ExitDht, MAX_RELAYS, PublishedKey, ReplicaIdentity},
        shared::{ReadyReason, ready_condition},
    },
};

/// Most time between reconciles of a healthy exit (rotation is scheduled more precisely).
const RESYNC: Duration = Duration::from_secs(3600);
/// How soon to look again when the named relay is missing or has no identity yet, or the
/// previous version's Deployment is still going away (their own changes also trigger a
/// reconcile; this is the safety net).
const RELAY_WAIT: Duration = Duration::from_secs(60);

/// Brings the exit's children and status in line with its spec.
pub async fn reconcile(
    exit: Arc<TokenGoExit>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if exit.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the children; nothing to create.
        return Ok(Action::await_change());
    }
    let result = reconcile_inner(&exit, &ctx).await;
    ctx.metrics.reconciled("TokenGoExit", result.is_ok());
    if result.is_ok() {
        ctx.succeeded(&object_key(&*exit));
    }
    result
}

/// Name check, key Secret (created once, then read, completed and rotated), children,
/// status.
async fn reconcile_inner(exit: &TokenGoExit, ctx: &Context) -> Result<Action, ReconcileError> {
    let pass = Pass::new(exit, ctx)?;
    if exit.name_any().len() > MAX_NAME_LEN {
        pass.write_failure(
            ReadyReason::ReconcileFailed,
            format!("name longer than {MAX_NAME_LEN} characters: child names would not fit"),
        )
        .await?;
        return Ok(Action::await_change());
    }

    let (secret, keys) = pass.ensure_keys().await?;
    let mut keys = match keys {
        Ok(keys) => keys,
        Err(error) => return pass.report_invalid_keys(&error).await,
    };
    let interval = rotation_interval(exit);
    pass.complete_keys(&secret, &mut keys, interval).await?;
    let Some(first) = keys.get(0) else {
        // Not reached: complete_keys creates every ordinal below `replicas` (at least 1).
        // Should it be, the next pass re-reads the Secret.
        return Err(ReconcileError::Conflict(pass.secret_name.clone()));
    };
    let public = first.keyring.public_keys();
    // The identity only: a rotation reaches the pods through the mounted Secret, which they
    // follow, so it rolls no pod (a rolled single replica would drop its clients meanwhile).
    let deployed = pass
        .deploy_children(&crate::manifest::identity_hash(&first.peer_id))
        .await?;
    let next_rotation = keys.seconds_until_rotation(pass.now, interval);
    pass.write_status(TokenGoExitStatus {
        observed_generation: exit.metadata.generation,
        conditions: pass.condition(deployed.reason, deployed.message),
        peer_id: Some(first.peer_id.clone()),
        keys: published_keys(&public),
        identities: identities(exit, &keys),
        relays: deployed.relays,
        ready_replicas: deployed.ready,
    })
    .await?;
    let requeue = requeue_after(deployed.reason, next_rotation);
    Ok(Action::requeue(if deployed.replacing {
        requeue.min(RELAY_WAIT)
    } else {
        requeue
    }))
}

/// Every running ordinal's PeerId and keys (ordinals below `replicas`).
fn identities(exit: &TokenGoExit, keys: &ExitKeySet) -> Vec<ReplicaIdentity> {
    keys.iter()
        .filter(|(ordinal, _)| i64::from(*ordinal) < i64::from(exit.spec.replicas))
        .map(|(ordinal, k)| ReplicaIdentity {
            ordinal: i32::try_from(ordinal).unwrap_or(i32::MAX),
            peer_id: k.peer_id.clone(),
            keys: published_keys(&k.keyring.public_keys()),
        })
        .collect()
}

/// Where the exit's relays come from, once resolved.
enum Relays<'a> {
    Resolved(Vec<String>),
    /// The pods discover relays on this DHT themselves.
    Dht(&'a ExitDht),
    Unavailable(ReadyReason, String),
}

async fn resolve_relays<'a>(
    exit: &'a TokenGoExit,
    ctx: &Context,
) -> Result<Relays<'a>, ReconcileError> {
    let spec = &exit.spec.relay;
    if let Some(name) = &spec.name {
        let relays: Api<TokenGoRelay> = namespaced(&ctx.client, exit)?;
        let Some(relay) = relays.get_opt(name).await? else {
            return Ok(Relays::Unavailable(
                ReadyReason::RelayNotFound,
                format!("TokenGoRelay {name} does not exist in this namespace"),
            ));
        };
        let Some(peer_id) = relay.status.as_ref().and_then(|s| s.peer_id.clone()) else {
            return Ok(Relays::Unavailable(
                ReadyReason::RelayNotReady,
                format!("TokenGoRelay {name} has no identity yet"),
            ));
        };
        // The in-cluster headless name: exits run in the cluster, and the node registers
        // with every pod it resolves to.
        return Ok(Relays::Resolved(vec![relay_manifest::pods_address(
            &relay,
            &ctx.settings,
            &peer_id,
        )]));
    }
    if let Some(addresses) = spec.addresses.as_ref().filter(|a| !a.is_empty()) {
        return Ok(Relays::Resolved(
            addresses.iter().take(MAX_RELAYS).cloned().collect(),
        ));
    }
    // The schema's oneOf leaves `dht` as the only other source; an empty `addresses` list
    // (which the schema also rejects) falls back to discovery on the public DHT.
    Ok(Relays::Dht(spec.dht.as_ref().unwrap_or(&PUBLIC_DHT)))
}

/// DHT settings meaning the public DHT with the node's defaults.
static PUBLIC_DHT: ExitDht = ExitDht {
    bootstrap: Vec::new(),
    protocol: None,
    max_relays: None,
};

/// Ready replicas of a StatefulSet, and whether it has fully rolled out its current spec
/// (every pod of the current revision and ready).
pub(crate) fn stateful_set_rollout(set: &StatefulSet) -> (i32, bool) {
    let wanted = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = &set.status else {
        return (0, false);
    };
    let ready = status.ready_replicas.unwrap_or(0);
    let current = status.observed_generation.is_some()
        && status.observed_generation >= set.metadata.generation;
    let one_revision =
        status.update_revision.is_none() || status.current_revision == status.update_revision;
    let complete = current
        && one_revision
        && status.updated_replicas.unwrap_or(0) >= wanted
        && ready >= wanted;
    (ready, complete)
}

/// One reconciliation of one exit: the exit, and what its steps share.
struct Pass<'a> {
    exit: &'a TokenGoExit,
    ctx: &'a Context,
    /// For the exit's status.
    exits: Api<TokenGoExit>,
    /// For its key Secret.
    secrets: Api<Secret>,
    secret_name: String,
    /// Unix seconds: one clock reading for key creation and the rotation schedule.
    now: u64,
    /// The exit's `tokengo.io/rotate` annotation, if set.
    rotate_request: Option<String>,
}

/// What deploying the children found: the relays the status lists and the Ready condition.
struct Deployed {
    relays: Vec<String>,
    reason: ReadyReason,
    message: String,
    ready: i32,
    /// The previous version's Deployment is still going away (look again soon).
    replacing: bool,
}

impl<'a> Pass<'a> {
    fn new(exit: &'a TokenGoExit, ctx: &'a Context) -> Result<Self, ReconcileError> {
        Ok(Self {
            exit,
            ctx,
            exits: namespaced(&ctx.client, exit)?,
            secrets: namespaced(&ctx.client, exit)?,
            secret_name: desired::keys_secret_name(exit),
            now: Timestamp::now().as_second().max(0).unsigned_abs(),
            rotate_request: exit.annotations().get(desired::ROTATE_ANNOTATION).cloned(),
        })
    }

    /// The replica count as ordinals (at least 1).
    fn replicas(&self) -> u32 {
        u32::try_from(self.exit.spec.replicas).unwrap_or(1).max(1)
    }

    /// The Ready condition for `reason`, continuing the exit's previous one.
    fn condition(&self, reason: ReadyReason, message: String) -> Vec<Condition> {
        let previous = self
            .exit
            .status
            .as_ref()
            .map_or(&[][..], |s| &s.conditions[..]);
        vec![ready_condition(
            previous,
            reason,
            message,
            self.exit.metadata.generation,
            Timestamp::now(),
        )]
    }

    async fn write_status(&self, status: TokenGoExitStatus) -> Result<(), ReconcileError> {
        write_status(&self.exits, self.exit, self.exit.status.as_ref(), status).await
    }

    /// A status that is only the condition: nothing was deployed.
    async fn write_failure(
        &self,
        reason: ReadyReason,
        message: String,
    ) -> Result<(), ReconcileError> {
        self.write_status(TokenGoExitStatus {
            observed_generation: self.exit.metadata.generation,
            conditions: self.condition(reason, message),
            ..Default::default()
        })
        .await
    }

    /// The key Secret, created with an identity and keyring for every replica when absent,
    /// and the keys read from it.
    async fn ensure_keys(
        &self,
    ) -> Result<(Secret, Result<ExitKeySet, KeySetError>), ReconcileError> {
        let mut fresh = None;
        let (secret, created) = ensure_secret(&self.secrets, &self.secret_name, || {
            let mut keys = ExitKeySet::new();
            keys.fill(self.replicas(), self.now)?;
            // A rotation request present at creation is already satisfied by the fresh keys.
            let secret = desired::keys_secret(self.exit, &keys, self.rotate_request.as_deref());
            fresh = Some(keys);
            Ok(secret)
        })
        .await?;
        if created && let Some(keys) = fresh {
            let ordinals: Vec<u32> = keys.iter().map(|(o, _)| o).collect();
            self.report_keys_created(&keys, &ordinals).await;
            return Ok((secret, Ok(keys)));
        }
        let empty = Default::default();
        let keys = ExitKeySet::parse(secret.data.as_ref().unwrap_or(&empty));
        Ok((secret, keys))
    }

    /// A key Secret that does not parse is left alone (never replaced: a person must look);
    /// the exit is reported not Ready and looked at again after [`RESYNC`].
    async fn report_invalid_keys(&self, error: &KeySetError) -> Result<Action, ReconcileError> {
        let message = format!("Secret {}: {error}", self.secret_name);
        self.ctx
            .event(
                self.exit,
                EventType::Warning,
                "InvalidKeySecret",
                message.clone(),
            )
            .await;
        self.write_failure(ReadyReason::InvalidKeySecret, message)
            .await?;
        Ok(Action::requeue(RESYNC))
    }

    async fn report_keys_created(&self, keys: &ExitKeySet, ordinals: &[u32]) {
        let created: Vec<String> = ordinals
            .iter()
            .filter_map(|o| keys.get(*o).map(|k| format!("{o}: {}", k.peer_id)))
            .collect();
        for _ in ordinals {
            self.ctx.metrics.identity_created();
        }
        self.ctx
            .event(
                self.exit,
                EventType::Normal,
                "KeysCreated",
                format!(
                    "exit identities and OHTTP keys for replicas {}",
                    created.join(", ")
                ),
            )
            .await;
    }

    /// Brings the key Secret `secret` (read as `keys`) up to date in one write: an identity
    /// and keyring for every replica that has none (scaling up), every keyring rotated when a
    /// new `tokengo.io/rotate` value asks for it or a current key is `interval` seconds old,
    /// ordinal 0 moved to its own names (a Secret of an earlier version), and the owner
    /// reference as `retainIdentity` says. Replaces exactly the `secret` read (a concurrent
    /// writer's key is never lost: the pass fails with [`ReconcileError::Conflict`] and the
    /// next one re-reads).
    async fn complete_keys(
        &self,
        secret: &Secret,
        keys: &mut ExitKeySet,
        interval: u64,
    ) -> Result<(), ReconcileError> {
        let added = keys.fill(self.replicas(), self.now)?;
        let handled = secret
            .annotations()
            .get(desired::ROTATION_HANDLED_ANNOTATION)
            .cloned();
        let requested = rotation_requested(self.rotate_request.as_deref(), handled.as_deref());
        let rotate = requested || keys.rotation_due(self.now, interval);
        if rotate {
            keys.rotate_all(self.now)?;
        }
        let owners = key_secret_owners(
            self.exit,
            secret.owner_references(),
            self.exit.spec.retain_identity,
        );
        if added.is_empty() && !rotate && !keys.is_legacy() && owners == secret.owner_references() {
            return Ok(());
        }
        let replacement = desired::rewritten_keys_secret(
            secret,
            keys,
            self.rotate_request.as_deref().or(handled.as_deref()),
            owners,
        );
        match self
            .secrets
            .replace(&self.secret_name, &PostParams::default(), &replacement)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                return Err(ReconcileError::Conflict(self.secret_name.clone()));
            }
            Err(error) => return Err(error.into()),
        }
        if !added.is_empty() {
            self.report_keys_created(keys, &added).await;
        }
        if rotate {
            self.report_rotated(keys, requested).await;
        }
        Ok(())
    }

    async fn report_rotated(&self, keys: &ExitKeySet, requested: bool) {
        let ids: Vec<String> = keys
            .get(0)
            .map(|k| k.keyring.public_keys())
            .unwrap_or_default()
            .iter()
            .map(|k| k.key_id.to_string())
            .collect();
        self.ctx.metrics.keys_rotated();
        self.ctx
            .event(
                self.exit,
                EventType::Normal,
                "KeysRotated",
                format!(
                    "{} OHTTP keys of every replica; replica 0's key ids now {} (current \
                     first, previous kept for the overlap)",
                    if requested {
                        "requested rotation of the"
                    } else {
                        "scheduled rotation of the"
                    },
                    ids.join(", ")
                ),
            )
            .await;
    }

    /// Resolves the relays and applies the StatefulSet for them (none while a named relay is
    /// unavailable, or while the previous version's Deployment is going away: the condition
    /// says why).
    async fn deploy_children(&self, keys_hash: &str) -> Result<Deployed, ReconcileError> {
        let (relays, dht) = match resolve_relays(self.exit, self.ctx).await? {
            Relays::Unavailable(reason, message) => {
                return Ok(Deployed {
                    relays: Vec::new(),
                    reason,
                    message,
                    ready: 0,
                    replacing: false,
                });
            }
            Relays::Resolved(relays) => (relays, None),
            // status.relays stays empty: each pod chooses its relays at start.
            Relays::Dht(dht) => (Vec::new(), Some(dht)),
        };
        if !self.previous_deployment_gone().await? {
            return Ok(self.replacing(relays));
        }
        let source = match dht {
            Some(dht) => RelaySource::Dht(dht),
            None => RelaySource::Addresses(&relays),
        };
        let (reason, mut message, ready) = self.apply_set(source, keys_hash).await?;
        if dht.is_some() {
            message.push_str("; relays discovered on the DHT");
        }
        Ok(Deployed {
            relays,
            reason,
            message,
            ready,
            replacing: false,
        })
    }

    /// Applies the StatefulSet and reads its rollout: the reason, message and ready pods.
    async fn apply_set(
        &self,
        relays: RelaySource<'_>,
        keys_hash: &str,
    ) -> Result<(ReadyReason, String, i32), ReconcileError> {
        let sets: Api<StatefulSet> = namespaced(&self.ctx.client, self.exit)?;
        let set = apply(
            &sets,
            &desired::stateful_set(self.exit, &self.ctx.settings, relays, keys_hash),
        )
        .await?;
        let (ready, complete) = stateful_set_rollout(&set);
        let message = format!("{ready}/{} replicas ready", self.exit.spec.replicas);
        let reason = if complete {
            ReadyReason::Available
        } else {
            ReadyReason::Progressing
        };
        Ok((reason, message, ready))
    }

    fn replacing(&self, relays: Vec<String>) -> Deployed {
        Deployed {
            relays,
            reason: ReadyReason::Progressing,
            message: format!(
                "replacing the Deployment {} of an earlier operator version by a StatefulSet: \
                 waiting for its pods to stop (its identity becomes replica 0's)",
                desired::workload_name(self.exit)
            ),
            ready: 0,
            replacing: true,
        }
    }

    /// Whether the exit Deployment an earlier operator version made (one identity shared by
    /// every pod) is gone. If not, it is deleted, in the foreground: it disappears only once
    /// its pods have, so no pod of it holds ordinal 0's identity (its old one) while the
    /// StatefulSet's pod 0 runs. A Deployment of that name the exit does not own is left
    /// alone.
    async fn previous_deployment_gone(&self) -> Result<bool, ReconcileError> {
        let deployments: Api<Deployment> = namespaced(&self.ctx.client, self.exit)?;
        let name = desired::workload_name(self.exit);
        let Some(old) = deployments.get_opt(&name).await? else {
            return Ok(true);
        };
        let uid = self.exit.meta().uid.as_deref();
        let ours = old
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
        if !ours {
            return Ok(true);
        }
        if old.metadata.deletion_timestamp.is_none() {
            match deployments.delete(&name, &DeleteParams::foreground()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(true),
                Err(error) => return Err(error.into()),
            }
            self.ctx
                .event(
                    self.exit,
                    EventType::Normal,
                    "DeploymentReplaced",
                    format!(
                        "deleting the Deployment {name} of an earlier operator version; the \
                         StatefulSet starts once its pods are gone, and its identity is replica \
                         0's"
                    ),
                )
                .await;
        }
        Ok(false)
    }
}

/// The rotation interval in seconds (at least an hour, whatever the spec says).
fn rotation_interval(exit: &TokenGoExit) -> u64 {
    u64::try_from(exit.spec.key_rotation.interval_hours)
        .unwrap_or(1)
        .max(1)
        * 3600
}

/// Whether the `tokengo.io/rotate` value `request` is one not yet carried out (`handled` is
/// the last one that was).
fn rotation_requested(request: Option<&str>, handled: Option<&str>) -> bool {
    request.is_some() && request != handled
}

/// The public keys as the status publishes them.
fn published_keys(public: &[PublicKey]) -> Vec<PublishedKey> {
    public
        .iter()
        .map(|k| PublishedKey {
            key_id: i32::from(k.key_id),
            config: hex::encode(k.config.encode()),
            created_at: Timestamp::from_second(i64::try_from(k.created_at).unwrap_or(0))
                .map(|t| t.to_string())
                .unwrap_or_default(),
        })
        .collect()
}

/// When to look again: by the next rotation, due in `next_rotation` seconds (and at least
/// every [`RESYNC`]), while the exit runs or rolls out; within [`RELAY_WAIT`] while its relay
/// is unavailable.
fn requeue_after(reason: ReadyReason, next_rotation: u64) -> Duration {
    let next_rotation = Duration::from_secs(next_rotation.max(1));
    if reason.is_ready() || reason == ReadyReason::Progressing {
        next_rotation.min(RESYNC)
    } else {
        RELAY_WAIT.min(next_rotation)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{keys::Keyring, resource::TokenGoExitSpec};

    fn exit(key_rotation: serde_json::Value) -> TokenGoExit {
        let spec: TokenGoExitSpec = serde_json::from_value(json!({
            "backend": {"url": "http://ollama.models.svc:11434"},
            "relay": {"name": "edge"},
            "keyRotation": key_rotation
        }))
        .unwrap();
        TokenGoExit::new("llm", spec)
    }

    #[test]
    fn identities_list_the_running_ordinals_only() {
        let mut keys = ExitKeySet::new();
        keys.fill(3, 10).unwrap();
        let mut two = exit(json!({}));
        two.spec.replicas = 2;
        let listed = identities(&two, &keys);
        assert_eq!(listed.len(), 2, "ordinal 2 is kept but not running");
        for (i, identity) in listed.iter().enumerate() {
            let ordinal = u32::try_from(i).unwrap();
            let k = keys.get(ordinal).unwrap();
            assert_eq!(identity.ordinal, i32::try_from(i).unwrap());
            assert_eq!(identity.peer_id, k.peer_id);
            assert_eq!(identity.keys, published_keys(&k.keyring.public_keys()));
        }
        assert_ne!(listed[0].peer_id, listed[1].peer_id);
    }

    #[test]
    fn a_stateful_set_is_rolled_out_when_every_pod_is_current_and_ready() {
        use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
        let mut set = StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        set.metadata.generation = Some(2);
        assert_eq!(stateful_set_rollout(&set), (0, false));
        let status = |generation, ready, updated, current: &str, update: &str| StatefulSetStatus {
            observed_generation: Some(generation),
            replicas: 3,
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            current_revision: Some(current.to_owned()),
            update_revision: Some(update.to_owned()),
            ..Default::default()
        };
        set.status = Some(status(1, 3, 3, "a", "a"));
        assert_eq!(
            stateful_set_rollout(&set),
            (3, false),
            "an older generation"
        );
        set.status = Some(status(2, 3, 1, "a", "b"));
        assert_eq!(
            stateful_set_rollout(&set),
            (3, false),
            "rolling: one pod updated"
        );
        set.status = Some(status(2, 2, 3, "b", "b"));
        assert_eq!(stateful_set_rollout(&set), (2, false), "a pod not ready");
        set.status = Some(status(2, 3, 3, "b", "b"));
        assert_eq!(stateful_set_rollout(&set), (3, true));
    }

    #[test]
    fn rotation_interval_is_whole_hours_and_at_least_one() {
        assert_eq!(rotation_interval(&exit(json!({}))), 7 * 24 * 3600);
        assert_eq!(
            rotation_interval(&exit(json!({"intervalHours": 24}))),
            24 * 3600
        );
        assert_eq!(rotation_interval(&exit(json!({"intervalHours": 0}))), 3600);
        assert_eq!(rotation_interval(&exit(json!({"intervalHours": -5}))), 3600);
    }

    #[test]
    fn a_rotation_request_is_carried_out_once() {
        assert!(!rotation_requested(None, None));
        assert!(!rotation_requested(None, Some("r1")));
        assert!(rotation_requested(Some("r1"), None));
        assert!(!rotation_requested(Some("r1"), Some("r1")));
        assert!(rotation_requested(Some("r2"), Some("r1")));
    }

    #[test]
    fn published_keys_are_hex_configs_with_rfc3339_times() {
        let mut ring = Keyring::generate(1, 10).unwrap();
        ring.rotate(20).unwrap();
        let public = ring.public_keys();
        let published = published_keys(&public);
        assert_eq!(published.len(), 2);
        for (published, key) in published.iter().zip(&public) {
            assert_eq!(published.key_id, i32::from(key.key_id));
            assert_eq!(published.config, hex::encode(key.config.encode()));
        }
        assert_eq!(published[0].created_at, "1970-01-01T00:00:20Z");
        assert_eq!(published[1].created_at, "1970-01-01T00:00:10Z");
    }

    #[test]
    fn requeue_follows_the_rotation_or_the_missing_relay() {
        let hour = Duration::from_secs(3600);
        for running in [ReadyReason::Available, ReadyReason::Progressing] {
            assert_eq!(requeue_after(running, 10), Duration::from_secs(10));
            assert_eq!(requeue_after(running, 0), Duration::from_secs(1));
            assert_eq!(requeue_after(running, 48 * 3600), hour);
        }
        for waiting in [ReadyReason::RelayNotFound, ReadyReason::RelayNotReady] {
            assert_eq!(requeue_after(waiting, 48 * 3600), RELAY_WAIT);
            assert_eq!(requeue_after(waiting, 10), Duration::from_secs(10));
        }
    }
}

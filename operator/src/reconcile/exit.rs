//! Reconciles one `TokenGoExit`: key Secret (created once; rotated on schedule or on request,
//! keeping the previous key), relay resolution (a named relay, addresses, or DHT discovery left
//! to the node), Deployment, status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::Condition,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt as _,
    api::PostParams,
    runtime::{controller::Action, events::EventType},
};
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};
use zeroize::Zeroizing;

use super::{
    Context, ReconcileError, apply, ensure_secret, namespaced, object_key, rollout, write_status,
};
use crate::{
    keys::{self, KeyError, Keyring, PublicKey},
    manifest::{
        MAX_NAME_LEN,
        exit::{self as desired, RelaySource},
        relay as relay_manifest,
    },
    resource::{
        TokenGoExit, TokenGoExitStatus, TokenGoRelay,
        exit::{ExitDht, MAX_RELAYS, PublishedKey},
        shared::{ReadyReason, ready_condition},
    },
};

/// Most time between reconciles of a healthy exit (rotation is scheduled more precisely).
const RESYNC: Duration = Duration::from_secs(3600);
/// How soon to look again when the named relay is missing or has no identity yet (its own
/// changes also trigger a reconcile; this is the safety net).
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

/// Name check, key Secret (created once, then read), rotation, children, status.
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

    let (secret, created) = pass.ensure_keys().await?;
    let mut keys = match read_keys(&secret) {
        Ok(keys) => keys,
        Err(error) => return pass.report_invalid_keys(&error).await,
    };
    if created {
        pass.report_keys_created(&keys.peer_id).await;
    }
    let interval = rotation_interval(exit);
    pass.rotate_if_due(&secret, &mut keys, interval).await?;

    let public = keys.keyring.public_keys();
    let deployed = pass
        .deploy_children(&desired::keys_hash(&keys.peer_id, &public))
        .await?;
    let next_rotation = keys.keyring.seconds_until_rotation(pass.now, interval);
    pass.write_status(TokenGoExitStatus {
        observed_generation: exit.metadata.generation,
        conditions: pass.condition(deployed.reason, deployed.message),
        peer_id: Some(keys.peer_id),
        keys: published_keys(&public),
        relays: deployed.relays,
        ready_replicas: deployed.ready,
    })
    .await?;
    Ok(Action::requeue(requeue_after(
        deployed.reason,
        next_rotation,
    )))
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
        // The in-cluster address: exits run in the cluster.
        let address = relay_manifest::addresses(&relay, &ctx.settings, &peer_id)
            .into_iter()
            .next()
            .unwrap_or_default();
        return Ok(Relays::Resolved(vec![address]));
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

/// Applies the Deployment and reads its rollout: the reason, message and ready pods.
async fn deploy(
    exit: &TokenGoExit,
    ctx: &Context,
    relays: RelaySource<'_>,
    keys_hash: &str,
) -> Result<(ReadyReason, String, i32), ReconcileError> {
    let deployments: Api<Deployment> = namespaced(&ctx.client, exit)?;
    let deployment = apply(
        &deployments,
        &desired::deployment(exit, &ctx.settings, relays, keys_hash),
    )
    .await?;
    let (ready, complete) = rollout(&deployment);
    let message = format!("{ready}/{} replicas ready", exit.spec.replicas);
    let reason = if complete {
        ReadyReason::Available
    } else {
        ReadyReason::Progressing
    };
    Ok((reason, message, ready))
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

/// The exit's keys as its Secret holds them.
struct ExitKeys {
    /// The encoded identity, kept to write it back unchanged when the keyring rotates.
    identity: Zeroizing<Vec<u8>>,
    peer_id: String,
    keyring: Keyring,
}

/// What deploying the children found: the relays the status lists and the Ready condition.
struct Deployed {
    relays: Vec<String>,
    reason: ReadyReason,
    message: String,
    ready: i32,
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

    /// The key Secret, created with a new identity and keyring when absent; `true` if this
    /// pass created it.
    async fn ensure_keys(&self) -> Result<(Secret, bool), ReconcileError> {
        ensure_secret(&self.secrets, &self.secret_name, || {
            let identity = keys::new_identity()?;
            let keyring = Keyring::generate(1, self.now)?;
            // A rotation request present at creation is already satisfied by the fresh key.
            Ok(desired::keys_secret(
                self.exit,
                &identity,
                &keyring.encode(),
                self.rotate_request.as_deref(),
            ))
        })
        .await
    }

    /// A key Secret that does not parse is left alone (never replaced: a person must look);
    /// the exit is reported not Ready and looked at again after [`RESYNC`].
    async fn report_invalid_keys(&self, error: &KeyError) -> Result<Action, ReconcileError> {
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

    async fn report_keys_created(&self, peer_id: &str) {
        self.ctx.metrics.identity_created();
        self.ctx
            .event(
                self.exit,
                EventType::Normal,
                "KeysCreated",
                format!("exit identity {peer_id}, OHTTP key 1"),
            )
            .await;
    }

    /// Rotates the OHTTP key when a new `tokengo.io/rotate` value asks for it or the current
    /// key is `interval` seconds old, by replacing exactly the `secret` read (a concurrent
    /// writer's key is never lost: the pass fails with [`ReconcileError::Conflict`] and the
    /// next one re-reads).
    async fn rotate_if_due(
        &self,
        secret: &Secret,
        keys: &mut ExitKeys,
        interval: u64,
    ) -> Result<(), ReconcileError> {
        let handled = secret
            .annotations()
            .get(desired::ROTATION_HANDLED_ANNOTATION)
            .cloned();
        let requested = rotation_requested(self.rotate_request.as_deref(), handled.as_deref());
        if !requested && !keys.keyring.rotation_due(self.now, interval) {
            return Ok(());
        }
        keys.keyring.rotate(self.now)?;
        let mut replacement = desired::keys_secret(
            self.exit,
            &keys.identity,
            &keys.keyring.encode(),
            self.rotate_request.as_deref().or(handled.as_deref()),
        );
        replacement.metadata.resource_version = secret.metadata.resource_version.clone();
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
        self.report_rotated(&keys.keyring, requested).await;
        Ok(())
    }

    async fn report_rotated(&self, keyring: &Keyring, requested: bool) {
        let ids: Vec<String> = keyring
            .public_keys()
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
                    "{} OHTTP key; key ids now {} (current first, previous kept for the overlap)",
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

    /// Resolves the relays and applies the Deployment for them (none while a named relay is
    /// unavailable: the condition says why).
    async fn deploy_children(&self, keys_hash: &str) -> Result<Deployed, ReconcileError> {
        let (exit, ctx) = (self.exit, self.ctx);
        Ok(match resolve_relays(exit, ctx).await? {
            Relays::Resolved(relays) => {
                let (reason, message, ready) =
                    deploy(exit, ctx, RelaySource::Addresses(&relays), keys_hash).await?;
                Deployed {
                    relays,
                    reason,
                    message,
                    ready,
                }
            }
            Relays::Dht(dht) => {
                // status.relays stays empty: each pod chooses its relays at start.
                let (reason, message, ready) =
                    deploy(exit, ctx, RelaySource::Dht(dht), keys_hash).await?;
                Deployed {
                    relays: Vec::new(),
                    reason,
                    message: format!("{message}; relays discovered on the DHT"),
                    ready,
                }
            }
            Relays::Unavailable(reason, message) => Deployed {
                relays: Vec::new(),
                reason,
                message,
                ready: 0,
            },
        })
    }
}

/// Reads the identity and keyring from the key Secret (a missing file reads as empty, which
/// does not parse).
fn read_keys(secret: &Secret) -> Result<ExitKeys, KeyError> {
    let file = |name: &str| {
        Zeroizing::new(
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(name))
                .map(|b| b.0.clone())
                .unwrap_or_default(),
        )
    };
    let identity = file(EXIT_IDENTITY_FILE);
    let peer_id = keys::peer_id(&identity)?.to_string();
    let keyring = Keyring::parse(&file(EXIT_KEYRING_FILE))?;
    Ok(ExitKeys {
        identity,
        peer_id,
        keyring,
    })
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
    use crate::resource::TokenGoExitSpec;

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
    fn keys_read_back_from_the_secret_the_operator_writes() {
        let identity = keys::new_identity().unwrap();
        let ring = Keyring::generate(1, 10).unwrap();
        let secret = desired::keys_secret(&exit(json!({})), &identity, &ring.encode(), None);
        let read = read_keys(&secret).unwrap();
        assert_eq!(read.peer_id, keys::peer_id(&identity).unwrap().to_string());
        assert_eq!(*read.identity, *identity);
        assert_eq!(read.keyring.encode(), ring.encode());

        let junk_identity = desired::keys_secret(&exit(json!({})), b"junk", &ring.encode(), None);
        assert!(matches!(
            read_keys(&junk_identity),
            Err(KeyError::InvalidIdentity)
        ));
        let mut no_keyring = secret;
        if let Some(data) = no_keyring.data.as_mut() {
            data.remove(EXIT_KEYRING_FILE);
        }
        assert!(matches!(
            read_keys(&no_keyring),
            Err(KeyError::InvalidKeyring(_))
        ));
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

//! Reconciles one `TokenGoExit`: key Secret (created once; rotated on schedule or on request,
//! keeping the previous key), relay resolution (a named relay, addresses, or DHT discovery left
//! to the node), Deployment, status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Secret},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt as _,
    api::PostParams,
    runtime::{controller::Action, events::EventType},
};
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};

use super::{
    Context, ReconcileError, apply, ensure_secret, namespaced, object_key, rollout, write_status,
};
use crate::{
    keys::{self, KeyError, Keyring},
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

async fn reconcile_inner(exit: &TokenGoExit, ctx: &Context) -> Result<Action, ReconcileError> {
    let exits: Api<TokenGoExit> = namespaced(&ctx.client, exit)?;
    let previous = exit.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let condition = |reason, message| {
        vec![ready_condition(
            previous,
            reason,
            message,
            exit.metadata.generation,
            Timestamp::now(),
        )]
    };

    if exit.name_any().len() > MAX_NAME_LEN {
        let status = TokenGoExitStatus {
            observed_generation: exit.metadata.generation,
            conditions: condition(
                ReadyReason::ReconcileFailed,
                format!("name longer than {MAX_NAME_LEN} characters: child names would not fit"),
            ),
            ..Default::default()
        };
        write_status(&exits, exit, exit.status.as_ref(), status).await?;
        return Ok(Action::await_change());
    }

    let now = Timestamp::now().as_second().max(0).unsigned_abs();
    let rotate_request = exit.annotations().get(desired::ROTATE_ANNOTATION).cloned();
    let secrets: Api<Secret> = namespaced(&ctx.client, exit)?;
    let secret_name = desired::keys_secret_name(exit);
    let (secret, created) = ensure_secret(&secrets, &secret_name, || {
        let identity = keys::new_identity()?;
        let keyring = Keyring::generate(1, now)?;
        // A rotation request present at creation is already satisfied by the fresh key.
        Ok(desired::keys_secret(
            exit,
            &identity,
            &keyring.encode(),
            rotate_request.as_deref(),
        ))
    })
    .await?;

    let file = |name: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    let identity = zeroize::Zeroizing::new(file(EXIT_IDENTITY_FILE));
    let parsed = keys::peer_id(&identity).and_then(|peer| {
        Keyring::parse(&zeroize::Zeroizing::new(file(EXIT_KEYRING_FILE)))
            .map(|ring| (peer, ring))
            .map_err(KeyError::from)
    });
    let (peer_id, mut keyring) = match parsed {
        Ok((peer, ring)) => (peer.to_string(), ring),
        Err(error) => {
            let message = format!("Secret {secret_name}: {error}");
            ctx.event(
                exit,
                EventType::Warning,
                "InvalidKeySecret",
                message.clone(),
            )
            .await;
            let status = TokenGoExitStatus {
                observed_generation: exit.metadata.generation,
                conditions: condition(ReadyReason::InvalidKeySecret, message),
                ..Default::default()
            };
            write_status(&exits, exit, exit.status.as_ref(), status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if created {
        ctx.metrics.identity_created();
        ctx.event(
            exit,
            EventType::Normal,
            "KeysCreated",
            format!("exit identity {peer_id}, OHTTP key 1"),
        )
        .await;
    }

    let interval = u64::try_from(exit.spec.key_rotation.interval_hours)
        .unwrap_or(1)
        .max(1)
        * 3600;
    let handled = secret
        .annotations()
        .get(desired::ROTATION_HANDLED_ANNOTATION)
        .cloned();
    let requested = rotate_request.is_some() && rotate_request != handled;
    if requested || keyring.rotation_due(now, interval) {
        keyring.rotate(now)?;
        let mut replacement = desired::keys_secret(
            exit,
            &identity,
            &keyring.encode(),
            rotate_request.as_deref().or(handled.as_deref()),
        );
        // Optimistic concurrency: only replace the Secret we read, so a concurrent writer's
        // key is never lost.
        replacement.metadata.resource_version = secret.metadata.resource_version.clone();
        match secrets
            .replace(&secret_name, &PostParams::default(), &replacement)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                return Err(ReconcileError::Conflict(secret_name));
            }
            Err(error) => return Err(error.into()),
        }
        let ids: Vec<String> = keyring
            .public_keys()
            .iter()
            .map(|k| k.key_id.to_string())
            .collect();
        ctx.metrics.keys_rotated();
        ctx.event(
            exit,
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

    let public = keyring.public_keys();
    let published: Vec<PublishedKey> = public
        .iter()
        .map(|k| PublishedKey {
            key_id: i32::from(k.key_id),
            config: hex::encode(k.config.encode()),
            created_at: Timestamp::from_second(i64::try_from(k.created_at).unwrap_or(0))
                .map(|t| t.to_string())
                .unwrap_or_default(),
        })
        .collect();
    let next_rotation = Duration::from_secs(keyring.seconds_until_rotation(now, interval).max(1));
    let requeue = Action::requeue(next_rotation.min(RESYNC));

    let hash = desired::keys_hash(&peer_id, &public);
    let (relays, reason, message, ready) = match resolve_relays(exit, ctx).await? {
        Relays::Resolved(relays) => {
            let (reason, message, ready) =
                deploy(exit, ctx, RelaySource::Addresses(&relays), &hash).await?;
            (relays, reason, message, ready)
        }
        Relays::Dht(dht) => {
            // status.relays stays empty: each pod chooses its relays at start.
            let (reason, message, ready) = deploy(exit, ctx, RelaySource::Dht(dht), &hash).await?;
            (
                Vec::new(),
                reason,
                format!("{message}; relays discovered on the DHT"),
                ready,
            )
        }
        Relays::Unavailable(reason, message) => (Vec::new(), reason, message, 0),
    };
    let status = TokenGoExitStatus {
        observed_generation: exit.metadata.generation,
        conditions: condition(reason, message),
        peer_id: Some(peer_id),
        keys: published,
        relays,
        ready_replicas: ready,
    };
    write_status(&exits, exit, exit.status.as_ref(), status).await?;
    Ok(if reason.is_ready() || reason == ReadyReason::Progressing {
        requeue
    } else {
        Action::requeue(RELAY_WAIT.min(next_rotation))
    })
}

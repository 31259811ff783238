//! Reconciles one `TokenGoRelay`: identity Secret (created once), Service, Deployment, status
//! (including whether a relay asked to announce itself on the DHT has an address to announce).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Secret, Service},
    },
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt as _,
    runtime::{controller::Action, events::EventType},
};
use tokengo_proto::data_dir::RELAY_IDENTITY_FILE;

use super::{
    Context, ReconcileError, apply, ensure_secret, namespaced, object_key, rollout, write_status,
};
use crate::{
    keys,
    manifest::{MAX_NAME_LEN, relay as desired},
    resource::{
        TokenGoRelay, TokenGoRelayStatus,
        shared::{READY, ReadyReason, ready_condition},
    },
};

/// While pods are coming up the Deployment watch triggers reconciles; this is only a safety net.
const RESYNC: Duration = Duration::from_secs(300);

/// Brings the relay's children and status in line with its spec.
pub async fn reconcile(
    relay: Arc<TokenGoRelay>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if relay.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the children; nothing to create.
        return Ok(Action::await_change());
    }
    let result = reconcile_inner(&relay, &ctx).await;
    ctx.metrics.reconciled("TokenGoRelay", result.is_ok());
    if result.is_ok() {
        ctx.succeeded(&object_key(&*relay));
    }
    result
}

async fn reconcile_inner(relay: &TokenGoRelay, ctx: &Context) -> Result<Action, ReconcileError> {
    let relays: Api<TokenGoRelay> = namespaced(&ctx.client, relay)?;
    let status_of =
        |reason, message: String, peer_id, addresses, ready_replicas| TokenGoRelayStatus {
            observed_generation: relay.metadata.generation,
            conditions: vec![ready_condition(
                relay.status.as_ref().map_or(&[][..], |s| &s.conditions[..]),
                reason,
                message,
                relay.metadata.generation,
                Timestamp::now(),
            )],
            peer_id,
            addresses,
            ready_replicas,
        };

    if relay.name_any().len() > MAX_NAME_LEN {
        let status = status_of(
            ReadyReason::ReconcileFailed,
            format!("name longer than {MAX_NAME_LEN} characters: child names would not fit"),
            None,
            Vec::new(),
            0,
        );
        write_status(&relays, relay, relay.status.as_ref(), status).await?;
        return Ok(Action::await_change());
    }

    let secrets: Api<Secret> = namespaced(&ctx.client, relay)?;
    let secret_name = desired::identity_secret_name(relay);
    let (secret, created) = ensure_secret(&secrets, &secret_name, || {
        Ok(desired::identity_secret(relay, &keys::new_identity()?))
    })
    .await?;
    let encoded = secret
        .data
        .as_ref()
        .and_then(|d| d.get(RELAY_IDENTITY_FILE))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    let peer_id = match keys::peer_id(encoded) {
        Ok(peer) => peer.to_string(),
        Err(error) => {
            // Never overwritten: a broken key Secret needs a person, not a new identity.
            let message = format!("Secret {secret_name} key {RELAY_IDENTITY_FILE}: {error}");
            ctx.event(
                relay,
                EventType::Warning,
                "InvalidKeySecret",
                message.clone(),
            )
            .await;
            let status = status_of(ReadyReason::InvalidKeySecret, message, None, Vec::new(), 0);
            write_status(&relays, relay, relay.status.as_ref(), status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    if created {
        ctx.metrics.identity_created();
        ctx.event(
            relay,
            EventType::Normal,
            "IdentityCreated",
            format!("relay identity {peer_id}"),
        )
        .await;
    }

    let services: Api<Service> = namespaced(&ctx.client, relay)?;
    apply(&services, &desired::service(relay)).await?;
    let deployments: Api<Deployment> = namespaced(&ctx.client, relay)?;
    let deployment = apply(
        &deployments,
        &desired::deployment(relay, &ctx.settings, &peer_id),
    )
    .await?;

    let (ready, complete) = rollout(&deployment);
    let replicas = format!("{ready}/{} replicas ready", relay.spec.replicas);
    let (reason, message) = if let Some(problem) = desired::announce_problem(relay) {
        // It runs (reachable at its addresses) but cannot be found on the DHT: not Ready,
        // and one Warning event when it starts being so.
        let previous = relay
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
            .map(|c| c.reason.as_str());
        if previous != Some(ReadyReason::NoExternalAddress.as_str()) {
            ctx.event(
                relay,
                EventType::Warning,
                ReadyReason::NoExternalAddress.as_str(),
                problem.clone(),
            )
            .await;
        }
        (
            ReadyReason::NoExternalAddress,
            format!("{problem} ({replicas})"),
        )
    } else if complete {
        (ReadyReason::Available, replicas)
    } else {
        (ReadyReason::Progressing, replicas)
    };
    let addresses = desired::addresses(relay, &ctx.settings, &peer_id);
    let status = status_of(reason, message, Some(peer_id), addresses, ready);
    write_status(&relays, relay, relay.status.as_ref(), status).await?;
    Ok(Action::requeue(RESYNC))
}

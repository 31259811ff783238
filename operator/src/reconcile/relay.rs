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
    keys::{self, KeyError},
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

/// Name check, identity Secret (created once, then read), Service and Deployment, status.
async fn reconcile_inner(relay: &TokenGoRelay, ctx: &Context) -> Result<Action, ReconcileError> {
    let relays: Api<TokenGoRelay> = namespaced(&ctx.client, relay)?;
    if relay.name_any().len() > MAX_NAME_LEN {
        let status = status_of(
            relay,
            ReadyReason::ReconcileFailed,
            format!("name longer than {MAX_NAME_LEN} characters: child names would not fit"),
        );
        write_status(&relays, relay, relay.status.as_ref(), status).await?;
        return Ok(Action::await_change());
    }

    let (secret_name, secret, created) = ensure_identity(relay, ctx).await?;
    let peer_id = match identity_peer_id(&secret) {
        Ok(peer) => peer,
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
            let status = status_of(relay, ReadyReason::InvalidKeySecret, message);
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

    let deployment = deploy_children(relay, ctx, &peer_id).await?;
    let (ready, complete) = rollout(&deployment);
    let (reason, message) = readiness(relay, ctx, ready, complete).await;
    let status = TokenGoRelayStatus {
        peer_id: Some(peer_id.clone()),
        addresses: desired::addresses(relay, &ctx.settings, &peer_id),
        ready_replicas: ready,
        ..status_of(relay, reason, message)
    };
    write_status(&relays, relay, relay.status.as_ref(), status).await?;
    Ok(Action::requeue(RESYNC))
}

/// A status with the Ready condition for `reason` (continuing the relay's previous one) and
/// nothing else.
fn status_of(relay: &TokenGoRelay, reason: ReadyReason, message: String) -> TokenGoRelayStatus {
    TokenGoRelayStatus {
        observed_generation: relay.metadata.generation,
        conditions: vec![ready_condition(
            relay.status.as_ref().map_or(&[][..], |s| &s.conditions[..]),
            reason,
            message,
            relay.metadata.generation,
            Timestamp::now(),
        )],
        ..Default::default()
    }
}

/// The identity Secret's name, the Secret (created with a new identity when absent) and
/// whether this reconcile created it.
async fn ensure_identity(
    relay: &TokenGoRelay,
    ctx: &Context,
) -> Result<(String, Secret, bool), ReconcileError> {
    let secrets: Api<Secret> = namespaced(&ctx.client, relay)?;
    let secret_name = desired::identity_secret_name(relay);
    let (secret, created) = ensure_secret(&secrets, &secret_name, || {
        Ok(desired::identity_secret(relay, &keys::new_identity()?))
    })
    .await?;
    Ok((secret_name, secret, created))
}

/// The PeerId of the identity in the Secret (a missing key reads as empty, which does not
/// parse).
fn identity_peer_id(secret: &Secret) -> Result<String, KeyError> {
    let encoded = secret
        .data
        .as_ref()
        .and_then(|d| d.get(RELAY_IDENTITY_FILE))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    Ok(keys::peer_id(encoded)?.to_string())
}

/// Applies the Service and the Deployment (whose pods run as `peer_id`); returns the
/// Deployment as the API server has it.
async fn deploy_children(
    relay: &TokenGoRelay,
    ctx: &Context,
    peer_id: &str,
) -> Result<Deployment, ReconcileError> {
    let services: Api<Service> = namespaced(&ctx.client, relay)?;
    apply(&services, &desired::service(relay)).await?;
    let deployments: Api<Deployment> = namespaced(&ctx.client, relay)?;
    apply(
        &deployments,
        &desired::deployment(relay, &ctx.settings, peer_id),
    )
    .await
}

/// The Ready condition's reason and message after the rollout: `ready` pods, `complete` or
/// not. A relay that cannot announce itself on the DHT is not Ready whatever its pods, and
/// gets one Warning event when it starts being so.
async fn readiness(
    relay: &TokenGoRelay,
    ctx: &Context,
    ready: i32,
    complete: bool,
) -> (ReadyReason, String) {
    let replicas = format!("{ready}/{} replicas ready", relay.spec.replicas);
    let Some(problem) = desired::announce_problem(relay) else {
        let reason = if complete {
            ReadyReason::Available
        } else {
            ReadyReason::Progressing
        };
        return (reason, replicas);
    };
    // It runs (reachable at its addresses) but cannot be found on the DHT.
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
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resource::TokenGoRelaySpec;

    fn relay() -> TokenGoRelay {
        let spec: TokenGoRelaySpec = serde_json::from_value(json!({})).unwrap();
        let mut relay = TokenGoRelay::new("edge", spec);
        relay.metadata.generation = Some(4);
        relay
    }

    #[test]
    fn the_peer_id_is_read_from_the_secret_the_operator_writes() {
        let identity = keys::new_identity().unwrap();
        let secret = desired::identity_secret(&relay(), &identity);
        assert_eq!(
            identity_peer_id(&secret).unwrap(),
            keys::peer_id(&identity).unwrap().to_string()
        );
        let junk = desired::identity_secret(&relay(), b"junk");
        assert!(matches!(
            identity_peer_id(&junk),
            Err(KeyError::InvalidIdentity)
        ));
        assert!(matches!(
            identity_peer_id(&Secret::default()),
            Err(KeyError::InvalidIdentity)
        ));
    }

    #[test]
    fn a_failure_status_is_only_the_condition() {
        let status = status_of(&relay(), ReadyReason::InvalidKeySecret, "broken".to_owned());
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.conditions.len(), 1);
        let condition = &status.conditions[0];
        assert_eq!(
            (condition.reason.as_str(), condition.status.as_str()),
            ("InvalidKeySecret", "False")
        );
        assert_eq!(condition.message, "broken");
        assert_eq!(
            (status.peer_id, status.addresses, status.ready_replicas),
            (None, Vec::<String>::new(), 0)
        );
    }
}

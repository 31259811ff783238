//! Reconciles one `TokenGoRelay`: identity Secret (created once; owned or kept as
//! `retainIdentity` says), Services (the relay's and the headless one naming every pod),
//! Deployment, PodDisruptionBudget (where the API server serves policy/v1), status (including
//! whether a relay asked to announce itself on the DHT has an address to announce).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Secret, Service},
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{DeleteParams, PostParams},
    runtime::{controller::Action, events::EventType},
};
use tokengo_proto::data_dir::RELAY_IDENTITY_FILE;

use super::{
    Context, ReconcileError, apply, ensure_secret, namespaced, object_key, rollout, write_status,
};
use crate::{
    keys::{self, KeyError},
    manifest::{
        MAX_NAME_LEN, key_secret_owners,
        relay::{self as desired, Exposure},
    },
    resource::{
        TokenGoRelay, TokenGoRelayStatus,
        shared::{READY, ReadyReason, ready_condition},
    },
};

/// While pods are coming up the Deployment watch triggers reconciles; this is only a safety net.
const RESYNC: Duration = Duration::from_secs(300);
/// The event (Warning) when a relay with several pods gets no PodDisruptionBudget.
pub const NO_DISRUPTION_BUDGET: &str = "PodDisruptionBudgetUnsupported";

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

/// Name check, identity Secret (created once, then read), Services, Deployment, disruption
/// budget, status.
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
    } else {
        retain_or_own(relay, ctx, &secret).await?;
    }

    let (deployment, exposure) = deploy_children(relay, ctx, &peer_id).await?;
    let budget_note = disruption_budget(relay, ctx).await?;
    let (ready, complete) = rollout(&deployment);
    let (reason, mut message) = readiness(relay, ctx, ready, complete, &exposure).await;
    if let Some(note) = budget_note {
        message = format!("{message}; {note}");
    }
    let status = TokenGoRelayStatus {
        peer_id: Some(peer_id.clone()),
        addresses: desired::addresses(relay, &ctx.settings, &peer_id, &exposure),
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

/// Gives an existing identity Secret the owner reference `retainIdentity` asks for: none (it
/// outlives the relay), or the relay's (it goes with it). Only the owner references change
/// (an immutable Secret's metadata may); a concurrent change fails the pass with a conflict.
async fn retain_or_own(
    relay: &TokenGoRelay,
    ctx: &Context,
    secret: &Secret,
) -> Result<(), ReconcileError> {
    let owners = key_secret_owners(relay, secret.owner_references(), relay.spec.retain_identity);
    if owners == secret.owner_references() {
        return Ok(());
    }
    let mut replacement = secret.clone();
    replacement.metadata.owner_references = (!owners.is_empty()).then_some(owners);
    let secrets: Api<Secret> = namespaced(&ctx.client, relay)?;
    let name = secret.name_any();
    match secrets
        .replace(&name, &PostParams::default(), &replacement)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Err(ReconcileError::Conflict(name)),
        Err(error) => Err(error.into()),
    }
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

/// Applies both Services and the Deployment (whose pods run as `peer_id`, announcing what the
/// relay Service's [`Exposure`] allows); returns the Deployment as the API server has it and
/// that exposure.
async fn deploy_children(
    relay: &TokenGoRelay,
    ctx: &Context,
    peer_id: &str,
) -> Result<(Deployment, Exposure), ReconcileError> {
    let services: Api<Service> = namespaced(&ctx.client, relay)?;
    let service = apply(&services, &desired::service(relay)).await?;
    apply(&services, &desired::pods_service(relay)).await?;
    let exposure = desired::exposure(&service);
    let deployments: Api<Deployment> = namespaced(&ctx.client, relay)?;
    let deployment = apply(
        &deployments,
        &desired::deployment(relay, &ctx.settings, peer_id, &exposure),
    )
    .await?;
    Ok((deployment, exposure))
}

/// Whether the API server serves `policy/v1` PodDisruptionBudgets (Kubernetes 1.21 and
/// later).
async fn disruption_budgets_served(client: &Client) -> Result<bool, ReconcileError> {
    match client.list_api_group_resources("policy/v1").await {
        Ok(list) => Ok(list
            .resources
            .iter()
            .any(|r| r.name == "poddisruptionbudgets")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Applies the relay's PodDisruptionBudget (more than one pod) or removes the one it no longer
/// needs. Where the API server does not serve `policy/v1` a relay with several pods goes
/// without one: a Warning event (once per spec generation) and a note for the Ready message,
/// never an error.
async fn disruption_budget(
    relay: &TokenGoRelay,
    ctx: &Context,
) -> Result<Option<String>, ReconcileError> {
    let wanted = desired::disruption_budget(relay);
    if !disruption_budgets_served(&ctx.client).await? {
        if wanted.is_none() {
            return Ok(None);
        }
        let note = "no PodDisruptionBudget: the API server does not serve policy/v1 \
                    (Kubernetes before 1.21), so node drains may evict several relay pods at once"
            .to_owned();
        let new_spec =
            relay.status.as_ref().and_then(|s| s.observed_generation) != relay.metadata.generation;
        if new_spec {
            ctx.event(
                relay,
                EventType::Warning,
                NO_DISRUPTION_BUDGET,
                note.clone(),
            )
            .await;
        }
        return Ok(Some(note));
    }
    let budgets: Api<PodDisruptionBudget> = namespaced(&ctx.client, relay)?;
    if let Some(budget) = wanted {
        apply(&budgets, &budget).await?;
        return Ok(None);
    }
    let name = desired::workload_name(relay);
    let uid = relay.meta().uid.as_deref();
    let owned = budgets.get_opt(&name).await?.is_some_and(|b| {
        b.owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
    });
    if owned {
        match budgets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(None)
}

/// The Ready condition's reason and message after the rollout: `ready` pods, `complete` or
/// not. A relay that cannot be found or reached through the DHT it announces itself on is not
/// Ready whatever its pods, and gets one Warning event when it starts being so.
async fn readiness(
    relay: &TokenGoRelay,
    ctx: &Context,
    ready: i32,
    complete: bool,
    exposure: &Exposure,
) -> (ReadyReason, String) {
    let replicas = format!("{ready}/{} replicas ready", relay.spec.replicas);
    let Some((reason, problem)) = desired::announce_problem(relay, exposure) else {
        let reason = if complete {
            ReadyReason::Available
        } else {
            ReadyReason::Progressing
        };
        return (reason, replicas);
    };
    // It runs (reachable at its addresses) but cannot be found, or reached, on the DHT.
    let previous = relay
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .map(|c| c.reason.as_str());
    if previous != Some(reason.as_str()) {
        ctx.event(relay, EventType::Warning, reason.as_str(), problem.clone())
            .await;
    }
    (reason, format!("{problem} ({replicas})"))
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

//! The async shells: read what exists, call the pure builders in `manifest`, apply the result
//! with server-side apply (one field manager), write the status, publish events. Keys are only
//! ever created when absent (a 409 means another writer won and its key is used), never
//! regenerated.

pub mod exit;
pub mod relay;

use std::{collections::HashMap, fmt::Debug, sync::Arc, sync::Mutex, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{apps::v1::Deployment, core::v1::Secret},
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

use crate::{
    keys::KeyError,
    manifest::{FIELD_MANAGER, Settings},
    metrics::Metrics,
    resource::{TokenGoExit, TokenGoRelay},
};

/// Why one reconciliation failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Key material could not be made.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// The resource is not namespaced (the CRDs make that impossible).
    #[error("{0} has no namespace")]
    NoNamespace(String),
    /// Someone changed the key Secret between our read and our write; the next attempt
    /// re-reads it.
    #[error("the key Secret {0} changed while rotating; retrying")]
    Conflict(String),
}

impl From<tokengo_proto::keyring::KeyringError> for ReconcileError {
    fn from(error: tokengo_proto::keyring::KeyringError) -> Self {
        Self::Keys(error.into())
    }
}

/// What every reconciliation needs.
pub struct Context {
    /// API client (in tests: impersonating the chart's ServiceAccount).
    pub client: Client,
    /// Operator-wide settings.
    pub settings: Settings,
    /// Publishes events about the resources.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose events are reported as `instance` (the pod name) of the operator.
    #[must_use]
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance,
            },
        );
        Self {
            client,
            settings,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an event; a failure to publish is logged, never fatal.
    pub(crate) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not publish event");
        }
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    /// Backoff after a failure: 1 s, 2 s, 4 s … capped at 5 minutes.
    fn failed(&self, key: &str) -> Duration {
        let count = self.failures.lock().map_or(1, |mut failures| {
            let n = failures.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        });
        backoff(count)
    }
}

/// The delay after `failures` consecutive failures.
#[must_use]
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Server-side applies `object` with the operator's field manager (forcing ownership of the
/// fields it sets: the operator is their only author).
pub(crate) async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, ReconcileError>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Returns the Secret `name`, creating it from `make` when absent. A 409 on create means
/// another writer created it first: that one is used. Never replaces an existing Secret.
pub(crate) async fn ensure_secret(
    api: &Api<Secret>,
    name: &str,
    make: impl FnOnce() -> Result<Secret, ReconcileError>,
) -> Result<(Secret, bool), ReconcileError> {
    if let Some(secret) = api.get_opt(name).await? {
        return Ok((secret, false));
    }
    match api.create(&PostParams::default(), &make()?).await {
        Ok(secret) => Ok((secret, true)),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok((api.get(name).await?, false)),
        Err(error) => Err(error.into()),
    }
}

/// Writes `status` into the resource's status subresource unless it already says exactly that,
/// so an unchanged resource is never written.
pub(crate) async fn write_status<K, S>(
    api: &Api<K>,
    object: &K,
    current: Option<&S>,
    status: S,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    match api
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
    {
        // Deleted while we reconciled: its children go with it (garbage collection).
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
        Ok(_) => Ok(()),
    }
}

/// Ready replicas of a Deployment, and whether it has fully rolled out its current spec.
pub(crate) fn rollout(deployment: &Deployment) -> (i32, bool) {
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let generation = deployment.metadata.generation;
    let Some(status) = &deployment.status else {
        return (0, false);
    };
    let ready = status.ready_replicas.unwrap_or(0);
    let current = status.observed_generation.is_some() && status.observed_generation >= generation;
    let complete = current
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.available_replicas.unwrap_or(0) >= wanted
        && ready >= wanted;
    (ready, complete)
}

/// A namespaced API for `K` in the object's namespace.
pub(crate) fn namespaced<K, O>(client: &Client, object: &O) -> Result<Api<K>, ReconcileError>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
    O: Resource,
{
    let namespace = object.meta().namespace.clone().ok_or_else(|| {
        ReconcileError::NoNamespace(object.meta().name.clone().unwrap_or_default())
    })?;
    Ok(Api::namespaced(client.clone(), &namespace))
}

fn object_key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Runs both controllers until `shutdown` fires, then lets reconciliations in flight finish.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));

    let relays = Controller::new(
        Api::<TokenGoRelay>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Deployment>::all(client.clone()), owned.clone())
    .owns(
        Api::<k8s_openapi::api::core::v1::Service>::all(client.clone()),
        owned.clone(),
    )
    .owns(Api::<Secret>::all(client.clone()), owned.clone())
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(relay::reconcile, error_policy, ctx.clone())
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "relay controller");
        }
    });

    let exit_controller = Controller::new(
        Api::<TokenGoExit>::all(client.clone()),
        watcher::Config::default(),
    );
    let exits_store = exit_controller.store();
    let exits = exit_controller
        // The exit's pods (h-opwork: a StatefulSet), and the Deployment an earlier operator
        // version made, so its deletion (when the StatefulSet replaces it) triggers a pass.
        .owns(
            Api::<k8s_openapi::api::apps::v1::StatefulSet>::all(client.clone()),
            owned.clone(),
        )
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Secret>::all(client.clone()), owned)
        // An exit that names a relay follows that relay's identity and address.
        .watches(
            Api::<TokenGoRelay>::all(client),
            watcher::Config::default(),
            move |relay: TokenGoRelay| {
                let namespace = relay.namespace();
                let name = relay.name_any();
                exits_store
                    .state()
                    .into_iter()
                    .filter(|exit| {
                        exit.namespace() == namespace
                            && exit.spec.relay.name.as_deref() == Some(name.as_str())
                    })
                    .map(|exit| ObjectRef::from_obj(&*exit))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(exit::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "exit controller");
            }
        });

    futures_util::future::join(relays, exits).await;
}

fn error_policy<K: Resource>(object: Arc<K>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = object_key(&*object);
    let delay = ctx.failed(&key);
    tracing::warn!(object = %key, %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn rollout_counts_only_the_current_generation() {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        d.metadata.generation = Some(3);
        assert_eq!(rollout(&d), (0, false));
        d.status = Some(DeploymentStatus {
            observed_generation: Some(2),
            ready_replicas: Some(2),
            available_replicas: Some(2),
            updated_replicas: Some(2),
            ..Default::default()
        });
        assert_eq!(rollout(&d), (2, false), "status of an older generation");
        if let Some(s) = d.status.as_mut() {
            s.observed_generation = Some(3);
        }
        assert_eq!(rollout(&d), (2, true));
        if let Some(s) = d.status.as_mut() {
            s.available_replicas = Some(1);
        }
        assert_eq!(rollout(&d), (2, false));
    }
}

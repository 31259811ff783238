//! The async shells: read what exists, call the pure builders in `manifest`, apply the result
//! with server-side apply (one field manager), write the status, publish events. Keys are only
//! ever created when absent (a 409 means another writer won and its key is used), never
//! regenerated. The controllers watch every namespace or only the ones named ([`WatchScope`]);
//! every error is logged at warn level with the object and what to do, and counted.

pub mod exit;
pub mod relay;

use std::{
    collections::HashMap,
    fmt::Debug,
    future::Future,
    sync::Arc,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{Deployment, StatefulSet},
        core::v1::{Secret, Service},
    },
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::{self, Action},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
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

impl ReconcileError {
    /// A short snake_case word for the `reason` label of the error metric.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(error) => api_reason(error),
            Self::Keys(_) => "keys",
            Self::NoNamespace(_) => "no_namespace",
            Self::Conflict(_) => "key_conflict",
        }
    }

    /// What an operator of the cluster can do about it (logged with the error).
    #[must_use]
    pub fn hint(&self) -> &'static str {
        match self.reason() {
            "forbidden" => {
                "the operator's RBAC lacks a permission: install or upgrade the chart with \
                 rbac.create=true (with watchNamespaces, the object's namespace must be listed), \
                 or grant the rules in charts/tokengo/files/operator-rules.yaml"
            }
            "not_found" => {
                "an object or an API it needs is missing (deleted meanwhile, or CRDs not \
                 installed); retried with backoff"
            }
            "conflict" | "key_conflict" => {
                "another writer changed the object at the same time; retried with backoff"
            }
            "invalid" => {
                "the API server refused an object the operator built: check the resource's \
                 spec (kubectl describe) and that the CRDs match the operator's version"
            }
            "unavailable" | "unreachable" => {
                "the API server is overloaded or unreachable; retried with backoff"
            }
            "keys" => {
                "key material could not be made or read: see the error; an unreadable key \
                 Secret is never overwritten, fix or delete it"
            }
            _ => "retried with backoff; see the error",
        }
    }
}

/// The metric reason for a failed API call.
fn api_reason(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) => match status.code {
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            410 => "expired",
            400 | 422 => "invalid",
            429 | 500..=599 => "unavailable",
            _ => "api",
        },
        _ => "unreachable",
    }
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
    /// Where the controllers look (default: every namespace).
    pub scope: WatchScope,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("scope", &self.scope)
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
            scope: WatchScope::All,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context, watching only `scope`.
    #[must_use]
    pub fn watching(mut self, scope: WatchScope) -> Self {
        self.scope = scope;
        self
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

/// The namespaces the controllers watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace (a ClusterRole's worth of permissions).
    #[default]
    All,
    /// Only these (at least one; sorted, no duplicates): one pair of controllers per
    /// namespace, so a Role in each is all the RBAC they need.
    Namespaces(Vec<String>),
}

/// Why a namespace list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchScopeError {
    /// Not a namespace name (an RFC 1123 label: lowercase letters, digits and `-`, at most 63).
    #[error("{0:?} is not a namespace name (lowercase letters, digits and '-', at most 63)")]
    BadName(String),
}

impl WatchScope {
    /// Every namespace when `names` is empty (or only blanks), else exactly those.
    pub fn new<I, S>(names: I) -> Result<Self, WatchScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            let valid = name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid {
                return Err(WatchScopeError::BadName(name.to_owned()));
            }
            out.push(name.to_owned());
        }
        out.sort();
        out.dedup();
        Ok(if out.is_empty() {
            Self::All
        } else {
            Self::Namespaces(out)
        })
    }

    /// One API handle per watched scope: `Api::all`, or one `Api::namespaced` per namespace.
    #[must_use]
    pub fn apis<K>(&self, client: &Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Self::All => vec![Api::all(client.clone())],
            Self::Namespaces(names) => names
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect(),
        }
    }

    /// The same handle in one scope: `None` is every namespace.
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            None => Api::all(client.clone()),
            Some(ns) => Api::namespaced(client.clone(), ns),
        }
    }

    fn scopes(&self) -> Vec<Option<String>> {
        match self {
            Self::All => vec![None],
            Self::Namespaces(names) => names.iter().cloned().map(Some).collect(),
        }
    }
}

impl std::fmt::Display for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all namespaces"),
            Self::Namespaces(names) => write!(f, "namespaces {}", names.join(", ")),
        }
    }
}

/// The label selector of every child the operator makes (what its child watches see).
#[must_use]
pub fn owned_selector() -> String {
    format!("app.kubernetes.io/managed-by={FIELD_MANAGER}")
}

const RELAY_KIND: &str = "TokenGoRelay";
const EXIT_KIND: &str = "TokenGoExit";

/// How long reconciliations in flight may take to finish once the operator stops; then they
/// are abandoned (each one is idempotent: the next leader redoes it). Well inside the pod's
/// 30 s termination grace period, which must also fit releasing the lease.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Runs the controllers (a relay and an exit controller per watched scope) until `shutdown`
/// fires, then lets reconciliations in flight finish (for [`DRAIN`] at most).
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut controllers: Vec<BoxFuture<'static, ()>> = Vec::new();
    for namespace in ctx.scope.scopes() {
        controllers.push(relay_controller(
            ctx.clone(),
            namespace.as_deref(),
            shutdown.clone(),
        ));
        controllers.push(exit_controller(
            ctx.clone(),
            namespace.as_deref(),
            shutdown.clone(),
        ));
    }
    let all = futures_util::future::join_all(controllers);
    tokio::pin!(all);
    tokio::select! {
        _ = &mut all => return,
        () = shutdown.cancelled() => {}
    }
    if tokio::time::timeout(DRAIN, all).await.is_err() {
        tracing::warn!(
            drain = ?DRAIN,
            "reconciliations still running when stopping; abandoned (the next leader redoes them)"
        );
    }
}

/// The graceful-shutdown trigger of one controller: `shutdown`, but not before the controller's
/// cache has been filled once (or a few seconds have passed). kube's runner holds work until the
/// cache is ready, and a shutdown before that would leave it waiting for good.
async fn stopped<K>(shutdown: CancellationToken, store: Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready()).await;
}

fn relay_controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: CancellationToken,
) -> BoxFuture<'static, ()> {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(&owned_selector());
    let metrics = ctx.metrics.clone();
    Controller::new(
        WatchScope::api::<TokenGoRelay>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(
        WatchScope::api::<Deployment>(&client, namespace),
        owned.clone(),
    )
    .owns(
        WatchScope::api::<Service>(&client, namespace),
        owned.clone(),
    )
    .owns(WatchScope::api::<Secret>(&client, namespace), owned)
    .graceful_shutdown_on(shutdown.cancelled_owned())
    .run(
        |relay, ctx| timed(RELAY_KIND, ctx.clone(), relay::reconcile(relay, ctx)),
        |relay, error, ctx| error_policy(RELAY_KIND, relay, error, ctx),
        ctx,
    )
    .for_each(move |result| {
        report(RELAY_KIND, &metrics, result);
        futures_util::future::ready(())
    })
    .boxed()
}

fn exit_controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: CancellationToken,
) -> BoxFuture<'static, ()> {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(&owned_selector());
    let metrics = ctx.metrics.clone();
    let controller = Controller::new(
        WatchScope::api::<TokenGoExit>(&client, namespace),
        watcher::Config::default(),
    );
    let exits_store = controller.store();
    let store = controller.store();
    controller
        .owns(
            WatchScope::api::<Deployment>(&client, namespace),
            owned.clone(),
        )
        .owns(
            WatchScope::api::<StatefulSet>(&client, namespace),
            owned.clone(),
        )
        .owns(WatchScope::api::<Secret>(&client, namespace), owned)
        // An exit that names a relay follows that relay's identity and address.
        .watches(
            WatchScope::api::<TokenGoRelay>(&client, namespace),
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
        .graceful_shutdown_on(stopped(shutdown, store))
        .run(
            |exit, ctx| timed(EXIT_KIND, ctx.clone(), exit::reconcile(exit, ctx)),
            |exit, error, ctx| error_policy(EXIT_KIND, exit, error, ctx),
            ctx,
        )
        .for_each(move |result| {
            report(EXIT_KIND, &metrics, result);
            futures_util::future::ready(())
        })
        .boxed()
}

/// Runs one reconciliation, recording how long it took.
async fn timed(
    kind: &'static str,
    ctx: Arc<Context>,
    work: impl Future<Output = Result<Action, ReconcileError>>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = work.await;
    ctx.metrics.reconcile_took(kind, started.elapsed());
    result
}

/// After a failed reconciliation: count it, say what happened and what to do, retry later.
fn error_policy<K: Resource>(
    kind: &'static str,
    object: Arc<K>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let key = object_key(&*object);
    let delay = ctx.failed(&key);
    ctx.metrics.error(kind, error.reason());
    tracing::warn!(
        kind,
        object = %key,
        %error,
        reason = error.reason(),
        hint = error.hint(),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// What a controller stream's error means and what to do about it; `None` for the ones that
/// are not problems (already reported by [`error_policy`], or routine).
#[must_use]
pub fn stream_error_reason<E>(
    error: &controller::Error<E, watcher::Error>,
) -> Option<(&'static str, &'static str)> {
    match error {
        // Deleted before its turn came, or a failure error_policy has already reported.
        controller::Error::ObjectNotFound(_) | controller::Error::ReconcilerFailed(..) => None,
        controller::Error::QueueError(watch) => {
            let reason = match watch {
                watcher::Error::InitialListFailed(e)
                | watcher::Error::WatchStartFailed(e)
                | watcher::Error::WatchFailed(e) => api_reason(e),
                watcher::Error::WatchError(status) => match status.code {
                    403 => "forbidden",
                    404 => "not_found",
                    // The watch's resourceVersion is too old: the watcher lists again.
                    410 => return None,
                    _ => "api",
                },
                watcher::Error::NoResourceVersion => "api",
            };
            let hint = match reason {
                "forbidden" => {
                    "the operator may not list or watch a kind it needs: install or upgrade \
                     the chart with rbac.create=true (with watchNamespaces, a Role in each \
                     namespace), or grant charts/tokengo/files/operator-rules.yaml"
                }
                "not_found" => {
                    "an API the operator watches is not served: install the CRDs \
                     (kubectl apply --server-side -f crds/, or --apply-crds)"
                }
                "unauthorized" => "the operator's credentials were refused (ServiceAccount token)",
                _ => "the watch is retried with backoff; see the error",
            };
            Some((watch_reason(reason), hint))
        }
        controller::Error::RunnerError(_) => Some(("runner", "an internal error; retried")),
    }
}

/// The metric reason of a watch failure: the API reason with a `watch_` prefix, so it is told
/// apart from a reconcile that failed for the same reason.
fn watch_reason(reason: &'static str) -> &'static str {
    match reason {
        "forbidden" => "watch_forbidden",
        "not_found" => "watch_not_found",
        "unauthorized" => "watch_unauthorized",
        "unavailable" => "watch_unavailable",
        "unreachable" => "watch_unreachable",
        _ => "watch_failed",
    }
}

fn report<K: Resource, E: std::error::Error>(
    kind: &'static str,
    metrics: &Metrics,
    result: Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>,
) {
    let Err(error) = result else {
        return;
    };
    match stream_error_reason(&error) {
        Some((reason, hint)) => {
            metrics.error(kind, reason);
            tracing::warn!(kind, %error, reason, hint, "controller error");
        }
        None => tracing::debug!(kind, %error, "controller"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn watch_scope_is_all_or_sorted_valid_namespaces() {
        assert_eq!(WatchScope::new(Vec::<String>::new()), Ok(WatchScope::All));
        assert_eq!(WatchScope::new(["", " "]), Ok(WatchScope::All));
        assert_eq!(
            WatchScope::new(["b", "a", "b", " c "]),
            Ok(WatchScope::Namespaces(vec![
                "a".into(),
                "b".into(),
                "c".into()
            ]))
        );
        for bad in ["Upper", "-a", "a-", "a_b", "a.b", &"x".repeat(64)] {
            assert_eq!(
                WatchScope::new([bad]),
                Err(WatchScopeError::BadName(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(
            WatchScope::new(["a", "b"]).unwrap().to_string(),
            "namespaces a, b"
        );
    }

    #[test]
    fn errors_have_a_reason_and_a_hint() {
        let forbidden = ReconcileError::Kube(api_error(403));
        assert_eq!(forbidden.reason(), "forbidden");
        assert!(forbidden.hint().contains("rbac.create=true"));
        assert_eq!(ReconcileError::Kube(api_error(422)).reason(), "invalid");
        assert_eq!(ReconcileError::Kube(api_error(503)).reason(), "unavailable");
        assert_eq!(
            ReconcileError::Conflict("s".into()).reason(),
            "key_conflict"
        );

        type StreamError = controller::Error<ReconcileError, watcher::Error>;
        let watch = |e: watcher::Error| stream_error_reason(&StreamError::QueueError(e));
        let (reason, hint) = watch(watcher::Error::InitialListFailed(api_error(403))).unwrap();
        assert_eq!(reason, "watch_forbidden");
        assert!(hint.contains("operator-rules.yaml"), "{hint}");
        let (reason, hint) = watch(watcher::Error::WatchStartFailed(api_error(404))).unwrap();
        assert_eq!(reason, "watch_not_found");
        assert!(
            hint.contains("kubectl apply --server-side -f crds/"),
            "{hint}"
        );
        assert_eq!(
            watch(watcher::Error::WatchError(Box::new(kube::core::Status {
                code: 410,
                ..Default::default()
            }))),
            None,
            "an expired watch is routine"
        );
        // Reported by error_policy already.
        let failed = StreamError::ReconcilerFailed(
            ReconcileError::Conflict("s".into()),
            Box::new(ObjectRef::<TokenGoRelay>::new("x").erase()),
        );
        assert_eq!(stream_error_reason(&failed), None);
    }

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

//! What the operator checks and does once at start, before it enters the leader election: it
//! applies the CustomResourceDefinitions it was built with (when asked to: Helm installs a
//! chart's `crds/` once and never upgrades them), checks that the API server serves both
//! resources, and that it may list every kind it watches in every namespace it watches. A
//! missing CRD or a missing permission then stops the process with a message saying what to do,
//! instead of a replica that looks ready and does nothing.

use std::{cmp::Ordering, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        core::v1::{Secret, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
};
use serde::de::DeserializeOwned;

use crate::{
    manifest::FIELD_MANAGER,
    reconcile::{WatchScope, owned_selector},
    resource::{self, GROUP, TokenGoExit, TokenGoRelay},
};

/// Annotation on a CRD the operator applied: the operator version whose schema it holds. An
/// older operator leaves a CRD stamped newer alone.
pub const CRD_VERSION_ANNOTATION: &str = "tokengo.io/operator-version";

/// The API version both resources are served at.
pub const API_VERSION: &str = "v1alpha1";

/// How to install the CRDs by hand; part of every "CRDs missing" message.
const INSTALL_CRDS: &str = "install the CRDs: `helm upgrade --install` the chart with \
     applyCrds=true (the default; the operator applies them at start), or by hand \
     `kubectl apply --server-side -f crds/` (the chart's crds/ directory)";

/// Why the operator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The API server does not serve the resources.
    #[error(
        "the API server does not serve {GROUP}/{API_VERSION} {missing}: the TokenGo CRDs are not installed (or not yet established); {INSTALL_CRDS}"
    )]
    CrdsMissing {
        /// The plural names not served, comma-separated.
        missing: String,
    },
    /// A list the controllers need is forbidden.
    #[error(
        "the operator may not list {what} in {scope}: {message}; grant the chart's RBAC (`helm upgrade` with rbac.create=true; with watchNamespaces, a Role in each namespace) or the rules in charts/tokengo/files/operator-rules.yaml, or watch only permitted namespaces (--namespace)"
    )]
    Forbidden {
        /// The resource (plural, with group).
        what: String,
        /// "all namespaces" or "namespace X".
        scope: String,
        /// The API server's message (names the user).
        message: String,
    },
    /// Applying a CRD was refused.
    #[error(
        "cannot apply the CRD {name}: {error}; grant the chart's CRD rules (files/crd-rules.yaml, applyCrds=true), or start with --apply-crds=false and {INSTALL_CRDS}"
    )]
    ApplyCrd {
        /// The CRD's name.
        name: String,
        /// What the API server said.
        error: String,
    },
    /// A CRD applied by the operator did not become established.
    #[error("the CRD {name} was applied but is not established after {waited:?}: {why}")]
    NotEstablished {
        /// The CRD's name.
        name: String,
        /// How long the operator waited.
        waited: Duration,
        /// The last condition message, if any.
        why: String,
    },
    /// Another API call failed.
    #[error("{what}: {error}")]
    Api {
        /// What was being done.
        what: String,
        /// What the API server (or the connection to it) said.
        error: String,
    },
}

/// An API error in one line: the status code, reason and message the API server sent (not the
/// whole Status structure), or the transport error.
fn said(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    }
}

/// A release version `MAJOR.MINOR.PATCH[-PRE]`, ordered as SemVer orders releases (a
/// pre-release below its release; pre-releases compared as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    core: (u64, u64, u64),
    pre: Option<String>,
}

impl Version {
    /// Parses `1.2.3`, `1.2.3-rc.1` (build metadata after `+` is ignored); `None` otherwise.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let text = text.split('+').next().unwrap_or_default();
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre.to_owned())),
            Some(_) => return None,
            None => (text, None),
        };
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Self {
            core: (major, minor, patch),
            pre,
        })
    }

    /// This operator's version.
    #[must_use]
    pub fn ours() -> Self {
        // CARGO_PKG_VERSION is always MAJOR.MINOR.PATCH[-PRE].
        Self::parse(env!("CARGO_PKG_VERSION")).unwrap_or(Self {
            core: (0, 0, 0),
            pre: None,
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor, patch) = self.core;
        write!(f, "{major}.{minor}.{patch}")?;
        if let Some(pre) = &self.pre {
            write!(f, "-{pre}")?;
        }
        Ok(())
    }
}

/// What to do with one CRD at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdDecision {
    /// Apply ours: absent, installed by someone else (Helm's `crds/`, kubectl), or stamped with
    /// our version or an older one.
    Apply,
    /// Leave it: a newer operator applied it. Applying an older schema would drop the newer
    /// fields from the schema (the API server then prunes them from objects on their next
    /// write: data loss) and could remove a version objects are stored in; during a rolling
    /// update or a rollback, old replicas must not undo the new one's CRDs.
    KeepNewer(Version),
}

/// Decides, from the CRD in the cluster (if any), whether an operator of version `ours` applies
/// its own. A stamp that is not a version is treated like no stamp (applied over).
#[must_use]
pub fn crd_decision(existing: Option<&CustomResourceDefinition>, ours: &Version) -> CrdDecision {
    let stamped = existing
        .and_then(|crd| crd.annotations().get(CRD_VERSION_ANNOTATION))
        .and_then(|v| Version::parse(v));
    match stamped {
        Some(theirs) if theirs > *ours => CrdDecision::KeepNewer(theirs),
        _ => CrdDecision::Apply,
    }
}

/// What applying the CRDs did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdOutcome {
    /// The CRD's name.
    pub name: String,
    /// Applied, or left alone.
    pub decision: CrdDecision,
}

/// How long a freshly applied CRD may take to be established (served).
const ESTABLISH_WAIT: Duration = Duration::from_secs(60);

/// Applies the CRDs this operator was built with (server-side apply, the operator's field
/// manager, forced: the operator owns their schema), each stamped with its version, except
/// where a newer operator's CRD is already in place; then waits until each is established.
pub async fn apply_crds(client: &Client) -> Result<Vec<CrdOutcome>, StartupError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ours = Version::ours();
    let mut outcomes = Vec::new();
    for mut crd in resource::definitions() {
        let name = crd.name_any();
        let existing = api
            .get_opt(&name)
            .await
            .map_err(|error| StartupError::ApplyCrd {
                name: name.clone(),
                error: said(&error),
            })?;
        let decision = crd_decision(existing.as_ref(), &ours);
        if decision == CrdDecision::Apply {
            crd.annotations_mut()
                .insert(CRD_VERSION_ANNOTATION.to_owned(), ours.to_string());
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|error| StartupError::ApplyCrd {
                name: name.clone(),
                error: said(&error),
            })?;
            wait_established(&api, &name).await?;
        }
        outcomes.push(CrdOutcome { name, decision });
    }
    Ok(outcomes)
}

/// Polls the CRD (a get: the CRD rules grant no watch) until it is established.
async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<(), StartupError> {
    let deadline = tokio::time::Instant::now() + ESTABLISH_WAIT;
    loop {
        let crd = api.get(name).await.map_err(|error| StartupError::Api {
            what: format!("reading the CRD {name}"),
            error: said(&error),
        })?;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Established"));
        if established.is_some_and(|c| c.status == "True") {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartupError::NotEstablished {
                name: name.to_owned(),
                waited: ESTABLISH_WAIT,
                why: established
                    .and_then(|c| c.message.clone())
                    .unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks that `tokengo.io/v1alpha1` serves both resources (API discovery).
pub async fn check_crds(client: &Client) -> Result<(), StartupError> {
    let served = match client
        .list_api_group_resources(&format!("{GROUP}/{API_VERSION}"))
        .await
    {
        Ok(list) => list.resources.into_iter().map(|r| r.name).collect(),
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(error) => {
            return Err(StartupError::Api {
                what: format!("discovering {GROUP}/{API_VERSION}"),
                error: said(&error),
            });
        }
    };
    let missing: Vec<String> = [
        TokenGoRelay::plural(&()).into_owned(),
        TokenGoExit::plural(&()).into_owned(),
    ]
    .into_iter()
    .filter(|plural| !served.contains(plural))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StartupError::CrdsMissing {
            missing: missing.join(", "),
        })
    }
}

/// Checks that the operator may list every kind its controllers watch, in every namespace it
/// watches (a list of at most one object: cheap, and exactly what the watches start with).
pub async fn check_access(client: &Client, scope: &WatchScope) -> Result<(), StartupError> {
    let all = ListParams::default().limit(1);
    let owned = ListParams::default().labels(&owned_selector()).limit(1);
    for_each_api::<TokenGoRelay>(client, scope, &all).await?;
    for_each_api::<TokenGoExit>(client, scope, &all).await?;
    for_each_api::<Deployment>(client, scope, &owned).await?;
    for_each_api::<StatefulSet>(client, scope, &owned).await?;
    for_each_api::<Service>(client, scope, &owned).await?;
    for_each_api::<Secret>(client, scope, &owned).await?;
    Ok(())
}

async fn for_each_api<K>(
    client: &Client,
    scope: &WatchScope,
    params: &ListParams,
) -> Result<(), StartupError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let dt = K::DynamicType::default();
    let group = K::group(&dt);
    let what = if group.is_empty() {
        K::plural(&dt).into_owned()
    } else {
        format!("{}.{group}", K::plural(&dt))
    };
    for api in scope.apis::<K>(client) {
        let where_ = api.namespace().map_or_else(
            || "all namespaces".to_owned(),
            |ns| format!("namespace {ns}"),
        );
        match api.list_metadata(params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 403 => {
                return Err(StartupError::Forbidden {
                    what,
                    scope: where_,
                    message: status.message,
                });
            }
            Err(kube::Error::Api(status)) if status.code == 404 && K::group(&dt) == GROUP => {
                return Err(StartupError::CrdsMissing { missing: what });
            }
            Err(error) => {
                return Err(StartupError::Api {
                    what: format!("listing {what} in {where_}"),
                    error: said(&error),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(version: Option<&str>) -> CustomResourceDefinition {
        let mut crd = resource::definitions().remove(0);
        if let Some(v) = version {
            crd.annotations_mut()
                .insert(CRD_VERSION_ANNOTATION.to_owned(), v.to_owned());
        }
        crd
    }

    #[test]
    fn versions_order_as_semver_releases() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(v("0.2.0") > v("0.1.9"));
        assert!(v("0.10.0") > v("0.9.0"), "numeric, not text");
        assert!(
            v("1.0.0") > v("1.0.0-rc.1"),
            "a pre-release is below its release"
        );
        assert!(v("1.0.0-rc.2") > v("1.0.0-rc.1"));
        assert_eq!(v("v1.2.3"), v("1.2.3+build.5"));
        assert_eq!(v("1.2.3-rc.1").to_string(), "1.2.3-rc.1");
        for bad in ["", "1", "1.2", "1.2.3.4", "1.x.3", "1.2.3-", "latest"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Version::ours().to_string(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_newer_operators_crd_is_never_downgraded() {
        let ours = Version::parse("0.3.0").unwrap();
        assert_eq!(crd_decision(None, &ours), CrdDecision::Apply, "absent");
        assert_eq!(
            crd_decision(Some(&stamped(None)), &ours),
            CrdDecision::Apply,
            "installed by Helm or kubectl: ours replaces it"
        );
        assert_eq!(
            crd_decision(Some(&stamped(Some("0.2.9"))), &ours),
            CrdDecision::Apply,
            "older: upgraded"
        );
        assert_eq!(
            crd_decision(Some(&stamped(Some("0.3.0"))), &ours),
            CrdDecision::Apply,
            "ours: re-applied (repairs drift)"
        );
        assert_eq!(
            crd_decision(Some(&stamped(Some("0.4.0-rc.1"))), &ours),
            CrdDecision::KeepNewer(Version::parse("0.4.0-rc.1").unwrap()),
        );
        assert_eq!(
            crd_decision(Some(&stamped(Some("not-a-version"))), &ours),
            CrdDecision::Apply
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let missing = StartupError::CrdsMissing {
            missing: "tokengorelays, tokengoexits".into(),
        }
        .to_string();
        assert!(
            missing.contains("kubectl apply --server-side -f crds/"),
            "{missing}"
        );
        assert!(
            missing.contains("tokengo.io/v1alpha1 tokengorelays"),
            "{missing}"
        );
        let forbidden = StartupError::Forbidden {
            what: "secrets".into(),
            scope: "namespace a".into(),
            message: "User \"x\" cannot list resource \"secrets\"".into(),
        }
        .to_string();
        assert!(forbidden.contains("rbac.create=true"), "{forbidden}");
        assert!(forbidden.contains("namespace a"), "{forbidden}");
    }
}

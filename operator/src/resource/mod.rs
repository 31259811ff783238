//! The custom resources the operator serves (`tokengo.io/v1alpha1`): their specs, which the
//! CRD schemas validate on the API server, and their statuses, which carry the public facts
//! (PeerIds, addresses, key configurations) users need to connect.

pub mod exit;
pub mod relay;
pub mod shared;

pub use exit::{TokenGoExit, TokenGoExitSpec, TokenGoExitStatus};
pub use relay::{TokenGoRelay, TokenGoRelaySpec, TokenGoRelayStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;

/// The API group of every TokenGo resource.
pub const GROUP: &str = "tokengo.io";

/// Both CRDs, in the order they are printed and committed.
#[must_use]
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![TokenGoRelay::crd(), TokenGoExit::crd()]
}

/// One CRD as the YAML committed under `crds/` (and the chart's `crds/`).
pub fn definition_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(crd)
}

/// The file name a CRD is committed under: `<plural>.<group>.yaml`, as `kubectl` names them.
#[must_use]
pub fn definition_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The committed CRDs (`crds/` and the chart's copy) are exactly what the code generates.
    /// To update them: `cargo run -p tokengo-operator -- crd` (see `scripts/update-crds`).
    #[test]
    fn committed_crds_match_the_code() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        for crd in definitions() {
            let want = definition_yaml(&crd).unwrap();
            for dir in ["crds", "charts/tokengo/crds"] {
                let path = root.join(dir).join(definition_file_name(&crd));
                let have = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}; run scripts/update-crds", path.display()));
                assert!(
                    have == want,
                    "{} drifted from the code; run scripts/update-crds",
                    path.display()
                );
            }
        }
    }

    fn spec_property(crd: &CustomResourceDefinition, name: &str) -> serde_json::Value {
        let value = serde_json::to_value(crd).unwrap();
        value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"][name]
            .clone()
    }

    /// The exit pods' key volume maps `MAX_REPLICAS` ordinals: the schema must not allow more.
    #[test]
    fn the_exit_replica_bound_is_the_schemas() {
        let replicas = spec_property(&TokenGoExit::crd(), "replicas");
        assert_eq!(
            replicas["maximum"].as_f64(),
            Some(f64::from(exit::MAX_REPLICAS))
        );
    }

    #[test]
    fn identities_are_retained_by_default() {
        for crd in definitions() {
            let retain = spec_property(&crd, "retainIdentity");
            assert_eq!(retain["type"], "boolean", "{retain}");
            assert_eq!(retain["default"], true, "{retain}");
        }
    }

    #[test]
    fn crds_are_namespaced_with_status_and_printer_columns() {
        for crd in definitions() {
            let value = serde_json::to_value(&crd).unwrap();
            assert_eq!(value["spec"]["group"], GROUP);
            assert_eq!(value["spec"]["scope"], "Namespaced");
            let version = &value["spec"]["versions"][0];
            assert_eq!(version["name"], "v1alpha1");
            assert!(version["subresources"]["status"].is_object());
            let columns: Vec<&str> = version["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            assert!(columns.starts_with(&["Ready", "Reason"]), "{columns:?}");
        }
    }
}

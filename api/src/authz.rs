//! The `AuthorizationPolicy` custom resource (group `outrigger.dev`, version `v1alpha1`): which
//! callers may reach a Service, enforced by the proxies of the Service's pods. Shaped after
//! Gateway API's GEP-3779 where it defines a field (`targetRefs`, `action`, `rules[].from`), and
//! after Istio's where it does not (`to` with ports, paths and methods).
//!
//! As for DestinationPolicy, the schema carries every check the API server can make, so that
//! `kubectl apply` refuses a bad policy naming the field; the controller repeats them when it
//! translates a policy (a manifests directory has no API server in front of it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::Method;

/// Lists are bounded so that the API server can bound the cost of the CEL rules over them.
pub const MAX_TARGETS: usize = 16;
pub const MAX_RULES: usize = 32;
pub const MAX_SOURCES: usize = 16;
pub const MAX_NAMES: usize = 64;
pub const MAX_TARGET_ENTRIES: usize = 16;
pub const MAX_PATHS: usize = 16;

/// A namespace name (a DNS label).
pub const NAMESPACE: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// `namespace/name` of a ServiceAccount (whose name is a DNS subdomain).
pub const SERVICE_ACCOUNT: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Service name (a DNS label).
pub const SERVICE_NAME: &str = NAMESPACE;

// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "outrigger.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    shortname = "azp",
    category = "outrigger",
    status = "AuthorizationPolicyStatus",
    derive = "PartialEq",
    doc = "Which callers may reach a Service, enforced by the proxies of its pods.",
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name"
    ),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Services of this namespace whose pods enforce this policy.
    #[schemars(length(min = 1, max = MAX_TARGETS), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["kind", "name"],
    ))]
    pub target_refs: Vec<TargetRef>,
    /// ALLOW: only what a rule matches is allowed (once any ALLOW policy targets a Service).
    /// DENY: what a rule matches is denied; DENY wins over ALLOW.
    #[serde(default)]
    pub action: Action,
    /// Enforce, or Audit: log and count what would be denied, never deny.
    #[serde(default)]
    pub mode: Mode,
    /// A caller is matched when one rule matches it. None: an ALLOW policy allows nothing, a
    /// DENY policy denies nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TargetRef {
    pub kind: TargetKind,
    #[schemars(length(min = 1, max = 63), pattern(SERVICE_NAME))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TargetKind {
    Service,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// Matches a call when one `from` entry matches its caller (or `from` is empty: any caller,
/// meshed or not) and one `to` entry matches what it calls (or `to` is empty: anything).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SOURCES))]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_TARGET_ENTRIES))]
    pub to: Vec<To>,
}

/// Callers by the identity their mutual TLS proves: a plaintext caller matches no source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.serviceAccounts) && size(self.serviceAccounts) > 0) || (has(self.namespaces) && size(self.namespaces) > 0)",
    "message": "a source needs serviceAccounts or namespaces",
    "reason": "FieldValueRequired",
}]))]
pub struct Source {
    /// `namespace/name` of ServiceAccounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NAMES), inner(length(min = 3, max = 317), pattern(SERVICE_ACCOUNT)))]
    pub service_accounts: Vec<String>,
    /// Every ServiceAccount of these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NAMES), inner(length(min = 1, max = 63), pattern(NAMESPACE)))]
    pub namespaces: Vec<String>,
}

/// What a call reaches; every part given must match. `paths` and `methods` are HTTP's: an
/// entry with either never matches a connection that is not HTTP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct To {
    /// Ports of the targeted Services (not of their pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NAMES), inner(range(min = 1)))]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PATHS))]
    pub paths: Vec<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub methods: Vec<Method>,
}

/// Exactly one of `exact` or `prefix`. A prefix matches whole segments: `/api` matches `/api`
/// and `/api/x`, not `/apix`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.exact) != has(self.prefix)",
    "message": "exactly one of exact or prefix must be set",
}]))]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), pattern(r"^/"))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), pattern(r"^/"))]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted and ResolvedRefs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"],
    ))]
    pub conditions: Vec<Condition>,
}

/// The CustomResourceDefinition, as `crds/` holds it.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt as _;
    crate::policy::as_installed(AuthorizationPolicy::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn schema() -> Value {
        let schema = crd().spec.versions[0]
            .schema
            .clone()
            .and_then(|s| s.open_api_v3_schema)
            .expect("a schema");
        serde_json::to_value(schema).unwrap()
    }

    #[test]
    fn the_spec_example_reads_with_its_defaults() {
        let spec: AuthorizationPolicySpec = serde_json::from_value(json!({
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{
                "from": [{"serviceAccounts": ["shop/productpage"]}, {"namespaces": ["frontend"]}],
                "to": [{"ports": [9080], "paths": [{"prefix": "/api"}], "methods": ["GET"]}],
            }],
        }))
        .unwrap();
        assert_eq!(spec.action, Action::Allow);
        assert_eq!(spec.mode, Mode::Enforce);
        assert_eq!(spec.rules[0].from[1].namespaces, ["frontend"]);
        assert_eq!(spec.rules[0].to[0].methods, [Method::Get]);
        let action: Action = serde_json::from_value(json!("DENY")).unwrap();
        assert_eq!(action, Action::Deny);
        assert!(serde_json::from_value::<Mode>(json!("audit")).is_err());
    }

    #[test]
    fn the_schema_bounds_and_checks_what_the_api_server_can() {
        let schema = schema();
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], json!(["targetRefs"]));
        let targets = &spec["properties"]["targetRefs"];
        assert_eq!(targets["minItems"], 1);
        assert_eq!(
            targets["x-kubernetes-list-map-keys"],
            json!(["kind", "name"])
        );
        assert_eq!(
            targets["items"]["properties"]["kind"]["enum"],
            json!(["Service"])
        );
        assert_eq!(
            spec["properties"]["action"]["enum"],
            json!(["ALLOW", "DENY"])
        );
        assert_eq!(
            spec["properties"]["mode"]["enum"],
            json!(["Enforce", "Audit"])
        );
        let rule = &spec["properties"]["rules"]["items"]["properties"];
        let source = &rule["from"]["items"];
        assert_eq!(
            source["properties"]["serviceAccounts"]["items"]["pattern"],
            SERVICE_ACCOUNT
        );
        assert!(
            source["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("serviceAccounts")
        );
        let to = &rule["to"]["items"]["properties"];
        assert_eq!(to["ports"]["items"]["minimum"], 1.0);
        assert_eq!(to["ports"]["items"]["maximum"], 65535.0);
        assert_eq!(
            to["paths"]["items"]["x-kubernetes-validations"][0]["rule"],
            "has(self.exact) != has(self.prefix)"
        );
        // Absent fields are pruned, not kept as null for CEL to trip on.
        assert!(!schema.to_string().contains("nullable"));
    }

    #[test]
    fn kubectl_get_shows_targets_action_mode_accepted_and_age() {
        let crd = crd();
        let columns: Vec<&str> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|column| column.name.as_str())
            .collect();
        assert_eq!(columns, ["Targets", "Action", "Mode", "Accepted", "Age"]);
        assert_eq!(crd.spec.names.short_names, Some(vec!["azp".to_string()]));
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["outrigger".to_string()])
        );
    }
}

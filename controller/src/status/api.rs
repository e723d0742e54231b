//! Status writes on the API: server-side apply of a policy's status, and the removal of one
//! replica's entry.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use outrigger_api::policy::DestinationPolicy;

use crate::source::ObjectKey;

/// Applies `status` to the policy's status subresource as `manager`.
pub(super) async fn apply(
    client: Client,
    key: &ObjectKey,
    manager: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<DestinationPolicy> = Api::namespaced(client, &key.namespace);
    let patch = serde_json::json!({
        "apiVersion": DestinationPolicy::api_version(&()),
        "kind": DestinationPolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
}

/// Removes the entry of replica `name` at `position`. Server-side apply removes only what the
/// applier owns, and the entry is its replica's, so this is a JSON patch, which checks first that
/// the entry is still where it was read.
pub(super) async fn prune(
    client: Client,
    key: &ObjectKey,
    position: usize,
    name: &str,
) -> Result<(), kube::Error> {
    let api: Api<DestinationPolicy> = Api::namespaced(client, &key.namespace);
    let path = format!("/status/replicas/{position}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": format!("{path}/name"), "value": name },
        { "op": "remove", "path": path },
    ]))
    .expect("a well-formed JSON patch");
    api.patch_status(
        &key.name,
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map(drop)
}

//! Sidecar injection: a mutating admission webhook that adds the proxy to meshed pods.
//!
//! A pod gets the proxy when its namespace is labelled `outrigger.dev/inject=enabled` (the
//! webhook registered for those namespaces calls `/inject`), or when the pod itself is labelled
//! `outrigger.dev/inject: enabled` (the webhook for every other namespace calls `/inject-pod`).
//! The label or the annotation `outrigger.dev/inject: disabled` opts a pod out. The opt-in is a
//! label, not an annotation, because the API server can select pods by label only: the chart's
//! webhooks send it exactly the pods that opted in (and none labelled `disabled`), so no other pod
//! creation in the cluster waits on the webhook. A pod that already has the proxy is left as it
//! is, so injecting twice changes nothing.
//!
//! What is added, first among the init containers so the app's own init containers are meshed
//! too: `outrigger-init`, which installs the iptables redirection and exits, then
//! `outrigger-proxy` as a native sidecar (an init container with `restartPolicy: Always`), which
//! starts before the app and stops after it.

pub mod patch;
pub mod webhook;

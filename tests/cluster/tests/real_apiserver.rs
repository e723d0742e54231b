//! Against a real etcd + kube-apiserver: CRD schema and CEL validation, printer columns,
//! ServiceAccount tokens and RBAC, an API server restart, and a teardown that leaves no process.
//!
//! The first run builds the binaries (about 10 minutes on 2 cores); later runs start a cluster in
//! about 4 seconds.

use std::time::{Duration, Instant};

use outrigger_cluster::{Cluster, is_alive};

/// A namespaced CRD with schema validation, a CEL rule and printer columns, like Outrigger's
/// DestinationPolicy but small.
const GADGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.test.outrigger.dev
spec:
  group: test.outrigger.dev
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Host, type: string, jsonPath: .spec.host}
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [host]
            properties:
              host: {type: string, minLength: 1}
              replicas: {type: integer, minimum: 0}
              maxReplicas: {type: integer, minimum: 0}
            x-kubernetes-validations:
            - rule: "!has(self.maxReplicas) || !has(self.replicas) || self.maxReplicas >= self.replicas"
              message: "maxReplicas must be at least replicas"
              fieldPath: ".maxReplicas"
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"#;

fn gadget(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: test.outrigger.dev/v1alpha1\nkind: Gadget\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

#[test]
fn crd_validation_and_printer_columns_then_teardown_leaves_no_process() {
    let cluster = Cluster::start().expect("starting the test cluster");
    let state_dir = cluster.state_dir().to_path_buf();

    cluster
        .kubectl_with_input(&["apply", "-f", "-"], GADGET_CRD)
        .map(|output| {
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .unwrap();
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/gadgets.test.outrigger.dev",
            "--timeout=60s",
        ])
        .unwrap();

    let valid = gadget("reviews", "{host: reviews, replicas: 3, maxReplicas: 5}");
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], &valid)
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Rejected by the CEL rule, with a message naming the field it points at.
    let too_few = gadget("too-few", "{host: reviews, replicas: 3, maxReplicas: 2}");
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], &too_few)
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an invalid Gadget was accepted");
    assert!(
        stderr.contains("spec.maxReplicas")
            && stderr.contains("maxReplicas must be at least replicas"),
        "{stderr}"
    );

    // Rejected by the OpenAPI schema, naming the field.
    let negative = gadget("negative", "{host: reviews, replicas: -1}");
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], &negative)
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a negative replicas was accepted");
    assert!(stderr.contains("spec.replicas"), "{stderr}");

    let table = cluster
        .kubectl(&["get", "gadgets", "--namespace", "default"])
        .unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "HOST", "REPLICAS", "AGE"], "{table}");
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], ["reviews", "reviews", "3"], "{table}");
    assert_eq!(lines.next(), None, "only the valid Gadget exists: {table}");

    let stopped = cluster.stop().expect("stopping the test cluster");
    let names: Vec<&str> = stopped
        .iter()
        .map(|process| process.name.as_str())
        .collect();
    assert_eq!(names, ["kube-apiserver", "etcd"]);
    for process in &stopped {
        assert!(!is_alive(process.pid), "{process:?} is still running");
    }
    assert!(
        !state_dir.exists(),
        "{} was left behind",
        state_dir.display()
    );
}

#[test]
fn service_account_tokens_rbac_and_an_apiserver_restart_with_the_controller_manager() {
    let mut cluster = Cluster::builder()
        .controller_manager(true)
        .start()
        .expect("starting the test cluster with kube-controller-manager");

    // Signed by the service-account key the API server was given.
    let token = cluster
        .kubectl(&["create", "token", "default", "--namespace", "default"])
        .unwrap();
    assert!(token.trim().starts_with("eyJ"), "not a JWT: {token}");

    // RBAC is enforced: a ServiceAccount without bindings may not list pods, the admin may.
    let denied = cluster
        .kubectl_with_input(
            &[
                "auth",
                "can-i",
                "list",
                "pods",
                "--as=system:serviceaccount:default:default",
            ],
            "",
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&denied.stdout).trim(), "no");
    assert_eq!(
        cluster
            .kubectl(&["auth", "can-i", "list", "pods"])
            .unwrap()
            .trim(),
        "yes"
    );

    cluster
        .kubectl(&[
            "create",
            "configmap",
            "survives-restart",
            "--from-literal=key=value",
        ])
        .unwrap();
    let apiserver_pid = |cluster: &Cluster| {
        cluster
            .pids()
            .into_iter()
            .find(|(name, _)| *name == "kube-apiserver")
            .map(|(_, pid)| pid)
    };
    let old_pid = apiserver_pid(&cluster).unwrap();
    let restart_started = Instant::now();
    cluster
        .restart_apiserver()
        .expect("restarting kube-apiserver");
    assert!(restart_started.elapsed() < Duration::from_secs(120));
    assert!(
        !is_alive(old_pid),
        "the old kube-apiserver is still running"
    );
    assert_ne!(apiserver_pid(&cluster), Some(old_pid));
    let value = cluster
        .kubectl(&[
            "get",
            "configmap",
            "survives-restart",
            "-o",
            "jsonpath={.data.key}",
        ])
        .unwrap();
    assert_eq!(value, "value");

    let pids = cluster.pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    drop(cluster);
    for (name, pid) in pids {
        assert!(!is_alive(pid), "{name} (pid {pid}) outlived its cluster");
    }
}

//! The JSON patch that adds the mesh to a pod, and the injector's settings.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use outrigger_api::identity::SpiffeId;
use serde::Deserialize;
use serde_json::{Value, json};

/// As a label, `enabled` opts a pod in and `disabled` out; as an annotation, `disabled` opts it
/// out too.
pub const INJECT_KEY: &str = "outrigger.dev/inject";
pub const INJECTED_ANNOTATION: &str = "outrigger.dev/injected";
/// Set on a pod injected with identity, to its ServiceAccount: its proxy serves mutual TLS as
/// `spiffe://<trust domain>/ns/<namespace>/sa/<this>`, which the index tells its callers to
/// expect. A pod injected without identity, or by an injector whose proxies did not speak mTLS,
/// lacks it and is called in plaintext. Editing it cannot make a caller trust another pod: the
/// caller checks the certificate, which only the ServiceAccount's token gets.
pub const IDENTITY_ANNOTATION: &str = "outrigger.dev/identity";
/// `strict` on a pod: its proxy refuses inbound plaintext, but for the kubelet's HTTP probes.
pub const MTLS_ANNOTATION: &str = "outrigger.dev/mtls";
pub const PROXY_CONTAINER: &str = "outrigger-proxy";
pub const INIT_CONTAINER: &str = "outrigger-init";

/// What the injected containers look like; the Helm chart writes it from its values.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectorConfig {
    pub proxy_image: String,
    pub init_image: String,
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// gRPC URL of the controller, as proxies reach it.
    pub control_plane: String,
    #[serde(default = "default_proxy_uid")]
    pub proxy_uid: i64,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub skip_inbound_ports: Vec<u16>,
    #[serde(default)]
    pub skip_outbound_ports: Vec<u16>,
    #[serde(default)]
    pub skip_outbound_cidrs: Vec<String>,
    /// With it, the proxy gets a token to prove its identity to the controller, and a
    /// certificate for it; without it, no identity.
    #[serde(default)]
    pub identity: Option<InjectedIdentity>,
}

/// What the proxy needs to get its certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectedIdentity {
    pub trust_domain: String,
}

/// The projected ServiceAccount token the proxy proves its identity with: for the controller
/// alone (its own audience, so it is worth nothing to the API server or anyone else), and short
/// lived (the kubelet renews it at 80% of its life).
const TOKEN_VOLUME: &str = "outrigger-identity-token";
const TOKEN_DIR: &str = "/var/run/secrets/outrigger.dev/identity";
const TOKEN_FILE: &str = "token";
const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// How long the proxy may take to be ready (certified and configured) before the kubelet
/// restarts it: the app waits meanwhile.
const STARTUP_SECONDS: i32 = 120;

fn default_pull_policy() -> String {
    "IfNotPresent".into()
}

fn default_proxy_uid() -> i64 {
    2102
}

const OUTBOUND_PORT: u16 = 4140;
const INBOUND_PORT: u16 = 4143;
const ADMIN_PORT: u16 = 4191;

/// Who asked: a namespace opted in as a whole, or a pod by its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptIn {
    Namespace,
    Pod,
}

/// Why a pod is left alone, for the logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    OptedOut,
    NotOptedIn,
    AlreadyInjected,
    HostNetwork,
}

/// What a proxy needs to trust the controller before it has a certificate of its own (and so
/// anchors from the controller): the controller's identity and the trust anchors, as they are
/// when the pod is created.
#[derive(Clone, Debug)]
pub struct ControlPlaneTrust {
    pub identity: SpiffeId,
    pub trust_anchors_pem: String,
}

/// The JSON patch that meshes `pod`, or why it is left alone. With identity in `config`, `trust`
/// is what its proxy trusts the controller by. `namespace_mtls` is the `outrigger.dev/mtls`
/// annotation of the pod's namespace, which the pod's own overrides.
pub fn patch(
    pod: &Pod,
    opt_in: OptIn,
    config: &InjectorConfig,
    trust: Option<&ControlPlaneTrust>,
    namespace_mtls: Option<&str>,
) -> Result<Value, Skip> {
    let identity = config.identity.as_ref().zip(trust);
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = annotations
        .and_then(|a| a.get(INJECT_KEY))
        .map(String::as_str);
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_KEY))
        .map(String::as_str);
    if label == Some("disabled") || annotation == Some("disabled") {
        return Err(Skip::OptedOut);
    }
    if opt_in == OptIn::Pod && label != Some("enabled") {
        return Err(Skip::NotOptedIn);
    }
    let spec = pod.spec.as_ref();
    let already = annotations.is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
        || spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == PROXY_CONTAINER)
        });
    if already {
        return Err(Skip::AlreadyInjected);
    }
    // With the host's network, iptables rules would redirect the whole node.
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let mut operations = Vec::new();
    if identity.is_some() {
        let volume = serde_json::to_value(token_volume()).expect("volumes serialize");
        if spec.is_some_and(|s| s.volumes.as_ref().is_some_and(|v| !v.is_empty())) {
            operations.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        } else {
            operations.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]}));
        }
    }
    let init = serde_json::to_value(init_container(config)).expect("containers serialize");
    let strict = annotations
        .and_then(|a| a.get(MTLS_ANNOTATION))
        .map(String::as_str)
        .or(namespace_mtls)
        == Some("strict");
    let proxy = serde_json::to_value(proxy_container(config, identity, strict, http_probes(spec)))
        .expect("containers serialize");
    if spec
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| !c.is_empty())
    {
        // Inserted at the front, the proxy first, so the init container ends up before it.
        operations.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": proxy}));
        operations.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    } else {
        operations
            .push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]}));
    }
    if annotations.is_none() {
        operations.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    let mut annotate = |key: &str, value: &str| {
        operations.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", key.replace('/', "~1")),
            "value": value,
        }));
    };
    annotate(INJECTED_ANNOTATION, "true");
    if identity.is_some() {
        // As the proxy's certificate will name it: the API server has set the default by now.
        let account = spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        annotate(IDENTITY_ANNOTATION, account);
    }
    Ok(Value::Array(operations))
}

fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(crate::identity::TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                    path: TOKEN_FILE.into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn init_container(config: &InjectorConfig) -> Container {
    let mut args = vec![
        format!("--proxy-uid={}", config.proxy_uid),
        format!("--outbound-port={OUTBOUND_PORT}"),
        format!("--inbound-port={INBOUND_PORT}"),
        format!("--admin-port={ADMIN_PORT}"),
    ];
    let list = |values: &[String]| values.join(",");
    let ports = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>();
    if !config.skip_inbound_ports.is_empty() {
        args.push(format!(
            "--skip-inbound-ports={}",
            list(&ports(&config.skip_inbound_ports))
        ));
    }
    if !config.skip_outbound_ports.is_empty() {
        args.push(format!(
            "--skip-outbound-ports={}",
            list(&ports(&config.skip_outbound_ports))
        ));
    }
    if !config.skip_outbound_cidrs.is_empty() {
        args.push(format!(
            "--skip-outbound-cidrs={}",
            list(&config.skip_outbound_cidrs)
        ));
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(config.init_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The HTTP probes of the app's containers, as `port:path`: the kubelet is not meshed, so a
/// strict proxy serves exactly these in plaintext, and no AuthorizationPolicy refuses them (the
/// pod would never be ready). HTTPS probes are left out (their path cannot
/// be read), and so is a path with a comma, which the list could not hold.
fn http_probes(spec: Option<&PodSpec>) -> Vec<String> {
    let mut probes = Vec::new();
    for container in spec.into_iter().flat_map(|s| &s.containers) {
        let declared = [
            &container.readiness_probe,
            &container.liveness_probe,
            &container.startup_probe,
        ];
        for get in declared
            .into_iter()
            .flatten()
            .filter_map(|p| p.http_get.as_ref())
        {
            let port = match &get.port {
                IntOrString::Int(port) => Some(*port),
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|port| port.name.as_deref() == Some(name))
                    .map(|port| port.container_port),
            };
            let path = get.path.as_deref().unwrap_or("/");
            let http = get.scheme.as_deref().is_none_or(|s| s == "HTTP");
            if let Some(port) = port.filter(|_| http && !path.contains(','))
                && !probes.contains(&format!("{port}:{path}"))
            {
                probes.push(format!("{port}:{path}"));
            }
        }
    }
    probes
}

/// `strict`: for a pod (or namespace) annotated `outrigger.dev/mtls: strict`; `probes`: the
/// app's HTTP probes.
fn proxy_container(
    config: &InjectorConfig,
    identity: Option<(&InjectedIdentity, &ControlPlaneTrust)>,
    strict: bool,
    probes: Vec<String>,
) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            name: "OUTRIGGER_CONTROL_PLANE".into(),
            value: Some(config.control_plane.clone()),
            ..Default::default()
        },
        EnvVar {
            name: "OUTRIGGER_NAMESPACE".into(),
            value_from: Some(field("metadata.namespace")),
            ..Default::default()
        },
        EnvVar {
            name: "OUTRIGGER_WORKLOAD".into(),
            value_from: Some(field("metadata.name")),
            ..Default::default()
        },
        EnvVar {
            name: "OUTRIGGER_SERVICE_ACCOUNT".into(),
            value_from: Some(field("spec.serviceAccountName")),
            ..Default::default()
        },
        EnvVar {
            name: "OUTRIGGER_POD_IPS".into(),
            value_from: Some(field("status.podIPs")),
            ..Default::default()
        },
        EnvVar {
            name: "OUTRIGGER_INBOUND_ADDR".into(),
            value: Some(format!("0.0.0.0:{INBOUND_PORT}")),
            ..Default::default()
        },
        // Probes and Prometheus reach it from outside the pod.
        EnvVar {
            name: "OUTRIGGER_ADMIN_ADDR".into(),
            value: Some(format!("0.0.0.0:{ADMIN_PORT}")),
            ..Default::default()
        },
    ];
    if strict {
        env.push(EnvVar {
            name: "OUTRIGGER_INBOUND_MTLS".into(),
            value: Some("strict".into()),
            ..Default::default()
        });
    }
    if !probes.is_empty() {
        env.push(EnvVar {
            name: "OUTRIGGER_INBOUND_PROBES".into(),
            value: Some(probes.join(",")),
            ..Default::default()
        });
    }
    let mut volume_mounts = None;
    if let Some((identity, trust)) = identity {
        let value = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        };
        env.push(value(
            "OUTRIGGER_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ));
        env.push(value(
            "OUTRIGGER_TRUST_DOMAIN",
            identity.trust_domain.clone(),
        ));
        env.push(value(
            "OUTRIGGER_CONTROL_PLANE_IDENTITY",
            trust.identity.to_string(),
        ));
        env.push(value(
            "OUTRIGGER_TRUST_ANCHORS",
            trust.trust_anchors_pem.clone(),
        ));
        volume_mounts = Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]);
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        // A native sidecar: started before the app, stopped after it.
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("outrigger-admin".into()),
            container_port: i32::from(ADMIN_PORT),
            ..Default::default()
        }]),
        volume_mounts,
        readiness_probe: Some(probe("/ready")),
        liveness_probe: Some(probe("/live")),
        // The app starts once the proxy is ready (a native sidecar's startup gates the next
        // container): before, its calls would wait for configuration, and those to meshed pods
        // would go in plaintext, on connections kept for as long as they are used.
        startup_probe: Some(Probe {
            period_seconds: Some(1),
            failure_threshold: Some(STARTUP_SECONDS),
            ..probe("/ready")
        }),
        resources: config.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InjectorConfig {
        serde_norway::from_str(
            "proxyImage: ghcr.io/outrigger-dev/proxy:0.1.0\n\
             initImage: ghcr.io/outrigger-dev/proxy-init:0.1.0\n\
             controlPlane: http://outrigger-controller.outrigger-system.svc:8090\n\
             skipOutboundPorts: [5432]\n",
        )
        .unwrap()
    }

    fn pod(yaml: &str) -> Pod {
        serde_norway::from_str(yaml).unwrap()
    }

    /// Applies `patch` to `pod` as the API server would.
    fn apply(pod: &Pod, patch: Value) -> Pod {
        let mut document = serde_json::to_value(pod).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        json_patch::patch(&mut document, &patch).unwrap();
        serde_json::from_value(document).unwrap()
    }

    const APP: &str = "metadata: {name: web-0, namespace: shop}\n\
                       spec:\n  containers: [{name: web, image: web}]\n";

    #[test]
    fn a_pod_in_an_enabled_namespace_gets_the_init_step_and_the_native_sidecar() {
        let app = pod(APP);
        let meshed = apply(
            &app,
            patch(&app, OptIn::Namespace, &config(), None, None).unwrap(),
        );
        let spec = meshed.spec.unwrap();
        let init = spec.init_containers.unwrap();
        assert_eq!(
            init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [INIT_CONTAINER, PROXY_CONTAINER]
        );
        assert_eq!(
            init[0].image.as_deref(),
            Some("ghcr.io/outrigger-dev/proxy-init:0.1.0")
        );
        assert!(
            init[0]
                .args
                .as_ref()
                .unwrap()
                .contains(&"--skip-outbound-ports=5432".to_string())
        );
        let caps = init[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
        );
        let proxy = &init[1];
        assert_eq!(
            proxy.restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar"
        );
        // The app starts once the proxy is ready.
        let startup = proxy.startup_probe.as_ref().unwrap();
        assert_eq!(
            startup.http_get.as_ref().unwrap().path.as_deref(),
            Some("/ready")
        );
        assert_eq!(startup.failure_threshold, Some(STARTUP_SECONDS));
        let env = proxy.env.as_ref().unwrap();
        let downward = |name: &str| {
            let var = env.iter().find(|e| e.name == name).unwrap();
            let from = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
            from.field_path.clone()
        };
        assert_eq!(downward("OUTRIGGER_NAMESPACE"), "metadata.namespace");
        assert_eq!(
            downward("OUTRIGGER_POD_IPS"),
            "status.podIPs",
            "the proxy knows its own pod among a Service's endpoints"
        );
        assert_eq!(
            proxy.security_context.as_ref().unwrap().run_as_user,
            Some(2102),
            "the uid the init step's rules skip"
        );
        assert!(
            init[0]
                .args
                .as_ref()
                .unwrap()
                .contains(&"--proxy-uid=2102".to_string())
        );
        assert_eq!(spec.containers.len(), 1, "the app is untouched");
        let annotations = meshed.metadata.annotations.unwrap();
        assert_eq!(
            annotations.get(INJECTED_ANNOTATION).map(String::as_str),
            Some("true")
        );
    }

    fn trust() -> ControlPlaneTrust {
        ControlPlaneTrust {
            identity: "spiffe://example.org/ns/outrigger/sa/outrigger-controller"
                .parse()
                .unwrap(),
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
        }
    }

    fn with_identity() -> InjectorConfig {
        InjectorConfig {
            identity: Some(InjectedIdentity {
                trust_domain: "example.org".into(),
            }),
            ..config()
        }
    }

    #[test]
    fn with_identity_the_proxy_gets_a_token_for_the_controller_alone() {
        for app in [
            APP,
            "metadata: {name: web-0}\n\
             spec:\n  volumes: [{name: data, emptyDir: {}}]\n  containers: [{name: web, image: web}]\n",
        ] {
            let app = pod(app);
            let meshed = apply(
                &app,
                patch(
                    &app,
                    OptIn::Namespace,
                    &with_identity(),
                    Some(&trust()),
                    None,
                )
                .unwrap(),
            );
            let spec = meshed.spec.unwrap();
            let volumes = spec.volumes.unwrap();
            let volume = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
            let token = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
                .service_account_token
                .clone()
                .unwrap();
            assert_eq!(token.audience.as_deref(), Some("outrigger"));
            assert_eq!(token.expiration_seconds, Some(3600));
            let proxy = &spec.init_containers.unwrap()[1];
            let mount = &proxy.volume_mounts.as_ref().unwrap()[0];
            assert_eq!(mount.name, TOKEN_VOLUME);
            assert_eq!(mount.read_only, Some(true));
            let env = |name: &str| {
                proxy
                    .env
                    .as_ref()
                    .unwrap()
                    .iter()
                    .find(|e| e.name == name)
                    .and_then(|e| e.value.clone())
            };
            assert_eq!(
                env("OUTRIGGER_IDENTITY_TOKEN_FILE"),
                Some(format!("{}/token", mount.mount_path))
            );
            assert_eq!(
                env("OUTRIGGER_TRUST_DOMAIN").as_deref(),
                Some("example.org")
            );
            // It checks the controller is the controller before sending its token.
            assert_eq!(
                env("OUTRIGGER_CONTROL_PLANE_IDENTITY").as_deref(),
                Some("spiffe://example.org/ns/outrigger/sa/outrigger-controller")
            );
            assert_eq!(
                env("OUTRIGGER_TRUST_ANCHORS"),
                Some(trust().trust_anchors_pem)
            );
            assert!(
                spec.containers[0].volume_mounts.is_none(),
                "the app does not see it"
            );
            // Callers are told to expect the default ServiceAccount's identity.
            assert_eq!(
                meshed
                    .metadata
                    .annotations
                    .unwrap()
                    .get(IDENTITY_ANNOTATION)
                    .map(String::as_str),
                Some("default")
            );
        }
        let app = pod("metadata: {name: web-0}\n\
             spec:\n  serviceAccountName: web\n  containers: [{name: web, image: web}]\n");
        let meshed = apply(
            &app,
            patch(
                &app,
                OptIn::Namespace,
                &with_identity(),
                Some(&trust()),
                None,
            )
            .unwrap(),
        );
        assert_eq!(
            meshed
                .metadata
                .annotations
                .unwrap()
                .get(IDENTITY_ANNOTATION)
                .map(String::as_str),
            Some("web")
        );
        // Without identity, no token, and callers call it in plaintext.
        let app = pod(APP);
        let meshed = apply(
            &app,
            patch(&app, OptIn::Namespace, &config(), None, None).unwrap(),
        );
        assert!(meshed.spec.unwrap().volumes.is_none());
        assert!(
            !meshed
                .metadata
                .annotations
                .unwrap()
                .contains_key(IDENTITY_ANNOTATION)
        );
    }

    #[test]
    fn a_strict_pod_gets_a_proxy_that_refuses_inbound_plaintext_but_its_http_probes() {
        let env_in = |yaml: &str, namespace_mtls: Option<&str>, name: &str| {
            let app = pod(yaml);
            let meshed = apply(
                &app,
                patch(
                    &app,
                    OptIn::Namespace,
                    &with_identity(),
                    Some(&trust()),
                    namespace_mtls,
                )
                .unwrap(),
            );
            let spec = meshed.spec.unwrap();
            let proxy = &spec.init_containers.unwrap()[1];
            proxy
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        let env = |yaml: &str, name: &str| env_in(yaml, None, name);
        let strict = "metadata: {name: a, annotations: {outrigger.dev/mtls: strict}}\n\
             spec:\n  containers:\n  - name: web\n    image: web\n    ports: [{name: http, containerPort: 8080}]\n\
             \x20   readinessProbe: {httpGet: {port: http, path: /ready}}\n\
             \x20   livenessProbe: {httpGet: {port: 8081}}\n\
             \x20   startupProbe: {httpGet: {port: 8443, path: /up, scheme: HTTPS}}\n\
             \x20 - name: sidecar\n    image: s\n    readinessProbe: {httpGet: {port: 8080, path: /ready}}\n";
        assert_eq!(
            env(strict, "OUTRIGGER_INBOUND_MTLS").as_deref(),
            Some("strict")
        );
        assert_eq!(
            env(strict, "OUTRIGGER_INBOUND_PROBES").as_deref(),
            Some("8080:/ready,8081:/"),
            "HTTP probes by number, once each; HTTPS ones cannot be told apart"
        );
        assert_eq!(
            env(APP, "OUTRIGGER_INBOUND_MTLS"),
            None,
            "permissive, the proxy's default"
        );
        assert_eq!(env(APP, "OUTRIGGER_INBOUND_PROBES"), None, "no probes");
        let unannotated = strict.replace("annotations: {outrigger.dev/mtls: strict}", "labels: {}");
        assert_eq!(env(&unannotated, "OUTRIGGER_INBOUND_MTLS"), None);
        assert_eq!(
            env(&unannotated, "OUTRIGGER_INBOUND_PROBES").as_deref(),
            Some("8080:/ready,8081:/"),
            "listed for every pod: no AuthorizationPolicy refuses them"
        );

        // A strict namespace makes its pods strict, but for a pod that says otherwise.
        assert_eq!(
            env_in(APP, Some("strict"), "OUTRIGGER_INBOUND_MTLS").as_deref(),
            Some("strict")
        );
        let permissive = "metadata: {name: a, annotations: {outrigger.dev/mtls: permissive}}\n\
             spec:\n  containers: [{name: web, image: web}]\n";
        assert_eq!(
            env_in(permissive, Some("strict"), "OUTRIGGER_INBOUND_MTLS"),
            None
        );
        assert_eq!(
            env_in(strict, Some("permissive"), "OUTRIGGER_INBOUND_MTLS").as_deref(),
            Some("strict")
        );
    }

    #[test]
    fn the_mesh_goes_first_among_existing_init_containers() {
        let app = pod("metadata: {name: web-0, annotations: {team: a}}\n\
             spec:\n  initContainers: [{name: migrate, image: m}]\n  containers: [{name: web, image: web}]\n");
        let meshed = apply(
            &app,
            patch(&app, OptIn::Namespace, &config(), None, None).unwrap(),
        );
        let names: Vec<_> = meshed
            .spec
            .unwrap()
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        let annotations = meshed.metadata.annotations.unwrap();
        assert_eq!(
            annotations.get("team").map(String::as_str),
            Some("a"),
            "kept"
        );
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let app = pod(APP);
        let meshed = apply(
            &app,
            patch(&app, OptIn::Namespace, &config(), None, None).unwrap(),
        );
        assert_eq!(
            patch(&meshed, OptIn::Namespace, &config(), None, None),
            Err(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn a_label_opts_a_pod_in_and_a_label_or_an_annotation_opts_it_out() {
        for opted_out in [
            "metadata: {name: a, annotations: {outrigger.dev/inject: disabled}}\nspec: {containers: []}\n",
            "metadata: {name: a, labels: {outrigger.dev/inject: disabled}}\nspec: {containers: []}\n",
            "metadata: {name: a, labels: {outrigger.dev/inject: enabled}, annotations: {outrigger.dev/inject: disabled}}\nspec: {containers: []}\n",
        ] {
            for opt_in in [OptIn::Namespace, OptIn::Pod] {
                assert_eq!(
                    patch(&pod(opted_out), opt_in, &config(), None, None),
                    Err(Skip::OptedOut),
                    "{opted_out}"
                );
            }
        }
        let plain = pod(APP);
        assert_eq!(
            patch(&plain, OptIn::Pod, &config(), None, None),
            Err(Skip::NotOptedIn)
        );
        // An annotation cannot be selected: the per-pod webhook is never sent such a pod.
        let annotated = pod(
            "metadata: {name: a, annotations: {outrigger.dev/inject: enabled}}\nspec: {containers: []}\n",
        );
        assert_eq!(
            patch(&annotated, OptIn::Pod, &config(), None, None),
            Err(Skip::NotOptedIn)
        );
        let opted_in = pod(
            "metadata: {name: a, labels: {outrigger.dev/inject: enabled}}\nspec: {containers: []}\n",
        );
        assert!(patch(&opted_in, OptIn::Pod, &config(), None, None).is_ok());
        let host = pod("metadata: {name: a}\nspec: {hostNetwork: true, containers: []}\n");
        assert_eq!(
            patch(&host, OptIn::Namespace, &config(), None, None),
            Err(Skip::HostNetwork)
        );
    }

    #[test]
    fn an_injector_config_with_a_typo_is_refused() {
        let typo = "proxyImage: p\ninitImage: i\ncontrolPlane: c\nproxyUID: 1\n";
        assert!(serde_norway::from_str::<InjectorConfig>(typo).is_err());
    }
}

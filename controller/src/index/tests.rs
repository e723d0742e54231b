//! The index, fed changes by hand.

use super::*;
use serde_json::{Value, json};

const BY_NAME: &str = "reviews.shop.svc.cluster.local:9080";
const BY_IP: &str = "10.96.0.10:9080";

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

fn service(ports: Value) -> Change {
    Change::Applied(Object::Service(Box::new(object(json!({
        "metadata": {"namespace": "shop", "name": "reviews"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": ports},
    })))))
}

fn reviews() -> Change {
    service(json!([{"name": "http", "port": 9080}]))
}

/// A slice of `reviews` whose endpoints are (ip, pod, ready), listening on `port`.
fn slice(name: &str, port: u16, endpoints: &[(&str, &str, bool)]) -> Change {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"},
            })
        })
        .collect();
    Change::Applied(Object::EndpointSlice(Box::new(object(json!({
        "metadata": {
            "namespace": "shop", "name": name,
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints,
    })))))
}

fn pod(name: &str, version: &str) -> Change {
    labelled_pod(name, json!({"version": version}))
}

fn policy(name: &str, created: &str, spec: Value) -> Change {
    Change::Applied(Object::DestinationPolicy(Box::new(object(json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "DestinationPolicy",
        "metadata": {
            "namespace": "shop", "name": name, "generation": 3,
            "creationTimestamp": created,
        },
        "spec": spec,
    })))))
}

fn canary_policy() -> Value {
    json!({
        "host": "reviews",
        "subsets": [
            {"name": "stable", "labels": {"version": "v1"}},
            {"name": "canary", "labels": {"version": "v2"}},
        ],
        "trafficSplit": [{"subset": "stable", "weight": 90}, {"subset": "canary", "weight": 10}],
        "timeout": "10s",
    })
}

fn deleted(kind: Kind, name: &str) -> Change {
    Change::Deleted(ObjectRef {
        kind,
        key: ObjectKey::new("shop", name),
    })
}

fn index() -> (Index, Snapshots) {
    let snapshots = Snapshots::default();
    (
        Index::new(
            snapshots.clone(),
            Metrics::default(),
            outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
        ),
        snapshots,
    )
}

#[derive(Debug, PartialEq)]
enum Published {
    Nothing,
    Unknown,
    Known(Box<proto::Destination>, Vec<proto::Endpoint>),
}

fn published(snapshots: &Snapshots, key: &str) -> Published {
    match snapshots.watch(key).borrow().as_deref() {
        None => Published::Nothing,
        Some(Snapshot::Unknown { .. }) => Published::Unknown,
        Some(Snapshot::Known {
            destination,
            endpoints,
            ..
        }) => Published::Known(
            destination.clone(),
            endpoints.iter().flat_map(|group| group.decode()).collect(),
        ),
    }
}

fn known(snapshots: &Snapshots, key: &str) -> proto::Destination {
    match published(snapshots, key) {
        Published::Known(destination, _) => *destination,
        other => panic!("{key}: {other:?}"),
    }
}

fn endpoint_list(snapshots: &Snapshots, key: &str) -> Vec<proto::Endpoint> {
    match published(snapshots, key) {
        Published::Known(_, endpoints) => endpoints,
        other => panic!("{key}: {other:?}"),
    }
}

/// (address, subsets) of every endpoint.
fn endpoints(snapshots: &Snapshots, key: &str) -> Vec<(String, Vec<String>)> {
    endpoint_list(snapshots, key)
        .into_iter()
        .map(|e| (e.address, e.subsets))
        .collect()
}

#[test]
fn a_service_port_is_published_by_name_and_by_cluster_ip() {
    let (mut index, snapshots) = index();
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    assert_eq!(published(&snapshots, BY_NAME), Published::Nothing);
    index.apply(reviews());
    let destination = known(&snapshots, BY_NAME);
    assert_eq!(published(&snapshots, BY_NAME), published(&snapshots, BY_IP));
    assert_eq!(
        (
            destination.namespace.as_str(),
            destination.service.as_str(),
            destination.port
        ),
        ("shop", "reviews", 9080)
    );
    assert_eq!(
        endpoint_list(&snapshots, BY_NAME),
        [proto::Endpoint {
            address: "10.0.0.1:8080".into(),
            subsets: vec![],
            pod: "reviews-1".into(),
            h2c: false,
            identity: String::new(),
        }]
    );
    assert_eq!(destination.policy, "");
    assert_eq!(destination.policy_spec, None);
}

#[test]
fn endpoints_are_the_ready_ones_on_the_named_port_once_each() {
    let (mut index, snapshots) = index();
    index.apply(service(json!([
        {"name": "http", "port": 9080},
        {"name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c"},
    ])));
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", false),
        ],
    ));
    // The same endpoint in a second slice, as while slices are rebalanced.
    index.apply(slice("reviews-b", 8080, &[("10.0.0.1", "reviews-1", true)]));
    assert_eq!(
        endpoints(&snapshots, BY_NAME),
        [("10.0.0.1:8080".to_string(), vec![])]
    );
    // No slice has a `grpc` port: the destination exists, without endpoints.
    let grpc = known(&snapshots, "reviews.shop.svc.cluster.local:9090");
    assert_eq!(
        published(&snapshots, "10.96.0.10:9090"),
        Published::Known(Box::new(grpc), vec![])
    );

    index.apply(Change::Applied(Object::EndpointSlice(Box::new(object(
        json!({
            "metadata": {"namespace": "shop", "name": "reviews-grpc",
                "labels": {"kubernetes.io/service-name": "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 7070}],
            "endpoints": [{"addresses": ["10.0.0.3"]}],
        }),
    )))));
    let grpc = endpoint_list(&snapshots, "reviews.shop.svc.cluster.local:9090");
    assert_eq!(grpc.len(), 1);
    assert_eq!(grpc[0].address, "10.0.0.3:7070");
    assert!(grpc[0].h2c, "appProtocol kubernetes.io/h2c");
}

/// (slice, version, addresses) of every endpoint group.
fn groups(snapshots: &Snapshots, key: &str) -> Vec<(String, String, Vec<String>)> {
    match snapshots.current(key).as_deref() {
        Some(Snapshot::Known { endpoints, .. }) => endpoints
            .iter()
            .map(|group| {
                let addresses = group.decode().into_iter().map(|e| e.address).collect();
                (group.name.clone(), group.version.clone(), addresses)
            })
            .collect(),
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn endpoints_are_grouped_by_slice_so_churn_changes_one_group() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice("reviews-b", 8080, &[("10.0.0.2", "reviews-2", true)]));
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", true),
        ],
    ));
    let before = groups(&snapshots, BY_NAME);
    let layout = |groups: &[(String, String, Vec<String>)]| -> Vec<(String, Vec<String>)> {
        groups
            .iter()
            .map(|(name, _, addresses)| (name.clone(), addresses.clone()))
            .collect()
    };
    // By slice name; an endpoint in two slices counts once, in the first, and reviews-b is
    // left with none.
    assert_eq!(
        layout(&before),
        [(
            "reviews-a".to_string(),
            vec!["10.0.0.1:8080".to_string(), "10.0.0.2:8080".to_string()]
        )]
    );

    index.apply(slice("reviews-b", 8080, &[("10.0.0.3", "reviews-3", true)]));
    let after = groups(&snapshots, BY_NAME);
    assert_eq!(after[0], before[0], "an untouched slice keeps its version");
    assert_eq!(
        layout(&after[1..]),
        [("reviews-b".to_string(), vec!["10.0.0.3:8080".to_string()])]
    );
}

/// A pod the injector meshed with identity, for `account`.
fn meshed_pod(name: &str, account: &str) -> Change {
    Change::Applied(Object::Pod(Box::new(object(json!({
        "metadata": {
            "namespace": "shop", "name": name, "labels": {"version": "v1"},
            "annotations": {"outrigger.dev/injected": "true", "outrigger.dev/identity": account},
        },
    })))))
}

/// (address, identity) of every endpoint.
fn identities(snapshots: &Snapshots) -> Vec<(String, String)> {
    endpoint_list(snapshots, BY_NAME)
        .into_iter()
        .map(|e| (e.address, e.identity))
        .collect()
}

#[test]
fn meshed_endpoints_name_the_identity_their_proxy_presents() {
    let (mut index, snapshots) = index();
    index.apply(meshed_pod("reviews-1", "reviews"));
    // Injected without identity (or by an older injector): plaintext.
    index.apply(pod("reviews-2", "v1"));
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", true),
            ("10.0.0.3", "reviews-3", true),
        ],
    ));
    index.apply(reviews());
    let id = "spiffe://cluster.local/ns/shop/sa/reviews".to_string();
    assert_eq!(
        identities(&snapshots),
        [
            ("10.0.0.1:8080".into(), id.clone()),
            ("10.0.0.2:8080".into(), String::new()),
            // Not seen yet: not known to be meshed.
            ("10.0.0.3:8080".into(), String::new()),
        ]
    );

    // A pod meshed since, and one whose annotation went: the groups follow.
    index.apply(meshed_pod("reviews-2", "reviews-v2"));
    index.apply(pod("reviews-1", "v1"));
    assert_eq!(
        identities(&snapshots),
        [
            ("10.0.0.1:8080".into(), String::new()),
            (
                "10.0.0.2:8080".into(),
                "spiffe://cluster.local/ns/shop/sa/reviews-v2".into()
            ),
            ("10.0.0.3:8080".into(), String::new()),
        ]
    );
}

#[test]
fn identities_are_in_the_controllers_trust_domain() {
    let snapshots = Snapshots::default();
    let mut index = Index::new(snapshots.clone(), Metrics::default(), "example.org".into());
    index.apply(meshed_pod("reviews-1", "reviews"));
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(reviews());
    assert_eq!(
        identities(&snapshots),
        [(
            "10.0.0.1:8080".into(),
            "spiffe://example.org/ns/shop/sa/reviews".into()
        )]
    );
}

#[test]
fn subsets_follow_pod_labels() {
    let (mut index, snapshots) = index();
    index.apply(pod("reviews-1", "v1"));
    index.apply(pod("reviews-2", "v2"));
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", true),
            ("10.0.0.3", "reviews-3", true),
        ],
    ));
    index.apply(reviews());
    let subsets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        endpoints(&snapshots, BY_NAME),
        [
            ("10.0.0.1:8080".into(), subsets(&["stable"])),
            ("10.0.0.2:8080".into(), subsets(&["canary"])),
            // A pod the index has not seen carries no labels.
            ("10.0.0.3:8080".into(), subsets(&[])),
        ]
    );
    assert_eq!(known(&snapshots, BY_NAME).subsets, ["stable", "canary"]);

    index.apply(pod("reviews-3", "v2"));
    index.apply(pod("reviews-1", "v2"));
    index.apply(deleted(Kind::Pod, "reviews-2"));
    assert_eq!(
        endpoints(&snapshots, BY_NAME),
        [
            ("10.0.0.1:8080".into(), subsets(&["canary"])),
            ("10.0.0.2:8080".into(), subsets(&[])),
            ("10.0.0.3:8080".into(), subsets(&["canary"])),
        ]
    );
}

#[test]
fn the_policy_in_force_is_translated_into_the_destination() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(policy(
        "reviews",
        "2026-01-01T00:00:00Z",
        json!({"host": "reviews.shop.svc.cluster.local", "timeout": "1m30s",
               "routes": [{"name": "slow", "match": {"pathPrefix": "/slow"}, "timeout": "5m"}]}),
    ));
    let destination = known(&snapshots, BY_NAME);
    assert_eq!(destination.policy, "shop/reviews");
    assert_eq!(destination.policy_generation, 3);
    assert_eq!(destination.policy_spec.unwrap().timeout_ms, Some(90_000));
    assert_eq!(destination.routes[0].name, "slow");
    assert_eq!(destination.routes[0].timeout_ms, Some(300_000));

    // The oldest valid policy wins; an invalid one is not in force and counts as an error.
    index.apply(policy(
        "older-but-invalid",
        "2025-01-01T00:00:00Z",
        json!({"host": "reviews", "timeout": "1s", "retries": {"perTryTimeout": "2s"}}),
    ));
    assert_eq!(known(&snapshots, BY_NAME).policy, "shop/reviews");
    assert_eq!(index.metrics.reconcile_errors.get(), 1);
    index.apply(policy(
        "oldest",
        "2024-01-01T00:00:00Z",
        json!({"host": "reviews", "timeout": "3s"}),
    ));
    assert_eq!(known(&snapshots, BY_NAME).policy, "shop/oldest");
    index.apply(deleted(Kind::DestinationPolicy, "oldest"));
    assert_eq!(known(&snapshots, BY_NAME).policy, "shop/reviews");

    // A host in another namespace governs nothing here.
    index.apply(deleted(Kind::DestinationPolicy, "reviews"));
    index.apply(policy(
        "elsewhere",
        "2020-01-01T00:00:00Z",
        json!({"host": "reviews.books", "timeout": "3s"}),
    ));
    let destination = known(&snapshots, BY_NAME);
    assert_eq!(destination.policy, "");
    assert_eq!(destination.policy_spec, None);
}

#[test]
fn churn_and_deletion_reach_every_key() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(Change::Synced);
    for round in 2..20u8 {
        let ip = format!("10.0.0.{round}");
        index.apply(slice("reviews-a", 8080, &[(&ip, "reviews-x", true)]));
        assert_eq!(
            endpoints(&snapshots, BY_IP),
            [(format!("{ip}:8080"), vec![])]
        );
    }
    index.apply(deleted(Kind::EndpointSlice, "reviews-a"));
    assert!(endpoint_list(&snapshots, BY_NAME).is_empty());

    // A port taken away and a ClusterIP changed withdraw their keys.
    index.apply(service(json!([{"name": "http", "port": 9081}])));
    assert_eq!(published(&snapshots, BY_NAME), Published::Unknown);
    assert_eq!(published(&snapshots, BY_IP), Published::Unknown);
    assert!(matches!(
        published(&snapshots, "reviews.shop.svc.cluster.local:9081"),
        Published::Known(..)
    ));

    index.apply(deleted(Kind::Service, "reviews"));
    for key in ["reviews.shop.svc.cluster.local:9081", "10.96.0.10:9081"] {
        assert_eq!(published(&snapshots, key), Published::Unknown, "{key}");
    }
    // Deleting what is not there changes nothing.
    index.apply(deleted(Kind::Service, "reviews"));
    index.apply(deleted(Kind::Pod, "nobody"));
}

#[test]
fn an_unchanged_recompute_publishes_nothing() {
    let (mut index, snapshots) = index();
    index.apply(pod("reviews-1", "v1"));
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(reviews());
    let mut by_name = snapshots.watch(BY_NAME);
    let mut by_ip = snapshots.watch(BY_IP);
    by_name.mark_unchanged();
    by_ip.mark_unchanged();

    index.apply(reviews());
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(pod("reviews-1", "v1"));
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    // A not-ready endpoint and an unrelated pod change nothing either.
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.9", "reviews-9", false),
        ],
    ));
    index.apply(pod("unrelated", "v2"));
    assert!(!by_name.has_changed().unwrap());
    assert!(!by_ip.has_changed().unwrap());

    index.apply(pod("reviews-1", "v2"));
    assert!(by_name.has_changed().unwrap());
    assert!(by_ip.has_changed().unwrap());
}

#[test]
fn synced_makes_the_rest_unknown_and_the_index_ready() {
    let (mut index, snapshots) = index();
    let ready = index.synced();
    let elsewhere = snapshots.watch("ratings.shop.svc.cluster.local:80");
    index.apply(reviews());
    assert!(elsewhere.borrow().is_none(), "may still appear");
    assert!(!*ready.borrow());
    index.apply(Change::Synced);
    assert!(matches!(
        elsewhere.borrow().as_deref(),
        Some(Snapshot::Unknown { .. })
    ));
    assert!(*ready.borrow());
    assert!(matches!(
        published(&snapshots, BY_NAME),
        Published::Known(..)
    ));
}

fn report(index: &Index, name: &str) -> PolicyReport {
    index.policy_reports().borrow()[&ObjectKey::new("shop", name)].clone()
}

fn problem(reason: &'static str, message: &str) -> Problem {
    Problem::new(reason, message)
}

#[test]
fn reports_say_why_a_policy_is_not_in_force_or_not_resolved() {
    let (mut index, _) = index();
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    let missing = problem("ServiceNotFound", "Service shop/reviews does not exist");
    let reviews_report = report(&index, "reviews");
    assert_eq!(reviews_report.split, "stable=90,canary=10");
    assert_eq!(reviews_report.generation, 3);
    assert_eq!(reviews_report.accepted, Ok(()));
    assert_eq!(reviews_report.resolved_refs, Err(missing.clone()));
    assert_eq!(reviews_report.destination_keys, Err(missing));

    // The Service, with endpoints of the stable pods only.
    index.apply(pod("reviews-1", "v1"));
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(reviews());
    let reviews_report = report(&index, "reviews");
    assert_eq!(
        reviews_report.resolved_refs,
        Err(problem(
            "SubsetsWithoutEndpoints",
            "no ready endpoints in subset canary: while another subset has some, it gets \
             no traffic"
        ))
    );
    assert_eq!(
        reviews_report.destination_keys,
        Ok(vec![BY_IP.to_string(), BY_NAME.to_string()])
    );
    // A canary pod labelled later resolves it.
    index.apply(slice("reviews-b", 8080, &[("10.0.0.2", "reviews-2", true)]));
    index.apply(pod("reviews-2", "v2"));
    assert_eq!(report(&index, "reviews").resolved_refs, Ok(()));

    index.apply(policy(
        "newer",
        "2026-02-01T00:00:00Z",
        json!({"host": "reviews"}),
    ));
    let conflicted = problem(
        "Conflicted",
        "DestinationPolicy shop/reviews governs Service shop/reviews: of the policies for a \
         Service, the oldest is in force",
    );
    let newer = report(&index, "newer");
    assert_eq!(newer.accepted, Err(conflicted.clone()));
    assert_eq!(newer.destination_keys, Err(conflicted));
    assert_eq!(newer.split, "all");

    index.apply(policy(
        "invalid",
        "2025-01-01T00:00:00Z",
        json!({"host": "reviews", "timeout": "1s", "retries": {"perTryTimeout": "2s"}}),
    ));
    assert_eq!(
        report(&index, "invalid").accepted,
        Err(problem(
            "Invalid",
            "spec.retries.perTryTimeout: 2s exceeds the timeout 1s"
        ))
    );
    assert_eq!(
        report(&index, "reviews").accepted,
        Ok(()),
        "an invalid policy is never in force"
    );

    index.apply(policy(
        "elsewhere",
        "2020-01-01T00:00:00Z",
        json!({"host": "reviews.books"}),
    ));
    assert_eq!(
        report(&index, "elsewhere").resolved_refs,
        Err(problem(
            "ServiceNotFound",
            "host `reviews.books` names no Service in namespace shop, the only one a policy \
             there applies to"
        ))
    );

    // The policy in force deleted: the next oldest takes over.
    index.apply(deleted(Kind::DestinationPolicy, "reviews"));
    assert!(
        !index
            .policy_reports()
            .borrow()
            .contains_key(&ObjectKey::new("shop", "reviews"))
    );
    assert_eq!(report(&index, "newer").accepted, Ok(()));
}

#[test]
fn reports_change_only_when_their_content_does() {
    let (mut index, _) = index();
    index.apply(reviews());
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    let mut reports = index.policy_reports();
    reports.mark_unchanged();
    index.apply(pod("unrelated", "v1"));
    index.apply(reviews());
    assert!(!reports.has_changed().unwrap());
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(pod("reviews-1", "v2"));
    assert!(reports.has_changed().unwrap());
}

#[tokio::test]
async fn run_applies_what_sources_send() {
    let (index, snapshots) = index();
    let ready = index.synced();
    let (changes, received) = mpsc::channel(8);
    let running = tokio::spawn(index.run(received));
    changes.send(reviews()).await.unwrap();
    changes.send(Change::Synced).await.unwrap();
    drop(changes);
    running.await.unwrap();
    assert!(*ready.borrow());
    assert!(matches!(
        published(&snapshots, BY_NAME),
        Published::Known(..)
    ));
}

/// The endpoint groups published for `key`, as shared.
fn group_sets(snapshots: &Snapshots, key: &str) -> Vec<Arc<crate::distribute::EndpointSet>> {
    match snapshots.current(key).as_deref() {
        Some(Snapshot::Known { endpoints, .. }) => endpoints.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

/// A slice of `reviews` with the endpoints 10.{number}.0.{1..=endpoints}.
fn numbered_slice(number: usize, endpoints: usize) -> Change {
    let addresses: Vec<(String, String)> = (1..=endpoints)
        .map(|i| {
            (
                format!("10.{number}.0.{i}"),
                format!("reviews-{number}-{i}"),
            )
        })
        .collect();
    let endpoints: Vec<(&str, &str, bool)> = addresses
        .iter()
        .map(|(ip, pod)| (ip.as_str(), pod.as_str(), true))
        .collect();
    slice(&format!("reviews-{number:02}"), 8080, &endpoints)
}

#[test]
fn a_change_to_one_slice_rebuilds_that_slices_group_alone() {
    const SLICES: usize = 40;
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
    for slice in 0..SLICES {
        index.apply(numbered_slice(slice, 10));
    }
    let before = group_sets(&snapshots, BY_NAME);
    assert_eq!(before.len(), SLICES);
    let built = index.groups.slices_built;

    index.apply(numbered_slice(17, 11));
    let after = group_sets(&snapshots, BY_NAME);
    assert_eq!(index.groups.slices_built - built, 1, "one slice translated");
    for (i, (old, new)) in before.iter().zip(&after).enumerate() {
        if i == 17 {
            assert_ne!(old.version, new.version);
            assert_eq!(new.decode().len(), 11);
        } else {
            assert!(Arc::ptr_eq(old, new), "group {} was rebuilt", old.name);
        }
    }
    // Every key of the port shares the same groups.
    let by_ip = group_sets(&snapshots, BY_IP);
    assert!(after.iter().zip(&by_ip).all(|(a, b)| Arc::ptr_eq(a, b)));

    // A slice going away, a pod's labels, a policy edit that leaves the subsets alone: nothing
    // else is translated again.
    let built = index.groups.slices_built;
    index.apply(deleted(Kind::EndpointSlice, "reviews-03"));
    index.apply(pod("reviews-5-1", "v2"));
    let mut faster = canary_policy();
    faster["timeout"] = json!("2s");
    index.apply(policy("reviews", "2026-01-01T00:00:00Z", faster));
    assert_eq!(
        index.groups.slices_built - built,
        1,
        "only the slice on the relabelled pod"
    );
    let later = group_sets(&snapshots, BY_NAME);
    assert_eq!(later.len(), SLICES - 1);
    let rebuilt: Vec<&str> = later
        .iter()
        .filter(|group| !after.iter().any(|kept| Arc::ptr_eq(kept, group)))
        .map(|group| group.name.as_str())
        .collect();
    assert_eq!(rebuilt, ["reviews-05"]);

    // New subsets change every endpoint: all are built anew.
    let built = index.groups.slices_built;
    index.apply(policy(
        "reviews",
        "2026-01-01T00:00:00Z",
        json!({"host": "reviews"}),
    ));
    assert_eq!(index.groups.slices_built - built, SLICES - 1);
}

#[test]
fn a_slice_change_rebuilds_the_slices_it_shares_an_address_with() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", true),
        ],
    ));
    index.apply(slice(
        "reviews-b",
        8080,
        &[
            ("10.0.0.2", "reviews-2", true),
            ("10.0.0.3", "reviews-3", true),
        ],
    ));
    let layout = |snapshots: &Snapshots| -> Vec<(String, Vec<String>)> {
        groups(snapshots, BY_NAME)
            .into_iter()
            .map(|(name, _, addresses)| (name, addresses))
            .collect()
    };
    let addresses =
        |ips: &[&str]| -> Vec<String> { ips.iter().map(|ip| format!("{ip}:8080")).collect() };
    assert_eq!(
        layout(&snapshots),
        [
            ("reviews-a".into(), addresses(&["10.0.0.1", "10.0.0.2"])),
            ("reviews-b".into(), addresses(&["10.0.0.3"])),
        ]
    );

    // Moved out of the first slice, the shared address is served from the second.
    let built = index.groups.slices_built;
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    assert_eq!(index.groups.slices_built - built, 2);
    assert_eq!(
        layout(&snapshots),
        [
            ("reviews-a".into(), addresses(&["10.0.0.1"])),
            ("reviews-b".into(), addresses(&["10.0.0.2", "10.0.0.3"])),
        ]
    );

    // A change that shares nothing with the second slice leaves it alone.
    let kept = group_sets(&snapshots, BY_NAME)[1].clone();
    let built = index.groups.slices_built;
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.9", "reviews-9", true),
        ],
    ));
    assert_eq!(index.groups.slices_built - built, 1);
    assert!(Arc::ptr_eq(&kept, &group_sets(&snapshots, BY_NAME)[1]));
}

fn authorization_policy(name: &str, spec: Value) -> Change {
    Change::Applied(Object::AuthorizationPolicy(Box::new(object(json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": "shop", "name": name, "generation": 2},
        "spec": spec,
    })))))
}

fn readers() -> Value {
    json!({
        "targetRefs": [{"kind": "Service", "name": "reviews"}],
        "rules": [
            {"from": [{"serviceAccounts": ["shop/productpage"]}], "to": [{"ports": [9080]}]},
            {"from": [{"namespaces": ["frontend"]}], "to": [{"ports": [9999]}]},
        ],
    })
}

fn inbound(snapshots: &Snapshots, pod: &str) -> Option<proto::Inbound> {
    match published(snapshots, &format!("inbound:shop/{pod}")) {
        Published::Known(destination, _) => Some(destination.inbound.expect("an inbound key")),
        Published::Nothing | Published::Unknown => None,
    }
}

#[test]
fn each_pod_of_a_targeted_service_gets_its_policies_on_the_target_port() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", false),
        ],
    ));
    assert_eq!(inbound(&snapshots, "reviews-1"), None, "no policy, no key");

    index.apply(authorization_policy("readers", readers()));
    let published = inbound(&snapshots, "reviews-1").expect("a policy targets reviews");
    assert_eq!(published.ports.len(), 1);
    let port = &published.ports[0];
    assert_eq!(
        port.port, 8080,
        "the Service's targetPort, as the slice resolves it"
    );
    assert_eq!(port.authorizations.len(), 1);
    let authorization = &port.authorizations[0];
    assert_eq!(authorization.policy, "shop/readers");
    assert_eq!(authorization.action(), proto::AuthorizationAction::Allow);
    // The rule for Service port 9999 is not this port's.
    assert_eq!(authorization.rules.len(), 1);
    assert_eq!(
        authorization.rules[0].sources[0].service_accounts,
        ["shop/productpage"]
    );
    // Not ready (starting, or draining): no caller is sent there through the mesh, but it is
    // reachable at its address, and its proxy enforces the policy all the same.
    assert_eq!(
        inbound(&snapshots, "reviews-2"),
        Some(published.clone()),
        "a pod not ready has its policy too"
    );

    // The pod leaves the Service: its key goes.
    index.apply(slice("reviews-a", 8080, &[("10.0.0.2", "reviews-2", true)]));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
    assert!(inbound(&snapshots, "reviews-2").is_some());

    index.apply(deleted(Kind::AuthorizationPolicy, "readers"));
    assert_eq!(inbound(&snapshots, "reviews-2"), None);
}

/// A pod of `shop` with these labels.
fn labelled_pod(name: &str, labels: Value) -> Change {
    Change::Applied(Object::Pod(Box::new(object(json!({
        "metadata": {"namespace": "shop", "name": name, "labels": labels},
    })))))
}

/// The pod ports of a published inbound side, each with its policies and how many rules each has.
fn inbound_ports(inbound: &proto::Inbound) -> Vec<(u32, Vec<(String, usize)>)> {
    inbound
        .ports
        .iter()
        .map(|port| {
            let policies = port
                .authorizations
                .iter()
                .map(|a| (a.policy.clone(), a.rules.len()))
                .collect();
            (port.port, policies)
        })
        .collect()
}

#[test]
fn a_pod_a_targeted_service_selects_has_its_policies_whether_or_not_a_slice_lists_it() {
    let (mut index, snapshots) = index();
    let reviews = |selector: Value| {
        Change::Applied(Object::Service(Box::new(object(json!({
            "metadata": {"namespace": "shop", "name": "reviews"},
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": 9080, "targetPort": 8080},
                {"name": "admin", "port": 9999, "targetPort": "admin"},
            ]},
        })))))
    };
    index.apply(reviews(json!({"app": "reviews"})));
    index.apply(authorization_policy("readers", readers()));
    index.apply(labelled_pod(
        "reviews-1",
        json!({"app": "reviews", "version": "v1"}),
    ));
    index.apply(labelled_pod("ratings-1", json!({"app": "ratings"})));
    let readers_on = |port| (port, vec![("shop/readers".to_string(), 1)]);
    // Before it has an address, no slice lists it; the numbered targetPort is known already.
    let published = inbound(&snapshots, "reviews-1").expect("selected, so in force at once");
    assert_eq!(inbound_ports(&published), [readers_on(8080)]);
    assert_eq!(inbound(&snapshots, "ratings-1"), None, "not selected");

    // Its slice resolves the named targetPort too.
    let slice_with = |pods: &[&str]| {
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|pod| {
                json!({
                    "addresses": ["10.0.0.1"], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"},
                })
            })
            .collect();
        Change::Applied(Object::EndpointSlice(Box::new(object(json!({
            "metadata": {
                "namespace": "shop", "name": "reviews-a",
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
            "endpoints": endpoints,
        })))))
    };
    index.apply(slice_with(&["reviews-1"]));
    let published = inbound(&snapshots, "reviews-1").unwrap();
    assert_eq!(
        inbound_ports(&published),
        [readers_on(8080), readers_on(9090)],
        "listed by its selector and its slice, each rule once"
    );

    // The slice is rewritten without it (a rebalance, a readiness flap): the selector holds.
    index.apply(slice_with(&[]));
    let published = inbound(&snapshots, "reviews-1").unwrap();
    assert_eq!(inbound_ports(&published), [readers_on(8080)]);

    // Relabelled out of the Service, or the Service's selector changed: the key goes.
    index.apply(labelled_pod("reviews-1", json!({"app": "debug"})));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
    index.apply(labelled_pod("reviews-1", json!({"app": "reviews"})));
    assert!(inbound(&snapshots, "reviews-1").is_some());
    index.apply(reviews(json!({"app": "reviews", "track": "stable"})));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
    index.apply(reviews(json!({"app": "reviews"})));
    assert!(inbound(&snapshots, "reviews-1").is_some());
    index.apply(deleted(Kind::Pod, "reviews-1"));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
}

#[test]
fn an_invalid_authorization_policy_is_not_in_force() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    index.apply(authorization_policy(
        "broken",
        json!({"targetRefs": [{"kind": "Service", "name": "reviews"}], "rules": [{"from": [{}]}]}),
    ));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
}

#[test]
fn a_pod_port_two_services_reach_gets_the_policies_of_both_and_follows_their_ports() {
    let (mut index, snapshots) = index();
    // reviews reaches reviews-1 on 8080 (the slice's port for the Service port `http`).
    index.apply(reviews());
    index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
    // And so does reviews-admin, by its port 9999.
    index.apply(Change::Applied(Object::Service(Box::new(object(json!({
        "metadata": {"namespace": "shop", "name": "reviews-admin"},
        "spec": {"ports": [{"name": "admin", "port": 9999}]},
    }))))));
    index.apply(Change::Applied(Object::EndpointSlice(Box::new(object(
        json!({
            "metadata": {
                "namespace": "shop", "name": "reviews-admin-a",
                "labels": {"kubernetes.io/service-name": "reviews-admin"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "admin", "port": 8080}],
            "endpoints": [{
                "addresses": ["10.0.0.1"], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "shop"},
            }],
        }),
    )))));
    index.apply(authorization_policy("readers", readers()));
    index.apply(authorization_policy(
        "admins",
        json!({
            "targetRefs": [{"kind": "Service", "name": "reviews-admin"}],
            "action": "DENY",
            "rules": [{"from": [{"namespaces": ["frontend"]}]}],
        }),
    ));
    let published = inbound(&snapshots, "reviews-1").unwrap();
    let policies: Vec<(&str, usize)> = published.ports[0]
        .authorizations
        .iter()
        .map(|a| (a.policy.as_str(), a.rules.len()))
        .collect();
    assert_eq!(published.ports[0].port, 8080);
    assert_eq!(policies, [("shop/admins", 1), ("shop/readers", 1)]);

    // reviews moves to port 9999 itself: readers' rule for 9999 is the one that applies now.
    index.apply(service(json!([{"name": "http", "port": 9999}])));
    let published = inbound(&snapshots, "reviews-1").unwrap();
    let readers = &published.ports[0].authorizations[1];
    assert_eq!(readers.policy, "shop/readers");
    assert_eq!(readers.rules[0].sources[0].namespaces, ["frontend"]);

    // The pod's Services go; so does its key.
    index.apply(deleted(Kind::Service, "reviews"));
    index.apply(deleted(Kind::Service, "reviews-admin"));
    assert_eq!(inbound(&snapshots, "reviews-1"), None);
}

/// A Service of `shop` with a ClusterIP and these ports (name, port).
fn shop_service(name: &str, ip: &str, ports: &[u16]) -> Change {
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| json!({"name": format!("p{port}"), "port": port}))
        .collect();
    Change::Applied(Object::Service(Box::new(object(json!({
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports},
    })))))
}

fn http_route(namespace: &str, name: &str, created: &str, spec: Value) -> Change {
    Change::Applied(Object::HttpRoute(Box::new(object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "namespace": namespace, "name": name, "generation": 2, "uid": format!("uid-{name}"),
            "creationTimestamp": created,
        },
        "spec": spec,
    })))))
}

fn route_ref(namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::HttpRoute,
        key: ObjectKey::new(namespace, name),
    }
}

/// `echo` (80, 8080) with the backends `echo-v1` and `echo-v2` (both 8080).
fn echo_services(index: &mut Index) {
    index.apply(shop_service("echo", "10.96.1.1", &[80, 8080]));
    index.apply(shop_service("echo-v1", "10.96.1.2", &[8080]));
    index.apply(shop_service("echo-v2", "10.96.1.3", &[8080]));
}

fn weighted_route() -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [
            {
                "matches": [{"path": {"type": "Exact", "value": "/v2"}}],
                "backendRefs": [{"name": "echo-v2", "port": 8080}],
            },
            {
                "backendRefs": [
                    {"name": "echo-v1", "port": 8080, "weight": 70},
                    {"name": "echo-v2", "port": 8080, "weight": 30},
                    {"name": "echo-v3", "port": 8080, "weight": 0},
                ],
            },
        ],
    })
}

fn backends(rule: &proto::HttpRouteRule) -> Vec<(String, u32, String)> {
    rule.backends
        .iter()
        .map(|b| (b.key.clone(), b.weight, b.unresolved.clone()))
        .collect()
}

#[test]
fn a_route_is_published_in_the_destination_of_the_service_port_it_attaches_to() {
    let (mut index, snapshots) = index();
    echo_services(&mut index);
    index.apply(http_route(
        "shop",
        "split",
        "2026-01-01T00:00:00Z",
        weighted_route(),
    ));

    let echo = known(&snapshots, "echo.shop.svc.cluster.local:80");
    assert_eq!(
        echo,
        known(&snapshots, "10.96.1.1:80"),
        "by name and by address"
    );
    let [table] = echo.http_routes.as_slice() else {
        panic!("one table: {:?}", echo.http_routes)
    };
    assert_eq!(table.consumer_namespace, "", "the producer routes");
    assert_eq!(table.rules.len(), 2);
    assert_eq!(table.rules[0].route, "HTTPRoute/shop/split");
    assert_eq!(
        backends(&table.rules[1]),
        [
            (
                "echo-v1.shop.svc.cluster.local:8080".into(),
                70,
                String::new()
            ),
            (
                "echo-v2.shop.svc.cluster.local:8080".into(),
                30,
                String::new()
            ),
            (String::new(), 0, "no Service shop/echo-v3".into()),
        ]
    );
    // The exact path first; the rule without matches matches every path.
    use proto::http_route_match::Path;
    let matches: Vec<_> = table
        .matches
        .iter()
        .map(|m| (m.rule, m.path.clone()))
        .collect();
    assert_eq!(
        matches,
        [
            (0, Some(Path::Exact("/v2".into()))),
            (1, Some(Path::Prefix("/".into())))
        ]
    );
    // The parentRef names port 80: the Service's other port, and its backends, have none.
    assert!(
        known(&snapshots, "echo.shop.svc.cluster.local:8080")
            .http_routes
            .is_empty()
    );
    assert!(
        known(&snapshots, "echo-v1.shop.svc.cluster.local:8080")
            .http_routes
            .is_empty()
    );

    let reports = index.route_reports().borrow().clone();
    let report = &reports[&route_ref("shop", "split")];
    assert_eq!(report.generation, 2);
    let [parent] = report.parents.as_slice() else {
        panic!("one parent: {:?}", report.parents)
    };
    assert_eq!(parent.accepted, Ok(()));
    assert_eq!(
        parent.resolved_refs,
        Err(problem("BackendNotFound", "no Service shop/echo-v3"))
    );
}

#[test]
fn a_backend_service_that_appears_or_goes_changes_the_routes_that_send_to_it() {
    let (mut index, snapshots) = index();
    echo_services(&mut index);
    index.apply(http_route(
        "shop",
        "split",
        "2026-01-01T00:00:00Z",
        weighted_route(),
    ));

    index.apply(shop_service("echo-v3", "10.96.1.4", &[8080]));
    let echo = known(&snapshots, "echo.shop.svc.cluster.local:80");
    assert_eq!(
        backends(&echo.http_routes[0].rules[1])[2],
        (
            "echo-v3.shop.svc.cluster.local:8080".into(),
            0,
            String::new()
        )
    );
    let resolved = |index: &Index| {
        index.route_reports().borrow()[&route_ref("shop", "split")].parents[0]
            .resolved_refs
            .clone()
    };
    assert_eq!(resolved(&index), Ok(()));

    index.apply(shop_service("echo-v2", "10.96.1.3", &[9090]));
    let echo = known(&snapshots, "echo.shop.svc.cluster.local:80");
    assert_eq!(
        backends(&echo.http_routes[0].rules[0]),
        [(
            String::new(),
            1,
            "Service shop/echo-v2 has no port 8080".into()
        )]
    );
    assert_eq!(
        resolved(&index),
        Err(problem(
            "BackendNotFound",
            "Service shop/echo-v2 has no port 8080"
        ))
    );
}

#[test]
fn a_route_without_a_port_attaches_to_every_port_and_its_deletion_withdraws_it() {
    let (mut index, snapshots) = index();
    echo_services(&mut index);
    index.apply(http_route(
        "shop",
        "all-ports",
        "2026-01-01T00:00:00Z",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"backendRefs": [{"name": "echo-v1", "port": 8080}]}],
        }),
    ));
    for port in [80, 8080] {
        let echo = known(&snapshots, &format!("echo.shop.svc.cluster.local:{port}"));
        assert_eq!(echo.http_routes.len(), 1, "port {port}");
    }

    index.apply(deleted(Kind::HttpRoute, "all-ports"));
    for port in [80, 8080] {
        let echo = known(&snapshots, &format!("echo.shop.svc.cluster.local:{port}"));
        assert!(echo.http_routes.is_empty(), "port {port}");
    }
    assert!(index.route_reports().borrow().is_empty());
}

/// frontend/mine, a consumer route of `echo` (every port) with these rules.
fn consumer_route(rules: Value) -> Change {
    http_route(
        "frontend",
        "mine",
        "2026-01-02T00:00:00Z",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "namespace": "shop"}],
            "rules": rules,
        }),
    )
}

#[test]
fn consumer_routes_get_a_table_of_their_namespace_beside_the_producer_routes() {
    let (mut index, snapshots) = index();
    echo_services(&mut index);
    index.apply(http_route(
        "shop",
        "split",
        "2026-01-01T00:00:00Z",
        weighted_route(),
    ));
    index.apply(consumer_route(json!([{
        "filters": [{
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "set"}]},
        }],
        // No ReferenceGrant: a mesh route may send to any namespace's Service.
        "backendRefs": [{"name": "echo-v1", "namespace": "shop", "port": 8080}],
    }])));
    let echo = known(&snapshots, "echo.shop.svc.cluster.local:80");
    let tables: Vec<_> = echo
        .http_routes
        .iter()
        .map(|t| (t.consumer_namespace.as_str(), t.rules[0].route.as_str()))
        .collect();
    assert_eq!(
        tables,
        [
            ("", "HTTPRoute/shop/split"),
            ("frontend", "HTTPRoute/frontend/mine")
        ]
    );
    let consumer = &echo.http_routes[1];
    assert_eq!(
        backends(&consumer.rules[0]),
        [(
            "echo-v1.shop.svc.cluster.local:8080".into(),
            1,
            String::new()
        )]
    );
    let reports = index.route_reports().borrow().clone();
    assert_eq!(
        reports[&route_ref("frontend", "mine")].parents[0].accepted,
        Ok(())
    );
}

#[test]
fn a_parent_that_is_not_a_service_port_is_not_accepted_and_fields_unknown_are_named() {
    let (mut index, _snapshots) = index();
    echo_services(&mut index);
    index.apply(http_route(
        "shop",
        "odd",
        "2026-01-01T00:00:00Z",
        json!({
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "echo", "port": 81},
                {"group": "", "kind": "Service", "name": "missing"},
                // Not a mesh parent: another controller's.
                {"name": "some-gateway"},
            ],
            "rules": [{
                "sessionPersistence": {"sessionName": "s"},
                "filters": [{"type": "CORS", "cors": {"allowOrigins": ["*"]}}],
                "backendRefs": [{"name": "echo-v1", "port": 8080}],
            }],
        }),
    ));
    let reports = index.route_reports().borrow().clone();
    let report = &reports[&route_ref("shop", "odd")];
    let accepted: Vec<_> = report.parents.iter().map(|p| p.accepted.clone()).collect();
    assert_eq!(
        accepted,
        [
            Err(problem(
                "NoMatchingParent",
                "Service shop/echo has no port 81"
            )),
            Err(problem("NoMatchingParent", "no Service shop/missing")),
        ]
    );
    let parent = &report.parents[0];
    assert_eq!(
        parent.ignored,
        [
            "spec.rules[0].sessionPersistence",
            "spec.rules[0].filters[0].cors"
        ]
    );
    assert_eq!(
        parent.partially_invalid.as_deref(),
        Some(
            "these rules answer 500: spec.rules[0].filters[0]: filter type `CORS` is not supported"
        )
    );
}

#[test]
fn a_policy_report_names_the_routes_attached_to_its_service_as_they_come_and_go() {
    let (mut index, _snapshots) = index();
    echo_services(&mut index);
    index.apply(policy(
        "echo",
        "2026-01-01T00:00:00Z",
        json!({"host": "echo"}),
    ));
    assert_eq!(report(&index, "echo").routed_by, []);

    index.apply(http_route(
        "shop",
        "split",
        "2026-01-01T00:00:00Z",
        weighted_route(),
    ));
    index.apply(consumer_route(json!([{
        "backendRefs": [{"name": "echo-v1", "namespace": "shop", "port": 8080}],
    }])));
    // Sends to echo but is attached elsewhere: it does not serve calls to echo.
    index.apply(http_route(
        "shop",
        "to-echo",
        "2026-01-01T00:00:00Z",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo-v1"}],
            "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}],
        }),
    ));
    let routed = |route: &str, callers: Option<&str>, ports: &[u16]| RoutedBy {
        route: route.into(),
        callers: callers.map(String::from),
        ports: ports.to_vec(),
    };
    assert_eq!(
        report(&index, "echo").routed_by,
        [
            routed("HTTPRoute/frontend/mine", Some("frontend"), &[80, 8080]),
            routed("HTTPRoute/shop/split", None, &[80]),
        ]
    );

    // The Service loses the port the producer route names: it serves nothing there.
    index.apply(shop_service("echo", "10.96.1.1", &[8080]));
    assert_eq!(
        report(&index, "echo").routed_by,
        [routed("HTTPRoute/frontend/mine", Some("frontend"), &[8080])]
    );

    index.apply(Change::Deleted(route_ref("frontend", "mine")));
    assert_eq!(report(&index, "echo").routed_by, []);
}

#[test]
fn a_meshed_pods_inbound_side_names_its_service_account() {
    let (mut index, snapshots) = index();
    index.apply(reviews());
    index.apply(slice(
        "reviews-a",
        8080,
        &[
            ("10.0.0.1", "reviews-1", true),
            ("10.0.0.2", "reviews-2", true),
        ],
    ));
    index.apply(authorization_policy("readers", readers()));
    let account = |pod: &str| inbound(&snapshots, pod).expect("a key").service_account;
    assert_eq!(account("reviews-1"), "", "not seen yet");

    index.apply(Change::Applied(Object::Pod(Box::new(object(json!({
        "metadata": {
            "namespace": "shop", "name": "reviews-1",
            "annotations": {"outrigger.dev/identity": "reviews"},
        },
    }))))));
    assert_eq!(account("reviews-1"), "reviews");
    index.apply(pod("reviews-2", "v2"));
    assert_eq!(account("reviews-2"), "", "not meshed with an identity");
}

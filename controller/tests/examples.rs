//! The manifests in examples/ are what the controller takes and serves as documented.

use std::path::{Path, PathBuf};

use outrigger_api::proto;
use outrigger_controller::{Change, Index, Manifests, Metrics, Snapshot, Snapshots, parse};

/// Where cargo runs the test from, not where it was built.
fn examples() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../examples")
}

#[test]
fn the_canary_example_is_a_valid_policy() {
    let path = examples().join("reviews-canary.yaml");
    let objects = parse(&path, &std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(objects.len(), 1);
}

#[test]
fn the_authorization_example_is_a_valid_policy() {
    let path = examples().join("reviews-readers.yaml");
    let objects = parse(&path, &std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(objects.len(), 1);
}

#[test]
fn the_demo_serves_reviews_split_90_10_between_its_two_versions() {
    let metrics = Metrics::default();
    let mut manifests = Manifests::new(examples().join("demo"), metrics.clone()).unwrap();
    let snapshots = Snapshots::default();
    let mut index = Index::new(
        snapshots.clone(),
        metrics.clone(),
        outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
    );
    for change in manifests.scan() {
        index.apply(change);
    }
    index.apply(Change::Synced);
    assert_eq!(metrics.reconcile_errors.get(), 0);

    for key in ["reviews.demo.svc.cluster.local:9080", "10.96.0.20:9080"] {
        let snapshot = snapshots.watch(key).borrow().clone().unwrap();
        let Snapshot::Known {
            destination,
            endpoints,
            ..
        } = &*snapshot
        else {
            panic!("{key} is not served")
        };
        let endpoints: Vec<_> = endpoints.iter().flat_map(|group| group.decode()).collect();
        let endpoints: Vec<(&str, &[String])> = endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.subsets.as_slice()))
            .collect();
        assert_eq!(
            endpoints,
            [
                ("127.0.0.1:9081", &["stable".to_string()][..]),
                ("127.0.0.1:9082", &["canary".to_string()][..]),
            ]
        );
        let policy = destination.policy_spec.as_ref().unwrap();
        assert_eq!(
            policy.traffic_split.as_ref().unwrap().weights,
            [
                proto::WeightedSubset {
                    subset: "stable".into(),
                    weight: 90
                },
                proto::WeightedSubset {
                    subset: "canary".into(),
                    weight: 10
                },
            ]
        );
        assert_eq!(policy.retries.as_ref().unwrap().attempts, 2);
    }
}

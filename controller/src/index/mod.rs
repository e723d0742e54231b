//! The index: what the controller knows of the cluster, turned into one `proto::Destination` per
//! Service port.
//!
//! Sources (a manifests directory; the Kubernetes API) feed it [`Change`]s. It keeps only what
//! destinations are made of (Service ports and ClusterIPs, ready endpoints, pod labels and identities, translated
//! policies), and on each change recomputes only the Services that change can affect. A destination
//! is published under the Service port's name (`reviews.shop.svc.cluster.local:9080`) and under
//! each ClusterIP:port (what a redirected connection was addressed to), and only when its content
//! changed, so streams are not woken for nothing.
//!
//! One file per kind of state: `service`, `slice`, `pod`, `policy`, `authorization`, each keeping
//! what destinations need of its objects and saying which Services a change affects; `groups`
//! keeps each Service's endpoint groups, so that a change rebuilds only the groups it touched;
//! `report` turns that state into what status needs of each policy. `inbound` publishes, for each
//! pod a Service with an AuthorizationPolicy reaches, what its proxy enforces on calls to it. A
//! new kind (a route) gets a file of its own here, an arm in [`Index::insert`] and
//! [`Index::remove`], and its part of [`Index::destinations`].

mod authorization;
mod groups;
mod inbound;
mod pod;
mod policy;
mod report;
mod route;
mod service;
mod slice;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use outrigger_api::destination::DestinationKey;
use outrigger_api::proto;
use tokio::sync::{mpsc, watch};

use self::authorization::Authorizations;
pub use self::authorization::{AuthorizationReport, AuthorizationReports};
use self::groups::{Groups, Inputs};
use self::pod::Pods;
use self::policy::Policies;
pub use self::report::{PolicyReport, PolicyReports, Problem};
use self::route::Routes;
pub use self::route::{RouteReport, RouteReports, RoutedBy};
use self::service::Services;
use self::slice::{Slices, Touched};
use crate::distribute::{Snapshot, Snapshots};
use crate::metrics::Metrics;
use crate::source::{Change, Kind, Object, ObjectKey, ObjectRef};

pub struct Index {
    snapshots: Snapshots,
    metrics: Metrics,
    services: Services,
    slices: Slices,
    pods: Pods,
    policies: Policies,
    authorizations: Authorizations,
    routes: Routes,
    groups: Groups,
    inbound: inbound::Published,
    /// Per Service, the keys published for it and their versions.
    published: HashMap<ObjectKey, HashMap<String, String>>,
    synced: watch::Sender<bool>,
    reports: watch::Sender<PolicyReports>,
    authorization_reports: watch::Sender<AuthorizationReports>,
    route_reports: watch::Sender<RouteReports>,
    /// Of the identities meshed endpoints present: the controller's, which it certifies.
    trust_domain: String,
}

impl Index {
    pub fn new(snapshots: Snapshots, metrics: Metrics, trust_domain: String) -> Self {
        Self {
            snapshots,
            metrics,
            trust_domain,
            services: Services::default(),
            slices: Slices::default(),
            pods: Pods::default(),
            policies: Policies::default(),
            authorizations: Authorizations::default(),
            routes: Routes::default(),
            groups: Groups::default(),
            inbound: inbound::Published::default(),
            published: HashMap::new(),
            synced: watch::Sender::new(false),
            reports: watch::Sender::new(PolicyReports::new()),
            authorization_reports: watch::Sender::new(AuthorizationReports::new()),
            route_reports: watch::Sender::new(RouteReports::new()),
        }
    }

    /// Turns true once a source has delivered its full initial state.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// What status needs of every DestinationPolicy (translation errors included), kept up to
    /// date as changes are applied.
    pub fn policy_reports(&self) -> watch::Receiver<PolicyReports> {
        self.reports.subscribe()
    }

    /// What status needs of every AuthorizationPolicy, kept up to date as changes are applied.
    pub fn authorization_reports(&self) -> watch::Receiver<AuthorizationReports> {
        self.authorization_reports.subscribe()
    }

    /// What status needs of every HTTPRoute and GRPCRoute, kept up to date as changes are
    /// applied.
    pub fn route_reports(&self) -> watch::Receiver<RouteReports> {
        self.route_reports.subscribe()
    }

    /// Applies changes until every sender is gone.
    pub async fn run(mut self, mut changes: mpsc::Receiver<Change>) {
        while let Some(change) = changes.recv().await {
            self.apply(change);
        }
    }

    pub fn apply(&mut self, change: Change) {
        let changed_at = Instant::now();
        let changed = match &change {
            Change::Applied(object) => object.reference(),
            Change::Deleted(reference) => Some(reference.clone()),
            Change::Synced => None,
        };
        let changed_policy = changed
            .clone()
            .filter(|reference| reference.kind == Kind::DestinationPolicy)
            .map(|reference| reference.key);
        let changed_authorization = changed
            .clone()
            .filter(|reference| reference.kind == Kind::AuthorizationPolicy)
            .map(|reference| reference.key);
        let changed_route = changed.filter(|reference| reference.kind.is_optional());
        let affected: BTreeSet<ObjectKey> = match change {
            Change::Applied(object) => {
                let Some(reference) = object.reference() else {
                    tracing::warn!(kind = ?object.kind(), "ignoring an object without a name or namespace");
                    return;
                };
                if let Object::Pod(pod) = &object
                    && self.pods.unchanged(&reference.key, pod)
                {
                    return;
                }
                self.remove(&reference)
                    .into_iter()
                    .chain(self.insert(reference.key, object))
                    .collect()
            }
            Change::Deleted(reference) => self.remove(&reference),
            Change::Synced => {
                self.snapshots.mark_synced();
                self.synced.send_replace(true);
                return;
            }
        };
        // A Service's ports decide the backends of the routes that send to it.
        let affected: BTreeSet<ObjectKey> = affected
            .iter()
            .flat_map(|service| self.routes.parents_of_backend(service))
            .chain(affected.iter().cloned())
            .collect();
        for service in &affected {
            self.recompute(service, changed_at);
        }
        self.recompute_inbound(&affected, changed_at);
        let policies = affected
            .iter()
            .flat_map(|service| self.policies.of_service(service))
            .cloned()
            .chain(changed_policy)
            .collect();
        self.report(policies);
        let authorizations = affected
            .iter()
            .flat_map(|service| self.authorizations.of_service(service))
            .cloned()
            .chain(changed_authorization)
            .collect();
        self.report_authorizations(authorizations);
        let routes = affected
            .iter()
            .flat_map(|service| self.routes.of_service(service))
            .chain(changed_route)
            .collect();
        self.report_routes(routes);
    }

    /// Brings the reports of these routes up to date.
    fn report_routes(&self, routes: BTreeSet<ObjectRef>) {
        self.route_reports.send_if_modified(|reports| {
            let mut modified = false;
            for reference in routes {
                let report = self.routes.report(&reference, &self.services);
                if reports.get(&reference) != report.as_ref() {
                    modified = true;
                    match report {
                        Some(report) => reports.insert(reference, report),
                        None => reports.remove(&reference),
                    };
                }
            }
            modified
        });
    }

    /// Forgets an object; returns the Services it affected.
    fn remove(&mut self, reference: &ObjectRef) -> BTreeSet<ObjectKey> {
        let key = &reference.key;
        match reference.kind {
            Kind::Service => self
                .services
                .remove(key)
                .then(|| key.clone())
                .into_iter()
                .collect(),
            Kind::EndpointSlice => {
                let touched = self.slices.remove(key);
                touched
                    .map(|touched| self.forget(touched))
                    .into_iter()
                    .collect()
            }
            Kind::Pod => {
                let selecting = self.services_selecting(key);
                if self.pods.remove(key) {
                    self.pod_changed(key).into_iter().chain(selecting).collect()
                } else {
                    BTreeSet::new()
                }
            }
            Kind::DestinationPolicy => self.policies.remove(key).into_iter().collect(),
            Kind::AuthorizationPolicy => self.authorizations.remove(key),
            Kind::HttpRoute | Kind::GrpcRoute => self.routes.remove(reference),
        }
    }

    /// Records an object; returns the Services it affects.
    fn insert(&mut self, key: ObjectKey, object: Object) -> BTreeSet<ObjectKey> {
        match object {
            Object::Service(service) => {
                self.services.insert(key.clone(), &service);
                BTreeSet::from([key])
            }
            Object::EndpointSlice(slice) => {
                let touched = self.slices.insert(key, &slice);
                touched
                    .map(|touched| self.forget(touched))
                    .into_iter()
                    .collect()
            }
            Object::Pod(pod) => {
                let mut services = self.pod_changed(&key);
                self.pods.insert(key.clone(), *pod);
                services.extend(self.services_selecting(&key));
                services
            }
            Object::DestinationPolicy(policy) => self
                .policies
                .insert(key, &policy, &self.metrics)
                .into_iter()
                .collect(),
            Object::AuthorizationPolicy(policy) => {
                self.authorizations.insert(key, &policy, &self.metrics)
            }
            route @ (Object::HttpRoute(_) | Object::GrpcRoute(_)) => {
                let reference = ObjectRef {
                    kind: route.kind(),
                    key,
                };
                self.routes.insert(reference, &route)
            }
        }
    }

    /// Drops the groups a slice change touched; returns their Service.
    fn forget(&mut self, touched: Touched) -> ObjectKey {
        self.groups.forget(&touched.service, &touched.slices);
        touched.service
    }

    /// Drops the groups of the slices with an endpoint on `pod`, whose labels or identity
    /// change; returns their Services.
    fn pod_changed(&mut self, pod: &ObjectKey) -> BTreeSet<ObjectKey> {
        let mut services = BTreeSet::new();
        for (slice, service) in self.slices.on_pod(pod) {
            self.groups.forget(service, [slice]);
            services.insert(service.clone());
        }
        services
    }

    /// Publishes what changed for a Service, and withdraws the keys it no longer has.
    fn recompute(&mut self, service: &ObjectKey, changed_at: Instant) {
        let destinations = self.destinations(service, changed_at);
        let published = self.published.entry(service.clone()).or_default();
        published.retain(|key, _| {
            let kept = destinations.contains_key(key);
            if !kept {
                self.snapshots.remove(key);
            }
            kept
        });
        for (key, snapshot) in destinations {
            let Snapshot::Known { version, .. } = &*snapshot else {
                unreachable!("Snapshot::known is known")
            };
            if published.get(&key) == Some(version) {
                continue;
            }
            published.insert(key.clone(), version.clone());
            self.snapshots.publish(&key, snapshot);
        }
        if published.is_empty() {
            self.published.remove(service);
        }
    }

    /// Every key of a Service with its snapshot (one per port, whichever key names it), endpoints
    /// grouped by EndpointSlice so that a pod coming or going changes one group; none when the
    /// Service is unknown.
    fn destinations(
        &mut self,
        service: &ObjectKey,
        changed_at: Instant,
    ) -> BTreeMap<String, Arc<Snapshot>> {
        let Some(state) = self.services.get(service) else {
            self.groups.remove(service);
            return BTreeMap::new();
        };
        let policy = self.policies.in_force(service);
        let groups = self.groups.of_service(&Inputs {
            service,
            state,
            slices: &self.slices,
            pods: &self.pods,
            policy: policy.map(|(.., translated)| translated),
            trust_domain: &self.trust_domain,
        });
        let mut destinations = BTreeMap::new();
        for (port, groups) in state.ports.iter().zip(groups) {
            let destination = proto::Destination {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                port: port.port.into(),
                policy: policy.map(|(key, ..)| key.to_string()).unwrap_or_default(),
                policy_generation: policy.map(|(_, state, _)| state.generation).unwrap_or(0),
                policy_spec: policy.map(|(.., translated)| translated.policy.clone()),
                routes: policy
                    .map(|(.., translated)| translated.routes.clone())
                    .unwrap_or_default(),
                subsets: policy
                    .map(|(.., translated)| {
                        translated
                            .subsets
                            .iter()
                            .map(|(name, _)| name.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
                // Named by `Snapshot::known`, from the groups.
                endpoint_groups: Vec::new(),
                inbound: None,
                http_routes: self.routes.tables(service, port.port, &self.services),
            };
            let by_name = DestinationKey::Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port: port.port,
            };
            let by_address = state
                .cluster_ips
                .iter()
                .map(|&ip| DestinationKey::Address(SocketAddr::new(ip, port.port)));
            let snapshot = Arc::new(Snapshot::of_groups(destination, groups, changed_at));
            for key in std::iter::once(by_name).chain(by_address) {
                destinations.insert(key.to_string(), snapshot.clone());
            }
        }
        destinations
    }
}

/// Removes `key` from the set of `owner`, and the set once empty.
fn remove_from<T: Ord>(index: &mut HashMap<ObjectKey, BTreeSet<T>>, owner: &ObjectKey, key: &T) {
    if let Some(keys) = index.get_mut(owner) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(owner);
        }
    }
}

//! Gateway API routes (HTTPRoute, GRPCRoute): each translated once when it changes, the routes
//! attached to each Service, and the routes sending to each Service (whose parents change when
//! that Service's ports do), and what status needs of each route.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_api::gateway::{ParentReference, RouteStatus};
use outrigger_api::proto;

use super::remove_from;
use super::report::Problem;
use super::service::Services;
use crate::source::{Object, ObjectKey, ObjectRef};
use crate::translate::{Route, RouteOrder, table};

pub(super) struct RouteState {
    uid: Option<String>,
    generation: i64,
    created: Option<Time>,
    route: Route,
    /// The status the object carried when the index last read its spec.
    status: Option<RouteStatus>,
}

/// What the index knows of one route, for its status: per Service parentRef, the conditions.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteReport {
    pub uid: Option<String>,
    pub generation: i64,
    pub parents: Vec<ParentReport>,
    pub status: Option<RouteStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParentReport {
    pub parent: ParentReference,
    /// Err: the parent is not a Service port the route can attach to.
    pub accepted: Result<(), Problem>,
    /// Err: a backend cannot be used (its share of requests is answered 500).
    pub resolved_refs: Result<(), Problem>,
    /// Rules that cannot be served as written.
    pub partially_invalid: Option<String>,
    /// Fields this version does not know and ignores.
    pub ignored: Vec<String>,
}

/// A route serving calls to a Service, for the status of the Service's DestinationPolicy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoutedBy {
    /// `HTTPRoute/namespace/name`.
    pub route: String,
    /// The namespace whose calls it serves, for a consumer route; None: every caller's.
    pub callers: Option<String>,
    /// The Service's ports it serves.
    pub ports: Vec<u16>,
}

/// Every route the index knows, by kind and namespaced name.
pub type RouteReports = BTreeMap<ObjectRef, RouteReport>;

#[derive(Default)]
pub(super) struct Routes {
    routes: HashMap<ObjectRef, RouteState>,
    by_parent: HashMap<ObjectKey, BTreeSet<ObjectRef>>,
    by_backend: HashMap<ObjectKey, BTreeSet<ObjectRef>>,
}

impl Routes {
    /// Records a route, translated; returns the Services whose destinations it changes.
    pub(super) fn insert(&mut self, reference: ObjectRef, object: &Object) -> BTreeSet<ObjectKey> {
        let route = match object {
            Object::HttpRoute(route) => Route::of_http(route),
            Object::GrpcRoute(route) => Route::of_grpc(route),
            _ => unreachable!("only routes are recorded here"),
        };
        let status = match object {
            Object::HttpRoute(route) => route.status.clone(),
            Object::GrpcRoute(route) => route.status.clone(),
            _ => None,
        };
        let metadata = object.metadata();
        let state = RouteState {
            uid: metadata.uid.clone(),
            generation: metadata.generation.unwrap_or(0),
            created: metadata.creation_timestamp.clone(),
            route,
            status,
        };
        let parents = parents(&state.route);
        for parent in &parents {
            self.by_parent
                .entry(parent.clone())
                .or_default()
                .insert(reference.clone());
        }
        for (namespace, name) in state.route.backend_services() {
            self.by_backend
                .entry(ObjectKey::new(namespace, name))
                .or_default()
                .insert(reference.clone());
        }
        self.routes.insert(reference, state);
        parents
    }

    /// Forgets a route; returns the Services whose destinations it changed.
    pub(super) fn remove(&mut self, reference: &ObjectRef) -> BTreeSet<ObjectKey> {
        let Some(state) = self.routes.remove(reference) else {
            return BTreeSet::new();
        };
        let parents = parents(&state.route);
        for parent in &parents {
            remove_from(&mut self.by_parent, parent, reference);
        }
        for (namespace, name) in state.route.backend_services() {
            remove_from(
                &mut self.by_backend,
                &ObjectKey::new(namespace, name),
                reference,
            );
        }
        parents
    }

    /// The parents of the routes that send to `service`, which change when its ports do.
    pub(super) fn parents_of_backend(&self, service: &ObjectKey) -> BTreeSet<ObjectKey> {
        self.by_backend
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|reference| self.routes.get(reference))
            .flat_map(|state| parents(&state.route))
            .collect()
    }

    /// The routes attached to `service` and those sending to it.
    pub(super) fn of_service(&self, service: &ObjectKey) -> BTreeSet<ObjectRef> {
        [&self.by_parent, &self.by_backend]
            .into_iter()
            .filter_map(|index| index.get(service))
            .flatten()
            .cloned()
            .collect()
    }

    /// The route tables of one Service port: the producer routes', then one per consumer
    /// namespace.
    pub(super) fn tables(
        &self,
        service: &ObjectKey,
        port: u16,
        services: &Services,
    ) -> Vec<proto::HttpRouteTable> {
        let mut by_callers: BTreeMap<&str, Vec<(&Route, RouteOrder<'_>)>> = BTreeMap::new();
        for reference in self.by_parent.get(service).into_iter().flatten() {
            let Some(state) = self.routes.get(reference) else {
                continue;
            };
            let route = &state.route;
            if let Some(callers) = route.attaches(&service.namespace, &service.name, port) {
                by_callers.entry(callers).or_default().push((
                    route,
                    (
                        &state.created,
                        route.namespace.as_str(),
                        route.name.as_str(),
                    ),
                ));
            }
        }
        let has_port = has_port(services);
        by_callers
            .into_iter()
            .map(|(callers, attached)| table(callers, &attached, &has_port))
            .collect()
    }

    /// The routes attached to `service` on one of its ports, in name order.
    pub(super) fn serving(&self, service: &ObjectKey, services: &Services) -> Vec<RoutedBy> {
        let Some(ports) = services.get(service).map(|state| &state.ports) else {
            return Vec::new();
        };
        let mut serving: Vec<RoutedBy> = self
            .by_parent
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|reference| {
                let route = &self.routes.get(reference)?.route;
                let attached: Vec<(u16, &str)> = ports
                    .iter()
                    .filter_map(|port| {
                        let callers =
                            route.attaches(&service.namespace, &service.name, port.port)?;
                        Some((port.port, callers))
                    })
                    .collect();
                let &(_, callers) = attached.first()?;
                Some(RoutedBy {
                    route: route.label(),
                    callers: (!callers.is_empty()).then(|| callers.to_string()),
                    ports: attached.iter().map(|&(port, _)| port).collect(),
                })
            })
            .collect();
        serving.sort();
        serving
    }

    /// What status needs of the route, now; none when the index does not hold it.
    pub(super) fn report(&self, reference: &ObjectRef, services: &Services) -> Option<RouteReport> {
        let state = self.routes.get(reference)?;
        let route = &state.route;
        let resolution = route.resolve(&has_port(services));
        let resolved_refs = match resolution.unresolved.first() {
            None => Ok(()),
            Some(first) => Err(Problem::new(
                first.reason,
                resolution
                    .unresolved
                    .iter()
                    .map(|u| u.message.as_str())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        };
        let partially_invalid = (!route.invalid.is_empty())
            .then(|| format!("these rules answer 500: {}", route.invalid.join("; ")));
        let parents = route
            .parents
            .iter()
            .map(|parent| ParentReport {
                accepted: accepted(route, parent, services),
                resolved_refs: resolved_refs.clone(),
                partially_invalid: partially_invalid.clone(),
                ignored: route.ignored.clone(),
                parent: parent.clone(),
            })
            .collect();
        Some(RouteReport {
            uid: state.uid.clone(),
            generation: state.generation,
            parents,
            status: state.status.clone(),
        })
    }
}

/// Whether the route attaches to a parent: a Service that exists, with the port named if any.
fn accepted(route: &Route, parent: &ParentReference, services: &Services) -> Result<(), Problem> {
    let namespace = parent.namespace.as_deref().unwrap_or(&route.namespace);
    let Some(service) = services.get(&ObjectKey::new(namespace, &parent.name)) else {
        return Err(Problem::new(
            "NoMatchingParent",
            format!("no Service {namespace}/{}", parent.name),
        ));
    };
    match parent.port {
        Some(port) if !service.ports.iter().any(|p| i32::from(p.port) == port) => {
            Err(Problem::new(
                "NoMatchingParent",
                format!("Service {namespace}/{} has no port {port}", parent.name),
            ))
        }
        _ => Ok(()),
    }
}

/// Whether a Service has a port; None when there is no such Service.
fn has_port(services: &Services) -> impl Fn(&str, &str, u16) -> Option<bool> + '_ {
    move |namespace, name, port| {
        services
            .get(&ObjectKey::new(namespace, name))
            .map(|service| service.ports.iter().any(|p| p.port == port))
    }
}

fn parents(route: &Route) -> BTreeSet<ObjectKey> {
    route
        .parents
        .iter()
        .map(|parent| {
            ObjectKey::new(
                parent.namespace.as_deref().unwrap_or(&route.namespace),
                &parent.name,
            )
        })
        .collect()
}

//! Gateway API routes in the outbound stack: the table picks a rule by the first match that holds,
//! the rule's filters change the request (or answer it: a redirect), and a backend chosen by
//! weight for each request serves it through that backend Service port's own destination, whose
//! DestinationPolicy applies in full.

mod filters;
mod matching;

use std::sync::Arc;

use http::{Request, StatusCode};
use rand::Rng as _;

use crate::ctx::Labels;
use crate::http::body::{Body, proxy_error};
use crate::metrics::RequestLabels;
use crate::outbound::resolve::{Backends, Resolution};
use crate::outbound::stack::{Built, Leaf, ResponseFuture, Stack};
use crate::policy::{HttpFilter, HttpRouteMatch, HttpRouteRule, RouteBackend};

/// One rule as built: its filters, and the stack below them (timeouts, retries, the backends).
pub struct RuleStack {
    pub rule: HttpRouteRule,
    pub labels: RequestLabels,
    pub built: Built,
}

/// The bottom of a frontend's stack when routes serve its callers.
#[derive(Clone)]
pub struct HttpRoutes {
    inner: Arc<Table>,
}

struct Table {
    matches: Vec<HttpRouteMatch>,
    rules: Vec<RuleStack>,
    /// For the 404 of a request no rule matches.
    labels: RequestLabels,
    /// The Service port requests were sent to: a redirect without a port of its own keeps it.
    port: u16,
}

impl HttpRoutes {
    pub fn new(
        matches: Vec<HttpRouteMatch>,
        rules: Vec<RuleStack>,
        labels: RequestLabels,
        port: u16,
    ) -> Self {
        Self {
            inner: Arc::new(Table {
                matches,
                rules,
                labels,
                port,
            }),
        }
    }

    /// Each rule's route, name and parts, top-down.
    pub fn describe(&self) -> impl Iterator<Item = (String, &[&'static str])> {
        self.inner.rules.iter().map(|rule| {
            let name = match &rule.rule.name {
                Some(name) => format!("{} rule {name:?}", rule.rule.route),
                None => rule.rule.route.clone(),
            };
            (name, rule.built.names.as_slice())
        })
    }
}

impl Leaf for HttpRoutes {
    fn name(&self) -> &'static str {
        "http routes"
    }

    fn call(&self, mut request: Request<Body>) -> ResponseFuture {
        let table = &self.inner;
        let Some(matched) = table.matches.iter().find(|m| m.matches(&request)) else {
            let mut response = proxy_error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no route of {}.{}:{} matches",
                    table.labels.dst_service, table.labels.dst_namespace, table.port
                ),
            );
            response
                .extensions_mut()
                .insert(Labels(table.labels.clone()));
            return Box::pin(async move { Ok(response) });
        };
        let index = matched.rule;
        let rule = &table.rules[index];
        let prefix = matched.matched_prefix();
        for (i, filter) in rule.rule.filters.iter().enumerate() {
            match filter {
                HttpFilter::RequestHeaders(modifier) => modifier.apply(request.headers_mut()),
                HttpFilter::ResponseHeaders(_) => {}
                HttpFilter::Rewrite(rewrite) => filters::rewrite(rewrite, &mut request, prefix),
                HttpFilter::Redirect(redirect) => {
                    let mut response = filters::redirect(redirect, &request, prefix, table.port);
                    modify_response(&rule.rule.filters[..i], &mut response);
                    response
                        .extensions_mut()
                        .insert(Labels(rule.labels.clone()));
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let response = tower::Service::call(&mut rule.built.stack.clone(), request);
        // The rule's response filters are read from the table the request started on.
        let table = self.inner.clone();
        Box::pin(async move {
            let rule = &table.rules[index];
            let mut response = response.await?;
            modify_response(&rule.rule.filters, &mut response);
            // The backend's destination labelled it with the backend Service; the route is ours.
            match response.extensions_mut().get_mut::<Labels>() {
                Some(Labels(backend)) => backend.route = rule.labels.route.clone(),
                None => {
                    response
                        .extensions_mut()
                        .insert(Labels(rule.labels.clone()));
                }
            }
            Ok(response)
        })
    }
}

/// Applies the response header modifiers among `filters`, in order.
fn modify_response(filters: &[HttpFilter], response: &mut http::Response<Body>) {
    for filter in filters {
        if let HttpFilter::ResponseHeaders(modifier) = filter {
            modifier.apply(response.headers_mut());
        }
    }
}

/// A rule's backends: one chosen by weight for each request (each try, under retries).
#[derive(Clone)]
pub struct WeightedBackends {
    backends: Arc<[RouteBackend]>,
    total: u32,
    resolver: Backends,
}

impl WeightedBackends {
    pub fn new(backends: Vec<RouteBackend>, resolver: Backends) -> Self {
        for backend in &backends {
            if let Ok(key) = &backend.target
                && backend.weight > 0
            {
                resolver.prefetch(key);
            }
        }
        Self {
            total: backends.iter().map(|b| b.weight).sum(),
            backends: backends.into(),
            resolver,
        }
    }

    /// The index of a backend, chosen by weight.
    fn pick(&self) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut point = rand::rng().random_range(0..self.total);
        self.backends.iter().position(|backend| {
            if point < backend.weight {
                return true;
            }
            point -= backend.weight;
            false
        })
    }
}

impl Leaf for WeightedBackends {
    fn name(&self) -> &'static str {
        "backends"
    }

    fn call(&self, mut request: Request<Body>) -> ResponseFuture {
        let Some(index) = self.pick() else {
            let response = proxy_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the route's rule has no backend to send to",
            );
            return Box::pin(async move { Ok(response) });
        };
        let backend = &self.backends[index];
        if let Err(why) = &backend.target {
            let response = proxy_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the route's backend cannot be used: {why}"),
            );
            return Box::pin(async move { Ok(response) });
        }
        for filter in &backend.filters {
            match filter {
                HttpFilter::RequestHeaders(modifier) => modifier.apply(request.headers_mut()),
                HttpFilter::ResponseHeaders(_) => {}
                HttpFilter::Redirect(_) | HttpFilter::Rewrite(_) => {
                    unreachable!("decoding refuses a backend's redirect or rewrite")
                }
            }
        }
        let (backends, resolver) = (self.backends.clone(), self.resolver.clone());
        Box::pin(async move {
            let backend = &backends[index];
            let key = backend.target.as_deref().expect("checked above");
            let destination = match resolver.resolve(key).await {
                Resolution::Ready(destination) => destination,
                Resolution::Unknown(reason) => {
                    return Ok(proxy_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("the route's backend {key} is unknown: {reason}"),
                    ));
                }
                Resolution::Pending => {
                    return Ok(proxy_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("no configuration for the route's backend {key} yet"),
                    ));
                }
            };
            let mut service: Stack = destination.backend_service();
            let mut response = tower::Service::call(&mut service, request).await?;
            modify_response(&backend.filters, &mut response);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Request;

    use super::*;
    use crate::http::body::full;
    use crate::metrics::Direction;
    use crate::outbound::stack::Layers;
    use crate::policy::{HeaderModifier, HttpPathMatch, Redirect};

    fn labels(route: &str) -> RequestLabels {
        RequestLabels {
            direction: Direction::Outbound,
            dst_namespace: Arc::new("shop".into()),
            dst_service: Arc::new("echo".into()),
            dst_subset: Arc::default(),
            route: Arc::new(route.into()),
        }
    }

    fn rule(filters: Vec<HttpFilter>, backends: Vec<RouteBackend>) -> RuleStack {
        let rule = HttpRouteRule {
            route: "HTTPRoute/shop/echo".into(),
            name: None,
            filters,
            backends: backends.clone(),
            request_timeout: None,
            backend_request_timeout: None,
            retries: None,
        };
        RuleStack {
            built: Layers::new().over(WeightedBackends::new(backends, Backends::none())),
            labels: labels(&rule.route),
            rule,
        }
    }

    fn prefix(path: &str, rule: usize) -> HttpRouteMatch {
        HttpRouteMatch {
            rule,
            path: Some(HttpPathMatch::Prefix(path.into())),
            ..Default::default()
        }
    }

    async fn call(routes: &HttpRoutes, path: &str) -> http::Response<Body> {
        let request = Request::builder()
            .uri(path)
            .header("host", "echo")
            .body(full(""))
            .unwrap();
        routes.call(request).await.unwrap()
    }

    fn reason(response: &http::Response<Body>) -> &str {
        response
            .headers()
            .get(crate::http::body::PROXY_ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn route_label(response: &http::Response<Body>) -> String {
        let Labels(labels) = response.extensions().get::<Labels>().expect("labelled");
        labels.route.to_string()
    }

    #[tokio::test]
    async fn the_proxy_answers_what_no_backend_serves() {
        let unresolved = RouteBackend {
            target: Err("no Service shop/echo-v3".into()),
            weight: 1,
            filters: Vec::new(),
        };
        let redirect = HttpFilter::Redirect(Redirect {
            scheme: None,
            hostname: Some("example.org".into()),
            port: None,
            path: None,
            status: http::StatusCode::MOVED_PERMANENTLY,
        });
        let set_header = HttpFilter::ResponseHeaders(HeaderModifier {
            set: vec![("x-header-set".parse().unwrap(), "set".parse().unwrap())],
            ..Default::default()
        });
        let routes = HttpRoutes::new(
            vec![
                prefix("/redirect", 0),
                prefix("/gone", 1),
                prefix("/none", 2),
            ],
            vec![
                rule(vec![set_header, redirect], Vec::new()),
                rule(Vec::new(), vec![unresolved]),
                rule(Vec::new(), Vec::new()),
            ],
            labels(""),
            80,
        );

        let redirected = call(&routes, "/redirect/x").await;
        assert_eq!(redirected.status(), 301);
        assert_eq!(
            redirected.headers()["location"],
            "http://example.org/redirect/x"
        );
        assert_eq!(redirected.headers()["x-header-set"], "set");
        assert_eq!(route_label(&redirected), "HTTPRoute/shop/echo");

        let gone = call(&routes, "/gone").await;
        assert_eq!(gone.status(), 500);
        assert!(
            reason(&gone).contains("no Service shop/echo-v3"),
            "{gone:?}"
        );

        let none = call(&routes, "/none").await;
        assert_eq!(none.status(), 500);
        assert!(reason(&none).contains("no backend"), "{none:?}");

        let unmatched = call(&routes, "/elsewhere").await;
        assert_eq!(unmatched.status(), 404);
        assert_eq!(reason(&unmatched), "no route of echo.shop:80 matches");
        assert_eq!(route_label(&unmatched), "");
    }

    #[test]
    fn a_backend_of_weight_zero_is_never_chosen() {
        let backend = |key: &str, weight| RouteBackend {
            target: Ok(key.into()),
            weight,
            filters: Vec::new(),
        };
        let backends = WeightedBackends::new(
            vec![
                backend("never", 0),
                backend("always", 3),
                backend("also-never", 0),
            ],
            Backends::none(),
        );
        for _ in 0..100 {
            let picked = &backends.backends[backends.pick().expect("a backend")];
            assert_eq!(picked.target.as_deref(), Ok("always"));
        }
        assert!(
            WeightedBackends::new(vec![backend("x", 0)], Backends::none())
                .pick()
                .is_none()
        );
    }
}

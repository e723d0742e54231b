//! Authorization of calls to the app: each HTTP request (a layer that answers 403 naming the
//! policy) and each connection forwarded as it is (closed), weighed against the policies the
//! controller sent for the port they were addressed to (`policy::judge`), counted in
//! `outrigger_authz_decisions_total` and logged.
//!
//! Until the controller has sent anything, and on a port no policy names, every call is allowed,
//! as without policies. The kubelet's probes (`--inbound-probes`) are never refused: it is not
//! meshed, and a pod whose probes fail would never be ready.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use tokio::sync::watch;

use crate::ctx::ClientId;
use crate::http::body::{Body, proxy_error};
use crate::metrics::{AuthzDecision, Metrics, Name};
use crate::policy::{Call, InboundAuthorization, judge};

/// The authorization in force on the inbound side; cloned per connection.
#[derive(Clone)]
pub struct Authorizer {
    applied: watch::Receiver<Arc<InboundAuthorization>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("applied", &self.applied.borrow().version)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(applied: watch::Receiver<Arc<InboundAuthorization>>, metrics: Metrics) -> Self {
        Self { applied, metrics }
    }

    /// Whether a call to `port` may go on; Err names the policy that denies it.
    pub fn check(&self, port: u16, call: Call<'_>) -> Result<(), Name> {
        let applied = self.applied.borrow().clone();
        let Some(policies) = applied.policies(port) else {
            return Ok(());
        };
        let verdict = judge(policies, call);
        if let Some(policy) = &verdict.audit_denied {
            self.metrics.authz_decided(policy, AuthzDecision::AuditDeny);
            tracing::info!(%policy, port, caller = call.caller.unwrap_or("-"), request = ?call.request,
                "AuthorizationPolicy (Audit) would deny this call");
        }
        match verdict.enforced {
            None => Ok(()),
            Some((policy, true)) => {
                self.metrics.authz_decided(&policy, AuthzDecision::Allow);
                Ok(())
            }
            Some((policy, false)) => {
                self.metrics.authz_decided(&policy, AuthzDecision::Deny);
                tracing::debug!(%policy, port, caller = call.caller.unwrap_or("-"), request = ?call.request,
                    "denied by AuthorizationPolicy");
                Err(policy)
            }
        }
    }

    /// Whether a connection that is not HTTP, from `caller`, may be forwarded to `port`.
    pub fn allows_connection(&self, port: u16, caller: Option<&ClientId>) -> bool {
        let call = Call {
            caller: caller.map(|client| client.0.as_str()),
            request: None,
        };
        self.check(port, call).is_ok()
    }
}

/// Answers 403 to the requests the policies of `port` deny, and passes on the rest.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Authorizer,
    port: u16,
    /// The probe paths of `port`: `GET` of one of them in plaintext is the kubelet's.
    probes: Option<Arc<[String]>>,
}

impl<S> Authorize<S> {
    pub fn new(inner: S, authorizer: Authorizer, port: u16, probes: Option<Arc<[String]>>) -> Self {
        Self {
            inner,
            authorizer,
            port,
            probes,
        }
    }

    fn is_probe(&self, request: &Request<Body>, caller: Option<&ClientId>) -> bool {
        caller.is_none()
            && self
                .probes
                .as_ref()
                .is_some_and(|paths| crate::listen::is_probe(request, paths))
    }
}

impl<S> tower::Service<Request<Body>> for Authorize<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, std::future::Ready<Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let caller = request.extensions().get::<ClientId>();
        if !self.is_probe(&request, caller) {
            let call = Call {
                caller: caller.map(|client| client.0.as_str()),
                request: Some((request.method(), request.uri().path())),
            };
            if let Err(policy) = self.authorizer.check(self.port, call) {
                let reason = format!("denied by AuthorizationPolicy {policy}");
                return Either::Right(std::future::ready(Ok(proxy_error(
                    StatusCode::FORBIDDEN,
                    &reason,
                ))));
            }
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use tower::{Service as _, ServiceExt as _};

    use super::*;
    use crate::http::body::full;
    use crate::metrics::AuthzLabels;
    use crate::policy::{Action, AuthorizationPolicy, AuthorizationRule, CallMatch, CallerMatch};

    const PORT: u16 = 9080;

    /// Port 9080 lets only shop/productpage make GET requests.
    fn authorizer() -> (Authorizer, Metrics) {
        let rule = AuthorizationRule {
            sources: vec![CallerMatch {
                service_accounts: vec!["shop/productpage".into()],
                namespaces: Vec::new(),
            }],
            targets: vec![CallMatch {
                paths: Vec::new(),
                methods: vec![http::Method::GET],
            }],
        };
        let policy = AuthorizationPolicy {
            name: Arc::new("shop/readers".into()),
            action: Action::Allow,
            audit: false,
            rules: vec![rule],
        };
        let applied = InboundAuthorization {
            version: "1".into(),
            ports: [(PORT, vec![policy])].into(),
        };
        let metrics = Metrics::new();
        let (_, applied) = watch::channel(Arc::new(applied));
        (Authorizer::new(applied, metrics.clone()), metrics)
    }

    fn count(metrics: &Metrics, decision: AuthzDecision) -> u64 {
        metrics
            .authz_decisions
            .get_or_create(&AuthzLabels {
                policy: Arc::new("shop/readers".into()),
                decision,
            })
            .get()
    }

    fn app() -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(|_| std::future::ready(Ok::<_, Infallible>(Response::new(full("app")))))
    }

    async fn status(
        service: &mut Authorize<
            impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
        >,
        request: Request<Body>,
    ) -> StatusCode {
        service
            .ready()
            .await
            .unwrap()
            .call(request)
            .await
            .unwrap()
            .status()
    }

    fn get(path: &str, caller: Option<&str>) -> Request<Body> {
        let mut request = Request::get(path).body(full("")).unwrap();
        if let Some(caller) = caller {
            request
                .extensions_mut()
                .insert(ClientId(Arc::new(caller.into())));
        }
        request
    }

    #[tokio::test]
    async fn requests_are_denied_with_403_but_the_kubelets_probes() {
        let (authorizer, metrics) = authorizer();
        let probes: Arc<[String]> = vec!["/ready".to_string()].into();
        let mut service = Authorize::new(app(), authorizer, PORT, Some(probes));
        assert_eq!(
            status(&mut service, get("/", Some("shop/productpage"))).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&mut service, get("/", Some("shop/ratings"))).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&mut service, get("/", None)).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            (
                count(&metrics, AuthzDecision::Allow),
                count(&metrics, AuthzDecision::Deny)
            ),
            (1, 2)
        );
        // The kubelet: plaintext GET of exactly a probe path.
        assert_eq!(
            status(&mut service, get("/ready", None)).await,
            StatusCode::OK
        );
        assert_eq!(
            status(&mut service, get("/ready?x", None)).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&mut service, get("/ready", Some("shop/ratings"))).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            count(&metrics, AuthzDecision::Deny),
            4,
            "probes are not counted"
        );
    }

    #[test]
    fn connections_that_are_not_http_match_no_rule_with_methods_and_ports_without_policies_allow_all()
     {
        let (authorizer, _) = authorizer();
        let productpage = ClientId(Arc::new("shop/productpage".into()));
        assert!(!authorizer.allows_connection(PORT, Some(&productpage)));
        assert!(authorizer.allows_connection(PORT + 1, None));
    }
}

//! A pod's inbound authorization as the proxy applies it: per port of the pod, the
//! AuthorizationPolicies in force there, and the one rule that says which calls they let through.
//!
//! On a port: a call is denied when an enforced DENY policy matches it, or when enforced ALLOW
//! policies apply and none matches it; otherwise it is allowed. Audit policies are weighed the
//! same way, apart, and only counted. A port without policies allows everything, at the cost of
//! one map lookup.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::metrics::Name;

/// What this pod's proxy enforces on calls to it, at one version.
#[derive(Debug, Default)]
pub struct InboundAuthorization {
    /// Empty while the controller has none for this pod.
    pub version: String,
    pub ports: HashMap<u16, Vec<AuthorizationPolicy>>,
}

impl InboundAuthorization {
    /// What `/config` shows: the version, and per port (in order) its policies and their rules.
    pub fn describe(&self) -> Value {
        let ports: BTreeMap<String, Value> = self
            .ports
            .iter()
            .map(|(port, policies)| {
                let policies: Vec<Value> =
                    policies.iter().map(AuthorizationPolicy::describe).collect();
                (port.to_string(), Value::Array(policies))
            })
            .collect();
        json!({"version": self.version, "ports": ports})
    }
}

#[derive(Debug)]
pub struct AuthorizationPolicy {
    /// `namespace/name`.
    pub name: Name,
    pub action: Action,
    pub audit: bool,
    pub rules: Vec<AuthorizationRule>,
}

impl AuthorizationPolicy {
    fn describe(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|rule| {
                let from: Vec<Value> = rule
                    .sources
                    .iter()
                    .map(|source| {
                        json!({
                            "serviceAccounts": source.service_accounts,
                            "namespaces": source.namespaces,
                        })
                    })
                    .collect();
                let to: Vec<Value> = rule
                    .targets
                    .iter()
                    .map(|target| {
                        let paths: Vec<Value> = target
                            .paths
                            .iter()
                            .map(|path| match path {
                                PathMatch::Exact(path) => json!({"exact": path}),
                                PathMatch::Prefix(path) => json!({"prefix": path}),
                            })
                            .collect();
                        let methods: Vec<&str> =
                            target.methods.iter().map(http::Method::as_str).collect();
                        json!({"paths": paths, "methods": methods})
                    })
                    .collect();
                json!({"from": from, "to": to})
            })
            .collect();
        json!({
            "policy": &*self.name,
            "action": match self.action {
                Action::Allow => "ALLOW",
                Action::Deny => "DENY",
            },
            "mode": if self.audit { "Audit" } else { "Enforce" },
            "rules": rules,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Matches a call when a source matches its caller (or there are none) and a target matches
/// the call (or there are none).
#[derive(Debug)]
pub struct AuthorizationRule {
    pub sources: Vec<CallerMatch>,
    pub targets: Vec<CallMatch>,
}

#[derive(Debug)]
pub struct CallerMatch {
    /// `namespace/name`.
    pub service_accounts: Vec<String>,
    pub namespaces: Vec<String>,
}

#[derive(Debug)]
pub struct CallMatch {
    pub paths: Vec<PathMatch>,
    pub methods: Vec<http::Method>,
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments, without a trailing `/`.
    Prefix(String),
}

/// A call to the app, as far as authorization looks at it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// `namespace/service account` of a caller over mutual TLS; None in plaintext.
    pub caller: Option<&'a str>,
    /// None for a connection that is not HTTP.
    pub request: Option<(&'a http::Method, &'a str)>,
}

/// What the policies of a port make of a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The enforced outcome and the policy that decided it: the matching ALLOW policy, the
    /// matching DENY policy, or the first ALLOW policy when none matched; None when no enforced
    /// policy has a say (allowed).
    pub enforced: Option<(Name, bool)>,
    /// The audit policy that would have denied the call, decided as `enforced` is.
    pub audit_denied: Option<Name>,
}

impl InboundAuthorization {
    /// Whether `port` has policies at all: the common case, none, costs nothing more.
    pub fn policies(&self, port: u16) -> Option<&[AuthorizationPolicy]> {
        self.ports.get(&port).map(Vec::as_slice)
    }
}

/// Weighs a call against the policies of its port.
pub fn judge(policies: &[AuthorizationPolicy], call: Call<'_>) -> Verdict {
    let (audit, enforced): (Vec<_>, Vec<_>) = policies.iter().partition(|p| p.audit);
    Verdict {
        enforced: outcome(&enforced, call),
        audit_denied: match outcome(&audit, call) {
            Some((policy, false)) => Some(policy),
            _ => None,
        },
    }
}

/// Allowed or not, and by which policy; None when these policies have no say.
fn outcome(policies: &[&AuthorizationPolicy], call: Call<'_>) -> Option<(Name, bool)> {
    if let Some(deny) = policies
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(call))
    {
        return Some((deny.name.clone(), false));
    }
    let mut allows = policies.iter().filter(|p| p.action == Action::Allow);
    let first = allows.clone().next()?;
    match allows.find(|p| p.matches(call)) {
        Some(allow) => Some((allow.name.clone(), true)),
        None => Some((first.name.clone(), false)),
    }
}

impl AuthorizationPolicy {
    fn matches(&self, call: Call<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(call))
    }
}

impl AuthorizationRule {
    fn matches(&self, call: Call<'_>) -> bool {
        let caller = self.sources.is_empty()
            || call
                .caller
                .is_some_and(|caller| self.sources.iter().any(|s| s.matches(caller)));
        caller && (self.targets.is_empty() || self.targets.iter().any(|t| t.matches(call)))
    }
}

impl CallerMatch {
    fn matches(&self, caller: &str) -> bool {
        let namespace = caller
            .split_once('/')
            .map_or(caller, |(namespace, _)| namespace);
        self.service_accounts
            .iter()
            .any(|account| account == caller)
            || self.namespaces.iter().any(|n| n == namespace)
    }
}

impl CallMatch {
    fn matches(&self, call: Call<'_>) -> bool {
        let Some((method, path)) = call.request else {
            // What HTTP parts a target names, a connection that is not HTTP cannot match.
            return self.paths.is_empty() && self.methods.is_empty();
        };
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn policy(
        name: &str,
        action: Action,
        audit: bool,
        rules: Vec<AuthorizationRule>,
    ) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: Arc::new(name.into()),
            action,
            audit,
            rules,
        }
    }

    fn from_accounts(accounts: &[&str]) -> AuthorizationRule {
        AuthorizationRule {
            sources: vec![CallerMatch {
                service_accounts: accounts.iter().map(|a| a.to_string()).collect(),
                namespaces: Vec::new(),
            }],
            targets: Vec::new(),
        }
    }

    fn http<'a>(caller: Option<&'a str>, method: &'a http::Method, path: &'a str) -> Call<'a> {
        Call {
            caller,
            request: Some((method, path)),
        }
    }

    impl Verdict {
        fn allowed(&self) -> bool {
            self.enforced.as_ref().is_none_or(|(_, allowed)| *allowed)
        }
    }

    fn decided(verdict: &Verdict) -> Option<(&str, bool)> {
        verdict
            .enforced
            .as_ref()
            .map(|(name, allowed)| (name.as_str(), *allowed))
    }

    #[test]
    fn an_allow_policy_lets_through_only_what_a_rule_matches() {
        let policies = [policy(
            "shop/readers",
            Action::Allow,
            false,
            vec![from_accounts(&["shop/productpage"])],
        )];
        let get = http::Method::GET;
        let verdict = judge(&policies, http(Some("shop/productpage"), &get, "/"));
        assert_eq!(decided(&verdict), Some(("shop/readers", true)));
        let verdict = judge(&policies, http(Some("shop/other"), &get, "/"));
        assert_eq!(decided(&verdict), Some(("shop/readers", false)));
        // Plaintext: no identity, no source matches.
        assert!(!judge(&policies, http(None, &get, "/")).allowed());
    }

    #[test]
    fn deny_wins_over_allow_and_any_allow_policy_suffices() {
        let policies = [
            policy(
                "shop/a-readers",
                Action::Allow,
                false,
                vec![from_accounts(&["shop/reader"])],
            ),
            policy(
                "shop/b-everyone",
                Action::Allow,
                false,
                vec![from_accounts(&["shop/reader", "shop/writer"])],
            ),
            policy(
                "shop/c-no-writer",
                Action::Deny,
                false,
                vec![from_accounts(&["shop/writer"])],
            ),
        ];
        let get = http::Method::GET;
        assert_eq!(
            decided(&judge(&policies, http(Some("shop/reader"), &get, "/"))),
            Some(("shop/a-readers", true))
        );
        assert_eq!(
            decided(&judge(&policies, http(Some("shop/writer"), &get, "/"))),
            Some(("shop/c-no-writer", false))
        );
        // Only DENY policies, none matching: allowed, no policy has a say.
        let deny_only = [policy(
            "shop/no-writer",
            Action::Deny,
            false,
            vec![from_accounts(&["shop/writer"])],
        )];
        assert_eq!(
            judge(&deny_only, http(Some("shop/reader"), &get, "/")),
            Verdict::default()
        );
    }

    #[test]
    fn audit_policies_are_weighed_apart_and_never_deny() {
        let policies = [policy(
            "shop/audit",
            Action::Allow,
            true,
            vec![from_accounts(&["shop/reader"])],
        )];
        let get = http::Method::GET;
        let verdict = judge(&policies, http(Some("shop/other"), &get, "/"));
        assert!(verdict.allowed());
        assert_eq!(
            verdict.audit_denied.as_deref().map(String::as_str),
            Some("shop/audit")
        );
        assert_eq!(
            judge(&policies, http(Some("shop/reader"), &get, "/")).audit_denied,
            None
        );
    }

    #[test]
    fn targets_match_methods_and_whole_path_segments_and_no_http_part_on_opaque_connections() {
        let rule = AuthorizationRule {
            sources: vec![CallerMatch {
                service_accounts: Vec::new(),
                namespaces: vec!["frontend".into()],
            }],
            targets: vec![CallMatch {
                paths: vec![
                    PathMatch::Prefix("/api".into()),
                    PathMatch::Exact("/health".into()),
                ],
                methods: vec![http::Method::GET],
            }],
        };
        let policies = [policy("shop/api", Action::Allow, false, vec![rule])];
        let (get, post) = (http::Method::GET, http::Method::POST);
        let caller = Some("frontend/web");
        for (method, path, allowed) in [
            (&get, "/api", true),
            (&get, "/api/reviews?x=1", true),
            (&get, "/apix", false),
            (&get, "/health", true),
            (&get, "/health/x", false),
            (&post, "/api", false),
        ] {
            assert_eq!(
                judge(&policies, http(caller, method, path)).allowed(),
                allowed,
                "{method} {path}"
            );
        }
        let opaque = Call {
            caller,
            request: None,
        };
        assert!(!judge(&policies, opaque).allowed());
        let any_call = [policy(
            "shop/frontend",
            Action::Allow,
            false,
            vec![AuthorizationRule {
                sources: vec![CallerMatch {
                    service_accounts: Vec::new(),
                    namespaces: vec!["frontend".into()],
                }],
                targets: vec![CallMatch {
                    paths: Vec::new(),
                    methods: Vec::new(),
                }],
            }],
        )];
        assert!(judge(&any_call, opaque).allowed());
    }
}

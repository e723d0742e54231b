//! AuthorizationPolicy spec -> the protocol's authorization, checked on the way. A policy is
//! translated once; what each port of a targeted Service gets of it is cut from that
//! ([`Authorization::for_port`]), since rules name Service ports and proxies know pod ports.

use outrigger_api::authz::{self, AuthorizationPolicySpec, PathMatch, Rule};
use outrigger_api::destination::is_dns_label;
use outrigger_api::proto;
use outrigger_api::rules::invalid;

use super::PolicyError;

/// A policy ready to be cut for each port of the Services it targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorization {
    /// The Services of the policy's namespace it targets, once each.
    pub targets: Vec<String>,
    action: proto::AuthorizationAction,
    audit: bool,
    rules: Vec<PortedRule>,
}

/// A rule with the Service ports of each of its targets (none: every port).
#[derive(Clone, Debug, PartialEq)]
struct PortedRule {
    sources: Vec<proto::AuthorizationSource>,
    targets: Vec<(Vec<u16>, proto::AuthorizationTarget)>,
}

impl Authorization {
    /// What a proxy enforces on a pod port reached through the Service port `port`: the rules
    /// that cover that port, without ports.
    pub fn for_port(&self, policy: String, port: u16) -> proto::Authorization {
        let rules = self
            .rules
            .iter()
            .filter_map(|rule| {
                let targets: Vec<_> = rule
                    .targets
                    .iter()
                    .filter(|(ports, _)| ports.is_empty() || ports.contains(&port))
                    .map(|(_, target)| target.clone())
                    .collect();
                // A rule whose targets all name other ports matches nothing here (no targets
                // would read as "anything").
                if targets.is_empty() && !rule.targets.is_empty() {
                    return None;
                }
                Some(proto::AuthorizationRule {
                    sources: rule.sources.clone(),
                    targets,
                })
            })
            .collect();
        proto::Authorization {
            policy,
            action: self.action.into(),
            audit: self.audit,
            rules,
        }
    }
}

pub fn translate_authorization(
    spec: &AuthorizationPolicySpec,
) -> Result<Authorization, PolicyError> {
    translate_spec(spec).map_err(|error| error.within("spec"))
}

fn translate_spec(spec: &AuthorizationPolicySpec) -> Result<Authorization, PolicyError> {
    bounded("targetRefs", spec.target_refs.len(), authz::MAX_TARGETS)?;
    if spec.target_refs.is_empty() {
        return Err(invalid("targetRefs", "at least one target is required"));
    }
    let mut targets = Vec::new();
    for (i, target) in spec.target_refs.iter().enumerate() {
        if !is_dns_label(&target.name) {
            return Err(invalid(
                format!("targetRefs[{i}].name"),
                format!("`{}` is not a Service name", target.name),
            ));
        }
        if targets.contains(&target.name) {
            return Err(invalid(
                format!("targetRefs[{i}]"),
                format!("Service `{}` is listed twice", target.name),
            ));
        }
        targets.push(target.name.clone());
    }
    bounded("rules", spec.rules.len(), authz::MAX_RULES)?;
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| ported_rule(&format!("rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    Ok(Authorization {
        targets,
        action: match spec.action {
            authz::Action::Allow => proto::AuthorizationAction::Allow,
            authz::Action::Deny => proto::AuthorizationAction::Deny,
        },
        audit: spec.mode == authz::Mode::Audit,
        rules,
    })
}

fn ported_rule(field: &str, rule: &Rule) -> Result<PortedRule, PolicyError> {
    bounded(
        &format!("{field}.from"),
        rule.from.len(),
        authz::MAX_SOURCES,
    )?;
    bounded(
        &format!("{field}.to"),
        rule.to.len(),
        authz::MAX_TARGET_ENTRIES,
    )?;
    let sources = rule
        .from
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let field = format!("{field}.from[{i}]");
            if source.service_accounts.is_empty() && source.namespaces.is_empty() {
                return Err(invalid(
                    field,
                    "a source needs serviceAccounts or namespaces",
                ));
            }
            names(
                &format!("{field}.serviceAccounts"),
                &source.service_accounts,
                is_service_account,
            )?;
            names(
                &format!("{field}.namespaces"),
                &source.namespaces,
                is_dns_label,
            )?;
            Ok(proto::AuthorizationSource {
                service_accounts: source.service_accounts.clone(),
                namespaces: source.namespaces.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    let targets = rule
        .to
        .iter()
        .enumerate()
        .map(|(i, to)| {
            let field = format!("{field}.to[{i}]");
            bounded(&format!("{field}.ports"), to.ports.len(), authz::MAX_NAMES)?;
            if let Some(j) = to.ports.iter().position(|&port| port == 0) {
                return Err(invalid(format!("{field}.ports[{j}]"), "0 is not a port"));
            }
            bounded(&format!("{field}.paths"), to.paths.len(), authz::MAX_PATHS)?;
            let paths = to
                .paths
                .iter()
                .enumerate()
                .map(|(j, path)| path_match(&format!("{field}.paths[{j}]"), path))
                .collect::<Result<_, _>>()?;
            let target = proto::AuthorizationTarget {
                paths,
                methods: to.methods.iter().map(ToString::to_string).collect(),
            };
            Ok((to.ports.clone(), target))
        })
        .collect::<Result<_, _>>()?;
    Ok(PortedRule { sources, targets })
}

fn path_match(field: &str, path: &PathMatch) -> Result<proto::PathMatch, PolicyError> {
    use proto::path_match::Kind;
    let kind = match (&path.exact, &path.prefix) {
        (Some(exact), None) => Kind::Exact(exact.clone()),
        (None, Some(prefix)) => Kind::Prefix(prefix.clone()),
        _ => return Err(invalid(field, "exactly one of exact or prefix must be set")),
    };
    let (Kind::Exact(value) | Kind::Prefix(value)) = &kind;
    if !value.starts_with('/') || value.len() > 1024 {
        return Err(invalid(
            field,
            format!("`{value}` is not a path of at most 1024 bytes"),
        ));
    }
    Ok(proto::PathMatch { kind: Some(kind) })
}

fn bounded(field: &str, len: usize, max: usize) -> Result<(), PolicyError> {
    if len > max {
        return Err(invalid(
            field,
            format!("{len} entries, at most {max} allowed"),
        ));
    }
    Ok(())
}

fn names(field: &str, names: &[String], valid: fn(&str) -> bool) -> Result<(), PolicyError> {
    bounded(field, names.len(), authz::MAX_NAMES)?;
    match names.iter().position(|name| !valid(name)) {
        Some(i) => Err(invalid(
            format!("{field}[{i}]"),
            format!("`{}` is not valid here", names[i]),
        )),
        None => Ok(()),
    }
}

/// `namespace/name`, the name a DNS subdomain.
fn is_service_account(name: &str) -> bool {
    name.split_once('/').is_some_and(|(namespace, account)| {
        is_dns_label(namespace) && account.len() <= 253 && account.split('.').all(is_dns_label)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> AuthorizationPolicySpec {
        serde_json::from_value(value).unwrap()
    }

    fn error(value: serde_json::Value) -> String {
        translate_authorization(&spec(value))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn each_port_gets_the_rules_that_cover_it_without_their_ports() {
        let translated = translate_authorization(&spec(json!({
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "action": "DENY",
            "mode": "Audit",
            "rules": [
                {"from": [{"namespaces": ["frontend"]}], "to": [{"ports": [9080], "methods": ["GET"]}]},
                {"from": [{"serviceAccounts": ["shop/productpage"]}]},
            ],
        })))
        .unwrap();
        assert_eq!(translated.targets, ["reviews"]);
        let on_9080 = translated.for_port("shop/deny-frontend".into(), 9080);
        assert_eq!(on_9080.policy, "shop/deny-frontend");
        assert_eq!(on_9080.action(), proto::AuthorizationAction::Deny);
        assert!(on_9080.audit);
        assert_eq!(on_9080.rules.len(), 2);
        assert_eq!(on_9080.rules[0].targets[0].methods, ["GET"]);
        assert_eq!(on_9080.rules[0].sources[0].namespaces, ["frontend"]);
        // The first rule names 9080 only: elsewhere it is gone, not widened to every port.
        let on_9081 = translated.for_port("shop/deny-frontend".into(), 9081);
        assert_eq!(on_9081.rules.len(), 1);
        assert_eq!(
            on_9081.rules[0].sources[0].service_accounts,
            ["shop/productpage"]
        );
        assert!(on_9081.rules[0].targets.is_empty());
    }

    #[test]
    fn invalid_fields_are_named() {
        let target = json!([{"kind": "Service", "name": "reviews"}]);
        assert_eq!(
            error(json!({"targetRefs": []})),
            "spec.targetRefs: at least one target is required"
        );
        assert_eq!(
            error(
                json!({"targetRefs": [{"kind": "Service", "name": "a"}, {"kind": "Service", "name": "a"}]})
            ),
            "spec.targetRefs[1]: Service `a` is listed twice"
        );
        assert_eq!(
            error(json!({"targetRefs": target, "rules": [{"from": [{}]}]})),
            "spec.rules[0].from[0]: a source needs serviceAccounts or namespaces"
        );
        assert_eq!(
            error(
                json!({"targetRefs": target, "rules": [{"from": [{"serviceAccounts": ["productpage"]}]}]})
            ),
            "spec.rules[0].from[0].serviceAccounts[0]: `productpage` is not valid here"
        );
        assert_eq!(
            error(json!({"targetRefs": target, "rules": [{"to": [{"ports": [0]}]}]})),
            "spec.rules[0].to[0].ports[0]: 0 is not a port"
        );
        assert_eq!(
            error(
                json!({"targetRefs": target, "rules": [{"to": [{"paths": [{"exact": "/a", "prefix": "/b"}]}]}]})
            ),
            "spec.rules[0].to[0].paths[0]: exactly one of exact or prefix must be set"
        );
        assert_eq!(
            error(
                json!({"targetRefs": target, "rules": [{"to": [{"paths": [{"prefix": "api"}]}]}]})
            ),
            "spec.rules[0].to[0].paths[0]: `api` is not a path of at most 1024 bytes"
        );
    }
}

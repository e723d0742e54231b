//! A destination's configuration as received from the control plane, validated: everything the
//! proxy cannot apply is refused here, with the field named, before anything changes.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderName;
use outrigger_api::proto;
use serde::Serialize;

use crate::balance::Algorithm;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub pod: String,
    pub subsets: Vec<String>,
    pub h2c: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationConfig {
    pub version: String,
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// `namespace/name` of the DestinationPolicy in force.
    pub policy: Option<String>,
    pub policy_generation: i64,
    pub subsets: Vec<String>,
    pub endpoints: Vec<EndpointConfig>,
    pub load_balancer: Algorithm,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
}

/// Without a policy saying otherwise (SPEC.md).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl DestinationConfig {
    pub fn from_proto(
        version: String,
        destination: proto::Destination,
    ) -> Result<Self, ConfigError> {
        let port = u16::try_from(destination.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("port", format!("{} is not a TCP port", destination.port)))?;
        let subsets = destination.subsets;
        let endpoints = destination
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, endpoint)| {
                let address = endpoint.address.parse().map_err(|_| {
                    invalid(
                        format!("endpoints[{i}].address"),
                        format!("`{}` is not ip:port", endpoint.address),
                    )
                })?;
                if let Some(unknown) = endpoint.subsets.iter().find(|s| !subsets.contains(s)) {
                    return Err(invalid(
                        format!("endpoints[{i}].subsets"),
                        format!("subset `{unknown}` is not declared"),
                    ));
                }
                Ok(EndpointConfig {
                    address,
                    pod: endpoint.pod,
                    subsets: endpoint.subsets,
                    h2c: endpoint.h2c,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = destination.policy_spec.unwrap_or_default();
        let load_balancer = load_balancer(policy.load_balancer.unwrap_or_default())?;
        let connect_timeout = match policy.connection_pool {
            Some(pool) if pool.connect_timeout_ms > 0 => {
                Duration::from_millis(pool.connect_timeout_ms)
            }
            _ => DEFAULT_CONNECT_TIMEOUT,
        };
        Ok(Self {
            version,
            namespace: destination.namespace,
            service: destination.service,
            port,
            policy: Some(destination.policy).filter(|p| !p.is_empty()),
            policy_generation: destination.policy_generation,
            subsets,
            endpoints,
            load_balancer,
            connect_timeout,
        })
    }
}

fn load_balancer(lb: proto::LoadBalancer) -> Result<Algorithm, ConfigError> {
    let field = "policy.loadBalancer";
    Ok(match proto::Algorithm::try_from(lb.algorithm) {
        Ok(proto::Algorithm::PeakEwma) => Algorithm::PeakEwma,
        Ok(proto::Algorithm::RoundRobin) => Algorithm::RoundRobin,
        Ok(proto::Algorithm::LeastRequest) => Algorithm::LeastRequest,
        Ok(proto::Algorithm::Random) => Algorithm::Random,
        Ok(proto::Algorithm::ConsistentHash) => {
            let header = HeaderName::from_bytes(lb.hash_header.as_bytes()).map_err(|_| {
                invalid(
                    format!("{field}.hashHeader"),
                    format!(
                        "`{}` is not a header name (ConsistentHash needs one)",
                        lb.hash_header
                    ),
                )
            })?;
            Algorithm::ConsistentHash { header }
        }
        Err(_) => {
            return Err(invalid(
                format!("{field}.algorithm"),
                format!("unknown algorithm {}", lb.algorithm),
            ));
        }
    })
}

pub fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

pub fn serialize_header<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination() -> proto::Destination {
        proto::Destination {
            namespace: "shop".into(),
            service: "reviews".into(),
            port: 9080,
            subsets: vec!["v1".into()],
            endpoints: vec![proto::Endpoint {
                address: "10.0.0.1:9080".into(),
                subsets: vec!["v1".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rejected(change: impl FnOnce(&mut proto::Destination)) -> String {
        let mut d = destination();
        change(&mut d);
        DestinationConfig::from_proto("1".into(), d)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_apply_when_the_policy_is_silent() {
        let config = DestinationConfig::from_proto("1".into(), destination()).unwrap();
        assert_eq!(config.load_balancer, Algorithm::PeakEwma);
        assert_eq!(config.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            config.endpoints[0].address,
            "10.0.0.1:9080".parse().unwrap()
        );
    }

    #[test]
    fn what_cannot_be_applied_is_refused_with_the_field_named() {
        assert_eq!(
            rejected(|d| d.endpoints[0].address = "nowhere".into()),
            "endpoints[0].address: `nowhere` is not ip:port"
        );
        assert_eq!(
            rejected(|d| d.endpoints[0].subsets = vec!["v9".into()]),
            "endpoints[0].subsets: subset `v9` is not declared"
        );
        assert_eq!(
            rejected(|d| d.port = 70000),
            "port: 70000 is not a TCP port"
        );
        assert_eq!(
            rejected(|d| {
                d.policy_spec = Some(proto::Policy {
                    load_balancer: Some(proto::LoadBalancer {
                        algorithm: 42,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            }),
            "policy.loadBalancer.algorithm: unknown algorithm 42"
        );
        assert!(
            rejected(|d| {
                d.policy_spec = Some(proto::Policy {
                    load_balancer: Some(proto::LoadBalancer {
                        algorithm: proto::Algorithm::ConsistentHash as i32,
                        hash_header: String::new(),
                    }),
                    ..Default::default()
                })
            })
            .starts_with("policy.loadBalancer.hashHeader")
        );
    }
}

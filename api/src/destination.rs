//! Destination keys: how a proxy names the destination it subscribes to, and how the controller
//! reads that name back.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The DNS suffix of cluster Services.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// The destinations one proxy may follow at once: the controller accepts no more keys on one
/// stream, and the proxy holds no more state. A proxy forgets those it has not used for a minute,
/// so this is what one pod calls within a minute.
pub const MAX_DESTINATIONS_PER_PROXY: usize = 1024;

/// How the key of a pod's inbound side begins.
pub const INBOUND_PREFIX: &str = "inbound:";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationKey {
    /// A Service port, by name.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// An original destination address (a ClusterIP or a pod IP), as seen on a redirected
    /// connection.
    Address(SocketAddr),
    /// A pod's own inbound side (`inbound:<namespace>/<pod>`): what its proxy enforces on calls
    /// to it.
    Inbound { namespace: String, pod: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "`{0}` is not a cluster Service name (expected svc, svc.ns or svc.ns.{CLUSTER_DOMAIN})"
    )]
    NotAServiceName(String),
    #[error("`{0}` has an invalid port")]
    InvalidPort(String),
    #[error("`{0}` does not name a pod (expected {INBOUND_PREFIX}<namespace>/<pod>)")]
    NotAPodName(String),
}

impl DestinationKey {
    /// Reads an HTTP authority (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`, or an IP,
    /// each with an optional `:port`) as sent by an app in namespace `client_namespace`.
    pub fn from_authority(
        authority: &str,
        default_port: u16,
        client_namespace: &str,
    ) -> Result<Self, KeyError> {
        let (host, port) = split_port(authority)?;
        let port = port.unwrap_or(default_port);
        let host = host.trim_end_matches('.');
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(Self::Address(SocketAddr::new(ip, port)));
        }
        let labels: Vec<&str> = host.split('.').collect();
        if labels.iter().any(|l| !is_dns_label(l)) {
            return Err(KeyError::NotAServiceName(authority.to_string()));
        }
        let (name, namespace) = match labels.as_slice() {
            [name] => (*name, client_namespace),
            [name, namespace] => (*name, *namespace),
            [name, namespace, "svc"] => (*name, *namespace),
            [name, namespace, rest @ ..] if rest.join(".") == CLUSTER_DOMAIN => (*name, *namespace),
            _ => return Err(KeyError::NotAServiceName(authority.to_string())),
        };
        Ok(Self::Service {
            namespace: namespace.to_ascii_lowercase(),
            name: name.to_ascii_lowercase(),
            port,
        })
    }
}

fn split_port(authority: &str) -> Result<(&str, Option<u16>), KeyError> {
    // A bare IPv6 address has colons but no port.
    let port_sep = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else if authority.matches(':').count() == 1 {
        authority.rfind(':')
    } else {
        None
    };
    match port_sep {
        Some(i) => {
            let port = authority[i + 1..]
                .parse()
                .map_err(|_| KeyError::InvalidPort(authority.to_string()))?;
            Ok((&authority[..i], Some(port)))
        }
        None => Ok((authority, None)),
    }
}

/// A DNS label (RFC 1123), as Kubernetes names namespaces and Services.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

impl fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service {
                namespace,
                name,
                port,
            } => write!(f, "{name}.{namespace}.{CLUSTER_DOMAIN}:{port}"),
            Self::Address(addr) => write!(f, "{addr}"),
            Self::Inbound { namespace, pod } => write!(f, "{INBOUND_PREFIX}{namespace}/{pod}"),
        }
    }
}

impl FromStr for DestinationKey {
    type Err = KeyError;

    /// Reads the canonical form written by `Display`.
    fn from_str(key: &str) -> Result<Self, KeyError> {
        if let Ok(addr) = key.parse() {
            return Ok(Self::Address(addr));
        }
        if let Some(pod) = key.strip_prefix(INBOUND_PREFIX) {
            return match pod.split_once('/') {
                Some((namespace, pod))
                    if is_dns_label(namespace)
                        && pod.len() <= 253
                        && pod.split('.').all(is_dns_label) =>
                {
                    Ok(Self::Inbound {
                        namespace: namespace.to_string(),
                        pod: pod.to_string(),
                    })
                }
                _ => Err(KeyError::NotAPodName(key.to_string())),
            };
        }
        let (host, port) = split_port(key)?;
        let port = port.ok_or_else(|| KeyError::InvalidPort(key.to_string()))?;
        match host
            .strip_suffix(CLUSTER_DOMAIN)
            .and_then(|h| h.strip_suffix('.'))
            .and_then(|h| h.split_once('.'))
        {
            Some((name, namespace))
                if is_dns_label(name)
                    && is_dns_label(namespace)
                    && name == name.to_ascii_lowercase() =>
            {
                Ok(Self::Service {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    port,
                })
            }
            _ => Err(KeyError::NotAServiceName(key.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, namespace: &str, port: u16) -> DestinationKey {
        DestinationKey::Service {
            namespace: namespace.into(),
            name: name.into(),
            port,
        }
    }

    #[test]
    fn authorities_resolve_relative_to_the_client_namespace() {
        let read = |a| DestinationKey::from_authority(a, 80, "shop");
        assert_eq!(read("reviews"), Ok(svc("reviews", "shop", 80)));
        assert_eq!(read("reviews:9080"), Ok(svc("reviews", "shop", 9080)));
        assert_eq!(read("reviews.books"), Ok(svc("reviews", "books", 80)));
        assert_eq!(read("reviews.books.svc:1"), Ok(svc("reviews", "books", 1)));
        assert_eq!(
            read("Reviews.books.svc.cluster.local.:8080"),
            Ok(svc("reviews", "books", 8080))
        );
        assert_eq!(
            read("10.0.0.7:9080"),
            Ok(DestinationKey::Address("10.0.0.7:9080".parse().unwrap()))
        );
        assert_eq!(
            read("[::1]:81"),
            Ok(DestinationKey::Address("[::1]:81".parse().unwrap()))
        );
    }

    #[test]
    fn names_outside_the_cluster_are_refused() {
        // `example.com` reads as Service `example` in namespace `com`, as cluster DNS search paths
        // would; the controller then answers that no such Service exists.
        for bad in ["a.b.c.d", "", "bad_name", "x.y.svc.other.local", "-x.shop"] {
            assert!(matches!(
                DestinationKey::from_authority(bad, 80, "shop"),
                Err(KeyError::NotAServiceName(_))
            ));
        }
        assert!(matches!(
            DestinationKey::from_authority("reviews:http", 80, "shop"),
            Err(KeyError::InvalidPort(_))
        ));
    }

    #[test]
    fn canonical_form_round_trips() {
        for key in [
            svc("reviews", "shop", 9080),
            DestinationKey::Address("10.0.0.7:80".parse().unwrap()),
            DestinationKey::Address("[fd00::1]:80".parse().unwrap()),
        ] {
            assert_eq!(key.to_string().parse::<DestinationKey>(), Ok(key));
        }
        assert_eq!(
            svc("reviews", "shop", 9080).to_string(),
            "reviews.shop.svc.cluster.local:9080"
        );
        assert!("reviews:80".parse::<DestinationKey>().is_err());
    }

    #[test]
    fn a_pods_inbound_key_reads_back() {
        let key = DestinationKey::Inbound {
            namespace: "shop".into(),
            pod: "reviews-7d4b9.x".into(),
        };
        assert_eq!(key.to_string(), "inbound:shop/reviews-7d4b9.x");
        assert_eq!(key.to_string().parse::<DestinationKey>(), Ok(key));
        for bad in [
            "inbound:shop",
            "inbound:/pod",
            "inbound:shop/-pod",
            "inbound:a/b/c",
        ] {
            assert_eq!(
                bad.parse::<DestinationKey>(),
                Err(KeyError::NotAPodName(bad.into())),
                "{bad}"
            );
        }
    }
}

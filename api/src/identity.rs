//! Workload identities: the SPIFFE ID of a ServiceAccount, which the proxy asks a certificate for
//! and the controller certifies.

use std::fmt;

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_is_named_by_namespace_and_name_under_the_trust_domain() {
        let id = SpiffeId {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            namespace: "shop".into(),
            service_account: "reviews".into(),
        };
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
    }
}

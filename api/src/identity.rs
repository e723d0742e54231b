//! Workload identities: the SPIFFE ID of a ServiceAccount, which the proxy asks a certificate for
//! and the controller certifies.

use std::fmt;
use std::str::FromStr;

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

impl SpiffeId {
    /// The SPIFFE ID of a workload certificate (DER): its one URI subject alternative name.
    /// Whether the certificate is to be trusted is the TLS handshake's to check.
    #[cfg(feature = "x509")]
    pub fn of_certificate(certificate: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;

        let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
        let names = parsed.subject_alternative_name().ok()??;
        let mut uris = names
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
        match (uris.next(), uris.next()) {
            (Some(uri), None) => uri.parse().ok(),
            _ => None,
        }
    }
}

/// Why a URI is not the SPIFFE ID of a ServiceAccount.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
pub struct NotAWorkloadId(String);

impl FromStr for SpiffeId {
    type Err = NotAWorkloadId;

    fn from_str(uri: &str) -> Result<Self, NotAWorkloadId> {
        let invalid = || NotAWorkloadId(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let mut parts = rest.split('/');
        let (Some(trust_domain), Some("ns"), Some(namespace), Some("sa"), Some(account), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        // The characters SPIFFE allows in a trust domain and in path segments.
        let trust_domain_char = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_');
        let segment_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        let well_formed = !trust_domain.is_empty()
            && trust_domain.chars().all(trust_domain_char)
            && [namespace, account]
                .iter()
                .all(|s| !s.is_empty() && s.chars().all(segment_char));
        if !well_formed {
            return Err(invalid());
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: account.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_reads_back_as_written_and_nothing_else_reads() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/reviews.v1"
            .parse()
            .unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/reviews.v1"
        );
        for wrong in [
            "",
            "https://cluster.local/ns/shop/sa/reviews",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop/sa/reviews/extra",
            "spiffe://cluster.local/sa/reviews/ns/shop",
            "spiffe:///ns/shop/sa/reviews",
            "spiffe://Cluster.Local/ns/shop/sa/reviews",
            "spiffe://cluster.local/ns/shop/sa/re%2Fviews",
        ] {
            assert!(wrong.parse::<SpiffeId>().is_err(), "{wrong}");
        }
    }

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

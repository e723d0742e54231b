//! Who a token proves the caller is, as the API server says (TokenReview).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Semaphore;

use crate::kube_api;

/// The audience the projected token is issued for; a token for any other audience (the pod's
/// default token, one meant for another system) proves nothing here.
pub const TOKEN_AUDIENCE: &str = "outrigger";
/// A TokenReview answers at once; a proxy retries one that did not.
const REVIEW_DEADLINE: Duration = Duration::from_secs(5);
/// Reviews in flight at once: pods started by the thousand (a node drained, a rollout) are not
/// let to flood the API server; the rest wait, within the same deadline, and their proxies retry.
pub(super) const MAX_REVIEWS_IN_FLIGHT: usize = 64;
/// A projected ServiceAccount token is about a kilobyte; anything much larger is not one.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The ServiceAccount a token authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token proves no ServiceAccount for our audience.
    #[error("{0}")]
    Unauthenticated(String),
    /// The API server could not be asked.
    #[error("reviewing the token: {0}")]
    Unavailable(String),
}

/// Asks the API server who `token` belongs to.
#[derive(Clone)]
pub struct Reviewer {
    reviews: Api<TokenReview>,
    in_flight: Arc<Semaphore>,
}

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Self {
            reviews: Api::all(client),
            in_flight: Arc::new(Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
        }
    }

    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Unauthenticated(format!(
                "the token is empty or longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = tokio::time::timeout(REVIEW_DEADLINE, async {
            let _turn = self.in_flight.acquire().await.expect("never closed");
            self.reviews.create(&PostParams::default(), &review).await
        })
        .await
        .map_err(|_| ReviewError::Unavailable(format!("no answer within {REVIEW_DEADLINE:?}")))?
        .map_err(|e| ReviewError::Unavailable(kube_api::explain(&e)))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Unauthenticated(format!(
                "the token does not authenticate for the audience {TOKEN_AUDIENCE:?}: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )));
        }
        // The API server answers with the audiences of ours the token is for; none is a token
        // for another audience (an API server that ignores audiences).
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|audience| audience == TOKEN_AUDIENCE)
        {
            return Err(ReviewError::Unauthenticated(format!(
                "the token is not for the audience {TOKEN_AUDIENCE:?}"
            )));
        }
        let username = status
            .user
            .and_then(|user| user.username)
            .unwrap_or_default();
        service_account(&username).ok_or_else(|| {
            ReviewError::Unauthenticated(format!(
                "the token authenticates {username:?}, not a ServiceAccount"
            ))
        })
    }
}

/// `system:serviceaccount:<namespace>:<name>`, the username the API server gives a
/// ServiceAccount.
fn service_account(username: &str) -> Option<ServiceAccount> {
    let (namespace, name) = username
        .strip_prefix("system:serviceaccount:")?
        .split_once(':')?;
    let valid = |part: &str| !part.is_empty() && !part.contains([':', '/']);
    (valid(namespace) && valid(name)).then(|| ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_service_account_username_names_a_service_account() {
        assert_eq!(
            service_account("system:serviceaccount:shop:reviews"),
            Some(ServiceAccount {
                namespace: "shop".into(),
                name: "reviews".into()
            })
        );
        for other in [
            "admin",
            "system:node:n1",
            "system:serviceaccount:shop",
            "system:serviceaccount::reviews",
            "system:serviceaccount:shop:a:b",
            "system:serviceaccount:shop:a/b",
        ] {
            assert_eq!(service_account(other), None, "{other}");
        }
    }
}

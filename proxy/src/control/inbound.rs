//! The pod's own inbound key (`inbound:<namespace>/<pod>`), subscribed to on every stream beside
//! the destinations the app calls, and never swept: what the controller sends under it is the
//! authorization the inbound side enforces. Unknown means no policy applies to the pod.

use std::sync::Arc;

use outrigger_api::destination::DestinationKey;
use outrigger_api::proto::{self, Subscription};
use tokio::sync::watch;

use super::Identity;
use super::decode::{self, ConfigError};
use crate::policy::InboundAuthorization;

pub struct InboundKey {
    key: String,
    applied: watch::Sender<Arc<InboundAuthorization>>,
}

impl InboundKey {
    /// The key of the pod `identity` names; what is applied under it goes to `applied`.
    pub fn new(identity: &Identity, applied: watch::Sender<Arc<InboundAuthorization>>) -> Self {
        let key = DestinationKey::Inbound {
            namespace: identity.namespace.clone(),
            pod: identity.workload.clone(),
        };
        Self {
            key: key.to_string(),
            applied,
        }
    }

    pub(super) fn is(&self, key: &str) -> bool {
        self.key == key
    }

    /// With the version applied, so that after a reconnect an unchanged one is not sent again.
    pub(super) fn subscription(&self) -> Subscription {
        Subscription {
            key: self.key.clone(),
            known_version: self.applied.borrow().version.clone(),
        }
    }

    /// Puts a version in force; one that cannot be applied leaves the last good one.
    pub(super) fn apply(
        &self,
        version: String,
        destination: proto::Destination,
    ) -> Result<(), ConfigError> {
        let authorization = decode::inbound(version, destination)?;
        self.applied.send_replace(Arc::new(authorization));
        Ok(())
    }

    /// No policy applies to the pod any more.
    pub(super) fn clear(&self) {
        self.applied.send_if_modified(|applied| {
            let held = !applied.version.is_empty();
            if held {
                *applied = Arc::default();
            }
            held
        });
    }
}

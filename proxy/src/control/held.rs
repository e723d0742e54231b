//! The endpoint groups fetched for each subscribed destination, under the version fetched, for
//! the updates that name them. Held encoded: a fraction of the decoded size, decoded again when a
//! new version of the destination needs them.

use std::collections::HashMap;

use bytes::Bytes;
use outrigger_api::proto;
use prost::Message as _;

use crate::control::decode::{ConfigError, invalid};

#[derive(Default)]
pub struct HeldEndpoints {
    /// By destination key, then by group name.
    by_key: HashMap<String, HashMap<String, Held>>,
}

struct Held {
    version: String,
    /// An encoded `proto::Endpoints`.
    encoded: Bytes,
}

impl HeldEndpoints {
    /// The groups of `groups` not held at the version named.
    pub fn missing(&self, key: &str, groups: &[proto::EndpointGroup]) -> Vec<proto::EndpointGroup> {
        let held = self.by_key.get(key);
        groups
            .iter()
            .filter(|group| {
                held.and_then(|held| held.get(&group.name))
                    .is_none_or(|held| held.version != group.version)
            })
            .cloned()
            .collect()
    }

    /// Holds a fetched group (an encoded `proto::Endpoints`); refused, keeping what was held, when
    /// it does not decode.
    pub fn hold(
        &mut self,
        key: &str,
        group: proto::EndpointGroup,
        encoded: &[u8],
    ) -> Result<(), ConfigError> {
        proto::Endpoints::decode(encoded).map_err(|error| {
            invalid(
                format!("endpoints[{}]", group.name),
                format!("do not decode: {error}"),
            )
        })?;
        // Copied: a slice would keep the reply's whole read buffer alive.
        let held = Held {
            version: group.version,
            encoded: Bytes::copy_from_slice(encoded),
        };
        self.by_key
            .entry(key.to_string())
            .or_default()
            .insert(group.name, held);
        Ok(())
    }

    /// Every endpoint of `groups`, from the groups held at the versions named; groups of `key` no
    /// longer named are let go.
    pub fn endpoints(
        &mut self,
        key: &str,
        groups: &[proto::EndpointGroup],
    ) -> Result<Vec<proto::Endpoint>, ConfigError> {
        let held = self.by_key.entry(key.to_string()).or_default();
        held.retain(|name, _| groups.iter().any(|group| group.name == *name));
        let mut endpoints = Vec::new();
        for group in groups {
            match held.get(&group.name) {
                Some(held) if held.version == group.version => endpoints.extend(
                    proto::Endpoints::decode(held.encoded.clone())
                        .expect("held endpoints decoded when they were fetched")
                        .endpoints,
                ),
                _ => {
                    return Err(invalid(
                        format!("endpoints[{}]", group.name),
                        format!("version `{}` is not held", group.version),
                    ));
                }
            }
        }
        Ok(endpoints)
    }

    /// Lets go of everything held for `key` (unknown, or no longer subscribed).
    pub fn forget(&mut self, key: &str) {
        self.by_key.remove(key);
    }
}

//! Subscriber accounting: per destination key, the proxies subscribed to it and what each holds
//! of it, kept by the configuration streams and read by status.

use std::collections::HashMap;
use std::sync::Arc;

use outrigger_api::proto;
use tokio::sync::watch;

/// Who a connected proxy is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyId {
    pub namespace: String,
    pub workload: String,
    /// Distinguishes two streams from the same workload (a reconnect racing the old stream).
    pub stream: u64,
}

/// The policy a destination's configuration carries, as status compares it with the policy's
/// current generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVersion {
    /// `namespace/name` of the DestinationPolicy in force; empty when none is.
    pub policy: String,
    pub generation: i64,
}

impl PolicyVersion {
    pub(super) fn of(destination: &proto::Destination) -> Self {
        Self {
            policy: destination.policy.clone(),
            generation: destination.policy_generation,
        }
    }
}

/// What one proxy holds of one destination it subscribed to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holding {
    /// What the configuration it applied last carries; None until it has one.
    pub applied: Option<PolicyVersion>,
    /// Set when it rejected the latest configuration sent: what that carried, and the proxy's
    /// reason. It keeps its previous configuration meanwhile.
    pub rejected: Option<(PolicyVersion, String)>,
}

/// The proxies subscribed to one destination key, with what each holds of it.
pub type Holders = HashMap<ProxyId, Holding>;

/// Per destination key, every connected proxy subscribed to it and what it holds. Kept by the
/// configuration streams, read by status; a watch channel, so a burst of acknowledgements wakes
/// its reader once. Each key's proxies are shared, so that status takes the keys it counts for
/// the cost of one reference each, and computes from them without holding the lock the streams
/// write under; a key written while status holds it is copied then.
pub type Subscribers = HashMap<String, Arc<Holders>>;

/// The table of [`Subscribers`], written by the streams.
#[derive(Clone)]
pub(super) struct SubscriberTable(watch::Sender<Subscribers>);

impl Default for SubscriberTable {
    fn default() -> Self {
        Self(watch::Sender::new(Subscribers::new()))
    }
}

impl SubscriberTable {
    pub(super) fn watch(&self) -> watch::Receiver<Subscribers> {
        self.0.subscribe()
    }

    /// Records that `proxy` subscribed to these keys, holding what each says: one update (one
    /// lock, one wake-up of status) for all of them.
    pub(super) fn subscribe_all(&self, proxy: &ProxyId, holdings: Vec<(String, Holding)>) {
        if holdings.is_empty() {
            return;
        }
        self.0.send_modify(|subscribers| {
            for (key, holding) in holdings {
                Arc::make_mut(subscribers.entry(key).or_default()).insert(proxy.clone(), holding);
            }
        });
    }

    /// Updates what `proxy` holds of `key`, when it is subscribed to it.
    pub(super) fn hold(&self, proxy: &ProxyId, key: &str, update: impl FnOnce(&mut Holding)) {
        self.0
            .send_if_modified(|subscribers| match subscribers.get_mut(key) {
                Some(proxies) if proxies.contains_key(proxy) => {
                    let holding = Arc::make_mut(proxies)
                        .get_mut(proxy)
                        .expect("checked above");
                    update(holding);
                    true
                }
                _ => false,
            });
    }

    /// `proxy` let go of `keys`.
    pub(super) fn forget(&self, proxy: &ProxyId, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        self.0.send_modify(|subscribers| {
            for key in keys {
                if let Some(proxies) = subscribers.get_mut(key) {
                    Arc::make_mut(proxies).remove(proxy);
                    if proxies.is_empty() {
                        subscribers.remove(key);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(workload: &str) -> ProxyId {
        ProxyId {
            namespace: "shop".into(),
            workload: workload.into(),
            stream: 0,
        }
    }

    #[test]
    fn a_snapshot_shares_the_keys_and_keeps_its_view_while_the_table_changes() {
        let table = SubscriberTable::default();
        let keys = ["a:80", "b:80"].map(String::from);
        table.subscribe_all(
            &proxy("one"),
            keys.iter()
                .map(|key| (key.clone(), Holding::default()))
                .collect(),
        );
        let snapshot = table.watch().borrow().clone();

        table.hold(&proxy("one"), "a:80", |holding| {
            holding.rejected = Some((
                PolicyVersion {
                    policy: "shop/a".into(),
                    generation: 2,
                },
                "no".into(),
            ));
        });
        table.forget(&proxy("one"), &["b:80".to_string()]);

        assert_eq!(snapshot["a:80"][&proxy("one")], Holding::default());
        assert!(snapshot.contains_key("b:80"));
        let current = table.watch().borrow().clone();
        assert!(current["a:80"][&proxy("one")].rejected.is_some());
        assert!(!current.contains_key("b:80"));
        // Untouched keys are not copied.
        table.subscribe_all(&proxy("two"), vec![("c:80".into(), Holding::default())]);
        let later = table.watch().borrow().clone();
        assert!(Arc::ptr_eq(&current["a:80"], &later["a:80"]));
    }
}

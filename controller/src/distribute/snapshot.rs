//! The store: per-destination snapshots, published by the index on watch channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outrigger_api::proto;
use tokio::sync::watch;

/// What the index knows about one destination key.
#[derive(Debug)]
pub enum Snapshot {
    Known {
        /// Of the whole configuration, endpoints included.
        version: String,
        /// Everything but the endpoints.
        destination: Box<proto::Destination>,
        /// `destination`, encoded once for every stream that sends it.
        encoded: bytes::Bytes,
        /// The endpoints, in groups (one per EndpointSlice), each shared with the snapshots of
        /// the Service's other keys and with the next version while its slice is unchanged.
        endpoints: Vec<Arc<EndpointSet>>,
        /// When the index saw the change that produced this version (for push latency).
        changed_at: Instant,
    },
    Unknown {
        reason: String,
    },
}

/// A group of a destination's endpoints, encoded once, under a version of its own: updates name
/// the group and version, and proxies that do not hold that version fetch it.
#[derive(Debug)]
pub struct EndpointSet {
    pub name: String,
    pub version: String,
    /// An encoded `proto::Endpoints`.
    pub encoded: bytes::Bytes,
}

impl EndpointSet {
    /// The group `name`, encoded, under a version derived from its content.
    pub fn new(name: String, endpoints: Vec<proto::Endpoint>) -> Self {
        use prost::Message as _;
        let encoded = bytes::Bytes::from(proto::Endpoints { endpoints }.encode_to_vec());
        Self {
            version: content_version(&[&encoded]),
            name,
            encoded,
        }
    }

    /// The endpoints, decoded (only the encoding is kept).
    pub fn decode(&self) -> Vec<proto::Endpoint> {
        use prost::Message as _;
        proto::Endpoints::decode(self.encoded.clone())
            .expect("encoded by EndpointSet::new")
            .endpoints
    }
}

pub type Slot = Option<Arc<Snapshot>>;

/// The per-destination watch channels, keyed by canonical destination key.
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Mutex<SnapshotsInner>>,
}

struct SnapshotsInner {
    channels: HashMap<String, watch::Sender<Slot>>,
    /// Until the index has its first full view, a key it has not published may still appear, so
    /// subscribers wait; afterwards such a key is unknown.
    synced: bool,
}

pub(super) const UNKNOWN_REASON: &str = "no Service matches this destination";

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(SnapshotsInner {
                channels: HashMap::new(),
                synced: false,
            })),
        }
    }
}

impl Snapshots {
    /// Publishes `snapshot` for `key`; one snapshot may serve several keys.
    pub fn publish(&self, key: &str, snapshot: Arc<Snapshot>) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        let snapshot = Some(snapshot);
        match inner.channels.get(key) {
            Some(channel) => {
                channel.send_replace(snapshot);
            }
            None => {
                inner
                    .channels
                    .insert(key.to_string(), watch::Sender::new(snapshot));
            }
        }
    }

    /// Marks every key not published so far (and every key removed later) as unknown.
    pub fn mark_synced(&self) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        inner.synced = true;
        for channel in inner.channels.values() {
            channel.send_if_modified(|slot| {
                let unset = slot.is_none();
                if unset {
                    *slot = Some(unknown());
                }
                unset
            });
        }
    }

    /// The destination is gone: subscribers learn it is unknown.
    pub fn remove(&self, key: &str) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        if let Some(channel) = inner.channels.get(key) {
            if channel.receiver_count() == 0 {
                inner.channels.remove(key);
            } else {
                channel.send_replace(Some(unknown()));
            }
        }
    }

    /// A stream let go of `keys`: a key no stream watches any more that the index never published
    /// (an address no Service owns) loses its channel too, so keys asked about once do not pile
    /// up.
    pub fn release_all(&self, keys: &[String]) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        for key in keys {
            if let Some(channel) = inner.channels.get(key)
                && channel.receiver_count() == 0
                && !matches!(channel.borrow().as_deref(), Some(Snapshot::Known { .. }))
            {
                inner.channels.remove(key);
            }
        }
    }

    /// The current snapshot of one key, without subscribing to it.
    pub fn current(&self, key: &str) -> Slot {
        let inner = self.inner.lock().expect("snapshots lock");
        inner
            .channels
            .get(key)
            .and_then(|channel| channel.borrow().clone())
    }

    /// The channel of one key: its current snapshot (None until published or synced) and changes.
    pub fn watch(&self, key: &str) -> watch::Receiver<Slot> {
        self.watch_all([key]).pop().expect("one key, one channel")
    }

    /// The channels of several keys, in their order, under one lock.
    pub fn watch_all<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<watch::Receiver<Slot>> {
        let mut inner = self.inner.lock().expect("snapshots lock");
        let synced = inner.synced;
        keys.into_iter()
            .map(|key| {
                inner
                    .channels
                    .entry(key.to_string())
                    .or_insert_with(|| watch::Sender::new(synced.then(unknown)))
                    .subscribe()
            })
            .collect()
    }
}

impl Snapshot {
    /// A snapshot whose versions are derived from its content: a restarted controller, or another
    /// replica, gives the same version to the same configuration, so proxies that reconnect are
    /// not sent what they already have, and never miss a change behind a reused number.
    pub fn known(
        destination: proto::Destination,
        groups: Vec<(String, Vec<proto::Endpoint>)>,
        changed_at: Instant,
    ) -> Self {
        let groups = groups
            .into_iter()
            .map(|(name, endpoints)| Arc::new(EndpointSet::new(name, endpoints)))
            .collect();
        Self::of_groups(destination, groups, changed_at)
    }

    /// The same, of groups built already (the index keeps a Service's groups while their slices
    /// are unchanged).
    pub fn of_groups(
        mut destination: proto::Destination,
        endpoints: Vec<Arc<EndpointSet>>,
        changed_at: Instant,
    ) -> Self {
        use prost::Message as _;
        destination.endpoint_groups = endpoints
            .iter()
            .map(|set| proto::EndpointGroup {
                name: set.name.clone(),
                version: set.version.clone(),
            })
            .collect();
        let encoded = bytes::Bytes::from(destination.encode_to_vec());
        Self::Known {
            version: content_version(&[&encoded]),
            destination: Box::new(destination),
            encoded,
            endpoints,
            changed_at,
        }
    }
}

fn content_version(parts: &[&[u8]]) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn unknown() -> Arc<Snapshot> {
    Arc::new(Snapshot::Unknown {
        reason: UNKNOWN_REASON.to_string(),
    })
}

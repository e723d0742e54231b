//! `--manifests DIR`: cluster state from YAML files, as `kubectl apply -f DIR` would take them.
//!
//! Every `.yaml`, `.yml` and `.json` file directly in DIR is read; each of its documents may hold
//! a Service, an EndpointSlice, a Pod, a DestinationPolicy or an AuthorizationPolicy (other kinds
//! are skipped). The directory is watched (inotify on Linux) and read again whenever a file in it may have changed,
//! so an edit applies within milliseconds, and every few seconds all the same. Files are compared
//! by content, so editors that replace files and ConfigMap volumes that swap symlinks are seen
//! alike, and events that change nothing cost one read. A file that cannot be read back into
//! valid objects is reported with its path and line and keeps its last good objects, as a cluster
//! keeps its objects when `kubectl apply` is refused.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::source::{Change, Kind, Object, ObjectRef};

/// An event is followed by others for the same edit (an editor's write then rename, a file
/// written in pieces): the directory is read once they have been quiet this long...
const SETTLE: Duration = Duration::from_millis(10);

/// ...or this long after the first, so a directory that never goes quiet is still read.
const SETTLE_AT_MOST: Duration = Duration::from_millis(100);

/// With a watch, the directory is also read after this long without events: a safety net for
/// filesystems that send none (some network and FUSE mounts), and for a DIR replaced as a whole,
/// whose watch is left on the old directory.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Without a watch (the system refused one), the directory is read this often.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The namespace kubectl puts an object in when its manifest names none.
const DEFAULT_NAMESPACE: &str = "default";

/// Why a file's objects were not taken.
#[derive(Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// Line and column (1-based), when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    /// `file:line:column: message`, the form editors and terminals link to the place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => {
                write!(
                    f,
                    "{}:{line}:{column}: {}",
                    self.file.display(),
                    self.message
                )
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Default)]
struct ManifestFile {
    /// What was read last, so an unchanged file is not parsed again.
    content: Option<Vec<u8>>,
    /// The objects of the last version that parsed.
    objects: Vec<Object>,
    /// The problem reported last, so a lasting one is reported once.
    problem: Option<String>,
}

/// A manifests directory and what the index was told of it.
pub struct Manifests {
    dir: PathBuf,
    metrics: Metrics,
    files: BTreeMap<PathBuf, ManifestFile>,
    sent: BTreeMap<ObjectRef, Object>,
    dir_problem: Option<String>,
}

impl Manifests {
    pub fn new(dir: PathBuf, metrics: Metrics) -> anyhow::Result<Self> {
        std::fs::read_dir(&dir)
            .with_context(|| format!("reading the manifests directory {}", dir.display()))?;
        Ok(Self {
            dir,
            metrics,
            files: BTreeMap::new(),
            sent: BTreeMap::new(),
            dir_problem: None,
        })
    }

    /// Sends the directory's objects, then `Synced`, then every change, from a thread of its own
    /// (file reads block) until the receiver is gone.
    pub fn spawn(mut self, changes: mpsc::Sender<Change>) -> anyhow::Result<()> {
        std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || {
                // Watching before the first read, so an edit made during it is not missed.
                // Without a watch, polling still serves every edit, only later: a controller that
                // reacts slower beats one that does not start because, say, the user's inotify
                // watches are all taken by an IDE.
                let mut watch = watch(&self.dir)
                    .inspect_err(|error| {
                        tracing::warn!(
                            "{error:#}; reading the directory every {POLL_INTERVAL:?} instead"
                        );
                    })
                    .ok();
                let initial = self.scan().into_iter().chain([Change::Synced]);
                for change in initial {
                    if changes.blocking_send(change).is_err() {
                        return;
                    }
                }
                loop {
                    match &watch {
                        Some((_watcher, events)) => {
                            if let Err(error) = settle(events) {
                                tracing::warn!(
                                    "{error:#}; reading the directory every {POLL_INTERVAL:?} instead"
                                );
                                watch = None;
                            }
                        }
                        None => std::thread::sleep(POLL_INTERVAL),
                    }
                    if changes.is_closed() {
                        return; // The controller stopped.
                    }
                    for change in self.scan() {
                        if changes.blocking_send(change).is_err() {
                            return;
                        }
                    }
                }
            })
            .context("starting the manifests thread")?;
        Ok(())
    }

    /// Reads the directory again; returns what changed since the last scan.
    pub fn scan(&mut self) -> Vec<Change> {
        let paths = match manifest_paths(&self.dir) {
            Ok(paths) => {
                self.dir_problem = None;
                paths
            }
            Err(error) => {
                // Keep serving the last state: the directory may be being replaced.
                let problem = format!("{error:#}");
                if self.dir_problem.as_ref() != Some(&problem) {
                    self.metrics.reconcile_errors.inc();
                    tracing::error!("{problem}");
                    self.dir_problem = Some(problem);
                }
                return Vec::new();
            }
        };
        let before = self.files.len();
        self.files.retain(|path, _| paths.contains(path));
        let mut changed = self.files.len() != before;
        for path in paths {
            let file = self.files.entry(path.clone()).or_default();
            let content = match std::fs::read(&path) {
                Ok(content) => content,
                // Removed since it was listed: the next scan drops it.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    let problem = ManifestError {
                        file: path.clone(),
                        position: None,
                        message: format!("cannot be read: {error}"),
                    };
                    report(&self.metrics, file, Some(problem));
                    continue;
                }
            };
            if file.content.as_ref() == Some(&content) {
                continue;
            }
            match parse(&path, &content) {
                Ok(objects) => {
                    tracing::info!(file = %path.display(), objects = objects.len(), "manifest loaded");
                    file.objects = objects;
                    changed = true;
                    report(&self.metrics, file, None);
                }
                Err(problem) => report(&self.metrics, file, Some(problem)),
            }
            file.content = Some(content);
        }
        if changed { self.diff() } else { Vec::new() }
    }

    /// The changes that take the index from what it was sent to what the files now hold.
    fn diff(&mut self) -> Vec<Change> {
        let mut current: BTreeMap<ObjectRef, (&Path, &Object)> = BTreeMap::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                let reference = object.reference().expect("parse names every object");
                match current.entry(reference) {
                    Entry::Vacant(entry) => {
                        entry.insert((path, object));
                    }
                    Entry::Occupied(entry) => tracing::warn!(
                        object = %entry.key(), used = %entry.get().0.display(), ignored = %path.display(),
                        "object defined in two files; the first one is used"
                    ),
                }
            }
        }
        let mut deleted: Vec<ObjectRef> = self
            .sent
            .keys()
            .filter(|reference| !current.contains_key(reference))
            .cloned()
            .collect();
        let mut applied: Vec<Object> = current
            .iter()
            .filter(|(reference, (_, object))| self.sent.get(reference) != Some(object))
            .map(|(_, (_, object))| (*object).clone())
            .collect();
        // In the orders `Kind` is declared for: a new Service is computed once, with its
        // endpoints and policy in place, rather than published bare first.
        applied.sort_by_key(|object| std::cmp::Reverse(object.kind()));
        deleted.sort_by_key(|reference| reference.kind);
        self.sent = current
            .into_iter()
            .map(|(reference, (_, object))| (reference, object.clone()))
            .collect();
        deleted
            .into_iter()
            .map(Change::Deleted)
            .chain(applied.into_iter().map(Change::Applied))
            .collect()
    }
}

type Events = Receiver<notify::Result<Event>>;

/// The events of the files directly in `dir`, for as long as the watcher lives.
fn watch(dir: &Path) -> anyhow::Result<(RecommendedWatcher, Events)> {
    let (sender, events) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(sender)
        .context("cannot watch the manifests directory for edits")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch the manifests directory {}", dir.display()))?;
    Ok((watcher, events))
}

/// Returns once a burst of changes has settled, or after `RESCAN_INTERVAL` without one.
fn settle(events: &Events) -> anyhow::Result<()> {
    if !wait_for_change(events, Instant::now() + RESCAN_INTERVAL)? {
        return Ok(());
    }
    let at_most = Instant::now() + SETTLE_AT_MOST;
    while wait_for_change(events, at_most.min(Instant::now() + SETTLE))? {}
    Ok(())
}

/// Whether an event that may mean a changed file came before `deadline`.
fn wait_for_change(events: &Events, deadline: Instant) -> anyhow::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        match events.recv_timeout(left) {
            // Every read opens the files, this source's own too: that changes nothing.
            Ok(Ok(Event {
                kind: EventKind::Access(kind),
                ..
            })) if kind != AccessKind::Close(AccessMode::Write) => {}
            Ok(Ok(_)) => return Ok(true),
            // Events may have been lost; the read that follows catches up all the same.
            Ok(Err(error)) => {
                tracing::warn!("watching the manifests directory: {error}");
                return Ok(true);
            }
            Err(RecvTimeoutError::Timeout) => return Ok(false),
            Err(RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the watch of the manifests directory stopped")
            }
        }
    }
}

/// Logs a file's problem when it is new, and clears it when the file is good again.
fn report(metrics: &Metrics, file: &mut ManifestFile, problem: Option<ManifestError>) {
    let problem = problem.map(|p| p.to_string());
    if problem != file.problem {
        if let Some(problem) = &problem {
            metrics.reconcile_errors.inc();
            tracing::error!("{problem} (keeping the file's last good objects)");
        }
        file.problem = problem;
    }
}

fn manifest_paths(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the manifests directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let manifest = path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json");
            // Hidden files are editors' and ConfigMap volumes' bookkeeping.
            let hidden = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with('.'));
            manifest && !hidden && path.is_file()
        })
        .collect();
    paths.sort();
    Ok(paths)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// The objects of one file, or the first reason it cannot be taken whole.
pub fn parse(file: &Path, content: &[u8]) -> Result<Vec<Object>, ManifestError> {
    let error = |position: Option<(usize, usize)>, message: String| ManifestError {
        file: file.to_path_buf(),
        position,
        message,
    };
    let yaml_error = |e: serde_norway::Error| {
        let position = e.location().map(|l| (l.line(), l.column()));
        let message = e.to_string();
        // The position leads the message instead.
        let message = match position {
            Some((line, column)) => message
                .strip_suffix(&format!(" at line {line} column {column}"))
                .map_or(message.clone(), str::to_owned),
            None => message,
        };
        error(position, message)
    };
    // The document's kind picks its type; reading it straight into that type (rather than
    // through a generic value) keeps line numbers in errors.
    let mut kinds = Vec::new();
    for document in serde_norway::Deserializer::from_slice(content) {
        kinds.push(Option::<TypeMeta>::deserialize(document).map_err(yaml_error)?);
    }
    let mut objects = Vec::new();
    let documents = serde_norway::Deserializer::from_slice(content);
    for (number, (document, type_meta)) in documents.zip(kinds).enumerate() {
        let Some(TypeMeta { api_version, kind }) = type_meta else {
            continue; // An empty document.
        };
        let Some(object_kind) = Kind::named(&kind) else {
            tracing::debug!(file = %file.display(), %kind, "skipping a kind the controller does not read");
            continue;
        };
        if api_version != object_kind.api_version() {
            return Err(error(
                None,
                format!(
                    "document {}: {kind} has no apiVersion `{api_version}`",
                    number + 1
                ),
            ));
        }
        let mut object = object_kind.deserialize(document).map_err(yaml_error)?;
        let metadata = object.metadata_mut();
        if metadata.name.as_deref().unwrap_or_default().is_empty() {
            return Err(error(
                None,
                format!("document {}: {kind} has no metadata.name", number + 1),
            ));
        }
        metadata
            .namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
        // The API server would refuse an invalid object; so does this source.
        if let Err(problem) = object.check() {
            let reference = object.reference().expect("named above");
            return Err(error(None, format!("{kind} {}: {problem}", reference.key)));
        }
        objects.push(object);
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Kind, ObjectKey};

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 9080}]
";

    const POLICY: &str = "\
apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  timeout: 10s
";

    fn parsed(content: &str) -> Result<Vec<Object>, ManifestError> {
        parse(Path::new("dir/file.yaml"), content.as_bytes())
    }

    fn reference(kind: Kind, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            key: ObjectKey::new(namespace, name),
        }
    }

    #[test]
    fn files_hold_many_documents_of_the_four_kinds() {
        let content = format!(
            "{SERVICE}---\n{POLICY}---\n\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-a
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{{addresses: [10.0.0.1]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, labels: {{version: v1}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: ignored}}
---
"
        );
        let references: Vec<ObjectRef> = parsed(&content)
            .unwrap()
            .iter()
            .map(|o| o.reference().unwrap())
            .collect();
        assert_eq!(
            references,
            [
                reference(Kind::Service, "shop", "reviews"),
                reference(Kind::DestinationPolicy, "shop", "reviews"),
                // No namespace: kubectl's default.
                reference(Kind::EndpointSlice, "default", "reviews-a"),
                reference(Kind::Pod, "default", "reviews-1"),
            ]
        );
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        let at = |content: &str| parsed(content).unwrap_err().to_string();
        // A YAML syntax error in the second document.
        assert_eq!(
            at(&format!("{SERVICE}---\nkind: Service\nmetadata: name: x\n")),
            "dir/file.yaml:9:15: mapping values are not allowed in this context"
        );
        // A value of the wrong type.
        assert_eq!(
            at(&SERVICE.replace("port: 9080", "port: http")),
            "dir/file.yaml:6:30: spec.ports[0].port: invalid type: string \"http\", expected i32"
        );
        // A duration that is not one.
        assert_eq!(
            at(&POLICY.replace("10s", "10 seconds")),
            "dir/file.yaml:6:12: spec.timeout: `10 seconds` is not a duration \
             (expected e.g. 250ms, 10s, 1m, 1h30m)"
        );
    }

    #[test]
    fn objects_the_api_server_would_refuse_are_refused() {
        let invalid = format!("{POLICY}  retries: {{perTryTimeout: 20s}}\n");
        assert_eq!(
            parsed(&invalid).unwrap_err().to_string(),
            "dir/file.yaml: DestinationPolicy shop/reviews: spec.retries.perTryTimeout: \
             20s exceeds the timeout 10s"
        );
        assert!(
            parsed("apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\n")
                .unwrap_err()
                .to_string()
                .contains("document 1: Service has no metadata.name")
        );
        assert!(
            parsed(&POLICY.replace("v1alpha1", "v1"))
                .unwrap_err()
                .to_string()
                .contains("DestinationPolicy has no apiVersion `outrigger.dev/v1`")
        );
    }

    fn applied(changes: &[Change]) -> Vec<ObjectRef> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Applied(object) => object.reference(),
                _ => None,
            })
            .collect()
    }

    fn deleted(changes: &[Change]) -> Vec<ObjectRef> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Deleted(reference) => Some(reference.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn scans_report_what_changed_and_keep_a_broken_file_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::default();
        let mut manifests = Manifests::new(dir.path().to_path_buf(), metrics.clone()).unwrap();
        let service = reference(Kind::Service, "shop", "reviews");
        let policy = reference(Kind::DestinationPolicy, "shop", "reviews");
        std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
        std::fs::write(dir.path().join("policy.yml"), POLICY).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        // The policy goes first, so the Service is computed with it in place.
        assert_eq!(
            applied(&manifests.scan()),
            [policy.clone(), service.clone()]
        );
        assert!(manifests.scan().is_empty(), "nothing changed");

        std::fs::write(dir.path().join("policy.yml"), POLICY.replace("10s", "20s")).unwrap();
        assert_eq!(applied(&manifests.scan()), std::slice::from_ref(&policy));

        std::fs::write(dir.path().join("policy.yml"), "spec: [broken").unwrap();
        assert!(manifests.scan().is_empty(), "the last good policy stays");
        assert!(manifests.scan().is_empty());
        assert_eq!(metrics.reconcile_errors.get(), 1, "reported once");

        // Moving an object to another file is no change.
        std::fs::remove_file(dir.path().join("policy.yml")).unwrap();
        std::fs::write(
            dir.path().join("z-policy.yaml"),
            POLICY.replace("10s", "20s"),
        )
        .unwrap();
        assert!(manifests.scan().is_empty());

        // An object defined twice: the first file (by name) wins.
        std::fs::write(
            dir.path().join("a-policy.yaml"),
            POLICY.replace("10s", "30s"),
        )
        .unwrap();
        let changes = manifests.scan();
        assert_eq!(applied(&changes), std::slice::from_ref(&policy));
        let Change::Applied(Object::DestinationPolicy(first)) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(first.spec.timeout.as_ref().unwrap().as_str(), "30s");

        std::fs::remove_file(dir.path().join("service.yaml")).unwrap();
        assert_eq!(deleted(&manifests.scan()), [service]);
    }

    #[test]
    fn a_missing_directory_is_an_error_at_start() {
        let error = Manifests::new("/nonexistent/outrigger".into(), Metrics::default())
            .err()
            .unwrap();
        assert!(
            format!("{error:#}")
                .starts_with("reading the manifests directory /nonexistent/outrigger"),
            "{error:#}"
        );
    }

    /// The changes a running watch of `dir` sends.
    fn spawned(dir: &Path) -> mpsc::Receiver<Change> {
        let (changes, received) = mpsc::channel(16);
        Manifests::new(dir.to_path_buf(), Metrics::default())
            .unwrap()
            .spawn(changes)
            .unwrap();
        received
    }

    async fn next_within(received: &mut mpsc::Receiver<Change>, bound: Duration) -> Change {
        tokio::time::timeout(bound, received.recv())
            .await
            .unwrap_or_else(|_| panic!("a change within {bound:?}"))
            .expect("the watch runs")
    }

    fn policy_timeout(change: &Change) -> &str {
        match change {
            Change::Applied(Object::DestinationPolicy(policy)) => {
                policy.spec.timeout.as_ref().unwrap().as_str()
            }
            _ => panic!("not a DestinationPolicy: {change:?}"),
        }
    }

    /// Well inside `RESCAN_INTERVAL` after the last read: a change seen this soon was seen by its
    /// event, not by the fallback rescan.
    const BY_EVENT: Duration = Duration::from_secs(2);
    const _: () = assert!(RESCAN_INTERVAL.as_secs() >= 5);

    #[tokio::test]
    async fn the_watch_sends_the_state_then_synced_then_edits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
        let mut received = spawned(dir.path());
        let mut next = async || next_within(&mut received, Duration::from_secs(10)).await;
        assert!(matches!(next().await, Change::Applied(Object::Service(_))));
        assert!(matches!(next().await, Change::Synced));
        std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
        assert!(matches!(
            next().await,
            Change::Applied(Object::DestinationPolicy(_))
        ));
    }

    #[tokio::test]
    async fn edits_in_place_and_renamed_over_are_seen_by_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, POLICY).unwrap();
        let mut received = spawned(dir.path());
        let mut next = async || next_within(&mut received, BY_EVENT).await;
        assert_eq!(policy_timeout(&next().await), "10s");
        assert!(matches!(next().await, Change::Synced));

        // Rewritten in place, as `echo >` and many editors do.
        std::fs::write(&policy, POLICY.replace("10s", "20s")).unwrap();
        assert_eq!(policy_timeout(&next().await), "20s");

        // Written aside, then renamed over the old file, as vim and atomic writers do.
        let aside = dir.path().join(".policy.yaml.tmp");
        std::fs::write(&aside, POLICY.replace("10s", "30s")).unwrap();
        std::fs::rename(&aside, &policy).unwrap();
        assert_eq!(policy_timeout(&next().await), "30s");
    }

    #[tokio::test]
    async fn configmap_volume_symlink_swaps_are_seen_by_their_events() {
        let dir = tempfile::tempdir().unwrap();
        // A ConfigMap volume: `policy.yaml -> ..data/policy.yaml`, `..data -> ..<version>`; the
        // kubelet writes a new version beside the old one, then renames a new `..data` over it.
        let version = |name: &str, timeout: &str| {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            let content = POLICY.replace("10s", timeout);
            std::fs::write(dir.path().join(name).join("policy.yaml"), content).unwrap();
        };
        version("..1", "10s");
        std::os::unix::fs::symlink("..1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.yaml", dir.path().join("policy.yaml")).unwrap();
        let mut received = spawned(dir.path());
        let mut next = async || next_within(&mut received, BY_EVENT).await;
        assert_eq!(policy_timeout(&next().await), "10s");
        assert!(matches!(next().await, Change::Synced));

        version("..2", "20s");
        std::os::unix::fs::symlink("..2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_eq!(policy_timeout(&next().await), "20s");
    }
}

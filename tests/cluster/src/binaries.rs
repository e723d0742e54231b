//! Building the pinned test-cluster binaries with Go, once, into a cache outside the repository:
//! etcd, kube-apiserver, kube-controller-manager, kubectl and helm for the API server; for the
//! node kubelet, kube-scheduler, kube-proxy, containerd, the CNI plugins, CoreDNS, crictl, the pod
//! sandbox ("pause") program, and Prometheus with Kubernetes service discovery (for the suite in
//! pods).
//!
//! `k8s.io/kubernetes` cannot be `go install`ed (its go.mod replaces the staging modules with
//! local paths), and neither can etcd's server, so each is built from a small Go module generated
//! here from `versions.env`; so is CoreDNS, with the few plugins the node uses. The other modules
//! are installed as they are released.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result, bail};
use crate::versions::Versions;
use crate::{progress, tail_of_file};

/// Source of the etcd wrapper, compiled in so the build does not depend on the working directory.
const ETCD_MAIN_GO: &str = include_str!("../go/etcd/main.go");
/// Source of the pod sandbox program, likewise.
const PAUSE_MAIN_GO: &str = include_str!("../go/pause/main.go");
/// Source of CoreDNS with the test node's plugins only, likewise.
const COREDNS_MAIN_GO: &str = include_str!("../go/coredns/main.go");

/// Bumped whenever the way the binaries are built changes (flags, layout), so that caches built
/// the old way are rebuilt.
const BUILD_RECIPE: &str = "outrigger-cluster build recipe 1";

const KUBE_COMMANDS: [&str; 3] = ["kube-apiserver", "kube-controller-manager", "kubectl"];
/// Built from the same generated module as [`KUBE_COMMANDS`], but apart from them, so that an
/// API-server-only build does not compile them.
const KUBE_NODE_COMMANDS: [&str; 3] = ["kubelet", "kube-scheduler", "kube-proxy"];
/// Where the CNI plugins go, below `bin/`: containerd is pointed at this directory.
const CNI_DIR: &str = "cni";
const CNI_PLUGINS: [&str; 4] = [
    "main/bridge",
    "ipam/host-local",
    "main/loopback",
    "meta/portmap",
];
/// Prometheus with no service discovery but Kubernetes' (and the static and file ones it always
/// has), which its plugins' build tags allow.
const PROMETHEUS_TAGS: &str = "remove_all_sd,enable_kubernetes_sd";
/// containerd's release build tags for a static binary without the docs generator.
const CONTAINERD_TAGS: &str = "urfave_cli_no_docs,osusergo,netgo,static_build";

/// Where Outrigger caches builds: `$OUTRIGGER_CACHE_DIR`, else `$XDG_CACHE_HOME/outrigger`, else
/// `~/.cache/outrigger`.
pub fn cache_dir() -> Result<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = non_empty("OUTRIGGER_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("outrigger"));
    }
    let home = non_empty("HOME")
        .context(|| "neither OUTRIGGER_CACHE_DIR, XDG_CACHE_HOME nor HOME is set".into())?;
    Ok(PathBuf::from(home).join(".cache").join("outrigger"))
}

/// The built binaries of one set of pinned versions.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
    versions: Versions,
}

impl Binaries {
    /// The API server's binaries of the pinned versions, built first if the cache does not hold
    /// them yet (about 10 minutes on 2 cores; progress goes to stderr). Safe to call from several
    /// processes at once: one builds while the others wait.
    pub fn ensure_built() -> Result<Binaries> {
        Binaries::ensure_components(&Component::API_SERVER)
    }

    /// [`Binaries::ensure_built`], and the node's binaries too (about 6 more minutes the first
    /// time).
    pub fn ensure_node_built() -> Result<Binaries> {
        Binaries::ensure_components(&Component::ALL)
    }

    fn ensure_components(components: &[Component]) -> Result<Binaries> {
        let binaries = Binaries::locate()?;
        if binaries.are_current(components)? {
            return Ok(binaries);
        }
        let root = binaries.root();
        fs::create_dir_all(root.join("stamps"))
            .context(|| format!("creating {}", root.join("stamps").display()))?;
        let lock_path = root.join("build.lock");
        let lock = File::create(&lock_path)
            .context(|| format!("creating the build lock {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            progress(&format!(
                "waiting for another process to finish building the test cluster's binaries (lock {})",
                lock_path.display()
            ));
            lock.lock()
                .context(|| format!("locking {}", lock_path.display()))?;
        }
        // Another process may have built some or all of them while we waited.
        let stale: Vec<Component> = components
            .iter()
            .copied()
            .filter(|component| !binaries.is_current(*component).unwrap_or(false))
            .collect();
        if !stale.is_empty() {
            Builder::new(root, &binaries.versions)?.build(&stale)?;
        }
        Ok(binaries)
    }

    /// Where the binaries of the pinned versions are, or will be once built.
    pub fn locate() -> Result<Binaries> {
        let versions = Versions::pinned();
        let dir = cache_dir()?
            .join("cluster")
            .join(&versions.kubernetes)
            .join("bin");
        Ok(Binaries { dir, versions })
    }

    /// Whether the cache holds a complete build of exactly the pinned versions, node included.
    pub fn is_built(&self) -> Result<bool> {
        self.are_current(&Component::ALL)
    }

    fn are_current(&self, components: &[Component]) -> Result<bool> {
        for &component in components {
            if !self.is_current(component)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `component` was built from exactly what is pinned now and is still there.
    fn is_current(&self, component: Component) -> Result<bool> {
        let stamp = read_to_string_if_exists(&component.stamp_path(self.root()))?;
        Ok(
            stamp.as_deref() == Some(component.stamp(&self.versions).as_str())
                && component
                    .binaries()
                    .iter()
                    .all(|binary| self.dir.join(binary).is_file()),
        )
    }

    /// `<cache>/cluster/<kubernetes version>`: the binaries, their Go modules and build log.
    fn root(&self) -> &Path {
        self.dir.parent().expect("the bin directory has a parent")
    }

    /// The directory holding every binary (for `PATH`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The versions these binaries were built from.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.dir.join("kubectl")
    }

    pub fn helm(&self) -> PathBuf {
        self.dir.join("helm")
    }

    /// Our single-member etcd (`tests/cluster/go/etcd/main.go`).
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("outrigger-etcd")
    }

    /// Any of the node's programs by name: `kubelet`, `kube-scheduler`, `kube-proxy`,
    /// `containerd`, `ctr`, `containerd-shim-runc-v2`, `coredns`, `crictl`, `outrigger-pause`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory of the CNI plugins (bridge, host-local, loopback, portmap).
    pub fn cni_dir(&self) -> PathBuf {
        self.dir.join(CNI_DIR)
    }
}

/// The parts of the build that are rebuilt independently: a new Helm does not recompile the
/// API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Kubernetes,
    Etcd,
    Helm,
    KubernetesNode,
    Containerd,
    CniPlugins,
    CoreDns,
    Crictl,
    Pause,
    Prometheus,
}

impl Component {
    const API_SERVER: [Component; 3] = [Component::Kubernetes, Component::Etcd, Component::Helm];
    const ALL: [Component; 10] = [
        Component::Kubernetes,
        Component::Etcd,
        Component::Helm,
        Component::KubernetesNode,
        Component::Containerd,
        Component::CniPlugins,
        Component::CoreDns,
        Component::Crictl,
        Component::Pause,
        Component::Prometheus,
    ];

    fn name(self) -> &'static str {
        match self {
            Component::Kubernetes => "kubernetes",
            Component::Etcd => "etcd",
            Component::Helm => "helm",
            Component::KubernetesNode => "kubernetes-node",
            Component::Containerd => "containerd",
            Component::CniPlugins => "cni-plugins",
            Component::CoreDns => "coredns",
            Component::Crictl => "crictl",
            Component::Pause => "pause",
            Component::Prometheus => "prometheus",
        }
    }

    /// What it is, for progress messages.
    fn description(self, versions: &Versions) -> String {
        match self {
            Component::Kubernetes => format!(
                "Kubernetes {} ({})",
                versions.kubernetes,
                KUBE_COMMANDS.join(", ")
            ),
            Component::Etcd => format!("etcd {}", versions.etcd),
            Component::Helm => format!("helm {}", versions.helm),
            Component::KubernetesNode => format!(
                "Kubernetes {} ({})",
                versions.kubernetes,
                KUBE_NODE_COMMANDS.join(", ")
            ),
            Component::Containerd => format!("containerd {}", versions.containerd),
            Component::CniPlugins => format!("CNI plugins {}", versions.cni_plugins),
            Component::CoreDns => format!("CoreDNS {}", versions.coredns),
            Component::Crictl => format!("crictl {}", versions.crictl),
            Component::Pause => "the pod sandbox program".to_string(),
            Component::Prometheus => format!("Prometheus {}", versions.prometheus_release()),
        }
    }

    /// The files it puts in `bin/`.
    fn binaries(self) -> Vec<String> {
        let names: &[&str] = match self {
            Component::Kubernetes => &KUBE_COMMANDS,
            Component::Etcd => &["outrigger-etcd"],
            Component::Helm => &["helm"],
            Component::KubernetesNode => &KUBE_NODE_COMMANDS,
            Component::Containerd => &["containerd", "ctr", "containerd-shim-runc-v2"],
            Component::CniPlugins => {
                return CNI_PLUGINS
                    .iter()
                    .map(|plugin| format!("{CNI_DIR}/{}", plugin_name(plugin)))
                    .collect();
            }
            Component::CoreDns => &["coredns"],
            Component::Crictl => &["crictl"],
            Component::Pause => &["outrigger-pause"],
            Component::Prometheus => &["prometheus"],
        };
        names.iter().map(|name| name.to_string()).collect()
    }

    fn stamp_path(self, root: &Path) -> PathBuf {
        root.join("stamps").join(self.name())
    }

    /// Everything that decides what this component's build produces: when it changes, it is
    /// rebuilt.
    fn stamp(self, versions: &Versions) -> String {
        let inputs = match self {
            Component::Kubernetes | Component::KubernetesNode => {
                format!("{}\n{}", versions.kubernetes, kube_ldflags(versions))
            }
            Component::Etcd => format!("{}\n{ETCD_MAIN_GO}", versions.etcd),
            Component::Helm => format!("{}\n{}", versions.helm, helm_ldflags(versions)),
            Component::Containerd => format!(
                "{}\n{CONTAINERD_TAGS}\n{}",
                versions.containerd,
                containerd_ldflags(versions)
            ),
            Component::CniPlugins => {
                format!("{}\n{}", versions.cni_plugins, CNI_PLUGINS.join(" "))
            }
            Component::CoreDns => format!("{}\n{COREDNS_MAIN_GO}", versions.coredns),
            Component::Crictl => versions.crictl.clone(),
            Component::Pause => PAUSE_MAIN_GO.to_string(),
            Component::Prometheus => {
                format!("{}\n{PROMETHEUS_TAGS}", versions.prometheus)
            }
        };
        format!("{BUILD_RECIPE}\n{inputs}\n")
    }
}

/// `bridge` from `main/bridge`.
fn plugin_name(plugin: &str) -> &str {
    plugin
        .rsplit('/')
        .next()
        .expect("split yields at least one part")
}

struct Builder<'a> {
    root: &'a Path,
    versions: &'a Versions,
    cache: PathBuf,
    log_path: PathBuf,
    /// Extra `GOEXPERIMENT` settings this Go needs (see [`go_experiments_for`]).
    go_experiment: Option<String>,
}

impl<'a> Builder<'a> {
    fn new(root: &'a Path, versions: &'a Versions) -> Result<Self> {
        let go_version = go_version()?;
        let (major, minor) = parse_go_version(&go_version).context(|| {
            format!("cannot tell the Go version from `go env GOVERSION` = {go_version:?}")
        })?;
        if (major, minor) < (1, 26) {
            bail!(
                "building Kubernetes {} needs Go 1.26 or newer, but `go` is {go_version}",
                versions.kubernetes
            );
        }
        Ok(Builder {
            root,
            versions,
            cache: cache_dir()?,
            log_path: root.join("build.log"),
            go_experiment: go_experiments_for(minor),
        })
    }

    fn build(&self, components: &[Component]) -> Result<()> {
        let started = Instant::now();
        let versions = self.versions;
        let names: Vec<String> = components
            .iter()
            .map(|component| component.description(versions))
            .collect();
        progress(&format!(
            "building the test cluster's binaries: {}; about 10 minutes on 2 cores for the API \
             server and 6 more for the node when nothing is cached. Go's output goes to {}",
            names.join(", "),
            self.log_path.display()
        ));
        // A fresh log per build, so that its tail is about this build.
        File::create(&self.log_path).context(|| format!("creating {}", self.log_path.display()))?;
        let bin = self.root.join("bin");
        fs::create_dir_all(&bin).context(|| format!("creating {}", bin.display()))?;

        for &component in components {
            let stamp_path = component.stamp_path(self.root);
            remove_if_exists(&stamp_path)?;
            match component {
                Component::Kubernetes => self.build_kubernetes(&bin, "kube", &KUBE_COMMANDS)?,
                Component::KubernetesNode => {
                    self.build_kubernetes(&bin, "kube-node", &KUBE_NODE_COMMANDS)?
                }
                Component::Etcd => self.build_main(
                    &bin,
                    "etcd",
                    Some(("go.etcd.io/etcd/server/v3", &versions.etcd)),
                    ETCD_MAIN_GO,
                    "outrigger-etcd",
                )?,
                Component::Helm => self.build_helm(&bin)?,
                Component::Containerd => self.build_containerd(&bin)?,
                Component::CniPlugins => self.build_cni_plugins(&bin.join(CNI_DIR))?,
                Component::CoreDns => self.build_main(
                    &bin,
                    "coredns",
                    Some(("github.com/coredns/coredns", &versions.coredns)),
                    COREDNS_MAIN_GO,
                    "coredns",
                )?,
                Component::Crictl => self.install(
                    &bin,
                    &[format!(
                        "sigs.k8s.io/cri-tools/cmd/crictl@{}",
                        versions.crictl
                    )],
                    "",
                    &format!(
                        "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version={}",
                        versions.crictl
                    ),
                )?,
                Component::Pause => {
                    self.build_main(&bin, "pause", None, PAUSE_MAIN_GO, "outrigger-pause")?
                }
                Component::Prometheus => self.install(
                    &bin,
                    &[format!(
                        "github.com/prometheus/prometheus/cmd/prometheus@{}",
                        versions.prometheus
                    )],
                    PROMETHEUS_TAGS,
                    &format!(
                        "-s -w -X github.com/prometheus/common/version.Version={}",
                        versions.prometheus_release()
                    ),
                )?,
            }
            for binary in component.binaries() {
                if !bin.join(&binary).is_file() {
                    bail!(
                        "the build finished but {} is missing",
                        bin.join(&binary).display()
                    );
                }
            }
            fs::write(&stamp_path, component.stamp(versions))
                .context(|| format!("writing {}", stamp_path.display()))?;
        }
        progress(&format!(
            "built the test cluster's binaries into {} in {}",
            bin.display(),
            format_duration(started.elapsed())
        ));
        Ok(())
    }

    /// Builds `commands` of `k8s.io/kubernetes` from the generated module `src/<module>`.
    fn build_kubernetes(&self, bin: &Path, module: &str, commands: &[&str]) -> Result<()> {
        let module = self.write_kube_module(module, commands)?;
        self.run_go(
            "resolving the Kubernetes modules",
            &module,
            &["mod", "tidy"],
        )?;
        let mut build = vec!["build".to_string(), "-o".into(), path_arg(bin)?];
        build.extend(common_build_flags(&kube_ldflags(self.versions)));
        build.extend(
            commands
                .iter()
                .map(|command| format!("k8s.io/kubernetes/cmd/{command}")),
        );
        self.run_go(
            &format!("compiling {} (the slow part)", commands.join(", ")),
            &module,
            &build,
        )
    }

    /// containerd and ctr, then the shim, which containerd's release builds without gRPC.
    fn build_containerd(&self, bin: &Path) -> Result<()> {
        let package = |command: &str| {
            format!(
                "github.com/containerd/containerd/v2/cmd/{command}@{}",
                self.versions.containerd
            )
        };
        let ldflags = containerd_ldflags(self.versions);
        self.install(
            bin,
            &[package("containerd"), package("ctr")],
            CONTAINERD_TAGS,
            &ldflags,
        )?;
        self.install(
            bin,
            &[package("containerd-shim-runc-v2")],
            &format!("{CONTAINERD_TAGS},no_grpc"),
            &ldflags,
        )
    }

    fn build_cni_plugins(&self, cni_bin: &Path) -> Result<()> {
        fs::create_dir_all(cni_bin).context(|| format!("creating {}", cni_bin.display()))?;
        let packages: Vec<String> = CNI_PLUGINS
            .iter()
            .map(|plugin| {
                format!(
                    "github.com/containernetworking/plugins/plugins/{plugin}@{}",
                    self.versions.cni_plugins
                )
            })
            .collect();
        self.install(
            cni_bin,
            &packages,
            "",
            &format!(
                "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion={}",
                self.versions.cni_plugins
            ),
        )
    }

    /// `go install` of released `packages` (`path@version`, all of one module) into `dir`: a
    /// module without local replacements builds with exactly the dependencies it releases with.
    fn install(&self, dir: &Path, packages: &[String], tags: &str, ldflags: &str) -> Result<()> {
        let mut install = vec!["install".to_string()];
        if !tags.is_empty() {
            install.push(format!("-tags={tags}"));
        }
        install.extend(common_build_flags(ldflags));
        install.extend(packages.iter().cloned());
        let mut command = self.go(self.root, &install);
        command.env("GOBIN", dir);
        let names: Vec<&str> = packages
            .iter()
            .filter_map(|package| package.split('@').next()?.rsplit('/').next())
            .collect();
        self.run_step(&format!("compiling {}", names.join(", ")), command)
    }

    /// Builds `bin/<output>` from a `main.go` of ours, in a generated module `src/<name>` that
    /// requires `requires` (`module version`), if anything.
    fn build_main(
        &self,
        bin: &Path,
        name: &str,
        requires: Option<(&str, &str)>,
        main_go: &str,
        output: &str,
    ) -> Result<()> {
        let mut go_mod = format!(
            "// Generated by the outrigger-cluster crate from tests/cluster/versions.env; do not edit.\n\
             module outrigger.dev/test-cluster/{name}\n\n\
             go 1.26.0\n"
        );
        if let Some((module, version)) = requires {
            go_mod.push_str(&format!("\nrequire {module} {version}\n"));
        }
        let module = self.write_module(name, &go_mod, Some(main_go))?;
        if requires.is_some() {
            self.run_go(
                &format!("resolving the {name} modules"),
                &module,
                &["mod", "tidy"],
            )?;
        }
        let mut build = vec![
            "build".to_string(),
            "-o".into(),
            path_arg(&bin.join(output))?,
        ];
        build.extend(common_build_flags("-s -w"));
        build.push(".".into());
        self.run_go(&format!("compiling {name}"), &module, &build)
    }

    fn build_helm(&self, bin: &Path) -> Result<()> {
        self.install(
            bin,
            &[format!("helm.sh/helm/v3/cmd/helm@{}", self.versions.helm)],
            "",
            &helm_ldflags(self.versions),
        )
    }

    /// A module `src/<name>` that requires `k8s.io/kubernetes`, names `commands` as its tools and
    /// points every staging module Kubernetes replaces with a local path at the released staging
    /// module of the same version.
    fn write_kube_module(&self, name: &str, commands: &[&str]) -> Result<PathBuf> {
        let versions = self.versions;
        let upstream = self.upstream_kubernetes_go_mod()?;
        let staging_modules = staging_modules(&upstream);
        if staging_modules.is_empty() {
            bail!(
                "found no `k8s.io/... => ./staging/...` replacements in k8s.io/kubernetes@{}'s go.mod",
                versions.kubernetes
            );
        }
        let mut go_mod = String::from(
            "// Generated by the outrigger-cluster crate from tests/cluster/versions.env; do not edit.\n\
             module outrigger.dev/test-cluster/kube\n\n",
        );
        // The same language version and GODEBUG defaults Kubernetes itself is built with.
        for line in upstream.lines() {
            if line.starts_with("go ") || line.starts_with("godebug ") {
                go_mod.push_str(line);
                go_mod.push('\n');
            }
        }
        go_mod.push_str(&format!(
            "\nrequire k8s.io/kubernetes {}\n\ntool (\n",
            versions.kubernetes
        ));
        for command in commands {
            go_mod.push_str(&format!("\tk8s.io/kubernetes/cmd/{command}\n"));
        }
        go_mod.push_str(")\n\nreplace (\n");
        let staging_version = versions.kubernetes_staging();
        for module in staging_modules {
            go_mod.push_str(&format!("\t{module} => {module} {staging_version}\n"));
        }
        go_mod.push_str(")\n");
        self.write_module(name, &go_mod, None)
    }

    /// Writes `src/<name>/go.mod` (and `main.go`), keeping a go.sum from an earlier build only
    /// when the go.mod is unchanged.
    fn write_module(&self, name: &str, go_mod: &str, main_go: Option<&str>) -> Result<PathBuf> {
        let dir = self.root.join("src").join(name);
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let go_mod_path = dir.join("go.mod");
        if read_to_string_if_exists(&go_mod_path)?.as_deref() != Some(go_mod) {
            remove_if_exists(&dir.join("go.sum"))?;
            fs::write(&go_mod_path, go_mod)
                .context(|| format!("writing {}", go_mod_path.display()))?;
        }
        if let Some(main_go) = main_go {
            let main_path = dir.join("main.go");
            fs::write(&main_path, main_go)
                .context(|| format!("writing {}", main_path.display()))?;
        }
        Ok(dir)
    }

    /// The go.mod of `k8s.io/kubernetes` at the pinned version, fetched through the module proxy.
    fn upstream_kubernetes_go_mod(&self) -> Result<String> {
        let module = format!("k8s.io/kubernetes@{}", self.versions.kubernetes);
        let mut command = self.go(self.root, &["list", "-m", "-json", &module]);
        let output = command
            .output()
            .context(|| format!("running go list -m -json {module}"))?;
        if !output.status.success() {
            bail!(
                "go list -m -json {module} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let json = String::from_utf8_lossy(&output.stdout);
        let go_mod_path = json_string_field(&json, "GoMod")
            .context(|| format!("go list -m -json {module} printed no GoMod path: {json}"))?;
        fs::read_to_string(&go_mod_path).context(|| format!("reading {go_mod_path}"))
    }

    /// `go` with the cache, module cache and toolchain settings every step shares.
    fn go(&self, dir: &Path, args: &[impl AsRef<str>]) -> Command {
        let mut command = Command::new("go");
        command
            .args(args.iter().map(AsRef::as_ref))
            .current_dir(dir)
            .env("GOCACHE", self.cache.join("go-build"))
            .env("GOMODCACHE", self.cache.join("go-mod"))
            // Build with the Go that is installed; never download another toolchain.
            .env("GOTOOLCHAIN", "local")
            // Static binaries, as Kubernetes releases them; no C toolchain needed.
            .env("CGO_ENABLED", "0")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-buildvcs=false");
        if let Some(experiment) = &self.go_experiment {
            let combined = match std::env::var("GOEXPERIMENT") {
                Ok(existing) if !existing.is_empty() => format!("{existing},{experiment}"),
                _ => experiment.clone(),
            };
            command.env("GOEXPERIMENT", combined);
        }
        command
    }

    fn run_go(&self, what: &str, dir: &Path, args: &[impl AsRef<str>]) -> Result<()> {
        self.run_step(what, self.go(dir, args))
    }

    /// Runs one build step with its output appended to the build log, printing a line every
    /// minute so that a CI log shows the build is alive.
    fn run_step(&self, what: &str, mut command: Command) -> Result<()> {
        let started = Instant::now();
        progress(&format!("{what}..."));
        let mut log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .context(|| format!("opening {}", self.log_path.display()))?;
        let description = describe(&command);
        writeln!(log, "\n$ {description}")
            .context(|| format!("writing {}", self.log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .context(|| format!("duplicating the handle of {}", self.log_path.display()))?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .context(|| match which_go_problem() {
                Some(problem) => problem,
                None => format!("starting {description}"),
            })?;
        let mut next_heartbeat = Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .context(|| format!("waiting for {description}"))?
            {
                break status;
            }
            if started.elapsed() >= next_heartbeat {
                progress(&format!(
                    "  still {what} ({} so far)",
                    format_duration(started.elapsed())
                ));
                next_heartbeat += Duration::from_secs(60);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !status.success() {
            bail!(
                "{what} failed: `{description}` exited with {status}; last lines of {}:\n{}",
                self.log_path.display(),
                tail_of_file(&self.log_path, 40)
            );
        }
        progress(&format!("  done in {}", format_duration(started.elapsed())));
        Ok(())
    }
}

/// `-trimpath` and the given linker flags, shared by every build.
fn common_build_flags(ldflags: &str) -> Vec<String> {
    vec!["-trimpath".into(), format!("-ldflags={ldflags}")]
}

/// Linker flags that stamp the Kubernetes version into the binaries, as Kubernetes' own build
/// does: without them `/version` reports v0.0.0, which confuses kubectl's skew check and Helm's
/// `kubeVersion` constraints.
fn kube_ldflags(versions: &Versions) -> String {
    let mut flags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        flags.push_str(&format!(
            " -X {package}.gitVersion={} -X {package}.gitMajor=1 -X {package}.gitMinor={} \
             -X {package}.gitTreeState=clean -X {package}.buildDate=1970-01-01T00:00:00Z",
            versions.kubernetes,
            versions.kubernetes_minor()
        ));
    }
    flags
}

/// containerd's version stamp, as its Makefile sets it.
fn containerd_ldflags(versions: &Versions) -> String {
    format!(
        "-s -w -X github.com/containerd/containerd/v2/version.Version={}",
        versions.containerd
    )
}

/// Helm's release flags (its Makefile): its version, and the Kubernetes version `helm template`
/// assumes when there is no cluster to ask.
fn helm_ldflags(versions: &Versions) -> String {
    let minor = versions.kubernetes_minor();
    format!(
        "-s -w -X helm.sh/helm/v3/internal/version.version={} \
         -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
         -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
         -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor} \
         -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
         -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}",
        versions.helm
    )
}

/// Go 1.27 made encoding/json v2 the default, which breaks the apiserver's OpenAPI handler
/// ("$root has invalid property: Extensions") so that kubectl cannot apply anything; the
/// `nojsonv2` experiment restores the old behaviour.
fn go_experiments_for(go_minor: u32) -> Option<String> {
    (go_minor >= 27).then(|| "nojsonv2".to_string())
}

fn go_version() -> Result<String> {
    let output = Command::new("go")
        .args(["env", "GOVERSION"])
        .env("GOTOOLCHAIN", "local")
        .output()
        .context(|| {
            which_go_problem().unwrap_or_else(|| "running `go env GOVERSION`".to_string())
        })?;
    if !output.status.success() {
        bail!(
            "`go env GOVERSION` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Explains a missing `go`, which is the usual reason the build cannot start.
fn which_go_problem() -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("go").is_file()))
        .unwrap_or(false);
    (!on_path).then(|| {
        "`go` is not on PATH: the test cluster's binaries are built from source with Go 1.26 or \
         newer (install it, e.g. `apt-get install golang`, or from go.dev)"
            .to_string()
    })
}

/// `(1, 26)` from `go1.26.8`, `go1.27rc1` or `devel go1.27-abcdef ...`.
fn parse_go_version(version: &str) -> Option<(u32, u32)> {
    let start = version.find("go1.")? + 2;
    let mut numbers = version[start..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse::<u32>());
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

/// The staging modules (`k8s.io/api`, ...) that Kubernetes' go.mod replaces with local paths.
fn staging_modules(go_mod: &str) -> Vec<&str> {
    go_mod
        .lines()
        .filter_map(|line| {
            let (module, target) = line.trim().split_once("=>")?;
            let module = module.trim();
            (module.starts_with("k8s.io/") && target.trim().starts_with("./staging/"))
                .then_some(module)
        })
        .collect()
}

/// The value of `"field": "..."` in `go list -json` output (paths only; no escapes beyond `\\`).
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":");
    let after_key = &json[json.find(&key)? + key.len()..];
    let value = after_key.trim_start().strip_prefix('"')?;
    let end = value.find('"')?;
    Some(value[..end].replace("\\\\", "\\"))
}

fn path_arg(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .context(|| format!("{} is not valid UTF-8", path.display()))
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        format!(
            "{}m{:02}s",
            duration.as_secs() / 60,
            duration.as_secs() % 60
        )
    }
}

fn read_to_string_if_exists(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).context(|| format!("reading {}", path.display())),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_parse_and_select_the_json_experiment() {
        assert_eq!(parse_go_version("go1.26.8"), Some((1, 26)));
        assert_eq!(parse_go_version("go1.27rc1"), Some((1, 27)));
        assert_eq!(parse_go_version("devel go1.28-1a2b3c Tue"), Some((1, 28)));
        assert_eq!(parse_go_version("gccgo"), None);
        assert_eq!(go_experiments_for(26), None);
        assert_eq!(go_experiments_for(27).as_deref(), Some("nojsonv2"));
    }

    #[test]
    fn staging_modules_come_from_local_replacements_only() {
        let go_mod = "replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                      \tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\
                      \tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        assert_eq!(staging_modules(go_mod), ["k8s.io/api", "k8s.io/client-go"]);
    }

    #[test]
    fn json_field_is_extracted() {
        let json = "{\n\t\"Path\": \"k8s.io/kubernetes\",\n\t\"GoMod\": \"/c/k8s.io/kubernetes/@v/v1.36.3.mod\"\n}";
        assert_eq!(
            json_string_field(json, "GoMod").as_deref(),
            Some("/c/k8s.io/kubernetes/@v/v1.36.3.mod")
        );
        assert_eq!(json_string_field(json, "Dir"), None);
    }

    #[test]
    fn ldflags_stamp_the_pinned_versions() {
        let versions = Versions::pinned();
        let kube = kube_ldflags(&versions);
        assert!(kube.contains(&format!(
            "k8s.io/component-base/version.gitVersion={}",
            versions.kubernetes
        )));
        assert!(kube.contains(&format!("gitMinor={}", versions.kubernetes_minor())));
        assert!(helm_ldflags(&versions).contains(&format!("version.version={}", versions.helm)));
    }
}

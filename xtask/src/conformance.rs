//! `cargo xtask conformance build|run`: the mesh tests (GAMMA) of the Gateway API conformance
//! suite against Outrigger. What they apply and assert: tests/conformance/REQUIREMENTS.md.
//!
//! `build` needs no cluster. It checks tests/conformance against the pinned suite
//! (`go test ./mesh`), writes the release's CRD bundles to tests/conformance/crds/, and builds into
//! `~/.cache/outrigger/conformance/<gateway-api version>/` the suite binary
//! (`go test -c -tags cluster ./mesh`) and, for every image of tests/conformance/images.conf, its
//! root directory and image config, then checks the built binaries. Each piece is rebuilt only when
//! what it is built from changes. The pins: tests/conformance/go.mod (the suite) and images.conf.
//!
//! `run` needs a cluster whose pods run: it installs the CRDs, imports the images through a
//! callback ([`Cluster`]), installs the chart, runs the suite and copies the suite's report to
//! docs/conformance/. Given no cluster (`--kubeconfig`), it starts the real-node test cluster with
//! the images `cargo xtask images` built, and imports the suite's images into its node.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand, ValueEnum};
use outrigger_cluster::{Binaries, cache_dir, helm_environment};

use crate::workspace_root;

/// Bumped whenever the way things are built changes, so that caches built the old way are rebuilt.
const BUILD_RECIPE: &str = "outrigger conformance build recipe 1";

/// The suite's module and the module its CRD bundles come from: go.mod pins both to one release.
const SUITE_MODULE: &str = "sigs.k8s.io/gateway-api/conformance";
const API_MODULE: &str = "sigs.k8s.io/gateway-api";

/// Who the report says ran the suite (the suite refuses to write a report without all of them).
const ORGANIZATION: &str = "outrigger-dev";
const PROJECT: &str = "outrigger";
const URL: &str = "https://github.com/outrigger-dev/outrigger";
const CONTACT: &str = "https://github.com/outrigger-dev/outrigger/issues";

/// The label that meshes a namespace's pods (controller/src/inject.rs).
const INJECT_LABEL: &str = "outrigger.dev/inject=enabled";

#[derive(Subcommand)]
pub enum Action {
    /// Builds the suite binary and the contents of the images its mesh tests deploy (cached),
    /// after checking tests/conformance against the pinned suite.
    Build,
    /// Runs the suite against a cluster whose pods run and writes its report to docs/conformance/.
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Admin kubeconfig of a cluster whose pods run. Without it, `run` starts the real-node test
    /// cluster itself (needs root and `cargo xtask images`), imports the images into its node,
    /// and stops it after the run.
    #[arg(long, requires = "import_command")]
    kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: imports one image into every node's container runtime; run through
    /// `sh -c` with two more arguments: the image reference and a directory holding `rootfs/`
    /// and `config.json` (the OCI image config, without `rootfs`).
    #[arg(long, requires = "kubeconfig")]
    import_command: Option<String>,
    #[command(flatten)]
    options: RunOptions,
}

/// How `run` runs the suite.
#[derive(Args, Debug, Clone)]
pub struct RunOptions {
    /// The CRD bundle to install.
    #[arg(long, value_enum, default_value_t = Channel::Standard)]
    pub channel: Channel,
    /// Helm values for the chart (`--set` syntax), e.g. where Outrigger's own images are.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub chart_values: Vec<String>,
    /// Runs only these mesh tests (repeated, or comma-separated), leaving the others out as the
    /// suite's --skip-tests would; docs/conformance/ is then left alone.
    #[arg(long = "run-test", value_delimiter = ',')]
    pub run_tests: Vec<String>,
    /// Leaves the suite's namespaces and test resources in the cluster, for looking at afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Whether a full run's report goes to docs/conformance/ (CI's runs leave it alone).
    #[arg(skip = true)]
    pub record: bool,
}

/// A Gateway API release channel.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Standard,
    Experimental,
}

impl Channel {
    const ALL: [Channel; 2] = [Channel::Standard, Channel::Experimental];

    fn name(self) -> &'static str {
        match self {
            Channel::Standard => "standard",
            Channel::Experimental => "experimental",
        }
    }
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Build => build().map(|_| ()),
        Action::Run(args) => match (&args.kubeconfig, &args.import_command) {
            (Some(kubeconfig), Some(command)) => {
                let mut import = |image: &ImageContents| import_with(command, image);
                run_suite(
                    Cluster {
                        kubeconfig,
                        import_image: &mut import,
                    },
                    &args.options,
                )
            }
            _ => run_on_the_test_cluster(&args.options),
        },
    }
}

/// Imports an image by running the user's command.
fn import_with(command: &str, image: &ImageContents) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{command} \"$@\""))
        .arg("sh")
        .arg(&image.reference)
        .arg(&image.dir)
        .status()
        .with_context(|| format!("running the import command for {}", image.reference))?;
    ensure!(
        status.success(),
        "importing {} with `{command} {} {}` failed: {status}",
        image.reference,
        image.reference,
        image.dir.display()
    );
    Ok(())
}

/// Starts the real-node test cluster with Outrigger's images, runs the suite on it, stops it.
pub fn run_on_the_test_cluster(options: &RunOptions) -> Result<()> {
    let archives = crate::images::built_archives()?;
    ensure!(
        !archives.is_empty(),
        "no images of Outrigger's built yet: run `cargo xtask images` first"
    );
    progress("starting the test cluster with its node");
    let cluster = outrigger_cluster::Cluster::builder()
        .node(true)
        .images(archives)
        .start()
        .context("starting the test cluster")?;
    let mut import = |image: &ImageContents| {
        let config = fs::read_to_string(image.dir.join("config.json"))
            .with_context(|| format!("reading {}", image.dir.join("config.json").display()))?;
        // Beside what it is made of, in the cache; rewritten on every run.
        let archive = image.dir.join("docker-archive.tar");
        outrigger_cluster::Image::from_root(&image.reference, &image.dir.join("rootfs"), &config)
            .and_then(|built| built.write_docker_archive(&archive))
            .and_then(|()| cluster.import_image(&archive))
            .map_err(anyhow::Error::from)
    };
    run_suite(
        Cluster {
            kubeconfig: cluster.kubeconfig(),
            import_image: &mut import,
        },
        options,
    )
}

/// What `run` needs from a cluster whose pods run.
pub struct Cluster<'a> {
    /// Admin kubeconfig.
    pub kubeconfig: &'a Path,
    /// Makes an image's contents available to every node's container runtime under
    /// `image.reference` (the pods ask for it with `imagePullPolicy: IfNotPresent`).
    pub import_image: &'a mut dyn FnMut(&ImageContents) -> Result<()>,
}

/// Everything `build` made.
#[derive(Debug)]
pub struct Built {
    /// The pinned release, e.g. `v1.6.3`.
    pub version: String,
    /// The suite as a test binary.
    pub suite: PathBuf,
    pub images: Vec<ImageContents>,
}

/// One built image: what an image writer packs and imports.
#[derive(Debug, Clone)]
pub struct ImageContents {
    /// The name:tag the suite's manifests ask for.
    pub reference: String,
    /// Holds `rootfs/`, the image's files (to be owned by root; binaries 0755, files 0644), and
    /// `config.json`, the OCI image config without `rootfs`: one JSON object on one line whose
    /// last `}` a writer replaces with `,"rootfs":{"type":"layers","diff_ids":[...]}}`.
    pub dir: PathBuf,
}

/// Builds, once, everything the suite needs that can be built without a cluster.
pub fn build() -> Result<Built> {
    let started = Instant::now();
    let suite_dir = workspace_root().join("tests/conformance");
    let go = Go::new(&suite_dir)?;
    progress("checking tests/conformance against the pinned suite (go test ./mesh)");
    go.run(
        "checking tests/conformance against the pinned suite",
        &suite_dir,
        // -trimpath like the suite binary's build, which then reuses what this compiled.
        &["test", "-trimpath", "./mesh"],
    )?;
    let modules = go.output(
        &suite_dir,
        &[
            "list",
            "-m",
            "-f",
            "{{.Path}} {{.Version}} {{.Dir}}",
            API_MODULE,
            SUITE_MODULE,
        ],
    )?;
    let (version, api_dir) = pinned_release(&modules)?;
    write_crd_bundles(&api_dir, &version, &suite_dir.join("crds"))?;

    let root = cache_dir()?.join("conformance").join(&version);
    fs::create_dir_all(root.join("stamps"))
        .with_context(|| format!("creating {}", root.join("stamps").display()))?;
    let lock_path = root.join("build.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        progress(&format!(
            "waiting for another build to finish (lock {})",
            lock_path.display()
        ));
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    let go = go.logging_to(root.join("build.log"))?;

    let suite = root.join("mesh-conformance.test");
    let stamp = suite_stamp(&suite_dir, &go.version)?;
    if !is_current(&root, "suite", &stamp, &[&suite])? {
        progress("building the suite binary (go test -c -tags cluster ./mesh)");
        go.run(
            "building the suite binary",
            &suite_dir,
            &[
                "test",
                "-c",
                "-tags",
                "cluster",
                "-trimpath",
                "-o",
                path_arg(&suite)?,
                "./mesh",
            ],
        )?;
        write_stamp(&root, "suite", &stamp)?;
    }

    let conf = suite_dir.join("images.conf");
    let text = fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let specs = parse_images(&text).with_context(|| format!("in {}", conf.display()))?;
    let mut images = Vec::new();
    for spec in &specs {
        images.push(build_image(&go, &root, &suite_dir, spec)?);
    }
    progress(&format!(
        "built the suite binary and {} image(s) into {} ({})",
        images.len(),
        root.display(),
        format_duration(started.elapsed())
    ));
    Ok(Built {
        version,
        suite,
        images,
    })
}

/// Installs the CRDs, imports the images, installs the chart, runs the suite and, for a full
/// run, copies its report and the outcome of every mesh test to docs/conformance/.
pub fn run_suite(cluster: Cluster<'_>, options: &RunOptions) -> Result<()> {
    let built = build()?;
    let tools = Binaries::ensure_built()?;
    let run_dir = cache_dir()?
        .join("conformance")
        .join(&built.version)
        .join("runs")
        .join(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("reading the clock")?
                .as_secs()
                .to_string(),
        );
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let kubeconfig = path_arg(cluster.kubeconfig)?;

    let bundle = crd_bundle(
        &workspace_root().join("tests/conformance/crds"),
        options.channel,
    );
    progress(&format!("installing {}", bundle.display()));
    let applied = command_output(
        Command::new(tools.kubectl())
            .args([
                "--kubeconfig",
                kubeconfig,
                "apply",
                "--server-side",
                "--force-conflicts",
            ])
            .args(["-o", "name", "-f", path_arg(&bundle)?]),
    )?;
    let crds: Vec<&str> = applied
        .lines()
        .filter(|line| line.starts_with("customresourcedefinition"))
        .collect();
    command_output(
        Command::new(tools.kubectl())
            .args([
                "--kubeconfig",
                kubeconfig,
                "wait",
                "--for=condition=Established",
            ])
            .args(["--timeout=60s"])
            .args(&crds),
    )?;

    for image in &built.images {
        progress(&format!("importing {}", image.reference));
        (cluster.import_image)(image).with_context(|| format!("importing {}", image.reference))?;
    }

    progress("installing the chart (helm upgrade --install --wait)");
    let mut helm = Command::new(tools.helm());
    helm.envs(helm_environment(&run_dir, cluster.kubeconfig))
        .args(["upgrade", "--install", "outrigger"])
        .arg(workspace_root().join("charts/outrigger"))
        .args([
            "--namespace",
            "outrigger-system",
            "--create-namespace",
            "--wait",
        ])
        .args(["--timeout", "5m"])
        // A pod that missed the injector would run unmeshed and fail tests for the wrong reason.
        .args(["--set", "injector.failurePolicy=Fail"]);
    for value in &options.chart_values {
        helm.args(["--set", value]);
    }
    command_output(&mut helm)?;

    let report = run_dir.join("report.yaml");
    let outcomes = run_dir.join("outcomes.yaml");
    let log = run_dir.join("suite.log");
    let args = suite_args(
        cluster.kubeconfig,
        &report,
        &outcomes,
        options,
        &implementation_version()?,
    );
    progress(&format!(
        "running the suite; its output goes to {} too",
        log.display()
    ));
    let passed = run_teeing(Command::new(&built.suite).args(&args), &log)?;

    if options.run_tests.is_empty() && options.record {
        let docs = workspace_root().join("docs/conformance");
        for (from, name) in [(&report, "mesh-report"), (&outcomes, "mesh-outcomes")] {
            // A failed run may have stopped before writing them; a passed one has both.
            if passed || from.is_file() {
                let to = docs.join(format!("gateway-api-{}-{name}.yaml", built.version));
                fs::copy(from, &to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
                progress(&format!("wrote {}", to.display()));
            }
        }
    }
    ensure!(
        passed,
        "the suite failed; its output is in {}",
        log.display()
    );
    Ok(())
}

/// The suite binary's arguments. The Go side (tests/conformance/mesh) chooses the profiles and
/// features; these are what depends on the run.
fn suite_args(
    kubeconfig: &Path,
    report: &Path,
    outcomes: &Path,
    options: &RunOptions,
    version: &str,
) -> Vec<String> {
    let mut args = vec![
        "-test.run=^TestMesh$".to_string(),
        "-test.v".into(),
        // The mesh tests wait up to 300 s for pods and 30 s per expectation; go test's default
        // of 10 minutes is too short for all 22.
        "-test.timeout=90m".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--namespace-labels={INJECT_LABEL}"),
        format!("--report-output={}", report.display()),
        format!("-outrigger.outcomes-output={}", outcomes.display()),
        format!("--organization={ORGANIZATION}"),
        format!("--project={PROJECT}"),
        format!("--url={URL}"),
        format!("--version={version}"),
        format!("--contact={CONTACT}"),
        format!("--cleanup-base-resources={}", !options.keep),
        format!("--cleanup-test-resources={}", !options.keep),
    ];
    if !options.run_tests.is_empty() {
        args.push(format!("-outrigger.only={}", options.run_tests.join(",")));
    }
    args
}

/// `v0.1.0-<commit>`, with `-dirty` when the working tree has changes: the report names the
/// commit it was made for.
fn implementation_version() -> Result<String> {
    let git = |args: &[&str]| {
        command_output(Command::new("git").args(args).current_dir(workspace_root()))
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain"])?.trim().is_empty();
    Ok(format!(
        "v{}-{}{}",
        env!("CARGO_PKG_VERSION"),
        commit.trim(),
        if dirty { "-dirty" } else { "" }
    ))
}

/// The release both modules are pinned to, and the API module's directory, from
/// `go list -m -f '{{.Path}} {{.Version}} {{.Dir}}' <API_MODULE> <SUITE_MODULE>`.
fn pinned_release(go_list: &str) -> Result<(String, PathBuf)> {
    let mut api = None;
    let mut suite = None;
    for line in go_list.lines().filter(|line| !line.trim().is_empty()) {
        let mut fields = line.splitn(3, ' ');
        let (Some(path), Some(version), Some(dir)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("unexpected `go list -m` line {line:?}: expected PATH VERSION DIR");
        };
        match path {
            API_MODULE => api = Some((version.to_string(), PathBuf::from(dir))),
            SUITE_MODULE => suite = Some(version.to_string()),
            other => bail!("`go list -m` named the unexpected module {other}"),
        }
    }
    let (version, dir) = api.with_context(|| format!("go.mod does not select {API_MODULE}"))?;
    let suite = suite.with_context(|| format!("go.mod does not select {SUITE_MODULE}"))?;
    ensure!(
        version == suite,
        "tests/conformance/go.mod selects {API_MODULE} {version} but {SUITE_MODULE} {suite}: \
         pin both to one release (the suite checks the CRDs' bundle version against its own)"
    );
    Ok((version, dir))
}

fn crd_bundle(dir: &Path, channel: Channel) -> PathBuf {
    dir.join(format!("{}.yaml", channel.name()))
}

/// Writes `<dir>/<channel>.yaml` for both channels: the release's `config/crd/<channel>/*.yaml`
/// (the CRDs and the safe-upgrades admission policy) as one multi-document file.
fn write_crd_bundles(api_dir: &Path, version: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for channel in Channel::ALL {
        let source = api_dir.join("config/crd").join(channel.name());
        let mut files: Vec<PathBuf> = fs::read_dir(&source)
            .with_context(|| format!("listing {}", source.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", source.display()))?;
        files.retain(|file| {
            file.extension().is_some_and(|ext| ext == "yaml")
                && !file.ends_with("kustomization.yaml")
        });
        files.sort();
        let mut bundle = format!(
            "# Generated by `cargo xtask conformance build` from {API_MODULE}@{version} \
             config/crd/{}/; do not edit.\n",
            channel.name()
        );
        for file in &files {
            let text =
                fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            bundle.push_str("---\n");
            bundle.push_str(text.trim_end());
            bundle.push('\n');
        }
        let target = crd_bundle(dir, channel);
        if read_if_exists(&target)?.as_deref() != Some(bundle.as_str()) {
            fs::write(&target, &bundle).with_context(|| format!("writing {}", target.display()))?;
            progress(&format!(
                "wrote {} ({} files)",
                target.display(),
                files.len()
            ));
        }
    }
    Ok(())
}

/// Everything the suite binary is built from.
fn suite_stamp(suite_dir: &Path, go_version: &str) -> Result<String> {
    let mut stamp = format!("{BUILD_RECIPE}\n{go_version}\n");
    let mut files = vec![suite_dir.join("go.mod"), suite_dir.join("go.sum")];
    let mesh = suite_dir.join("mesh");
    let mut sources: Vec<PathBuf> = fs::read_dir(&mesh)
        .with_context(|| format!("listing {}", mesh.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", mesh.display()))?;
    sources.retain(|file| file.extension().is_some_and(|ext| ext == "go"));
    sources.sort();
    files.extend(sources);
    for file in files {
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        stamp.push_str(&format!("== {}\n{text}", file.display()));
    }
    Ok(stamp)
}

fn build_image(go: &Go, root: &Path, suite_dir: &Path, spec: &ImageSpec) -> Result<ImageContents> {
    let name = spec.directory_name();
    let dir = root.join("images").join(&name);
    let rootfs = dir.join("rootfs");
    let config = dir.join("config.json");
    let contents = ImageContents {
        reference: spec.reference.clone(),
        dir: dir.clone(),
    };
    let stamp = format!("{BUILD_RECIPE}\n{}\n{}", go.version, spec.text);
    let stamp_name = format!("image-{name}");
    let mut outputs = vec![config.clone()];
    outputs.extend(
        spec.binaries
            .iter()
            .chain(&spec.files)
            .map(|placed| placed.in_rootfs(&rootfs)),
    );
    if is_current(
        root,
        &stamp_name,
        &stamp,
        &outputs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )? {
        return Ok(contents);
    }
    progress(&format!("building the contents of {}", spec.reference));
    remove_dir_if_exists(&dir)?;
    let gobin = dir.join("gobin");
    fs::create_dir_all(&gobin).with_context(|| format!("creating {}", gobin.display()))?;
    let module = format!("{}@{}", spec.module.path, spec.module.version);
    go.run(
        &format!("downloading {module}"),
        &dir,
        &["mod", "download", &module],
    )?;
    let module_dir = go.output(&dir, &["list", "-m", "-f", "{{.Dir}}", &module])?;
    let module_dir = Path::new(module_dir.trim());

    let mut install = vec!["install", "-trimpath", "-ldflags=-s -w"];
    let packages: Vec<String> = spec
        .binaries
        .iter()
        .map(|binary| format!("{}@{}", binary.source, spec.module.version))
        .collect();
    install.extend(packages.iter().map(String::as_str));
    go.run_with_env(
        &format!("compiling {}", packages.join(" ")),
        &dir,
        &install,
        &[("GOBIN", gobin.as_os_str()), ("GOOS", OsStr::new("linux"))],
    )?;
    for binary in &spec.binaries {
        place(
            &gobin.join(binary.binary_name()),
            &binary.in_rootfs(&rootfs),
            0o755,
        )?;
    }
    for file in &spec.files {
        place(
            &module_dir.join(&file.source),
            &file.in_rootfs(&rootfs),
            0o644,
        )?;
    }
    remove_dir_if_exists(&gobin)?;
    let architecture = go.output(&dir, &["env", "GOARCH"])?;
    fs::write(&config, spec.config.to_json(architecture.trim()))
        .with_context(|| format!("writing {}", config.display()))?;
    if let Some(tag) = &spec.check {
        let flag = format!("-outrigger.image-rootfs={}", path_arg(&rootfs)?);
        go.run(
            &format!("checking {} (go test -tags {tag} ./mesh)", spec.reference),
            suite_dir,
            &[
                "test",
                "-trimpath",
                "-count=1",
                "-tags",
                tag,
                "./mesh",
                "-args",
                &flag,
            ],
        )?;
    }
    write_stamp(root, &stamp_name, &stamp)?;
    Ok(contents)
}

/// Copies `from` to `to` (creating its directory) with `mode`: files in the module cache are
/// read-only, and the image's files must not keep that.
fn place(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let parent = to.parent().context("an image path has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", to.display()))
}

/// One image of images.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub reference: String,
    pub module: GoModule,
    /// Binaries: `source` is a package of the module.
    pub binaries: Vec<Placed>,
    /// Files: `source` is relative to the module's root.
    pub files: Vec<Placed>,
    pub config: ImageConfig,
    /// The build tag of the tests in tests/conformance/mesh that check the built contents.
    pub check: Option<String>,
    /// The lines that define the image, which decide what is built.
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoModule {
    pub path: String,
    pub version: String,
}

/// Something put at `path` in the image from `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub path: String,
    pub source: String,
}

impl Placed {
    fn in_rootfs(&self, rootfs: &Path) -> PathBuf {
        rootfs.join(self.path.trim_start_matches('/'))
    }

    /// The name `go install` gives a package's binary: its last path element.
    fn binary_name(&self) -> &str {
        self.source.rsplit('/').next().unwrap_or(&self.source)
    }
}

/// The `config` of an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// `8080/tcp`.
    pub ports: Vec<String>,
}

impl ImageConfig {
    /// `{"architecture": ..., "os": "linux", "config": {...}}`, the OCI image config without the
    /// `rootfs` an image writer adds.
    fn to_json(&self, architecture: &str) -> String {
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|item| json_string(item)).collect();
            format!("[{}]", quoted.join(","))
        };
        let mut fields = Vec::new();
        if !self.entrypoint.is_empty() {
            fields.push(format!("\"Entrypoint\":{}", list(&self.entrypoint)));
        }
        if !self.cmd.is_empty() {
            fields.push(format!("\"Cmd\":{}", list(&self.cmd)));
        }
        if !self.env.is_empty() {
            fields.push(format!("\"Env\":{}", list(&self.env)));
        }
        if let Some(user) = &self.user {
            fields.push(format!("\"User\":{}", json_string(user)));
        }
        if let Some(workdir) = &self.workdir {
            fields.push(format!("\"WorkingDir\":{}", json_string(workdir)));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|port| format!("{}:{{}}", json_string(port)))
                .collect();
            fields.push(format!("\"ExposedPorts\":{{{}}}", ports.join(",")));
        }
        format!(
            "{{\"architecture\":{},\"os\":\"linux\",\"config\":{{{}}}}}\n",
            json_string(architecture),
            fields.join(",")
        )
    }
}

impl ImageSpec {
    /// The reference as a directory name: `registry.k8s.io_gateway-api_echo-advanced_v1.5.1`.
    fn directory_name(&self) -> String {
        self.reference
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// Parses images.conf (its header describes the format).
fn parse_images(text: &str) -> Result<Vec<ImageSpec>> {
    let mut images: Vec<ImageSpec> = Vec::new();
    let mut module: Option<GoModule> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&keyword, args)) = words.split_first() else {
            continue;
        };
        if keyword.starts_with('#') {
            continue;
        }
        let one = || -> Result<String> {
            match args {
                [arg] => Ok(arg.to_string()),
                _ => bail!(
                    "line {number}: `{keyword}` takes one argument, got {}",
                    args.len()
                ),
            }
        };
        let placed = || -> Result<Placed> {
            match args {
                [path, source] if path.starts_with('/') => Ok(Placed {
                    path: path.to_string(),
                    source: source.to_string(),
                }),
                _ => bail!(
                    "line {number}: `{keyword}` takes an absolute path in the image and a source"
                ),
            }
        };
        if keyword == "image" {
            if let Some(done) = images.last_mut() {
                finish_image(done, module.take())?;
            }
            let reference = one()?;
            let tagged = reference
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'));
            ensure!(
                tagged && !reference.contains('@'),
                "line {number}: {reference} is not a name:tag reference"
            );
            ensure!(
                !images.iter().any(|image| image.reference == reference),
                "line {number}: {reference} is defined twice"
            );
            images.push(ImageSpec {
                reference,
                module: GoModule {
                    path: String::new(),
                    version: String::new(),
                },
                binaries: Vec::new(),
                files: Vec::new(),
                config: ImageConfig::default(),
                check: None,
                text: String::new(),
            });
        }
        let image = images
            .last_mut()
            .with_context(|| format!("line {number}: `{keyword}` before the first `image` line"))?;
        image.text.push_str(line.trim());
        image.text.push('\n');
        let config = &mut image.config;
        match keyword {
            "image" => {}
            "module" => match args {
                [path, version] if module.is_none() => {
                    module = Some(GoModule {
                        path: path.to_string(),
                        version: version.to_string(),
                    })
                }
                [_, _] => bail!("line {number}: a second `module` for {}", image.reference),
                _ => bail!("line {number}: `module` takes a module path and a version"),
            },
            "binary" => image.binaries.push(placed()?),
            "file" => {
                let file = placed()?;
                ensure!(
                    !file.source.starts_with('/')
                        && !file.source.split('/').any(|part| part == ".."),
                    "line {number}: {} must be a path inside the module",
                    file.source
                );
                image.files.push(file);
            }
            "entrypoint" | "cmd" if args.is_empty() => {
                bail!("line {number}: `{keyword}` takes at least one argument")
            }
            "entrypoint" => config
                .entrypoint
                .extend(args.iter().map(|arg| arg.to_string())),
            "cmd" => config.cmd.extend(args.iter().map(|arg| arg.to_string())),
            "env" => {
                let env = one()?;
                ensure!(
                    env.contains('='),
                    "line {number}: `env` takes NAME=value, got {env}"
                );
                config.env.push(env);
            }
            "user" => config.user = Some(one()?),
            "workdir" => config.workdir = Some(one()?),
            "port" => {
                let port = one()?;
                let valid = port.split_once('/').is_some_and(|(number, protocol)| {
                    number.parse::<u16>().is_ok() && (protocol == "tcp" || protocol == "udp")
                });
                ensure!(
                    valid,
                    "line {number}: `port` takes <number>/tcp or <number>/udp, got {port}"
                );
                config.ports.push(port);
            }
            "check" => image.check = Some(one()?),
            other => bail!("line {number}: unknown keyword `{other}`"),
        }
    }
    match images.last_mut() {
        Some(last) => finish_image(last, module)?,
        None => bail!("no `image` line"),
    }
    Ok(images)
}

/// Checks a complete image definition and gives it its module.
fn finish_image(image: &mut ImageSpec, module: Option<GoModule>) -> Result<()> {
    let reference = &image.reference;
    image.module = module.with_context(|| format!("{reference} has no `module` line"))?;
    ensure!(
        !image.binaries.is_empty() || !image.files.is_empty(),
        "{reference} has neither a `binary` nor a `file`"
    );
    ensure!(
        !image.config.entrypoint.is_empty() || !image.config.cmd.is_empty(),
        "{reference} has neither an `entrypoint` nor a `cmd`"
    );
    for binary in &image.binaries {
        ensure!(
            binary.source == image.module.path
                || binary
                    .source
                    .starts_with(&format!("{}/", image.module.path)),
            "{reference}: {} is not a package of {}",
            binary.source,
            image.module.path
        );
    }
    let mut names: Vec<&str> = image.binaries.iter().map(Placed::binary_name).collect();
    names.sort_unstable();
    ensure!(
        names.windows(2).all(|pair| pair[0] != pair[1]),
        "{reference}: two binaries with the same package name, which go install would overwrite"
    );
    let program = image.config.entrypoint.first().or(image.config.cmd.first());
    ensure!(
        program.is_some_and(|program| paths_placed(image).any(|path| path == program)),
        "{reference}: the program it starts, {}, is not one of its `binary` or `file` paths",
        program.map_or("", String::as_str)
    );
    let mut paths: Vec<&str> = paths_placed(image).collect();
    paths.sort_unstable();
    ensure!(
        paths.windows(2).all(|pair| pair[0] != pair[1]),
        "{reference}: two `binary`/`file` lines put something at the same path"
    );
    Ok(())
}

/// Where the image's `binary` and `file` lines put things.
fn paths_placed(image: &ImageSpec) -> impl Iterator<Item = &str> {
    image
        .binaries
        .iter()
        .chain(&image.files)
        .map(|placed| placed.path.as_str())
}

fn json_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `go` with the cache locations and settings the test cluster's build uses
/// (tests/cluster/src/binaries.rs).
struct Go {
    cache: PathBuf,
    version: String,
    /// Where Go's output goes; until set, it is captured and shown only on failure.
    log: Option<PathBuf>,
}

impl Go {
    /// `go` as run in `dir`, which decides nothing but where `go env GOVERSION` runs.
    fn new(dir: &Path) -> Result<Go> {
        let mut go = Go {
            cache: cache_dir()?,
            version: String::new(),
            log: None,
        };
        go.version = go.output(dir, &["env", "GOVERSION"])?.trim().to_string();
        Ok(go)
    }

    /// The same, with Go's output appended to a fresh `log`.
    fn logging_to(self, log: PathBuf) -> Result<Go> {
        File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        Ok(Go {
            log: Some(log),
            ..self
        })
    }

    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("go");
        command
            .args(args)
            .current_dir(dir)
            .env("GOCACHE", self.cache.join("go-build"))
            .env("GOMODCACHE", self.cache.join("go-mod"))
            // The installed Go, never a downloaded toolchain; static binaries.
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-buildvcs=false");
        command
    }

    fn output(&self, dir: &Path, args: &[&str]) -> Result<String> {
        command_output(&mut self.command(dir, args))
    }

    fn run(&self, what: &str, dir: &Path, args: &[&str]) -> Result<()> {
        self.run_with_env(what, dir, args, &[])
    }

    fn run_with_env(
        &self,
        what: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &OsStr)],
    ) -> Result<()> {
        let started = Instant::now();
        let mut command = self.command(dir, args);
        command.envs(env.iter().copied());
        let description = format!("go {} (in {})", args.join(" "), dir.display());
        let Some(log) = &self.log else {
            command_output(&mut command).with_context(|| format!("{what} failed"))?;
            return Ok(());
        };
        let mut file = OpenOptions::new()
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(file, "\n$ {description}")
            .with_context(|| format!("writing {}", log.display()))?;
        let stderr = file
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let status = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .status()
            .with_context(|| format!("starting {description} (is Go 1.26 or newer on PATH?)"))?;
        ensure!(
            status.success(),
            "{what} failed: `{description}` exited with {status}; last lines of {}:\n{}",
            log.display(),
            tail(log, 40)
        );
        progress(&format!(
            "  {what}: done in {}",
            format_duration(started.elapsed())
        ));
        Ok(())
    }
}

/// Runs `command`, returning its stdout, or an error naming it with its stderr.
fn command_output(command: &mut Command) -> Result<String> {
    let description = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {description}"))?;
    ensure!(
        output.status.success(),
        "`{description}` failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command` with its stdout and stderr both shown and written to `log`; whether it passed.
fn run_teeing(command: &mut Command, log: &Path) -> Result<bool> {
    let description = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {description}"))?;
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let copy = |stream: Box<dyn Read + Send>, mut to: File| {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = writeln!(to, "{line}");
            }
        })
    };
    let stdout = child.stdout.take().context("the suite's stdout")?;
    let stderr = child.stderr.take().context("the suite's stderr")?;
    let copies = [
        copy(
            Box::new(stdout),
            file.try_clone()
                .with_context(|| format!("duplicating {}", log.display()))?,
        ),
        copy(Box::new(stderr), file),
    ];
    let status = child
        .wait()
        .with_context(|| format!("waiting for {description}"))?;
    for copy in copies {
        let _ = copy.join();
    }
    Ok(status.success())
}

fn is_current(root: &Path, name: &str, stamp: &str, outputs: &[&Path]) -> Result<bool> {
    Ok(
        read_if_exists(&root.join("stamps").join(name))?.as_deref() == Some(stamp)
            && outputs.iter().all(|output| output.is_file()),
    )
}

fn write_stamp(root: &Path, name: &str, stamp: &str) -> Result<()> {
    let path = root.join("stamps").join(name);
    fs::write(&path, stamp).with_context(|| format!("writing {}", path.display()))
}

fn read_if_exists(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn path_arg(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds} s"),
        _ => format!("{} min {} s", seconds / 60, seconds % 60),
    }
}

fn progress(message: &str) {
    eprintln!("xtask conformance: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_IMAGE: &str = "\
# comment
image example.org/a/echo:v1
module example.org/mod v0.1.0
binary /usr/local/bin/server example.org/mod/cmd/server
file /cert.crt certs/cert.crt
entrypoint /usr/local/bin/server --flag
env PATH=/usr/bin
user 1338
workdir /
port 8080/tcp
check echo
";

    #[test]
    fn parses_an_image_with_every_keyword() {
        let images = parse_images(ONE_IMAGE).unwrap();
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.reference, "example.org/a/echo:v1");
        assert_eq!(
            image.module,
            GoModule {
                path: "example.org/mod".into(),
                version: "v0.1.0".into()
            }
        );
        assert_eq!(image.binaries[0].binary_name(), "server");
        assert_eq!(
            image.binaries[0].in_rootfs(Path::new("/r")),
            Path::new("/r/usr/local/bin/server")
        );
        assert_eq!(image.files[0].source, "certs/cert.crt");
        assert_eq!(image.config.entrypoint, ["/usr/local/bin/server", "--flag"]);
        assert_eq!(image.check.as_deref(), Some("echo"));
        assert_eq!(image.directory_name(), "example.org_a_echo_v1");
        assert_eq!(
            image.config.to_json("amd64"),
            "{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"Entrypoint\":\
             [\"/usr/local/bin/server\",\"--flag\"],\"Env\":[\"PATH=/usr/bin\"],\"User\":\"1338\",\
             \"WorkingDir\":\"/\",\"ExposedPorts\":{\"8080/tcp\":{}}}}\n"
        );
    }

    #[test]
    fn the_stamp_text_is_per_image() {
        let two =
            format!("{ONE_IMAGE}image example.org/b:v2\nmodule m v1.0.0\nbinary /b m/b\ncmd /b\n");
        let images = parse_images(&two).unwrap();
        assert_eq!(images.len(), 2);
        assert!(
            images[0].text.starts_with("image example.org/a/echo:v1\n"),
            "{:?}",
            images[0].text
        );
        assert!(
            !images[0].text.contains("example.org/b"),
            "{:?}",
            images[0].text
        );
        assert_eq!(
            images[1].text,
            "image example.org/b:v2\nmodule m v1.0.0\nbinary /b m/b\ncmd /b\n"
        );
        assert_eq!(images[1].module.path, "m");
    }

    #[test]
    fn rejects_malformed_images_naming_the_line() {
        for (text, expected) in [
            ("module m v1\n", "line 1: `module` before the first `image`"),
            ("", "no `image` line"),
            (
                "binary /a m/a\n",
                "line 1: `binary` before the first `image`",
            ),
            ("image a/b\n", "line 1: a/b is not a name:tag"),
            ("image a/b@sha256:00\n", "not a name:tag"),
            (
                "image a:1\nmodule m v1\nbinary a m/a\ncmd /a\n",
                "line 3: `binary` takes an absolute path",
            ),
            (
                "image a:1\nmodule m v1\nfile /a ../x\ncmd /a\n",
                "line 3: ../x must be a path inside",
            ),
            (
                "image a:1\nmodule m v1\nbinary /a other/a\ncmd /a\n",
                "other/a is not a package of m",
            ),
            (
                "image a:1\nmodule m v1\nbinary /a m/x/a\nbinary /b m/y/a\ncmd /a\n",
                "same package name",
            ),
            (
                "image a:1\nmodule m v1\nbinary /a m/a\nfile /a f\ncmd /a\n",
                "at the same path",
            ),
            (
                "image a:1\nmodule m v1\nbinary /a m/a\n",
                "neither an `entrypoint` nor a `cmd`",
            ),
            (
                "image a:1\nmodule m v1\nbinary /a m/a\nentrypoint /b\n",
                "the program it starts, /b, is not one of its",
            ),
            (
                "image a:1\nbinary /a m/a\ncmd /a\n",
                "a:1 has no `module` line",
            ),
            (
                "image a:1\nmodule m v1\nmodule n v2\n",
                "line 3: a second `module`",
            ),
            (
                "image a:1\nmodule m v1\nport 80\n",
                "line 3: `port` takes <number>/tcp",
            ),
            (
                "image a:1\nmodule m v1\nenv PATH\n",
                "line 3: `env` takes NAME=value",
            ),
            (
                "image a:1\nmodule m v1\nuser 1 2\n",
                "line 3: `user` takes one argument",
            ),
            (
                "image a:1\nmodule m v1\nentrypoint\n",
                "line 3: `entrypoint` takes at least one",
            ),
            (
                "image a:1\nmodule m v1\nlabel x\n",
                "line 3: unknown keyword `label`",
            ),
            (
                "image a:1\nmodule m v1\ncmd /a\nfile /a f\nimage a:1\n",
                "line 5: a:1 is defined twice",
            ),
        ] {
            let err = parse_images(text).expect_err(text);
            assert!(format!("{err:#}").contains(expected), "{text:?}: {err:#}");
        }
    }

    #[test]
    fn the_repository_images_conf_parses() {
        let path = workspace_root().join("tests/conformance/images.conf");
        let images = parse_images(&fs::read_to_string(&path).unwrap()).unwrap();
        assert!(!images.is_empty(), "{} defines no image", path.display());
    }

    #[test]
    fn pinned_release_requires_one_version_for_both_modules() {
        let listed = format!(
            "{API_MODULE} v1.6.3 /cache/gateway-api@v1.6.3\n{SUITE_MODULE} v1.6.3 /cache/c@v1.6.3\n"
        );
        assert_eq!(
            pinned_release(&listed).unwrap(),
            (
                "v1.6.3".to_string(),
                PathBuf::from("/cache/gateway-api@v1.6.3")
            )
        );
        let mixed = format!("{API_MODULE} v1.6.3 /a\n{SUITE_MODULE} v1.6.2 /b\n");
        assert!(
            pinned_release(&mixed)
                .unwrap_err()
                .to_string()
                .contains("but sigs.k8s.io/gateway-api/conformance v1.6.2")
        );
        let missing = format!("{API_MODULE} v1.6.3 /a\n");
        assert!(
            pinned_release(&missing)
                .unwrap_err()
                .to_string()
                .contains("does not select sigs.k8s.io/gateway-api/conformance")
        );
        assert!(
            pinned_release("x v1\n")
                .unwrap_err()
                .to_string()
                .contains("PATH VERSION DIR")
        );
    }

    #[test]
    fn suite_args_mesh_the_namespaces_and_follow_the_options() {
        let options = RunOptions {
            channel: Channel::Standard,
            chart_values: vec![],
            run_tests: vec![],
            keep: false,
            record: true,
        };
        let args = suite_args(
            Path::new("/k"),
            Path::new("/r.yaml"),
            Path::new("/o.yaml"),
            &options,
            "v0.1.0-abc",
        );
        for expected in [
            "--kubeconfig=/k",
            "--namespace-labels=outrigger.dev/inject=enabled",
            "--report-output=/r.yaml",
            "-outrigger.outcomes-output=/o.yaml",
            "--version=v0.1.0-abc",
            "--cleanup-base-resources=true",
            "-test.run=^TestMesh$",
        ] {
            assert!(
                args.iter().any(|arg| arg == expected),
                "{expected} missing from {args:?}"
            );
        }
        assert!(
            !args.iter().any(|arg| arg.starts_with("-outrigger.only")),
            "{args:?}"
        );
        let focused = RunOptions {
            run_tests: vec!["MeshPorts".into(), "MeshBasic".into()],
            keep: true,
            ..options
        };
        let args = suite_args(
            Path::new("/k"),
            Path::new("/r"),
            Path::new("/o"),
            &focused,
            "v",
        );
        assert!(
            args.iter()
                .any(|arg| arg == "-outrigger.only=MeshPorts,MeshBasic"),
            "{args:?}"
        );
        assert!(
            args.iter()
                .any(|arg| arg == "--cleanup-test-resources=false"),
            "{args:?}"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd"), "\"a\\\"b\\\\c\\u000ad\"");
    }
}

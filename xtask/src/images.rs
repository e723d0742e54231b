//! `cargo xtask images`: the product's images (controller, proxy, proxy-init) and the test apps'
//! (one program that is a steerable HTTP backend, a client or a TCP echo), built from the release binaries without a
//! Docker engine, as `docker save` archives in `<target>/images/` that the test cluster's node
//! imports.
//!
//! They run like the images `docker/Dockerfile` builds (same names, entrypoints, users; a test
//! reads both): the binaries are this machine's glibc builds, so each image holds the libraries
//! they link and the ELF interpreter, and the init image holds this machine's iptables (the
//! multi-call binary, its libraries, its extension modules and `/etc/protocols`) where the
//! Dockerfile installs Alpine's. Static musl builds would need a target rustup may not be able
//! to download; these need nothing beyond `cargo build --release`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outrigger_cluster::Image;

use crate::{cargo, target_dir, workspace_root};

/// The uid the proxy runs as in its image (the chart's `proxy.uid`, the init step's
/// `--proxy-uid`); the controller's Deployment sets its own.
const PROXY_USER: &str = "2102:2102";
/// The test apps' uid: anything but the proxy's, whose traffic the redirection lets through.
const APP_USER: &str = "1000:1000";
/// The test apps' images, tagged so that kubelets never try to pull them (`imagePullPolicy:
/// Never` in the tests' manifests).
const TEST_APP_REGISTRY: &str = "localhost/outrigger-test";
const TEST_APP_TAG: &str = "dev";

/// One image: a name, and how it is put together.
pub struct ImageSpec {
    /// The archive's file name in `<target>/images/`, and the image's name after the registry.
    pub name: &'static str,
    /// The binary of `cargo build --release` it runs.
    pub binary: &'static str,
    /// Where the binary is in the image.
    pub path: &'static str,
    pub user: Option<&'static str>,
    /// After the binary.
    pub args: &'static [&'static str],
    /// Whether it holds iptables (`iptables-restore`, `iptables-save`).
    pub iptables: bool,
    /// The product's images are the chart's; the test apps' are the tests'.
    pub product: bool,
}

impl ImageSpec {
    /// `ENTRYPOINT`.
    pub fn entrypoint(&self) -> Vec<&'static str> {
        std::iter::once(self.path)
            .chain(self.args.iter().copied())
            .collect()
    }
}

pub const IMAGES: [ImageSpec; 4] = [
    ImageSpec {
        name: "controller",
        binary: "outrigger-controller",
        path: "/outrigger",
        user: Some(PROXY_USER),
        args: &[],
        iptables: false,
        product: true,
    },
    ImageSpec {
        name: "proxy",
        binary: "outrigger-proxy",
        path: "/outrigger",
        user: Some(PROXY_USER),
        args: &[],
        iptables: false,
        product: true,
    },
    // Runs as root with NET_ADMIN and NET_RAW (the injected container's securityContext).
    ImageSpec {
        name: "proxy-init",
        binary: "outrigger-proxy",
        path: "/usr/local/bin/outrigger-proxy",
        user: None,
        args: &["init"],
        iptables: true,
        product: true,
    },
    // One program plays every test app (backend, client, TCP echo), by its first argument.
    ImageSpec {
        name: "app",
        binary: "outrigger-test-app",
        path: "/outrigger-test-app",
        user: Some(APP_USER),
        args: &[],
        iptables: false,
        product: false,
    },
];

pub fn run() -> Result<()> {
    let mut build = vec!["build", "--release", "--locked"];
    for spec in &IMAGES {
        if !build.contains(&spec.binary) {
            build.extend(["--bin", spec.binary]);
        }
    }
    cargo(&build)?;
    let release = target_dir()?.join("release");
    let out = images_dir()?;
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let chart = ChartImages::read(&workspace_root().join("charts/outrigger"))?;
    for spec in &IMAGES {
        let reference = reference_of(spec, &chart);
        let archive = out.join(format!("{}.tar", spec.name));
        assemble(spec, &reference, &release.join(spec.binary))?
            .write_docker_archive(&archive)
            .with_context(|| format!("writing {}", archive.display()))?;
        let size = fs::metadata(&archive)
            .with_context(|| format!("reading {}", archive.display()))?
            .len();
        eprintln!(
            "{reference}: {} ({:.1} MiB)",
            archive.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

/// `<target>/images`, where the archives are written.
pub fn images_dir() -> Result<PathBuf> {
    Ok(target_dir()?.join("images"))
}

/// The archives `cargo xtask images` wrote, for the cluster to import.
pub fn built_archives() -> Result<Vec<PathBuf>> {
    let dir = images_dir()?;
    Ok(IMAGES
        .iter()
        .map(|spec| dir.join(format!("{}.tar", spec.name)))
        .filter(|archive| archive.is_file())
        .collect())
}

/// The image of `spec` with `binary` (a file of this machine) in it.
pub fn assemble(spec: &ImageSpec, reference: &str, binary: &Path) -> Result<Image> {
    if !binary.is_file() {
        bail!("{} is not built", binary.display());
    }
    let mut image = Image::new(reference);
    image
        .add_program(spec.path, binary)?
        .set_entrypoint(&spec.entrypoint());
    if let Some(user) = spec.user {
        image.set_user(user);
    }
    if spec.iptables {
        add_iptables(&mut image)?;
    }
    Ok(image)
}

/// This machine's `iptables-restore` and `iptables-save` and their IPv6 twins (nft or legacy,
/// whichever its alternatives choose), at their paths with the symlinks to the multi-call binary, its
/// libraries, its extension modules (loaded by name: `REDIRECT`, `owner`, `multiport`) with
/// theirs, and `/etc/protocols` (`-p tcp`).
fn add_iptables(image: &mut Image) -> Result<()> {
    for command in [
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
    ] {
        let path = find_on_path(command).with_context(|| {
            format!("{command} is not installed (apt-get install iptables; cargo xtask ci does)")
        })?;
        image.add_host_path(&path)?;
        let multi_call =
            fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?;
        image.add_libraries_of(&multi_call)?;
    }
    let extensions = xtables_dir()?;
    image.add_host_path(&extensions)?;
    for entry in
        fs::read_dir(&extensions).with_context(|| format!("listing {}", extensions.display()))?
    {
        let module = entry
            .with_context(|| format!("listing {}", extensions.display()))?
            .path();
        image.add_host_path(&module)?;
        image.add_libraries_of(&module)?;
    }
    image
        .add_host_path(Path::new("/etc/protocols"))
        .context("/etc/protocols is missing (apt-get install netbase; cargo xtask ci does)")?;
    Ok(())
}

/// Where iptables loads its extensions from: `xtables/` next to libxtables.
fn xtables_dir() -> Result<PathBuf> {
    for lib in ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"] {
        let dir = Path::new(lib).join("xtables");
        if dir.join("libxt_REDIRECT.so").is_file() {
            return Ok(dir);
        }
    }
    bail!("found no iptables extension modules (libxt_REDIRECT.so) under /usr/lib")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The name an image has: the chart's `<image.registry>/<name>:<tag>` for the product's, the
/// tests' own for the test apps.
pub fn reference_of(spec: &ImageSpec, chart: &ChartImages) -> String {
    if spec.product {
        format!("{}/{}:{}", chart.registry, spec.name, chart.tag)
    } else {
        format!("{TEST_APP_REGISTRY}/{}:{TEST_APP_TAG}", spec.name)
    }
}

/// What the chart calls the images: `image.registry`, and `image.tag` or its appVersion.
pub struct ChartImages {
    pub registry: String,
    pub tag: String,
}

impl ChartImages {
    pub fn read(chart: &Path) -> Result<ChartImages> {
        let read = |file: &str| {
            let path = chart.join(file);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let values = read("values.yaml")?;
        let chart_yaml = read("Chart.yaml")?;
        let image_block = values
            .split("\nimage:\n")
            .nth(1)
            .context("values.yaml has no top-level `image:` block")?;
        let field = |block: &str, key: &str| -> Option<String> {
            block
                .lines()
                .take_while(|line| line.starts_with(' ') || line.is_empty())
                .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
                .map(|value| value.trim().trim_matches('"').to_string())
        };
        let registry = field(image_block, "registry").context("values.yaml: no image.registry")?;
        let tag = match field(image_block, "tag").filter(|tag| !tag.is_empty()) {
            Some(tag) => tag,
            None => chart_yaml
                .lines()
                .find_map(|line| line.strip_prefix("appVersion:"))
                .map(|value| value.trim().trim_matches('"').to_string())
                .context("Chart.yaml has no appVersion")?,
        };
        Ok(ChartImages { registry, tag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stage of docker/Dockerfile: where it copies the binary, its user and entrypoint, and
    /// whether it installs iptables.
    #[derive(Debug, Default)]
    struct Stage {
        name: String,
        binary_path: Option<String>,
        user: Option<String>,
        entrypoint: Vec<String>,
        iptables: bool,
    }

    fn stages(dockerfile: &str) -> Vec<Stage> {
        let mut stages: Vec<Stage> = Vec::new();
        for line in dockerfile.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("FROM") => stages.push(Stage {
                    name: match words.as_slice() {
                        [_, _, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                        _ => String::new(),
                    },
                    ..Stage::default()
                }),
                Some("COPY") if line.contains("--from=build") => {
                    stages.last_mut().unwrap().binary_path = words.last().map(|w| w.to_string());
                }
                Some("USER") => stages.last_mut().unwrap().user = Some(words[1].to_string()),
                Some("ENTRYPOINT") => {
                    let json = line.strip_prefix("ENTRYPOINT").unwrap().trim();
                    stages.last_mut().unwrap().entrypoint = json
                        .trim_matches(['[', ']'])
                        .split(',')
                        .map(|arg| arg.trim().trim_matches('"').to_string())
                        .collect();
                }
                Some("RUN") if line.contains("apk add") && words.contains(&"iptables") => {
                    stages.last_mut().unwrap().iptables = true;
                }
                _ => {}
            }
        }
        stages
    }

    /// `docker build ... --build-arg BINARY=<binary> [--target <stage>] -t <reference> .` lines of
    /// the Dockerfile's header: (binary, stage, reference).
    fn documented_builds(dockerfile: &str) -> Vec<(String, Option<String>, String)> {
        dockerfile
            .lines()
            .filter_map(|line| line.strip_prefix("#"))
            .filter(|line| line.trim_start().starts_with("docker build"))
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |flag: &str| {
                    words
                        .iter()
                        .position(|word| *word == flag)
                        .map(|at| words[at + 1].to_string())
                };
                (
                    after("--build-arg")
                        .and_then(|arg| arg.strip_prefix("BINARY=").map(str::to_string))
                        .expect("each build names its BINARY"),
                    after("--target"),
                    after("-t").expect("each build names its image"),
                )
            })
            .collect()
    }

    #[test]
    fn the_image_builder_and_the_dockerfile_build_the_same_images() {
        let root = workspace_root();
        let dockerfile = fs::read_to_string(root.join("docker/Dockerfile")).unwrap();
        let stages = stages(&dockerfile);
        let chart = ChartImages::read(&root.join("charts/outrigger")).unwrap();
        let builds = documented_builds(&dockerfile);
        let products: Vec<&ImageSpec> = IMAGES.iter().filter(|spec| spec.product).collect();
        assert_eq!(builds.len(), products.len(), "{builds:?}");
        for spec in products {
            let reference = reference_of(spec, &chart);
            let (binary, target, _) = builds
                .iter()
                .find(|(_, _, tag)| *tag == reference)
                .unwrap_or_else(|| panic!("docker/Dockerfile documents no build of {reference}"));
            assert_eq!(binary, spec.binary, "{reference}: the binary");
            // Without --target, docker builds the last stage.
            let stage = match target {
                Some(target) => stages.iter().find(|stage| stage.name == *target).unwrap(),
                None => stages.last().unwrap(),
            };
            assert_eq!(
                stage.binary_path.as_deref(),
                Some(spec.path),
                "{reference}: where the binary is"
            );
            assert_eq!(stage.user.as_deref(), spec.user, "{reference}: the user");
            assert_eq!(
                stage.entrypoint,
                spec.entrypoint(),
                "{reference}: the entrypoint"
            );
            assert_eq!(stage.iptables, spec.iptables, "{reference}: iptables");
        }
    }

    #[test]
    fn the_chart_names_the_images() {
        let chart = ChartImages::read(&workspace_root().join("charts/outrigger")).unwrap();
        assert_eq!(chart.registry, "ghcr.io/outrigger-dev");
        let proxy = IMAGES.iter().find(|spec| spec.name == "proxy").unwrap();
        assert_eq!(
            reference_of(proxy, &chart),
            format!("ghcr.io/outrigger-dev/proxy:{}", chart.tag)
        );
    }

    /// The init image, assembled from this machine's iptables (CI installs it), holds what
    /// `outrigger-proxy init` runs and what that loads.
    #[test]
    fn the_init_image_holds_iptables_with_what_it_loads() {
        let spec = IMAGES
            .iter()
            .find(|spec| spec.name == "proxy-init")
            .unwrap();
        // Any dynamically linked program stands in for the proxy binary here.
        let image = assemble(spec, "test/proxy-init:1", Path::new("/bin/true")).unwrap();
        for path in [
            "/usr/local/bin/outrigger-proxy",
            "/usr/sbin/iptables-restore",
            "/usr/sbin/iptables-save",
            "/usr/sbin/ip6tables-restore",
            "/usr/sbin/ip6tables-save",
            "/etc/protocols",
            "/lib64/ld-linux-x86-64.so.2",
        ] {
            assert!(image.contains(path), "{path} is missing");
        }
        let extensions = xtables_dir().unwrap();
        for module in ["libxt_REDIRECT.so", "libxt_owner.so", "libxt_multiport.so"] {
            assert!(
                image.contains(&extensions.join(module).to_string_lossy()),
                "{module} is missing"
            );
        }
        assert_eq!(
            image.entrypoint(),
            ["/usr/local/bin/outrigger-proxy", "init"]
        );
        assert_eq!(image.user(), None);
    }
}

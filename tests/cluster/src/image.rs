//! Container images without Docker: a root filesystem assembled from files of this machine,
//! written as a `docker save` archive (`manifest.json`, a config, one uncompressed layer), which
//! `ctr images import` loads into the node's containerd.
//!
//! Dynamically linked programs (this machine's glibc builds, Debian's iptables) come with every
//! library `ldd` lists and the ELF interpreter, each at the path the program looks for it, with
//! the symlinks on the way (Debian's merged `/usr`: `/lib -> usr/lib`) recreated.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Result, bail};
use crate::json_string;

/// An image being assembled: its files, and how its containers run.
#[derive(Debug, Clone)]
pub struct Image {
    reference: String,
    entrypoint: Vec<String>,
    user: Option<String>,
    env: Vec<String>,
    /// By path inside the image, relative (`usr/bin/x`); parents are added when written.
    entries: BTreeMap<PathBuf, Entry>,
    /// An image config built elsewhere, without `rootfs`, in place of the one made from
    /// `entrypoint`, `user` and `env`.
    config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Directory,
    File { source: Source, mode: u32 },
    Symlink(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// The `PATH` of the images, as the usual base images set it.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Image {
    /// An empty image (`FROM scratch`) named `reference` (`registry/name:tag`).
    pub fn new(reference: impl Into<String>) -> Image {
        Image {
            reference: reference.into(),
            entrypoint: Vec::new(),
            user: None,
            env: vec![PATH.to_string()],
            entries: BTreeMap::new(),
            config: None,
        }
    }

    /// An image built elsewhere: every file under `rootfs` (a directory of this machine) at its
    /// path below it, with its permission bits, and `config`, the OCI image config without
    /// `rootfs` (one JSON object).
    pub fn from_root(reference: impl Into<String>, rootfs: &Path, config: &str) -> Result<Image> {
        let config = config.trim();
        if !config.starts_with('{') || !config.ends_with('}') || config.contains("\"rootfs\"") {
            bail!("an image config must be one JSON object without `rootfs`");
        }
        let mut image = Image::new(reference);
        image.config = Some(config.to_string());
        let mut pending = vec![rootfs.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let entries = fs::read_dir(&dir)
                .context(|| format!("reading the directory {}", dir.display()))?;
            for entry in entries {
                let entry = entry.context(|| format!("reading {}", dir.display()))?;
                let path = entry.path();
                let inside = Path::new("/").join(
                    path.strip_prefix(rootfs)
                        .expect("walked from the root filesystem"),
                );
                let metadata = fs::symlink_metadata(&path)
                    .context(|| format!("reading {}", path.display()))?;
                let kind = if metadata.file_type().is_symlink() {
                    let target = fs::read_link(&path)
                        .context(|| format!("reading the link {}", path.display()))?;
                    Entry::Symlink(target)
                } else if metadata.is_dir() {
                    pending.push(path.clone());
                    Entry::Directory
                } else {
                    Entry::File {
                        source: Source::Host(path.clone()),
                        mode: metadata.permissions().mode() & 0o7777,
                    }
                };
                image.insert(&inside, kind)?;
            }
        }
        Ok(image)
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    pub fn entrypoint(&self) -> &[String] {
        &self.entrypoint
    }

    /// `uid:gid`, or `None` for root.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// `ENTRYPOINT [...]`.
    pub fn set_entrypoint(&mut self, entrypoint: &[&str]) -> &mut Image {
        self.entrypoint = entrypoint.iter().map(|arg| arg.to_string()).collect();
        self
    }

    /// `USER uid:gid`.
    pub fn set_user(&mut self, user: &str) -> &mut Image {
        self.user = Some(user.to_string());
        self
    }

    /// Whether `path` (absolute, as inside the image) leads to a file or directory there,
    /// following the image's symlinks as a container would.
    pub fn contains(&self, path: &str) -> bool {
        let mut resolved = PathBuf::new();
        let mut pending = walk_parts(Path::new(path));
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == Path::new("..") {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&part);
            match self.entries.get(&candidate) {
                Some(Entry::Symlink(target)) if hops < 40 => {
                    hops += 1;
                    if target.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    pending.extend(walk_parts(target));
                }
                Some(Entry::Symlink(_)) => return false,
                Some(_) => resolved = candidate,
                // Parents of entries are directories of the image too.
                None if self.entries.keys().any(|key| key.starts_with(&candidate)) => {
                    resolved = candidate
                }
                None => return false,
            }
        }
        true
    }

    /// `COPY host_file image_path` with the host file's permissions.
    pub fn add_file(&mut self, image_path: &str, host_file: &Path) -> Result<&mut Image> {
        let mode = host_mode(host_file)?;
        self.insert(
            Path::new(image_path),
            Entry::File {
                source: Source::Host(host_file.to_path_buf()),
                mode,
            },
        )?;
        Ok(self)
    }

    /// A file with `contents`.
    pub fn add_bytes(
        &mut self,
        image_path: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<&mut Image> {
        self.insert(
            Path::new(image_path),
            Entry::File {
                source: Source::Bytes(contents.to_vec()),
                mode,
            },
        )?;
        Ok(self)
    }

    /// A symlink at `image_path` pointing at `target`.
    pub fn add_symlink(&mut self, image_path: &str, target: &str) -> Result<&mut Image> {
        self.insert(Path::new(image_path), Entry::Symlink(PathBuf::from(target)))?;
        Ok(self)
    }

    /// This machine's file at `host_path`, at the same path in the image, with every symlink met
    /// on the way recreated as a symlink (so `/lib/x86_64-linux-gnu/libc.so.6` works on a merged
    /// `/usr` as it does here).
    pub fn add_host_path(&mut self, host_path: &Path) -> Result<&mut Image> {
        if !host_path.is_absolute() {
            bail!("{} is not an absolute path", host_path.display());
        }
        let mut resolved = PathBuf::from("/");
        // The parts still to walk, last first; `..` included, since it applies to what a symlink
        // resolved to, not to the link.
        let mut pending: Vec<PathBuf> = walk_parts(host_path);
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == Path::new("..") {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&part);
            let metadata = fs::symlink_metadata(&candidate).context(|| {
                format!(
                    "reading {} (for {})",
                    candidate.display(),
                    host_path.display()
                )
            })?;
            if metadata.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", host_path.display());
                }
                let target = fs::read_link(&candidate)
                    .context(|| format!("reading the link {}", candidate.display()))?;
                self.insert(&candidate, Entry::Symlink(target.clone()))?;
                // Go on from the link's target, relative to the link's directory.
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                pending.extend(walk_parts(&target));
            } else if pending.is_empty() {
                let entry = if metadata.is_dir() {
                    Entry::Directory
                } else {
                    Entry::File {
                        source: Source::Host(candidate.clone()),
                        mode: metadata.permissions().mode() & 0o7777,
                    }
                };
                self.insert(&candidate, entry)?;
            } else {
                resolved = candidate;
            }
        }
        Ok(self)
    }

    /// `program` (a file of this machine) at `image_path`, and what it needs to run: every
    /// library `ldd` lists and the ELF interpreter. A static program adds nothing more.
    pub fn add_program(&mut self, image_path: &str, program: &Path) -> Result<&mut Image> {
        self.add_file(image_path, program)?;
        self.add_libraries_of(program)
    }

    /// Every library `ldd` lists for `binary` (a program or a shared object of this machine),
    /// and the ELF interpreter.
    pub fn add_libraries_of(&mut self, binary: &Path) -> Result<&mut Image> {
        for library in shared_libraries(binary)? {
            self.add_host_path(&library)?;
        }
        Ok(self)
    }

    fn insert(&mut self, path: &Path, entry: Entry) -> Result<()> {
        let key = relative(path);
        if key.as_os_str().is_empty() {
            bail!("cannot put a file at the image's root ({})", path.display());
        }
        match self.entries.get(&key) {
            Some(existing) if *existing != entry => bail!(
                "image {}: {} is already {existing:?}, not {entry:?}",
                self.reference,
                path.display()
            ),
            _ => {}
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    /// Writes the image as a `docker save` archive at `path` (through a temporary file, so a
    /// half-written archive never has the final name).
    pub fn write_docker_archive(&self, path: &Path) -> Result<()> {
        let layer_path = path.with_extension("layer.tmp");
        let archive_path = path.with_extension("tmp");
        let written = self
            .write_layer(&layer_path)
            .and_then(|()| self.write_archive(&layer_path, &archive_path));
        let _ = fs::remove_file(&layer_path);
        if let Err(err) = written {
            let _ = fs::remove_file(&archive_path);
            return Err(err);
        }
        fs::rename(&archive_path, path)
            .context(|| format!("renaming {} to {}", archive_path.display(), path.display()))
    }

    /// The root filesystem as one tar: every parent directory, then the entries, in path order.
    fn write_layer(&self, layer_path: &Path) -> Result<()> {
        let mut tar = Tar::create(layer_path)?;
        let mut directories: BTreeMap<PathBuf, ()> = BTreeMap::new();
        for path in self.entries.keys() {
            let mut parent = path.parent();
            while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
                directories.insert(dir.to_path_buf(), ());
                parent = dir.parent();
            }
        }
        let mut all: BTreeMap<&Path, &Entry> = BTreeMap::new();
        for dir in directories.keys() {
            all.insert(dir, &Entry::Directory);
        }
        for (path, entry) in &self.entries {
            if directories.contains_key(path) && *entry != Entry::Directory {
                bail!(
                    "image {}: {} is both a directory and {entry:?}",
                    self.reference,
                    path.display()
                );
            }
            all.insert(path, entry);
        }
        for (path, entry) in all {
            match entry {
                Entry::Directory => tar.directory(path)?,
                Entry::Symlink(target) => tar.symlink(path, target)?,
                Entry::File { source, mode } => match source {
                    Source::Bytes(bytes) => {
                        tar.file(path, *mode, bytes.len() as u64, &mut &bytes[..])?
                    }
                    Source::Host(host) => {
                        let mut file =
                            File::open(host).context(|| format!("opening {}", host.display()))?;
                        let size = file
                            .metadata()
                            .context(|| format!("reading {}", host.display()))?
                            .len();
                        tar.file(path, *mode, size, &mut file)?;
                    }
                },
            }
        }
        tar.finish()
    }

    fn write_archive(&self, layer_path: &Path, archive_path: &Path) -> Result<()> {
        let layer_digest = sha256_of_file(layer_path)?;
        let config = self.config_json(&layer_digest);
        let config_digest = sha256_of_bytes(config.as_bytes(), archive_path)?;
        let config_name = format!("{config_digest}.json");
        let layer_name = format!("{layer_digest}/layer.tar");
        let manifest = format!(
            "[{{\"Config\":{},\"RepoTags\":[{}],\"Layers\":[{}]}}]",
            json_string(&config_name),
            json_string(&self.reference),
            json_string(&layer_name)
        );
        let mut tar = Tar::create(archive_path)?;
        tar.file(
            Path::new(&config_name),
            0o644,
            config.len() as u64,
            &mut config.as_bytes(),
        )?;
        tar.directory(Path::new(&layer_digest))?;
        let mut layer =
            File::open(layer_path).context(|| format!("opening {}", layer_path.display()))?;
        let layer_size = layer
            .metadata()
            .context(|| format!("reading {}", layer_path.display()))?
            .len();
        tar.file(Path::new(&layer_name), 0o644, layer_size, &mut layer)?;
        tar.file(
            Path::new("manifest.json"),
            0o644,
            manifest.len() as u64,
            &mut manifest.as_bytes(),
        )?;
        tar.finish()
    }

    /// The image configuration (OCI image spec `config`), with the layer's uncompressed digest.
    fn config_json(&self, layer_digest: &str) -> String {
        let rootfs =
            format!("\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"sha256:{layer_digest}\"]}}");
        if let Some(config) = &self.config {
            let open = &config[..config.len() - 1];
            let separator = if open.trim_end().ends_with('{') {
                ""
            } else {
                ","
            };
            return format!("{open}{separator}{rootfs}}}");
        }
        let list = |items: &[String]| {
            items
                .iter()
                .map(|item| json_string(item))
                .collect::<Vec<_>>()
                .join(",")
        };
        let user = self
            .user
            .as_deref()
            .map(|user| format!(",\"User\":{}", json_string(user)))
            .unwrap_or_default();
        format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\
             \"config\":{{\"Entrypoint\":[{}],\"Env\":[{}],\"WorkingDir\":\"/\"{user}}},\
             {rootfs},\
             \"history\":[{{\"created_by\":\"outrigger-cluster image builder\"}}]}}",
            list(&self.entrypoint),
            list(&self.env),
        )
    }
}

/// The permission bits of a file of this machine.
fn host_mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// `usr/bin/x` for `/usr/bin/x`.
fn relative(path: &Path) -> PathBuf {
    components_of(path).into_iter().collect()
}

/// The parts of `path` to walk, last first, `..` kept.
fn walk_parts(path: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = path
        .components()
        .filter_map(|component| match component {
            Component::Normal(part) => Some(PathBuf::from(part)),
            Component::ParentDir => Some(PathBuf::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    parts.reverse();
    parts
}

/// The normal components of `path`, `..` resolved lexically.
fn components_of(path: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(PathBuf::from(part)),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    parts
}

/// The libraries and interpreter `ldd` lists for `binary`; none for a static one.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context(|| format!("running ldd {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd says so, and fails, for a static program.
        if stdout.contains("not a dynamic executable")
            || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_ldd(&stdout).context(|| format!("ldd {}: {stdout}", binary.display()))
}

/// Paths from `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the kernel's vDSO has no file.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{} is not found", name.trim());
                }
                target.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// The SHA-256 of a file, in hex, computed by coreutils' `sha256sum`.
fn sha256_of_file(path: &Path) -> Result<String> {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .context(|| format!("running sha256sum {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "sha256sum {} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let digest = stdout.split_whitespace().next().unwrap_or_default();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("sha256sum {} printed {stdout:?}", path.display());
    }
    Ok(digest.to_string())
}

/// The SHA-256 of `bytes`, through a scratch file next to `near`.
fn sha256_of_bytes(bytes: &[u8], near: &Path) -> Result<String> {
    let scratch = near.with_extension("digest.tmp");
    fs::write(&scratch, bytes).context(|| format!("writing {}", scratch.display()))?;
    let digest = sha256_of_file(&scratch);
    let _ = fs::remove_file(&scratch);
    digest
}

/// A POSIX ustar archive written entry by entry: owner root, modification time 0, so that the
/// same files give the same bytes.
struct Tar {
    path: PathBuf,
    out: io::BufWriter<File>,
}

const BLOCK: usize = 512;

impl Tar {
    fn create(path: &Path) -> Result<Tar> {
        let file = File::create(path).context(|| format!("creating {}", path.display()))?;
        Ok(Tar {
            path: path.to_path_buf(),
            out: io::BufWriter::new(file),
        })
    }

    fn directory(&mut self, path: &Path) -> Result<()> {
        let mut name = path_str(path)?.to_string();
        name.push('/');
        self.header(&name, 0o755, 0, b'5', "")
    }

    fn symlink(&mut self, path: &Path, target: &Path) -> Result<()> {
        self.header(path_str(path)?, 0o777, 0, b'2', path_str(target)?)
    }

    fn file(&mut self, path: &Path, mode: u32, size: u64, contents: &mut dyn Read) -> Result<()> {
        self.header(path_str(path)?, mode, size, b'0', "")?;
        let copied = io::copy(&mut contents.take(size), &mut self.out)
            .context(|| format!("writing {} into {}", path.display(), self.path.display()))?;
        if copied != size {
            bail!(
                "{} changed while being archived into {}",
                path.display(),
                self.path.display()
            );
        }
        let padding = (BLOCK - (size as usize % BLOCK)) % BLOCK;
        self.write(&vec![0; padding])
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, kind: u8, link: &str) -> Result<()> {
        let mut header = [0u8; BLOCK];
        let (prefix, name) = split_name(name)?;
        if link.len() > 100 {
            bail!("symlink target {link} is longer than a tar header holds");
        }
        header[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut header[100..108], u64::from(mode));
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], size);
        octal(&mut header[136..148], 0);
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        header[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        // The checksum is computed with its own field as spaces.
        header[148..156].copy_from_slice(b"        ");
        let checksum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
        header[148..155].copy_from_slice(format!("{checksum:06o}\0").as_bytes());
        self.write(&header)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .context(|| format!("writing {}", self.path.display()))
    }

    fn finish(mut self) -> Result<()> {
        self.write(&[0; 2 * BLOCK])?;
        self.out
            .flush()
            .context(|| format!("writing {}", self.path.display()))
    }
}

/// A field of `field.len() - 1` octal digits and a NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// A name split into ustar's prefix (up to 155 bytes) and name (up to 100), at a `/`.
fn split_name(path: &str) -> Result<(&str, &str)> {
    if path.len() <= 100 {
        return Ok(("", path));
    }
    let trimmed = path.trim_end_matches('/');
    for (index, _) in trimmed.match_indices('/') {
        let (prefix, name) = (&path[..index], &path[index + 1..]);
        if prefix.len() <= 155 && name.len() <= 100 {
            return Ok((prefix, name));
        }
    }
    bail!("{path} is longer than a tar header holds")
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .context(|| format!("{} is not valid UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_interpreter_paths() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                      \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn long_names_split_at_a_slash() {
        assert_eq!(split_name("usr/bin/x").unwrap(), ("", "usr/bin/x"));
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let (prefix, name) = split_name(&long).unwrap();
        assert_eq!((prefix.len(), name.len()), (120, 90));
        assert!(split_name(&"x".repeat(300)).is_err());
    }

    /// The archive's layer, unpacked by GNU tar, holds the files with their modes, the symlink
    /// chain of a host path, and parent directories.
    #[test]
    fn the_layer_unpacks_with_gnu_tar() {
        let dir = std::env::temp_dir().join(format!("outrigger-image-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("host/real")).unwrap();
        fs::write(dir.join("host/real/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            dir.join("host/real/tool"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("real", dir.join("host/alias")).unwrap();

        let mut image = Image::new("example.test/tool:1");
        image.set_entrypoint(&["/usr/bin/tool"]).set_user("7:7");
        image
            .add_file("/usr/bin/tool", &dir.join("host/real/tool"))
            .unwrap();
        image.add_bytes("/etc/greeting", b"hello\n", 0o644).unwrap();
        image.add_host_path(&dir.join("host/alias/tool")).unwrap();
        let archive = dir.join("tool.tar");
        image.write_docker_archive(&archive).unwrap();

        let (manifest, config, layer) = unpack(&archive, &dir.join("unpacked"));
        assert!(
            manifest.contains("\"RepoTags\":[\"example.test/tool:1\"]"),
            "{manifest}"
        );
        assert!(
            config.contains("\"Entrypoint\":[\"/usr/bin/tool\"]"),
            "{config}"
        );
        assert!(config.contains("\"User\":\"7:7\""), "{config}");

        let root = dir.join("root");
        untar(&layer, &root);
        let tool = root.join("usr/bin/tool");
        assert_eq!(fs::read(&tool).unwrap(), b"#!/bin/sh\n");
        assert_eq!(host_mode(&tool).unwrap(), 0o755);
        assert_eq!(fs::read(root.join("etc/greeting")).unwrap(), b"hello\n");
        let host = relative(&dir.join("host"));
        assert_eq!(
            fs::read_link(root.join(&host).join("alias")).unwrap(),
            PathBuf::from("real")
        );
        assert_eq!(
            fs::read(root.join(&host).join("alias/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    fn untar(archive: &Path, into: &Path) {
        fs::create_dir_all(into).unwrap();
        let status = Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(into)
            .status()
            .unwrap();
        assert!(status.success(), "tar -xf {}", archive.display());
    }

    /// A `docker save` archive unpacked into `into`: its manifest, its config (checked to name
    /// the layer's digest) and the path of its layer.
    fn unpack(archive: &Path, into: &Path) -> (String, String, PathBuf) {
        untar(archive, into);
        let manifest = fs::read_to_string(into.join("manifest.json")).unwrap();
        let field = |name: &str| {
            manifest
                .split(&format!("\"{name}\":"))
                .nth(1)
                .unwrap()
                .trim_start_matches('[')
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap()
                .to_string()
        };
        let layer_name = field("Layers");
        let layer = into.join(&layer_name);
        let digest = layer_name.split('/').next().unwrap();
        assert_eq!(sha256_of_file(&layer).unwrap(), digest);
        let config = fs::read_to_string(into.join(field("Config"))).unwrap();
        assert!(
            config.contains(&format!("\"diff_ids\":[\"sha256:{digest}\"]")),
            "{config}"
        );
        (manifest, config, layer)
    }

    #[test]
    fn an_image_built_elsewhere_keeps_its_files_modes_links_and_config() {
        let dir = std::env::temp_dir().join(format!("outrigger-image-root-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("rootfs/usr/bin")).unwrap();
        fs::write(dir.join("rootfs/usr/bin/server"), b"binary").unwrap();
        fs::set_permissions(
            dir.join("rootfs/usr/bin/server"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::write(dir.join("rootfs/cert.crt"), b"cert").unwrap();
        fs::set_permissions(
            dir.join("rootfs/cert.crt"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.join("rootfs/bin")).unwrap();
        let config = r#"{"architecture":"amd64","os":"linux","config":{"User":"1338"}}"#;
        assert!(Image::from_root("x:1", &dir.join("rootfs"), "[]").is_err());

        let image = Image::from_root("example.test/echo:1", &dir.join("rootfs"), config).unwrap();
        let archive = dir.join("echo.tar");
        image.write_docker_archive(&archive).unwrap();
        let (_, written, layer) = unpack(&archive, &dir.join("unpacked"));
        assert!(
            written.starts_with(
                r#"{"architecture":"amd64","os":"linux","config":{"User":"1338"},"rootfs":"#
            ),
            "{written}"
        );
        let root = dir.join("root");
        untar(&layer, &root);
        assert_eq!(host_mode(&root.join("usr/bin/server")).unwrap(), 0o755);
        assert_eq!(host_mode(&root.join("cert.crt")).unwrap(), 0o644);
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            PathBuf::from("usr/bin")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

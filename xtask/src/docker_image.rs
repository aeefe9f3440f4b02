//! `cargo xtask docker-image`: builds the mock engine's container image locally, with no registry.
//!
//! The image is `FROM scratch` and holds only the `model-serve-shim` binary plus the shared
//! libraries `ldd` says it needs (and the dynamic loader), each at its own absolute path, so the
//! binary runs exactly as it does on the host. Nothing is pulled: a base image would need a
//! registry, and CI machines and this sandbox have none.
//!
//! This file depends on `std` and `anyhow` only, because the Docker shimlet's integration tests
//! compile it too (`#[path]` include in `shim-shimlet-docker/tests/common/mod.rs`): one recipe,
//! used by both the xtask and the tests that need the image.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

/// Image name the `mock` engine preset uses by default.
pub const MOCK_ENGINE_IMAGE: &str = "xmod-shim/mock-engine:latest";

/// Port the image's default command listens on (the entrypoint's flags can override it).
pub const MOCK_ENGINE_PORT: u16 = 8000;

/// Usage of the subcommand, for `--help` and argument errors.
pub const USAGE: &str = "\
usage: cargo xtask docker-image [--tag IMAGE] [--binary PATH] [--release] [--if-missing]

Builds the mock engine image (FROM scratch: model-serve-shim + the libraries ldd lists) with the
local Docker Engine; no registry is used.

  --tag IMAGE    image name (default xmod-shim/mock-engine:latest)
  --binary PATH  use this model-serve-shim instead of building it with cargo
  --release      build model-serve-shim with --release (ignored with --binary)
  --if-missing   do nothing when the engine already has the image";

/// Runs the subcommand with its arguments (everything after `docker-image`).
///
/// # Errors
/// Bad arguments, a failed cargo build, or a failed `docker build`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut tag = MOCK_ENGINE_IMAGE.to_string();
    let mut binary = None;
    let mut release = false;
    let mut if_missing = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tag" => tag = args.next().context("--tag needs a value")?.clone(),
            "--binary" => {
                binary = Some(PathBuf::from(
                    args.next().context("--binary needs a value")?,
                ));
            }
            "--release" => release = true,
            "--if-missing" => if_missing = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if if_missing && image_exists(&tag)? {
        println!("{tag} is already present; not rebuilding (drop --if-missing to rebuild)");
        return Ok(());
    }
    let binary = match binary {
        Some(path) => path,
        None => build_binary(&workspace_root(), release)?,
    };
    build(&tag, &binary)?;
    println!("built {tag} from {}", binary.display());
    Ok(())
}

/// Builds the image `tag` from a `model-serve-shim` binary.
///
/// # Errors
/// The binary lacks the `mock-engine` subcommand, `ldd` names a library it cannot find, the
/// build context cannot be written, or `docker build` fails.
pub fn build(tag: &str, binary: &Path) -> anyhow::Result<()> {
    let binary = binary
        .canonicalize()
        .with_context(|| format!("binary {} not found", binary.display()))?;
    check_has_mock_engine(&binary)?;

    let context = ContextDir::new()?;
    let rootfs = context.path().join("rootfs");
    copy_into(&rootfs, &binary, Path::new("/model-serve-shim"))?;
    for library in shared_libraries(&binary)? {
        copy_into(&rootfs, &library, &library)?;
    }
    std::fs::write(context.path().join("Dockerfile"), dockerfile())
        .context("writing the Dockerfile")?;

    let mut command = Command::new("docker");
    command
        .arg("build")
        .arg("--tag")
        .arg(tag)
        .arg(context.path());
    if !has_buildx() {
        // Without the buildx plugin the CLI refuses BuildKit builds; the classic builder needs
        // nothing more and handles this two-instruction Dockerfile just as well.
        command.env("DOCKER_BUILDKIT", "0");
    }
    let status = command
        .status()
        .context("running `docker build` (is the docker CLI installed?)")?;
    ensure!(
        status.success(),
        "`docker build` for {tag} failed: {status}"
    );
    Ok(())
}

/// Builds `model-serve-shim` with cargo and returns its path.
///
/// # Errors
/// cargo fails or the binary is not where the target directory says it should be.
pub fn build_binary(workspace: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "-p", "shim-cli", "--bin", "model-serve-shim"]);
    if release {
        command.arg("--release");
    }
    let status = command.status().context("running cargo")?;
    ensure!(
        status.success(),
        "building model-serve-shim failed: {status}"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target
        .join(if release { "release" } else { "debug" })
        .join("model-serve-shim");
    ensure!(
        binary.is_file(),
        "cargo built model-serve-shim but {} does not exist",
        binary.display()
    );
    Ok(binary)
}

/// Whether the docker CLI has the buildx plugin (BuildKit builds).
fn has_buildx() -> bool {
    Command::new("docker")
        .args(["buildx", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the local engine has the image `tag`.
///
/// # Errors
/// The docker CLI cannot be run.
pub fn image_exists(tag: &str) -> anyhow::Result<bool> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .context("running `docker image inspect` (is the docker CLI installed?)")?;
    Ok(output.status.success())
}

/// The workspace root: both crates that compile this file (xtask and the Docker shimlet's
/// tests) sit one directory below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The Dockerfile: everything lives in `rootfs/`, copied as one layer onto an empty image.
fn dockerfile() -> String {
    let mut text = String::new();
    text.push_str("# Generated by `cargo xtask docker-image`; see xtask/src/docker_image.rs.\n");
    text.push_str("FROM scratch\n");
    text.push_str("COPY rootfs/ /\n");
    let _ = writeln!(text, "EXPOSE {MOCK_ENGINE_PORT}");
    text.push_str("LABEL org.opencontainers.image.title=\"xmod-shim mock engine\"\n");
    text.push_str("ENTRYPOINT [\"/model-serve-shim\", \"mock-engine\"]\n");
    // Listen on every interface by default: 127.0.0.1 inside a container is unreachable from
    // the published port.
    let _ = writeln!(
        text,
        "CMD [\"--host\", \"0.0.0.0\", \"--port\", \"{MOCK_ENGINE_PORT}\"]"
    );
    text
}

/// Fails early, with a clear message, when the binary predates the `mock-engine` subcommand:
/// otherwise the image builds fine and only its containers fail.
fn check_has_mock_engine(binary: &Path) -> anyhow::Result<()> {
    let output = Command::new(binary)
        .args(["mock-engine", "--help"])
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "{} has no working `mock-engine` subcommand ({}): {}",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Shared libraries (and the dynamic loader) the binary loads, as absolute paths.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A static binary needs nothing; ldd says so and exits non-zero.
    if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    ensure!(output.status.success(), "ldd failed: {}", stderr.trim());
    parse_ldd(&stdout)
}

/// Parses `ldd` output. Lines look like
/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, `/lib64/ld-linux-x86-64.so.2 (0x…)` or
/// `linux-vdso.so.1 (0x…)` (provided by the kernel, nothing to copy).
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                ensure!(
                    !target.starts_with("not found"),
                    "ldd could not find {}",
                    name.trim()
                );
                target.split(" (").next().unwrap_or_default().trim()
            }
            None => line.split(" (").next().unwrap_or_default().trim(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies `source` (following symlinks, so the image gets the real file) to `dest` inside
/// `rootfs`, keeping its permissions.
fn copy_into(rootfs: &Path, source: &Path, dest: &Path) -> anyhow::Result<()> {
    let relative = dest.strip_prefix("/").unwrap_or(dest);
    let target = rootfs.join(relative);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(source, &target)
        .with_context(|| format!("copying {} into the build context", source.display()))?;
    Ok(())
}

/// A scratch build-context directory, removed on drop.
struct ContextDir(PathBuf);

impl ContextDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("xmod-docker-image-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating build context {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ContextDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_every_library_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd1c9f2000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0d5c0c1000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0d5b81e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f0d5c0f4000)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(libs.len(), 3);
        assert_eq!(libs[0], Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1"));
        assert_eq!(libs[2], Path::new("/lib64/ld-linux-x86-64.so.2"));
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1"));
    }

    #[test]
    fn the_dockerfile_starts_from_scratch_with_the_mock_engine_entrypoint() {
        let text = dockerfile();
        assert!(text.contains("FROM scratch"));
        assert!(text.contains(r#"ENTRYPOINT ["/model-serve-shim", "mock-engine"]"#));
    }
}

//! Project automation: `cargo xtask <task>`.
//!
//! - `ci`: formatting, clippy with warnings denied, the llama.cpp test environment, and every
//!   test (what `.ci/run` runs).
//! - `bench`: the engine and status-API benchmark; prints figures.
//! - `bench gateway`: the OpenAI gateway against nginx.
//! - `bench k8s [--services N]`: two replicas on the Kubernetes store against the k8s lab:
//!   API requests per deploy, RSS per service, follower status reads, failover (default 1,000).
//! - `docker-image`: builds the mock engine's image locally (no registry needed).
//! - `llama-env`: creates (or reuses) the Python virtualenv with llama-cpp-python's server and
//!   the `gguf` package, and prints its interpreter.
//! - `tiny-model <dir>`: writes a tiny random-weight llama GGUF model for real-engine tests.
//! - `fuzz-api [--examples N]`: schemathesis against docs/openapi.yaml on a live server, longer
//!   than CI's bounded run (default 500 examples per operation).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

mod api_fuzz;
mod browser;
mod docker_image;
mod gateway_bench;
mod k8s_bench;
mod openai_env;
mod venv;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    match task {
        "ci" => ci(),
        "bench" if args.get(1).is_some_and(|a| a == "gateway") => gateway_bench::run(&args[2..]),
        "bench-gateway" => gateway_bench::run(&args[1..]),
        "bench" if args.get(1).is_some_and(|a| a == "k8s") => k8s_bench::run(&args[2..]),
        "bench" => bench(&args[1..]),
        "docker-image" => docker_image::run(&args[1..]),
        "llama-env" => llama_env().map(|python| println!("{}", python.display())),
        "openai-env" => openai_env::python().map(|python| println!("{}", python.display())),
        "fuzz-api" => api_fuzz::run(&args[1..]),
        "tiny-model" => {
            let dir = args.get(1).context("usage: cargo xtask tiny-model DIR")?;
            tiny_model(Path::new(dir))
        }
        "help" | "--help" | "-h" => {
            println!(
                "usage: cargo xtask <ci | bench [gateway | k8s [--services N]] | docker-image | llama-env | openai-env | fuzz-api [--examples N] | tiny-model DIR>"
            );
            Ok(())
        }
        other => bail!("unknown task {other:?}; try `cargo xtask help`"),
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_with(args, &[])
}

/// Runs cargo with extra environment variables.
fn cargo_with(args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The real-engine test runs llama-cpp-python from the virtualenv made (or reused) here.
    let python = llama_env()?;
    // The gateway's OpenAI SDK test runs the official `openai` package from this virtualenv.
    let openai_python = openai_env::python()?;
    // The bounded schemathesis run against docs/openapi.yaml.
    let schemathesis = api_fuzz::st()?;
    // The web console's browser test drives Chromium; it fails under CI without it.
    browser::ensure_chromium()?;
    cargo_with(
        &["test", "--workspace"],
        &[
            ("XMOD_SHIM_LLAMA_PYTHON", python.as_path()),
            ("XMOD_SHIM_OPENAI_PYTHON", openai_python.as_path()),
            ("XMOD_SHIM_SCHEMATHESIS", schemathesis.as_path()),
        ],
    )?;
    Ok(())
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["bench", "-p", "shim-cli", "--bench", "engine", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// Versions installed into the llama.cpp virtualenv (pinned so CI builds what was tested).
const LLAMA_PACKAGES: &[&str] = &["llama-cpp-python[server]==0.3.36", "gguf", "numpy"];

/// The virtualenv for real-engine tests: `XMOD_SHIM_LLAMA_VENV`, else a per-user cache directory
/// outside the checkout, so fresh clones on one machine share the 5-minute llama.cpp build.
pub fn llama_venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("XMOD_SHIM_LLAMA_VENV") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("xmod-shim").join("venv-llamacpp")
}

/// Creates or reuses the virtualenv; returns its python.
fn llama_env() -> anyhow::Result<PathBuf> {
    let venv = llama_venv();
    let python = venv.join("bin").join("python3");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import llama_cpp.server, gguf, numpy"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        eprintln!("reusing {}", venv.display());
        return Ok(python);
    }
    eprintln!(
        "creating {} (building llama.cpp takes about 5 minutes on 2 cores)",
        venv.display()
    );
    let system_python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(&system_python)
        .arg("-m")
        .arg("venv")
        .arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"]))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(LLAMA_PACKAGES))?;
    anyhow::ensure!(
        ready(&python),
        "{} was installed but llama_cpp.server does not import",
        venv.display()
    );
    Ok(python)
}

/// Writes `DIR/tiny.gguf`.
fn tiny_model(dir: &Path) -> anyhow::Result<()> {
    let python = llama_env()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = dir.join("tiny.gguf");
    run(Command::new(&python)
        .arg(root().join("xtask").join("tiny_model.py"))
        .arg(&out))?;
    println!("{}", out.display());
    Ok(())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed ({status})");
    Ok(())
}

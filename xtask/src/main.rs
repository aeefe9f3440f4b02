//! Project automation: `cargo xtask <task>`.
//!
//! - `ci`: formatting, clippy with warnings denied, and every test (what `.ci/run` runs).
//! - `bench`: the engine and status-API benchmark; prints figures.
//! - `docker-image`: builds the mock engine's image locally (no registry needed).
//! - `tiny-model <dir>`: writes a tiny random-weight llama GGUF model for real-engine tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    match task {
        "ci" => ci(),
        "bench" => bench(&args[1..]),
        "help" | "--help" | "-h" => {
            println!("usage: cargo xtask <ci | bench | docker-image | tiny-model DIR>");
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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
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
    cargo(&["test", "--workspace"])?;
    Ok(())
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["bench", "-p", "shim-cli", "--bench", "engine", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

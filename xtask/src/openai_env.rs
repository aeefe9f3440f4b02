//! The virtualenv with the official OpenAI Python SDK, for the gateway's SDK test
//! (`shim-cli/tests/e2e_gateway.rs`, which reads its python from `XMOD_SHIM_OPENAI_PYTHON`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Pinned, so CI tests the SDK version that was tested here.
const PACKAGES: &[&str] = &["openai==1.109.1"];

/// `XMOD_SHIM_OPENAI_VENV`, else a per-user cache directory beside the llama.cpp one.
fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("XMOD_SHIM_OPENAI_VENV") {
        return PathBuf::from(dir);
    }
    super::llama_venv()
        .parent()
        .map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
        .join("venv-openai")
}

/// Creates or reuses the virtualenv; returns its python.
pub fn python() -> anyhow::Result<PathBuf> {
    let venv = venv();
    let python = venv.join("bin").join("python3");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        eprintln!("reusing {}", venv.display());
        return Ok(python);
    }
    eprintln!("creating {}", venv.display());
    let system_python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    super::run(Command::new(&system_python).args(["-m", "venv"]).arg(&venv))?;
    super::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PACKAGES),
    )?;
    anyhow::ensure!(
        ready(&python),
        "{} was installed but openai does not import",
        venv.display()
    );
    Ok(python)
}

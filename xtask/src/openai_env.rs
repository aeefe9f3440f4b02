//! The virtualenv with the official OpenAI Python SDK, for the gateway's SDK test
//! (`shim-cli/tests/e2e_gateway.rs`, which reads its python from `XMOD_SHIM_OPENAI_PYTHON`).

use std::path::PathBuf;

use crate::venv::Venv;

const OPENAI: Venv = Venv {
    name: "openai",
    override_var: "XMOD_SHIM_OPENAI_VENV",
    packages: &["openai==1.109.1"],
    ready_check: "import openai",
};

/// Creates or reuses the virtualenv; returns its python.
pub fn python() -> anyhow::Result<PathBuf> {
    Ok(OPENAI.bin()?.join("python3"))
}

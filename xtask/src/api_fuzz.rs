//! schemathesis (PyPI) against `docs/openapi.yaml` on a live server: the bounded run is a test
//! in CI (`shim-cli/tests/e2e_schemathesis.rs`, which reads the `st` program from
//! `XMOD_SHIM_SCHEMATHESIS`); `cargo xtask fuzz-api --examples N` runs the same test longer.

use std::path::PathBuf;

use crate::venv::Venv;

const SCHEMATHESIS: Venv = Venv {
    name: "schemathesis",
    override_var: "XMOD_SHIM_SCHEMATHESIS_VENV",
    packages: &["schemathesis==4.32.5"],
    ready_check: "import schemathesis",
};

/// Creates or reuses the virtualenv; returns its `st` program.
pub fn st() -> anyhow::Result<PathBuf> {
    Ok(SCHEMATHESIS.bin()?.join("st"))
}

/// `fuzz-api [--examples N]`: the schemathesis test with N examples per operation.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let examples = match args {
        [] => "500".to_string(),
        [flag, n] if flag == "--examples" && n.parse::<u32>().is_ok() => n.clone(),
        _ => anyhow::bail!("usage: cargo xtask fuzz-api [--examples N]"),
    };
    let st = st()?;
    let examples = PathBuf::from(examples);
    super::cargo_with(
        &[
            "test",
            "--release",
            "-p",
            "shim-cli",
            "--test",
            "e2e_schemathesis",
            "--",
            "--nocapture",
        ],
        &[
            ("XMOD_SHIM_SCHEMATHESIS", st.as_path()),
            ("XMOD_SHIM_FUZZ_EXAMPLES", examples.as_path()),
        ],
    )
}

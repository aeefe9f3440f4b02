//! schemathesis (PyPI) against `docs/openapi.yaml` on the live binary: every operation, with
//! generated valid and invalid inputs. Passes only with 0 server errors and 0 responses that
//! break the documented schema. CI runs a bounded number of examples per operation;
//! `cargo xtask fuzz-api --examples N` runs more. The `st` program comes from
//! `XMOD_SHIM_SCHEMATHESIS` (set by `cargo xtask ci`).

mod common;

use std::process::Command;

use common::{Shim, free_port};

#[test]
fn schemathesis_finds_no_server_error_and_no_response_off_the_schema() {
    let Some(st) = std::env::var_os("XMOD_SHIM_SCHEMATHESIS") else {
        assert!(
            std::env::var("CI").is_err(),
            "XMOD_SHIM_SCHEMATHESIS is not set under CI: run the tests through `cargo xtask ci`"
        );
        eprintln!(
            "SKIPPED: set XMOD_SHIM_SCHEMATHESIS to schemathesis' `st` (cargo xtask fuzz-api)"
        );
        return;
    };
    let examples = std::env::var("XMOD_SHIM_FUZZ_EXAMPLES").unwrap_or_else(|_| "15".into());
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let _reaper = common::Reaper {
        marker: models.display().to_string(),
    };
    let shim = Shim::start(&dir.path().join("data"), &models, free_port());
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let out = Command::new(&st)
        .args(["run", schema, "--url", &shim.base])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--max-examples", &examples, "--seed", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--suppress-health-check", "all", "--workers", "2"])
        // Endless event streams: covered by their own tests.
        .args(["--exclude-path", "/api/v1/events"])
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", st.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:") || l.contains(" in "))
        .collect();
    eprintln!("schemathesis, {examples} examples per operation: {summary:#?}");
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.iter().any(|l| l.contains("generated")),
        "no test cases were generated:\n{stdout}"
    );
}

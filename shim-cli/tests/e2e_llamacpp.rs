//! A real inference engine end to end: llama.cpp (through llama-cpp-python's server) serving a
//! tiny random-weight GGUF model that the test writes, through the real binary and the process
//! runtime. The Python environment comes from `cargo xtask llama-env`; `cargo xtask ci` (what
//! `.ci/run` runs) creates it and passes its interpreter in `XMOD_SHIM_LLAMA_PYTHON`.

mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The python with llama-cpp-python and gguf that `cargo xtask ci` passes in
/// `XMOD_SHIM_LLAMA_PYTHON` (by hand: `XMOD_SHIM_LLAMA_PYTHON=$(cargo xtask llama-env)`).
fn llama_python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("XMOD_SHIM_LLAMA_PYTHON")?);
    let ok = Command::new(&python)
        .args(["-c", "import llama_cpp.server, gguf"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "XMOD_SHIM_LLAMA_PYTHON={} cannot import llama_cpp.server and gguf",
        python.display()
    );
    Some(python)
}

fn write_tiny_model(python: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/tiny_model.py");
    let status = Command::new(python)
        .arg(script)
        .arg(dir.join("tiny.gguf"))
        .status()
        .unwrap();
    assert!(status.success(), "writing the tiny model failed");
}

#[test]
fn llama_cpp_serves_a_generated_tiny_model_through_the_shim() {
    let Some(python) = llama_python() else {
        assert!(
            std::env::var("CI").is_err(),
            "XMOD_SHIM_LLAMA_PYTHON is not set: CI runs the tests through `cargo xtask ci`, which sets it"
        );
        eprintln!(
            "SKIPPED: set XMOD_SHIM_LLAMA_PYTHON=$(cargo xtask llama-env), or run `cargo xtask ci`"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    write_tiny_model(&python, &models.join("tiny"));
    std::fs::create_dir_all(models.join("corrupt")).unwrap();
    std::fs::write(
        models.join("corrupt/bad.gguf"),
        b"GGUF but not really a model",
    )
    .unwrap();
    // llama-server is preferred when installed; otherwise the preset falls back to
    // llama-cpp-python, whose interpreter is the virtualenv's.
    let config = dir.path().join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "engines:\n  llama-cpp-python:\n    command: [\"{}\", \"-m\", \"llama_cpp.server\"]\n    startupTimeoutSecs: 120\n",
            python.display()
        ),
    )
    .unwrap();
    let shim = Shim::start_with(
        &dir.path().join("data"),
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );

    let id = deploy(
        &shim,
        json!({ "modelName": "tiny", "engine": "llamacpp", "contextLength": 256 }),
    );
    let (status, seen) = wait_status(&shim, &id, 180, |d| {
        d["status"] == "running" || d["status"] == "failed"
    });
    assert_eq!(
        status["status"],
        "running",
        "{status}; seen {seen:?}; log:\n{}",
        read_log(&dir.path().join("data"))
    );
    let endpoint = status["endpoint"].as_str().unwrap().to_string();

    // A real completion: the engine tokenised, ran the weights and counted generated tokens.
    let reply = chat(&endpoint, "tiny");
    assert!(
        reply["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{reply}"
    );
    assert_eq!(reply["model"], "tiny");

    // Streaming: SSE chunks, then [DONE].
    let response = client()
        .post(&endpoint)
        .json(&json!({ "model": "tiny", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 8, "stream": true }))
        .send()
        .unwrap();
    assert!(response.status().is_success());
    let lines: Vec<String> = std::io::BufReader::new(response)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    assert_eq!(lines.last().unwrap(), "data: [DONE]");
    assert!(lines[0].contains("chat.completion.chunk"), "{}", lines[0]);

    // A corrupt model fails with the engine's own error in the message.
    let bad = deploy(
        &shim,
        json!({ "modelName": "corrupt", "engine": "llamacpp" }),
    );
    let (failed, _) = wait_status(&shim, &bad, 120, |d| d["status"] == "failed");
    let message = failed["message"].as_str().unwrap().to_lowercase();
    assert!(
        message.contains("gguf") || message.contains("failed to load"),
        "{failed}"
    );

    // Delete: notExist, and the engine process is gone.
    let pids = engine_pids(port_of(&endpoint));
    assert_eq!(pids.len(), 1, "one engine process on the endpoint's port");
    for id in [&id, &bad] {
        send(
            reqwest::Method::DELETE,
            &shim.url(&format!("/api/v1/modserv/{id}")),
            None,
        );
    }
    for id in [&id, &bad] {
        wait_status(&shim, id, 60, |d| d["status"] == "notExist");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pids[0]) {
        assert!(
            Instant::now() < deadline,
            "engine process {} survived delete",
            pids[0]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    shim.stop();
}

//! End to end through the real binary: the OpenAI gateway on the server's port, in front of
//! mock-engine replicas run by the process shimlet. The OpenAI Python SDK test needs a python
//! with the `openai` package: `cargo xtask ci` makes one and passes it in
//! `XMOD_SHIM_OPENAI_PYTHON` (by hand: `XMOD_SHIM_OPENAI_PYTHON=$(cargo xtask openai-env)`).

mod common;

use std::collections::HashSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};

const KEY: &str = "test-key";

/// A shim whose gateway needs [`KEY`], with `demo` deployed on two mock replicas that take
/// 1.5 s to load. Returns the shim, the service id, and the temp dir that must outlive them.
fn start_with_demo() -> (Shim, String, tempfile::TempDir, Reaper) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models: PathBuf = dir.path().join("models");
    let reaper = Reaper {
        marker: models.display().to_string(),
    };
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let config = dir.path().join("shim.yaml");
    std::fs::write(&config, format!("gateway:\n  apiKeys: [{KEY}]\n")).unwrap();
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    let id = deploy(
        &shim,
        json!({
            "modelName": "demo", "replicaCount": 2, "resourceRequirements": { "acceleratorCount": 0 },
            "env": [{ "key": "MOCK_STARTUP_DELAY_MS", "value": "1500" }]
        }),
    );
    (shim, id, dir, reaper)
}

fn gateway_post(shim: &Shim, path: &str, body: &Value) -> reqwest::blocking::Response {
    client()
        .post(shim.url(path))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .unwrap()
}

fn metrics(shim: &Shim) -> String {
    client()
        .get(shim.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn two_mock_replicas_behind_one_openai_endpoint() {
    let (shim, id, dir, _reaper) = start_with_demo();
    let data = dir.path().join("data");

    // Sent right after the deploy, while the model still loads: it waits and is answered.
    let status = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
    assert_ne!(status["data"]["status"], "running", "{status}");
    let response = gateway_post(
        &shim,
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(response.status(), 200, "log:\n{}", read_log(&data));
    let reply: Value = response.json().unwrap();
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("[mock engine]"),
        "{reply}"
    );

    // Both replicas serve: the gateway's per-replica counters name two base URLs.
    wait_status(&shim, &id, 30, |d| d["status"] == "running");
    for _ in 0..20 {
        let response = gateway_post(
            &shim,
            "/v1/chat/completions",
            &json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(response.status(), 200);
    }
    let text = metrics(&shim);
    let replicas: HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("xmod_shim_gateway_replica_requests_total{model=\"demo\""))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert_eq!(replicas.len(), 2, "{text}");
    assert!(
        text.contains("xmod_shim_http_requests_total"),
        "the API's metrics are still there"
    );

    // Streaming: one event per token, then the usage event and [DONE].
    let mut response = gateway_post(
        &shim,
        "/v1/chat/completions",
        &json!({"model": "demo", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "stream it"}], "max_tokens": 6}),
    );
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = String::new();
    response.read_to_string(&mut body).unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(events.len() > 4, "{body}");
    assert_eq!(events.last(), Some(&"[DONE]"));
    assert!(body.contains("\"usage\""), "{body}");
    let text = metrics(&shim);
    assert!(
        text.lines().any(|l| l
            .starts_with("xmod_shim_gateway_completion_tokens_total{model=\"demo\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );

    // The model list, keys and errors, in OpenAI's shapes.
    let list: Value = client()
        .get(shim.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["data"][0]["id"], "demo", "{list}");
    assert_eq!(list["data"][0]["status"], "running");
    assert_eq!(list["data"][0]["replicas"], 2);
    let response = client().get(shim.url("/v1/models")).send().unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    let response = gateway_post(
        &shim,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": []}),
    );
    assert_eq!(response.status(), 404);
    let body: Value = response.json().unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("demo"),
        "{body}"
    );
    // The admin API keeps its envelopes; the gateway key is not its token.
    let envelope = get(&shim.url("/api/v1/no-such-route")).unwrap();
    assert_eq!(envelope["code"], 404, "{envelope}");

    // The chat subcommand streams an answer through the gateway.
    let (ok, stdout, stderr) = shim.cli(&["chat", "demo", "hello from the cli", "--api-key", KEY]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("[mock engine]"), "{stdout}");
    let (ok, _, stderr) = shim.cli(&["chat", "nope", "hi", "--api-key", KEY]);
    assert!(!ok);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

/// The python with the `openai` package: `XMOD_SHIM_OPENAI_PYTHON`. Under CI its absence fails.
fn openai_python() -> Option<PathBuf> {
    let Some(python) = std::env::var_os("XMOD_SHIM_OPENAI_PYTHON") else {
        assert!(
            std::env::var("CI").is_err(),
            "XMOD_SHIM_OPENAI_PYTHON is not set: CI runs the tests through `cargo xtask ci`, which sets it"
        );
        return None;
    };
    let python = PathBuf::from(python);
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "XMOD_SHIM_OPENAI_PYTHON={} cannot import openai",
        python.display()
    );
    Some(python)
}

#[test]
fn the_official_openai_python_sdk_works_against_the_gateway() {
    let Some(python) = openai_python() else {
        eprintln!(
            "SKIPPED: set XMOD_SHIM_OPENAI_PYTHON=$(cargo xtask openai-env), or run `cargo xtask ci`"
        );
        return;
    };
    let (shim, id, dir, _reaper) = start_with_demo();
    wait_status(&shim, &id, 30, |d| d["status"] == "running");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .args([shim.base.as_str(), "demo", KEY])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai_sdk.py failed:\n{}\n{}\nshim log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read_log(&dir.path().join("data"))
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai sdk: ok"));
}

/// The llama.cpp python: `XMOD_SHIM_LLAMA_PYTHON`, set by `cargo xtask ci` (by hand:
/// `XMOD_SHIM_LLAMA_PYTHON=$(cargo xtask llama-env)`). Under CI its absence fails.
fn llama_python() -> Option<PathBuf> {
    let Some(python) = std::env::var_os("XMOD_SHIM_LLAMA_PYTHON") else {
        assert!(
            std::env::var("CI").is_err(),
            "XMOD_SHIM_LLAMA_PYTHON is not set: CI runs the tests through `cargo xtask ci`, which sets it"
        );
        return None;
    };
    let python = PathBuf::from(python);
    let ok = Command::new(&python)
        .args(["-c", "import llama_cpp.server, gguf"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "XMOD_SHIM_LLAMA_PYTHON={} cannot import llama_cpp.server and gguf",
        python.display()
    );
    Some(python)
}

#[test]
fn real_llama_cpp_with_two_replicas_streams_through_the_gateway() {
    let Some(python) = llama_python() else {
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
    std::fs::create_dir_all(models.join("tiny")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/tiny_model.py");
    let status = Command::new(&python)
        .arg(script)
        .arg(models.join("tiny/tiny.gguf"))
        .status()
        .unwrap();
    assert!(status.success(), "writing the tiny model failed");
    let config = dir.path().join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "engines:\n  llama-cpp-python:\n    command: [\"{}\", \"-m\", \"llama_cpp.server\"]\n    startupTimeoutSecs: 120\n",
            python.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    let id = deploy(
        &shim,
        json!({ "modelName": "tiny", "engine": "llamacpp", "contextLength": 256, "replicaCount": 2 }),
    );
    let (status, seen) = wait_status(&shim, &id, 180, |d| {
        d["status"] == "running" || d["status"] == "failed"
    });
    assert_eq!(
        status["status"],
        "running",
        "{status}; seen {seen:?}; log:\n{}",
        read_log(&data)
    );

    for _ in 0..6 {
        let mut response = client()
            .post(shim.url("/v1/chat/completions"))
            .json(&json!({"model": "tiny", "stream": true, "max_tokens": 8,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = String::new();
        response.read_to_string(&mut body).unwrap();
        let events: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert!(events.len() >= 2, "{body}");
        assert!(events[0].contains("chat.completion.chunk"), "{body}");
        assert_eq!(events.last(), Some(&"[DONE]"));
    }
    let text = metrics(&shim);
    let replicas = text
        .lines()
        .filter(|l| l.starts_with("xmod_shim_gateway_replica_requests_total{model=\"tiny\""))
        .filter(|l| !l.ends_with(" 0"))
        .count();
    assert_eq!(replicas, 2, "both llama.cpp replicas served: {text}");
}

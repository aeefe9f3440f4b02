//! End to end on one machine: the real `model-serve-shim` binary, the process runtime, the
//! built-in mock engine as real child processes, real HTTP and the real file store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_model-serve-shim");

/// A running shim; killed on drop so a failing test leaves nothing behind.
struct Shim {
    child: Child,
    base: String,
}

impl Shim {
    fn start(data: &Path, models: &Path, port: u16) -> Shim {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("shim.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--default-engine",
                "mock",
            ])
            .arg("--data-dir")
            .arg(data)
            .arg("--model-root")
            .arg(models)
            .env("XMOD_SHIM_ENGINE__RESYNCINTERVALSECS", "2")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start model-serve-shim");
        let shim = Shim {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&format!("{}/healthz", shim.base)).is_err() {
            assert!(
                Instant::now() < deadline,
                "shim did not come up; log:\n{}",
                read_log(data)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        shim
    }

    /// SIGTERM and wait: a graceful stop that leaves the engines running.
    fn stop(mut self) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "shim did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_log(data: &Path) -> String {
    std::fs::read_to_string(data.join("shim.log")).unwrap_or_default()
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn get(url: &str) -> reqwest::Result<Value> {
    client().get(url).send()?.json()
}

/// Sends exactly what the real client sends: JSON with a charset parameter.
fn send(method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json;charset=utf-8")
            .body(body.to_string());
    }
    request.send().unwrap().json().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls a service until `done` holds for its status data; returns every status word seen.
fn wait_status(
    shim: &Shim,
    id: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> (Value, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let envelope = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
        assert_eq!(envelope["code"], 0, "{envelope}");
        let data = envelope["data"].clone();
        let word = data["status"].as_str().unwrap().to_string();
        assert!(
            [
                "pending",
                "initializing",
                "running",
                "failed",
                "terminating",
                "notExist"
            ]
            .contains(&word.as_str()),
            "not one of the client's six words: {word}"
        );
        if word != "running" {
            assert_eq!(
                data["endpoint"], "",
                "endpoint must be empty until running: {data}"
            );
        }
        if seen.last() != Some(&word) {
            seen.push(word);
        }
        if done(&data) {
            return (data, seen);
        }
        assert!(
            Instant::now() < deadline,
            "timed out; last status {data}; seen {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(endpoint: &str, model: &str) -> Value {
    let response = client()
        .post(endpoint)
        .json(&json!({ "model": model, "messages": [{ "role": "user", "content": "hello" }], "max_tokens": 8 }))
        .send()
        .unwrap();
    assert!(
        response.status().is_success(),
        "chat failed: {}",
        response.status()
    );
    response.json().unwrap()
}

/// Pids of mock engines listening on `port` (found by their command line).
fn engine_pids(port: u16) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_engine = args.iter().any(|a| a == "mock-engine");
        let on_port = args
            .windows(2)
            .any(|w| w[0] == "--port" && w[1] == port.to_string());
        if is_engine && on_port {
            pids.push(pid);
        }
    }
    pids
}

fn port_of(endpoint: &str) -> u16 {
    let url = reqwest::Url::parse(endpoint).unwrap();
    url.port().unwrap()
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its entry remains until reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn deploy(shim: &Shim, body: Value) -> String {
    let envelope = send(
        reqwest::Method::POST,
        &shim.url("/api/v1/modserv/deploy"),
        Some(body),
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    envelope["data"]["serviceId"].as_str().unwrap().to_string()
}

#[test]
fn deploy_run_repair_restart_and_delete_two_mock_services_through_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models: PathBuf = dir.path().join("models");
    for name in ["alpha", "beta", "broken"] {
        std::fs::create_dir_all(models.join(name)).unwrap();
    }
    let port = free_port();
    let shim = Shim::start(&data, &models, port);

    // /list shows the models under the root, as the client expects.
    let list = get(&shim.url("/api/v1/modserv/list")).unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta", "broken"]);

    // The client's own body shape; the engine preset comes from --default-engine mock.
    // Alpha loads slowly, so it is seen initializing first.
    let alpha = deploy(
        &shim,
        json!({
            "modelName": "alpha", "replicaCount": 1, "resourceRequirements": { "acceleratorCount": 0 },
            "contextLength": 2048, "env": [{ "key": "MOCK_STARTUP_DELAY_MS", "value": "1500" }]
        }),
    );
    let beta = deploy(
        &shim,
        json!({ "modelName": "beta", "resourceRequirements": {} }),
    );
    let broken = deploy(
        &shim,
        json!({
            "modelName": "broken", "env": [{ "key": "MOCK_FAIL_AT_START", "value": "7" }]
        }),
    );

    let (alpha_status, seen) = wait_status(&shim, &alpha, 60, |d| d["status"] == "running");
    assert!(
        seen.contains(&"initializing".to_string()),
        "alpha was never seen initializing: {seen:?}"
    );
    assert!(
        !seen.contains(&"failed".to_string()),
        "a loading model must not be reported failed: {seen:?}"
    );
    let (beta_status, _) = wait_status(&shim, &beta, 60, |d| d["status"] == "running");
    let updated = alpha_status["updateTime"].as_str().unwrap();
    assert!(
        updated.len() == 19 && updated.as_bytes()[10] == b' ',
        "updateTime {updated}"
    );

    // A real chat completion through each returned endpoint.
    for (status, model) in [(&alpha_status, "alpha"), (&beta_status, "beta")] {
        let endpoint = status["endpoint"].as_str().unwrap();
        assert!(endpoint.ends_with("/v1/chat/completions"), "{endpoint}");
        let reply = chat(endpoint, model);
        assert!(
            reply["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("[mock engine]")
        );
        assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }

    // A model that cannot load fails with the engine's own words.
    let (failed, _) = wait_status(&shim, &broken, 60, |d| d["status"] == "failed");
    assert!(
        failed["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failed}"
    );
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("failed to load model weights"),
        "{failed}"
    );

    // Kill beta's engine by hand: it is repaired (running again) or failed with a reason.
    let beta_port = port_of(beta_status["endpoint"].as_str().unwrap());
    let killed = engine_pids(beta_port);
    assert_eq!(killed.len(), 1, "expected one engine on port {beta_port}");
    Command::new("kill")
        .args(["-9", &killed[0].to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let repaired = loop {
        let d = get(&shim.url(&format!("/api/v1/modserv/{beta}"))).unwrap()["data"].clone();
        let pids = d["endpoint"]
            .as_str()
            .filter(|e| !e.is_empty())
            .map(|e| engine_pids(port_of(e)))
            .unwrap_or_default();
        if d["status"] == "running" && !pids.is_empty() && !pids.contains(&killed[0]) {
            break d;
        }
        if d["status"] == "failed" {
            assert!(d["reason"].as_str().is_some_and(|r| !r.is_empty()), "{d}");
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "beta was neither repaired nor failed: {d}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        repaired["status"], "running",
        "the mock engine restarts cleanly, so it is repaired: {repaired}"
    );
    chat(repaired["endpoint"].as_str().unwrap(), "beta");
    let events = get(&shim.url(&format!("/api/v1/modserv/{beta}/events")))
        .unwrap()
        .to_string();
    assert!(
        events.contains("Exited") || events.contains("exit"),
        "the crash is in the history: {events}"
    );

    // Restart the shim: both services are still there and running, engines adopted, not replaced.
    let alpha_pids = engine_pids(port_of(alpha_status["endpoint"].as_str().unwrap()));
    shim.stop();
    assert!(
        alpha_pids.iter().all(|p| alive(*p)),
        "a graceful stop leaves engines running"
    );
    let shim = Shim::start(&data, &models, port);
    for id in [&alpha, &beta] {
        let (status, _) = wait_status(&shim, id, 30, |d| d["status"] == "running");
        chat(
            status["endpoint"].as_str().unwrap(),
            if id == &alpha { "alpha" } else { "beta" },
        );
    }
    let alpha_after = get(&shim.url(&format!("/api/v1/modserv/{alpha}"))).unwrap()["data"].clone();
    assert_eq!(
        engine_pids(port_of(alpha_after["endpoint"].as_str().unwrap())),
        alpha_pids,
        "adopted, not replaced"
    );
    let all = get(&shim.url("/api/v1/modserv")).unwrap();
    assert_eq!(all["data"].as_array().unwrap().len(), 3, "{all}");

    // Delete everything: terminating, then notExist, and the engine processes are gone.
    let mut pids = alpha_pids.clone();
    pids.extend(engine_pids(port_of(
        get(&shim.url(&format!("/api/v1/modserv/{beta}"))).unwrap()["data"]["endpoint"]
            .as_str()
            .unwrap(),
    )));
    for id in [&alpha, &beta, &broken] {
        let envelope = send(
            reqwest::Method::DELETE,
            &shim.url(&format!("/api/v1/modserv/{id}")),
            None,
        );
        assert_eq!(envelope["code"], 0, "{envelope}");
    }
    for id in [&alpha, &beta, &broken] {
        wait_status(&shim, id, 60, |d| d["status"] == "notExist");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "engine processes survived delete: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    shim.stop();
}

#[test]
fn the_cli_deploys_with_wait_lists_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("gamma")).unwrap();
    let shim = Shim::start(&data, &models, free_port());
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("XMOD_SHIM_SERVER", &shim.base)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&[
        "deploy",
        "gamma",
        "--engine",
        "mock",
        "--wait",
        "--timeout",
        "60",
    ]);
    assert!(ok, "deploy --wait failed: {out}\n{err}");
    assert!(out.contains("status: running"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("serviceId: "))
        .unwrap()
        .to_string();
    let endpoint = out
        .lines()
        .find_map(|l| l.strip_prefix("endpoint: "))
        .unwrap()
        .to_string();
    chat(&endpoint, "gamma");
    // Without a terminal the progress bar is printed as one line per step change.
    assert!(
        err.contains("wait_ready") || err.contains("running"),
        "progress was shown: {err}"
    );

    let (ok, out, _) = cli(&["list"]);
    assert!(ok && out.contains(&id) && out.contains("running"), "{out}");
    let (ok, out, _) = cli(&["plugins"]);
    assert!(
        ok && out.contains("* process") && out.contains("* opensourcellm"),
        "{out}"
    );
    let (ok, out, _) = cli(&["logs", &id, "--tail", "20"]);
    assert!(ok && out.contains("mock engine"), "{out}");
    let (ok, out, err) = cli(&["deploy", "../etc", "--engine", "mock"]);
    assert!(!ok && err.contains("modelName"), "{out}{err}");
    let (ok, out, _) = cli(&["delete", &id, "--wait"]);
    assert!(ok && out.contains("notExist"), "{out}");
    shim.stop();
}

//! End to end on one machine: the real `model-serve-shim` binary, the process runtime, the
//! built-in mock engine as real child processes, real HTTP and the real file store.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn deploy_run_repair_restart_and_delete_two_mock_services_through_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models: PathBuf = dir.path().join("models");
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
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
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    std::fs::create_dir_all(models.join("gamma")).unwrap();
    let port = free_port();
    let shim = Shim::start(&data, &models, port);
    let cli = |args: &[&str]| shim.cli(args);
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

    // kill -9 the shim: nothing accepted is lost, and the running engine is adopted again.
    let mut shim = shim;
    shim.child.kill().unwrap();
    shim.child.wait().unwrap();
    drop(shim);
    let shim = Shim::start(&data, &models, port);
    let cli = |args: &[&str]| shim.cli(args);
    wait_status(&shim, &id, 30, |d| {
        d["status"] == "running" && d["endpoint"] == endpoint.as_str()
    });
    chat(&endpoint, "gamma");

    let (ok, out, _) = cli(&["list"]);
    assert!(ok && out.contains(&id) && out.contains("running"), "{out}");
    // Dry run through the process runtime: the plan, nothing started.
    let (ok, out, err) = cli(&["render", "gamma", "--engine", "mock", "--replicas", "2"]);
    assert!(ok, "{out}{err}");
    let rendered: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rendered["workloads"][0]["replicas"], 2, "{rendered}");
    assert!(
        rendered["manifests"][0].to_string().contains("mock-engine"),
        "{rendered}"
    );
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

#[test]
fn gpus_are_never_shared_and_a_service_that_does_not_fit_waits_as_pending() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    std::fs::create_dir_all(models.join("m")).unwrap();
    // A host with one GPU, declared in config (no real GPU is needed to test the allocator).
    let config = dir.path().join("shim.yaml");
    std::fs::write(&config, "engine:\n  gpus: [\"0\"]\n  defaultEngine: mock\n").unwrap();
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    let gpu =
        |n: u32| json!({ "modelName": "m", "resourceRequirements": { "acceleratorCount": n } });

    let first = deploy(&shim, gpu(1));
    wait_status(&shim, &first, 60, |d| d["status"] == "running");

    // Too many for the host, and one more than is free: both wait with the reason.
    let too_many = deploy(&shim, gpu(2));
    let second = deploy(&shim, gpu(1));
    for id in [&too_many, &second] {
        let (status, _) = wait_status(&shim, id, 30, |d| d["reason"] == "Unschedulable");
        assert_eq!(status["status"], "pending", "{status}");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("insufficient GPUs"),
            "{status}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let still = get(&shim.url(&format!("/api/v1/modserv/{second}"))).unwrap()["data"].clone();
    assert_eq!(
        still["status"], "pending",
        "stays pending while it retries: {still}"
    );

    // Freeing the GPU lets the waiting service run.
    send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{first}")),
        None,
    );
    wait_status(&shim, &second, 90, |d| d["status"] == "running");
    let waiting = get(&shim.url(&format!("/api/v1/modserv/{too_many}"))).unwrap()["data"].clone();
    assert_eq!(waiting["status"], "pending", "{waiting}");
    shim.stop();
}

/// Secret environment values (names with KEY, TOKEN, SECRET or PASSWORD) never appear in a dry
/// run, though the engine itself gets them.
#[test]
fn a_dry_run_shows_secret_environment_values_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let shim = Shim::start(&dir.path().join("data"), &models, free_port());
    let envelope = send(
        reqwest::Method::POST,
        &shim.url("/api/v1/modserv/deploy?dryRun=true"),
        Some(json!({"modelName": "demo", "engine": "mock", "env": [
            {"key": "HF_TOKEN", "value": "hf_very_secret"},
            {"key": "OPENAI_API_KEY", "value": "sk-very-secret"},
            {"key": "HF_HUB_OFFLINE", "value": "1"}
        ]})),
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    let text = envelope.to_string();
    assert!(
        !text.contains("very_secret") && !text.contains("very-secret"),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains("HF_HUB_OFFLINE"), "{text}");
}

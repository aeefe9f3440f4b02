//! The binary facing faults of its own host: a damaged state file, and SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Reaper, Shim, alive, deploy, engine_pids, free_port, port_of, wait_status};
use serde_json::json;

/// A state file that is not a database stops the start with a message that names the file
/// and the way out; the shim never starts empty over it.
#[test]
fn a_damaged_state_file_stops_the_start_with_its_name_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let state = data.join("state.redb");
    std::fs::write(&state, vec![0x41u8; 8192]).unwrap();
    let out = Command::new(BIN)
        .args(["--port", &free_port().to_string(), "--data-dir"])
        .arg(&data)
        .arg("--model-root")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started over a damaged file:\n{stderr}"
    );
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("mv "),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        vec![0x41u8; 8192],
        "the damaged file was changed"
    );
}

/// SIGTERM: the server stops accepting, lets a request in flight (a slow streamed answer through
/// the gateway) finish, exits 0 within 10 s, and leaves the engines running for the next start
/// to adopt.
#[test]
fn sigterm_exits_0_within_10_s_and_leaves_engines_for_re_adoption() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    let data = dir.path().join("data");
    let port = free_port();
    let mut shim = Shim::start(&data, &models, port);
    let id = deploy(
        &shim,
        json!({"modelName": "demo", "engine": "mock", "replicaCount": 1,
               "env": [{"key": "MOCK_TOKEN_DELAY_MS", "value": "500"}]}),
    );
    let (running, _) = wait_status(&shim, &id, 60, |d| d["status"] == "running");
    let engine_port = port_of(running["endpoint"].as_str().unwrap());
    let engines = engine_pids(engine_port);
    assert_eq!(engines.len(), 1);

    // A streamed answer, its tokens 500 ms apart (about 2 s), in flight when SIGTERM arrives.
    let chat_url = shim.url("/v1/chat/completions");
    let in_flight = std::thread::spawn(move || {
        let sent = Instant::now();
        let response = common::client()
            .post(chat_url)
            .json(&json!({"model": "demo", "stream": true, "max_tokens": 10,
                          "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .and_then(|r| r.text());
        response
            .map(|text| (text, sent.elapsed()))
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(400));

    Command::new("kill")
        .args(["-TERM", &shim.child.id().to_string()])
        .status()
        .unwrap();
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = shim.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "exited {status} {:.2} s after SIGTERM",
        stopping.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{status}");
    let (streamed, took) = in_flight
        .join()
        .unwrap()
        .expect("the request in flight failed");
    eprintln!("the streamed answer in flight took {took:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "the answer was not slow enough to be in flight at SIGTERM ({took:?})"
    );
    assert!(
        streamed.trim_end().ends_with("data: [DONE]"),
        "the request in flight was cut: {streamed}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting connections"
    );
    assert!(alive(engines[0]), "the engine was stopped with the shim");
    drop(shim);

    let shim = Shim::start(&data, &models, port);
    let (adopted, _) = wait_status(&shim, &id, 30, |d| d["status"] == "running");
    assert_eq!(adopted["endpoint"], running["endpoint"]);
    assert_eq!(engine_pids(engine_port), engines, "not re-adopted");
}

/// Processes whose command line mentions `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if pid != std::process::id()
            && alive(pid)
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            pids.push(pid);
        }
    }
    pids
}

/// kill -9 of the shim with 100 deploys in flight: after a restart, 100 engines run, one per
/// service, none orphaned and none twice.
#[test]
fn kill_9_with_100_deploys_in_flight_leaves_100_engines_no_orphans_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let marker = models.join("demo").display().to_string();
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    let data = dir.path().join("data");
    let port = free_port();
    let mut shim = Shim::start(&data, &models, port);
    let ids: Vec<String> = (0..100)
        .map(|_| {
            deploy(
                &shim,
                json!({"modelName": "demo", "engine": "mock", "replicaCount": 1}),
            )
        })
        .collect();
    shim.child.kill().unwrap(); // SIGKILL, with most deploys still starting
    shim.child.wait().unwrap();
    eprintln!(
        "engines when the shim was killed: {}",
        processes_with(&marker).len()
    );
    drop(shim);

    let shim = Shim::start(&data, &models, port);
    let started = Instant::now();
    let mut ports = std::collections::BTreeSet::new();
    for id in &ids {
        let (running, _) = wait_status(&shim, id, 300, |d| d["status"] == "running");
        let port = port_of(running["endpoint"].as_str().unwrap());
        assert!(ports.insert(port), "two services share port {port}");
        assert_eq!(engine_pids(port).len(), 1, "service {id} on port {port}");
    }
    eprintln!(
        "all 100 running {:.1} s after the restart",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        processes_with(&marker).len(),
        100,
        "orphaned or duplicate engines"
    );
}

//! The binary with the Docker shimlet against the real Docker Engine: kill -9 of the shim with
//! 50 deploys in flight ends, after a restart, with all 50 running and exactly one container
//! each. Without a Docker Engine the test skips with a notice, except under `CI=true`, where it
//! fails.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::time::{Duration, Instant};

use common::{Shim, deploy, free_port, wait_status};
use docker::{Cleanup, containers_of, docker_available};
use serde_json::json;

#[path = "../../xtask/src/docker_image.rs"]
mod docker_image;

#[test]
fn kill_9_with_50_deploys_in_flight_ends_with_50_running_and_one_container_each() {
    if !docker_available() {
        return;
    }
    docker_image::run(&["--if-missing".to_string()]).expect("building the mock-engine image");
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut shim = Shim::start_with(&data, &models, port, &["--shimlet", "docker"]);
    let mut cleanup = Cleanup::default();
    for _ in 0..50 {
        let id = deploy(
            &shim,
            json!({"modelName": "demo", "engine": "mock", "replicaCount": 1}),
        );
        cleanup.services.push(id);
    }
    shim.child.kill().unwrap(); // SIGKILL, with containers still being created
    shim.child.wait().unwrap();
    let created: usize = cleanup
        .services
        .iter()
        .map(|id| containers_of(id).len())
        .sum();
    eprintln!("containers when the shim was killed: {created} of 50");
    drop(shim);

    let shim = Shim::start_with(&data, &models, port, &["--shimlet", "docker"]);
    let started = Instant::now();
    for id in &cleanup.services {
        wait_status(&shim, id, 300, |d| d["status"] == "running");
    }
    eprintln!(
        "all 50 running {:.1} s after the restart",
        started.elapsed().as_secs_f64()
    );
    for id in &cleanup.services {
        assert_eq!(containers_of(id).len(), 1, "service {id}");
    }
    // Nothing else of the shim's in Docker for these services, and nothing left to start.
    std::thread::sleep(Duration::from_secs(1));
    let total: usize = cleanup
        .services
        .iter()
        .map(|id| containers_of(id).len())
        .sum();
    assert_eq!(total, 50);
}

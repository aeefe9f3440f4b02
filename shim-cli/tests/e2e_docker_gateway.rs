//! The OpenAI gateway in front of two replicas on the Docker shimlet, against the real Docker
//! Engine: the mock engine runs in containers of an image built here from this very binary
//! (`FROM scratch`, no registry; see `xtask/src/docker_image.rs`). The shim reports each
//! container's published port as a replica, and requests through `/v1/chat/completions`,
//! streamed and not, are answered by both containers (each names itself in a response header).
//! Without a Docker Engine the test skips with a notice, except under `CI=true`, where it fails.

mod common;
#[path = "common/docker.rs"]
mod docker;
// Only `build` is used here; the rest serves the xtask.
#[allow(dead_code)]
#[path = "../../xtask/src/docker_image.rs"]
mod docker_image;

use std::collections::BTreeSet;
use std::path::Path;

use common::{BIN, Shim, deploy, free_port, gateway_chat, read_log, replicas_of, wait_status};
use docker::{Cleanup, containers_of, docker_available, inspect};
use serde_json::json;

#[test]
fn both_containers_of_a_two_replica_service_answer_through_the_gateway() {
    if !docker_available() {
        return;
    }
    // This build's binary, under a tag of the test's own: the shared `:latest` may hold another
    // checkout's build.
    let image = format!("xmod-shim/mock-engine:e2e-gateway-{}", std::process::id());
    let mut cleanup = Cleanup::default();
    cleanup.images.push(image.clone());
    docker_image::build(&image, Path::new(BIN)).expect("building the mock-engine image");

    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("shim.yaml");
    let settings = json!({"engines": {"mock": {"image": image}}});
    std::fs::write(&config, serde_yaml::to_string(&settings).unwrap()).unwrap();
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--shimlet", "docker", "--config", config.to_str().unwrap()],
    );
    let id = deploy(
        &shim,
        json!({"modelName": "demo", "engine": "mock", "replicaCount": 2,
               "resourceRequirements": {"acceleratorCount": 0}}),
    );
    cleanup.services.push(id.clone());
    wait_status(&shim, &id, 120, |d| d["status"] == "running");

    // The replicas are the containers' published ports, every one of them.
    let containers = containers_of(&id);
    assert_eq!(containers.len(), 2, "{containers:?}");
    let published = |c: &String| {
        inspect(
            c,
            "{{range $port, $bindings := .NetworkSettings.Ports}}{{range $bindings}}{{.HostIp}}:{{.HostPort}}{{end}}{{end}}",
        )
    };
    let mut expected: Vec<String> = containers
        .iter()
        .map(|c| format!("http://{}", published(c)))
        .collect();
    expected.sort();
    assert_eq!(
        replicas_of(&shim, &id),
        expected,
        "log:\n{}",
        read_log(&data)
    );

    // Both containers answer, plain and streamed; each names itself by its hostname.
    let hostnames: BTreeSet<String> = containers
        .iter()
        .map(|c| inspect(c, "{{.Config.Hostname}}"))
        .collect();
    assert_eq!(hostnames.len(), 2, "{hostnames:?}");
    for stream in [false, true] {
        let answered: BTreeSet<String> = (0..12)
            .map(|_| gateway_chat(&shim, "demo", stream).host)
            .collect();
        assert_eq!(answered, hostnames, "stream: {stream}");
    }
    eprintln!("replicas {expected:?} answered as {hostnames:?}");
}

//! The real Docker Engine for tests: whether one answers, the containers of a service, networks,
//! and removal of what a test made (containers, networks, images) however it ends. Without an engine the tests
//! skip with a notice, except under `CI=true`, where they fail.
#![allow(dead_code)]

use std::process::Command;

/// Label the Docker shimlet puts on every container with its service id.
pub const SERVICE_LABEL: &str = "xmod-shim.service-id";

/// Whether a Docker Engine answers; panics under `CI=true` when none does.
pub fn docker_available() -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no Docker Engine reachable on CI; this test must run there"
        );
        eprintln!("SKIPPED: no Docker Engine reachable");
    }
    ok
}

/// Ids of every container (running or not) of service `id`.
pub fn containers_of(id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label={SERVICE_LABEL}={id}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// `docker inspect --format <format> <container>`, trimmed.
pub fn inspect(container: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, container])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker inspect {container}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker <args>`; panics unless it succeeds; returns its output, trimmed.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Creates bridge network `name` on the first free subnet of `candidates` (the Docker Engine
/// refuses one that overlaps another network); returns that subnet.
pub fn create_network(name: &str, candidates: &[String]) -> String {
    for subnet in candidates {
        let out = Command::new("docker")
            .args([
                "network", "create", "--driver", "bridge", "--subnet", subnet, name,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return subnet.clone();
        }
        eprintln!(
            "docker network create --subnet {subnet}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    panic!("no free subnet among {candidates:?} for network {name}");
}

/// Removes, on drop, the listed containers and those of the listed services, then the listed
/// networks and images.
#[derive(Default)]
pub struct Cleanup {
    pub services: Vec<String>,
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let all: Vec<String> = self
            .services
            .iter()
            .flat_map(|id| containers_of(id))
            .chain(self.containers.iter().cloned())
            .collect();
        if !all.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&all)
                .output();
        }
        if !self.networks.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm"])
                .args(&self.networks)
                .output();
        }
        if !self.images.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f"])
                .args(&self.images)
                .output();
        }
    }
}

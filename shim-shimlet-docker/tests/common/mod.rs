//! Helpers for the tests that run against the real Docker Engine.
//!
//! The mock-engine image is built with the very recipe `cargo xtask docker-image` uses: its
//! source file is compiled into these tests (it depends on `std` and `anyhow` only), so the two
//! can never drift apart.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shim_core::queue::WorkQueue;
use shim_core::{EngineConfig, GpuAllocator, ModelVolume, Notifier, ShimletContext, WorkloadSpec};
use shim_shimlet_docker::{DockerShimlet, LABEL_SERVICE_ID};

#[path = "../../../xtask/src/docker_image.rs"]
mod docker_image;

/// The mock engine's image.
pub const IMAGE: &str = docker_image::MOCK_ENGINE_IMAGE;
/// Served model name the tests deploy.
pub const SERVED_NAME: &str = "tiny";

/// Whether a Docker Engine answers. Without one the test prints a plain skip notice and
/// returns early; on CI (`CI=true`) it fails instead, since there the engine must be present.
pub async fn engine_available() -> bool {
    let reachable = async {
        let docker = bollard::Docker::connect_with_defaults()?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(())
    };
    let error = match tokio::time::timeout(Duration::from_secs(5), reachable).await {
        Ok(Ok(())) => return true,
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no answer within 5s".to_string(),
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no Docker Engine reachable on CI ({error}); these tests must run there"
    );
    eprintln!("SKIPPED: no Docker Engine reachable ({error})");
    false
}

/// Builds the mock-engine image once per test process when the engine lacks it.
pub fn ensure_image() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let started = Instant::now();
        docker_image::run(&["--if-missing".to_string()])
            .unwrap_or_else(|e| panic!("building {IMAGE} failed: {e:#}"));
        eprintln!("{IMAGE} ready after {:?}", started.elapsed());
        *built = true;
    }
}

/// A service id unique to this test process and test.
pub fn service_id(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

/// A shimlet context with the given `shimlets.docker` section and GPU ids.
pub fn context(docker_section: serde_json::Value, gpus: Vec<String>) -> ShimletContext {
    let config = EngineConfig {
        plugins: Arc::new(serde_json::json!({ "shimlets": { "docker": docker_section } })),
        ..EngineConfig::default()
    };
    ShimletContext {
        settings: config.plugin_settings(),
        state_dir: std::env::temp_dir(),
        notifier: Notifier::detached(),
        gpus: Arc::new(GpuAllocator::new(gpus, false)),
    }
}

/// A shimlet whose notifier feeds a work queue the test reads, as the engine's reconciler would.
pub async fn shimlet_with_queue() -> (DockerShimlet, Arc<WorkQueue>) {
    let queue = Arc::new(WorkQueue::new());
    let ctx = ShimletContext {
        notifier: Notifier::new(queue.clone()),
        ..context(serde_json::Value::Null, Vec::new())
    };
    let shimlet = DockerShimlet::connect(ctx)
        .await
        .expect("connecting to the Docker Engine");
    (shimlet, queue)
}

/// A shimlet with the default configuration.
pub async fn shimlet() -> DockerShimlet {
    DockerShimlet::connect(context(serde_json::Value::Null, Vec::new()))
        .await
        .expect("connecting to the Docker Engine")
}

/// One replica of the mock engine serving `model_dir` as [`SERVED_NAME`].
pub fn mock_workload(service_id: &str, model_dir: &Path) -> WorkloadSpec {
    let mut workload = WorkloadSpec::new(service_id, 1, IMAGE);
    workload.model_name = SERVED_NAME.into();
    workload.args = [
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--served-model-name",
        SERVED_NAME,
        "{model_dir}",
    ]
    .map(String::from)
    .to_vec();
    workload.model = Some(ModelVolume {
        host_path: model_dir.to_path_buf(),
        mount_path: "/models/tiny".into(),
    });
    workload.health.period = Duration::from_millis(100);
    workload.health.startup_timeout = Duration::from_secs(30);
    workload
}

/// Polls `observe` until `done` holds (shared by every shimlet's tests).
#[allow(unused_imports)] // not every test file polls
pub use shim_core::testing::observe_until as wait_for;

/// Runs the docker CLI; stdout, trimmed.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("running the docker CLI");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Ids of every container (running or not) labelled with `service_id`.
pub fn containers_of(service_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={LABEL_SERVICE_ID}={service_id}"),
    ])
    .lines()
    .map(String::from)
    .collect()
}

/// Removes a service's containers when the test ends, whether it passed or not.
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Never panics: a panic while a failed test unwinds would abort the whole run.
        let label = format!("label={LABEL_SERVICE_ID}={}", self.0);
        let Ok(listed) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        else {
            return;
        };
        let ids = String::from_utf8_lossy(&listed.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .output();
        }
    }
}

/// A chat completion through the published port; the reply's text.
pub async fn chat(address: &str) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{address}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": "hello docker"}],
        }))
        .send()
        .await
        .expect("chat request");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("chat body");
    assert_eq!(body["model"], SERVED_NAME);
    body["choices"][0]["message"]["content"]
        .as_str()
        .expect("a reply")
        .to_string()
}

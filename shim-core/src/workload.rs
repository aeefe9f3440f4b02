//! The runtime-agnostic description of what to run, which every shimlet realises.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a runtime needs to run one model service: rendered by a pipeline, realised by a
/// shimlet (as child processes, containers, or a Deployment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The service this workload belongs to; shimlets label what they create with it.
    pub service_id: String,
    /// Spec generation it was rendered from.
    pub generation: u64,
    /// Human-readable model name (labels, annotations, logs).
    pub model_name: String,
    /// Container image (Docker, Kubernetes).
    pub image: String,
    /// Program and leading arguments for runtimes that run on the host (the process runtime).
    pub command: Vec<String>,
    /// Container entrypoint override (Docker, Kubernetes `command`); empty keeps the image's.
    pub entrypoint: Vec<String>,
    /// Arguments, with placeholders each runtime fills in (see [`WorkloadSpec::render_args`]):
    /// `{host}` (address to bind), `{port}` (port to listen on), `{model_dir}` (model directory
    /// as the engine sees it).
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Port the engine listens on inside its container; the process runtime allocates one instead
    /// and substitutes it for `{port}` in args.
    pub port: u16,
    /// Resource needs of one replica.
    pub resources: Resources,
    /// Model files to make visible to the engine.
    pub model: Option<ModelVolume>,
    /// How to tell the engine is ready.
    pub health: HealthProbe,
    /// Replicas wanted; 0 means scaled to zero.
    pub replicas: u32,
    /// Extra labels (name → value) for runtime objects.
    pub labels: BTreeMap<String, String>,
}

impl WorkloadSpec {
    /// A workload of one replica with defaults for everything but the image.
    pub fn new(service_id: impl Into<String>, generation: u64, image: impl Into<String>) -> Self {
        Self {
            service_id: service_id.into(),
            generation,
            model_name: String::new(),
            image: image.into(),
            command: Vec::new(),
            entrypoint: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            port: 8000,
            resources: Resources::default(),
            model: None,
            health: HealthProbe::default(),
            replicas: 1,
            labels: BTreeMap::new(),
        }
    }

    /// Args with the placeholders filled in: `{host}`, `{port}` and `{model_dir}`.
    /// The process runtime passes 127.0.0.1, an allocated port and the host path; container
    /// runtimes pass 0.0.0.0, [`WorkloadSpec::port`] and the mount path.
    pub fn render_args(&self, host: &str, port: u16, model_dir: &str) -> Vec<String> {
        self.args
            .iter()
            .map(|a| {
                a.replace("{host}", host)
                    .replace("{port}", &port.to_string())
                    .replace("{model_dir}", model_dir)
            })
            .collect()
    }
}

/// Resource needs of one replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU quantity as given ("4", "500m").
    pub cpu: Option<String>,
    /// Memory quantity as given ("16Gi").
    pub memory: Option<String>,
    /// Accelerators per replica.
    pub accelerators: u32,
    /// Accelerator kind as the user wrote it (informational).
    pub accelerator_type: Option<String>,
}

/// Where the model files are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelVolume {
    /// Directory on the host (or node) holding the model.
    pub host_path: PathBuf,
    /// Where the engine sees it (containers); the process runtime uses `host_path`.
    pub mount_path: PathBuf,
}

/// HTTP readiness check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthProbe {
    /// Path probed with GET; 200 means ready.
    pub path: String,
    /// Time between probes.
    #[serde(with = "crate::record::duration_ms")]
    pub period: Duration,
    /// How long a replica may take to become ready (weights load for minutes).
    #[serde(with = "crate::record::duration_ms")]
    pub startup_timeout: Duration,
}

impl Default for HealthProbe {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            period: Duration::from_millis(500),
            startup_timeout: Duration::from_secs(1800),
        }
    }
}

/// Why a workload is not running, typed so clients and tests can match on it.
/// The wire form is the variant name (like Kubernetes reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureReason {
    /// The request broke a validation rule.
    InvalidSpec,
    /// The model directory or file was not found.
    ModelNotFound,
    /// The engine preset is unknown.
    UnknownEngine,
    /// The image could not be found or pulled.
    ImagePull,
    /// The engine's program is not installed.
    BinaryNotFound,
    /// The engine's port was taken.
    PortInUse,
    /// Not enough accelerators (or other resources) are free; the service waits.
    Unschedulable,
    /// The engine exited.
    Exited,
    /// The engine was killed for using too much memory.
    OutOfMemory,
    /// The engine keeps crashing after restarts.
    CrashLoop,
    /// The engine did not become ready within its start-up budget.
    StartupTimeout,
    /// A pipeline step ran past its timeout.
    StepTimeout,
    /// The workload disappeared behind the shim's back.
    WorkloadMissing,
    /// The runtime reported an error that fits no other reason.
    RuntimeError,
    /// The runtime cannot be reached or is overloaded (connection refused, timeouts, 429 and
    /// 5xx from an API server, a daemon restarting, EAGAIN when forking). Never makes a
    /// service `failed`: it keeps its phase and the engine retries until the runtime is back.
    RuntimeUnavailable,
    /// A bug or an unexpected condition inside the shim.
    Internal,
}

impl FailureReason {
    /// The reason as it appears in the API.
    pub fn as_str(self) -> String {
        format!("{self:?}")
    }
}

//! The runtime plugin interface: a shimlet realises [`WorkloadSpec`]s and reports what it sees.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::PluginSettings;
use crate::gpu::{ClusterGpus, GpuAllocator};
use crate::queue::WorkQueue;
use crate::workload::{FailureReason, WorkloadSpec};

/// A runtime: Kubernetes, Docker, local processes, or one of your own.
///
/// Calls for one service never overlap (the reconciler runs one worker per service id), but calls
/// for different services do. `observe` must be cheap: it answers from the shimlet's own view
/// (watch cache, child-process table), and tells the engine of changes through its [`Notifier`].
#[async_trait]
pub trait Shimlet: Send + Sync + 'static {
    /// Creates or updates the workload so it matches `workload`, restarting replicas that died.
    /// Idempotent: applying the same spec twice changes nothing.
    async fn apply(&self, workload: &WorkloadSpec) -> Result<(), ShimletError>;

    /// What the runtime currently shows for a service.
    async fn observe(&self, service_id: &str) -> Result<WorkloadObservation, ShimletError>;

    /// Starts or continues removing a service's workload; [`Removal::Gone`] once nothing is left.
    async fn delete(&self, service_id: &str) -> Result<Removal, ShimletError>;

    /// Everything this shimlet manages, found by label, name or pid file, so the engine can
    /// re-adopt after a restart and report orphans.
    async fn list(&self) -> Result<Vec<ManagedWorkload>, ShimletError>;

    /// The last `tail` lines of a service's logs.
    async fn logs(&self, service_id: &str, tail: usize) -> Result<String, ShimletError> {
        let _ = (service_id, tail);
        Err(ShimletError::unsupported("logs"))
    }

    /// The runtime objects `apply` would create, without creating them (dry run).
    async fn render(&self, workload: &WorkloadSpec) -> Result<serde_json::Value, ShimletError> {
        let _ = workload;
        Err(ShimletError::unsupported("render"))
    }

    /// The GPUs of the cluster's nodes, for a runtime whose own scheduler places replicas
    /// (Kubernetes): admission checks requests against them, and `GET /api/v1/gpus` shows them,
    /// instead of this host's `nvidia-smi`. Answered from the shimlet's own view (it is called
    /// on every deploy). `None`, the default: replicas run on this host's GPUs
    /// ([`GpuAllocator`]).
    fn cluster_gpus(&self) -> Option<ClusterGpus> {
        None
    }
}

/// How far a workload has come, as the runtime sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkloadState {
    /// Nothing exists for this service.
    Missing,
    /// Exists but cannot start yet (e.g. unschedulable); `failure` says why.
    Pending,
    /// Starting or loading the model; not every replica is ready yet.
    Starting,
    /// Every wanted replica is ready.
    Ready,
    /// Replicas stopped or cannot run; `failure` says why.
    Failed,
}

/// What the runtime shows for one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadObservation {
    /// Overall state.
    pub state: WorkloadState,
    /// Replicas that pass their health check.
    pub ready_replicas: u32,
    /// Replicas the runtime is running or trying to run.
    pub desired_replicas: u32,
    /// Base URL (scheme, host, port) where the engine answers, once known.
    pub address: Option<String>,
    /// Base URL of every ready replica, for the gateway to balance over. Runtimes that put one
    /// address in front of all replicas (a Kubernetes Service) report that one address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_addresses: Vec<String>,
    /// Generation of the spec the workload was applied from, when the runtime records it.
    pub generation: Option<u64>,
    /// Why it is pending or failed.
    pub failure: Option<Failure>,
}

impl WorkloadObservation {
    /// Nothing exists.
    pub const fn missing() -> Self {
        Self {
            state: WorkloadState::Missing,
            ready_replicas: 0,
            desired_replicas: 0,
            address: None,
            replica_addresses: Vec::new(),
            generation: None,
            failure: None,
        }
    }
}

/// A typed reason with the runtime's own words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Machine-readable reason.
    pub reason: FailureReason,
    /// What the runtime said (exit code, last log lines, scheduler message).
    pub message: String,
}

/// Progress of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Nothing is left.
    Gone,
    /// Removal is under way; ask again.
    InProgress,
}

/// One workload found in the runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedWorkload {
    /// Service id it is labelled with.
    pub service_id: String,
    /// Generation it is labelled with, if any.
    pub generation: Option<u64>,
    /// Runtime's name for it (container name, pid list, Deployment name).
    pub name: String,
}

/// A runtime failure, typed so the engine can decide between retry, wait and give up.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ShimletError {
    /// Typed reason.
    pub reason: FailureReason,
    /// Human-readable explanation.
    pub message: String,
    /// Whether trying again later may help (network blip vs. missing binary).
    pub retryable: bool,
    /// The underlying error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ShimletError {
    /// A failure that will not go away by retrying.
    pub fn permanent(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// A failure that may go away (API server blip, conflict).
    pub fn transient(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// The runtime cannot be reached or is overloaded right now. The engine never fails a
    /// service for this: it keeps the service's phase and retries with capped backoff.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::transient(FailureReason::RuntimeUnavailable, message)
    }

    /// The shimlet does not offer an optional capability.
    pub fn unsupported(capability: &str) -> Self {
        Self::permanent(
            FailureReason::RuntimeError,
            format!("this shimlet does not support {capability}"),
        )
    }

    /// Keeps the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

/// Lets a shimlet tell the engine that a service's observed state changed (process exited,
/// watch event), so the reconciler looks at it now instead of at the next resync.
#[derive(Clone)]
pub struct Notifier {
    queue: Arc<WorkQueue>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

impl Notifier {
    /// A notifier that feeds `queue` (the engine's; tests pass their own and read it back).
    pub fn new(queue: Arc<WorkQueue>) -> Self {
        Self { queue }
    }

    /// A notifier that goes nowhere (tests, rendering without an engine).
    pub fn detached() -> Self {
        Self {
            queue: Arc::new(WorkQueue::new()),
        }
    }

    /// Asks the engine to reconcile `service_id` soon.
    pub fn changed(&self, service_id: &str) {
        self.queue.add(service_id);
    }
}

/// What a shimlet factory gets.
#[derive(Debug, Clone)]
pub struct ShimletContext {
    /// Configuration: the whole config tree plus the common settings.
    pub settings: PluginSettings,
    /// A directory the shimlet owns for its own state (pid files, logs).
    pub state_dir: PathBuf,
    /// Tells the engine of observed changes.
    pub notifier: Notifier,
    /// The host's accelerators, shared by every local runtime.
    pub gpus: Arc<GpuAllocator>,
}

impl ShimletContext {
    /// The shimlet's own config section, `shimlets.<name>`, or `null` when absent.
    pub fn section(&self, name: &str) -> serde_json::Value {
        self.settings.section(&["shimlets", name])
    }
}

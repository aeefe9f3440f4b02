//! Engine settings. The binary fills them from flags, YAML and env (figment); embedders build
//! them in code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::spec::ValidationPolicy;

/// Settings of the [`Engine`](crate::Engine) itself.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory holding one sub-directory per model (`/list` reads it).
    pub model_root: PathBuf,
    /// Further roots that an explicit `modelFileDir` may lie in.
    pub allowed_model_dirs: Vec<PathBuf>,
    /// Where the store and the shimlets' state live.
    pub data_dir: PathBuf,
    /// Most accelerators one replica may ask for.
    pub max_accelerators: u32,
    /// Most replicas one service may ask for.
    pub max_replicas: u32,
    /// Reconciler workers: services processed at once.
    pub workers: usize,
    /// Every live service is looked at this often even without a change.
    pub resync_interval: Duration,
    /// First retry delay after a failed reconcile; doubles each time.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_cap: Duration,
    /// Repairs of a running service (per spec generation) before it is declared failed; also
    /// the restarts a runtime that restarts containers itself (Kubernetes) allows a crashing or
    /// out-of-memory replica before its service is failed.
    pub max_restarts: u32,
    /// Events kept per service in the store.
    pub event_history: usize,
    /// Accelerator ids to hand out; `None` detects them (nvidia-smi).
    pub gpus: Option<Vec<String>>,
    /// Whether two services may share one accelerator.
    pub share_gpus: bool,
    /// Whether requests that do not fit the GPUs are refused (`engine.fitCheck`).
    pub fit_check: crate::admission::FitCheck,
    /// Engine preset used when a request names none.
    pub default_engine: String,
    /// The whole configuration tree, for plugin sections (`shimlets.*`, `pipelines.*`, `engines.*`).
    pub plugins: Arc<serde_json::Value>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_root: PathBuf::from("models"),
            allowed_model_dirs: Vec::new(),
            data_dir: PathBuf::from(".data"),
            max_accelerators: 16,
            max_replicas: 64,
            workers: 64,
            resync_interval: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            // At most 10 s, so a service converges within 10 s of its runtime coming back
            // after an outage (see `FailureReason::RuntimeUnavailable`).
            backoff_cap: Duration::from_secs(10),
            max_restarts: 5,
            event_history: 200,
            gpus: None,
            share_gpus: false,
            fit_check: crate::admission::FitCheck::Enforce,
            default_engine: "vllm".into(),
            plugins: Arc::new(serde_json::Value::Null),
        }
    }
}

impl EngineConfig {
    /// The rules requests are validated against.
    pub fn validation_policy(&self) -> ValidationPolicy {
        ValidationPolicy {
            model_root: crate::spec::absolute(&self.model_root),
            allowed_model_dirs: self
                .allowed_model_dirs
                .iter()
                .map(|d| crate::spec::absolute(d))
                .collect(),
            max_accelerators: self.max_accelerators,
            max_replicas: self.max_replicas,
        }
    }

    /// What plugin factories see.
    pub fn plugin_settings(&self) -> PluginSettings {
        PluginSettings {
            tree: self.plugins.clone(),
            policy: self.validation_policy(),
            data_dir: self.data_dir.clone(),
            default_engine: self.default_engine.clone(),
            max_restarts: self.max_restarts,
        }
    }
}

/// Configuration handed to shimlet and pipeline factories.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    /// The whole configuration tree.
    pub tree: Arc<serde_json::Value>,
    /// Model root and allowed roots (absolute), limits.
    pub policy: ValidationPolicy,
    /// The engine's data directory.
    pub data_dir: PathBuf,
    /// Engine preset used when a request names none.
    pub default_engine: String,
    /// `engine.maxRestarts`: how often a replica may crash or run out of memory before its
    /// service is failed. Runtimes that restart containers themselves (Kubernetes) apply it to
    /// their own restart count.
    pub max_restarts: u32,
}

impl PluginSettings {
    /// The sub-tree at `path` (e.g. `["shimlets", "process"]`), or `null`.
    pub fn section(&self, path: &[&str]) -> serde_json::Value {
        let mut node = &*self.tree;
        for key in path {
            match node.get(key) {
                Some(child) => node = child,
                None => return serde_json::Value::Null,
            }
        }
        node.clone()
    }

    /// Deserialises the section at `path` into `T`, using `T::default()` when it is absent.
    ///
    /// # Errors
    /// A message naming the section when its content does not fit `T`.
    pub fn section_as<T: serde::de::DeserializeOwned + Default>(
        &self,
        path: &[&str],
    ) -> Result<T, String> {
        match self.section(path) {
            serde_json::Value::Null => Ok(T::default()),
            value => serde_json::from_value(value)
                .map_err(|e| format!("config section {}: {e}", path.join("."))),
        }
    }
}

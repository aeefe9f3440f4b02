//! Configuration of `model-serve-shim`: defaults < YAML file < environment < flags (figment).
//!
//! Environment variables are `XMOD_SHIM_<SECTION>__<KEY>` (e.g. `XMOD_SHIM_SERVICE__PORT=9090`,
//! `XMOD_SHIM_PLUGINS__DEFAULTSHIMLET=docker`); keys are matched without regard to case.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Yaml};
use serde::{Deserialize, Serialize};
use shim_core::EngineConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Settings {
    /// HTTP server.
    pub service: Service,
    /// Which runtime and pipeline.
    pub plugins: Plugins,
    /// Logs.
    pub logging: Logging,
    /// Engine core settings.
    pub engine: EngineSection,
    /// Per-shimlet sections (`shimlets.process`, `shimlets.docker`, ...).
    pub shimlets: serde_json::Value,
    /// Per-pipeline sections (`pipelines.opensourcellm`).
    pub pipelines: serde_json::Value,
    /// Engine preset overrides (`engines.vllm.image`, ...).
    pub engines: serde_json::Value,
    /// The OpenAI-compatible gateway on `/v1` (`gateway.apiKeys`, `gateway.balance`, ...).
    pub gateway: shim_gateway::GatewayConfig,
}

/// `service:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    /// Address to bind.
    pub host: String,
    /// Port to bind.
    pub port: u16,
    /// When set, POST/PUT/DELETE need `Authorization: Bearer <token>` (an operator token
    /// named `admin`).
    pub auth_token: Option<String>,
    /// Tokens with roles: `[{name, token, role: viewer|operator}]`.
    pub tokens: Vec<shim_server::ApiToken>,
    /// Reads need a token too (off: the existing client polls status without one).
    pub protect_reads: bool,
    /// Where every changing request is recorded as a JSON line; default `<dataDir>/audit.log`.
    pub audit_log: Option<PathBuf>,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
    /// HTTPS instead of HTTP: certificate chain and key as PEM files, reloaded when they change.
    pub tls: Option<Tls>,
}

/// `service.tls:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// Certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
}

impl Default for Service {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            auth_token: None,
            tokens: Vec::new(),
            protect_reads: false,
            audit_log: None,
            body_limit_bytes: 1024 * 1024,
            tls: None,
        }
    }
}

/// `plugins:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Plugins {
    /// Runtime (`--shimlet`).
    pub default_shimlet: String,
    /// Pipeline (`--pipeline`).
    pub default_pipeline: String,
}

impl Default for Plugins {
    fn default() -> Self {
        Self {
            default_shimlet: "process".into(),
            default_pipeline: "opensourcellm".into(),
        }
    }
}

/// `logging:`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter (`shim_core=debug,info`).
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for Logging {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// `engine:` (see `shim_core::EngineConfig` for what each does).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EngineSection {
    /// Store and shimlet state.
    pub data_dir: PathBuf,
    /// One sub-directory per model.
    pub model_root: PathBuf,
    /// Other roots an explicit `modelFileDir` may lie in.
    pub allowed_model_dirs: Vec<PathBuf>,
    /// Preset used when a request names no `engine`.
    pub default_engine: String,
    /// Most accelerators per replica.
    pub max_accelerators: u32,
    /// Most replicas per service.
    pub max_replicas: u32,
    /// Services reconciled at once.
    pub workers: usize,
    /// Full resync period.
    pub resync_interval_secs: u64,
    /// Repairs of a running service before it is declared failed.
    pub max_restarts: u32,
    /// Events kept per service.
    pub event_history: usize,
    /// GPU ids to hand out; absent = detect with nvidia-smi.
    pub gpus: Option<Vec<String>>,
    /// Let services share GPUs.
    pub share_gpus: bool,
    /// `enforce` (refuse requests that do not fit the GPUs, 422), `warn` or `off`.
    pub fit_check: shim_core::FitCheck,
    /// Where desired state lives: `redb` (a file in `dataDir`) or `kubernetes` (ModelService
    /// resources in the namespace of `shimlets.k8s`). Unset: `kubernetes` when the shimlet is
    /// `k8s` and the shim runs inside a cluster, else `redb` ([`EngineSection::store_kind`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreKind>,
}

impl Settings {
    /// The `shimlets.k8s` section: the cluster settings the Kubernetes store shares with the
    /// k8s shimlet (kubeconfig, context, namespace).
    ///
    /// # Errors
    /// A section that does not parse.
    pub fn k8s_config(&self) -> anyhow::Result<shim_shimlet_k8s::K8sConfig> {
        let section = self
            .shimlets
            .get("k8s")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        serde_json::from_value(section)
            .map_err(|e| anyhow::anyhow!("invalid shimlets.k8s section: {e}"))
    }
}

impl EngineSection {
    /// The store to use: `engine.store`, else the default for where the shim runs.
    pub fn store_kind(&self, shimlet: &str) -> StoreKind {
        match self.store {
            Some(kind) => kind,
            // In a cluster, desired state belongs in the cluster: it outlives any volume, and
            // several replicas can share it.
            None if shimlet == "k8s" && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                StoreKind::Kubernetes
            }
            None => StoreKind::Redb,
        }
    }
}

/// `engine.store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `<dataDir>/state.redb`.
    #[default]
    Redb,
    /// ModelService resources (`deploy/crds/modelservices.yaml` must be installed).
    Kubernetes,
}

impl Default for EngineSection {
    fn default() -> Self {
        let core = EngineConfig::default();
        Self {
            data_dir: core.data_dir,
            model_root: core.model_root,
            allowed_model_dirs: core.allowed_model_dirs,
            default_engine: core.default_engine,
            max_accelerators: core.max_accelerators,
            max_replicas: core.max_replicas,
            workers: core.workers,
            resync_interval_secs: core.resync_interval.as_secs(),
            max_restarts: core.max_restarts,
            event_history: core.event_history,
            gpus: core.gpus,
            share_gpus: core.share_gpus,
            fit_check: core.fit_check,
            store: None,
        }
    }
}

/// `XMOD_SHIM_SECTION__KEY` variables. Environment names are upper case, config keys camelCase:
/// built-in keys are matched without regard to case; other keys (plugin sections) are lower-cased.
fn env_provider() -> Env {
    let known = Settings::known_paths();
    // `lowercase(false)` must come last: figment resets it in every `map`.
    Env::prefixed("XMOD_SHIM_")
        .split("__")
        .map(
            move |key| match known.iter().find(|k| k.eq_ignore_ascii_case(key.as_str())) {
                Some(path) => path.clone().into(),
                None => key.as_str().to_ascii_lowercase().into(),
            },
        )
        .lowercase(false)
}

impl Settings {
    /// Loads defaults, then the YAML file (if any), then `XMOD_SHIM_*` variables, then `flags`
    /// (a JSON object of only the flags that were given).
    ///
    /// # Errors
    /// An unreadable file or a value of the wrong type, naming the key.
    pub fn load(file: Option<&std::path::Path>, flags: serde_json::Value) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            anyhow::ensure!(file.is_file(), "config file {} not found", file.display());
            figment = figment.merge(Yaml::file(file));
        }
        figment = figment
            .merge(env_provider())
            .merge(Serialized::defaults(flags));
        figment.extract().context("invalid configuration")
    }

    /// Every key path of the built-in settings (`service.port`, `plugins.defaultShimlet`, ...).
    fn known_paths() -> Vec<String> {
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(map) = value {
                for (key, child) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, child, out);
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(
            "",
            &serde_json::to_value(Settings::default()).unwrap_or_default(),
            &mut out,
        );
        out
    }

    /// The engine core's settings.
    pub fn engine_config(&self) -> EngineConfig {
        let e = &self.engine;
        let tree = serde_json::json!({
            "shimlets": self.shimlets,
            "pipelines": self.pipelines,
            "engines": self.engines,
        });
        EngineConfig {
            model_root: e.model_root.clone(),
            allowed_model_dirs: e.allowed_model_dirs.clone(),
            data_dir: e.data_dir.clone(),
            max_accelerators: e.max_accelerators,
            max_replicas: e.max_replicas,
            workers: e.workers,
            resync_interval: Duration::from_secs(e.resync_interval_secs.max(1)),
            max_restarts: e.max_restarts,
            event_history: e.event_history,
            gpus: e.gpus.clone(),
            share_gpus: e.share_gpus,
            fit_check: e.fit_check,
            default_engine: e.default_engine.clone(),
            plugins: Arc::new(tree),
            ..EngineConfig::default()
        }
    }
}

#[cfg(test)]
// figment's Jail closures return its (large) error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_defaults_then_file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "shim.yaml",
                "service:\n  port: 9000\n  host: 0.0.0.0\nplugins:\n  defaultShimlet: docker\nlogging:\n  level: debug\n\
                 engine:\n  modelRoot: /srv/models\nengines:\n  vllm:\n    image: mirror/vllm:1\n",
            )?;
            jail.set_env("XMOD_SHIM_SERVICE__PORT", "9100");
            jail.set_env("XMOD_SHIM_PLUGINS__DEFAULTPIPELINE", "custom");
            let flags = serde_json::json!({ "logging": { "level": "warn" } });
            let s = Settings::load(Some(std::path::Path::new("shim.yaml")), flags).expect("loads");
            assert_eq!(s.service.port, 9100, "env beats file");
            assert_eq!(s.service.host, "0.0.0.0", "file beats defaults");
            assert_eq!(s.plugins.default_shimlet, "docker");
            assert_eq!(s.plugins.default_pipeline, "custom");
            assert_eq!(s.logging.level, "warn", "flags beat everything");
            assert_eq!(s.engine.model_root, PathBuf::from("/srv/models"));
            assert_eq!(
                s.engine_config().plugins["engines"]["vllm"]["image"],
                "mirror/vllm:1"
            );
            Ok(())
        });
    }

    #[test]
    fn gateway_keys_come_from_yaml_or_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "gw.yaml",
                "gateway:\n  balance: prefix\n  apiKeys:\n    - key: yaml-key\n      models: [llama]\n",
            )?;
            let s = Settings::load(Some(std::path::Path::new("gw.yaml")), serde_json::json!({}))
                .expect("loads");
            assert_eq!(s.gateway.balance, shim_gateway::Balance::Prefix);
            assert_eq!(s.gateway.api_keys.0[0].key, "yaml-key");
            assert_eq!(s.gateway.api_keys.0[0].models, vec!["llama".to_owned()]);
            jail.set_env("XMOD_SHIM_GATEWAY__APIKEYS", "k1,k2=qwen|llama");
            jail.set_env("XMOD_SHIM_GATEWAY__QUEUESIZE", "7");
            let s = Settings::load(None, serde_json::json!({})).expect("loads");
            let keys: Vec<&str> = s
                .gateway
                .api_keys
                .0
                .iter()
                .map(|k| k.key.as_str())
                .collect();
            assert_eq!(keys, ["k1", "k2"]);
            assert_eq!(s.gateway.api_keys.0[1].models, ["qwen", "llama"]);
            assert_eq!(s.gateway.queue_size, 7);
            Ok(())
        });
    }

    #[test]
    fn fit_check_is_read_from_yaml_or_env_and_a_bad_value_names_the_key() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None, serde_json::json!({})).expect("loads");
            assert_eq!(s.engine_config().fit_check, shim_core::FitCheck::Enforce);
            jail.create_file("fit.yaml", "engine:\n  fitCheck: warn\n")?;
            let s = Settings::load(
                Some(std::path::Path::new("fit.yaml")),
                serde_json::json!({}),
            )
            .expect("loads");
            assert_eq!(s.engine_config().fit_check, shim_core::FitCheck::Warn);
            jail.set_env("XMOD_SHIM_ENGINE__FITCHECK", "off");
            let s = Settings::load(None, serde_json::json!({})).expect("loads");
            assert_eq!(s.engine_config().fit_check, shim_core::FitCheck::Off);
            jail.set_env("XMOD_SHIM_ENGINE__FITCHECK", "strict");
            let err = format!(
                "{:#}",
                Settings::load(None, serde_json::json!({})).unwrap_err()
            );
            assert!(err.to_ascii_lowercase().contains("fitcheck"), "{err}");
            assert!(err.contains("enforce"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.yaml", "service:\n  port: lots\n")?;
            let err = Settings::load(
                Some(std::path::Path::new("bad.yaml")),
                serde_json::json!({}),
            )
            .unwrap_err();
            assert!(format!("{err:#}").contains("port"), "{err:#}");
            Ok(())
        });
    }
}

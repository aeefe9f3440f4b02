//! Engine presets as data: how each inference engine is launched and probed. Every field can be
//! overridden in config under `engines.<name>`; new names define new presets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shim_model::FitProfile;

/// How to launch and probe one inference engine.
///
/// `args` may use `{host}`, `{port}` and `{model_dir}` (filled in by the runtime), plus
/// `{served_name}` (the model name clients send) and `{model_file}` (the model file inside the
/// model directory, for engines that load one file), filled in by the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnginePreset {
    /// Container image (Docker, Kubernetes).
    pub image: String,
    /// Program and leading args on the host (process runtime).
    pub command: Vec<String>,
    /// Container entrypoint override; empty keeps the image's.
    pub entrypoint: Vec<String>,
    /// Arguments (templated).
    pub args: Vec<String>,
    /// Flag that takes the accelerator count (tensor parallelism), added when it is ≥ 1.
    pub accelerator_flag: Option<String>,
    /// Flag that takes `contextLength`, added when the request sets it.
    pub context_length_flag: Option<String>,
    /// Appended after everything else.
    pub extra_args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Port the engine listens on inside a container.
    pub port: u16,
    /// Readiness path: GET returns 200 once the model is loaded.
    pub health_path: String,
    /// How long loading may take before the service fails.
    pub startup_timeout_secs: u64,
    /// Extension of the single model file the engine loads (e.g. "gguf"); none loads a directory.
    pub model_file_extension: Option<String>,
    /// Use this other preset instead when `command[0]` is not on PATH (llama-server →
    /// llama-cpp-python).
    pub fallback: Option<String>,
    /// Memory behaviour for the fit check (`engines.<name>.fit.memoryFraction`, …): which
    /// overhead formula, the share of a GPU the engine may use, the fixed overhead.
    pub fit: FitProfile,
}

impl Default for EnginePreset {
    fn default() -> Self {
        Self {
            image: String::new(),
            command: Vec::new(),
            entrypoint: Vec::new(),
            args: Vec::new(),
            accelerator_flag: None,
            context_length_flag: None,
            extra_args: Vec::new(),
            env: BTreeMap::new(),
            port: 8000,
            health_path: "/health".into(),
            startup_timeout_secs: 1800,
            model_file_extension: None,
            fallback: None,
            fit: FitProfile::default(),
        }
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The built-in presets. `mock_program` is the binary that offers `mock-engine` (normally the
/// running `model-serve-shim` itself).
pub fn builtin(mock_program: &str) -> BTreeMap<String, EnginePreset> {
    let mut presets = BTreeMap::new();
    presets.insert(
        "vllm".into(),
        EnginePreset {
            image: "vllm/vllm-openai:latest".into(),
            command: strings(&["vllm", "serve"]),
            args: strings(&[
                "{model_dir}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--served-model-name",
                "{served_name}",
            ]),
            accelerator_flag: Some("--tensor-parallel-size".into()),
            context_length_flag: Some("--max-model-len".into()),
            fit: FitProfile::vllm(),
            ..EnginePreset::default()
        },
    );
    presets.insert(
        "sglang".into(),
        EnginePreset {
            image: "lmsysorg/sglang:latest".into(),
            command: strings(&["python3", "-m", "sglang.launch_server"]),
            entrypoint: strings(&["python3", "-m", "sglang.launch_server"]),
            args: strings(&[
                "--model-path",
                "{model_dir}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--served-model-name",
                "{served_name}",
            ]),
            accelerator_flag: Some("--tp-size".into()),
            context_length_flag: Some("--context-length".into()),
            port: 30000,
            fit: FitProfile::sglang(),
            ..EnginePreset::default()
        },
    );
    // llama.cpp's own server; falls back to llama-cpp-python when llama-server is not installed.
    presets.insert(
        "llamacpp".into(),
        EnginePreset {
            image: "ghcr.io/ggml-org/llama.cpp:server".into(),
            command: strings(&["llama-server"]),
            args: strings(&[
                "-m",
                "{model_file}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--alias",
                "{served_name}",
                "-ngl",
                "999",
            ]),
            context_length_flag: Some("-c".into()),
            port: 8080,
            model_file_extension: Some("gguf".into()),
            fallback: Some("llama-cpp-python".into()),
            // llama-server's default `-c` is 4096.
            fit: FitProfile::llamacpp(4096),
            ..EnginePreset::default()
        },
    );
    // llama-cpp-python has no /health: it loads the model before listening, so /v1/models
    // answering 200 means ready.
    presets.insert(
        "llama-cpp-python".into(),
        EnginePreset {
            command: strings(&["python3", "-m", "llama_cpp.server"]),
            args: strings(&[
                "--model",
                "{model_file}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--model_alias",
                "{served_name}",
                "--n_gpu_layers",
                "-1",
            ]),
            context_length_flag: Some("--n_ctx".into()),
            health_path: "/v1/models".into(),
            model_file_extension: Some("gguf".into()),
            // llama-cpp-python's server defaults to `--n_ctx 2048`.
            fit: FitProfile::llamacpp(2048),
            ..EnginePreset::default()
        },
    );
    presets.insert(
        "mock".into(),
        EnginePreset {
            image: "xmod-shim/mock-engine:latest".into(),
            command: vec![mock_program.to_string(), "mock-engine".into()],
            args: strings(&[
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--served-model-name",
                "{served_name}",
                "{model_dir}",
            ]),
            startup_timeout_secs: 120,
            ..EnginePreset::default()
        },
    );
    presets
}

/// The presets in force: built-ins merged with `engines.*` from config.
#[derive(Debug, Clone)]
pub struct Presets {
    presets: BTreeMap<String, EnginePreset>,
}

impl Presets {
    /// Built-ins overridden field by field by `overrides` (the `engines` config section).
    ///
    /// # Errors
    /// A message naming the preset whose override does not fit.
    pub fn new(mock_program: &str, overrides: &serde_json::Value) -> Result<Self, String> {
        let mut presets = builtin(mock_program);
        if let Some(map) = overrides.as_object() {
            for (name, patch) in map {
                if !patch.is_object() {
                    // Top-level scalars in `engines` (e.g. `default`) are not presets.
                    continue;
                }
                let base = presets.get(name).cloned().unwrap_or_default();
                let mut merged = serde_json::to_value(&base).map_err(|e| e.to_string())?;
                merge(&mut merged, patch);
                let preset =
                    serde_json::from_value(merged).map_err(|e| format!("engines.{name}: {e}"))?;
                presets.insert(name.clone(), preset);
            }
        }
        Ok(Self { presets })
    }

    /// Preset names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.presets.keys().map(String::as_str).collect()
    }

    /// The preset called `name`, following `fallback` when its program is not installed.
    pub fn resolve(&self, name: &str) -> Option<(&str, &EnginePreset)> {
        let (key, preset) = self.presets.get_key_value(name)?;
        if let (Some(fallback), Some(program)) = (&preset.fallback, preset.command.first())
            && find_program(program).is_none()
            && let Some((fallback_key, fallback_preset)) = self.presets.get_key_value(fallback)
        {
            return Some((fallback_key, fallback_preset));
        }
        Some((key, preset))
    }
}

/// Where `program` would be found: itself if it contains a `/`, else the first match on PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or(None)
}

fn merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(base), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                merge(
                    base.entry(key.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_overrides_fields_and_adds_presets() {
        let overrides = serde_json::json!({
            "vllm": { "image": "registry.local/vllm:0.9", "extraArgs": ["--dtype", "auto"] },
            "tgi": { "image": "tgi:latest", "command": ["text-generation-launcher"], "port": 80 },
            "default": "vllm"
        });
        let presets = Presets::new("/bin/shim", &overrides).unwrap();
        let (_, vllm) = presets.resolve("vllm").unwrap();
        assert_eq!(vllm.image, "registry.local/vllm:0.9");
        assert_eq!(vllm.extra_args, ["--dtype", "auto"]);
        assert_eq!(
            vllm.context_length_flag.as_deref(),
            Some("--max-model-len"),
            "untouched fields keep defaults"
        );
        assert_eq!(presets.resolve("tgi").unwrap().1.port, 80);
        assert!(presets.names().contains(&"mock"));
    }

    #[test]
    fn a_bad_override_names_the_preset() {
        let err = Presets::new(
            "/bin/shim",
            &serde_json::json!({ "vllm": { "port": "eighty" } }),
        )
        .unwrap_err();
        assert!(err.starts_with("engines.vllm:"), "{err}");
    }

    #[test]
    fn llamacpp_falls_back_to_llama_cpp_python_without_llama_server() {
        let overrides =
            serde_json::json!({ "llamacpp": { "command": ["/nonexistent/llama-server"] } });
        let presets = Presets::new("/bin/shim", &overrides).unwrap();
        assert_eq!(presets.resolve("llamacpp").unwrap().0, "llama-cpp-python");
        let overrides = serde_json::json!({ "llamacpp": { "command": ["/bin/sh"] } });
        let presets = Presets::new("/bin/shim", &overrides).unwrap();
        assert_eq!(presets.resolve("llamacpp").unwrap().0, "llamacpp");
    }
}

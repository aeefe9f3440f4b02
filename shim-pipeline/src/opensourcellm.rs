//! `opensourcellm`: validate → resolve model → render → apply → wait ready → expose, and a
//! teardown that deletes the workload until the runtime confirms it is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use shim_core::admission::{AdmissionRequest, Estimate, Verdict};
use shim_core::spec::check_model_dir;
use shim_core::{
    FailureReason, GpuNeed, HealthProbe, ModelVolume, Pipeline, PipelineContext, PluginSettings,
    Resources, StepError, StepOptions, ValidationPolicy, WorkloadSpec, WorkloadState,
};

use crate::presets::{EnginePreset, Presets};
use shim_model::{Estimator, GpuMemory};

/// Settings under `pipelines.opensourcellm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OpenSourceLlmConfig {
    /// Check that the model directory exists. Turn off when the runtime does not share this
    /// machine's filesystem (a Kubernetes cluster mounting a PVC).
    pub check_model_dir: bool,
    /// Where the model directory appears inside containers.
    pub container_model_dir: PathBuf,
    /// Overrides every preset's start-up budget when set.
    pub startup_timeout_secs: Option<u64>,
    /// How often readiness is checked while waiting.
    pub poll_interval_ms: u64,
    /// Program that offers the `mock-engine` subcommand; default: this executable.
    pub mock_program: Option<String>,
}

impl Default for OpenSourceLlmConfig {
    fn default() -> Self {
        Self {
            check_model_dir: true,
            container_model_dir: PathBuf::from("/models/model"),
            startup_timeout_secs: None,
            poll_interval_ms: 250,
            mock_program: None,
        }
    }
}

struct Setup {
    config: OpenSourceLlmConfig,
    presets: Presets,
    policy: ValidationPolicy,
    default_engine: String,
}

/// The preset chosen for a run.
#[derive(Clone)]
struct Chosen {
    name: String,
    preset: EnginePreset,
}

/// The model as resolved on disk.
#[derive(Clone)]
struct ResolvedModel {
    dir: PathBuf,
    /// The single model file, for engines that load one.
    file: Option<String>,
}

/// Builds the pipeline from configuration (`pipelines.opensourcellm`, `engines.*`).
///
/// # Errors
/// A message naming the config section that does not fit.
pub fn build(settings: &PluginSettings) -> Result<Pipeline, String> {
    let config: OpenSourceLlmConfig = settings.section_as(&["pipelines", "opensourcellm"])?;
    let mock_program = config.mock_program.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "model-serve-shim".into())
    });
    let presets = Presets::new(&mock_program, &settings.section(&["engines"]))?;
    if presets.resolve(&settings.default_engine).is_none() {
        return Err(format!(
            "default engine {:?} is not a preset; known: {}",
            settings.default_engine,
            presets.names().join(", ")
        ));
    }
    let setup = Arc::new(Setup {
        config,
        presets,
        policy: settings.policy.clone(),
        default_engine: settings.default_engine.clone(),
    });
    // Waiting is bounded by the preset's start-up budget inside the step; the step timeout is
    // only a backstop above the largest budget.
    let wait_options = StepOptions {
        retries: 0,
        timeout: Duration::from_secs(7 * 24 * 3600),
        ..StepOptions::default()
    };
    let quick = StepOptions {
        retries: 0,
        timeout: Duration::from_secs(60),
        ..StepOptions::default()
    };
    let apply_options = StepOptions {
        retries: 3,
        timeout: Duration::from_secs(600),
        ..StepOptions::default()
    };
    let s = |setup: &Arc<Setup>| setup.clone();
    let (a, b, c, d, e) = (s(&setup), s(&setup), s(&setup), s(&setup), s(&setup));
    Ok(Pipeline::new("opensourcellm")
        .admission(move |request| admission(e.clone(), request))
        .defaults(quick)
        .step("validate", move |ctx| validate(a.clone(), ctx))
        .step("resolve_model", move |ctx| resolve_model(b.clone(), ctx))
        .step("render", move |ctx| render(c.clone(), ctx))
        .step_with("apply", apply_options, apply)
        .achieved_when(already_applied)
        .step_with("wait_ready", wait_options, move |ctx| {
            wait_ready(d.clone(), ctx)
        })
        .step("expose", expose)
        .teardown_step("delete", shim_core::pipeline::delete_until_gone)
        .build())
}

/// The fit check at request time: inspect the model's headers, estimate the memory per GPU for
/// the chosen engine, and compare it with the GPUs this host could give the service.
async fn admission(setup: Arc<Setup>, request: AdmissionRequest) -> Verdict {
    let spec = request.spec;
    let wanted = spec
        .engine
        .clone()
        .unwrap_or_else(|| setup.default_engine.clone());
    // An unknown engine is the validate step's error to report.
    let Some((_, preset)) = setup.presets.resolve(&wanted) else {
        return Verdict::default();
    };
    let profile = preset.fit;
    if profile.estimator == Estimator::None {
        return Verdict::default(); // the mock engine: nothing to estimate, nothing to warn about
    }
    let dir = spec.model_dir(&setup.policy);
    let policy = setup.policy.clone();
    let gpus = request.gpus;
    let cluster = request.cluster;
    let context = spec
        .context_length
        .and_then(|c| u64::try_from(c).ok())
        .filter(|c| *c > 0);
    let tp = spec.accelerators();
    let replicas = spec.replicas();
    let spec_model = spec.model_name.clone();
    let work = move || {
        let info = match inspect_within(&dir, &policy) {
            Ok(info) => info,
            Err(note) => {
                return Verdict {
                    note: Some(note),
                    ..Verdict::default()
                };
            }
        };
        if let Some(cluster) = &cluster {
            // The cluster's scheduler places replicas on its nodes: compare with those.
            let Some(plan) =
                crate::cluster_fit::plan_on_nodes(&info, &profile, context, tp, replicas, cluster)
            else {
                return no_shape(&dir);
            };
            if plan.fits.is_none() && tp > 0 && replicas > 0 {
                tracing::warn!(model = %spec_model, "fit not fully checked: {}", plan.message);
            }
            return verdict(plan, tp, profile.memory_fraction);
        }
        let candidates: Option<Vec<GpuMemory>> = gpus.candidates().map(|list| {
            list.into_iter()
                .map(|g| GpuMemory {
                    id: g.id,
                    total_bytes: g.total_bytes,
                    free_bytes: g.free_bytes,
                })
                .collect()
        });
        // Scaled to zero holds no GPU, so there is nothing to check.
        let gpus_seen = if replicas == 0 {
            None
        } else {
            candidates.as_deref()
        };
        let Some(plan) = shim_model::plan(&info, &profile, context, tp, replicas, gpus_seen) else {
            return no_shape(&dir);
        };
        verdict(plan, tp, profile.memory_fraction)
    };
    // Header reads are small but they are file I/O; keep them off the async workers.
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Verdict {
            note: Some(format!("model inspection failed: {e}")),
            ..Verdict::default()
        })
}

/// The verdict on a model whose metadata lacks the attention shape.
fn no_shape(dir: &Path) -> Verdict {
    Verdict {
        note: Some(format!(
            "{}: the model's metadata does not give layers, KV heads and head size",
            dir.display()
        )),
        ..Verdict::default()
    }
}

/// The verdict for a plan of `tp` GPUs per replica.
fn verdict(plan: shim_model::Plan, tp: u32, memory_fraction: f64) -> Verdict {
    Verdict {
        estimate: Some(Estimate {
            per_gpu_bytes: plan.estimate.per_gpu_bytes,
            weights_bytes: plan.estimate.weights_bytes,
            kv_cache_bytes: plan.estimate.kv_cache_bytes,
            overhead_bytes: plan.estimate.overhead_bytes,
            context_length: plan.estimate.context_length,
            tensor_parallel: plan.estimate.tensor_parallel,
            fits: plan.fits,
            message: plan.message,
            max_context_length: plan.max_context_length,
        }),
        need: (tp > 0).then_some(GpuNeed {
            bytes: plan.estimate.per_gpu_bytes,
            memory_fraction,
        }),
        note: None,
    }
}

/// Inspects the model directory, refusing one that resolves outside the allowed roots (a
/// symlink inside the model root), as `resolve_model` does.
fn inspect_within(dir: &Path, policy: &ValidationPolicy) -> Result<shim_model::ModelInfo, String> {
    let real = std::fs::canonicalize(dir)
        .map_err(|e| format!("model directory {} not found: {e}", dir.display()))?;
    let roots = ValidationPolicy {
        model_root: canonical_or_same(&policy.model_root),
        allowed_model_dirs: policy
            .allowed_model_dirs
            .iter()
            .map(|d| canonical_or_same(d))
            .collect(),
        ..policy.clone()
    };
    check_model_dir(&real, &roots)?;
    shim_model::inspect(&real).map_err(|e| format!("model metadata unknown: {e}"))
}

async fn validate(setup: Arc<Setup>, ctx: PipelineContext) -> Result<(), StepError> {
    let spec = ctx.spec();
    // Checked again here: the config may have changed since the request was accepted.
    spec.validate(&setup.policy).map_err(|errors| {
        StepError::permanent(
            FailureReason::InvalidSpec,
            shim_core::FieldError::join(&errors),
        )
    })?;
    let wanted = spec
        .engine
        .clone()
        .unwrap_or_else(|| setup.default_engine.clone());
    let Some((name, preset)) = setup.presets.resolve(&wanted) else {
        return Err(StepError::permanent(
            FailureReason::UnknownEngine,
            format!(
                "engine {wanted:?} is not a preset; known: {}",
                setup.presets.names().join(", ")
            ),
        ));
    };
    ctx.report(format!("engine preset {name}"));
    ctx.put(Chosen {
        name: name.to_string(),
        preset: preset.clone(),
    });
    Ok(())
}

async fn resolve_model(setup: Arc<Setup>, ctx: PipelineContext) -> Result<(), StepError> {
    let chosen = ctx.get::<Chosen>().ok_or_else(missing_step)?;
    let dir = ctx.spec().model_dir(&setup.policy);
    if !setup.config.check_model_dir {
        ctx.put(ResolvedModel { dir, file: None });
        return Ok(());
    }
    let not_found = |what: String| StepError::permanent(FailureReason::ModelNotFound, what);
    let real = tokio::fs::canonicalize(&dir)
        .await
        .map_err(|e| not_found(format!("model directory {} not found: {e}", dir.display())))?;
    // A symlink inside the model root must not lead outside the allowed roots.
    let roots = ValidationPolicy {
        model_root: canonical_or_same(&setup.policy.model_root),
        allowed_model_dirs: setup
            .policy
            .allowed_model_dirs
            .iter()
            .map(|d| canonical_or_same(d))
            .collect(),
        ..setup.policy.clone()
    };
    check_model_dir(&real, &roots)
        .map_err(|e| StepError::permanent(FailureReason::InvalidSpec, e))?;
    if !real.is_dir() {
        return Err(not_found(format!("{} is not a directory", real.display())));
    }
    let file = match &chosen.preset.model_file_extension {
        None => None,
        Some(ext) => Some(single_file(&real, ext).await?),
    };
    ctx.report(match &file {
        Some(f) => format!("model file {}/{f}", real.display()),
        None => format!("model directory {}", real.display()),
    });
    ctx.put(ResolvedModel { dir: real, file });
    Ok(())
}

fn canonical_or_same(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The one file with extension `ext` in `dir`; none or several is a clear error.
async fn single_file(dir: &Path, ext: &str) -> Result<String, StepError> {
    let mut entries = tokio::fs::read_dir(dir).await.map_err(|e| {
        StepError::permanent(
            FailureReason::ModelNotFound,
            format!("cannot read {}: {e}", dir.display()),
        )
    })?;
    let mut found = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if Path::new(&name).extension().and_then(|e| e.to_str()) == Some(ext) {
            found.push(name);
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(StepError::permanent(
            FailureReason::ModelNotFound,
            format!("model directory {} has no .{ext} file", dir.display()),
        )),
        _ => Err(StepError::permanent(
            FailureReason::InvalidSpec,
            format!(
                "model directory {} has {} .{ext} files ({}); keep exactly one",
                dir.display(),
                found.len(),
                found.join(", ")
            ),
        )),
    }
}

async fn render(setup: Arc<Setup>, ctx: PipelineContext) -> Result<(), StepError> {
    let chosen = ctx.get::<Chosen>().ok_or_else(missing_step)?;
    let model = ctx.get::<ResolvedModel>().ok_or_else(missing_step)?;
    let workload = render_workload(&setup, &ctx, &chosen, &model);
    ctx.report(format!(
        "{} replica(s) of {}",
        workload.replicas, chosen.name
    ));
    ctx.put(workload);
    Ok(())
}

fn render_workload(
    setup: &Setup,
    ctx: &PipelineContext,
    chosen: &Chosen,
    model: &ResolvedModel,
) -> WorkloadSpec {
    let spec = ctx.spec();
    let preset = &chosen.preset;
    let model_file = match &model.file {
        Some(file) => format!("{{model_dir}}/{file}"),
        None => "{model_dir}".to_string(),
    };
    let mut args: Vec<String> = preset
        .args
        .iter()
        .map(|a| {
            a.replace("{served_name}", &spec.model_name)
                .replace("{model_file}", &model_file)
        })
        .collect();
    let accelerators = spec.accelerators();
    if let (Some(flag), true) = (&preset.accelerator_flag, accelerators >= 1) {
        args.extend([flag.clone(), accelerators.to_string()]);
    }
    if let (Some(flag), Some(len)) = (&preset.context_length_flag, spec.context_length) {
        args.extend([flag.clone(), len.to_string()]);
    }
    args.extend(preset.extra_args.iter().cloned());
    let mut env = preset.env.clone();
    env.extend(spec.env.iter().map(|v| (v.key.clone(), v.value.clone())));
    let startup = setup
        .config
        .startup_timeout_secs
        .unwrap_or(preset.startup_timeout_secs);
    let resources = spec.resource_requirements.clone().unwrap_or_default();
    let mut workload = WorkloadSpec::new(ctx.service_id(), ctx.generation(), preset.image.clone());
    workload.model_name = spec.model_name.clone();
    workload.command = preset.command.clone();
    workload.entrypoint = preset.entrypoint.clone();
    workload.args = args;
    workload.env = env;
    workload.port = preset.port;
    workload.resources = Resources {
        cpu: resources.cpu,
        memory: resources.memory,
        accelerators,
        accelerator_type: resources.accelerator_type,
    };
    workload.model = Some(ModelVolume {
        host_path: model.dir.clone(),
        mount_path: setup.config.container_model_dir.clone(),
    });
    workload.health = HealthProbe {
        path: preset.health_path.clone(),
        period: Duration::from_millis(setup.config.poll_interval_ms),
        startup_timeout: Duration::from_secs(startup),
    };
    workload.replicas = spec.replicas();
    workload
        .labels
        .insert("xmod-shim/engine".into(), chosen.name.clone());
    workload
}

async fn apply(ctx: PipelineContext) -> Result<(), StepError> {
    let workload = ctx.get::<WorkloadSpec>().ok_or_else(missing_step)?;
    ctx.shimlet().apply(&workload).await?;
    Ok(())
}

/// The apply step's goal already holds when the runtime runs this generation and it is ready
/// (a restart or resync re-runs the pipeline without touching the workload).
async fn already_applied(ctx: PipelineContext) -> bool {
    match ctx.shimlet().observe(ctx.service_id()).await {
        Ok(seen) => seen.state == WorkloadState::Ready && seen.generation == Some(ctx.generation()),
        Err(_) => false,
    }
}

/// How often `wait_ready` starts an engine again whose port was taken before it could bind it.
const PORT_RETRIES: u32 = 3;

async fn wait_ready(setup: Arc<Setup>, ctx: PipelineContext) -> Result<(), StepError> {
    let workload = ctx.get::<WorkloadSpec>().ok_or_else(missing_step)?;
    let budget = workload.health.startup_timeout;
    let started = Instant::now();
    let poll = Duration::from_millis(setup.config.poll_interval_ms.max(10));
    // Report on every change of state, and every 10 s while nothing changes, so a long load is
    // visible in the API, the event history and the logs without flooding them.
    let mut last_report;
    let mut last_key = None;
    let mut reported_at = Instant::now();
    let mut port_retries = 0;
    // What the runtime last said goes wrong while it keeps trying (a crash loop below
    // `maxRestarts`), shown as the service's reason until it changes or clears.
    let mut noted: Option<shim_core::shimlet::Failure> = None;
    loop {
        let seen = ctx.shimlet().observe(ctx.service_id()).await?;
        let waited = started.elapsed().as_secs();
        let key = (
            seen.state,
            seen.ready_replicas,
            seen.failure.as_ref().map(|f| f.message.clone()),
        );
        let report = match seen.state {
            WorkloadState::Ready => {
                if noted.is_some() {
                    ctx.set_reason(None);
                }
                return Ok(());
            }
            // Another program took the engine's port between its choice and the bind (a race
            // no runtime can close): applying again starts it on a free port.
            WorkloadState::Failed
                if port_retries < PORT_RETRIES
                    && seen
                        .failure
                        .as_ref()
                        .is_some_and(|f| f.reason == FailureReason::PortInUse) =>
            {
                port_retries += 1;
                ctx.shimlet().apply(&workload).await?;
                format!("the engine's port was taken; starting it again (try {port_retries})")
            }
            WorkloadState::Failed => {
                let failure = seen.failure.unwrap_or(shim_core::shimlet::Failure {
                    reason: FailureReason::RuntimeError,
                    message: "the workload failed".into(),
                });
                return Err(StepError::permanent(failure.reason, failure.message));
            }
            // Cannot start yet (e.g. unschedulable pods): the service waits as `pending` with
            // the runtime's reason, and the engine retries with backoff.
            WorkloadState::Pending => {
                let failure = seen.failure.unwrap_or(shim_core::shimlet::Failure {
                    reason: FailureReason::Unschedulable,
                    message: "waiting for resources".into(),
                });
                return Err(StepError::blocked(failure.reason, failure.message));
            }
            WorkloadState::Starting | WorkloadState::Missing => {
                // Scheduled and loading: no longer waiting for resources.
                ctx.unblocked();
                let progress = format!(
                    "{}/{} replicas ready after {waited} s",
                    seen.ready_replicas, workload.replicas
                );
                // A failure beside `Starting` is one the runtime still retries (a container
                // restarted after a crash or an OOM kill): not final, but the client must see it.
                if seen.failure != noted {
                    ctx.set_reason(seen.failure.clone());
                    noted = seen.failure.clone();
                }
                match &seen.failure {
                    Some(f) => format!("{progress} ({:?}: {})", f.reason, f.message),
                    None => format!("{progress} (loading the model)"),
                }
            }
        };
        if last_key.as_ref() != Some(&key) || reported_at.elapsed() >= Duration::from_secs(10) {
            ctx.report(report.clone());
            last_key = Some(key);
            reported_at = Instant::now();
        }
        last_report = report;
        if started.elapsed() >= budget {
            return Err(StepError::permanent(
                FailureReason::StartupTimeout,
                format!(
                    "not ready after {} s (start-up budget); last: {last_report}",
                    budget.as_secs()
                ),
            ));
        }
        tokio::time::sleep(poll).await;
    }
}

async fn expose(ctx: PipelineContext) -> Result<(), StepError> {
    let seen = ctx.shimlet().observe(ctx.service_id()).await?;
    match seen.address {
        Some(address) => {
            let endpoint = format!("{}/v1/chat/completions", address.trim_end_matches('/'));
            ctx.report(endpoint.clone());
            ctx.set_endpoint(endpoint);
        }
        None => ctx.report("no replicas: no endpoint"),
    }
    Ok(())
}

fn missing_step() -> StepError {
    StepError::permanent(
        FailureReason::Internal,
        "an earlier step did not record its result",
    )
}

#[cfg(test)]
mod tests {

    use shim_core::pipeline::PipelineObserver;
    use shim_core::testing::InstantShimlet;
    use shim_core::{DeploySpec, EngineConfig, EventKind, Shimlet, StepProgress};

    use super::*;

    struct Quiet;
    impl PipelineObserver for Quiet {
        fn on_change(&self, _: &[StepProgress], _: EventKind) {}
    }

    struct Setup {
        _root: tempfile::TempDir,
        settings: PluginSettings,
        shimlet: Arc<InstantShimlet>,
    }

    fn setup(engines: serde_json::Value) -> Setup {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("qwen")).unwrap();
        std::fs::create_dir_all(root.path().join("tiny")).unwrap();
        std::fs::write(root.path().join("tiny/model.gguf"), b"GGUF").unwrap();
        std::fs::create_dir_all(root.path().join("two")).unwrap();
        std::fs::write(root.path().join("two/a.gguf"), b"").unwrap();
        std::fs::write(root.path().join("two/b.gguf"), b"").unwrap();
        let config = EngineConfig {
            model_root: root.path().to_path_buf(),
            plugins: Arc::new(serde_json::json!({ "engines": engines })),
            ..EngineConfig::default()
        };
        Setup {
            settings: config.plugin_settings(),
            _root: root,
            shimlet: Arc::new(InstantShimlet::default()),
        }
    }

    async fn run(
        setup: &Setup,
        spec: DeploySpec,
    ) -> (
        Result<(), shim_core::pipeline::StepFailure>,
        PipelineContext,
    ) {
        let pipeline = build(&setup.settings).unwrap();
        let ctx = PipelineContext::new("abcd0001", 1, spec, setup.shimlet.clone(), Arc::new(Quiet));
        (pipeline.run(&ctx).await, ctx)
    }

    #[tokio::test]
    async fn renders_vllm_args_from_the_clients_fields_and_exposes_the_endpoint() {
        let s = setup(serde_json::json!({}));
        let spec: DeploySpec = serde_json::from_value(serde_json::json!({
            "modelName": "qwen", "replicaCount": 2, "contextLength": 4096,
            "resourceRequirements": { "acceleratorCount": 2, "cpu": "4", "memory": "16Gi" },
            "env": [{ "key": "HF_HOME", "value": "/cache" }]
        }))
        .unwrap();
        let (result, ctx) = run(&s, spec).await;
        result.unwrap();
        let w = ctx.get::<WorkloadSpec>().unwrap();
        assert_eq!(w.command, ["vllm", "serve"]);
        assert_eq!(
            w.args,
            [
                "{model_dir}",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--served-model-name",
                "qwen",
                "--tensor-parallel-size",
                "2",
                "--max-model-len",
                "4096"
            ]
        );
        assert_eq!(w.replicas, 2);
        assert_eq!(w.resources.accelerators, 2);
        assert_eq!(w.env["HF_HOME"], "/cache");
        assert_eq!(w.image, "vllm/vllm-openai:latest");
        assert!(w.model.unwrap().host_path.ends_with("qwen"));
        assert_eq!(
            ctx.endpoint().unwrap(),
            "http://instant.invalid/abcd0001/v1/chat/completions"
        );
        assert_eq!(s.shimlet.applies("abcd0001"), 1);
    }

    #[tokio::test]
    async fn no_accelerators_means_no_tensor_parallel_flag() {
        let s = setup(serde_json::json!({}));
        let (result, ctx) = run(&s, DeploySpec::named("qwen")).await;
        result.unwrap();
        let w = ctx.get::<WorkloadSpec>().unwrap();
        assert!(!w.args.contains(&"--tensor-parallel-size".to_string()));
        assert!(!w.args.contains(&"--max-model-len".to_string()));
    }

    #[tokio::test]
    async fn a_missing_model_directory_fails_resolve_with_model_not_found() {
        let s = setup(serde_json::json!({}));
        let (result, _) = run(&s, DeploySpec::named("absent")).await;
        let failure = result.unwrap_err();
        assert_eq!(failure.step, "resolve_model");
        assert_eq!(failure.error.reason, FailureReason::ModelNotFound);
    }

    #[tokio::test]
    async fn an_unknown_engine_names_the_known_presets() {
        let s = setup(serde_json::json!({}));
        let spec = DeploySpec {
            engine: Some("tgi".into()),
            ..DeploySpec::named("qwen")
        };
        let failure = run(&s, spec).await.0.unwrap_err();
        assert_eq!(failure.step, "validate");
        assert!(
            failure
                .error
                .message
                .contains("known: llama-cpp-python, llamacpp, mock, sglang, vllm"),
            "{}",
            failure.error.message
        );
    }

    #[tokio::test]
    async fn gguf_engines_need_exactly_one_model_file() {
        let s = setup(serde_json::json!({ "llamacpp": { "command": ["/bin/sh"] } }));
        let spec = |name: &str| DeploySpec {
            engine: Some("llamacpp".into()),
            context_length: Some(512),
            ..DeploySpec::named(name)
        };
        let (result, ctx) = run(&s, spec("tiny")).await;
        result.unwrap();
        let w = ctx.get::<WorkloadSpec>().unwrap();
        assert_eq!(&w.args[..2], ["-m", "{model_dir}/model.gguf"]);
        assert!(w.args.windows(2).any(|p| p == ["--alias", "tiny"]));
        assert!(w.args.windows(2).any(|p| p == ["-c", "512"]));

        let none = run(&s, spec("qwen")).await.0.unwrap_err();
        assert!(
            none.error.message.contains("has no .gguf file"),
            "{}",
            none.error.message
        );
        let two = run(&s, spec("two")).await.0.unwrap_err();
        assert!(
            two.error
                .message
                .contains("has 2 .gguf files (a.gguf, b.gguf)"),
            "{}",
            two.error.message
        );
    }

    #[tokio::test]
    async fn a_symlink_cannot_lead_out_of_the_model_root() {
        let s = setup(serde_json::json!({}));
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), s.settings.policy.model_root.join("escape"))
            .unwrap();
        let failure = run(&s, DeploySpec::named("escape")).await.0.unwrap_err();
        assert_eq!(failure.error.reason, FailureReason::InvalidSpec);
        assert!(
            failure
                .error
                .message
                .contains("outside the allowed model roots"),
            "{}",
            failure.error.message
        );
    }

    #[tokio::test]
    async fn apply_is_skipped_when_the_runtime_already_runs_this_generation() {
        let s = setup(serde_json::json!({}));
        run(&s, DeploySpec::named("qwen")).await.0.unwrap();
        run(&s, DeploySpec::named("qwen")).await.0.unwrap();
        assert_eq!(
            s.shimlet.applies("abcd0001"),
            1,
            "second run found the goal achieved"
        );
    }

    /// A runtime that accepts every apply and always shows the same observation.
    struct Showing(shim_core::WorkloadObservation);

    #[async_trait::async_trait]
    impl Shimlet for Showing {
        async fn apply(&self, _: &WorkloadSpec) -> Result<(), shim_core::ShimletError> {
            Ok(())
        }
        async fn observe(
            &self,
            _: &str,
        ) -> Result<shim_core::WorkloadObservation, shim_core::ShimletError> {
            Ok(self.0.clone())
        }
        async fn delete(&self, _: &str) -> Result<shim_core::Removal, shim_core::ShimletError> {
            Ok(shim_core::Removal::Gone)
        }
        async fn list(&self) -> Result<Vec<shim_core::ManagedWorkload>, shim_core::ShimletError> {
            Ok(vec![])
        }
    }

    /// Runs the pipeline against a runtime stuck in `state` for `reason`; returns the failure.
    async fn run_showing(
        state: WorkloadState,
        reason: FailureReason,
        message: &str,
    ) -> shim_core::pipeline::StepFailure {
        let s = setup(serde_json::json!({}));
        let pipeline = build(&s.settings).unwrap();
        let seen = shim_core::WorkloadObservation {
            state,
            failure: Some(shim_core::shimlet::Failure {
                reason,
                message: message.into(),
            }),
            ..shim_core::WorkloadObservation::missing()
        };
        let ctx = PipelineContext::new(
            "x",
            1,
            DeploySpec::named("qwen"),
            Arc::new(Showing(seen)),
            Arc::new(Quiet),
        );
        pipeline.run(&ctx).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_failed_workload_fails_wait_ready_with_the_runtimes_words() {
        let failure = run_showing(
            WorkloadState::Failed,
            FailureReason::Exited,
            "exit code 1: error loading model",
        )
        .await;
        assert_eq!(failure.step, "wait_ready");
        assert_eq!(failure.error.kind, shim_core::StepErrorKind::Permanent);
        assert_eq!(failure.error.reason, FailureReason::Exited);
        assert!(failure.error.message.contains("error loading model"));
    }

    /// A runtime whose engine finds its port taken until it has been applied `until` times.
    struct PortTaken {
        applies: std::sync::atomic::AtomicU32,
        until: u32,
    }

    #[async_trait::async_trait]
    impl Shimlet for PortTaken {
        async fn apply(&self, _: &WorkloadSpec) -> Result<(), shim_core::ShimletError> {
            self.applies
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        async fn observe(
            &self,
            _: &str,
        ) -> Result<shim_core::WorkloadObservation, shim_core::ShimletError> {
            let applies = self.applies.load(std::sync::atomic::Ordering::SeqCst);
            Ok(if applies >= self.until {
                shim_core::WorkloadObservation {
                    state: WorkloadState::Ready,
                    ready_replicas: 1,
                    desired_replicas: 1,
                    address: Some("http://127.0.0.1:9".into()),
                    ..shim_core::WorkloadObservation::missing()
                }
            } else {
                shim_core::WorkloadObservation {
                    state: WorkloadState::Failed,
                    failure: Some(shim_core::shimlet::Failure {
                        reason: FailureReason::PortInUse,
                        message: "failed to bind: Address already in use".into(),
                    }),
                    ..shim_core::WorkloadObservation::missing()
                }
            })
        }
        async fn delete(&self, _: &str) -> Result<shim_core::Removal, shim_core::ShimletError> {
            Ok(shim_core::Removal::Gone)
        }
        async fn list(&self) -> Result<Vec<shim_core::ManagedWorkload>, shim_core::ShimletError> {
            Ok(vec![])
        }
    }

    async fn run_port_taken(until: u32) -> (Result<(), shim_core::pipeline::StepFailure>, u32) {
        let s = setup(serde_json::json!({}));
        let pipeline = build(&s.settings).unwrap();
        let runtime = Arc::new(PortTaken {
            applies: 0.into(),
            until,
        });
        let ctx = PipelineContext::new(
            "x",
            1,
            DeploySpec::named("qwen"),
            runtime.clone(),
            Arc::new(Quiet),
        );
        let result = pipeline.run(&ctx).await;
        let applies = runtime.applies.load(std::sync::atomic::Ordering::SeqCst);
        (result, applies)
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_on_a_new_start_a_few_times_then_fails() {
        let (result, applies) = run_port_taken(2).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(applies, 2, "applied once more after the port was taken");
        let (result, applies) = run_port_taken(u32::MAX).await;
        let failure = result.unwrap_err();
        assert_eq!(failure.step, "wait_ready");
        assert_eq!(failure.error.reason, FailureReason::PortInUse);
        assert_eq!(applies, 1 + PORT_RETRIES);
    }

    /// A runtime whose container crashes (and is restarted by it) on the first `crashes`
    /// observations, then is ready.
    struct CrashesThenReady {
        observed: std::sync::atomic::AtomicU32,
        crashes: u32,
    }

    #[async_trait::async_trait]
    impl Shimlet for CrashesThenReady {
        async fn apply(&self, _: &WorkloadSpec) -> Result<(), shim_core::ShimletError> {
            Ok(())
        }
        async fn observe(
            &self,
            _: &str,
        ) -> Result<shim_core::WorkloadObservation, shim_core::ShimletError> {
            let n = self
                .observed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(if n < self.crashes {
                shim_core::WorkloadObservation {
                    state: WorkloadState::Starting,
                    desired_replicas: 1,
                    failure: Some(shim_core::shimlet::Failure {
                        reason: FailureReason::OutOfMemory,
                        message: format!(
                            "OOMKilled ({} restarts of the 5 engine.maxRestarts allows)",
                            n + 1
                        ),
                    }),
                    ..shim_core::WorkloadObservation::missing()
                }
            } else {
                shim_core::WorkloadObservation {
                    state: WorkloadState::Ready,
                    ready_replicas: 1,
                    desired_replicas: 1,
                    address: Some("http://127.0.0.1:9".into()),
                    ..shim_core::WorkloadObservation::missing()
                }
            })
        }
        async fn delete(&self, _: &str) -> Result<shim_core::Removal, shim_core::ShimletError> {
            Ok(shim_core::Removal::Gone)
        }
        async fn list(&self) -> Result<Vec<shim_core::ManagedWorkload>, shim_core::ShimletError> {
            Ok(vec![])
        }
    }

    /// Records the reasons steps set.
    #[derive(Default)]
    struct Reasons(std::sync::Mutex<Vec<Option<String>>>);

    impl PipelineObserver for Reasons {
        fn on_change(&self, _: &[StepProgress], _: EventKind) {}
        fn on_reason(&self, step: &str, why: Option<&shim_core::shimlet::Failure>) {
            assert_eq!(step, "wait_ready");
            self.0
                .lock()
                .unwrap()
                .push(why.map(|f| format!("{:?}: {}", f.reason, f.message)));
        }
    }

    #[tokio::test]
    async fn a_crash_the_runtime_still_restarts_is_shown_as_the_reason_not_a_failure() {
        let s = setup(serde_json::json!({}));
        let pipeline = build(&s.settings).unwrap();
        let reasons = Arc::new(Reasons::default());
        let ctx = PipelineContext::new(
            "x",
            1,
            DeploySpec::named("qwen"),
            Arc::new(CrashesThenReady {
                observed: 0.into(),
                crashes: 3,
            }),
            reasons.clone(),
        );
        // The apply step's goal check observes once too (a crash: not achieved).
        pipeline.run(&ctx).await.unwrap();
        let seen = reasons.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                Some(
                    "OutOfMemory: OOMKilled (2 restarts of the 5 engine.maxRestarts allows)"
                        .to_string()
                ),
                Some(
                    "OutOfMemory: OOMKilled (3 restarts of the 5 engine.maxRestarts allows)"
                        .to_string()
                ),
                None,
            ]
        );
    }

    #[tokio::test]
    async fn unschedulable_workloads_block_wait_ready_with_the_runtimes_reason() {
        let failure = run_showing(
            WorkloadState::Pending,
            FailureReason::Unschedulable,
            "0/3 nodes are available: insufficient nvidia.com/gpu",
        )
        .await;
        assert_eq!(failure.step, "wait_ready");
        assert_eq!(failure.error.kind, shim_core::StepErrorKind::Blocked);
        assert!(
            failure
                .error
                .message
                .contains("insufficient nvidia.com/gpu")
        );
    }
}

#[cfg(test)]
mod admission_tests {
    use std::io::Write as _;

    use shim_core::{EngineConfig, GpuAllocator};

    use super::*;

    /// A GGUF header for a llama of 32 layers, 32 heads, 8 KV heads of 128 (width 4096), trained
    /// on 8192 tokens, vocabulary 32000, with one F16 tensor of `params` elements; the data is a
    /// sparse hole, so only the header takes disk space.
    fn write_gguf(path: &Path, params: u64) {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(1u64.to_le_bytes()); // tensors
        let kv: [(&str, u32); 7] = [
            ("llama.block_count", 32),
            ("llama.attention.head_count", 32),
            ("llama.attention.head_count_kv", 8),
            ("llama.embedding_length", 4096),
            ("llama.context_length", 8192),
            ("llama.vocab_size", 32_000),
            ("llama.feed_forward_length", 14_336),
        ];
        h.extend((kv.len() as u64 + 1).to_le_bytes());
        string(&mut h, "general.architecture");
        h.extend(8u32.to_le_bytes());
        string(&mut h, "llama");
        for (key, value) in kv {
            string(&mut h, key);
            h.extend(4u32.to_le_bytes()); // u32
            h.extend(value.to_le_bytes());
        }
        string(&mut h, "weights");
        h.extend(1u32.to_le_bytes());
        h.extend(params.to_le_bytes());
        h.extend(1u32.to_le_bytes()); // F16
        h.extend(0u64.to_le_bytes());
        let data_start = h.len().div_ceil(32) * 32;
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(&h).unwrap();
        f.set_len(data_start as u64 + params * 2).unwrap();
    }

    fn fake_smi(dir: &Path, rows: &str) -> PathBuf {
        std::fs::write(dir.join("gpus.csv"), rows).unwrap();
        let script = dir.join("nvidia-smi");
        let body = format!("#!/bin/sh\ncat '{}'\n", dir.join("gpus.csv").display());
        std::fs::write(&script, body).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[tokio::test]
    async fn the_hook_estimates_a_gguf_for_llama_cpp_and_compares_it_with_the_gpus() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("llama/")).unwrap();
        // 7 G parameters in F16: 13.04 GiB of weights.
        write_gguf(&root.path().join("llama/model.gguf"), 7_000_000_000);
        std::fs::create_dir_all(root.path().join("empty")).unwrap();
        let config = EngineConfig {
            model_root: root.path().to_path_buf(),
            ..EngineConfig::default()
        };
        let pipeline = build(&config.plugin_settings()).unwrap();
        let smi = fake_smi(
            root.path(),
            "0, GPU-a, Big, 24576, 0\n1, GPU-b, Small, 12288, 0\n",
        );
        let gpus = Arc::new(GpuAllocator::with_inventory(None, false, &smi));
        let ask = |model: &str, context: i64, gpus_asked: i64| AdmissionRequest {
            service_id: None,
            spec: serde_json::from_value(serde_json::json!({
                "modelName": model, "engine": "llama-cpp-python", "contextLength": context,
                "resourceRequirements": {"acceleratorCount": gpus_asked}
            }))
            .unwrap(),
            gpus: gpus.clone(),
            cluster: None,
        };

        let verdict = pipeline.admit(ask("llama", 4096, 1)).await.unwrap();
        let e = verdict.estimate.expect("an estimate");
        assert_eq!(e.fits, Some(true), "{}", e.message);
        assert_eq!(e.weights_bytes, 14_000_000_000);
        // 2 × 32 layers × 8 KV heads × 128 × 2 bytes × 4096 tokens = 512 MiB.
        assert_eq!(e.kv_cache_bytes, 512 << 20);
        assert_eq!(e.context_length, 4096);
        assert!(e.max_context_length.unwrap() >= 8192, "{e:?}");
        let need = verdict.need.expect("a need for placement");
        assert_eq!(need.bytes, e.per_gpu_bytes);

        // On two GPUs (layer split) it needs 6.5 GiB of weights each, but the second GPU has
        // 12 GiB: it fits; 3 GPUs are more than the host has.
        let two = pipeline.admit(ask("llama", 4096, 2)).await.unwrap();
        assert_eq!(two.estimate.unwrap().fits, Some(true));
        let three = pipeline.admit(ask("llama", 4096, 3)).await.unwrap();
        let e = three.estimate.unwrap();
        assert_eq!(e.fits, Some(false));
        assert!(
            e.message.contains("on 3 GPUs but 2 of the 2 free GPUs"),
            "{}",
            e.message
        );

        // A CPU run is estimated but not checked; a directory without model files has no
        // estimate and says why.
        let cpu = pipeline.admit(ask("llama", 4096, 0)).await.unwrap();
        assert_eq!(cpu.estimate.unwrap().fits, None);
        assert!(cpu.need.is_none());
        let empty = pipeline.admit(ask("empty", 4096, 1)).await.unwrap();
        assert!(empty.estimate.is_none());
        assert!(empty.note.unwrap().contains("no .gguf or .safetensors"));

        // The mock engine has no memory profile: nothing to estimate, nothing to warn about.
        let mut mock = ask("llama", 4096, 1);
        mock.spec.engine = Some("mock".into());
        let verdict = pipeline.admit(mock).await.unwrap();
        assert!(verdict.estimate.is_none() && verdict.note.is_none());

        // Scaled to zero holds no GPU.
        let mut zero = ask("llama", 4096, 1);
        zero.spec.replica_count = Some(0);
        let e = pipeline.admit(zero).await.unwrap().estimate.unwrap();
        assert_eq!(e.fits, None);
    }
}

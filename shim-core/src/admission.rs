//! Admission: whether a deploy, update or dry run fits the GPUs, decided at request time.
//!
//! A pipeline may offer an admission hook ([`PipelineBuilder::admission`]): given the spec and
//! the GPU inventory it returns a [`Verdict`] with the memory [`Estimate`]. The engine applies the
//! policy `engine.fitCheck` ([`FitCheck`]): `enforce` refuses a request that does not fit with
//! [`Error::Unfit`] (HTTP 422) before anything is stored; `warn` logs and accepts; `off` skips the
//! check (a dry run still shows the estimate). When the hook cannot tell (unknown model
//! metadata, GPU memory unknown) the request is accepted with a warning.
//!
//! [`PipelineBuilder::admission`]: crate::PipelineBuilder::admission

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{ClusterGpus, GpuAllocator, GpuNeed};
use crate::pipeline::Pipeline;
use crate::spec::DeploySpec;

/// `engine.fitCheck`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FitCheck {
    /// Refuse requests that do not fit (HTTP 422).
    #[default]
    Enforce,
    /// Log a warning and accept.
    Warn,
    /// Do not check.
    Off,
}

impl std::str::FromStr for FitCheck {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "enforce" => Ok(FitCheck::Enforce),
            "warn" => Ok(FitCheck::Warn),
            "off" => Ok(FitCheck::Off),
            other => Err(format!(
                "engine.fitCheck: {other:?} is not one of enforce, warn, off"
            )),
        }
    }
}

/// The memory estimate of one replica, as the API shows it (dry run `data.estimate`, and the
/// `data.estimate` of a 422).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// Memory needed on each GPU of a replica.
    pub per_gpu_bytes: u64,
    /// Weights on each GPU (weights ÷ tensor-parallel size).
    pub weights_bytes: u64,
    /// KV cache on each GPU for `context_length` tokens.
    pub kv_cache_bytes: u64,
    /// Engine overhead on each GPU.
    pub overhead_bytes: u64,
    /// Tokens the estimate is for.
    pub context_length: u64,
    /// GPUs per replica.
    pub tensor_parallel: u32,
    /// Whether the free GPUs hold it; `null` when not checked (no GPUs asked for, or GPU memory
    /// unknown).
    pub fits: Option<bool>,
    /// The numbers in words, with what would fit when it does not.
    pub message: String,
    /// The largest context length that fits on the free GPUs; `null` when unknown.
    pub max_context_length: Option<u64>,
}

/// What the admission hook is asked.
#[derive(Debug, Clone)]
pub struct AdmissionRequest {
    /// The service being updated; `None` for a deploy or dry run.
    pub service_id: Option<String>,
    /// The requested spec (already validated).
    pub spec: DeploySpec,
    /// The GPU inventory of this host.
    pub gpus: Arc<GpuAllocator>,
    /// The cluster's nodes and their GPUs, when the runtime's scheduler places replicas
    /// ([`Shimlet::cluster_gpus`](crate::Shimlet::cluster_gpus)); a request is then checked
    /// against these, not against `gpus`.
    pub cluster: Option<ClusterGpus>,
}

/// The hook's answer.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// The estimate; `None` when the model's metadata is unknown or the engine has no formula.
    pub estimate: Option<Estimate>,
    /// What to record for placement (best-fit GPUs).
    pub need: Option<GpuNeed>,
    /// Why there is no estimate, for the warning.
    pub note: Option<String>,
}

/// An admission hook.
pub type AdmissionFn = Arc<dyn Fn(AdmissionRequest) -> BoxFuture<'static, Verdict> + Send + Sync>;

/// What an accepted service needs per GPU, asked of the pipeline's hook again without judging
/// the fit: for services loaded from the store at start, whose needs were recorded in memory
/// only when they were accepted, so their replicas are placed as well after a restart.
pub(crate) async fn need_of(
    pipeline: &Pipeline,
    gpus: &Arc<GpuAllocator>,
    cluster: Option<ClusterGpus>,
    spec: &DeploySpec,
    service_id: &str,
) -> Option<GpuNeed> {
    pipeline
        .admit(AdmissionRequest {
            service_id: Some(service_id.to_string()),
            spec: spec.clone(),
            gpus: gpus.clone(),
            cluster,
        })
        .await?
        .need
}

/// Runs the pipeline's hook and applies `mode`.
///
/// # Errors
/// [`Error::Unfit`] when the estimate says it does not fit and `mode` is `enforce`.
pub(crate) async fn admit(
    pipeline: &Pipeline,
    gpus: &Arc<GpuAllocator>,
    cluster: Option<ClusterGpus>,
    mode: FitCheck,
    spec: &DeploySpec,
    service_id: Option<&str>,
    dry_run: bool,
) -> Result<Verdict> {
    if mode == FitCheck::Off && !dry_run {
        return Ok(Verdict::default());
    }
    let Some(verdict) = pipeline
        .admit(AdmissionRequest {
            service_id: service_id.map(String::from),
            spec: spec.clone(),
            gpus: gpus.clone(),
            cluster,
        })
        .await
    else {
        return Ok(Verdict::default());
    };
    match &verdict.estimate {
        Some(e) if e.fits == Some(false) => match mode {
            FitCheck::Enforce => {
                return Err(Error::Unfit {
                    message: e.message.clone(),
                    estimate: Box::new(e.clone()),
                });
            }
            FitCheck::Warn => tracing::warn!(
                model = %spec.model_name,
                "does not fit, accepted because engine.fitCheck is warn: {}",
                e.message
            ),
            FitCheck::Off => {}
        },
        Some(_) => {}
        None => {
            if let Some(note) = &verdict.note {
                tracing::warn!(model = %spec.model_name, "fit not checked: {note}");
            }
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::testing::InstantShimlet;
    use crate::{Engine, EngineConfig, PipelineContext, StepError};

    fn estimate(fits: Option<bool>) -> Estimate {
        Estimate {
            per_gpu_bytes: 41 << 30,
            weights_bytes: 35 << 30,
            kv_cache_bytes: 5 << 30,
            overhead_bytes: 1 << 30,
            context_length: 32_768,
            tensor_parallel: 1,
            fits,
            message: "needs 41.0 GiB per GPU".into(),
            max_context_length: Some(16_384),
        }
    }

    /// An engine whose pipeline's hook says "does not fit" for models named `big`, and counts
    /// its calls.
    async fn engine(mode: FitCheck, calls: Arc<AtomicU32>) -> Engine {
        let pipeline = Pipeline::new("fit")
            .admission(move |request: AdmissionRequest| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    match request.spec.model_name.as_str() {
                        "big" => Verdict {
                            estimate: Some(estimate(Some(false))),
                            ..Verdict::default()
                        },
                        "unknown" => Verdict {
                            note: Some("no metadata".into()),
                            ..Verdict::default()
                        },
                        _ => Verdict {
                            estimate: Some(estimate(Some(true))),
                            ..Verdict::default()
                        },
                    }
                }
            })
            .step("apply", |_ctx: PipelineContext| async {
                Ok::<(), StepError>(())
            })
            .build();
        Engine::builder()
            .config(EngineConfig {
                gpus: Some(Vec::new()),
                fit_check: mode,
                ..EngineConfig::default()
            })
            .shimlet_instance(|_| Arc::new(InstantShimlet::default()))
            .pipeline(pipeline)
            .build()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn enforce_refuses_at_request_time_and_stores_nothing() {
        let calls = Arc::new(AtomicU32::new(0));
        let engine = engine(FitCheck::Enforce, calls.clone()).await;
        let err = engine.deploy(DeploySpec::named("big")).await.unwrap_err();
        match &err {
            Error::Unfit { message, estimate } => {
                assert_eq!(message, "needs 41.0 GiB per GPU");
                assert_eq!(estimate.fits, Some(false));
            }
            other => panic!("expected Unfit, got {other:?}"),
        }
        assert!(engine.list().is_empty(), "nothing was accepted");
        // Unknown metadata is accepted (with a warning); a fitting model too.
        engine.deploy(DeploySpec::named("unknown")).await.unwrap();
        let id = engine.deploy(DeploySpec::named("small")).await.unwrap();
        // An update to a spec that does not fit is refused; the service keeps its spec.
        let err = engine.update(&id, DeploySpec::named("big")).await;
        assert!(matches!(err, Err(Error::Unfit { .. })), "{err:?}");
        assert_eq!(engine.get(&id).unwrap().spec.model_name, "small");
        let dry = engine.dry_run(DeploySpec::named("small")).await.unwrap();
        assert_eq!(dry.estimate.unwrap().fits, Some(true));
        assert!(matches!(
            engine.dry_run(DeploySpec::named("big")).await,
            Err(Error::Unfit { .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        engine.shutdown().await;
    }

    #[tokio::test]
    async fn warn_accepts_and_off_skips_the_check_but_dry_runs_still_estimate() {
        let calls = Arc::new(AtomicU32::new(0));
        let warn = engine(FitCheck::Warn, calls.clone()).await;
        warn.deploy(DeploySpec::named("big")).await.unwrap();
        let dry = warn.dry_run(DeploySpec::named("big")).await.unwrap();
        assert_eq!(dry.estimate.unwrap().fits, Some(false));
        warn.shutdown().await;

        let calls = Arc::new(AtomicU32::new(0));
        let off = engine(FitCheck::Off, calls.clone()).await;
        off.deploy(DeploySpec::named("big")).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "off does not run the hook on deploy"
        );
        let dry = off.dry_run(DeploySpec::named("big")).await.unwrap();
        assert_eq!(dry.estimate.unwrap().fits, Some(false));
        off.shutdown().await;
    }

    #[test]
    fn fit_check_parses_and_names_the_key_when_wrong() {
        assert_eq!("WARN".parse::<FitCheck>(), Ok(FitCheck::Warn));
        let err = "strict".parse::<FitCheck>().unwrap_err();
        assert!(err.contains("engine.fitCheck"), "{err}");
    }
}

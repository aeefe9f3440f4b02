//! How much GPU memory one replica needs, and whether the free GPUs hold it.
//!
//! Per GPU: weights ÷ tensor-parallel size + KV cache
//! (2 × layers × ⌈KV heads ÷ TP⌉ × head_dim × bytes per element × tokens) + the engine's overhead.
//! The overhead and the share of a GPU an engine may use are preset data ([`FitProfile`]), so a
//! deployment can correct them under `engines.<name>.fit` without a new release.

use serde::{Deserialize, Serialize};

use crate::ModelInfo;

const GIB: f64 = (1u64 << 30) as f64;

/// Which formula an engine's overhead follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// vLLM and SGLang: weights and KV cache live inside `memoryFraction` of each GPU, plus a
    /// fixed overhead (activations of the profiling batch, CUDA graphs, NCCL buffers).
    Vllm,
    /// llama.cpp: model buffer, KV buffer (f16) and a compute buffer that grows with the
    /// context and the vocabulary.
    Llamacpp,
    /// No estimate (the mock engine, unknown engines).
    #[default]
    None,
}

/// An engine's memory behaviour, as preset data (`engines.<name>.fit`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FitProfile {
    /// Formula for the overhead.
    pub estimator: Estimator,
    /// Share of each GPU's total memory the engine may use (vLLM `gpu_memory_utilization`).
    pub memory_fraction: f64,
    /// Fixed bytes per GPU on top of weights and KV cache.
    pub overhead_bytes: u64,
    /// Bytes per KV cache element (2: f16/bf16, the engines' default).
    pub kv_bytes_per_element: u64,
    /// Context length when the request sets none; `None` = the model's trained maximum (what
    /// vLLM and SGLang do).
    pub default_context: Option<u64>,
    /// Tokens per micro-batch (llama.cpp `n_ubatch`), which sizes its compute buffer.
    pub ubatch: u64,
}

impl Default for FitProfile {
    fn default() -> Self {
        Self {
            estimator: Estimator::None,
            memory_fraction: 1.0,
            overhead_bytes: 0,
            kv_bytes_per_element: 2,
            default_context: None,
            ubatch: 512,
        }
    }
}

impl FitProfile {
    /// vLLM: `gpu_memory_utilization` 0.9; about 2 GiB for the profiling batch's activations,
    /// CUDA graphs and the CUDA context.
    pub fn vllm() -> Self {
        Self {
            estimator: Estimator::Vllm,
            memory_fraction: 0.9,
            overhead_bytes: 2 << 30,
            ..Self::default()
        }
    }

    /// SGLang: `mem_fraction_static` about 0.88, the same kind of overhead as vLLM.
    pub fn sglang() -> Self {
        Self {
            memory_fraction: 0.88,
            ..Self::vllm()
        }
    }

    /// llama.cpp with `default_context` tokens when none is asked for (llama-server: 4096,
    /// llama-cpp-python's server: 2048). The fixed part is the CUDA context and cuBLAS
    /// workspace, which llama.cpp does not count in its buffers.
    pub fn llamacpp(default_context: u64) -> Self {
        Self {
            estimator: Estimator::Llamacpp,
            memory_fraction: 1.0,
            overhead_bytes: 384 << 20,
            default_context: Some(default_context),
            ..Self::default()
        }
    }
}

/// The memory one replica needs on each of its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// Everything below, added up.
    pub per_gpu_bytes: u64,
    /// This GPU's share of the weights.
    pub weights_bytes: u64,
    /// This GPU's share of the KV cache for `context_length` tokens.
    pub kv_cache_bytes: u64,
    /// Engine overhead on this GPU (fixed part plus `compute_bytes`).
    pub overhead_bytes: u64,
    /// llama.cpp's compute and output buffers (part of `overhead_bytes`; 0 for other engines).
    pub compute_bytes: u64,
    /// Tokens the KV cache holds.
    pub context_length: u64,
    /// GPUs one replica spans.
    pub tensor_parallel: u32,
}

impl Estimate {
    /// "needs 81.0 GiB per GPU (weights 15.0, KV cache 64.0 for 524288 tokens, overhead 2.0)":
    /// how every fit message starts.
    pub fn needs(&self) -> String {
        format!(
            "needs {} GiB per GPU (weights {}, KV cache {} for {} tokens, overhead {})",
            format_gib(self.per_gpu_bytes),
            format_gib(self.weights_bytes),
            format_gib(self.kv_cache_bytes),
            self.context_length,
            format_gib(self.overhead_bytes),
        )
    }
}

/// Context used when neither the request, the preset nor the model says.
const FALLBACK_CONTEXT: u64 = 2048;

/// The context length an engine would run with.
pub fn effective_context(info: &ModelInfo, profile: &FitProfile, requested: Option<u64>) -> u64 {
    requested
        .or(profile.default_context)
        .or(info.max_context_length)
        .unwrap_or(FALLBACK_CONTEXT)
}

/// KV cache bytes per token on one GPU.
fn kv_per_token(info: &ModelInfo, profile: &FitProfile, tp: u64) -> Option<u64> {
    let layers = info.layers?;
    let kv_heads = info.kv_heads?;
    let k = info.head_dim?;
    let v = info.value_head_dim.unwrap_or(k);
    // Attention heads are split across the tensor-parallel ranks; KV heads fewer than the ranks
    // are replicated, hence the ceiling.
    let heads_here = kv_heads.div_ceil(tp);
    Some(layers * heads_here * (k + v) * profile.kv_bytes_per_element)
}

/// llama.cpp sizes its KV cache in whole multiples of 256 cells.
const LLAMACPP_KV_PAD: u64 = 256;

/// llama.cpp's compute buffer plus its output (logits) buffer, in bytes.
///
/// The graph allocator reuses memory between the phases of one micro-batch of `ubatch` tokens,
/// so the buffer is the larger of two phases (all tensors f32):
/// - attention: the scores and the mask (`kv_cells × ubatch × (heads + 1)`), next to the
///   feed-forward and residual activations (`(ff + 4 × width) × ubatch`);
/// - output: the logits (`vocab × ubatch`) and two rows of activations (`2 × width × ubatch`).
///
/// The output buffer holds one row of logits. Fitted to the buffer sizes llama.cpp logs with
/// flash attention off (llama-cpp-python's default; see `tests/llama_accuracy.rs` and
/// docs/fit-check.md); with flash attention on there are no scores, so this overestimates.
pub fn llamacpp_compute_bytes(info: &ModelInfo, context: u64, ubatch: u64) -> u64 {
    let ub = ubatch.min(context).max(1);
    let vocab = info.vocab_size.unwrap_or(32_000);
    let embd = info.embedding_length.unwrap_or(4096);
    let heads = info.heads.unwrap_or(32);
    let ff = info.feed_forward_length.unwrap_or(4 * embd);
    let kv_cells = context.div_ceil(LLAMACPP_KV_PAD) * LLAMACPP_KV_PAD;
    let attention = (kv_cells * (heads + 1) + ff + 4 * embd) * ub * 4;
    let output = (vocab + 2 * embd) * ub * 4;
    attention.max(output) + vocab * 4
}

/// The memory per GPU of one replica of `info` on an engine with `profile`, for `context`
/// tokens (`None`: the profile's default) over `tp` GPUs (0 = on the CPU, counted as one).
/// `None` when the profile makes no estimate or the model's attention shape is unknown.
pub fn estimate(
    info: &ModelInfo,
    profile: &FitProfile,
    context: Option<u64>,
    tp: u32,
) -> Option<Estimate> {
    if profile.estimator == Estimator::None {
        return None;
    }
    let tp = tp.max(1);
    let context = effective_context(info, profile, context);
    let per_token = kv_per_token(info, profile, u64::from(tp))?;
    let (kv_tokens, compute) = match profile.estimator {
        Estimator::Llamacpp => (
            context.div_ceil(LLAMACPP_KV_PAD) * LLAMACPP_KV_PAD,
            llamacpp_compute_bytes(info, context, profile.ubatch),
        ),
        _ => (context, 0),
    };
    let weights = info.weights_bytes.div_ceil(u64::from(tp));
    let kv = per_token * kv_tokens;
    let overhead = profile.overhead_bytes + compute;
    Some(Estimate {
        per_gpu_bytes: weights + kv + overhead,
        weights_bytes: weights,
        kv_cache_bytes: kv,
        overhead_bytes: overhead,
        compute_bytes: compute,
        context_length: context,
        tensor_parallel: tp,
    })
}

/// Smallest context worth suggesting.
const MIN_CONTEXT: u64 = 256;

/// The largest context (a multiple of 256, at most the model's trained length when known) whose
/// estimate fits in `usable_bytes` per GPU over `tp` GPUs; `None` when not even 256 tokens fit.
pub fn max_context(
    info: &ModelInfo,
    profile: &FitProfile,
    tp: u32,
    usable_bytes: u64,
) -> Option<u64> {
    let fits = |ctx: u64| {
        estimate(info, profile, Some(ctx), tp).is_some_and(|e| e.per_gpu_bytes <= usable_bytes)
    };
    if !fits(MIN_CONTEXT) {
        return None;
    }
    let cap = info.max_context_length.unwrap_or(1 << 24).max(MIN_CONTEXT);
    // The estimate grows with the context, so a binary search over multiples of 256 finds it.
    let (mut lo, mut hi) = (1u64, cap / MIN_CONTEXT);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid * MIN_CONTEXT) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo * MIN_CONTEXT)
}

/// One GPU's memory as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    /// Its id (index), for messages.
    pub id: String,
    /// Total memory.
    pub total_bytes: u64,
    /// Memory free now.
    pub free_bytes: u64,
}

impl GpuMemory {
    /// What an engine with `profile` may use of it: the free memory, and no more than its share
    /// of the total (vLLM refuses to start when less than that share is free).
    pub fn usable(&self, profile: &FitProfile) -> u64 {
        let share = (self.total_bytes as f64 * profile.memory_fraction.clamp(0.0, 1.0)) as u64;
        self.free_bytes.min(share)
    }
}

/// An estimate compared with the GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Memory per GPU.
    pub estimate: Estimate,
    /// `Some(false)`: no set of the given GPUs holds it. `None`: not checked (no GPU asked for,
    /// or GPU memory unknown).
    pub fits: Option<bool>,
    /// The numbers in words.
    pub message: String,
    /// The largest context that fits on the given GPUs (`None` when unchecked or none fits).
    pub max_context_length: Option<u64>,
    /// GPUs per replica that would hold the asked-for context, when more than asked.
    pub suggested_gpus: Option<u32>,
}

/// "41.3" (GiB, one decimal).
pub fn format_gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / GIB)
}

/// Whether `estimate` of one replica over `tp` GPUs fits `replicas` times on `gpus` (the GPUs it
/// may use: free ones, with their free memory), and if not, what would: a shorter context or
/// more GPUs per replica. `gpus: None` = memory unknown; `tp == 0` = a CPU deployment. `None` when
/// no estimate can be made.
pub fn plan(
    info: &ModelInfo,
    profile: &FitProfile,
    context: Option<u64>,
    tp: u32,
    replicas: u32,
    gpus: Option<&[GpuMemory]>,
) -> Option<Plan> {
    let est = estimate(info, profile, context, tp)?;
    let needs = est.needs();
    let unchecked = |why: &str| Plan {
        estimate: est,
        fits: None,
        message: format!("{needs}; {why}"),
        max_context_length: None,
        suggested_gpus: None,
    };
    if tp == 0 {
        return Some(unchecked("runs without GPUs, so GPU memory is not checked"));
    }
    let Some(gpus) = gpus.filter(|g| !g.is_empty()) else {
        return Some(unchecked("GPU memory is unknown, so it is not checked"));
    };
    let mut usable: Vec<u64> = gpus.iter().map(|g| g.usable(profile)).collect();
    usable.sort_unstable_by(|a, b| b.cmp(a));
    let replicas = replicas.max(1);
    let wanted = (tp * replicas) as usize;
    // The wanted-th largest usable GPU bounds what every replica's GPU can hold.
    let bound = |count: usize| usable.get(count.saturating_sub(1)).copied();
    let max_ctx = bound(wanted).and_then(|b| max_context(info, profile, tp, b));
    let fitting = usable.iter().filter(|u| **u >= est.per_gpu_bytes).count();
    if fitting >= wanted {
        return Some(Plan {
            estimate: est,
            fits: Some(true),
            message: format!("{needs}; fits ({fitting} free GPU(s) have enough, {wanted} needed)"),
            max_context_length: max_ctx,
            suggested_gpus: None,
        });
    }
    let largest = usable[0];
    let mut message = if wanted == 1 {
        format!(
            "{needs} but the largest free GPU has {} GiB usable",
            format_gib(largest)
        )
    } else {
        format!(
            "{needs} on {wanted} GPUs but {fitting} of the {} free GPUs have that much (largest: {} GiB usable)",
            usable.len(),
            format_gib(largest)
        )
    };
    // More GPUs per replica: the smallest count that splits the attention heads evenly (vLLM and
    // SGLang require it) and fits.
    let suggested = (tp + 1..=(usable.len() as u32 / replicas))
        .filter(|n| info.heads.is_none_or(|h| h % u64::from(*n) == 0))
        .find(|n| {
            let need = (n * replicas) as usize;
            match (estimate(info, profile, context, *n), bound(need)) {
                (Some(e), Some(b)) => e.per_gpu_bytes <= b,
                _ => false,
            }
        });
    let mut hints = Vec::new();
    if let Some(ctx) = max_ctx.filter(|c| *c < est.context_length) {
        hints.push(format!("{ctx} tokens would fit"));
    }
    match (suggested, hints.is_empty()) {
        (Some(n), true) => hints.push(format!("{n} GPUs per replica would fit")),
        (Some(n), false) => hints.push(format!("{n} GPUs")),
        (None, _) => {}
    }
    if hints.is_empty() {
        message.push_str("; no shorter context or GPU count on this host would fit");
    } else {
        message.push_str("; ");
        message.push_str(&hints.join(", or "));
    }
    Some(Plan {
        estimate: est,
        fits: Some(false),
        message,
        max_context_length: max_ctx,
        suggested_gpus: suggested,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelFormat;

    /// A 7B-like llama: 32 layers, 32 heads, 8 KV heads of 128, 14 GiB of weights.
    fn llama() -> ModelInfo {
        ModelInfo {
            format: ModelFormat::Safetensors,
            files: Vec::new(),
            architecture: Some("LlamaForCausalLM".into()),
            parameters: 7_000_000_000,
            weights_bytes: 14 << 30,
            quantization: Some("BF16".into()),
            layers: Some(32),
            heads: Some(32),
            kv_heads: Some(8),
            head_dim: Some(128),
            value_head_dim: Some(128),
            embedding_length: Some(4096),
            vocab_size: Some(128_256),
            feed_forward_length: Some(14_336),
            max_context_length: Some(131_072),
        }
    }

    fn gpu(id: &str, total_gib: u64, free_gib: u64) -> GpuMemory {
        GpuMemory {
            id: id.into(),
            total_bytes: total_gib << 30,
            free_bytes: free_gib << 30,
        }
    }

    #[test]
    fn the_kv_cache_follows_the_formula() {
        let e = estimate(&llama(), &FitProfile::vllm(), Some(32_768), 1).unwrap();
        // 2 × 32 layers × 8 KV heads × 128 × 2 bytes × 32768 tokens = 4 GiB.
        assert_eq!(e.kv_cache_bytes, 2 * 32 * 8 * 128 * 2 * 32_768);
        assert_eq!(e.kv_cache_bytes, 4 << 30);
        assert_eq!(e.weights_bytes, 14 << 30);
        assert_eq!(e.overhead_bytes, 2 << 30);
        assert_eq!(e.per_gpu_bytes, 20 << 30);
        // Tensor parallel 2 halves weights and KV heads; 16 GPUs replicate the 8 KV heads.
        let e2 = estimate(&llama(), &FitProfile::vllm(), Some(32_768), 2).unwrap();
        assert_eq!(e2.weights_bytes, 7 << 30);
        assert_eq!(e2.kv_cache_bytes, 2 << 30);
        let e16 = estimate(&llama(), &FitProfile::vllm(), Some(32_768), 16).unwrap();
        assert_eq!(e16.kv_cache_bytes, 2 * 32 * 128 * 2 * 32_768);
    }

    #[test]
    fn without_a_context_vllm_uses_the_trained_length() {
        let e = estimate(&llama(), &FitProfile::vllm(), None, 1).unwrap();
        assert_eq!(e.context_length, 131_072);
        let l = estimate(&llama(), &FitProfile::llamacpp(4096), None, 1).unwrap();
        assert_eq!(l.context_length, 4096);
    }

    #[test]
    fn unknown_shapes_and_the_mock_engine_give_no_estimate() {
        let mut info = llama();
        info.kv_heads = None;
        assert!(estimate(&info, &FitProfile::vllm(), None, 1).is_none());
        assert!(estimate(&llama(), &FitProfile::default(), None, 1).is_none());
    }

    #[test]
    fn max_context_is_the_inverse() {
        let p = FitProfile::vllm();
        let usable = 20u64 << 30;
        let ctx = max_context(&llama(), &p, 1, usable).unwrap();
        assert_eq!(ctx, 32_768);
        assert!(estimate(&llama(), &p, Some(ctx), 1).unwrap().per_gpu_bytes <= usable);
        assert!(
            estimate(&llama(), &p, Some(ctx + 256), 1)
                .unwrap()
                .per_gpu_bytes
                > usable
        );
        // Capped at the trained length.
        assert_eq!(max_context(&llama(), &p, 1, 1 << 40), Some(131_072));
        // Weights alone do not fit.
        assert_eq!(max_context(&llama(), &p, 1, 10 << 30), None);
    }

    #[test]
    fn a_plan_that_does_not_fit_says_what_would() {
        // 20 GiB needed; a 20 GiB GPU gives 18 usable (90 %), two of them hold TP 2.
        let gpus = [gpu("0", 20, 20), gpu("1", 20, 20)];
        let p = plan(
            &llama(),
            &FitProfile::vllm(),
            Some(32_768),
            1,
            1,
            Some(&gpus),
        )
        .unwrap();
        assert_eq!(p.fits, Some(false));
        assert_eq!(p.suggested_gpus, Some(2));
        let ctx = p.max_context_length.unwrap();
        assert!((16_384..32_768).contains(&ctx), "{ctx}");
        assert_eq!(
            p.message,
            format!(
                "needs 20.0 GiB per GPU (weights 14.0, KV cache 4.0 for 32768 tokens, overhead 2.0) \
                 but the largest free GPU has 18.0 GiB usable; {ctx} tokens would fit, or 2 GPUs"
            )
        );
        let ok = plan(&llama(), &FitProfile::vllm(), Some(8192), 1, 1, Some(&gpus)).unwrap();
        assert_eq!(ok.fits, Some(true));
        assert!(
            ok.message.starts_with("needs 17.0 GiB per GPU"),
            "{}",
            ok.message
        );
    }

    #[test]
    fn replicas_need_a_fitting_gpu_each() {
        let gpus = [gpu("0", 80, 80), gpu("1", 20, 20)];
        let p = plan(
            &llama(),
            &FitProfile::vllm(),
            Some(32_768),
            1,
            2,
            Some(&gpus),
        )
        .unwrap();
        assert_eq!(p.fits, Some(false));
        assert!(
            p.message
                .contains("on 2 GPUs but 1 of the 2 free GPUs have that much"),
            "{}",
            p.message
        );
    }

    #[test]
    fn cpu_runs_and_unknown_gpus_are_not_checked() {
        let p = plan(&llama(), &FitProfile::vllm(), Some(8192), 0, 1, None).unwrap();
        assert_eq!(p.fits, None);
        assert!(p.message.contains("runs without GPUs"));
        let p = plan(&llama(), &FitProfile::vllm(), Some(8192), 1, 1, Some(&[])).unwrap();
        assert_eq!(p.fits, None);
        assert!(p.message.contains("GPU memory is unknown"));
    }

    #[test]
    fn usable_memory_is_free_memory_within_the_fraction() {
        let p = FitProfile::vllm();
        assert_eq!(gpu("0", 80, 80).usable(&p), (80u64 << 30) * 9 / 10);
        assert_eq!(gpu("0", 80, 10).usable(&p), 10 << 30);
    }
}

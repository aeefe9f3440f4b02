//! Will it fit on a cluster? The admission check for runtimes whose own scheduler places replicas
//! on nodes (Kubernetes): every GPU of a replica is on one node, a GPU is given whole to one pod,
//! and what a node says about its GPUs (allocatable count, memory per GPU when labelled) is all
//! there is to go by.
//!
//! A replica of `tp` GPUs fits on a node with `tp` allocatable GPUs whose memory (times the
//! engine's `memoryFraction`) holds the estimate; `replicas` replicas fit when the nodes hold
//! that many together. A node's allocatable GPUs count whether or not pods hold them now, as the
//! local check counts GPUs held by this shim as released: a request is refused only when the
//! cluster as it is built could never run it; one that must wait for GPUs to be freed stays
//! `pending` with the scheduler's words. Nodes without a memory label are counted but their
//! memory is unknown, so a request that needs them is accepted with `fits: null`.

use shim_core::{ClusterGpus, NodeGpus};
use shim_model::{FitProfile, GpuMemory, ModelInfo, Plan, format_gib};

/// Compares the estimate of one replica over `tp` GPUs, `replicas` times, with the cluster's
/// nodes. `None` when no estimate can be made.
pub(crate) fn plan_on_nodes(
    info: &ModelInfo,
    profile: &FitProfile,
    context: Option<u64>,
    tp: u32,
    replicas: u32,
    cluster: &ClusterGpus,
) -> Option<Plan> {
    // The estimate alone, unchecked: what is returned whenever nothing can be compared.
    let unchecked = shim_model::plan(info, profile, context, tp, replicas, None)?;
    if tp == 0 || replicas == 0 {
        return Some(unchecked);
    }
    let needs = unchecked.estimate.needs();
    let need = unchecked.estimate.per_gpu_bytes;
    let nodes = match cluster {
        ClusterGpus::Nodes(nodes) => nodes,
        ClusterGpus::Unknown(why) => {
            return Some(Plan {
                message: format!("{needs}; the cluster's GPUs are unknown ({why}), so not checked"),
                ..unchecked
            });
        }
        // `ClusterGpus` may grow; what this check does not understand it does not check.
        _ => return Some(unchecked),
    };
    let refused = |message: String| Plan {
        fits: Some(false),
        message,
        max_context_length: None,
        suggested_gpus: None,
        estimate: unchecked.estimate,
    };
    // Replicas a node holds by its GPU count alone.
    let slots = |n: &NodeGpus| n.allocatable / tp;
    let by_count: u32 = nodes.iter().map(slots).sum();
    if by_count < replicas {
        // The first by name among the largest, so the message does not depend on list order.
        let most = nodes
            .iter()
            .max_by_key(|n| (n.allocatable, std::cmp::Reverse(&n.node)));
        return Some(refused(match most {
            None => format!("{needs} on {tp} GPU(s) of one node, but no node has GPUs"),
            Some(n) if n.allocatable < tp => format!(
                "{needs} on {tp} GPUs of one node, but no node has {tp} allocatable GPUs (the \
                 most: {} on node {})",
                n.allocatable, n.node
            ),
            Some(_) => format!(
                "{needs} on {tp} GPU(s) of one node for each of {replicas} replicas, but the \
                 nodes' allocatable GPUs hold {by_count} such replicas"
            ),
        }));
    }
    let usable = |n: &NodeGpus| n.memory_bytes.map(|m| gpu(n, m).usable(profile));
    let big_enough: Vec<&NodeGpus> = nodes.iter().filter(|n| n.allocatable >= tp).collect();
    let fitting: u32 = big_enough
        .iter()
        .filter(|n| usable(n).is_some_and(|u| u >= need))
        .map(|n| slots(n))
        .sum();
    // The labelled node whose GPUs are largest gives the hints (context, GPU count).
    let best = big_enough
        .iter()
        .filter(|n| n.memory_bytes.is_some())
        .max_by_key(|n| (usable(n), n.allocatable));
    let on_best = best.and_then(|n| {
        let gpus = vec![gpu(n, n.memory_bytes?); n.allocatable as usize];
        shim_model::plan(info, profile, context, tp, 1, Some(&gpus))
    });
    if fitting >= replicas {
        return Some(Plan {
            fits: Some(true),
            message: format!(
                "{needs}; fits (nodes with {tp} allocatable GPU(s) of enough memory hold \
                 {fitting} replica(s), {replicas} needed)"
            ),
            max_context_length: on_best.and_then(|p| p.max_context_length),
            suggested_gpus: None,
            estimate: unchecked.estimate,
        });
    }
    let unknown: Vec<&str> = big_enough
        .iter()
        .filter(|n| n.memory_bytes.is_none())
        .map(|n| n.node.as_str())
        .collect();
    let unknown_slots: u32 = big_enough
        .iter()
        .filter(|n| n.memory_bytes.is_none())
        .map(|n| slots(n))
        .sum();
    if fitting + unknown_slots >= replicas {
        return Some(Plan {
            message: format!(
                "{needs}; only the GPU count was checked: the GPU memory of node(s) {} is \
                 unknown",
                unknown.join(", ")
            ),
            ..unchecked
        });
    }
    // Enough GPUs, too little memory on them.
    let Some((node, plan)) = best.zip(on_best) else {
        // Unreachable in practice (by count it fits, so some node is big enough, and were
        // its memory unknown the request would have been accepted above); say what is known.
        return Some(refused(format!(
            "{needs}; no node has {tp} GPU(s) with that much memory"
        )));
    };
    let memory = node.memory_bytes.unwrap_or_default();
    let largest = usable(node).unwrap_or_default();
    let mut message = if fitting > 0 {
        format!(
            "{needs}; nodes with enough GPU memory hold {fitting} of the {replicas} replicas \
             (the largest GPUs: {} GiB usable of {} GiB on node {})",
            format_gib(largest),
            format_gib(memory),
            node.node
        )
    } else {
        format!(
            "{needs} but the largest GPU of a node with {tp} allocatable has {} GiB usable ({} \
             GiB on node {})",
            format_gib(largest),
            format_gib(memory),
            node.node
        )
    };
    let mut hints = Vec::new();
    if let Some(ctx) = plan
        .max_context_length
        .filter(|c| *c < unchecked.estimate.context_length)
    {
        hints.push(format!("{ctx} tokens would fit"));
    }
    if let Some(n) = plan.suggested_gpus {
        hints.push(format!("{n} GPUs per replica"));
    }
    if !hints.is_empty() {
        message.push_str("; ");
        message.push_str(&hints.join(", or "));
    }
    Some(Plan {
        fits: Some(false),
        message,
        max_context_length: plan.max_context_length,
        suggested_gpus: plan.suggested_gpus,
        estimate: unchecked.estimate,
    })
}

/// A cluster GPU as the planner sees it: a GPU is given whole to one pod, so all of it is free
/// to the pod that gets it.
fn gpu(node: &NodeGpus, memory: u64) -> GpuMemory {
    GpuMemory {
        id: node.node.clone(),
        total_bytes: memory,
        free_bytes: memory,
    }
}

#[cfg(test)]
mod tests {
    use shim_model::{Estimator, ModelFormat};

    use super::*;

    const GIB: u64 = 1 << 30;

    /// A Llama-3-8B-like model: 32 layers, 8 KV heads of 128, 15 GiB of weights.
    fn llama() -> ModelInfo {
        ModelInfo {
            format: ModelFormat::Safetensors,
            files: Vec::new(),
            architecture: Some("LlamaForCausalLM".into()),
            parameters: 8_030_261_248,
            weights_bytes: 2 * 8_030_261_248,
            quantization: Some("BF16".into()),
            layers: Some(32),
            heads: Some(32),
            kv_heads: Some(8),
            head_dim: Some(128),
            value_head_dim: Some(128),
            embedding_length: Some(4096),
            vocab_size: Some(128_256),
            feed_forward_length: Some(14_336),
            max_context_length: Some(8192),
        }
    }

    fn vllm() -> FitProfile {
        FitProfile {
            estimator: Estimator::Vllm,
            memory_fraction: 0.9,
            overhead_bytes: 2 * GIB,
            ..FitProfile::default()
        }
    }

    fn node(name: &str, allocatable: u32, memory_gib: Option<u64>) -> NodeGpus {
        NodeGpus {
            node: name.into(),
            allocatable,
            memory_bytes: memory_gib.map(|g| g * GIB),
            product: None,
        }
    }

    fn check(context: u64, tp: u32, replicas: u32, nodes: Vec<NodeGpus>) -> Plan {
        plan_on_nodes(
            &llama(),
            &vllm(),
            Some(context),
            tp,
            replicas,
            &ClusterGpus::Nodes(nodes),
        )
        .unwrap()
    }

    #[test]
    fn memory_per_gpu_from_the_label_decides_with_the_numbers() {
        // 512k tokens: 81 GiB per GPU, more than 80 GiB × 0.9.
        let refused = check(524_288, 1, 1, vec![node("gpu-1", 8, Some(80))]);
        assert_eq!(refused.fits, Some(false));
        assert_eq!(
            refused.message,
            "needs 81.0 GiB per GPU (weights 15.0, KV cache 64.0 for 524288 tokens, overhead \
             2.0) but the largest GPU of a node with 1 allocatable has 72.0 GiB usable (80.0 GiB \
             on node gpu-1); 8192 tokens would fit, or 2 GPUs per replica"
        );
        assert_eq!(refused.max_context_length, Some(8192));
        assert_eq!(refused.suggested_gpus, Some(2));
        let fits = check(8192, 1, 1, vec![node("gpu-1", 8, Some(80))]);
        assert_eq!(fits.fits, Some(true), "{}", fits.message);
        assert_eq!(fits.max_context_length, Some(8192));
    }

    #[test]
    fn a_replicas_gpus_must_be_on_one_node() {
        // 16 GPUs in all, but 8 per node.
        let two = vec![node("a", 8, Some(80)), node("b", 8, Some(80))];
        let refused = check(8192, 16, 1, two.clone());
        assert_eq!(refused.fits, Some(false));
        assert!(
            refused
                .message
                .ends_with("but no node has 16 allocatable GPUs (the most: 8 on node a)"),
            "{}",
            refused.message
        );
        // Two replicas of 8: one per node.
        assert_eq!(check(8192, 8, 2, two.clone()).fits, Some(true));
        // Three replicas of 8 need three such nodes.
        let refused = check(8192, 8, 3, two);
        assert_eq!(refused.fits, Some(false));
        assert!(
            refused.message.contains("hold 2 such replicas"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn a_node_without_a_memory_label_is_counted_and_its_memory_called_unknown() {
        let plan = check(524_288, 1, 1, vec![node("nolabel", 4, None)]);
        assert_eq!(plan.fits, None);
        assert!(
            plan.message.ends_with(
                "only the GPU count was checked: the GPU memory of node(s) nolabel is unknown"
            ),
            "{}",
            plan.message
        );
        // The count is still checked without labels.
        assert_eq!(
            check(8192, 8, 1, vec![node("nolabel", 4, None)]).fits,
            Some(false)
        );
        // A labelled node that holds it wins over the unknown one.
        let mixed = vec![node("nolabel", 4, None), node("big", 4, Some(141))];
        assert_eq!(check(524_288, 1, 1, mixed).fits, Some(true));
        // Small labelled GPUs and one unknown node: it may fit there, so it is not refused.
        let mixed = vec![node("small", 4, Some(24)), node("nolabel", 4, None)];
        assert_eq!(check(524_288, 1, 1, mixed).fits, None);
    }

    #[test]
    fn unknown_nodes_and_cpu_deployments_are_not_checked() {
        let unknown = plan_on_nodes(
            &llama(),
            &vllm(),
            Some(8192),
            1,
            1,
            &ClusterGpus::Unknown("nodes is forbidden".into()),
        )
        .unwrap();
        assert_eq!(unknown.fits, None);
        assert!(
            unknown.message.contains("nodes is forbidden"),
            "{}",
            unknown.message
        );
        assert_eq!(check(8192, 0, 1, Vec::new()).fits, None);
        assert_eq!(check(8192, 1, 1, Vec::new()).fits, Some(false));
    }
}

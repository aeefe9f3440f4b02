//! The cluster's GPUs for the admission check and `GET /api/v1/gpus`: a watch on Nodes kept as a
//! small projection per node (name, allocatable GPUs, memory per GPU, product), never whole Node
//! objects (their status lists every image on the node).
//!
//! The count is the node's allocatable amount of `acceleratorResource`; the memory per GPU is the
//! node label [`MEMORY_LABEL`] (MiB), which NVIDIA GPU feature discovery sets. Nodes without the
//! label are counted with memory unknown. Cordoned nodes (`spec.unschedulable`) are left out: no
//! new replica can go there. What pods hold now is not subtracted (that would need every pod in
//! the cluster): the check asks whether the cluster could run a request at all, and one that must
//! wait for GPUs stays `pending` with the scheduler's words.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, watcher as watch_stream};
use shim_core::{ClusterGpus, NodeGpus};
use tokio::task::AbortHandle;

/// Node label with the memory of each GPU in MiB (NVIDIA GPU feature discovery).
pub const MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// Node label with the GPU product name (NVIDIA GPU feature discovery).
pub const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

const MIB: u64 = 1 << 20;

/// The nodes' GPUs as the watch last delivered them.
pub(crate) struct Nodes {
    /// The extended resource GPUs are requested as (`acceleratorResource`).
    resource: String,
    state: RwLock<State>,
    /// Set once the first list is in, or the first attempt failed.
    answered: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Nodes with at least one allocatable GPU, by name.
    nodes: BTreeMap<String, NodeGpus>,
    /// A relist in progress.
    buffer: Option<BTreeMap<String, NodeGpus>>,
    listed: bool,
    /// Why the nodes are not (or no longer) known; cleared by the next list.
    error: Option<String>,
}

impl Nodes {
    pub(crate) fn new(resource: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            state: RwLock::default(),
            answered: tokio::sync::watch::channel(false).0,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // Every update is one step, so a panic elsewhere leaves consistent data.
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// What the admission check and the GPU list use.
    pub(crate) fn gpus(&self) -> ClusterGpus {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if state.listed {
            ClusterGpus::Nodes(state.nodes.values().cloned().collect())
        } else {
            ClusterGpus::Unknown(
                state
                    .error
                    .clone()
                    .unwrap_or_else(|| "the nodes have not been listed yet".into()),
            )
        }
    }

    /// Applies one watch event.
    pub(crate) fn apply_event(&self, event: Event<Node>) {
        let mut state = self.write();
        match event {
            Event::Init => state.buffer = Some(BTreeMap::new()),
            Event::InitApply(node) => {
                if let Some(gpus) = project(&node, &self.resource) {
                    state
                        .buffer
                        .get_or_insert_with(BTreeMap::new)
                        .insert(gpus.node.clone(), gpus);
                }
            }
            Event::InitDone => {
                state.nodes = state.buffer.take().unwrap_or_default();
                state.listed = true;
                state.error = None;
                drop(state);
                self.answered.send_replace(true);
            }
            Event::Apply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                match project(&node, &self.resource) {
                    Some(gpus) => state.nodes.insert(name, gpus),
                    None => state.nodes.remove(&name),
                };
            }
            Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                state.nodes.remove(&name);
            }
        }
    }

    fn record_error(&self, error: String) {
        self.write().error = Some(error);
        self.answered.send_replace(true);
    }

    /// Waits up to `timeout` for the first list (or the first failure), so the first requests
    /// after start-up are checked against the nodes.
    pub(crate) async fn wait_answered(&self, timeout: Duration) {
        let mut answered = self.answered.subscribe();
        let _ = tokio::time::timeout(timeout, answered.wait_for(|done| *done)).await;
    }
}

/// A node's GPUs, or `None` for a node that offers none to new pods.
pub(crate) fn project(node: &Node, resource: &str) -> Option<NodeGpus> {
    let name = node.metadata.name.clone()?;
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return None;
    }
    let allocatable = node
        .status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get(resource)?
        .0
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)?;
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key));
    let memory_bytes = label(MEMORY_LABEL)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|mib| *mib > 0)
        .map(|mib| mib * MIB);
    Some(NodeGpus {
        node: name,
        allocatable,
        memory_bytes,
        product: label(PRODUCT_LABEL).cloned(),
    })
}

/// Starts the watch; it stops when `nodes` is dropped or the handle is aborted.
pub(crate) fn spawn_watch(nodes: &Arc<Nodes>, api: Api<Node>) -> AbortHandle {
    tokio::spawn(watch(api, Arc::downgrade(nodes))).abort_handle()
}

async fn watch(api: Api<Node>, nodes: Weak<Nodes>) {
    // kube's default backoff (up to 30 s between attempts): the inventory only informs
    // admission, so a slower return after an outage costs little, and a cluster that does not
    // let the shim list nodes is asked rarely.
    let mut events =
        std::pin::pin!(watch_stream(api, watcher::Config::default()).default_backoff());
    let mut failing = false;
    while let Some(item) = events.next().await {
        let Some(nodes) = nodes.upgrade() else {
            return;
        };
        match item {
            Ok(event) => {
                if failing {
                    tracing::info!("listing nodes works again; the GPU fit check uses them");
                    failing = false;
                }
                nodes.apply_event(event);
            }
            Err(err) => {
                let message = err.to_string();
                // Once per outage, not once per retry.
                if !failing {
                    tracing::warn!(
                        error = %message,
                        "cannot list or watch nodes: the GPU fit check cannot see the cluster's \
                         GPUs (deploy/rbac.yaml's ClusterRole xmod-shim-nodes grants it); retrying"
                    );
                }
                failing = true;
                nodes.record_error(format!("cannot list nodes: {message}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, gpus: &str, labels: serde_json::Value, cordoned: bool) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": cordoned},
            "status": {"allocatable": {"cpu": "64", "nvidia.com/gpu": gpus}},
        }))
        .unwrap()
    }

    #[test]
    fn a_node_projects_to_its_gpu_count_memory_label_and_product() {
        let labelled = node(
            "a",
            "8",
            json!({MEMORY_LABEL: "81920", PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"}),
            false,
        );
        assert_eq!(
            project(&labelled, "nvidia.com/gpu"),
            Some(NodeGpus {
                node: "a".into(),
                allocatable: 8,
                memory_bytes: Some(81_920 * MIB),
                product: Some("NVIDIA-H100-80GB-HBM3".into()),
            })
        );
        let bare = project(&node("b", "4", json!({}), false), "nvidia.com/gpu").unwrap();
        assert_eq!((bare.allocatable, bare.memory_bytes), (4, None));
        // Not a GPU node, no GPU left to allocate, cordoned, another resource: nothing.
        assert_eq!(
            project(&node("c", "0", json!({}), false), "nvidia.com/gpu"),
            None
        );
        assert_eq!(
            project(&node("d", "8", json!({}), true), "nvidia.com/gpu"),
            None
        );
        assert_eq!(
            project(&node("e", "8", json!({}), false), "amd.com/gpu"),
            None
        );
        // A label that is not a number of MiB: memory unknown, the count still counts.
        let odd = node("f", "2", json!({MEMORY_LABEL: "80G"}), false);
        assert_eq!(
            project(&odd, "nvidia.com/gpu").map(|n| n.memory_bytes),
            Some(None)
        );
    }

    #[test]
    fn the_inventory_is_unknown_until_listed_and_follows_events() {
        let nodes = Nodes::new("nvidia.com/gpu");
        assert_eq!(
            nodes.gpus(),
            ClusterGpus::Unknown("the nodes have not been listed yet".into())
        );
        nodes.record_error("cannot list nodes: nodes is forbidden".into());
        assert_eq!(
            nodes.gpus(),
            ClusterGpus::Unknown("cannot list nodes: nodes is forbidden".into())
        );
        nodes.apply_event(Event::Init);
        nodes.apply_event(Event::InitApply(node("a", "8", json!({}), false)));
        nodes.apply_event(Event::InitApply(node("cpu", "0", json!({}), false)));
        nodes.apply_event(Event::InitDone);
        let ClusterGpus::Nodes(listed) = nodes.gpus() else {
            panic!("listed")
        };
        assert_eq!(listed.len(), 1);
        // Labelled later (GPU feature discovery runs after the node joins), then cordoned.
        nodes.apply_event(Event::Apply(node(
            "a",
            "8",
            json!({MEMORY_LABEL: "81920"}),
            false,
        )));
        let ClusterGpus::Nodes(listed) = nodes.gpus() else {
            panic!("listed")
        };
        assert_eq!(listed[0].memory_bytes, Some(81_920 * MIB));
        nodes.apply_event(Event::Apply(node("a", "8", json!({}), true)));
        assert_eq!(nodes.gpus(), ClusterGpus::Nodes(Vec::new()));
        nodes.apply_event(Event::Apply(node("b", "2", json!({}), false)));
        nodes.apply_event(Event::Delete(node("b", "2", json!({}), false)));
        assert_eq!(nodes.gpus(), ClusterGpus::Nodes(Vec::new()));
    }
}

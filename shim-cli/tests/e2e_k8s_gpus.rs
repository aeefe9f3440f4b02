//! The fit check on Kubernetes, against a real control plane (`shared/k8s-lab`, whose fake node
//! has 8 `nvidia.com/gpu`): the k8s shimlet watches the Nodes, and admission compares a request
//! with their allocatable GPUs and the `nvidia.com/gpu.memory` label (MiB, as NVIDIA GPU feature
//! discovery sets it), not with this machine's `nvidia-smi`. The shim runs as the ServiceAccount
//! of `deploy/rbac.yaml`, so its ClusterRole for nodes is proven enough.

mod common;
#[path = "common/k8s_lab.rs"]
mod k8s_lab;

use std::path::Path;

use common::{Shim, deploy, free_port, get, llama_8b, send, wait_for, wait_status};
use k8s_lab::Lab;
use serde_json::{Value, json};

const NAMESPACE: &str = "xmod-shim";
/// The identity `deploy/rbac.yaml` creates and binds.
const SHIM_USER: &str = "system:serviceaccount:xmod-shim:xmod-shim";
/// The lab's one node (`shared/k8s-lab/node.yaml`).
const NODE: &str = "fake-node-1";
const MIB: u64 = 1 << 20;

fn start_shim(dir: &Path, kubeconfig: &Path) -> Shim {
    let config = json!({
        "plugins": {"defaultShimlet": "k8s"},
        // The cluster mounts the models; the shim reads their headers from its own copy.
        "pipelines": {"opensourcellm": {"checkModelDir": false}},
        "shimlets": {"k8s": {"kubeConfig": kubeconfig, "namespace": NAMESPACE}},
    });
    let path = dir.join("shim.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let models = dir.join("models");
    llama_8b(&models.join("llama-8b"));
    Shim::start_with(
        &dir.join("data"),
        &models,
        free_port(),
        &["--config", path.to_str().unwrap()],
    )
}

/// A vLLM deploy of the Llama-3-8B-shaped model.
fn llama(context: u64, gpus: u32) -> Value {
    json!({"modelName": "llama-8b", "engine": "vllm", "contextLength": context,
           "resourceRequirements": {"acceleratorCount": gpus}})
}

fn post(shim: &Shim, path: &str, body: Value) -> Value {
    send(reqwest::Method::POST, &shim.url(path), Some(body))
}

fn gpus(shim: &Shim) -> Vec<Value> {
    let envelope = get(&shim.url("/api/v1/gpus")).unwrap();
    assert_eq!(envelope["code"], 0, "{envelope}");
    envelope["data"]["gpus"].as_array().unwrap().clone()
}

fn label_node(lab: &Lab, labels: Value) {
    let (code, body) = lab.request_merge_patch(
        &format!("/api/v1/nodes/{NODE}"),
        &json!({"metadata": {"labels": labels}}),
    );
    assert_eq!(code, 200, "{body}");
}

fn cordon(lab: &Lab, unschedulable: bool) {
    let (code, body) = lab.request_merge_patch(
        &format!("/api/v1/nodes/{NODE}"),
        &json!({"spec": {"unschedulable": unschedulable}}),
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn admission_uses_the_nodes_allocatable_gpus_and_their_memory_label() {
    let lab = Lab::up();
    lab.namespace(NAMESPACE);
    lab.apply_file(
        NAMESPACE,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml"),
    );
    let kubeconfig = lab.service_account_kubeconfig(NAMESPACE, "xmod-shim");
    let dir = tempfile::tempdir().unwrap();
    let shim = start_shim(dir.path(), &kubeconfig);

    // The node's 8 GPUs, memory unknown: no label yet.
    let list = gpus(&shim);
    assert_eq!(list.len(), 8, "{list:?}");
    assert_eq!(list[0]["id"], format!("{NODE}/0"));
    assert_eq!(list[7]["node"], NODE);
    assert_eq!(list[0]["memoryTotalBytes"], Value::Null);

    // Without the label only the count is checked: the estimate says memory is unknown.
    let dry = post(
        &shim,
        "/api/v1/modserv/deploy?dryRun=true",
        llama(524_288, 1),
    );
    assert_eq!(dry["code"], 0, "{dry}");
    let estimate = &dry["data"]["estimate"];
    assert_eq!(estimate["fits"], Value::Null, "{estimate}");
    assert!(
        estimate["message"]
            .as_str()
            .unwrap()
            .contains(&format!("GPU memory of node(s) {NODE} is unknown")),
        "{estimate}"
    );

    // GPU feature discovery labels the node: 80 GiB per GPU. The watch brings it in.
    label_node(
        &lab,
        json!({"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.product": "Fake-H100-80GB"}),
    );
    wait_for("the node's GPU memory label to reach the shim", 30, || {
        let list = gpus(&shim);
        (list.len() == 8 && list.iter().all(|g| g["memoryTotalBytes"] == 81_920 * MIB))
            .then_some(())
    });
    assert_eq!(gpus(&shim)[3]["name"], "Fake-H100-80GB");

    // 512k tokens need 81 GiB per GPU; an 80 GiB GPU gives vLLM 72 GiB: 422 with the numbers,
    // nothing stored, nothing in the cluster.
    let refused = post(&shim, "/api/v1/modserv/deploy", llama(524_288, 1));
    assert_eq!(refused["code"], 422, "{refused}");
    let message = refused["message"].as_str().unwrap();
    eprintln!("refused: {message}");
    assert!(
        message.contains(
            "needs 81.0 GiB per GPU (weights 15.0, KV cache 64.0 for 524288 tokens, overhead \
             2.0) but the largest GPU of a node with 1 allocatable has 72.0 GiB usable (80.0 GiB \
             on node fake-node-1); 8192 tokens would fit, or 2 GPUs per replica"
        ),
        "{message}"
    );
    assert_eq!(refused["data"]["estimate"]["fits"], false);
    assert_eq!(refused["data"]["estimate"]["maxContextLength"], 8192);
    let services = get(&shim.url("/api/v1/modserv")).unwrap();
    assert_eq!(services["data"], json!([]), "nothing was accepted");
    assert!(lab.deployments(NAMESPACE).is_empty());

    // 16 GPUs for one replica: no node has 16.
    let refused = post(&shim, "/api/v1/modserv/deploy", llama(8192, 16));
    assert_eq!(refused["code"], 422, "{refused}");
    let message = refused["message"].as_str().unwrap();
    eprintln!("refused: {message}");
    assert!(
        message.ends_with(&format!(
            "on 16 GPUs of one node, but no node has 16 allocatable GPUs (the most: 8 on node \
             {NODE})"
        )),
        "{message}"
    );

    // 8192 tokens need 18 GiB per GPU: accepted, and it runs (the fake kubelet's pods are
    // ready at once).
    let id = deploy(&shim, llama(8192, 1));
    let (running, seen) = wait_status(&shim, &id, 60, |d| d["status"] == "running");
    assert!(!seen.contains(&"failed".to_string()), "{seen:?} {running}");

    // A cordoned node takes no new replica: the inventory follows the watch.
    cordon(&lab, true);
    wait_for("the cordoned node to leave the inventory", 30, || {
        gpus(&shim).is_empty().then_some(())
    });
    let refused = post(&shim, "/api/v1/modserv/deploy", llama(8192, 1));
    assert_eq!(refused["code"], 422, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .ends_with("but no node has GPUs"),
        "{refused}"
    );
    cordon(&lab, false);
    wait_for("the node to come back", 30, || {
        (gpus(&shim).len() == 8).then_some(())
    });

    // Only list + watch reached the nodes (the ClusterRole grants no more).
    let used = lab.permissions_used_by(SHIM_USER);
    let on_nodes: Vec<&String> = used.iter().filter(|p| p.starts_with("nodes:")).collect();
    assert_eq!(on_nodes, ["nodes:list", "nodes:watch"], "{used:?}");
}

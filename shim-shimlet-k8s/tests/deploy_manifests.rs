//! The manifests in `deploy/` stay consistent with the shimlet: the ConfigMap's configuration
//! parses and validates, and the Role (and the ClusterRole for nodes) grants what the shimlet and
//! the Kubernetes store do (and no more).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use shim_shimlet_k8s::K8sConfig;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).expect("reading a manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .collect()
}

#[test]
fn the_config_map_selects_the_k8s_shimlet_with_a_valid_section() {
    let docs = documents("config.yaml");
    let shim_yaml = docs[0]["data"]["shim.yaml"].as_str().expect("shim.yaml");
    let config: serde_yaml::Value = serde_yaml::from_str(shim_yaml).unwrap();
    assert_eq!(config["plugins"]["defaultShimlet"].as_str(), Some("k8s"));
    let section: serde_json::Value =
        serde_json::to_value(&config["shimlets"]["k8s"]).expect("a JSON-able section");
    let k8s: K8sConfig = serde_json::from_value(section).expect("shimlets.k8s parses");
    k8s.validate().expect("shimlets.k8s is valid");
    assert_eq!(
        k8s.namespace, None,
        "the shim's own namespace, so kustomize can move it"
    );
}

#[test]
fn the_role_grants_exactly_what_the_shimlet_and_the_store_use() {
    let docs = documents("rbac.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding"
        ]
    );
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in docs[1]["rules"].as_sequence().unwrap() {
        let group = rule["apiGroups"][0].as_str().unwrap().to_string();
        for resource in rule["resources"].as_sequence().unwrap() {
            let key = format!("{group}/{}", resource.as_str().unwrap());
            let verbs = rule["verbs"].as_sequence().unwrap();
            granted
                .entry(key)
                .or_default()
                .extend(verbs.iter().map(|v| v.as_str().unwrap().to_string()));
        }
    }
    let manage = ["create", "delete", "get", "list", "patch", "watch"];
    // Workloads are read by list + watch only (tests/e2e_k8s_lab.rs checks each is used).
    let workloads = ["create", "delete", "list", "patch", "watch"];
    let expected = BTreeMap::from([
        ("apps/deployments".to_string(), workloads.as_slice()),
        ("/services".to_string(), workloads.as_slice()),
        ("/pods".to_string(), ["list", "watch"].as_slice()),
        // Created by the Kubernetes store (one per phase transition).
        ("/events".to_string(), ["create"].as_slice()),
        // The Kubernetes store (`--store kubernetes`): desired state in ModelServices, status
        // through the subresource.
        ("xmod-shim.io/modelservices".to_string(), manage.as_slice()),
        (
            "xmod-shim.io/modelservices/status".to_string(),
            ["patch"].as_slice(),
        ),
        ("/pods/log".to_string(), ["get"].as_slice()),
        // The ready pods' addresses for the gateway (`replicaAddresses: pods`, the default in a
        // cluster): watched, never read one by one.
        (
            "discovery.k8s.io/endpointslices".to_string(),
            ["list", "watch"].as_slice(),
        ),
        ("/namespaces".to_string(), ["get"].as_slice()),
        // The leader election among replicas (src/lease.rs).
        (
            "coordination.k8s.io/leases".to_string(),
            ["create", "get", "update"].as_slice(),
        ),
    ]);
    let expected: BTreeMap<String, BTreeSet<String>> = expected
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(granted, expected);
    assert_eq!(
        docs[2]["roleRef"]["kind"].as_str(),
        Some("Role"),
        "the namespaced permissions are never granted cluster-wide"
    );
    // Cluster-wide: reading Nodes for their GPUs (the fit check), and nothing else.
    let cluster_rules = docs[3]["rules"].as_sequence().unwrap();
    assert_eq!(cluster_rules.len(), 1);
    assert_eq!(cluster_rules[0]["apiGroups"][0].as_str(), Some(""));
    assert_eq!(
        cluster_rules[0]["resources"].as_sequence().unwrap(),
        &[serde_yaml::Value::from("nodes")]
    );
    assert_eq!(
        cluster_rules[0]["verbs"].as_sequence().unwrap(),
        &[
            serde_yaml::Value::from("list"),
            serde_yaml::Value::from("watch")
        ]
    );
    let binding = &docs[4];
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"], docs[3]["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["kind"].as_str(),
        Some("ServiceAccount")
    );
    assert_eq!(binding["subjects"][0]["name"], docs[0]["metadata"]["name"]);
}

#[test]
fn the_shim_runs_as_its_service_account_with_the_config_mounted() {
    let docs = documents("shim.yaml");
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some("xmod-shim"));
    let args = &pod["containers"][0]["args"];
    assert_eq!(args[2].as_str(), Some("/etc/xmod-shim/shim.yaml"));
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"].as_str(),
        Some("xmod-shim-config")
    );
    let kustomization = documents("kustomization.yaml");
    let resources: Vec<&str> = kustomization[0]["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert_eq!(
        resources,
        [
            "namespace.yaml",
            "crds/modelservices.yaml",
            "rbac.yaml",
            "config.yaml",
            "shim.yaml"
        ]
    );
}

//! What the tests of `engine.store: kubernetes` share: a lab with the ModelService CRD and the
//! shipped RBAC, a shim on it, and reads of the resources.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{Shim, wait_for};
use crate::k8s_lab::Lab;

pub const NAMESPACE: &str = "xmod-shim";

pub fn manifest(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A lab with the CRD installed (and Established), `deploy/rbac.yaml` applied, and a kubeconfig
/// for the shim's ServiceAccount.
pub fn lab_with_crd_and_rbac() -> (Lab, std::path::PathBuf) {
    let lab = Lab::up();
    lab.apply_file(NAMESPACE, &manifest("deploy/crds/modelservices.yaml"));
    wait_for("the ModelService CRD to be Established", 30, || {
        let crd = lab.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/modelservices.xmod-shim.io",
        );
        crd["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
            .then_some(())
    });
    lab.namespace(NAMESPACE);
    lab.apply_file(NAMESPACE, &manifest("deploy/rbac.yaml"));
    let kubeconfig = lab.service_account_kubeconfig(NAMESPACE, "xmod-shim");
    (lab, kubeconfig)
}

/// A shim with `--store kubernetes` on the k8s shimlet, as the ServiceAccount of `kubeconfig`.
pub fn start_shim(dir: &Path, kubeconfig: &Path, port: u16) -> Shim {
    start_shim_on(dir, kubeconfig, port, "kubernetes")
}

/// The configuration file of [`start_shim_on`]: the k8s shimlet in [`NAMESPACE`].
pub fn shim_config(dir: &Path, kubeconfig: &Path) -> std::path::PathBuf {
    let config = json!({
        "plugins": {"defaultShimlet": "k8s"},
        "pipelines": {"opensourcellm": {"checkModelDir": false}},
        "shimlets": {"k8s": {"kubeConfig": kubeconfig, "namespace": NAMESPACE}},
    });
    let path = dir.join("shim.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A shim on the k8s shimlet with `--store STORE`, data in `dir/data`.
pub fn start_shim_on(dir: &Path, kubeconfig: &Path, port: u16, store: &str) -> Shim {
    let path = shim_config(dir, kubeconfig);
    Shim::start_with(
        &dir.join("data"),
        &dir.join("models"),
        port,
        &["--config", path.to_str().unwrap(), "--store", store],
    )
}

pub fn mock(model: &str) -> Value {
    json!({"modelName": model, "engine": "mock", "replicaCount": 1,
           "resourceRequirements": {"acceleratorCount": 0}})
}

pub fn model_service_path(name: &str) -> String {
    format!("/apis/xmod-shim.io/v1alpha1/namespaces/{NAMESPACE}/modelservices/{name}")
}

pub fn model_service(lab: &Lab, name: &str) -> Option<Value> {
    let (code, body) = lab.request("GET", &model_service_path(name), None);
    match code {
        200 => Some(body),
        404 => None,
        other => panic!("GET modelservice {name}: {other} {body}"),
    }
}

pub fn names(lab: &Lab, path: &str) -> Vec<String> {
    let list = lab.get(path);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn workloads_of(lab: &Lab, id: &str) -> (Vec<String>, Vec<String>) {
    let suffix = format!("-{id}");
    let keep = |v: Vec<String>| v.into_iter().filter(|n| n.ends_with(&suffix)).collect();
    (
        keep(names(
            lab,
            &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
        )),
        keep(names(
            lab,
            &format!("/api/v1/namespaces/{NAMESPACE}/services"),
        )),
    )
}

pub fn wait_model_service_running(lab: &Lab, name: &str) -> Value {
    wait_for(&format!("ModelService {name} to read running"), 60, || {
        let object = model_service(lab, name)?;
        (object["status"]["phase"] == "running").then_some(object)
    })
}

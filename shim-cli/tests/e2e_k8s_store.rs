//! `--store kubernetes` against a real control plane (`shared/k8s-lab`): desired state kept in
//! ModelService resources (`deploy/crds/modelservices.yaml`), written by the shim as the
//! ServiceAccount of `deploy/rbac.yaml` (so the shipped RBAC is proven enough).
//!
//! One test, one lab: REST deploy → a ModelService with `status.phase: running` and Events for
//! `kubectl describe`; a ModelService created as `kubectl apply` would → adopted, running,
//! visible through REST, and a bad one refused in its status; a shim restart → both still there
//! (state from the cluster, no duplicate workloads); `kubectl scale` → two replicas;
//! `kubectl delete` and REST DELETE → the ModelService, Deployment and Service gone. A second
//! test: `model-serve-shim migrate --from redb --to kubernetes` keeps the engines running.

mod common;
#[path = "common/k8s_lab.rs"]
mod k8s_lab;
#[path = "common/k8s_store.rs"]
mod k8s_store;

use common::{deploy, free_port, send, wait_for, wait_status};
use k8s_store::{
    NAMESPACE, lab_with_crd_and_rbac, mock, model_service, model_service_path, names, shim_config,
    start_shim, start_shim_on, wait_model_service_running, workloads_of,
};
use serde_json::{Value, json};

#[test]
fn model_services_hold_desired_state_through_deploy_adoption_restart_and_delete() {
    let (lab, kubeconfig) = lab_with_crd_and_rbac();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let shim = start_shim(dir.path(), &kubeconfig, port);

    // REST deploy → a ModelService named by the id, running, with the spec and the conditions.
    let id = deploy(&shim, mock("demo"));
    wait_status(&shim, &id, 60, |d| d["status"] == "running");
    let object = wait_model_service_running(&lab, &id);
    assert_eq!(object["spec"]["modelName"], "demo", "{object}");
    assert_eq!(object["spec"]["engine"], "mock", "{object}");
    assert_eq!(object["status"]["readyReplicas"], 1, "{object}");
    assert!(
        object["status"]["endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/v1/chat/completions"),
        "{object}"
    );
    let ready = object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["status"], "True", "{object}");
    assert!(
        object["metadata"]["annotations"]["xmod-shim.io/record"].is_string(),
        "{object}"
    );
    // The finalizer holds a deleted ModelService for its teardown; the workload belongs to it,
    // so the garbage collector removes it even when no shim runs.
    assert_eq!(
        object["metadata"]["finalizers"],
        json!(["xmod-shim.io/teardown"]),
        "{object}"
    );
    let (deployments, services) = workloads_of(&lab, &id);
    for path in [
        format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{}",
            deployments[0]
        ),
        format!("/api/v1/namespaces/{NAMESPACE}/services/{}", services[0]),
    ] {
        let owners = lab.get(&path)["metadata"]["ownerReferences"].clone();
        assert_eq!(owners[0]["kind"], "ModelService", "{path}: {owners}");
        assert_eq!(owners[0]["name"], id.as_str(), "{path}: {owners}");
        assert_eq!(
            owners[0]["uid"], object["metadata"]["uid"],
            "{path}: {owners}"
        );
    }

    // `kubectl describe` has the story: Events on the ModelService, up to running.
    let reasons = wait_for("an Event saying Running", 30, || {
        let events = lab.get(&format!(
            "/api/v1/namespaces/{NAMESPACE}/events?fieldSelector=involvedObject.name={id}"
        ));
        let reasons: Vec<String> = events["items"]
            .as_array()?
            .iter()
            .filter(|e| e["involvedObject"]["kind"] == "ModelService")
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect();
        reasons.iter().any(|r| r == "Running").then_some(reasons)
    });
    eprintln!("Event reasons for {id}: {reasons:?}");

    // As `kubectl apply -f model.yaml` (admin): adopted, running, visible through REST.
    let adopted = "from-kubectl";
    lab.create(
        &format!("/apis/xmod-shim.io/v1alpha1/namespaces/{NAMESPACE}/modelservices"),
        &json!({
            "apiVersion": "xmod-shim.io/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": adopted},
            "spec": mock("applied"),
        }),
    );
    wait_for("the REST API to know the applied ModelService", 30, || {
        let envelope = common::get(&shim.url(&format!("/api/v1/modserv/{adopted}"))).ok()?;
        (envelope["code"] == 0).then_some(())
    });
    wait_status(&shim, adopted, 60, |d| d["status"] == "running");
    wait_model_service_running(&lab, adopted);
    assert_eq!(workloads_of(&lab, adopted).0.len(), 1);

    // A bad spec applied with kubectl is refused in the resource's status, not silently.
    let bad = "bad-spec";
    lab.create(
        &format!("/apis/xmod-shim.io/v1alpha1/namespaces/{NAMESPACE}/modelservices"),
        &json!({
            "apiVersion": "xmod-shim.io/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": bad},
            "spec": {"modelName": "", "engine": "mock"},
        }),
    );
    let refused = wait_for("the bad ModelService to read failed", 30, || {
        let object = model_service(&lab, bad)?;
        (object["status"]["phase"] == "failed").then_some(object)
    });
    assert_eq!(refused["status"]["reason"], "InvalidSpec", "{refused}");
    assert!(
        refused["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("modelName"),
        "{refused}"
    );
    let (code, body) = lab.request("DELETE", &model_service_path(bad), None);
    assert_eq!(code, 200, "{body}");

    // Restart: the state comes back from the cluster; the workloads are re-adopted, not doubled.
    shim.stop();
    let shim = start_shim(dir.path(), &kubeconfig, port);
    for service in [id.as_str(), adopted] {
        let (data, _) = wait_status(&shim, service, 60, |d| d["status"] == "running");
        assert!(!data["endpoint"].as_str().unwrap().is_empty(), "{data}");
        let (deployments, services) = workloads_of(&lab, service);
        assert_eq!(
            (deployments.len(), services.len()),
            (1, 1),
            "{service}: {deployments:?} {services:?}"
        );
    }
    let list = send(reqwest::Method::GET, &shim.url("/api/v1/modserv"), None);
    assert!(list.to_string().contains(&id), "{list}");

    // `kubectl scale modelservice/from-kubectl --replicas=2` (the scale subresource) → the
    // engine updates the service: two replicas ready, in REST and in the resource's status.
    let (code, body) = lab.request_merge_patch(
        &format!("{}/scale", model_service_path(adopted)),
        &json!({"spec": {"replicas": 2}}),
    );
    assert_eq!(code, 200, "{body}");
    wait_for(
        "the scaled ModelService to have 2 ready replicas",
        60,
        || {
            let object = model_service(&lab, adopted)?;
            (object["status"]["readyReplicas"] == 2 && object["status"]["phase"] == "running")
                .then_some(())
        },
    );
    let (deployments, _) = workloads_of(&lab, adopted);
    let deployment = lab.get(&format!(
        "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{}",
        deployments[0]
    ));
    assert_eq!(deployment["spec"]["replicas"], 2, "{deployment}");

    // `kubectl delete` → the engine tears the service down: notExist, workloads gone, and the
    // resource is not created again by the teardown's writes.
    let (code, body) = lab.request("DELETE", &model_service_path(adopted), None);
    assert_eq!(code, 200, "{body}");
    wait_status(&shim, adopted, 60, |d| d["status"] == "notExist");

    // REST DELETE → notExist; ModelService, Deployment and Service gone.
    let envelope = send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{id}")),
        None,
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    for service in [id.as_str(), adopted] {
        wait_status(&shim, service, 60, |d| d["status"] == "notExist");
        wait_for(&format!("ModelService {service} to be deleted"), 30, || {
            model_service(&lab, service).is_none().then_some(())
        });
        wait_for(
            &format!("the workloads of {service} to be deleted"),
            30,
            || {
                let (deployments, services) = workloads_of(&lab, service);
                (deployments.is_empty() && services.is_empty()).then_some(())
            },
        );
    }
    let left = names(
        &lab,
        &format!("/apis/xmod-shim.io/v1alpha1/namespaces/{NAMESPACE}/modelservices"),
    );
    assert!(left.is_empty(), "ModelServices left behind: {left:?}");
}

/// `model-serve-shim migrate --from redb --to kubernetes`: services deployed on the file store
/// become ModelServices, their running workloads are owned by them, and the shim started on the
/// Kubernetes store serves them as running without restarting an engine.
#[test]
fn migrate_moves_running_services_into_model_services_without_restarting_engines() {
    let (lab, kubeconfig) = lab_with_crd_and_rbac();
    let dir = tempfile::tempdir().unwrap();
    let shim = start_shim_on(dir.path(), &kubeconfig, free_port(), "redb");
    let ids: Vec<String> = ["one", "two"]
        .iter()
        .map(|m| deploy(&shim, mock(m)))
        .collect();
    for id in &ids {
        wait_status(&shim, id, 60, |d| d["status"] == "running");
    }
    let deployment_of = |id: &str| {
        let (deployments, _) = workloads_of(&lab, id);
        lab.get(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{}",
            deployments[0]
        ))
    };
    let before: Vec<Value> = ids.iter().map(|id| deployment_of(id)).collect();
    shim.stop();

    let data = dir.path().join("data");
    let out = std::process::Command::new(common::BIN)
        .args([
            "migrate",
            "--from",
            "redb",
            "--to",
            "kubernetes",
            "--config",
        ])
        .arg(shim_config(dir.path(), &kubeconfig))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {said}");
    for id in &ids {
        assert!(said.contains(id.as_str()), "{said}");
    }
    assert!(data.join("state.redb.migrated").is_file(), "{said}");
    assert!(!data.join("state.redb").exists(), "{said}");

    let shim = start_shim(dir.path(), &kubeconfig, free_port());
    for (id, before) in ids.iter().zip(&before) {
        let object = wait_model_service_running(&lab, id);
        assert_eq!(
            object["metadata"]["finalizers"],
            json!(["xmod-shim.io/teardown"])
        );
        wait_status(&shim, id, 60, |d| d["status"] == "running");
        let after = deployment_of(id);
        // Same object, same pod template: no engine was restarted.
        assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"], "{id}");
        assert_eq!(
            after["metadata"]["generation"], before["metadata"]["generation"],
            "{id}: the Deployment was changed"
        );
        assert_eq!(
            after["metadata"]["ownerReferences"][0]["uid"], object["metadata"]["uid"],
            "{id}: {after}"
        );
    }
    // And it is a service like any other: a REST delete ends ModelService and workload.
    send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{}", ids[0])),
        None,
    );
    wait_for("the migrated service to be removed", 60, || {
        (model_service(&lab, &ids[0]).is_none() && workloads_of(&lab, &ids[0]) == (vec![], vec![]))
            .then_some(())
    });
}

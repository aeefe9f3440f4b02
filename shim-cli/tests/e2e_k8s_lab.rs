//! The binary with the k8s shimlet against a real Kubernetes control plane (`shared/k8s-lab`:
//! kube-apiserver, controller-manager and scheduler, etcd, and a fake kubelet that makes pods
//! Ready without running containers, or simulates pull, crash-loop and OOM failures by image
//! name). The shim is driven through its REST API, as the real client drives it.
//!
//! What a fake kubelet cannot show: engines never run, so endpoints are never reachable; the
//! tests check status, objects and the API server's audit log instead.

mod common;
#[path = "common/k8s_lab.rs"]
mod k8s_lab;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Shim, deploy, free_port, get, send, wait_for, wait_status};
use k8s_lab::Lab;
use serde_json::{Value, json};

const NAMESPACE: &str = "xmod-shim";
/// `engine.maxRestarts` of these tests: low, so a crash loop fails within about 30 s (the fake
/// kubelet restarts a crashing container about every 10 s), and at least 2, so the lifecycle
/// test's two drift repairs of one generation stay within it.
const MAX_RESTARTS: u32 = 2;
/// The identity `deploy/rbac.yaml` creates and binds.
const SHIM_USER: &str = "system:serviceaccount:xmod-shim:xmod-shim";

/// The shim's config for a lab: the k8s shimlet in `NAMESPACE`, with presets whose images the
/// fake kubelet fails in known ways.
fn write_config(dir: &Path, kubeconfig: &Path) -> std::path::PathBuf {
    let failing = |image: &str| json!({"image": image, "args": ["--port", "{port}"], "port": 8000, "startupTimeoutSecs": 120});
    let config = json!({
        "plugins": {"defaultShimlet": "k8s"},
        "engine": {"maxRestarts": MAX_RESTARTS},
        "pipelines": {"opensourcellm": {"checkModelDir": false}},
        // The Service address, as outside a cluster, wherever the test runs (in a pod, pods
        // would be the default).
        "shimlets": {"k8s": {"kubeConfig": kubeconfig, "namespace": NAMESPACE,
                             "replicaAddresses": "service"}},
        "engines": {
            "failpull": failing("fail-pull:1"),
            "failcrash": failing("fail-crash:1"),
            "failoom": failing("fail-oom:1"),
        },
    });
    let path = dir.join("shim.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A lab with `deploy/rbac.yaml` applied in `NAMESPACE`, and a kubeconfig for that identity.
fn lab_with_shipped_rbac() -> (Lab, std::path::PathBuf) {
    let lab = Lab::up();
    let kubeconfig = lab.with_shipped_rbac(NAMESPACE);
    (lab, kubeconfig)
}

fn start_shim(dir: &Path, kubeconfig: &Path, port: u16) -> Shim {
    let config = write_config(dir, kubeconfig);
    Shim::start_with(
        &dir.join("data"),
        &dir.join("models"),
        port,
        &["--config", config.to_str().unwrap()],
    )
}

fn mock(model: &str) -> Value {
    json!({"modelName": model, "engine": "mock", "replicaCount": 1,
           "resourceRequirements": {"acceleratorCount": 0}})
}

fn status(shim: &Shim, id: &str) -> Value {
    let envelope = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
    assert_eq!(envelope["code"], 0, "{envelope}");
    envelope["data"].clone()
}

fn deployment_of(lab: &Lab, id: &str) -> Option<String> {
    lab.deployments(NAMESPACE)
        .into_iter()
        .find(|name| name.ends_with(&format!("-{id}")))
}

/// The whole lifecycle as the ServiceAccount of `deploy/rbac.yaml` (so the RBAC we ship is
/// enough), the real scheduler's and fake kubelet's failure reasons, drift repair, and the
/// shim's own API requests counted from the audit log.
#[test]
fn lifecycle_failures_drift_and_request_counts_with_the_shipped_rbac() {
    let (lab, kubeconfig) = lab_with_shipped_rbac();
    let dir = tempfile::tempdir().unwrap();
    let shim = start_shim(dir.path(), &kubeconfig, free_port());

    // Deploy → running, through the REST API; the Deployment exists.
    let before = lab.requests_by(SHIM_USER).len();
    let id = deploy(&shim, mock("demo"));
    let (running, seen) = wait_status(&shim, &id, 60, |d| d["status"] == "running");
    assert!(
        running["endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/v1/chat/completions"),
        "{running}"
    );
    assert!(!seen.contains(&"failed".to_string()), "{seen:?}");
    let deployment = deployment_of(&lab, &id).expect("a Deployment for the service");
    let per_deploy = lab.requests_by(SHIM_USER).len() - before;
    eprintln!("API server requests for one deploy: {per_deploy}");
    assert!(
        per_deploy <= 3,
        "{per_deploy} requests for one deploy (at most 3): {:#?}",
        &lab.requests_by(SHIM_USER)[before..]
    );

    // Status reads never reach the API server.
    let before = lab.requests_by(SHIM_USER).len();
    for _ in 0..200 {
        assert_eq!(status(&shim, &id)["status"], "running");
    }
    assert_eq!(
        lab.requests_by(SHIM_USER).len() - before,
        0,
        "status GETs made API server requests"
    );

    // 16 GPUs on the 8-GPU node: pending with the real scheduler's words.
    let mut big = mock("big");
    big["resourceRequirements"]["acceleratorCount"] = json!(16);
    let big_id = deploy(&shim, big);
    let (pending, _) = wait_status(&shim, &big_id, 60, |d| {
        d["status"] == "pending" && d["reason"] == "Unschedulable"
    });
    assert!(
        pending["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Insufficient nvidia.com/gpu"),
        "{pending}"
    );

    // The fake kubelet's failures arrive typed. A missing image fails at once; a crash loop or
    // an OOM kill only once the kubelet has restarted the container more than maxRestarts
    // times (the fake bumps restartCount about every 10 s): until then the service is
    // initializing with the reason and the kubelet's words. All three at once, to save time.
    let failing: Vec<(&str, &str, String)> = [
        ("failpull", "ImagePull"),
        ("failcrash", "CrashLoop"),
        ("failoom", "OutOfMemory"),
    ]
    .into_iter()
    .map(|(engine, reason)| {
        let mut body = mock(engine);
        body["engine"] = json!(engine);
        (engine, reason, deploy(&shim, body))
    })
    .collect();
    // Watched side by side (they restart at the same pace): for each, the first status read
    // with its reason while not failed yet, and the failed one.
    let started = Instant::now();
    let mut restarting: Vec<Option<Value>> = vec![None; failing.len()];
    let mut failed: Vec<Option<(Value, f64)>> = vec![None; failing.len()];
    while failed.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not all failed within 90 s: {failed:?}"
        );
        for (i, (_, reason, id)) in failing.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            let data = status(&shim, id);
            if data["status"] == "failed" {
                failed[i] = Some((data, started.elapsed().as_secs_f64()));
            } else if restarting[i].is_none() && data["reason"] == *reason {
                restarting[i] = Some(data);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, (engine, reason, _)) in failing.iter().enumerate() {
        let (data, after) = failed[i].take().unwrap();
        eprintln!("{engine}: failed after {after:.1} s: {}", data["message"]);
        assert_eq!(data["reason"], *reason, "{data}");
        let message = data["message"].as_str().unwrap_or_default();
        assert!(message.contains("pod "), "{data}");
        if *engine == "failpull" {
            continue;
        }
        assert!(
            message.contains(&format!(
                "{} restarts, more than the {MAX_RESTARTS} engine.maxRestarts allows",
                MAX_RESTARTS + 1
            )),
            "{data}"
        );
        let before = restarting[i]
            .take()
            .unwrap_or_else(|| panic!("{engine}: never showed {reason} before it failed"));
        eprintln!("{engine} while restarting: {}", before["message"]);
        assert_eq!(before["status"], "initializing", "{before}");
        let message = before["message"].as_str().unwrap_or_default();
        assert!(message.contains("pod "), "{before}");
        assert!(
            message.contains(&format!(
                "restarts of the {MAX_RESTARTS} engine.maxRestarts allows"
            )),
            "{before}"
        );
    }

    // Drift: the Deployment deleted behind our back comes back.
    let (code, body) = lab.request(
        "DELETE",
        &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{deployment}"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    wait_for("the Deployment to be restored", 60, || {
        let (code, body) = lab.request(
            "GET",
            &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{deployment}"),
            None,
        );
        (code == 200 && body["metadata"]["deletionTimestamp"].is_null()).then_some(())
    });
    wait_status(&shim, &id, 60, |d| d["status"] == "running");

    // Drift: scaled behind our back, scaled back.
    let (code, body) = lab.request_merge_patch(
        &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{deployment}"),
        &json!({"spec": {"replicas": 3}}),
    );
    assert_eq!(code, 200, "{body}");
    wait_for("the replica count to be restored", 60, || {
        let d = lab.get(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{deployment}"
        ));
        (d["spec"]["replicas"] == 1).then_some(())
    });
    wait_status(&shim, &id, 60, |d| d["status"] == "running");

    // Logs go through pods/log (the fake kubelet has no log API, so the answer is an error).
    let _ = get(&shim.url(&format!("/api/v1/modserv/{id}/logs?tail=5")));

    // Delete: notExist, nothing left behind.
    let envelope = send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{id}")),
        None,
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    wait_status(&shim, &id, 60, |d| d["status"] == "notExist");
    assert_eq!(deployment_of(&lab, &id), None);
    let services = lab.get(&format!("/api/v1/namespaces/{NAMESPACE}/services"));
    assert!(
        !services.to_string().contains(&deployment),
        "Service {deployment} left behind"
    );

    // Idle for a minute: no requests at all (watches stay open; nothing polls).
    std::thread::sleep(Duration::from_secs(2));
    let before = lab.requests_by(SHIM_USER).len();
    std::thread::sleep(Duration::from_secs(60));
    let idle = &lab.requests_by(SHIM_USER)[before..];
    assert!(idle.is_empty(), "requests while idle: {idle:#?}");

    // The RBAC we ship is no more than needed: every permission it grants was used above.
    let used = lab.permissions_used_by(SHIM_USER);
    let unused: Vec<String> = granted_by_shipped_rbac()
        .into_iter()
        .filter(|p| !used.contains(p) && !NOT_SEEN_IN_THIS_TEST.contains(&p.as_str()))
        .collect();
    assert!(
        unused.is_empty(),
        "deploy/rbac.yaml grants {unused:?}, which the shim never used (used: {used:?})"
    );
}

/// Permissions of `deploy/rbac.yaml` this test cannot see used, and why they are needed.
const NOT_SEEN_IN_THIS_TEST: &[&str] = &[
    // Server-side apply of an object that does not exist yet needs create; the audit log
    // records it as a patch.
    "deployments:create",
    "services:create",
    // `engine.store: kubernetes` (tests/e2e_k8s_store.rs); this test uses the file store.
    "modelservices:get",
    "modelservices:list",
    "modelservices:watch",
    "modelservices:create",
    "modelservices:patch",
    "modelservices:delete",
    "modelservices/status:patch",
    "events:create",
    // The leader election of `engine.store: kubernetes` (tests/e2e_k8s_ha.rs).
    "leases:get",
    "leases:create",
    "leases:update",
    // `replicaAddresses: pods` (the default when the shim runs in a pod); this test uses the
    // Service address. tests/e2e_k8s_gateway.rs checks both used.
    "endpointslices:list",
    "endpointslices:watch",
];

/// `resource:verb` for every rule of the Role and the ClusterRole in `deploy/rbac.yaml`.
fn granted_by_shipped_rbac() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml"))
            .unwrap();
    let mut granted = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object: Value = serde::Deserialize::deserialize(doc).unwrap();
        if object["kind"] != "Role" && object["kind"] != "ClusterRole" {
            continue;
        }
        for rule in object["rules"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.push(format!(
                        "{}:{}",
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    granted
}

/// The rule of `RuntimeUnavailable`: the API server stopped for 20 s mid-deploy and while
/// services run fails nothing, and everything converges soon after it is back.
///
/// Two figures: how soon the shim has done its part (the Deployment applied, or removed) after
/// the API server is back, which must be within the reconciler's 10 s backoff cap; and how
/// soon the service is running. The second includes the control plane's own recovery: after a
/// restart this lab's kube-apiserver (with its etcd 3.5.1) holds watches that resume from a
/// resource version its cache has not reached for up to a minute, which delays the
/// controller-manager's ReplicaSets and pods as much as the shim's view.
#[test]
fn an_api_server_restart_fails_nothing_and_everything_converges_after_it() {
    let (mut lab, kubeconfig) = lab_with_shipped_rbac();
    let dir = tempfile::tempdir().unwrap();
    let shim = start_shim(dir.path(), &kubeconfig, free_port());
    let running = deploy(&shim, mock("steady"));
    wait_status(&shim, &running, 60, |d| d["status"] == "running");

    // Down for 20 s, with a deploy sent meanwhile.
    lab.stop_apiserver();
    let down_at = Instant::now();
    let fresh = deploy(&shim, mock("fresh"));
    let mut saw_reason = false;
    while down_at.elapsed() < Duration::from_secs(20) {
        let fresh_status = status(&shim, &fresh);
        assert_ne!(fresh_status["status"], "failed", "{fresh_status}");
        saw_reason |= fresh_status["reason"] == "RuntimeUnavailable";
        // The running service keeps answering from the watch cache.
        assert_eq!(status(&shim, &running)["status"], "running");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(saw_reason, "the outage was never given as the reason");
    lab.start_apiserver();
    let back_at = Instant::now();
    wait_for(
        "the Deployment of the deploy sent during the outage",
        60,
        || deployment_of(&lab, &fresh),
    );
    let applied = back_at.elapsed().as_secs_f64();
    wait_status(&shim, &fresh, 180, |d| d["status"] == "running");
    let ran = back_at.elapsed().as_secs_f64();
    eprintln!(
        "deploy sent during the outage: applied {applied:.1} s and running {ran:.1} s after \
         the API server came back"
    );
    assert!(
        applied <= 12.0,
        "took {applied:.1} s to apply after the outage (backoff cap 10 s)"
    );

    // A delete during an outage completes after it.
    lab.stop_apiserver();
    let envelope = send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{running}")),
        None,
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    std::thread::sleep(Duration::from_secs(5));
    let terminating = status(&shim, &running);
    assert_eq!(terminating["status"], "terminating", "{terminating}");
    assert_eq!(status(&shim, &fresh)["status"], "running");
    lab.start_apiserver();
    let back_at = Instant::now();
    wait_status(&shim, &running, 180, |d| d["status"] == "notExist");
    let removed = back_at.elapsed().as_secs_f64();
    eprintln!(
        "delete sent during the outage: notExist {removed:.1} s after the API server came back"
    );
    assert_eq!(deployment_of(&lab, &running), None);
}

/// kill -9 of the shim with 100 deploys in flight: after a restart all 100 run, with exactly
/// one Deployment each.
#[test]
fn kill_9_with_100_deploys_in_flight_ends_with_100_running_and_100_deployments() {
    let (lab, kubeconfig) = lab_with_shipped_rbac();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut shim = start_shim(dir.path(), &kubeconfig, port);
    let ids: Vec<String> = (0..100)
        .map(|i| deploy(&shim, mock(&format!("m{i}"))))
        .collect();
    shim.child.kill().unwrap(); // SIGKILL
    shim.child.wait().unwrap();
    let in_cluster = lab.deployments(NAMESPACE).len();
    eprintln!("Deployments when the shim was killed: {in_cluster} of 100");
    drop(shim);

    let shim = start_shim(dir.path(), &kubeconfig, port);
    let started = Instant::now();
    for id in &ids {
        wait_status(&shim, id, 180, |d| d["status"] == "running");
    }
    eprintln!(
        "all 100 running {:.1} s after the restart",
        started.elapsed().as_secs_f64()
    );
    let deployments = lab.deployments(NAMESPACE);
    assert_eq!(deployments.len(), 100, "{deployments:?}");
    for id in &ids {
        assert_eq!(
            deployments
                .iter()
                .filter(|d| d.ends_with(&format!("-{id}")))
                .count(),
            1,
            "service {id}"
        );
    }
}

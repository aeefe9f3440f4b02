//! The whole lifecycle against a real cluster, opt-in: set `XMOD_SHIM_K8S_TEST_KUBECONFIG` to a
//! kubeconfig path (kind, k3s, or any cluster where you may create Deployments and Services).
//! Without it the test prints a skip notice and passes. See docs/kubernetes.md.
//!
//! The cluster needs the mock engine's image, `xmod-shim/mock-engine:latest` (`cargo xtask
//! docker-image`, then e.g. `kind load docker-image xmod-shim/mock-engine:latest`); pods use
//! `imagePullPolicy: IfNotPresent` so the loaded image is used.
//!
//! Other variables: `XMOD_SHIM_K8S_TEST_NAMESPACE` (default `default`),
//! `XMOD_SHIM_K8S_TEST_CONTEXT` (kubeconfig context), `XMOD_SHIM_K8S_TEST_SKIP_CHAT=1` when this
//! machine cannot reach the nodes' addresses (Docker Desktop): the chat request through the
//! NodePort endpoint is then skipped.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams};
use shim_core::{DeploySpec, Engine, EngineConfig, Phase, ServiceRecord};
use shim_shimlet_k8s as _;

const KUBECONFIG_VAR: &str = "XMOD_SHIM_K8S_TEST_KUBECONFIG";
const READY_WAIT: Duration = Duration::from_secs(240);

struct Cluster {
    kubeconfig: String,
    namespace: String,
    context: Option<String>,
}

fn cluster() -> Option<Cluster> {
    let kubeconfig = std::env::var(KUBECONFIG_VAR).ok().filter(|v| !v.is_empty());
    let Some(kubeconfig) = kubeconfig else {
        eprintln!(
            "SKIPPED: set {KUBECONFIG_VAR} to a kubeconfig path to run against a real cluster"
        );
        return None;
    };
    Some(Cluster {
        kubeconfig,
        namespace: std::env::var("XMOD_SHIM_K8S_TEST_NAMESPACE")
            .unwrap_or_else(|_| "default".into()),
        context: std::env::var("XMOD_SHIM_K8S_TEST_CONTEXT").ok(),
    })
}

async fn kube_client(c: &Cluster) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(&c.kubeconfig).expect("reading the kubeconfig");
    let options = kube::config::KubeConfigOptions {
        context: c.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(file, &options)
        .await
        .expect("a kube config");
    kube::Client::try_from(config).expect("a kube client")
}

async fn wait_until(
    engine: &Engine,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(Option<&ServiceRecord>) -> bool,
) -> Option<ServiceRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let record = engine.get(id);
        if done(record.as_ref()) {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: gave up; last record {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes whatever a failed run left behind.
async fn clean_up(client: &kube::Client, namespace: &str, ids: &[String]) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    for id in ids {
        let selector = ListParams::default().labels(&format!("xmod-shim/service-id={id}"));
        let _ = deployments
            .delete_collection(&DeleteParams::foreground(), &selector)
            .await;
        if let Ok(list) = services.list(&selector).await {
            for s in list.items {
                if let Some(name) = s.metadata.name {
                    let _ = services.delete(&name, &DeleteParams::default()).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn full_lifecycle_on_a_real_cluster() {
    let Some(c) = cluster() else {
        return;
    };
    let client = kube_client(&c).await;
    let created = Arc::new(Mutex::new(Vec::new()));
    let run = AssertUnwindSafe(lifecycle(&c, &client, created.clone()))
        .catch_unwind()
        .await;
    let ids = created.lock().unwrap().clone();
    clean_up(&client, &c.namespace, &ids).await;
    if let Err(panic) = run {
        std::panic::resume_unwind(panic);
    }
}

async fn lifecycle(c: &Cluster, client: &kube::Client, created: Arc<Mutex<Vec<String>>>) {
    let models = tempfile::tempdir().unwrap();
    let mut k8s = serde_json::json!({
        "kubeConfig": c.kubeconfig,
        "namespace": c.namespace,
        "serviceType": "NodePort",
        "imagePullPolicy": "IfNotPresent",
        "startupProbePeriodSecs": 2,
        // The mock engine reads no weights; let the kubelet create the directory.
        "modelVolume": { "hostPathType": "DirectoryOrCreate", "hostRoot": "/tmp/xmod-shim-models" },
    });
    if let Some(context) = &c.context {
        k8s["context"] = context.clone().into();
    }
    let config = EngineConfig {
        model_root: models.path().to_path_buf(),
        default_engine: "mock".into(),
        backoff_base: Duration::from_millis(200),
        plugins: Arc::new(serde_json::json!({
            "shimlets": { "k8s": k8s },
            "pipelines": { "opensourcellm": { "checkModelDir": false } },
            "engines": {
                // A preset whose image cannot exist: the pull fails with a typed reason.
                "broken": { "image": "registry.invalid/xmod-shim/none:0", "port": 8000, "startupTimeoutSecs": 120 },
            },
        })),
        ..EngineConfig::default()
    };
    let pipeline = shim_pipeline::opensourcellm(&config.plugin_settings()).unwrap();
    let engine = Engine::builder()
        .config(config)
        .shimlet("k8s")
        .pipeline(pipeline)
        .build()
        .await
        .expect("the engine starts with the k8s shimlet");

    // Deploy: running, with an endpoint that answers.
    let id = engine.deploy(DeploySpec::named("e2e")).await.unwrap();
    created.lock().unwrap().push(id.clone());
    let record = wait_until(&engine, &id, "deploy", READY_WAIT, |r| {
        r.is_some_and(|r| r.phase == Phase::Running)
    })
    .await
    .unwrap();
    assert!(
        record.endpoint.starts_with("http://"),
        "{}",
        record.endpoint
    );
    assert!(
        record.endpoint.ends_with("/v1/chat/completions"),
        "{}",
        record.endpoint
    );
    let name = shim_shimlet_k8s::object_name(&id, "e2e");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &c.namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &c.namespace);
    let deployment = deployments.get(&name).await.expect("the Deployment exists");
    let labels = deployment.metadata.labels.unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "xmod-shim");
    assert_eq!(labels["xmod-shim/service-id"], id);
    services.get(&name).await.expect("the Service exists");
    if std::env::var("XMOD_SHIM_K8S_TEST_SKIP_CHAT").as_deref() != Ok("1") {
        let reply = reqwest_chat(&record.endpoint).await;
        assert!(reply.contains("e2e"), "{reply}");
    }

    // Update: two replicas of generation 2.
    let mut spec = DeploySpec::named("e2e");
    spec.replica_count = Some(2);
    engine.update(&id, spec).await.unwrap();
    let record = wait_until(&engine, &id, "update", READY_WAIT, |r| {
        r.is_some_and(|r| r.generation == 2 && r.phase == Phase::Running)
    })
    .await
    .unwrap();
    assert_eq!(record.ready_replicas, 2);

    // Drift: the Deployment deleted by hand comes back.
    deployments
        .delete(&name, &DeleteParams::background())
        .await
        .expect("deleting the Deployment by hand");
    wait_until(&engine, &id, "repair", READY_WAIT, |r| {
        r.is_some_and(|r| r.restarts >= 1 && r.phase == Phase::Running)
    })
    .await;
    deployments.get(&name).await.expect("restored");

    // Delete: notExist only when both objects are gone.
    engine.delete(&id).await.unwrap();
    wait_until(&engine, &id, "delete", READY_WAIT, |r| r.is_none()).await;
    assert!(deployments.get_opt(&name).await.unwrap().is_none());
    assert!(services.get_opt(&name).await.unwrap().is_none());

    // A typed failure with the cluster's words.
    let mut broken = DeploySpec::named("broken");
    broken.engine = Some("broken".into());
    let id = engine.deploy(broken).await.unwrap();
    created.lock().unwrap().push(id.clone());
    let record = wait_until(&engine, &id, "image pull failure", READY_WAIT, |r| {
        r.is_some_and(|r| r.phase == Phase::Failed)
    })
    .await
    .unwrap();
    assert_eq!(record.reason.as_deref(), Some("ImagePull"), "{record:?}");
    engine.delete(&id).await.unwrap();
    wait_until(&engine, &id, "delete broken", READY_WAIT, |r| r.is_none()).await;
    engine.shutdown().await;
}

/// A chat completion through `endpoint`; the reply's text.
async fn reqwest_chat(endpoint: &str) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(endpoint)
        .json(&serde_json::json!({
            "model": "e2e",
            "messages": [{"role": "user", "content": "hello kubernetes"}],
        }))
        .send()
        .await
        .expect("the endpoint answers");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("a JSON reply");
    body.to_string()
}

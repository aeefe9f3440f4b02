//! The whole engine (reconciler + opensourcellm pipeline) driving the Kubernetes shimlet against
//! the fake API server, whose simulated controllers roll Deployments out and delete at once:
//! deploy → running with the in-cluster endpoint, drift repaired, update, dry run, delete →
//! gone. The same lifecycle runs against a real cluster in `real_cluster.rs`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Behaviour, FakeCluster, Kind};
use shim_core::{DeploySpec, Engine, EngineConfig, Notifier, Phase, ServiceRecord};
use shim_shimlet_k8s::{K8sShimlet, object_name};

const WAIT: Duration = Duration::from_secs(10);

async fn wait_until(
    engine: &Engine,
    id: &str,
    what: &str,
    done: impl Fn(Option<&ServiceRecord>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let record = engine.get(id);
        if done(record.as_ref()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: last record {record:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn running(r: Option<&ServiceRecord>) -> bool {
    r.is_some_and(|r| r.phase == Phase::Running)
}

/// The engine with the opensourcellm pipeline and the k8s shimlet on `cluster`.
async fn engine_on(cluster: &FakeCluster) -> (Engine, tempfile::TempDir) {
    let models = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        model_root: models.path().to_path_buf(),
        default_engine: "mock".into(),
        backoff_base: Duration::from_millis(20),
        plugins: Arc::new(serde_json::json!({
            // The cluster mounts the models; this machine need not have them.
            "pipelines": { "opensourcellm": { "checkModelDir": false, "pollIntervalMs": 20 } },
        })),
        ..EngineConfig::default()
    };
    let shimlet = K8sShimlet::with_client(
        cluster.client(),
        common::config(),
        models.path().to_path_buf(),
        Notifier::detached(),
    )
    .await
    .unwrap();
    let pipeline = shim_pipeline::opensourcellm(&config.plugin_settings()).unwrap();
    let engine = Engine::builder()
        .config(config)
        .shimlet_instance(move |ctx| {
            shimlet.set_notifier(ctx.notifier.clone());
            Arc::new(shimlet)
        })
        .pipeline(pipeline)
        .build()
        .await
        .unwrap();

    (engine, models)
}

#[tokio::test]
async fn the_engine_deploys_repairs_updates_and_deletes_through_the_fake_cluster() {
    let cluster = FakeCluster::new(Behaviour {
        auto_rollout: true,
        instant_delete: true,
        ..Behaviour::default()
    });
    let (engine, _models) = engine_on(&cluster).await;

    let id = engine.deploy(DeploySpec::named("demo")).await.unwrap();
    let name = object_name(&id, "demo");
    wait_until(&engine, &id, "deploy", running).await;
    let record = engine.get(&id).unwrap();
    assert_eq!(
        record.endpoint,
        format!("http://{name}.models.svc.cluster.local:8000/v1/chat/completions")
    );
    let deployment = cluster
        .get(Kind::Deployment, &name)
        .expect("the Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "xmod-shim/mock-engine:latest");
    assert_eq!(
        container["args"],
        serde_json::json!([
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            "demo",
            "/models/model"
        ])
    );
    assert!(cluster.get(Kind::Service, &name).is_some());

    // Deleted behind the shim's back: the watch notifies, the engine re-applies.
    cluster.remove(Kind::Deployment, &name);
    wait_until(&engine, &id, "repair", |r| {
        r.is_some_and(|r| r.restarts == 1 && r.phase == Phase::Running)
    })
    .await;
    assert!(cluster.get(Kind::Deployment, &name).is_some(), "restored");

    // An update converges to generation 2.
    let mut spec = DeploySpec::named("demo");
    spec.replica_count = Some(2);
    engine.update(&id, spec.clone()).await.unwrap();
    wait_until(&engine, &id, "update", |r| {
        r.is_some_and(|r| r.generation == 2 && r.phase == Phase::Running)
    })
    .await;
    let deployment = cluster.get(Kind::Deployment, &name).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["metadata"]["annotations"]["xmod-shim/generation"],
        "2"
    );
    assert_eq!(engine.get(&id).unwrap().ready_replicas, 2);

    // A dry run renders without creating anything.
    let before = cluster.names(Kind::Deployment);
    let dry = engine.dry_run(DeploySpec::named("other")).await.unwrap();
    assert_eq!(dry.manifests[0]["kind"], "List");
    assert_eq!(dry.manifests[0]["items"][0]["kind"], "Deployment");
    assert_eq!(dry.manifests[0]["items"][1]["kind"], "Service");
    assert_eq!(cluster.names(Kind::Deployment), before);

    // Delete: terminating, then gone from the engine and the cluster.
    engine.delete(&id).await.unwrap();
    wait_until(&engine, &id, "delete", |r| r.is_none()).await;
    assert!(cluster.names(Kind::Deployment).is_empty());
    assert!(cluster.names(Kind::Service).is_empty());
    assert!(cluster.names(Kind::Pod).is_empty());
    assert_eq!(cluster.violations(), Vec::<String>::new());
    engine.shutdown().await;
}

#[tokio::test]
async fn unschedulable_pods_read_pending_with_the_schedulers_words_until_they_fit() {
    let cluster = FakeCluster::new(Behaviour {
        instant_delete: true,
        ..Behaviour::default()
    });
    let (engine, _models) = engine_on(&cluster).await;
    let id = engine.deploy(DeploySpec::named("demo")).await.unwrap();
    let name = object_name(&id, "demo");
    wait_until(&engine, &id, "applied", |_| {
        cluster.get(Kind::Deployment, &name).is_some()
    })
    .await;
    let labels = serde_json::json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": id});
    cluster.put(
        Kind::Pod,
        serde_json::json!({"metadata": {"name": format!("{name}-5d8f9c7b6-abcde"), "labels": labels},
            "spec": {"containers": []},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}),
    );
    wait_until(&engine, &id, "pending", |r| {
        r.is_some_and(|r| {
            r.phase == Phase::Pending
                && r.reason.as_deref() == Some("Unschedulable")
                && r.message
                    .as_deref()
                    .is_some_and(|m| m.contains("Insufficient nvidia.com/gpu"))
        })
    })
    .await;
    // A node frees up: the pods schedule and roll out, and the service runs.
    cluster.remove(Kind::Pod, &format!("{name}-5d8f9c7b6-abcde"));
    cluster.roll_out(&name);
    wait_until(&engine, &id, "running", running).await;
    engine.shutdown().await;
}

//! The Kubernetes shimlet against a fake API server (tests/common): start-up checks, the exact
//! server-side apply requests, watch-fed status without API calls, delete, adoption, drift,
//! logs. No cluster needed; each test takes milliseconds.

mod common;

use std::time::Duration;

use common::{
    Behaviour, FakeCluster, Kind, NAMESPACE, config, fake_cluster, notified, start, wait_for,
    workload,
};
use serde_json::json;
use shim_core::queue::WorkQueue;
use shim_core::{FailureReason, Notifier, Removal, Shimlet, WorkloadState};
use shim_shimlet_k8s::{K8sConfig, K8sShimlet, object_name};

const ID: &str = "1a2b3c4d";
const WAIT: Duration = Duration::from_secs(5);

fn name() -> String {
    object_name(ID, "Qwen2.5-7B")
}

fn is(state: WorkloadState) -> impl Fn(&shim_core::WorkloadObservation) -> bool {
    move |o| o.state == state
}

/// Requests other than watches, from index `from` on.
fn calls(cluster: &FakeCluster, from: usize) -> Vec<common::Recorded> {
    cluster
        .requests_since(from)
        .into_iter()
        .filter(|r| !r.is_watch())
        .collect()
}

#[tokio::test]
async fn start_up_checks_the_namespace_and_the_permissions() {
    let (client, _) = fake_cluster(Behaviour {
        no_namespace: true,
        ..Behaviour::default()
    });
    let err = K8sShimlet::with_client(client, config(), "/m".into(), Notifier::detached())
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::InvalidSpec);
    assert!(
        err.message.contains("namespace \"models\" does not exist"),
        "{}",
        err.message
    );

    let (client, _) = fake_cluster(Behaviour {
        forbid_list: true,
        ..Behaviour::default()
    });
    let err = K8sShimlet::with_client(client, config(), "/m".into(), Notifier::detached())
        .await
        .unwrap_err();
    assert!(
        err.message.contains("may not list Deployments"),
        "{}",
        err.message
    );
    assert!(err.message.contains("deploy/rbac.yaml"), "{}", err.message);
}

#[tokio::test]
async fn an_unreachable_api_server_fails_the_start_with_a_clear_message() {
    let (service, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<common::MockBody>,
    >();
    tokio::spawn(async move {
        while let Some((_, reply)) = handle.next_request().await {
            reply.send_error(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ));
        }
    });
    let client = kube::Client::new(service, NAMESPACE);
    let err = K8sShimlet::with_client(client, config(), "/m".into(), Notifier::detached())
        .await
        .unwrap_err();
    assert!(
        err.message
            .contains("cannot reach the Kubernetes API server"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("connection refused"),
        "{}",
        err.message
    );

    // One that accepts but never answers is given timeoutSecs.
    let (service, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<common::MockBody>,
    >();
    let held = tokio::spawn(async move {
        let mut pending = Vec::new();
        while let Some(request) = handle.next_request().await {
            pending.push(request);
        }
    });
    let client = kube::Client::new(service, NAMESPACE);
    let quick = K8sConfig {
        timeout_secs: 1,
        ..config()
    };
    let err = K8sShimlet::with_client(client, quick, "/m".into(), Notifier::detached())
        .await
        .unwrap_err();
    assert!(
        err.message.contains("no answer within 1s"),
        "{}",
        err.message
    );
    held.abort();
}

#[tokio::test]
async fn start_up_lists_and_watches_the_three_managed_kinds() {
    let (_shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    let requests = cluster.requests();
    let lines: Vec<String> = requests.iter().map(common::Recorded::line).collect();
    assert_eq!(requests[0].path, "/api/v1/namespaces/models", "{lines:#?}");
    assert_eq!(
        requests[1].path,
        "/apis/apps/v1/namespaces/models/deployments"
    );
    assert_eq!(requests[1].query["limit"], "1");
    for path in [
        "/apis/apps/v1/namespaces/models/deployments",
        "/api/v1/namespaces/models/services",
        "/api/v1/namespaces/models/pods",
    ] {
        for watch in [false, true] {
            let found = requests[2..].iter().any(|r| {
                r.path == path
                    && r.is_watch() == watch
                    && r.query.get("labelSelector").map(String::as_str)
                        == Some("app.kubernetes.io/managed-by=xmod-shim")
            });
            assert!(
                found,
                "no {} of {path}: {lines:#?}",
                if watch { "watch" } else { "list" }
            );
        }
    }
    assert_eq!(requests.len(), 8, "{lines:#?}");
}

#[tokio::test]
async fn apply_sends_exactly_the_rendered_objects_by_server_side_apply() {
    let (shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    let w = workload(ID);
    let before = cluster.request_count();
    shimlet.apply(&w).await.expect("apply");
    let sent = calls(&cluster, before);
    let lines: Vec<String> = sent.iter().map(common::Recorded::line).collect();
    assert_eq!(sent.len(), 2, "{lines:#?}");
    let manifests = shimlet.manifests(&w).unwrap();
    for (request, path, expected) in [
        (
            &sent[0],
            format!("/apis/apps/v1/namespaces/models/deployments/{}", name()),
            serde_json::to_value(&manifests.deployment).unwrap(),
        ),
        (
            &sent[1],
            format!("/api/v1/namespaces/models/services/{}", name()),
            serde_json::to_value(&manifests.service).unwrap(),
        ),
    ] {
        assert_eq!(request.method, "PATCH");
        assert_eq!(request.path, path);
        assert_eq!(request.query["fieldManager"], "xmod-shim");
        assert_eq!(request.query["force"], "true");
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(request.body.as_ref(), Some(&expected));
    }
    // The body, spot-checked against the workload.
    let d = sent[0].body.clone().unwrap();
    assert_eq!(
        d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "xmod-shim"
    );
    assert_eq!(d["metadata"]["labels"]["xmod-shim/service-id"], ID);
    assert_eq!(
        d["metadata"]["annotations"]["xmod-shim/model-name"],
        "Qwen2.5-7B"
    );
    assert_eq!(d["metadata"]["annotations"]["xmod-shim/generation"], "1");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["args"],
        json!([
            "/models/model",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            "Qwen2.5-7B"
        ])
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "4", "memory": "16Gi"})
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(c["startupProbe"]["failureThreshold"], 60);
    assert_eq!(
        d["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"],
        "/srv/models/Qwen2.5-7B"
    );
    let s = sent[1].body.clone().unwrap();
    assert_eq!(s["spec"]["selector"]["xmod-shim/service-id"], ID);

    // Applying the same workload again changes nothing: until the watch has delivered what
    // was applied it sends the same bodies, and from then on it sends nothing at all (a
    // waiting service re-runs its pipeline often).
    let generation =
        cluster.get(Kind::Deployment, &name()).unwrap()["metadata"]["generation"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let again = cluster.request_count();
        shimlet.apply(&w).await.expect("another apply");
        let resent = calls(&cluster, again);
        if resent.is_empty() {
            break;
        }
        assert_eq!(resent.len(), 2);
        assert_eq!(resent[0].body, sent[0].body);
        assert!(
            std::time::Instant::now() < deadline,
            "re-applies kept sending"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cluster.get(Kind::Deployment, &name()).unwrap()["metadata"]["generation"],
        generation
    );
    assert_eq!(cluster.violations(), Vec::<String>::new());

    // The dry run shows exactly what was sent.
    let rendered = shimlet.render(&w).await.unwrap();
    assert_eq!(rendered["kind"], "List");
    assert_eq!(Some(&rendered["items"][0]), sent[0].body.as_ref());
    assert_eq!(Some(&rendered["items"][1]), sent[1].body.as_ref());
}

#[tokio::test]
async fn status_comes_from_the_watches_and_reads_never_call_the_api_server() {
    let (shimlet, cluster, queue) = start(Behaviour::default(), config()).await;
    shimlet.apply(&workload(ID)).await.unwrap();
    // Created, not ready: starting (also before the watch delivered it).
    let seen = shimlet.observe(ID).await.unwrap();
    assert_eq!(seen.state, WorkloadState::Starting);
    notified(&queue, ID).await;

    cluster.roll_out(&name());
    let ready = wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;
    assert_eq!((ready.ready_replicas, ready.desired_replicas), (1, 1));
    assert_eq!(ready.generation, Some(1));
    assert_eq!(
        ready.address.as_deref(),
        Some(format!("http://{}.models.svc.cluster.local:8000", name()).as_str())
    );

    let before = cluster.request_count();
    for _ in 0..10_000 {
        let seen = shimlet.observe(ID).await.unwrap();
        assert_eq!(seen.state, WorkloadState::Ready);
        let unknown = shimlet.observe("not-a-service").await.unwrap();
        assert_eq!(unknown.state, WorkloadState::Missing);
    }
    assert_eq!(
        cluster.request_count(),
        before,
        "observe called the API server"
    );
}

#[tokio::test]
async fn each_failure_the_cluster_reports_reaches_observe() {
    let (shimlet, cluster, queue) = start(Behaviour::default(), config()).await;
    shimlet.apply(&workload(ID)).await.unwrap();
    let pod = format!("{}-5d8f9c7b6-abcde", name());
    let labels = json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": ID});
    let put_pod = |status: serde_json::Value| {
        cluster.put(
            Kind::Pod,
            json!({"metadata": {"name": pod, "labels": labels}, "spec": {"containers": []}, "status": status}),
        );
    };
    // 6 restarts: past the default engine.maxRestarts (5), so a crash loop reads as failed.
    let container = |state: serde_json::Value, last: serde_json::Value| {
        json!({"phase": "Running", "containerStatuses": [{"name": "engine", "image": "vllm/vllm-openai:v0.9",
            "imageID": "", "ready": false, "restartCount": 6, "state": state, "lastState": last}]})
    };

    put_pod(
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
    );
    let seen = wait_for(&shimlet, ID, WAIT, is(WorkloadState::Pending)).await;
    let failure = seen.failure.unwrap();
    assert_eq!(failure.reason, FailureReason::Unschedulable);
    assert_eq!(
        failure.message,
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    );
    notified(&queue, ID).await;

    put_pod(container(
        json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"vllm/vllm-openai:v0.9\""}}),
        json!({}),
    ));
    let seen = wait_for(&shimlet, ID, WAIT, |o| {
        o.failure.as_ref().map(|f| f.reason) == Some(FailureReason::ImagePull)
    })
    .await;
    assert_eq!(seen.state, WorkloadState::Failed);

    put_pod(container(
        json!({"waiting": {"reason": "CrashLoopBackOff"}}),
        json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
    ));
    let seen = wait_for(&shimlet, ID, WAIT, |o| {
        o.failure.as_ref().map(|f| f.reason) == Some(FailureReason::OutOfMemory)
    })
    .await;
    assert_eq!(seen.state, WorkloadState::Failed);

    put_pod(container(
        json!({"waiting": {"reason": "CrashLoopBackOff"}}),
        json!({"terminated": {"exitCode": 1, "reason": "Error", "message": "ValueError: model not found"}}),
    ));
    let seen = wait_for(&shimlet, ID, WAIT, |o| {
        o.failure.as_ref().map(|f| f.reason) == Some(FailureReason::CrashLoop)
    })
    .await;
    assert!(
        seen.failure
            .unwrap()
            .message
            .ends_with("ValueError: model not found")
    );

    cluster.remove(Kind::Pod, &pod);
    cluster.modify(Kind::Deployment, &name(), |d| {
        d["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."}]});
    });
    let seen = wait_for(&shimlet, ID, WAIT, |o| {
        o.failure.as_ref().map(|f| f.reason) == Some(FailureReason::StartupTimeout)
    })
    .await;
    assert_eq!(seen.state, WorkloadState::Failed);
    assert!(
        seen.failure
            .unwrap()
            .message
            .contains("ProgressDeadlineExceeded")
    );
}

#[tokio::test]
async fn delete_is_foreground_and_gone_only_once_the_api_server_has_nothing() {
    let (shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    shimlet.apply(&workload(ID)).await.unwrap();
    cluster.roll_out(&name());
    wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;

    let before = cluster.request_count();
    assert_eq!(shimlet.delete(ID).await.unwrap(), Removal::InProgress);
    let sent = calls(&cluster, before);
    let lines: Vec<String> = sent.iter().map(common::Recorded::line).collect();
    let selector = format!("app.kubernetes.io/managed-by=xmod-shim,xmod-shim/service-id={ID}");
    assert_eq!(sent.len(), 4, "{lines:#?}");
    assert_eq!(sent[0].method, "GET");
    assert_eq!(sent[0].query["labelSelector"], selector);
    assert_eq!(sent[1].query["labelSelector"], selector);
    for (request, path) in [
        (
            &sent[2],
            format!("/apis/apps/v1/namespaces/models/deployments/{}", name()),
        ),
        (
            &sent[3],
            format!("/api/v1/namespaces/models/services/{}", name()),
        ),
    ] {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("DELETE", path.as_str())
        );
        assert_eq!(
            request.body.as_ref().unwrap()["propagationPolicy"],
            "Foreground"
        );
    }
    // Being deleted reads as missing; still in progress while the objects exist.
    wait_for(&shimlet, ID, WAIT, is(WorkloadState::Missing)).await;
    assert_eq!(shimlet.delete(ID).await.unwrap(), Removal::InProgress);

    cluster.collect_garbage();
    assert_eq!(shimlet.delete(ID).await.unwrap(), Removal::Gone);
    assert!(cluster.names(Kind::Deployment).is_empty());
    assert!(cluster.names(Kind::Pod).is_empty());
    assert_eq!(
        shimlet.observe(ID).await.unwrap().state,
        WorkloadState::Missing
    );
    // Deleting what is gone is gone.
    assert_eq!(shimlet.delete(ID).await.unwrap(), Removal::Gone);
    assert_eq!(cluster.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn list_reports_managed_workloads_for_re_adoption() {
    let (client, cluster) = fake_cluster(Behaviour::default());
    let managed =
        |id: &str| json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": id});
    cluster.put(
        Kind::Deployment,
        json!({"metadata": {"name": "xmod-a-0000000a", "labels": managed("0000000a"),
            "annotations": {"xmod-shim/generation": "7"}}, "spec": {"replicas": 1}}),
    );
    cluster.put(
        Kind::Service,
        json!({"metadata": {"name": "xmod-b-0000000b", "labels": managed("0000000b")}, "spec": {}}),
    );
    cluster.put(
        Kind::Deployment,
        json!({"metadata": {"name": "someone-else", "labels": {"app": "web"}}, "spec": {}}),
    );
    let shimlet = K8sShimlet::with_client(client, config(), "/m".into(), Notifier::detached())
        .await
        .unwrap();
    let listed = shimlet.list().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (
            listed[0].service_id.as_str(),
            listed[0].generation,
            listed[0].name.as_str()
        ),
        ("0000000a", Some(7), "xmod-a-0000000a")
    );
    assert_eq!(
        (
            listed[1].service_id.as_str(),
            listed[1].generation,
            listed[1].name.as_str()
        ),
        ("0000000b", None, "xmod-b-0000000b")
    );
    let lists: Vec<_> = cluster
        .requests()
        .into_iter()
        .filter(|r| !r.is_watch() && !r.query.contains_key("limit") && r.method == "GET")
        .filter(|r| !r.path.ends_with("/models") && !r.path.ends_with("/pods"))
        .collect();
    assert!(
        lists
            .iter()
            .all(|r| r.query["labelSelector"] == "app.kubernetes.io/managed-by=xmod-shim"),
        "{lists:?}"
    );
}

#[tokio::test]
async fn a_restarted_shim_knows_the_cluster_at_once_and_repairs_drift() {
    let cluster = FakeCluster::new(Behaviour::default());
    {
        let first = K8sShimlet::with_client(
            cluster.client(),
            config(),
            "/srv/models".into(),
            Notifier::detached(),
        )
        .await
        .unwrap();
        first.apply(&workload(ID)).await.unwrap();
        cluster.roll_out(&name());
        wait_for(&first, ID, WAIT, is(WorkloadState::Ready)).await;
    }
    // A new process: the initial lists rebuild the view before the constructor returns.
    let queue = std::sync::Arc::new(WorkQueue::new());
    let second = K8sShimlet::with_client(
        cluster.client(),
        config(),
        "/srv/models".into(),
        Notifier::new(queue.clone()),
    )
    .await
    .unwrap();
    let seen = second.observe(ID).await.unwrap();
    assert_eq!(
        (seen.state, seen.generation),
        (WorkloadState::Ready, Some(1))
    );

    // Someone deletes the Deployment: the watch tells the engine, observe says missing, and
    // apply restores it.
    cluster.remove(Kind::Deployment, &name());
    notified(&queue, ID).await;
    wait_for(&second, ID, WAIT, is(WorkloadState::Missing)).await;
    second.apply(&workload(ID)).await.unwrap();
    assert!(cluster.get(Kind::Deployment, &name()).is_some());
    cluster.roll_out(&name());
    wait_for(&second, ID, WAIT, is(WorkloadState::Ready)).await;

    // Someone scales it by hand: its generation moves past the applied one.
    cluster.modify(Kind::Deployment, &name(), |d| {
        d["spec"]["replicas"] = json!(3)
    });
    let changed = wait_for(&second, ID, WAIT, |o| o.failure.is_some()).await;
    assert_eq!(changed.state, WorkloadState::Starting);
    assert!(
        changed
            .failure
            .unwrap()
            .message
            .contains("changed outside xmod-shim"),
        "the engine is told why"
    );
    second.apply(&workload(ID)).await.unwrap();
    assert_eq!(
        cluster.get(Kind::Deployment, &name()).unwrap()["spec"]["replicas"],
        1,
        "apply took the field back"
    );
    cluster.roll_out(&name());
    let repaired = wait_for(&second, ID, WAIT, is(WorkloadState::Ready)).await;
    assert_eq!(repaired.failure, None);

    // Someone deletes the Service.
    cluster.remove(Kind::Service, &name());
    let gone = wait_for(&second, ID, WAIT, |o| o.failure.is_some()).await;
    assert_eq!(gone.failure.unwrap().reason, FailureReason::WorkloadMissing);
    second.apply(&workload(ID)).await.unwrap();
    wait_for(&second, ID, WAIT, is(WorkloadState::Ready)).await;
}

#[tokio::test]
async fn an_update_is_not_ready_until_its_own_rollout_is() {
    let (shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    shimlet.apply(&workload(ID)).await.unwrap();
    cluster.roll_out(&name());
    wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;

    let mut updated = workload(ID);
    updated.generation = 2;
    updated.args.push("--max-model-len=4096".into());
    shimlet.apply(&updated).await.unwrap();
    // The old pods are still ready, but this generation has not rolled out.
    let seen = shimlet.observe(ID).await.unwrap();
    assert_eq!(seen.state, WorkloadState::Starting);
    assert_eq!(seen.generation, Some(2));
    cluster.roll_out(&name());
    let ready = wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;
    assert_eq!(ready.generation, Some(2));
}

#[tokio::test]
async fn a_renamed_model_replaces_the_objects_of_the_old_name() {
    let (shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    shimlet.apply(&workload(ID)).await.unwrap();
    cluster.roll_out(&name());
    wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;
    let mut renamed = workload(ID);
    renamed.generation = 2;
    renamed.model_name = "Llama-3-8B".into();
    shimlet.apply(&renamed).await.unwrap();
    let new_name = object_name(ID, "Llama-3-8B");
    let deletes: Vec<String> = cluster
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert_eq!(
        deletes,
        [
            format!("/apis/apps/v1/namespaces/models/deployments/{}", name()),
            format!("/api/v1/namespaces/models/services/{}", name()),
        ]
    );
    cluster.collect_garbage();
    cluster.roll_out(&new_name);
    let ready = wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;
    assert!(ready.address.unwrap().contains(&new_name));
    assert_eq!(cluster.names(Kind::Deployment), [new_name]);
}

#[tokio::test]
async fn logs_are_read_from_the_pods() {
    let (shimlet, cluster, _) = start(Behaviour::default(), config()).await;
    let err = shimlet.logs(ID, 10).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::WorkloadMissing);
    let mut w = workload(ID);
    w.replicas = 2;
    shimlet.apply(&w).await.unwrap();
    cluster.roll_out(&name());
    wait_for(&shimlet, ID, WAIT, is(WorkloadState::Ready)).await;
    let pods = cluster.names(Kind::Pod);
    assert_eq!(pods.len(), 2);
    cluster.set_log(&pods[0], "INFO loading\nINFO ready\n");
    cluster.set_log(&pods[1], "INFO ready\n");
    let before = cluster.request_count();
    let text = shimlet.logs(ID, 5).await.unwrap();
    assert_eq!(
        text,
        format!(
            "==> {} <==\nINFO loading\nINFO ready\n==> {} <==\nINFO ready\n",
            pods[0], pods[1]
        )
    );
    let sent = calls(&cluster, before);
    assert_eq!(
        sent[0].path,
        format!("/api/v1/namespaces/models/pods/{}/log", pods[0])
    );
    assert_eq!(sent[0].query["container"], "engine");
    assert_eq!(sent[0].query["tailLines"], "5");
}

#[tokio::test]
async fn a_failed_apply_is_a_typed_error_and_leaves_the_service_missing() {
    let (shimlet, _cluster, _) = start(Behaviour::default(), config()).await;
    let mut w = workload("bad/id");
    w.service_id = "bad/id".into();
    let err = shimlet.apply(&w).await.unwrap_err();
    assert_eq!(
        (err.reason, err.retryable),
        (FailureReason::InvalidSpec, false)
    );
    assert_eq!(
        shimlet.observe("bad/id").await.unwrap().state,
        WorkloadState::Missing
    );
}

/// The factory's error (its `Ok` holds no `Debug`).
async fn factory_error(
    entry: &shim_core::ShimletEntry,
    section: serde_json::Value,
) -> shim_core::ShimletError {
    match (entry.factory)(context(section)).await {
        Ok(_) => panic!("the factory should have failed"),
        Err(err) => err,
    }
}

fn context(section: serde_json::Value) -> shim_core::ShimletContext {
    let config = shim_core::EngineConfig {
        plugins: std::sync::Arc::new(json!({ "shimlets": { "k8s": section } })),
        ..shim_core::EngineConfig::default()
    };
    shim_core::ShimletContext {
        settings: config.plugin_settings(),
        state_dir: std::env::temp_dir(),
        notifier: Notifier::detached(),
        gpus: std::sync::Arc::new(shim_core::GpuAllocator::new(Vec::new(), false)),
    }
}

#[tokio::test]
async fn the_registered_factory_reports_configuration_and_connection_problems() {
    let entry = shim_core::registry::shimlet("k8s").expect("registered as k8s");
    assert_eq!(
        entry.description,
        "Kubernetes Deployments and Services (kube-rs)"
    );

    let err = factory_error(entry, json!({"nameSpace": "x"})).await;
    assert_eq!(err.reason, FailureReason::InvalidSpec);
    assert!(err.message.contains("nameSpace"), "{}", err.message);

    let err = factory_error(entry, json!({"kubeConfig": "/nonexistent/kubeconfig"})).await;
    assert!(
        err.message
            .contains("cannot read kubeconfig /nonexistent/kubeconfig"),
        "{}",
        err.message
    );

    // A real client (rustls) for a server that is not there: refused at once, said clearly.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: abc}}]\n\
         contexts: [{name: lab, context: {cluster: c, user: u, namespace: models}}]\n\
         current-context: lab\n",
    )
    .unwrap();
    let err = factory_error(
        entry,
        json!({"kubeConfig": path, "context": "lab", "timeoutSecs": 3}),
    )
    .await;
    assert!(
        err.message.starts_with(
            "cannot reach the Kubernetes API server at https://127.0.0.1:1/ (context lab)"
        ),
        "{}",
        err.message
    );
}

//! The status rules, case by case, on objects shaped like the API server's, converted to what
//! the view keeps of them as the view converts them.

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::{Value, json};

use super::*;
use crate::config::{K8sConfig, ServiceType};

const ID: &str = "1a2b3c4d";
const NAME: &str = "xmod-qwen-1a2b3c4d";
/// `engine.maxRestarts` in these cases (the engine's default).
const MAX_RESTARTS: u32 = 5;

fn deployment(generation: i64, spec_gen: u64, replicas: i32, status: Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": NAME,
            "namespace": "models",
            "generation": generation,
            "labels": {"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": ID},
            "annotations": {"xmod-shim/generation": spec_gen.to_string(), "xmod-shim/model-name": "qwen"},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"xmod-shim/service-id": ID}},
            "template": {"spec": {"containers": [{"name": "engine", "image": "img"}]}},
        },
        "status": status,
    }))
    .unwrap()
}

/// A Deployment whose rollout of `replicas` is complete.
fn rolled_out(replicas: i32) -> Deployment {
    deployment(
        1,
        1,
        replicas,
        json!({"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
               "readyReplicas": replicas, "availableReplicas": replicas}),
    )
}

/// A Deployment whose single pod is not ready yet.
fn rolling() -> Deployment {
    deployment(
        1,
        1,
        1,
        json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "unavailableReplicas": 1}),
    )
}

fn service(spec: Value, status: Value) -> Service {
    let mut full = json!({"type": "ClusterIP", "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]});
    if let (Some(base), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": "models",
            "labels": {"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": ID}},
        "spec": full,
        "status": status,
    }))
    .unwrap()
}

fn pod(suffix: &str, status: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("{NAME}-5d8f9c7b6-{suffix}"), "namespace": "models",
            "labels": {"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": ID}},
        "spec": {"containers": [{"name": "engine", "image": "img"}]},
        "status": status,
    }))
    .unwrap()
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"phase": "Pending", "containerStatuses": [{
        "name": "engine", "image": "vllm/vllm-openai:v9", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}},
    }]})
}

fn crash_loop(restarts: i32, last: Value) -> Value {
    json!({"phase": "Running", "containerStatuses": [{
        "name": "engine", "image": "img", "imageID": "", "ready": false, "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container=engine"}},
        "lastState": {"terminated": last},
    }]})
}

fn ready_pod(suffix: &str, host_ip: &str) -> Pod {
    pod(
        suffix,
        json!({"phase": "Running", "hostIP": host_ip,
               "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]}),
    )
}

/// A service's objects as the view keeps them.
fn objects(deployment: Option<Deployment>, svc: Option<Service>, pods: Vec<Pod>) -> ServiceObjects {
    ServiceObjects {
        deployments: deployment.into_iter().map(DeploymentFacts::from).collect(),
        services: svc.into_iter().map(ServiceFacts::from).collect(),
        pods: pods.into_iter().map(PodFacts::from).collect(),
    }
}

#[test]
fn the_view_keeps_a_few_facts_of_each_object() {
    // Inline sizes (a k8s-openapi Pod is 2,176 bytes, a Deployment 2,400, a Service 824).
    assert!(
        size_of::<DeploymentFacts>() <= 136,
        "{}",
        size_of::<DeploymentFacts>()
    );
    assert!(
        size_of::<ServiceFacts>() <= 48,
        "{}",
        size_of::<ServiceFacts>()
    );
    assert!(size_of::<PodFacts>() <= 72, "{}", size_of::<PodFacts>());
    assert!(
        size_of::<ContainerFacts>() <= 112,
        "{}",
        size_of::<ContainerFacts>()
    );

    // A running pod as the API server sends it: of its spec, labels, annotations, managed fields
    // and container statuses, only the name, readiness and node address are kept.
    let mut whole = pod(
        "a",
        json!({"phase": "Running", "hostIP": "10.0.0.7", "podIP": "10.244.0.9",
               "startTime": "2026-01-01T00:00:00Z",
               "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
               "initContainerStatuses": [{"name": "fetch", "image": "busybox", "imageID": "sha256:1",
                   "ready": true, "restartCount": 0,
                   "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
               "containerStatuses": [{"name": "engine", "image": "vllm/vllm-openai:v9", "imageID": "sha256:2",
                   "ready": true, "restartCount": 1, "started": true,
                   "state": {"running": {"startedAt": "2026-01-01T00:01:00Z"}},
                   "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
    );
    whole.metadata.annotations = Some([("note".to_string(), "x".repeat(4096))].into());
    whole.metadata.managed_fields = Some(vec![Default::default(); 3]);
    whole.metadata.uid = Some("6f1c2d3e-0000-4000-8000-000000000001".into());
    let kept = PodFacts::from(whole);
    assert_eq!(
        kept,
        PodFacts {
            name: format!("{NAME}-5d8f9c7b6-a").into(),
            deleting: false,
            finished: false,
            ready: true,
            host_ip: Some("10.0.0.7".into()),
            unschedulable: None,
            waiting: Box::default(),
        }
    );

    // Of the containers, only those waiting for a reason a rule reads, init ones first.
    let starting = PodFacts::from(pod(
        "b",
        json!({"phase": "Pending",
               "initContainerStatuses": [{"name": "fetch", "image": "busybox", "imageID": "", "ready": false,
                   "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}],
               "containerStatuses": [
                   {"name": "engine", "image": "img", "imageID": "", "ready": false, "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": "boom"}}},
                   {"name": "sidecar", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
    ));
    let names: Vec<&str> = starting.waiting.iter().map(|c| &*c.name).collect();
    assert_eq!(names, ["fetch", "engine"]);
    assert_eq!(
        starting.waiting[1].last_exit,
        Some(LastExit {
            reason: "Error".into(),
            message: "boom".into(),
            exit_code: 1
        })
    );

    // A Deployment keeps neither its pod template nor its labels; its spec generation is parsed.
    let mut d = rolled_out(2);
    d.metadata.managed_fields = Some(vec![Default::default(); 3]);
    let kept = DeploymentFacts::from(d);
    assert_eq!(
        kept,
        DeploymentFacts {
            name: NAME.into(),
            deleting: false,
            generation: Some(1),
            spec_generation: Some(1),
            replicas: 2,
            rollout: Some(Rollout {
                observed_generation: 1,
                replicas: 2,
                updated_replicas: 2,
                ready_replicas: 2
            }),
            deadline_exceeded: None,
            replica_failure: None,
        }
    );
}

fn resolver(config: K8sConfig) -> EndpointResolver {
    EndpointResolver::new(&config, "models")
}

fn see(o: &ServiceObjects) -> WorkloadObservation {
    observe(o, None, &resolver(K8sConfig::default()), ID, MAX_RESTARTS)
}

fn failure(seen: &WorkloadObservation) -> (FailureReason, &str) {
    let f = seen.failure.as_ref().expect("a failure");
    (f.reason, f.message.as_str())
}

#[test]
fn nothing_is_missing() {
    assert_eq!(
        see(&ServiceObjects::default()),
        WorkloadObservation::missing()
    );
}

#[test]
fn a_complete_rollout_with_its_service_is_ready_at_the_cluster_dns_name() {
    let o = objects(
        Some(rolled_out(2)),
        Some(service(json!({}), json!({}))),
        vec![],
    );
    let seen = see(&o);
    assert_eq!(seen.state, WorkloadState::Ready);
    assert_eq!((seen.ready_replicas, seen.desired_replicas), (2, 2));
    assert_eq!(seen.generation, Some(1));
    assert_eq!(
        seen.address.as_deref(),
        Some("http://xmod-qwen-1a2b3c4d.models.svc.cluster.local:8000")
    );
    assert_eq!(seen.failure, None);
}

#[test]
fn a_rollout_in_progress_is_starting() {
    let svc = || Some(service(json!({}), json!({})));
    // The controller has not seen the newest spec yet.
    let unseen = deployment(
        2,
        2,
        1,
        json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}),
    );
    // An old replica is still there next to the new, ready one.
    let old_left = deployment(
        2,
        2,
        1,
        json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 2}),
    );
    // The new replica is loading the model.
    let loading = pod(
        "a",
        json!({"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
               "containerStatuses": [{"name": "engine", "image": "img", "imageID": "", "ready": false,
                   "restartCount": 0, "started": false, "state": {"running": {}}}]}),
    );
    let creating = pod("b", waiting("ContainerCreating", ""));
    for (d, pods) in [
        (unseen, vec![]),
        (old_left, vec![]),
        (rolling(), vec![loading, creating]),
    ] {
        let seen = see(&objects(Some(d), svc(), pods));
        assert_eq!(seen.state, WorkloadState::Starting, "{seen:?}");
        assert_eq!(seen.failure, None);
        assert_eq!(seen.address, None);
    }
}

#[test]
fn unschedulable_pods_are_pending_with_the_schedulers_message() {
    let message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.";
    let p = pod(
        "a",
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
               "reason": "Unschedulable", "message": message}]}),
    );
    let seen = see(&objects(Some(rolling()), None, vec![p]));
    assert_eq!(seen.state, WorkloadState::Pending);
    assert_eq!(failure(&seen), (FailureReason::Unschedulable, message));
    assert_eq!(seen.ready_replicas, 0);
}

#[test]
fn image_pull_errors_fail_with_the_image_and_the_registrys_words() {
    for reason in [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
    ] {
        let p = pod(
            "a",
            waiting(
                reason,
                "Back-off pulling image \"vllm/vllm-openai:v9\": not found",
            ),
        );
        let seen = see(&objects(Some(rolling()), None, vec![p]));
        assert_eq!(seen.state, WorkloadState::Failed, "{reason}");
        let (why, message) = failure(&seen);
        assert_eq!(why, FailureReason::ImagePull);
        assert!(message.contains(reason), "{message}");
        assert!(message.contains("\"vllm/vllm-openai:v9\""), "{message}");
        assert!(message.contains("not found"), "{message}");
        assert!(
            message.starts_with(&format!("pod {NAME}-5d8f9c7b6-a")),
            "{message}"
        );
    }
}

#[test]
fn an_oom_killed_crash_loop_keeps_starting_within_max_restarts_then_fails_out_of_memory() {
    let oom = |restarts| {
        pod(
            "a",
            crash_loop(restarts, json!({"exitCode": 137, "reason": "OOMKilled"})),
        )
    };
    // Within the limit the kubelet restarts it: starting, with the reason and its words.
    for restarts in [1, MAX_RESTARTS as i32] {
        let seen = see(&objects(Some(rolling()), None, vec![oom(restarts)]));
        assert_eq!(seen.state, WorkloadState::Starting, "{restarts} restarts");
        let (why, message) = failure(&seen);
        assert_eq!(why, FailureReason::OutOfMemory);
        assert!(message.contains("OOMKilled"), "{message}");
        assert!(message.contains("exit code 137"), "{message}");
        assert!(
            message.contains(&format!(
                "{restarts} restarts of the 5 engine.maxRestarts allows"
            )),
            "{message}"
        );
    }
    // One restart more than allowed: failed.
    let seen = see(&objects(Some(rolling()), None, vec![oom(6)]));
    assert_eq!(seen.state, WorkloadState::Failed);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::OutOfMemory);
    assert!(
        message.contains("6 restarts, more than the 5 engine.maxRestarts allows"),
        "{message}"
    );
    // The limit is the engine's setting, not a constant: with 0 the first restart fails it.
    let strict = observe(
        &objects(Some(rolling()), None, vec![oom(1)]),
        None,
        &resolver(K8sConfig::default()),
        ID,
        0,
    );
    assert_eq!(strict.state, WorkloadState::Failed);
}

#[test]
fn a_crash_loop_carries_the_last_exit_and_the_engines_last_words() {
    let crashing = |restarts| {
        pod(
            "a",
            crash_loop(
                restarts,
                json!({"exitCode": 1, "reason": "Error",
                       "message": "RuntimeError: CUDA error: no kernel image is available\n"}),
            ),
        )
    };
    let seen = see(&objects(Some(rolling()), None, vec![crashing(3)]));
    assert_eq!(seen.state, WorkloadState::Starting);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::CrashLoop);
    assert!(message.contains("3 restarts"), "{message}");
    assert!(message.contains("exit code 1 (Error)"), "{message}");
    assert!(
        message.ends_with("CUDA error: no kernel image is available"),
        "{message}"
    );
    let seen = see(&objects(Some(rolling()), None, vec![crashing(7)]));
    assert_eq!(seen.state, WorkloadState::Failed);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::CrashLoop);
    assert!(message.contains("7 restarts, more than the 5"), "{message}");
    assert!(
        message.ends_with("CUDA error: no kernel image is available"),
        "{message}"
    );

    // Backing off without a recorded exit still says crash loop.
    let p = pod(
        "a",
        json!({"phase": "Running", "containerStatuses": [{"name": "engine", "image": "img", "imageID": "",
            "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
    );
    let seen = see(&objects(Some(rolling()), None, vec![p]));
    assert_eq!(seen.state, WorkloadState::Starting);
    assert_eq!(failure(&seen).0, FailureReason::CrashLoop);
}

#[test]
fn a_crash_loop_within_the_limit_gives_way_to_a_failed_or_unschedulable_pod_and_to_the_deadline() {
    let crashing = pod(
        "a",
        crash_loop(1, json!({"exitCode": 1, "reason": "Error"})),
    );
    let pulling = pod("b", waiting("ImagePullBackOff", "not found"));
    let unschedulable = pod(
        "c",
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
               "reason": "Unschedulable", "message": "0/1 nodes are available"}]}),
    );
    let seen = see(&objects(
        Some(rolling()),
        None,
        vec![crashing.clone(), pulling],
    ));
    assert_eq!(
        (seen.state, failure(&seen).0),
        (WorkloadState::Failed, FailureReason::ImagePull)
    );
    let seen = see(&objects(
        Some(rolling()),
        None,
        vec![crashing.clone(), unschedulable],
    ));
    assert_eq!(
        (seen.state, failure(&seen).0),
        (WorkloadState::Pending, FailureReason::Unschedulable)
    );
    // A passed progress deadline is final even while the kubelet still restarts.
    let expired = deployment(
        1,
        1,
        1,
        json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
               "conditions": [{"type": "Progressing", "status": "False",
                               "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}),
    );
    let seen = see(&objects(Some(expired), None, vec![crashing]));
    assert_eq!(
        (seen.state, failure(&seen).0),
        (WorkloadState::Failed, FailureReason::StartupTimeout)
    );
}

#[test]
fn a_missing_program_is_binary_not_found() {
    let start_error = pod(
        "a",
        crash_loop(
            2,
            json!({"exitCode": 128, "reason": "StartError",
                   "message": "failed to create containerd task: exec: \"vllm\": executable file not found in $PATH"}),
        ),
    );
    let run_error = pod(
        "a",
        waiting(
            "RunContainerError",
            "exec: \"sglang\": executable file not found in $PATH",
        ),
    );
    for p in [start_error, run_error] {
        let seen = see(&objects(Some(rolling()), None, vec![p]));
        assert_eq!(seen.state, WorkloadState::Failed);
        let (why, message) = failure(&seen);
        assert_eq!(why, FailureReason::BinaryNotFound, "{message}");
        assert!(message.contains("executable file not found"), "{message}");
    }
}

#[test]
fn a_container_that_cannot_be_created_fails() {
    let p = pod(
        "a",
        waiting(
            "CreateContainerConfigError",
            "secret \"hf-token\" not found",
        ),
    );
    let seen = see(&objects(Some(rolling()), None, vec![p]));
    assert_eq!(seen.state, WorkloadState::Failed);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::RuntimeError);
    assert!(
        message.contains("CreateContainerConfigError: secret \"hf-token\" not found"),
        "{message}"
    );
}

#[test]
fn a_passed_progress_deadline_is_a_startup_timeout() {
    let d = deployment(
        1,
        1,
        1,
        json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "unavailableReplicas": 1,
               "conditions": [
                   {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
                   {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet \"xmod-qwen-1a2b3c4d-5d8f9c7b6\" has timed out progressing."}]}),
    );
    let seen = see(&objects(Some(d), None, vec![]));
    assert_eq!(seen.state, WorkloadState::Failed);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::StartupTimeout);
    assert!(message.contains("ProgressDeadlineExceeded"), "{message}");
    assert!(message.contains("has timed out progressing"), "{message}");
}

#[test]
fn replica_failures_wait_for_quota_and_fail_on_refusals() {
    let with = |message: &str| {
        deployment(
            1,
            1,
            1,
            json!({"observedGeneration": 1, "conditions": [{"type": "ReplicaFailure", "status": "True",
                   "reason": "FailedCreate", "message": message}]}),
        )
    };
    let quota = see(&objects(
        Some(with(
            "pods \"x\" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1",
        )),
        None,
        vec![],
    ));
    assert_eq!(quota.state, WorkloadState::Pending);
    assert_eq!(failure(&quota).0, FailureReason::Unschedulable);
    let refused = see(&objects(
        Some(with(
            "pods \"x\" is forbidden: violates PodSecurity \"restricted:latest\"",
        )),
        None,
        vec![],
    ));
    assert_eq!(refused.state, WorkloadState::Failed);
    assert!(
        failure(&refused).1.contains("FailedCreate: pods"),
        "{refused:?}"
    );
}

#[test]
fn a_failing_pod_outranks_a_pending_one_and_stale_pods_say_nothing() {
    let unschedulable = pod(
        "a",
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no room"}]}),
    );
    let pulling = pod("b", waiting("ImagePullBackOff", "nope"));
    let seen = see(&objects(
        Some(rolling()),
        None,
        vec![unschedulable.clone(), pulling],
    ));
    assert_eq!(failure(&seen).0, FailureReason::ImagePull);

    // A terminating pod, a finished one and one of another Deployment are ignored.
    let mut terminating = pod("c", waiting("ImagePullBackOff", "old"));
    terminating.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        ));
    let evicted = pod(
        "d",
        json!({"phase": "Failed", "reason": "Evicted",
        "containerStatuses": [{"name": "engine", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
    );
    let mut other: Pod = pod("e", waiting("ErrImagePull", "other"));
    other.metadata.name = Some("xmod-other-9f9f9f9f-5d8f9c7b6-e".into());
    let seen = see(&objects(
        Some(rolling()),
        None,
        vec![terminating, evicted, other],
    ));
    assert_eq!((seen.state, seen.failure), (WorkloadState::Starting, None));
}

#[test]
fn our_own_apply_not_yet_in_the_view_reads_as_starting() {
    let r = resolver(K8sConfig::default());
    let fresh = ApplyMark {
        object_generation: 1,
        spec_generation: 4,
        replicas: 2,
        seen: false,
        in_flight: false,
    };
    // Created, but the watch has not delivered it.
    let seen = observe(
        &ServiceObjects::default(),
        Some(&fresh),
        &r,
        ID,
        MAX_RESTARTS,
    );
    assert_eq!(seen.state, WorkloadState::Starting);
    assert_eq!((seen.desired_replicas, seen.generation), (2, Some(4)));
    // Updated: the view still shows the previous, ready spec.
    let updated = ApplyMark {
        object_generation: 2,
        ..fresh
    };
    let o = objects(
        Some(rolled_out(1)),
        Some(service(json!({}), json!({}))),
        vec![],
    );
    let seen = observe(&o, Some(&updated), &r, ID, MAX_RESTARTS);
    assert_eq!(seen.state, WorkloadState::Starting);
    assert_eq!(seen.generation, Some(4));
    // While an apply is under way nothing is concluded.
    let in_flight = ApplyMark {
        in_flight: true,
        seen: true,
        object_generation: 1,
        ..fresh
    };
    assert_eq!(
        observe(&o, Some(&in_flight), &r, ID, MAX_RESTARTS).state,
        WorkloadState::Starting
    );
    // Seen at its generation: the view is current.
    let current = ApplyMark {
        seen: true,
        ..fresh
    };
    assert_eq!(
        observe(&o, Some(&current), &r, ID, MAX_RESTARTS).state,
        WorkloadState::Ready
    );
}

#[test]
fn drift_reads_as_missing_or_changed() {
    let r = resolver(K8sConfig::default());
    let applied = ApplyMark::adopted(1, 1, 1);
    // Deleted behind the shim's back.
    let seen = observe(
        &ServiceObjects::default(),
        Some(&applied),
        &r,
        ID,
        MAX_RESTARTS,
    );
    assert_eq!(seen, WorkloadObservation::missing());
    // Being deleted (foreground) counts as gone.
    let mut deleting = rolled_out(1);
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        ));
    let seen = observe(
        &objects(Some(deleting), None, vec![]),
        Some(&applied),
        &r,
        ID,
        MAX_RESTARTS,
    );
    assert_eq!(seen.state, WorkloadState::Missing);
    // Edited (kubectl scale, kubectl edit): its generation moved past ours.
    let mut edited = rolled_out(3);
    edited.metadata.generation = Some(2);
    let o = objects(Some(edited), Some(service(json!({}), json!({}))), vec![]);
    let seen = observe(&o, Some(&applied), &r, ID, MAX_RESTARTS);
    assert_eq!(seen.state, WorkloadState::Starting);
    let (why, message) = failure(&seen);
    assert_eq!(why, FailureReason::RuntimeError);
    assert!(message.contains("changed outside xmod-shim"), "{message}");
    // The Service deleted.
    let o = objects(Some(rolled_out(1)), None, vec![]);
    let seen = observe(&o, Some(&applied), &r, ID, MAX_RESTARTS);
    assert_eq!(seen.state, WorkloadState::Starting);
    assert_eq!(failure(&seen).0, FailureReason::WorkloadMissing);
}

#[test]
fn scaled_to_zero_is_ready_without_an_address() {
    let o = objects(
        Some(deployment(1, 1, 0, json!({"observedGeneration": 1}))),
        Some(service(json!({}), json!({}))),
        vec![],
    );
    let seen = see(&o);
    assert_eq!(seen.state, WorkloadState::Ready);
    assert_eq!((seen.desired_replicas, seen.address), (0, None));
}

#[test]
fn the_newest_of_two_deployments_counts_after_a_rename() {
    let mut old = rolled_out(1);
    old.metadata.name = Some("xmod-old-1a2b3c4d".into());
    let new = deployment(1, 2, 1, json!({"observedGeneration": 1}));
    let o = objects(Some(new), Some(service(json!({}), json!({}))), vec![]);
    let mut o = o;
    o.deployments.insert(old.into());
    let seen = see(&o);
    assert_eq!(
        (seen.state, seen.generation),
        (WorkloadState::Starting, Some(2))
    );
}

#[test]
fn node_port_endpoints_use_the_configured_address_or_the_pods_node() {
    let config = K8sConfig {
        service_type: ServiceType::NodePort,
        ..K8sConfig::default()
    };
    let svc = service(
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 8000, "nodePort": 31234}]}),
        json!({}),
    );
    let o = objects(
        Some(rolled_out(1)),
        Some(svc.clone()),
        vec![ready_pod("a", "10.0.0.7")],
    );
    let seen = observe(&o, None, &resolver(config.clone()), ID, MAX_RESTARTS);
    assert_eq!(seen.address.as_deref(), Some("http://10.0.0.7:31234"));
    let fixed = K8sConfig {
        node_address: Some("gpu.example.com".into()),
        ..config.clone()
    };
    let seen = observe(&o, None, &resolver(fixed), ID, MAX_RESTARTS);
    assert_eq!(
        seen.address.as_deref(),
        Some("http://gpu.example.com:31234")
    );
    let v6 = objects(
        Some(rolled_out(1)),
        Some(svc),
        vec![ready_pod("a", "fd00::7")],
    );
    let seen = observe(&v6, None, &resolver(config.clone()), ID, MAX_RESTARTS);
    assert_eq!(seen.address.as_deref(), Some("http://[fd00::7]:31234"));
    // No node port assigned yet: not ready to be called.
    let unassigned = objects(
        Some(rolled_out(1)),
        Some(service(json!({"type": "NodePort"}), json!({}))),
        vec![ready_pod("a", "10.0.0.7")],
    );
    let seen = observe(&unassigned, None, &resolver(config), ID, MAX_RESTARTS);
    assert_eq!((seen.state, seen.address), (WorkloadState::Starting, None));
}

#[test]
fn load_balancer_endpoints_wait_for_the_ingress_address() {
    let config = K8sConfig {
        service_type: ServiceType::LoadBalancer,
        ..K8sConfig::default()
    };
    let pending = objects(
        Some(rolled_out(1)),
        Some(service(
            json!({"type": "LoadBalancer"}),
            json!({"loadBalancer": {}}),
        )),
        vec![],
    );
    let seen = observe(&pending, None, &resolver(config.clone()), ID, MAX_RESTARTS);
    assert_eq!(seen.state, WorkloadState::Starting);
    for (ingress, address) in [
        (json!({"ip": "203.0.113.9"}), "http://203.0.113.9:8000"),
        (
            json!({"hostname": "lb.example.com"}),
            "http://lb.example.com:8000",
        ),
    ] {
        let assigned = objects(
            Some(rolled_out(1)),
            Some(service(
                json!({"type": "LoadBalancer"}),
                json!({"loadBalancer": {"ingress": [ingress]}}),
            )),
            vec![],
        );
        let seen = observe(&assigned, None, &resolver(config.clone()), ID, MAX_RESTARTS);
        assert_eq!(seen.state, WorkloadState::Ready);
        assert_eq!(seen.address.as_deref(), Some(address));
    }
}

#[test]
fn external_endpoints_fill_in_the_base_url() {
    let config = K8sConfig {
        external_base_url: Some("https://llm.example.com/{namespace}/{serviceId}/{name}/".into()),
        ..K8sConfig::default()
    };
    let o = objects(
        Some(rolled_out(1)),
        Some(service(json!({}), json!({}))),
        vec![],
    );
    let seen = observe(&o, None, &resolver(config), ID, MAX_RESTARTS);
    assert_eq!(
        seen.address.as_deref(),
        Some("https://llm.example.com/models/1a2b3c4d/xmod-qwen-1a2b3c4d")
    );
}

#[test]
fn a_custom_cluster_domain_is_used() {
    let config = K8sConfig {
        cluster_domain: "corp.internal".into(),
        ..K8sConfig::default()
    };
    let o = objects(
        Some(rolled_out(1)),
        Some(service(json!({}), json!({}))),
        vec![],
    );
    let seen = observe(&o, None, &resolver(config), ID, MAX_RESTARTS);
    assert_eq!(
        seen.address.as_deref(),
        Some("http://xmod-qwen-1a2b3c4d.models.svc.corp.internal:8000")
    );
}

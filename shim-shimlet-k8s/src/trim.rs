//! What the view keeps of a watched object: the fields [`crate::status`] and the view read, so
//! 1,000 services do not cost 1,000 pod templates, managed-field lists and container specs.
//!
//! Kept: `metadata` name, namespace, uid, resourceVersion, generation, deletionTimestamp, labels
//! and the `xmod-shim/*` annotations; a Deployment's `spec.replicas` and whole `status`; a
//! Service's `spec.ports` and `spec.type` and whole `status`; a Pod's `status` phase, host IP,
//! conditions and per-container name, image, ready, restart count and states. Everything else
//! goes (a Pod's whole `spec`, a Deployment's pod template). `tests` checks that a trimmed
//! object reads exactly as the whole one for every status rule.

use std::any::Any;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

/// Annotations with this prefix are the shim's own, the only ones kept.
const OWN_ANNOTATIONS: &str = "xmod-shim/";

/// Trims `object` to what the view reads (see the [module docs](self)); kinds other than
/// Deployment, Service and Pod lose only their metadata's extras.
pub(crate) fn trim<K: Resource + Any>(mut object: K) -> K {
    let any: &mut dyn Any = &mut object;
    if let Some(deployment) = any.downcast_mut::<Deployment>() {
        trim_deployment(deployment);
    } else if let Some(service) = any.downcast_mut::<Service>() {
        trim_service(service);
    } else if let Some(pod) = any.downcast_mut::<Pod>() {
        trim_pod(pod);
    } else {
        trim_meta(object.meta_mut());
    }
    object
}

fn trim_meta(meta: &mut ObjectMeta) {
    let whole = std::mem::take(meta);
    *meta = ObjectMeta {
        name: whole.name,
        namespace: whole.namespace,
        uid: whole.uid,
        resource_version: whole.resource_version,
        generation: whole.generation,
        deletion_timestamp: whole.deletion_timestamp,
        labels: whole.labels,
        annotations: whole.annotations.and_then(|a| {
            let own: std::collections::BTreeMap<String, String> = a
                .into_iter()
                .filter(|(k, _)| k.starts_with(OWN_ANNOTATIONS))
                .collect();
            (!own.is_empty()).then_some(own)
        }),
        ..ObjectMeta::default()
    };
}

fn trim_deployment(deployment: &mut Deployment) {
    trim_meta(&mut deployment.metadata);
    if let Some(spec) = &mut deployment.spec {
        *spec = DeploymentSpec {
            replicas: spec.replicas,
            ..DeploymentSpec::default()
        };
    }
}

fn trim_service(service: &mut Service) {
    trim_meta(&mut service.metadata);
    if let Some(spec) = &mut service.spec {
        *spec = ServiceSpec {
            ports: spec.ports.take(),
            type_: spec.type_.take(),
            ..ServiceSpec::default()
        };
    }
}

fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata);
    pod.spec = None;
    if let Some(status) = &mut pod.status {
        let containers = |list: Option<Vec<ContainerStatus>>| {
            list.map(|l| l.into_iter().map(trim_container).collect())
        };
        *status = PodStatus {
            phase: status.phase.take(),
            host_ip: status.host_ip.take(),
            conditions: status.conditions.take(),
            container_statuses: containers(status.container_statuses.take()),
            init_container_statuses: containers(status.init_container_statuses.take()),
            ..PodStatus::default()
        };
    }
}

fn trim_container(whole: ContainerStatus) -> ContainerStatus {
    ContainerStatus {
        name: whole.name,
        image: whole.image,
        ready: whole.ready,
        restart_count: whole.restart_count,
        state: whole.state,
        last_state: whole.last_state,
        ..ContainerStatus::default()
    }
}

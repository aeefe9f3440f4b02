//! Rendering a [`WorkloadSpec`] into the Deployment and Service that `apply` sends. Pure: the
//! same workload and settings always give the same manifests, which is what makes server-side
//! apply idempotent and the dry run exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, HostPathVolumeSource,
    LocalObjectReference, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use shim_core::{FailureReason, ModelVolume, ShimletError, WorkloadSpec};

use crate::config::K8sConfig;
use crate::names::{
    ANNOTATION_GENERATION, ANNOTATION_MODEL, CONTAINER_NAME, PORT_NAME, is_label_value,
    object_name, selector_labels,
};

/// Name of the model volume in the pod.
const MODEL_VOLUME: &str = "model";
/// Name of the shared-memory volume in the pod.
const SHM_VOLUME: &str = "dshm";
/// Seconds the readiness probe may take to answer: a busy engine answers `/health` slowly, and
/// one slow answer must not take it out of the Service.
const PROBE_TIMEOUT_SECS: i32 = 5;
/// Consecutive failed readiness probes before a ready replica leaves the Service.
const READINESS_FAILURES: i32 = 3;
/// ReplicaSets kept for `kubectl rollout undo`; each holds no pods, so a few are cheap.
const REVISION_HISTORY: i32 = 3;

/// The objects one workload becomes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifests {
    /// Name shared by the Deployment and the Service.
    pub name: String,
    /// Runs the replicas.
    pub deployment: Deployment,
    /// Gives them one stable address.
    pub service: Service,
}

impl Manifests {
    /// Makes both objects dependents of ModelService `owner` (uid `uid`), so the cluster's
    /// garbage collector removes them with it, also when no shim runs. `blockOwnerDeletion`
    /// stays off: setting it needs rights on the owner's finalizers, and the shim's own finalizer
    /// already holds a deleted ModelService until the teardown is done.
    pub fn owned_by(&mut self, owner: &str, uid: &str) {
        let reference = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
            kind: "ModelService".into(),
            name: owner.into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        self.deployment.metadata.owner_references = Some(vec![reference.clone()]);
        self.service.metadata.owner_references = Some(vec![reference]);
    }

    /// Both objects as a Kubernetes `List`, ready for `kubectl apply -f -`.
    pub fn to_list(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [self.deployment, self.service],
        })
    }
}

/// Turns workloads into manifests with the shimlet's configuration.
#[derive(Debug, Clone)]
pub struct Renderer {
    config: K8sConfig,
    namespace: String,
    model_root: PathBuf,
    /// The model root with symlinks resolved: the pipeline hands over canonical model paths.
    model_root_real: Option<PathBuf>,
}

impl Renderer {
    /// A renderer for `namespace`; `model_root` is the engine's model root (model paths below it
    /// map to `modelVolume.hostRoot` or into the claim).
    pub fn new(config: K8sConfig, namespace: impl Into<String>, model_root: PathBuf) -> Self {
        let model_root_real = std::fs::canonicalize(&model_root).ok();
        Self {
            config,
            namespace: namespace.into(),
            model_root,
            model_root_real,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &K8sConfig {
        &self.config
    }

    /// The namespace objects go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Deployment and Service for `workload`.
    ///
    /// # Errors
    /// [`FailureReason::InvalidSpec`] for a service id that cannot be a label value, an image
    /// missing, or a model directory outside the model root when a claim or `hostRoot` is used.
    pub fn render(&self, workload: &WorkloadSpec) -> Result<Manifests, ShimletError> {
        let invalid = |m: String| ShimletError::permanent(FailureReason::InvalidSpec, m);
        if !is_label_value(&workload.service_id) || workload.service_id.is_empty() {
            return Err(invalid(format!(
                "service id {:?} cannot be a Kubernetes label value (letters, digits, '-', '_', '.', at most 63)",
                workload.service_id
            )));
        }
        if workload.image.trim().is_empty() {
            return Err(invalid("the Kubernetes shimlet needs an image".into()));
        }
        let name = object_name(&workload.service_id, &workload.model_name);
        let selector = selector_labels(&workload.service_id);
        // The workload's own labels first, so they can never override the selector's.
        let mut labels = workload.labels.clone();
        labels.extend(selector.clone());
        let annotations = BTreeMap::from([
            (ANNOTATION_MODEL.to_string(), workload.model_name.clone()),
            (
                ANNOTATION_GENERATION.to_string(),
                workload.generation.to_string(),
            ),
        ]);
        let metadata = ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        };
        let (volumes, mounts) = self.volumes(workload)?;
        let model_dir = workload
            .model
            .as_ref()
            .map(|m| m.mount_path.display().to_string())
            .unwrap_or_default();
        let container = Container {
            name: CONTAINER_NAME.into(),
            image: Some(workload.image.clone()),
            image_pull_policy: self.config.image_pull_policy.map(|p| p.as_str().into()),
            command: (!workload.entrypoint.is_empty()).then(|| workload.entrypoint.clone()),
            args: Some(workload.render_args("0.0.0.0", workload.port, &model_dir)),
            env: (!workload.env.is_empty()).then(|| {
                workload
                    .env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: Some(value.clone()),
                        value_from: None,
                    })
                    .collect()
            }),
            ports: Some(vec![ContainerPort {
                name: Some(PORT_NAME.into()),
                container_port: i32::from(workload.port),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            resources: Some(self.resources(workload)),
            volume_mounts: (!mounts.is_empty()).then_some(mounts),
            readiness_probe: Some(readiness_probe(workload)),
            startup_probe: Some(self.startup_probe(workload)),
            // A crashing engine's last log lines become its termination message, so the failure
            // reason shows the engine's own words (a CUDA error, a missing model file).
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        };
        let pod = PodSpec {
            containers: vec![container],
            volumes: (!volumes.is_empty()).then_some(volumes),
            node_selector: (!self.config.node_selector.is_empty())
                .then(|| self.config.node_selector.clone()),
            tolerations: (!self.config.tolerations.is_empty())
                .then(|| self.config.tolerations.clone()),
            image_pull_secrets: (!self.config.image_pull_secrets.is_empty()).then(|| {
                self.config
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            // Engines never call the Kubernetes API, so they get no token.
            automount_service_account_token: Some(false),
            // Kubernetes would inject seven variables per Service in the namespace into every
            // engine (thousands with many models), and vLLM misreads `*_PORT` variables.
            enable_service_links: Some(false),
            ..PodSpec::default()
        };
        let startup_secs = workload.health.startup_timeout.as_secs();
        let deployment = Deployment {
            metadata: metadata.clone(),
            spec: Some(DeploymentSpec {
                replicas: Some(i32::try_from(workload.replicas).unwrap_or(i32::MAX)),
                selector: LabelSelector {
                    match_labels: Some(selector.clone()),
                    match_expressions: None,
                },
                // The start-up probe allows `startup_secs`; scheduling and pulling a large image
                // come before it, so the deadline is longer still. Reaching it means stuck.
                progress_deadline_seconds: Some(clamp_i32(
                    startup_secs + u64::from(self.config.progress_deadline_margin_secs),
                )),
                revision_history_limit: Some(REVISION_HISTORY),
                strategy: (workload.resources.accelerators > 0).then(gpu_strategy),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        // Not the generation: an update that changes nothing in the pod must not
                        // restart engines that take minutes to load.
                        annotations: Some(BTreeMap::from([(
                            ANNOTATION_MODEL.to_string(),
                            workload.model_name.clone(),
                        )])),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(pod),
                },
                ..DeploymentSpec::default()
            }),
            status: None,
        };
        let service = Service {
            metadata,
            spec: Some(ServiceSpec {
                type_: Some(self.config.service_type.as_str().into()),
                selector: Some(selector),
                ports: Some(vec![ServicePort {
                    name: Some(PORT_NAME.into()),
                    port: i32::from(workload.port),
                    target_port: Some(IntOrString::String(PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        Ok(Manifests {
            name,
            deployment,
            service,
        })
    }

    /// Requests and limits: cpu and memory as asked for (limits equal to requests, so an engine
    /// gets what it was promised and no more), accelerators as the configured extended resource
    /// (a limit; Kubernetes sets the request to match).
    fn resources(&self, workload: &WorkloadSpec) -> ResourceRequirements {
        let mut amounts = BTreeMap::new();
        if let Some(cpu) = &workload.resources.cpu {
            amounts.insert("cpu".to_string(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &workload.resources.memory {
            amounts.insert("memory".to_string(), Quantity(memory.clone()));
        }
        let mut limits = amounts.clone();
        if workload.resources.accelerators > 0 {
            limits.insert(
                self.config.accelerator_resource.trim().to_string(),
                Quantity(workload.resources.accelerators.to_string()),
            );
        }
        ResourceRequirements {
            requests: (!amounts.is_empty()).then_some(amounts),
            limits: (!limits.is_empty()).then_some(limits),
            ..ResourceRequirements::default()
        }
    }

    /// The start-up probe gives the engine its whole start-up budget to load the model:
    /// `failureThreshold × periodSeconds ≥ startup_timeout`. Readiness only counts after it.
    fn startup_probe(&self, workload: &WorkloadSpec) -> Probe {
        let period = u64::from(self.config.startup_probe_period_secs.max(1));
        let budget = workload.health.startup_timeout.as_secs().max(1);
        Probe {
            http_get: Some(http_get(&workload.health.path)),
            period_seconds: Some(clamp_i32(period)),
            failure_threshold: Some(clamp_i32(budget.div_ceil(period).max(1))),
            timeout_seconds: Some(PROBE_TIMEOUT_SECS),
            ..Probe::default()
        }
    }

    fn volumes(
        &self,
        workload: &WorkloadSpec,
    ) -> Result<(Vec<Volume>, Vec<VolumeMount>), ShimletError> {
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        if let Some(model) = &workload.model {
            let (volume, mount) = self.model_volume(model)?;
            volumes.push(volume);
            mounts.push(mount);
        }
        if let Some(size) = &self.config.shm_size {
            volumes.push(Volume {
                name: SHM_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(Quantity(size.clone())),
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: SHM_VOLUME.into(),
                mount_path: "/dev/shm".into(),
                ..VolumeMount::default()
            });
        }
        Ok((volumes, mounts))
    }

    /// The model directory as a hostPath (default) or a claim's sub-path.
    fn model_volume(&self, model: &ModelVolume) -> Result<(Volume, VolumeMount), ShimletError> {
        let settings = &self.config.model_volume;
        let relative = self.under_model_root(&model.host_path);
        let outside = |what: &str| {
            ShimletError::permanent(
                FailureReason::InvalidSpec,
                format!(
                    "model directory {} is outside the model root {}, so it has no place in {what}",
                    model.host_path.display(),
                    self.model_root.display()
                ),
            )
        };
        let mut mount = VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: model.mount_path.display().to_string(),
            read_only: Some(settings.read_only),
            ..VolumeMount::default()
        };
        let volume = if let Some(claim) = &settings.pvc {
            let relative = relative.ok_or_else(|| outside(&format!("claim {claim}")))?;
            let relative = relative.display().to_string();
            let sub_path = settings
                .sub_path
                .as_deref()
                .unwrap_or("{model}")
                .replace("{model}", &relative);
            let sub_path = sub_path.trim_matches('/').to_string();
            mount.sub_path = (!sub_path.is_empty()).then_some(sub_path);
            Volume {
                name: MODEL_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(settings.read_only),
                }),
                ..Volume::default()
            }
        } else {
            let path = match &settings.host_root {
                Some(root) => {
                    let relative = relative.ok_or_else(|| {
                        outside(&format!("modelVolume.hostRoot {}", root.display()))
                    })?;
                    root.join(relative)
                }
                None => model.host_path.clone(),
            };
            Volume {
                name: MODEL_VOLUME.into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.display().to_string(),
                    type_: (!settings.host_path_type.is_empty())
                        .then(|| settings.host_path_type.clone()),
                }),
                ..Volume::default()
            }
        };
        Ok((volume, mount))
    }

    /// `path` relative to the model root (as given, or with symlinks resolved).
    fn under_model_root(&self, path: &Path) -> Option<PathBuf> {
        [Some(&self.model_root), self.model_root_real.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|root| path.strip_prefix(root).ok())
            .map(Path::to_path_buf)
    }
}

/// Readiness: the engine's own health path, checked every probe period (at least a second, the
/// API's resolution).
fn readiness_probe(workload: &WorkloadSpec) -> Probe {
    Probe {
        http_get: Some(http_get(&workload.health.path)),
        period_seconds: Some(clamp_i32(ceil_secs(workload.health.period).clamp(1, 30))),
        failure_threshold: Some(READINESS_FAILURES),
        timeout_seconds: Some(PROBE_TIMEOUT_SECS),
        ..Probe::default()
    }
}

fn http_get(path: &str) -> HTTPGetAction {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    HTTPGetAction {
        path: Some(path),
        port: IntOrString::String(PORT_NAME.into()),
        scheme: Some("HTTP".into()),
        ..HTTPGetAction::default()
    }
}

/// One replica at a time and never an extra one: a GPU node rarely has room for a second copy
/// of a model, so a surge pod would sit unschedulable and stall the rollout.
fn gpu_strategy() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(0)),
            max_unavailable: Some(IntOrString::Int(1)),
        }),
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_millis().div_ceil(1000) as u64
}

fn clamp_i32(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelVolumeConfig, PullPolicy, ServiceType};

    fn workload() -> WorkloadSpec {
        let mut w = WorkloadSpec::new("1a2b3c4d", 3, "vllm/vllm-openai:v0.9");
        w.model_name = "Qwen2.5-7B".into();
        w.entrypoint = vec!["vllm".into(), "serve".into()];
        w.args = ["{model_dir}", "--host", "{host}", "--port", "{port}"]
            .map(String::from)
            .to_vec();
        w.env.insert("HF_HUB_OFFLINE".into(), "1".into());
        w.resources.cpu = Some("4".into());
        w.resources.memory = Some("16Gi".into());
        w.resources.accelerators = 2;
        w.model = Some(ModelVolume {
            host_path: "/srv/models/qwen".into(),
            mount_path: "/models/model".into(),
        });
        w.health.path = "/health".into();
        w.health.period = Duration::from_millis(250);
        w.health.startup_timeout = Duration::from_secs(1800);
        w.replicas = 2;
        w.labels.insert("xmod-shim/engine".into(), "vllm".into());
        w
    }

    fn renderer(config: K8sConfig) -> Renderer {
        Renderer::new(config, "models", "/srv/models".into())
    }

    #[test]
    fn a_gpu_workload_becomes_a_deployment_and_service() {
        let m = renderer(K8sConfig::default()).render(&workload()).unwrap();
        assert_eq!(m.name, "xmod-qwen2-5-7b-1a2b3c4d");
        let d = serde_json::to_value(&m.deployment).unwrap();
        assert_eq!(d["apiVersion"], "apps/v1");
        assert_eq!(d["kind"], "Deployment");
        assert_eq!(d["metadata"]["namespace"], "models");
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "xmod-shim"
        );
        assert_eq!(d["metadata"]["labels"]["xmod-shim/service-id"], "1a2b3c4d");
        assert_eq!(d["metadata"]["labels"]["xmod-shim/engine"], "vllm");
        assert_eq!(d["metadata"]["annotations"]["xmod-shim/generation"], "3");
        assert_eq!(
            d["metadata"]["annotations"]["xmod-shim/model-name"],
            "Qwen2.5-7B"
        );
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 2);
        assert_eq!(
            spec["selector"]["matchLabels"],
            serde_json::json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": "1a2b3c4d"})
        );
        assert_eq!(spec["progressDeadlineSeconds"], 1800 + 900);
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 0);
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["enableServiceLinks"], false);
        assert_eq!(pod["automountServiceAccountToken"], false);
        let c = &pod["containers"][0];
        assert_eq!(c["name"], "engine");
        assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
        assert_eq!(c["image"], "vllm/vllm-openai:v0.9");
        assert!(c.get("imagePullPolicy").is_none());
        assert_eq!(c["command"], serde_json::json!(["vllm", "serve"]));
        assert_eq!(
            c["args"],
            serde_json::json!(["/models/model", "--host", "0.0.0.0", "--port", "8000"])
        );
        assert_eq!(
            c["env"],
            serde_json::json!([{"name": "HF_HUB_OFFLINE", "value": "1"}])
        );
        assert_eq!(
            c["ports"],
            serde_json::json!([{"name": "http", "containerPort": 8000, "protocol": "TCP"}])
        );
        assert_eq!(
            c["resources"],
            serde_json::json!({
                "requests": {"cpu": "4", "memory": "16Gi"},
                "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
            })
        );
        assert_eq!(
            c["readinessProbe"],
            serde_json::json!({"httpGet": {"path": "/health", "port": "http", "scheme": "HTTP"},
                "periodSeconds": 1, "failureThreshold": 3, "timeoutSeconds": 5})
        );
        let startup = &c["startupProbe"];
        assert_eq!(startup["periodSeconds"], 10);
        assert_eq!(startup["failureThreshold"], 180);
        assert_eq!(
            c["volumeMounts"],
            serde_json::json!([{"name": "model", "mountPath": "/models/model", "readOnly": true}])
        );
        assert_eq!(
            pod["volumes"],
            serde_json::json!([{"name": "model", "hostPath": {"path": "/srv/models/qwen", "type": "Directory"}}])
        );
        assert!(pod.get("nodeSelector").is_none());
        assert!(
            spec["template"]["metadata"]["annotations"]
                .get("xmod-shim/generation")
                .is_none(),
            "a new generation alone must not restart pods"
        );

        let s = serde_json::to_value(&m.service).unwrap();
        assert_eq!(s["apiVersion"], "v1");
        assert_eq!(s["kind"], "Service");
        assert_eq!(s["metadata"]["name"], m.name);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["selector"], spec["selector"]["matchLabels"]);
        assert_eq!(
            s["spec"]["ports"],
            serde_json::json!([{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}])
        );
        let list = m.to_list();
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][0]["kind"], "Deployment");
        assert_eq!(list["items"][1]["kind"], "Service");
    }

    #[test]
    fn the_startup_budget_is_always_covered() {
        for (budget, period) in [(1800, 10), (120, 7), (1, 10), (0, 3), (59, 60)] {
            let mut w = workload();
            w.health.startup_timeout = Duration::from_secs(budget);
            let config = K8sConfig {
                startup_probe_period_secs: period,
                ..K8sConfig::default()
            };
            let m = renderer(config).render(&w).unwrap();
            let probe = m.deployment.spec.unwrap().template.spec.unwrap().containers[0]
                .startup_probe
                .clone()
                .unwrap();
            let total = probe.failure_threshold.unwrap() * probe.period_seconds.unwrap();
            assert!(
                i64::from(total) >= budget as i64,
                "{budget}/{period}: {total}"
            );
            assert!(total < budget as i32 + period as i32 + 1);
        }
    }

    #[test]
    fn config_reaches_the_pod() {
        let config: K8sConfig = serde_json::from_value(serde_json::json!({
            "acceleratorResource": "amd.com/gpu",
            "serviceType": "NodePort",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullPolicy": "IfNotPresent",
            "imagePullSecrets": ["regcred"],
            "shmSize": "8Gi",
            "modelVolume": {"hostRoot": "/mnt/models", "hostPathType": "DirectoryOrCreate", "readOnly": false},
        }))
        .unwrap();
        assert_eq!(config.image_pull_policy, Some(PullPolicy::IfNotPresent));
        let m = renderer(config).render(&workload()).unwrap();
        let d = serde_json::to_value(&m.deployment).unwrap();
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"], serde_json::json!({"pool": "gpu"}));
        assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(
            pod["imagePullSecrets"],
            serde_json::json!([{"name": "regcred"}])
        );
        let c = &pod["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["resources"]["limits"]["amd.com/gpu"], "2");
        assert_eq!(
            pod["volumes"],
            serde_json::json!([
                {"name": "model", "hostPath": {"path": "/mnt/models/qwen", "type": "DirectoryOrCreate"}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            ])
        );
        assert_eq!(c["volumeMounts"][0]["readOnly"], false);
        assert_eq!(
            c["volumeMounts"][1],
            serde_json::json!({"name": "dshm", "mountPath": "/dev/shm"})
        );
        let s = serde_json::to_value(&m.service).unwrap();
        assert_eq!(s["spec"]["type"], ServiceType::NodePort.as_str());
    }

    #[test]
    fn a_claim_mounts_the_models_sub_path() {
        let config = K8sConfig {
            model_volume: ModelVolumeConfig {
                pvc: Some("models".into()),
                sub_path: Some("llm/{model}".into()),
                ..ModelVolumeConfig::default()
            },
            ..K8sConfig::default()
        };
        let m = renderer(config.clone()).render(&workload()).unwrap();
        let pod = serde_json::to_value(m.deployment.spec.unwrap().template.spec.unwrap()).unwrap();
        assert_eq!(
            pod["volumes"],
            serde_json::json!([{"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": true}}])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0]["subPath"],
            "llm/qwen"
        );

        let mut outside = workload();
        outside.model.as_mut().unwrap().host_path = "/elsewhere/qwen".into();
        let err = renderer(config).render(&outside).unwrap_err();
        assert_eq!(err.reason, FailureReason::InvalidSpec);
        assert!(
            err.message.contains("outside the model root"),
            "{}",
            err.message
        );
    }

    #[test]
    fn cpu_only_workloads_keep_the_default_strategy_and_no_gpu_limit() {
        let mut w = workload();
        w.resources = shim_core::Resources::default();
        w.model = None;
        w.entrypoint.clear();
        w.env.clear();
        let m = renderer(K8sConfig::default()).render(&w).unwrap();
        let d = serde_json::to_value(&m.deployment).unwrap();
        assert!(d["spec"].get("strategy").is_none());
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["resources"], serde_json::json!({}));
        assert!(c.get("command").is_none(), "the image's entrypoint runs");
        assert!(c.get("env").is_none());
        assert!(c.get("volumeMounts").is_none());
        assert_eq!(c["args"][0], "", "no model: {{model_dir}} is empty");
    }

    #[test]
    fn bad_ids_and_missing_images_are_refused() {
        let mut w = workload();
        w.service_id = "a/b".into();
        let err = renderer(K8sConfig::default()).render(&w).unwrap_err();
        assert_eq!(err.reason, FailureReason::InvalidSpec);
        let mut w = workload();
        w.image = " ".into();
        assert!(renderer(K8sConfig::default()).render(&w).is_err());
    }
}

//! The `ModelService` custom resource (`modelservices.xmod-shim.io/v1alpha1`): desired state of
//! one model service kept in the cluster, so etcd gives durability and watch, and kubectl, RBAC and
//! GitOps tools see what is deployed.
//!
//! `spec` mirrors the deploy request ([`shim_core::DeploySpec`]) field for field; `status` is what
//! the engine last observed. The resource's name is the service id. The manifest installed in a
//! cluster is generated from this code into `deploy/crds/modelservices.yaml`, and a test fails
//! when the two differ (`UPDATE_CRDS=1 cargo test -p shim-shimlet-k8s crd` rewrites it).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use shim_core::record::ServiceRecord;
use shim_core::{DeploySpec, Phase};

/// API group of the resource.
pub const GROUP: &str = "xmod-shim.io";
/// API version of the resource.
pub const VERSION: &str = "v1alpha1";
/// Annotation that holds the engine's whole [`ServiceRecord`] as JSON, so a restarted shim
/// rebuilds exactly what it had (steps, restarts, timestamps) rather than a lossy projection.
pub const ANNOTATION_RECORD: &str = "xmod-shim.io/record";
/// Finalizer on every ModelService the shim writes: a deleted one stays, `terminating`, until the
/// engine has torn its workload down.
pub const FINALIZER: &str = "xmod-shim.io/teardown";

/// A model service: the deploy request as a Kubernetes resource.
// Clippy reads the repeated `type_ = "string"` of separate `printcolumn(...)` entries as one
// attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "xmod-shim.io",
    version = "v1alpha1",
    kind = "ModelService",
    plural = "modelservices",
    singular = "modelservice",
    shortname = "ms",
    namespaced,
    status = "ModelServiceStatus",
    derive = "PartialEq",
    doc = "A model served by xmod-shim: the deploy request (spec) and what was observed (status).",
    scale(
        spec_replicas_path = ".spec.replicaCount",
        status_replicas_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "STATUS",
        type_ = "string",
        json_path = ".status.phase",
        description = "Phase in the client's words"
    ),
    printcolumn(
        name = "READY",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas ready"
    ),
    printcolumn(
        name = "MODEL",
        type_ = "string",
        json_path = ".spec.modelName",
        description = "Model name"
    ),
    printcolumn(
        name = "ENDPOINT",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "Chat completions URL"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelServiceSpec {
    /// Directory name under the model root; also the name the engine serves the model as.
    #[serde(default)]
    pub model_name: String,
    /// Explicit model directory; must lie inside an allowed root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_file_dir: Option<String>,
    /// Number of replicas; absent means 1, 0 means scaled to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_count: Option<i64>,
    /// Accelerators, cpu and memory per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_requirements: Option<ModelServiceResources>,
    /// Maximum context length the engine should allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<i64>,
    /// Extra environment for the engine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<ModelServiceEnvVar>,
    /// Engine preset (`vllm`, `sglang`, `llamacpp`, `mock`); absent means the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// Resources one replica needs (mirrors [`shim_core::ResourceRequirements`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelServiceResources {
    /// Free text such as "NVIDIA GPU"; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_type: Option<String>,
    /// Accelerators per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_count: Option<i64>,
    /// CPU as a Kubernetes quantity ("4", "500m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory as a Kubernetes quantity ("16Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// One environment variable (the deploy request's `{key, value}` shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelServiceEnvVar {
    /// Variable name.
    pub key: String,
    /// Variable value.
    #[serde(default)]
    pub value: String,
}

/// The six status words the client knows (what `Phase::wire_word` maps each phase to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WirePhase {
    /// Accepted, waiting.
    #[serde(rename = "pending")]
    Pending,
    /// Being deployed or repaired.
    #[serde(rename = "initializing")]
    Initializing,
    /// Serving.
    #[serde(rename = "running")]
    Running,
    /// Gave up; reason and message say why.
    #[serde(rename = "failed")]
    Failed,
    /// Being removed.
    #[serde(rename = "terminating")]
    Terminating,
    /// Removed.
    #[serde(rename = "notExist")]
    NotExist,
}

impl From<Phase> for WirePhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Pending => Self::Pending,
            Phase::Initializing | Phase::Recovering => Self::Initializing,
            Phase::Running => Self::Running,
            Phase::Failed => Self::Failed,
            Phase::Terminating => Self::Terminating,
            Phase::Deleted => Self::NotExist,
        }
    }
}

/// What the engine last observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelServiceStatus {
    /// One of the client's six words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<WirePhase>,
    /// Typed reason while pending or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Full URL ending in `/v1/chat/completions`; empty until running.
    #[serde(default)]
    pub endpoint: String,
    /// Replicas ready (the scale subresource's status replicas).
    #[serde(default)]
    pub ready_replicas: i32,
    /// The resource's `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, in the usual Kubernetes shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ModelServiceCondition>,
}

/// A standard condition (`type`, `status`, `reason`, `message`, `lastTransitionTime`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelServiceCondition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl From<&DeploySpec> for ModelServiceSpec {
    fn from(spec: &DeploySpec) -> Self {
        Self {
            model_name: spec.model_name.clone(),
            model_file_dir: spec.model_file_dir.clone(),
            replica_count: spec.replica_count,
            resource_requirements: spec.resource_requirements.as_ref().map(|r| {
                ModelServiceResources {
                    accelerator_type: r.accelerator_type.clone(),
                    accelerator_count: r.accelerator_count,
                    cpu: r.cpu.clone(),
                    memory: r.memory.clone(),
                }
            }),
            context_length: spec.context_length,
            env: spec
                .env
                .iter()
                .map(|e| ModelServiceEnvVar {
                    key: e.key.clone(),
                    value: e.value.clone(),
                })
                .collect(),
            engine: spec.engine.clone(),
        }
    }
}

impl From<&ModelServiceSpec> for DeploySpec {
    fn from(spec: &ModelServiceSpec) -> Self {
        let mut out = DeploySpec::named(spec.model_name.clone());
        out.model_file_dir = spec.model_file_dir.clone();
        out.replica_count = spec.replica_count;
        out.resource_requirements =
            spec.resource_requirements
                .as_ref()
                .map(|r| shim_core::ResourceRequirements {
                    accelerator_type: r.accelerator_type.clone(),
                    accelerator_count: r.accelerator_count,
                    cpu: r.cpu.clone(),
                    memory: r.memory.clone(),
                });
        out.context_length = spec.context_length;
        out.env = spec
            .env
            .iter()
            .map(|e| shim_core::EnvVar {
                key: e.key.clone(),
                value: e.value.clone(),
            })
            .collect();
        out.engine = spec.engine.clone();
        out
    }
}

/// The status a record shows: phase word, reason, endpoint, ready replicas and the three
/// conditions. `generation` is the resource's `metadata.generation` the record's spec came from.
pub fn status_of(record: &ServiceRecord, generation: Option<i64>) -> ModelServiceStatus {
    let since = Some(record.updated_at.to_rfc3339());
    let condition = |type_: &str, on: bool, reason: &str| ModelServiceCondition {
        type_: type_.into(),
        status: if on { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: record.message.clone(),
        last_transition_time: since.clone(),
        observed_generation: generation,
    };
    let word = |phase: Phase| {
        let mut s = phase.to_string();
        if let Some(first) = s.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        s
    };
    let reason = record.reason.clone().unwrap_or_else(|| word(record.phase));
    let ready = record.phase == Phase::Running;
    let progressing = matches!(
        record.phase,
        Phase::Pending | Phase::Initializing | Phase::Recovering | Phase::Terminating
    );
    let degraded = matches!(record.phase, Phase::Failed | Phase::Recovering);
    ModelServiceStatus {
        phase: Some(record.phase.into()),
        reason: record.reason.clone(),
        message: record.message.clone(),
        endpoint: record.endpoint.clone(),
        ready_replicas: i32::try_from(record.ready_replicas).unwrap_or(i32::MAX),
        observed_generation: generation,
        conditions: vec![
            condition("Ready", ready, &reason),
            condition("Progressing", progressing, &reason),
            condition("Degraded", degraded, &reason),
        ],
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    const MANIFEST: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/modelservices.yaml"
    );
    const HEADER: &str = "# Generated from shim-shimlet-k8s/src/crd.rs; do not edit. Regenerate with\n\
                          # UPDATE_CRDS=1 cargo test -p shim-shimlet-k8s crd\n";

    fn generated() -> String {
        let yaml = serde_yaml::to_string(&ModelService::crd()).expect("a CRD serialises");
        format!("{HEADER}{yaml}")
    }

    /// The installed manifest is the code's: a field added here and not regenerated fails CI.
    #[test]
    fn crd_manifest_matches_the_code() {
        let expected = generated();
        if std::env::var_os("UPDATE_CRDS").is_some() {
            std::fs::create_dir_all(std::path::Path::new(MANIFEST).parent().expect("parent"))
                .expect("create deploy/crds");
            std::fs::write(MANIFEST, &expected).expect("write the manifest");
        }
        let on_disk = std::fs::read_to_string(MANIFEST).unwrap_or_default();
        assert!(
            on_disk == expected,
            "deploy/crds/modelservices.yaml differs from ModelService::crd(); regenerate it with \
             UPDATE_CRDS=1 cargo test -p shim-shimlet-k8s crd"
        );
    }

    #[test]
    fn crd_has_the_names_columns_and_scale_the_issue_asks_for() {
        let crd = ModelService::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.kind, "ModelService");
        assert_eq!(crd.spec.names.plural, "modelservices");
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["STATUS", "READY", "MODEL", "ENDPOINT", "AGE"]);
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().expect("scale");
        assert_eq!(scale.spec_replicas_path, ".spec.replicaCount");
        assert_eq!(scale.status_replicas_path, ".status.readyReplicas");
    }

    #[test]
    fn spec_round_trips_through_the_deploy_request() {
        let body = serde_json::json!({
            "modelName": "qwen",
            "modelFileDir": "/models/qwen",
            "replicaCount": 2,
            "resourceRequirements": {"acceleratorType": "NVIDIA GPU", "acceleratorCount": 1,
                                     "cpu": "4", "memory": "16Gi"},
            "contextLength": 4096,
            "env": [{"key": "A", "value": "b"}],
            "engine": "vllm"
        });
        let deploy: DeploySpec = serde_json::from_value(body.clone()).expect("deploy spec");
        let ms = ModelServiceSpec::from(&deploy);
        assert_eq!(serde_json::to_value(&ms).expect("json"), body);
        assert_eq!(DeploySpec::from(&ms), deploy);
    }

    #[test]
    fn status_uses_the_wire_words_and_conditions() {
        let mut record = ServiceRecord::new(
            "abcd1234".into(),
            DeploySpec::named("m"),
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).expect("time"),
        );
        record.phase = Phase::Recovering;
        record.ready_replicas = 1;
        let status = status_of(&record, Some(3));
        assert_eq!(
            serde_json::to_value(status.phase).expect("json"),
            "initializing"
        );
        assert_eq!(status.ready_replicas, 1);
        let on: Vec<_> = status
            .conditions
            .iter()
            .filter(|c| c.status == "True")
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(on, ["Progressing", "Degraded"]);
        record.phase = Phase::Deleted;
        assert_eq!(
            serde_json::to_value(status_of(&record, None).phase).expect("json"),
            "notExist"
        );
    }
}

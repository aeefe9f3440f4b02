//! The `shimlets.k8s` configuration section.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Toleration;
use serde::{Deserialize, Serialize};

use crate::names::is_dns_label;

/// Settings of the Kubernetes shimlet, read from `shimlets.k8s` (camelCase keys, all optional):
///
/// ```yaml
/// shimlets:
///   k8s:
///     kubeConfig: /etc/xmod/kubeconfig   # default: KUBECONFIG, ~/.kube/config, then in-cluster
///     context: prod-gpu                  # kubeconfig context (default: its current context)
///     namespace: models                  # default: the context's namespace, else "default"
///     qps: 20                            # client-side rate limit: requests per second ...
///     burst: 40                          # ... with bursts of up to this many
///     timeoutSecs: 30                    # connect timeout and limit per API call
///     acceleratorResource: nvidia.com/gpu
///     serviceType: ClusterIP             # ClusterIP | NodePort | LoadBalancer
///     endpointMode: clusterDns           # clusterDns | nodePort | loadBalancer | external
///     externalBaseUrl: https://llm.example.com/{serviceId}
///     clusterDomain: cluster.local
///     nodeAddress: 10.0.0.5              # host in nodePort endpoints (default: the pod's node IP)
///     replicaAddresses: pods             # pods | service (default: pods in a cluster, else service)
///     modelVolume:
///       hostRoot: /data/models           # node directory that mirrors engine.modelRoot
///       hostPathType: Directory
///       pvc: models                      # use this claim instead of a hostPath
///       subPath: "{model}"               # path inside the claim ({model}: path under modelRoot)
///       readOnly: true
///     nodeSelector: { nvidia.com/gpu.present: "true" }
///     tolerations: [{ key: nvidia.com/gpu, operator: Exists, effect: NoSchedule }]
///     imagePullPolicy: IfNotPresent      # default: Kubernetes' own (Always for :latest)
///     imagePullSecrets: [regcred]
///     shmSize: 16Gi                      # memory-backed /dev/shm for tensor-parallel engines
///     startupProbePeriodSecs: 10
///     progressDeadlineMarginSecs: 900
///     watchNodes: true                   # the nodes' GPUs for the fit check (needs a ClusterRole)
/// ```
///
/// Environment overrides (`XMOD_SHIM_SHIMLETS__K8S__KUBECONFIG=…`) arrive lower-cased, so each
/// key also accepts its lower-case spelling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct K8sConfig {
    /// Path of a kubeconfig file. Unset: `KUBECONFIG`, then `~/.kube/config`, then the in-cluster
    /// service account (the discovery kubectl uses).
    #[serde(alias = "kubeconfig")]
    pub kube_config: Option<PathBuf>,
    /// Kubeconfig context to use; unset means the file's current context.
    pub context: Option<String>,
    /// Namespace every workload goes to. Unset: the context's namespace (or, in a cluster, the
    /// shim's own namespace), else `default`.
    pub namespace: Option<String>,
    /// Sustained rate of API requests per second (a token bucket shared by every request the
    /// shimlet makes, watches included), like client-go's QPS.
    pub qps: f64,
    /// Requests that may go out at once before `qps` paces them (the bucket's size).
    pub burst: u32,
    /// Seconds to wait for a connection and for each API call to answer (not for watches,
    /// which stay open by design).
    #[serde(alias = "timeoutsecs")]
    pub timeout_secs: u64,
    /// Extended resource that accelerators are requested as.
    #[serde(alias = "acceleratorresource")]
    pub accelerator_resource: String,
    /// Type of the Service created for each workload.
    #[serde(alias = "servicetype")]
    pub service_type: ServiceType,
    /// How endpoint URLs are built; unset follows `externalBaseUrl` when given, else
    /// `serviceType` (ClusterIP → clusterDns, NodePort → nodePort, LoadBalancer → loadBalancer).
    #[serde(alias = "endpointmode")]
    pub endpoint_mode: Option<EndpointMode>,
    /// Base URL of the `external` endpoint mode (an Ingress or gateway in front of the
    /// Services); `{name}`, `{serviceId}` and `{namespace}` are filled in.
    #[serde(alias = "externalbaseurl")]
    pub external_base_url: Option<String>,
    /// The cluster's DNS domain, for `clusterDns` endpoints.
    #[serde(alias = "clusterdomain")]
    pub cluster_domain: String,
    /// Host put in `nodePort` endpoints; unset uses the node IP of a ready pod.
    #[serde(alias = "nodeaddress")]
    pub node_address: Option<String>,
    /// What the gateway balances over: every ready pod, or the one Service address. Unset:
    /// `pods` when the shim runs in a pod (`KUBERNETES_SERVICE_HOST` is set), where pod
    /// addresses are reachable, else `service`. See [`ReplicaAddresses`].
    #[serde(alias = "replicaaddresses")]
    pub replica_addresses: Option<ReplicaAddresses>,
    /// Where the model files come from.
    #[serde(alias = "modelvolume")]
    pub model_volume: ModelVolumeConfig,
    /// Node labels every engine pod must match (e.g. a GPU node pool).
    #[serde(alias = "nodeselector")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints engine pods tolerate (GPU nodes are usually tainted).
    pub tolerations: Vec<Toleration>,
    /// Image pull policy; unset leaves Kubernetes' default (Always for `:latest`, else
    /// IfNotPresent). Images loaded into kind or k3s by hand need `IfNotPresent` or `Never`.
    #[serde(alias = "imagepullpolicy")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets holding registry credentials for private images.
    #[serde(alias = "imagepullsecrets")]
    pub image_pull_secrets: Vec<String>,
    /// Size of a memory-backed `/dev/shm` (engines sharding a model over several GPUs need more
    /// than the runtime's 64 MiB). Unset mounts none.
    #[serde(alias = "shmsize")]
    pub shm_size: Option<String>,
    /// Seconds between start-up probes; the probe's failure threshold is derived from the
    /// workload's start-up budget, so `threshold × period ≥ budget`.
    #[serde(alias = "startupprobeperiodsecs")]
    pub startup_probe_period_secs: u32,
    /// Seconds added to the start-up budget for the Deployment's `progressDeadlineSeconds`
    /// (scheduling and pulling a large image happen before the start-up probe starts).
    #[serde(alias = "progressdeadlinemarginsecs")]
    pub progress_deadline_margin_secs: u32,
    /// Watch the cluster's Nodes for their GPUs (allocatable count, memory label), which the fit
    /// check (`engine.fitCheck`) and `GET /api/v1/gpus` use. Needs list and watch on nodes,
    /// cluster-wide (`deploy/rbac.yaml`'s ClusterRole); off, GPU memory is unknown and requests
    /// are not checked.
    #[serde(alias = "watchnodes")]
    pub watch_nodes: bool,
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            kube_config: None,
            context: None,
            namespace: None,
            qps: 20.0,
            burst: 40,
            timeout_secs: 30,
            accelerator_resource: "nvidia.com/gpu".into(),
            service_type: ServiceType::ClusterIp,
            endpoint_mode: None,
            external_base_url: None,
            cluster_domain: "cluster.local".into(),
            node_address: None,
            replica_addresses: None,
            model_volume: ModelVolumeConfig::default(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            shm_size: None,
            startup_probe_period_secs: 10,
            progress_deadline_margin_secs: 900,
            watch_nodes: true,
        }
    }
}

/// Kubernetes Service types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    /// Reachable inside the cluster only (the default).
    #[default]
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// How the endpoint URL of a ready workload is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointMode {
    /// `http://<service>.<namespace>.svc.<clusterDomain>:<port>`: for clients inside the cluster.
    ClusterDns,
    /// `http://<node address>:<nodePort>`: needs serviceType NodePort or LoadBalancer.
    NodePort,
    /// `http://<load balancer ingress>:<port>`: needs serviceType LoadBalancer; the workload
    /// counts as starting until the cloud assigns an address.
    LoadBalancer,
    /// `externalBaseUrl` with its placeholders filled in.
    External,
}

/// Which addresses of a ready workload the gateway balances over
/// (`WorkloadObservation::replica_addresses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReplicaAddresses {
    /// `http://<pod IP>:<container port>` of every ready pod, from the Service's EndpointSlices
    /// (watched: `list` and `watch` on `endpointslices` in `discovery.k8s.io`). The gateway
    /// balances over the pods itself and knows which one it sends a request to; pod IPs must be
    /// reachable from the shim, as they are inside the cluster.
    Pods,
    /// The Service address (the endpoint URL): one replica as far as the gateway knows, and
    /// the cluster's Service balances between pods. For a shim outside the cluster.
    Service,
}

/// Image pull policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the node lacks the image.
    IfNotPresent,
    /// Never pull (images loaded by hand).
    Never,
}

impl PullPolicy {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Where the model directory comes from (`shimlets.k8s.modelVolume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ModelVolumeConfig {
    /// Node directory that holds what `engine.modelRoot` holds on the shim's machine: a model at
    /// `<modelRoot>/qwen` is mounted from `<hostRoot>/qwen`. Unset uses the shim's own path
    /// (nodes mount the same share at the same place).
    #[serde(alias = "hostroot")]
    pub host_root: Option<PathBuf>,
    /// `hostPath.type`: `Directory` (the default) refuses to start a pod whose model directory
    /// is absent instead of serving an empty one; `DirectoryOrCreate` suits demos.
    #[serde(alias = "hostpathtype")]
    pub host_path_type: String,
    /// PersistentVolumeClaim holding the models; set, it replaces the hostPath.
    pub pvc: Option<String>,
    /// Path inside the claim; `{model}` is the model's path under `engine.modelRoot`.
    #[serde(alias = "subpath")]
    pub sub_path: Option<String>,
    /// Mount the model read-only (the default: engines only read weights).
    #[serde(alias = "readonly")]
    pub read_only: bool,
}

impl Default for ModelVolumeConfig {
    fn default() -> Self {
        Self {
            host_root: None,
            host_path_type: "Directory".into(),
            pvc: None,
            sub_path: None,
            read_only: true,
        }
    }
}

impl K8sConfig {
    /// The endpoint mode in force (explicit, or derived from the other keys).
    pub fn effective_endpoint_mode(&self) -> EndpointMode {
        if let Some(mode) = self.endpoint_mode {
            return mode;
        }
        if self.external_base_url.is_some() {
            return EndpointMode::External;
        }
        match self.service_type {
            ServiceType::ClusterIp => EndpointMode::ClusterDns,
            ServiceType::NodePort => EndpointMode::NodePort,
            ServiceType::LoadBalancer => EndpointMode::LoadBalancer,
        }
    }

    /// The replica addresses in force: explicit, else `pods` when the shim runs in a pod
    /// (`KUBERNETES_SERVICE_HOST` is set, as the kubelet does in every pod), else `service`.
    ///
    /// # Caveats
    /// A shim in a pod that manages *another* cluster (through a kubeconfig) cannot reach that
    /// cluster's pod addresses: set `replicaAddresses: service` there.
    pub fn effective_replica_addresses(&self) -> ReplicaAddresses {
        self.replica_addresses_when(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    fn replica_addresses_when(&self, in_cluster: bool) -> ReplicaAddresses {
        match self.replica_addresses {
            Some(mode) => mode,
            None if in_cluster => ReplicaAddresses::Pods,
            None => ReplicaAddresses::Service,
        }
    }

    /// Checks what serde cannot: value ranges and combinations.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> Result<(), String> {
        let key = |k: &str| format!("shimlets.k8s.{k}");
        if let Some(ns) = &self.namespace
            && !is_dns_label(ns)
        {
            return Err(format!(
                "{}: {ns:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)",
                key("namespace")
            ));
        }
        if !(self.qps.is_finite() && self.qps > 0.0) {
            return Err(format!("{} must be a positive number", key("qps")));
        }
        if self.burst == 0 {
            return Err(format!("{} must be at least 1", key("burst")));
        }
        if self.timeout_secs == 0 {
            return Err(format!("{} must be at least 1", key("timeoutSecs")));
        }
        if self.startup_probe_period_secs == 0 {
            return Err(format!(
                "{} must be at least 1",
                key("startupProbePeriodSecs")
            ));
        }
        let resource = self.accelerator_resource.trim();
        if resource.is_empty() || resource.contains(char::is_whitespace) {
            return Err(format!(
                "{} must name an extended resource such as nvidia.com/gpu",
                key("acceleratorResource")
            ));
        }
        if !is_dns_subdomain(&self.cluster_domain) {
            return Err(format!(
                "{}: {:?} is not a DNS domain",
                key("clusterDomain"),
                self.cluster_domain
            ));
        }
        match (self.effective_endpoint_mode(), self.service_type) {
            (EndpointMode::NodePort, ServiceType::ClusterIp) => {
                return Err(format!(
                    "{} nodePort needs {} NodePort or LoadBalancer",
                    key("endpointMode"),
                    key("serviceType")
                ));
            }
            (EndpointMode::LoadBalancer, t) if t != ServiceType::LoadBalancer => {
                return Err(format!(
                    "{} loadBalancer needs {} LoadBalancer",
                    key("endpointMode"),
                    key("serviceType")
                ));
            }
            (EndpointMode::External, _) => match self.external_base_url.as_deref() {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {}
                Some(url) => {
                    return Err(format!(
                        "{}: {url:?} must start with http:// or https://",
                        key("externalBaseUrl")
                    ));
                }
                None => {
                    return Err(format!(
                        "{} external needs {}",
                        key("endpointMode"),
                        key("externalBaseUrl")
                    ));
                }
            },
            _ => {}
        }
        let volume = &self.model_volume;
        if let Some(pvc) = &volume.pvc
            && !is_dns_subdomain(pvc)
        {
            return Err(format!(
                "{}: {pvc:?} is not a valid claim name",
                key("modelVolume.pvc")
            ));
        }
        const HOST_PATH_TYPES: &[&str] = &[
            "",
            "Directory",
            "DirectoryOrCreate",
            "File",
            "FileOrCreate",
            "Socket",
            "CharDevice",
            "BlockDevice",
        ];
        if !HOST_PATH_TYPES.contains(&volume.host_path_type.as_str()) {
            return Err(format!(
                "{}: {:?} is not a hostPath type (Directory, DirectoryOrCreate, ...)",
                key("modelVolume.hostPathType"),
                volume.host_path_type
            ));
        }
        if let Some(root) = &volume.host_root
            && !root.is_absolute()
        {
            return Err(format!(
                "{} must be an absolute path on the nodes",
                key("modelVolume.hostRoot")
            ));
        }
        if let Some(sub) = &volume.sub_path
            && (sub.starts_with('/') || sub.split('/').any(|part| part == ".."))
        {
            return Err(format!(
                "{} must be a relative path without '..'",
                key("modelVolume.subPath")
            ));
        }
        if let Some(size) = &self.shm_size {
            shim_core::quantity::parse(size).map_err(|e| format!("{}: {e}", key("shmSize")))?;
        }
        for secret in &self.image_pull_secrets {
            if !is_dns_subdomain(secret) {
                return Err(format!(
                    "{}: {secret:?} is not a valid secret name",
                    key("imagePullSecrets")
                ));
            }
        }
        Ok(())
    }
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_use_cluster_dns_and_nvidia_gpus() {
        let cfg: K8sConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(cfg, K8sConfig::default());
        assert_eq!(cfg.accelerator_resource, "nvidia.com/gpu");
        assert_eq!(cfg.service_type, ServiceType::ClusterIp);
        assert_eq!(cfg.effective_endpoint_mode(), EndpointMode::ClusterDns);
        assert_eq!(cfg.model_volume.host_path_type, "Directory");
        assert!(cfg.model_volume.read_only);
        cfg.validate().unwrap();
    }

    #[test]
    fn camel_case_and_lower_case_keys_parse() {
        let cfg: K8sConfig = serde_json::from_value(serde_json::json!({
            "kubeConfig": "/etc/kubeconfig",
            "context": "kind-kind",
            "namespace": "models",
            "qps": 5.5,
            "burst": 10,
            "timeoutsecs": 7,
            "acceleratorResource": "amd.com/gpu",
            "serviceType": "NodePort",
            "nodeSelector": { "pool": "gpu" },
            "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
            "imagePullPolicy": "IfNotPresent",
            "modelVolume": { "pvc": "models", "subpath": "llm/{model}" },
            "startupProbePeriodSecs": 5,
        }))
        .unwrap();
        assert_eq!(cfg.kube_config, Some(PathBuf::from("/etc/kubeconfig")));
        assert_eq!(cfg.timeout_secs, 7);
        assert_eq!(cfg.effective_endpoint_mode(), EndpointMode::NodePort);
        assert_eq!(cfg.tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(cfg.model_volume.sub_path.as_deref(), Some("llm/{model}"));
        assert_eq!(cfg.image_pull_policy, Some(PullPolicy::IfNotPresent));
        cfg.validate().unwrap();
    }

    #[test]
    fn replica_addresses_default_to_pods_only_inside_a_cluster() {
        let unset = K8sConfig::default();
        assert_eq!(unset.replica_addresses_when(true), ReplicaAddresses::Pods);
        assert_eq!(
            unset.replica_addresses_when(false),
            ReplicaAddresses::Service
        );
        for (text, mode) in [
            ("pods", ReplicaAddresses::Pods),
            ("service", ReplicaAddresses::Service),
        ] {
            let cfg: K8sConfig =
                serde_json::from_value(serde_json::json!({"replicaAddresses": text})).unwrap();
            assert_eq!(cfg.replica_addresses_when(true), mode);
            assert_eq!(cfg.replica_addresses_when(false), mode);
            let lower: K8sConfig =
                serde_json::from_value(serde_json::json!({"replicaaddresses": text})).unwrap();
            assert_eq!(lower, cfg);
        }
        let bad =
            serde_json::from_value::<K8sConfig>(serde_json::json!({"replicaAddresses": "nodes"}));
        assert!(bad.unwrap_err().to_string().contains("pods"));
    }

    #[test]
    fn external_base_url_selects_the_external_mode() {
        let cfg = K8sConfig {
            external_base_url: Some("https://llm.example.com/{serviceId}".into()),
            ..K8sConfig::default()
        };
        assert_eq!(cfg.effective_endpoint_mode(), EndpointMode::External);
        cfg.validate().unwrap();
    }

    #[test]
    fn bad_values_and_combinations_name_the_key() {
        let typo = serde_json::from_value::<K8sConfig>(serde_json::json!({"nameSpace": "x"}));
        assert!(typo.unwrap_err().to_string().contains("nameSpace"));
        let cases = [
            (
                K8sConfig {
                    namespace: Some("Models".into()),
                    ..K8sConfig::default()
                },
                "namespace",
            ),
            (
                K8sConfig {
                    qps: 0.0,
                    ..K8sConfig::default()
                },
                "qps",
            ),
            (
                K8sConfig {
                    burst: 0,
                    ..K8sConfig::default()
                },
                "burst",
            ),
            (
                K8sConfig {
                    endpoint_mode: Some(EndpointMode::NodePort),
                    ..K8sConfig::default()
                },
                "endpointMode",
            ),
            (
                K8sConfig {
                    endpoint_mode: Some(EndpointMode::LoadBalancer),
                    service_type: ServiceType::NodePort,
                    ..K8sConfig::default()
                },
                "endpointMode",
            ),
            (
                K8sConfig {
                    endpoint_mode: Some(EndpointMode::External),
                    ..K8sConfig::default()
                },
                "externalBaseUrl",
            ),
            (
                K8sConfig {
                    external_base_url: Some("llm.example.com".into()),
                    ..K8sConfig::default()
                },
                "externalBaseUrl",
            ),
            (
                K8sConfig {
                    shm_size: Some("lots".into()),
                    ..K8sConfig::default()
                },
                "shmSize",
            ),
            (
                K8sConfig {
                    model_volume: ModelVolumeConfig {
                        sub_path: Some("../etc".into()),
                        ..ModelVolumeConfig::default()
                    },
                    ..K8sConfig::default()
                },
                "subPath",
            ),
            (
                K8sConfig {
                    model_volume: ModelVolumeConfig {
                        host_root: Some("relative".into()),
                        ..ModelVolumeConfig::default()
                    },
                    ..K8sConfig::default()
                },
                "hostRoot",
            ),
            (
                K8sConfig {
                    model_volume: ModelVolumeConfig {
                        host_path_type: "Dir".into(),
                        ..ModelVolumeConfig::default()
                    },
                    ..K8sConfig::default()
                },
                "hostPathType",
            ),
        ];
        for (cfg, key) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}

//! Turning a [`WorkloadSpec`] into Docker container-create bodies: a pure function, shared by
//! `apply` and the dry-run `render`, so what a dry run shows is what `apply` sends.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use shim_core::{FailureReason, ShimletError, WorkloadSpec};

use crate::config::{DockerConfig, RestartPolicySetting};

/// Label on every container the shimlet creates; its value is [`MANAGED_BY_VALUE`].
pub const LABEL_MANAGED_BY: &str = "xmod-shim.managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "xmod-shim";
/// Label holding the service id.
pub const LABEL_SERVICE_ID: &str = "xmod-shim.service-id";
/// Label holding the spec generation the container was created from.
pub const LABEL_GENERATION: &str = "xmod-shim.generation";
/// Label holding the replica index (0-based).
pub const LABEL_REPLICA: &str = "xmod-shim.replica";
/// Label holding the replica count wanted when the container was created, so a restarted shim
/// knows how many replicas a service should have.
pub const LABEL_REPLICAS: &str = "xmod-shim.replicas";
/// Label holding the engine's port inside the container.
pub const LABEL_PORT: &str = "xmod-shim.port";
/// Label holding the health probe path.
pub const LABEL_HEALTH_PATH: &str = "xmod-shim.health-path";
/// Label holding the health probe period in milliseconds.
pub const LABEL_HEALTH_PERIOD_MS: &str = "xmod-shim.health-period-ms";
/// Label holding the start-up budget in milliseconds.
pub const LABEL_STARTUP_TIMEOUT_MS: &str = "xmod-shim.startup-timeout-ms";
/// Label holding the model name (informational).
pub const LABEL_MODEL_NAME: &str = "xmod-shim.model-name";

/// Filter value selecting every container this shimlet manages.
pub fn managed_filter() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY_VALUE}")
}

/// Filter value selecting one service's containers.
pub fn service_filter(service_id: &str) -> String {
    format!("{LABEL_SERVICE_ID}={service_id}")
}

/// The container name of one replica: `xmod-<service_id>-<replica>`. Characters Docker does not
/// allow in names are replaced by `_`. The name is unique per engine, which also guarantees one
/// container per (service, replica).
pub fn container_name(service_id: &str, replica: u32) -> String {
    let id: String = service_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("xmod-{id}-{replica}")
}

/// The GPU allocator's owner name for one replica.
pub(crate) fn gpu_owner(service_id: &str, replica: u32) -> String {
    format!("{service_id}/{replica}")
}

/// Which accelerators a replica gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// None.
    None,
    /// Any `n` devices (dry run: the allocator picks ids only when applying).
    Count(u32),
    /// These device ids, handed out by the shared allocator.
    Devices(Vec<String>),
}

/// The `/containers/create` body for replica `replica` of `workload`.
///
/// # Errors
/// [`FailureReason::InvalidSpec`] when a resource quantity does not parse.
pub fn create_body(
    workload: &WorkloadSpec,
    replica: u32,
    config: &DockerConfig,
    gpus: &GpuRequest,
) -> Result<ContainerCreateBody, ShimletError> {
    let port_key = format!("{}/tcp", workload.port);
    let mount_path = workload
        .model
        .as_ref()
        .map(|m| m.mount_path.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Engines bind every interface inside the container; only the published port is exposed.
    let args = workload.render_args("0.0.0.0", workload.port, &mount_path);

    let mut labels: HashMap<String, String> = workload.labels.clone().into_iter().collect();
    // Ours last, so user labels cannot break identity.
    for (key, value) in [
        (LABEL_MANAGED_BY, MANAGED_BY_VALUE.to_string()),
        (LABEL_SERVICE_ID, workload.service_id.clone()),
        (LABEL_GENERATION, workload.generation.to_string()),
        (LABEL_REPLICA, replica.to_string()),
        (LABEL_REPLICAS, workload.replicas.to_string()),
        (LABEL_PORT, workload.port.to_string()),
        (LABEL_HEALTH_PATH, workload.health.path.clone()),
        (
            LABEL_HEALTH_PERIOD_MS,
            workload.health.period.as_millis().to_string(),
        ),
        (
            LABEL_STARTUP_TIMEOUT_MS,
            workload.health.startup_timeout.as_millis().to_string(),
        ),
    ] {
        labels.insert(key.to_string(), value);
    }
    if !workload.model_name.is_empty() {
        labels.insert(LABEL_MODEL_NAME.into(), workload.model_name.clone());
    }

    let mounts = workload.model.as_ref().map(|model| {
        vec![Mount {
            // A `Mounts` bind (unlike `Binds`) fails when the source is missing instead of
            // silently creating an empty, root-owned directory.
            typ: Some(MountType::BIND),
            source: Some(model.host_path.to_string_lossy().into_owned()),
            target: Some(mount_path.clone()),
            read_only: Some(true),
            ..Mount::default()
        }]
    });

    let port_bindings = (!config.host_network()).then(|| {
        HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(config.host_ip.clone()),
                // Empty: the engine picks a free host port atomically, with no race between
                // finding a free port and binding it.
                host_port: Some(String::new()),
            }]),
        )])
    });

    let host_config = HostConfig {
        port_bindings,
        mounts,
        nano_cpus: workload
            .resources
            .cpu
            .as_deref()
            .map(|cpu| quantity("resources.cpu", cpu, 1e9))
            .transpose()?,
        memory: workload
            .resources
            .memory
            .as_deref()
            .map(|memory| quantity("resources.memory", memory, 1.0))
            .transpose()?,
        device_requests: device_requests(gpus, &config.gpu_driver),
        restart_policy: Some(RestartPolicy {
            name: Some(match config.restart_policy {
                RestartPolicySetting::No => RestartPolicyNameEnum::NO,
                RestartPolicySetting::Always => RestartPolicyNameEnum::ALWAYS,
                RestartPolicySetting::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
                RestartPolicySetting::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
            }),
            maximum_retry_count: None,
        }),
        network_mode: config.network.clone(),
        shm_size: config
            .shm_size
            .as_deref()
            .map(|size| quantity("shimlets.docker.shmSize", size, 1.0))
            .transpose()?,
        ipc_mode: config.ipc_mode.clone(),
        ..HostConfig::default()
    };

    Ok(ContainerCreateBody {
        image: Some(workload.image.clone()),
        entrypoint: (!workload.entrypoint.is_empty()).then(|| workload.entrypoint.clone()),
        cmd: (!args.is_empty()).then_some(args),
        env: (!workload.env.is_empty()).then(|| {
            workload
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        }),
        exposed_ports: Some(vec![port_key]),
        labels: Some(labels),
        stop_timeout: Some(i64::from(config.stop_grace_period_secs)),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    })
}

fn device_requests(gpus: &GpuRequest, driver: &str) -> Option<Vec<DeviceRequest>> {
    let (count, device_ids) = match gpus {
        GpuRequest::None => return None,
        GpuRequest::Count(n) => (Some(i64::from(*n)), None),
        GpuRequest::Devices(ids) => (None, Some(ids.clone())),
    };
    Some(vec![DeviceRequest {
        driver: Some(driver.to_string()),
        count,
        device_ids,
        capabilities: Some(vec![vec!["gpu".into()]]),
        options: None,
    }])
}

/// A Kubernetes quantity in Docker's integer unit (`scale` units per base unit).
fn quantity(field: &str, text: &str, scale: f64) -> Result<i64, ShimletError> {
    let value = shim_core::quantity::parse(text).map_err(|e| {
        ShimletError::permanent(FailureReason::InvalidSpec, format!("{field}: {e}"))
    })?;
    let scaled = (value * scale).round();
    if !(1.0..=i64::MAX as f64).contains(&scaled) {
        return Err(ShimletError::permanent(
            FailureReason::InvalidSpec,
            format!("{field}: {text:?} is out of range for Docker"),
        ));
    }
    Ok(scaled as i64)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::{Value, json};
    use shim_core::ModelVolume;

    use super::*;

    fn workload() -> WorkloadSpec {
        let mut w = WorkloadSpec::new("svc1", 3, "xmod-shim/mock-engine:latest");
        w.model_name = "tiny".into();
        w.args = ["--host", "{host}", "--port", "{port}", "{model_dir}"]
            .map(String::from)
            .to_vec();
        w.env.insert("HF_HUB_OFFLINE".into(), "1".into());
        w.labels.insert("team".into(), "ml".into());
        // A user label may not overwrite identity.
        w.labels.insert(LABEL_SERVICE_ID.into(), "spoofed".into());
        w.model = Some(ModelVolume {
            host_path: PathBuf::from("/srv/models/tiny"),
            mount_path: PathBuf::from("/models/tiny"),
        });
        w.resources.cpu = Some("500m".into());
        w.resources.memory = Some("2Gi".into());
        w.resources.accelerators = 2;
        w
    }

    fn render(w: &WorkloadSpec, gpus: &GpuRequest) -> Value {
        serde_json::to_value(create_body(w, 1, &DockerConfig::default(), gpus).unwrap()).unwrap()
    }

    #[test]
    fn the_body_carries_identity_ports_mounts_and_limits() {
        let body = render(&workload(), &GpuRequest::Count(2));
        assert_eq!(body["Image"], "xmod-shim/mock-engine:latest");
        assert_eq!(
            body["Cmd"],
            json!(["--host", "0.0.0.0", "--port", "8000", "/models/tiny"])
        );
        assert!(
            body.get("Entrypoint").is_none(),
            "keeps the image's entrypoint"
        );
        assert_eq!(body["Env"], json!(["HF_HUB_OFFLINE=1"]));
        assert_eq!(body["ExposedPorts"], json!({"8000/tcp": {}}));
        let labels = &body["Labels"];
        assert_eq!(labels[LABEL_MANAGED_BY], "xmod-shim");
        assert_eq!(labels[LABEL_SERVICE_ID], "svc1");
        assert_eq!(labels[LABEL_GENERATION], "3");
        assert_eq!(labels[LABEL_REPLICA], "1");
        assert_eq!(labels["team"], "ml");
        let host = &body["HostConfig"];
        assert_eq!(
            host["PortBindings"],
            json!({"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]})
        );
        assert_eq!(
            host["Mounts"],
            json!([{"Type": "bind", "Source": "/srv/models/tiny", "Target": "/models/tiny", "ReadOnly": true}])
        );
        assert_eq!(host["NanoCpus"], 500_000_000);
        assert_eq!(host["Memory"], 2_i64 * 1024 * 1024 * 1024);
        assert_eq!(host["RestartPolicy"]["Name"], "no");
        assert_eq!(
            host["DeviceRequests"],
            json!([{"Driver": "nvidia", "Count": 2, "Capabilities": [["gpu"]]}])
        );
        assert_eq!(body["StopTimeout"], 10);
    }

    #[test]
    fn allocated_gpus_are_requested_by_id() {
        let body = render(
            &workload(),
            &GpuRequest::Devices(vec!["0".into(), "3".into()]),
        );
        assert_eq!(
            body["HostConfig"]["DeviceRequests"],
            json!([{"Driver": "nvidia", "DeviceIDs": ["0", "3"], "Capabilities": [["gpu"]]}])
        );
    }

    #[test]
    fn a_plain_workload_asks_for_nothing_extra() {
        let mut w = WorkloadSpec::new("svc1", 1, "img");
        w.entrypoint = vec!["vllm".into(), "serve".into()];
        let body = render(&w, &GpuRequest::None);
        assert_eq!(body["Entrypoint"], json!(["vllm", "serve"]));
        for absent in ["Cmd", "Env"] {
            assert!(body.get(absent).is_none(), "{absent}");
        }
        for absent in [
            "Mounts",
            "NanoCpus",
            "Memory",
            "DeviceRequests",
            "NetworkMode",
        ] {
            assert!(body["HostConfig"].get(absent).is_none(), "{absent}");
        }
    }

    /// The create body of a one-replica workload without GPUs under `cfg`, as JSON.
    fn plain_body(cfg: &DockerConfig) -> serde_json::Value {
        let body = create_body(&WorkloadSpec::new("s", 1, "img"), 0, cfg, &GpuRequest::None);
        serde_json::to_value(body.unwrap()).unwrap()
    }

    #[test]
    fn shared_memory_settings_reach_the_host_config() {
        let cfg = DockerConfig {
            shm_size: Some("16Gi".into()),
            ipc_mode: Some("host".into()),
            ..DockerConfig::default()
        };
        let body = plain_body(&cfg);
        assert_eq!(body["HostConfig"]["ShmSize"], 16_i64 * 1024 * 1024 * 1024);
        assert_eq!(body["HostConfig"]["IpcMode"], "host");
        let bad = DockerConfig {
            shm_size: Some("lots".into()),
            ..DockerConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("shmSize"));
    }

    #[test]
    fn host_networking_publishes_nothing() {
        let cfg = DockerConfig {
            network: Some("host".into()),
            ..DockerConfig::default()
        };
        let body = plain_body(&cfg);
        assert_eq!(body["HostConfig"]["NetworkMode"], "host");
        assert!(body["HostConfig"].get("PortBindings").is_none());
    }

    #[test]
    fn bad_quantities_are_invalid_specs() {
        let mut w = workload();
        w.resources.cpu = Some("lots".into());
        let err = create_body(&w, 0, &DockerConfig::default(), &GpuRequest::None).unwrap_err();
        assert_eq!(err.reason, FailureReason::InvalidSpec);
        assert!(err.message.contains("resources.cpu"));
        w.resources.cpu = Some("0".into());
        assert!(create_body(&w, 0, &DockerConfig::default(), &GpuRequest::None).is_err());
    }

    #[test]
    fn names_are_docker_safe() {
        assert_eq!(container_name("0a1b2c3d", 2), "xmod-0a1b2c3d-2");
        assert_eq!(container_name("my svc/α", 0), "xmod-my_svc__-0");
    }
}

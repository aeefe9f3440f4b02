//! The `shimlets.docker` configuration section.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Settings of the Docker shimlet, read from `shimlets.docker` (camelCase keys, all optional):
///
/// ```yaml
/// shimlets:
///   docker:
///     socket: unix:///var/run/docker.sock  # default: DOCKER_HOST, then the local socket
///     hostIp: 127.0.0.1                    # host address published ports bind to
///     advertiseHost: 10.0.0.5              # host in endpoint URLs (default: hostIp)
///     restartPolicy: "no"                  # no | always | unless-stopped | on-failure
///     stopGracePeriodSecs: 10              # SIGTERM → SIGKILL on stop and delete
///     network: my-net                      # container network (default: Docker's bridge)
///     gpuDriver: nvidia                    # DeviceRequest driver for accelerators
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Docker Engine endpoint (`unix:///…`, `tcp://host:port`, or a bare socket path).
    /// Unset: `DOCKER_HOST`, then `unix:///var/run/docker.sock`.
    pub socket: Option<String>,
    /// Host address each replica's port is published on. The default keeps engines off the
    /// network; set `0.0.0.0` to expose them.
    pub host_ip: String,
    /// Host name or address put in endpoint URLs; unset means `hostIp` (or `127.0.0.1` when
    /// `hostIp` is a wildcard address).
    pub advertise_host: Option<String>,
    /// Docker's own restart policy. `no` by default: the engine core repairs drift itself and
    /// counts repairs, and a second, hidden restart loop would only hide crashes from it.
    pub restart_policy: RestartPolicySetting,
    /// Seconds between SIGTERM and SIGKILL when a container is stopped.
    pub stop_grace_period_secs: u32,
    /// Network to attach containers to (`NetworkMode`); unset uses Docker's default bridge.
    pub network: Option<String>,
    /// Device driver named in GPU `DeviceRequest`s.
    pub gpu_driver: String,
    /// Size of `/dev/shm` (Kubernetes quantity, e.g. "16Gi"). Docker's default of 64 MiB is too
    /// small for engines that share tensors between processes (vLLM and SGLang with tensor
    /// parallelism).
    pub shm_size: Option<String>,
    /// IPC namespace mode (`host`, `private`, `shareable`); an alternative to `shmSize`.
    pub ipc_mode: Option<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            host_ip: "127.0.0.1".into(),
            advertise_host: None,
            restart_policy: RestartPolicySetting::No,
            stop_grace_period_secs: 10,
            network: None,
            gpu_driver: "nvidia".into(),
            shm_size: None,
            ipc_mode: None,
        }
    }
}

/// Docker restart policies the shimlet may ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicySetting {
    /// Never restart (the default: the engine core repairs).
    #[default]
    #[serde(rename = "no")]
    No,
    /// Always restart, also after the daemon restarts.
    #[serde(rename = "always")]
    Always,
    /// Restart unless stopped by hand.
    #[serde(rename = "unless-stopped")]
    UnlessStopped,
    /// Restart after a non-zero exit.
    #[serde(rename = "on-failure")]
    OnFailure,
}

impl DockerConfig {
    /// Checks what serde cannot: that `hostIp` is an address.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> Result<(), String> {
        self.host_ip.parse::<IpAddr>().map_err(|_| {
            format!(
                "shimlets.docker.hostIp: {:?} is not an IP address",
                self.host_ip
            )
        })?;
        if self.gpu_driver.trim().is_empty() {
            return Err("shimlets.docker.gpuDriver must not be empty".into());
        }
        if let Some(size) = &self.shm_size {
            shim_core::quantity::parse(size)
                .map_err(|e| format!("shimlets.docker.shmSize: {e}"))?;
        }
        Ok(())
    }

    /// The engine endpoint to connect to, as a `scheme://` URL: `socket`, then `DOCKER_HOST`,
    /// then the local socket.
    pub fn endpoint(&self) -> String {
        let raw = self
            .socket
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        if raw.starts_with('/') {
            format!("unix://{raw}")
        } else {
            raw
        }
    }

    /// The host that health probes connect to: `hostIp`, except that a wildcard address is
    /// probed on loopback.
    pub fn probe_host(&self) -> String {
        match self.host_ip.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() && ip.is_ipv6() => "::1".into(),
            Ok(ip) if ip.is_unspecified() => "127.0.0.1".into(),
            _ => self.host_ip.clone(),
        }
    }

    /// The host put in endpoint URLs.
    pub fn advertised_host(&self) -> String {
        self.advertise_host
            .clone()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| self.probe_host())
    }

    /// Whether containers share the host's network stack (no port publishing).
    pub fn host_network(&self) -> bool {
        self.network.as_deref() == Some("host")
    }
}

/// `http://host:port`, with brackets around IPv6 literals.
pub(crate) fn http_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keep_engines_on_loopback_without_docker_restarts() {
        let cfg: DockerConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(cfg, DockerConfig::default());
        assert_eq!(cfg.host_ip, "127.0.0.1");
        assert_eq!(cfg.restart_policy, RestartPolicySetting::No);
        assert_eq!(cfg.stop_grace_period_secs, 10);
        assert_eq!(cfg.advertised_host(), "127.0.0.1");
        cfg.validate().unwrap();
    }

    #[test]
    fn camel_case_keys_and_policies_parse() {
        let cfg: DockerConfig = serde_json::from_value(serde_json::json!({
            "socket": "/run/docker.sock",
            "hostIp": "0.0.0.0",
            "restartPolicy": "on-failure",
            "stopGracePeriodSecs": 3,
            "network": "host",
            "gpuDriver": "cdi",
        }))
        .unwrap();
        assert_eq!(cfg.endpoint(), "unix:///run/docker.sock");
        assert_eq!(cfg.restart_policy, RestartPolicySetting::OnFailure);
        assert_eq!(cfg.probe_host(), "127.0.0.1");
        assert_eq!(cfg.advertised_host(), "127.0.0.1");
        assert!(cfg.host_network());
    }

    #[test]
    fn typos_and_bad_addresses_are_reported() {
        let typo = serde_json::from_value::<DockerConfig>(serde_json::json!({"hostIP": "1.2.3.4"}));
        assert!(typo.unwrap_err().to_string().contains("hostIP"));
        let cfg = DockerConfig {
            host_ip: "localhost".into(),
            ..DockerConfig::default()
        };
        assert!(cfg.validate().unwrap_err().contains("hostIp"));
    }

    #[test]
    fn ipv6_hosts_are_bracketed_in_urls() {
        assert_eq!(http_url("::1", 80), "http://[::1]:80");
        assert_eq!(http_url("127.0.0.1", 80), "http://127.0.0.1:80");
    }
}

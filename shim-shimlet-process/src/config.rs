//! The `shimlets.process` configuration section.

use std::time::Duration;

use serde::Deserialize;

/// Settings of the process runtime, read from `shimlets.process` (camelCase keys, all optional).
///
/// ```yaml
/// shimlets:
///   process:
///     bindHost: 127.0.0.1        # address engines bind ({host} in args) and are probed on
///     advertiseHost: 10.0.0.5    # host put in the service address; defaults to bindHost
///     stopGracePeriodSecs: 10    # SIGTERM → SIGKILL delay when stopping a replica
///     logTailLines: 20           # log lines quoted in failure messages
///     portRange: [20000, 20999]  # ports handed to replicas; any free port when absent
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Address engines are told to bind (`{host}`) and that health probes connect to.
    pub bind_host: String,
    /// Host in the address reported to the engine; `bindHost` when absent.
    pub advertise_host: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when a replica is stopped (fractions allowed).
    pub stop_grace_period_secs: f64,
    /// How many of a replica's last log lines a failure message quotes.
    pub log_tail_lines: usize,
    /// Inclusive `[from, to]` range replicas' ports are picked from; any free port when absent.
    pub port_range: Option<[u16; 2]>,
    /// A replica's log is rotated (to `<log>.1`, replacing the previous one) when a replica
    /// starts and its log is larger than this.
    pub max_log_bytes: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            bind_host: "127.0.0.1".into(),
            advertise_host: None,
            stop_grace_period_secs: 10.0,
            log_tail_lines: 20,
            port_range: None,
            max_log_bytes: 64 * 1024 * 1024,
        }
    }
}

impl ProcessConfig {
    /// Checks values serde cannot: a usable host, a non-negative grace period, an ordered range.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.bind_host.trim().is_empty() {
            return Err("shimlets.process.bindHost must not be empty".into());
        }
        if matches!(&self.advertise_host, Some(h) if h.trim().is_empty()) {
            return Err("shimlets.process.advertiseHost must not be empty when set".into());
        }
        if !self.stop_grace_period_secs.is_finite() || self.stop_grace_period_secs < 0.0 {
            return Err(format!(
                "shimlets.process.stopGracePeriodSecs must be a non-negative number, got {}",
                self.stop_grace_period_secs
            ));
        }
        if let Some([from, to]) = self.port_range
            && (from == 0 || from > to)
        {
            return Err(format!(
                "shimlets.process.portRange must be [from, to] with 0 < from <= to, got [{from}, {to}]"
            ));
        }
        Ok(())
    }

    /// The host put into service addresses.
    pub fn advertise_host(&self) -> &str {
        self.advertise_host.as_deref().unwrap_or(&self.bind_host)
    }

    /// SIGTERM → SIGKILL delay.
    pub fn stop_grace_period(&self) -> Duration {
        Duration::from_secs_f64(self.stop_grace_period_secs)
    }

    /// The host health probes connect to: the bind host, except that a wildcard bind is probed
    /// on loopback (connecting to 0.0.0.0 works on Linux but says nothing useful in logs).
    pub fn probe_host(&self) -> &str {
        match self.bind_host.as_str() {
            "0.0.0.0" => "127.0.0.1",
            "::" | "[::]" => "::1",
            other => other,
        }
    }
}

/// `host:port` for a URL, with IPv6 literals bracketed.
pub(crate) fn url_authority(host: &str, port: impl std::fmt::Display) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_camel_case_keys() {
        let cfg: ProcessConfig = serde_json::from_value(serde_json::json!({
            "bindHost": "0.0.0.0",
            "advertiseHost": "node-1",
            "stopGracePeriodSecs": 2,
            "portRange": [20000, 20010]
        }))
        .unwrap();
        assert_eq!(cfg.advertise_host(), "node-1");
        assert_eq!(cfg.probe_host(), "127.0.0.1");
        assert_eq!(cfg.stop_grace_period(), Duration::from_secs(2));
        assert_eq!(cfg.log_tail_lines, 20);
        assert!(cfg.validate().is_ok());

        let default = ProcessConfig::default();
        assert_eq!(default.advertise_host(), "127.0.0.1");
        assert_eq!(default.stop_grace_period(), Duration::from_secs(10));
    }

    #[test]
    fn typos_and_bad_values_are_rejected() {
        assert!(
            serde_json::from_value::<ProcessConfig>(serde_json::json!({"bindhost": "x"})).is_err()
        );
        let backwards = ProcessConfig {
            port_range: Some([2000, 1000]),
            ..ProcessConfig::default()
        };
        assert!(backwards.validate().unwrap_err().contains("portRange"));
        let negative = ProcessConfig {
            stop_grace_period_secs: -1.0,
            ..ProcessConfig::default()
        };
        assert!(negative.validate().is_err());
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(url_authority("::1", 80), "[::1]:80");
        assert_eq!(url_authority("[::1]", 80), "[::1]:80");
        assert_eq!(url_authority("localhost", 80), "localhost:80");
    }
}

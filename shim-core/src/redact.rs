//! Secrets in environment values (API keys, tokens, passwords) never leave the shim in what it
//! shows: dry runs, rendered manifests and process plans. A variable is secret when its name
//! contains KEY, TOKEN, SECRET or PASSWORD (any case); its value is replaced by [`REDACTED`].
//! What the runtime receives is never changed: only what is shown.

use std::collections::BTreeMap;

use serde_json::Value;

/// What a secret value is shown as.
pub const REDACTED: &str = "<redacted>";

/// Whether an environment variable's name marks its value as secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["KEY", "TOKEN", "SECRET", "PASSWORD"]
        .iter()
        .any(|word| upper.contains(word))
}

/// Redacts the secret values of an environment map.
pub fn redact_env(env: &mut BTreeMap<String, String>) {
    for (name, value) in env.iter_mut() {
        if is_secret_name(name) {
            *value = REDACTED.to_string();
        }
    }
}

/// Redacts secret environment values anywhere in a runtime's rendering, in the shapes the
/// runtimes use: a map under a key named `env` (process plans, workloads), Kubernetes `EnvVar`
/// objects (`{"name", "value"}`), and Docker's `Env` list of `NAME=value` strings.
pub fn redact_json(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let secret_env_var = map
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(is_secret_name)
                && map.get("value").is_some_and(Value::is_string);
            if secret_env_var {
                map.insert("value".into(), REDACTED.into());
            }
            for (key, child) in map.iter_mut() {
                if key.eq_ignore_ascii_case("env") {
                    redact_env_value(child);
                }
                redact_json(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        _ => {}
    }
}

/// An `env` field: a map of name to value, or a list of `NAME=value` strings.
fn redact_env_value(env: &mut Value) {
    match env {
        Value::Object(map) => {
            for (name, value) in map.iter_mut() {
                if is_secret_name(name) && value.is_string() {
                    *value = REDACTED.into();
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                if let Some((name, _)) = item.as_str().and_then(|s| s.split_once('='))
                    && is_secret_name(name)
                {
                    *item = format!("{name}={REDACTED}").into();
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secret_names_are_recognised_in_any_case() {
        for name in [
            "HF_TOKEN",
            "openai_api_key",
            "DbPassword",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "PATH"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn every_runtime_shape_is_redacted_and_nothing_else() {
        let mut rendered = json!({
            "workload": {"env": {"HF_TOKEN": "hf_abc", "HF_HUB_OFFLINE": "1"}},
            "deployment": {"spec": {"template": {"spec": {"containers": [{"env": [
                {"name": "API_KEY", "value": "k-123"},
                {"name": "MODE", "value": "fast"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}
            ]}]}}}},
            "container": {"Env": ["OPENAI_API_KEY=sk-1", "PORT=8000"]},
            "args": ["--api-key", "stays: not an environment value"]
        });
        redact_json(&mut rendered);
        assert_eq!(
            rendered,
            json!({
                "workload": {"env": {"HF_TOKEN": REDACTED, "HF_HUB_OFFLINE": "1"}},
                "deployment": {"spec": {"template": {"spec": {"containers": [{"env": [
                    {"name": "API_KEY", "value": REDACTED},
                    {"name": "MODE", "value": "fast"},
                    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}
                ]}]}}}},
                "container": {"Env": [format!("OPENAI_API_KEY={REDACTED}"), "PORT=8000"]},
                "args": ["--api-key", "stays: not an environment value"]
            })
        );
    }
}

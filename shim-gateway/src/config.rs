//! The `gateway:` section of the configuration.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Settings of the OpenAI-compatible gateway (`gateway:` in the YAML file,
/// `XMOD_SHIM_GATEWAY__<KEY>` in the environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayConfig {
    /// Largest request body accepted; larger ones get 413. Default 32 MiB (long contexts).
    pub max_body_bytes: usize,
    /// How a replica is chosen among a model's ready replicas.
    pub balance: Balance,
    /// Characters of the rendered prompt that `balance: prefix` hashes.
    pub prefix_chars: usize,
    /// Requests that may wait per model while it starts; more get 429.
    pub queue_size: usize,
    /// How long a request waits for a starting model before it gets 503.
    pub cold_start_timeout_secs: u64,
    /// How long a replica that refused a connection is left out of balancing.
    pub cooldown_secs: u64,
    /// Keys `/v1/*` accepts; none = open. See [`ApiKey`].
    pub api_keys: ApiKeys,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 * 1024 * 1024,
            balance: Balance::LeastInFlight,
            prefix_chars: 100,
            queue_size: 256,
            cold_start_timeout_secs: 600,
            cooldown_secs: 5,
            api_keys: ApiKeys::default(),
        }
    }
}

impl GatewayConfig {
    pub(crate) fn cold_start_timeout(&self) -> Duration {
        Duration::from_secs(self.cold_start_timeout_secs)
    }

    pub(crate) fn cooldown(&self) -> Duration {
        Duration::from_secs(self.cooldown_secs)
    }
}

/// Balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Balance {
    /// The replica with the fewest requests in flight (ties rotate).
    #[serde(
        alias = "leastinflight",
        alias = "least-in-flight",
        alias = "least_in_flight"
    )]
    LeastInFlight,
    /// Consistent hashing with bounded load over the start of the prompt (KubeAI's CHWBL), so
    /// prompts sharing a prefix reach the replica holding it in its KV cache.
    Prefix,
}

/// One accepted key, optionally limited to some models (served names or service ids).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The bearer token.
    pub key: String,
    /// Models this key may use; empty = all.
    #[serde(default)]
    pub models: Vec<String>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: never in logs.
        f.debug_struct("ApiKey")
            .field("key", &"<redacted>")
            .field("models", &self.models)
            .finish()
    }
}

impl ApiKey {
    /// Parses `key` or `key=model1|model2` (the form environment variables use).
    fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim();
        let (key, models) = match entry.split_once('=') {
            Some((key, models)) => (
                key.trim(),
                models
                    .split('|')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (entry, Vec::new()),
        };
        (!key.is_empty()).then(|| Self {
            key: key.to_owned(),
            models,
        })
    }

    /// Whether this key may use `model` (matched by served name or service id).
    pub(crate) fn allows(&self, served: &str, ids: &[String]) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|m| m == served || ids.iter().any(|id| id == m))
    }
}

/// The accepted keys. In YAML a list whose items are strings (`key` or `key=m1|m2`) or objects
/// (`{key, models}`); in the environment a comma-separated string
/// (`XMOD_SHIM_GATEWAY__APIKEYS=k1,k2=llama|qwen`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(pub Vec<ApiKey>);

impl ApiKeys {
    /// True when the gateway is open.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for ApiKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ApiKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = serde_json::Value::deserialize(deserializer)?;
        let mut keys = Vec::new();
        let push_text = |text: &str, keys: &mut Vec<ApiKey>| {
            keys.extend(text.split(',').filter_map(ApiKey::parse));
        };
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::String(text) => push_text(&text, &mut keys),
            // Figment reads an all-digit environment value as a number; it is still a key.
            serde_json::Value::Number(n) => push_text(&n.to_string(), &mut keys),
            serde_json::Value::Array(items) => {
                for item in items {
                    match item {
                        serde_json::Value::String(text) => push_text(&text, &mut keys),
                        serde_json::Value::Number(n) => push_text(&n.to_string(), &mut keys),
                        object @ serde_json::Value::Object(_) => {
                            let key: ApiKey = serde_json::from_value(object)
                                .map_err(|e| D::Error::custom(format!("gateway.apiKeys: {e}")))?;
                            if key.key.is_empty() {
                                return Err(D::Error::custom("gateway.apiKeys: empty `key`"));
                            }
                            keys.push(key);
                        }
                        other => {
                            return Err(D::Error::custom(format!(
                                "gateway.apiKeys: expected a string or {{key, models}}, got {other}"
                            )));
                        }
                    }
                }
            }
            other => {
                return Err(D::Error::custom(format!(
                    "gateway.apiKeys: expected a list or a comma-separated string, got {other}"
                )));
            }
        }
        Ok(Self(keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_from_env_text_and_yaml_lists() {
        let from_env: ApiKeys =
            serde_json::from_value(serde_json::json!("k1, k2=llama|qwen ,")).unwrap();
        assert_eq!(
            from_env.0,
            vec![
                ApiKey {
                    key: "k1".into(),
                    models: vec![]
                },
                ApiKey {
                    key: "k2".into(),
                    models: vec!["llama".into(), "qwen".into()]
                },
            ]
        );
        let from_yaml: ApiKeys =
            serde_json::from_value(serde_json::json!(["a", {"key": "b", "models": ["m"]}, 1234]))
                .unwrap();
        assert_eq!(from_yaml.0.len(), 3);
        assert_eq!(from_yaml.0[1].models, vec!["m".to_owned()]);
        assert_eq!(from_yaml.0[2].key, "1234");
        let bad = serde_json::from_value::<ApiKeys>(serde_json::json!([true])).unwrap_err();
        assert!(bad.to_string().contains("gateway.apiKeys"), "{bad}");
    }

    #[test]
    fn config_reads_camel_case_with_defaults() {
        let config: GatewayConfig = serde_json::from_value(
            serde_json::json!({"balance": "prefix", "queueSize": 3, "maxBodyBytes": 10}),
        )
        .unwrap();
        assert_eq!(config.balance, Balance::Prefix);
        assert_eq!(config.queue_size, 3);
        assert_eq!(config.max_body_bytes, 10);
        assert_eq!(config.cold_start_timeout_secs, 600);
        assert!(format!("{:?}", ApiKey::parse("secret").unwrap()).contains("redacted"));
    }
}

//! The deploy/update request (the wire type the client sends) and its validation.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::quantity;

/// What a client asks for: the body of `POST /deploy` and `PUT /{id}` (camelCase on the wire).
///
/// Unknown fields are ignored and `null` is treated as absent, as the real client expects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploySpec {
    /// Directory name under the model root; also the name the engine serves the model as.
    #[serde(default, deserialize_with = "null_as_default")]
    pub model_name: String,
    /// Explicit model directory; must lie inside an allowed root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_file_dir: Option<String>,
    /// Accelerators, cpu and memory; absent or empty means "no accelerators".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_requirements: Option<ResourceRequirements>,
    /// Number of replicas; absent means 1, 0 means scaled to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_count: Option<i64>,
    /// Maximum context length the engine should allow (vLLM `--max-model-len`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<i64>,
    /// Extra environment for the engine.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<EnvVar>,
    /// Engine preset (`vllm`, `sglang`, `llamacpp`, `mock`); absent means the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// Resources one replica needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// Free text such as "NVIDIA GPU"; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_type: Option<String>,
    /// Accelerators per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_count: Option<i64>,
    /// CPU as a Kubernetes quantity ("4", "500m"); numbers are accepted too.
    #[serde(
        default,
        deserialize_with = "string_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu: Option<String>,
    /// Memory as a Kubernetes quantity ("16Gi").
    #[serde(
        default,
        deserialize_with = "string_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<String>,
}

/// One environment variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Variable name.
    #[serde(default)]
    pub key: String,
    /// Variable value.
    #[serde(default, deserialize_with = "null_as_default")]
    pub value: String,
}

/// A broken rule in a request, naming the field as the client spelled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Field path, e.g. `resourceRequirements.acceleratorCount`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// "field: message; field: message".
    pub fn join(errors: &[FieldError]) -> String {
        errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Limits that validation enforces; from the engine's configuration.
#[derive(Debug, Clone)]
pub struct ValidationPolicy {
    /// Directory that holds one sub-directory per model.
    pub model_root: PathBuf,
    /// Roots an explicit `modelFileDir` may lie in (the model root is always allowed).
    pub allowed_model_dirs: Vec<PathBuf>,
    /// Most accelerators one replica may ask for.
    pub max_accelerators: u32,
    /// Most replicas one service may ask for.
    pub max_replicas: u32,
}

/// Longest `modelName` accepted (a DNS subdomain's limit, so names survive into Kubernetes).
pub const MAX_MODEL_NAME: usize = 253;
/// Largest value of one environment variable.
pub const MAX_ENV_VALUE: usize = 32 * 1024;

impl DeploySpec {
    /// A spec with just a model name, as the smallest client request carries.
    pub fn named(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            ..Self::default()
        }
    }

    /// Replicas wanted (absent means 1).
    pub fn replicas(&self) -> u32 {
        self.replica_count
            .map_or(1, |n| n.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// Accelerators per replica (absent or empty requirements mean 0).
    pub fn accelerators(&self) -> u32 {
        self.resource_requirements
            .as_ref()
            .and_then(|r| r.accelerator_count)
            .map_or(0, |n| n.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// Checks every rule and returns all broken ones.
    ///
    /// # Errors
    /// One [`FieldError`] per broken rule.
    pub fn validate(&self, policy: &ValidationPolicy) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        validate_model_name(&self.model_name, &mut errors);
        if let Some(dir) = &self.model_file_dir
            && let Err(message) = check_model_dir(Path::new(dir), policy)
        {
            errors.push(FieldError::new("modelFileDir", message));
        }
        if let Some(res) = &self.resource_requirements {
            if let Some(count) = res.accelerator_count {
                if count < 0 {
                    errors.push(FieldError::new(
                        "resourceRequirements.acceleratorCount",
                        "must be >= 0",
                    ));
                } else if count > i64::from(policy.max_accelerators) {
                    errors.push(FieldError::new(
                        "resourceRequirements.acceleratorCount",
                        format!(
                            "{count} exceeds the configured maximum of {}",
                            policy.max_accelerators
                        ),
                    ));
                }
            }
            for (field, value) in [("cpu", &res.cpu), ("memory", &res.memory)] {
                if let Some(value) = value
                    && let Err(message) = quantity::parse(value)
                {
                    errors.push(FieldError::new(
                        format!("resourceRequirements.{field}"),
                        message,
                    ));
                }
            }
        }
        if let Some(count) = self.replica_count {
            if count < 0 {
                errors.push(FieldError::new("replicaCount", "must be >= 0"));
            } else if count > i64::from(policy.max_replicas) {
                errors.push(FieldError::new(
                    "replicaCount",
                    format!(
                        "{count} exceeds the configured maximum of {}",
                        policy.max_replicas
                    ),
                ));
            }
        }
        if let Some(len) = self.context_length
            && !(1..=i64::from(u32::MAX)).contains(&len)
        {
            errors.push(FieldError::new(
                "contextLength",
                "must be a positive integer",
            ));
        }
        let mut seen = HashSet::new();
        for (i, var) in self.env.iter().enumerate() {
            if !is_env_name(&var.key) {
                errors.push(FieldError::new(
                    format!("env[{i}].key"),
                    format!(
                        "{:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                        var.key
                    ),
                ));
            } else if !seen.insert(var.key.as_str()) {
                errors.push(FieldError::new(
                    format!("env[{i}].key"),
                    format!("{:?} appears twice", var.key),
                ));
            }
            if var.value.len() > MAX_ENV_VALUE {
                errors.push(FieldError::new(
                    format!("env[{i}].value"),
                    "is longer than 32 KiB",
                ));
            }
            if var.value.contains('\0') {
                errors.push(FieldError::new(
                    format!("env[{i}].value"),
                    "contains a NUL byte",
                ));
            }
        }
        if let Some(engine) = &self.engine
            && engine.trim().is_empty()
        {
            errors.push(FieldError::new("engine", "must not be empty when given"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The directory the model lives in: `modelFileDir` when given, else `<model root>/<modelName>`.
    /// Purely lexical; the pipeline checks existence and symlinks where it can see the files.
    pub fn model_dir(&self, policy: &ValidationPolicy) -> PathBuf {
        match &self.model_file_dir {
            Some(dir) => PathBuf::from(dir),
            None => policy.model_root.join(&self.model_name),
        }
    }
}

fn validate_model_name(name: &str, errors: &mut Vec<FieldError>) {
    let problem = if name.trim().is_empty() {
        Some("is required and must not be empty".to_string())
    } else if name.len() > MAX_MODEL_NAME {
        Some(format!(
            "is {} characters long; at most {MAX_MODEL_NAME} are allowed",
            name.len()
        ))
    } else if name.contains(['/', '\\', '\0']) {
        Some(
            "must not contain '/', '\\' or NUL: it names one directory under the model root".into(),
        )
    } else if name == "." || name.contains("..") {
        Some("must not contain '..' or be '.'".into())
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters".into())
    } else {
        None
    };
    if let Some(message) = problem {
        errors.push(FieldError::new("modelName", message));
    }
}

/// Checks that an explicit model directory is absolute, has no `..`, and lies in an allowed root.
pub fn check_model_dir(dir: &Path, policy: &ValidationPolicy) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("{} must be an absolute path", dir.display()));
    }
    if dir.components().any(|c| matches!(c, Component::ParentDir))
        || dir.to_string_lossy().contains('\0')
    {
        return Err(format!("{} must not contain '..' or NUL", dir.display()));
    }
    let allowed = std::iter::once(&policy.model_root).chain(&policy.allowed_model_dirs);
    let roots: Vec<_> = allowed.map(|r| absolute(r)).collect();
    if roots.iter().any(|root| dir.starts_with(root)) {
        Ok(())
    } else {
        let list = roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "{} is outside the allowed model roots ({list})",
            dir.display()
        ))
    }
}

/// Makes a configured path absolute against the working directory, without touching the disk.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn is_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

fn string_or_number<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        Float(f64),
    }
    Ok(match Option::<Raw>::deserialize(de)? {
        None => None,
        Some(Raw::Text(s)) => Some(s),
        Some(Raw::Int(n)) => Some(n.to_string()),
        Some(Raw::Float(n)) => Some(n.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ValidationPolicy {
        ValidationPolicy {
            model_root: "/models".into(),
            allowed_model_dirs: vec!["/data/extra".into()],
            max_accelerators: 8,
            max_replicas: 10,
        }
    }

    fn fields(spec: &DeploySpec) -> Vec<String> {
        spec.validate(&policy())
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn the_real_clients_smallest_body_parses_and_validates() {
        let body = r#"{"modelName":"qwen","replicaCount":2,"resourceRequirements":{"acceleratorCount":1},"contextLength":4096,"unknownField":true}"#;
        let spec: DeploySpec = serde_json::from_str(body).unwrap();
        assert_eq!(spec.replicas(), 2);
        assert_eq!(spec.accelerators(), 1);
        assert_eq!(spec.context_length, Some(4096));
        assert!(spec.validate(&policy()).is_ok());
    }

    #[test]
    fn empty_or_missing_resource_requirements_mean_no_accelerators() {
        for body in [
            r#"{"modelName":"m","resourceRequirements":{}}"#,
            r#"{"modelName":"m"}"#,
            r#"{"modelName":"m","resourceRequirements":null,"env":null}"#,
        ] {
            let spec: DeploySpec = serde_json::from_str(body).unwrap();
            assert_eq!(spec.accelerators(), 0);
            assert_eq!(spec.replicas(), 1);
            assert!(spec.validate(&policy()).is_ok(), "{body}");
        }
    }

    #[test]
    fn model_names_cannot_escape_the_model_root() {
        for bad in [
            "",
            "  ",
            "../etc",
            "a/b",
            "a\\b",
            "..",
            ".",
            "x\0y",
            &"a".repeat(254),
        ] {
            assert_eq!(fields(&DeploySpec::named(bad)), ["modelName"], "{bad:?}");
        }
        assert!(fields(&DeploySpec::named("Qwen2.5-7B-Instruct")).is_empty());
    }

    #[test]
    fn model_file_dir_must_lie_in_an_allowed_root() {
        let with_dir = |d: &str| DeploySpec {
            model_file_dir: Some(d.into()),
            ..DeploySpec::named("m")
        };
        assert!(fields(&with_dir("/models/m")).is_empty());
        assert!(fields(&with_dir("/data/extra/m")).is_empty());
        assert_eq!(fields(&with_dir("/etc")), ["modelFileDir"]);
        assert_eq!(fields(&with_dir("/models/../etc")), ["modelFileDir"]);
        assert_eq!(fields(&with_dir("models/m")), ["modelFileDir"]);
    }

    #[test]
    fn numeric_limits_name_their_fields() {
        let spec: DeploySpec = serde_json::from_str(
            r#"{"modelName":"m","replicaCount":-1,"contextLength":0,
                "resourceRequirements":{"acceleratorCount":9,"cpu":"lots","memory":"16Qi"}}"#,
        )
        .unwrap();
        assert_eq!(
            fields(&spec),
            [
                "resourceRequirements.acceleratorCount",
                "resourceRequirements.cpu",
                "resourceRequirements.memory",
                "replicaCount",
                "contextLength"
            ]
        );
        let too_many = DeploySpec {
            replica_count: Some(11),
            ..DeploySpec::named("m")
        };
        assert_eq!(fields(&too_many), ["replicaCount"]);
        let scaled_to_zero = DeploySpec {
            replica_count: Some(0),
            ..DeploySpec::named("m")
        };
        assert!(fields(&scaled_to_zero).is_empty());
    }

    #[test]
    fn cpu_may_arrive_as_a_number() {
        let spec: DeploySpec = serde_json::from_str(
            r#"{"modelName":"m","resourceRequirements":{"cpu":4,"memory":"16Gi"}}"#,
        )
        .unwrap();
        assert_eq!(
            spec.resource_requirements.unwrap().cpu.as_deref(),
            Some("4")
        );
    }

    #[test]
    fn env_keys_are_identifiers_without_duplicates_and_values_are_bounded() {
        let env = |pairs: &[(&str, String)]| DeploySpec {
            env: pairs
                .iter()
                .map(|(k, v)| EnvVar {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
            ..DeploySpec::named("m")
        };
        assert!(fields(&env(&[("HF_HOME", "x".into()), ("_A1", String::new())])).is_empty());
        assert_eq!(fields(&env(&[("1A", "x".into())])), ["env[0].key"]);
        assert_eq!(fields(&env(&[("A-B", "x".into())])), ["env[0].key"]);
        assert_eq!(
            fields(&env(&[("A", "x".into()), ("A", "y".into())])),
            ["env[1].key"]
        );
        assert_eq!(
            fields(&env(&[("A", "x".repeat(MAX_ENV_VALUE + 1))])),
            ["env[0].value"]
        );
    }
}

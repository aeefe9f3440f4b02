//! Model inspection and GPU memory planning for xmod-shim.
//!
//! [`inspect`] reads a model directory's headers (GGUF, or safetensors shards plus `config.json`)
//! into a [`ModelInfo`] without loading weights; [`estimate`] turns it into the memory one replica
//! needs per GPU for an engine ([`FitProfile`], preset data), and [`plan`] compares that with the
//! GPUs' free memory, saying in numbers why a model does not fit and what would.
//!
//! No runtime is needed: everything here is file headers and arithmetic.

pub mod estimate;
pub mod gguf;
pub mod st;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use estimate::{
    Estimate, Estimator, FitProfile, GpuMemory, Plan, estimate, format_gib, max_context, plan,
};

/// Inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what its name says, or is cut short.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The directory holds no model this crate can read.
    #[error("{0}")]
    Unsupported(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// A model's on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// One `.gguf` file (llama.cpp).
    Gguf,
    /// `*.safetensors` shards plus `config.json` (vLLM, SGLang).
    Safetensors,
}

impl ModelFormat {
    /// `"gguf"` or `"safetensors"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Safetensors => "safetensors",
        }
    }
}

/// What planning needs to know about a model. `None` means the files do not say.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// File format.
    pub format: ModelFormat,
    /// The files read.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    /// e.g. `llama` (GGUF) or `LlamaForCausalLM` (config.json).
    pub architecture: Option<String>,
    /// Elements over all tensors (packed quantised safetensors count stored elements).
    pub parameters: u64,
    /// Bytes of tensor data: what the engine loads onto the GPUs.
    pub weights_bytes: u64,
    /// e.g. `Q4_K_M`, `F32`, `BF16`, `gptq-4bit`.
    pub quantization: Option<String>,
    /// Transformer blocks.
    pub layers: Option<u64>,
    /// Attention (query) heads.
    pub heads: Option<u64>,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: Option<u64>,
    /// Key head dimension.
    pub head_dim: Option<u64>,
    /// Value head dimension (equals `head_dim` except in a few architectures).
    pub value_head_dim: Option<u64>,
    /// Model width.
    pub embedding_length: Option<u64>,
    /// Vocabulary size.
    pub vocab_size: Option<u64>,
    /// Feed-forward width.
    pub feed_forward_length: Option<u64>,
    /// Trained context length (`context_length`, `max_position_embeddings`).
    pub max_context_length: Option<u64>,
}

impl ModelInfo {
    /// Whether the attention shape is known, so the KV cache can be estimated.
    pub fn has_shape(&self) -> bool {
        self.layers.is_some() && self.kv_heads.is_some() && self.head_dim.is_some()
    }
}

/// Inspects the model in `dir`: the one `.gguf` file when there is one, else safetensors.
///
/// # Errors
/// [`ModelError::Unsupported`] when the directory holds neither; several `.gguf` files are also
/// unsupported (the engine would not know which to load); read and parse errors.
pub fn inspect(dir: &Path) -> Result<ModelInfo, ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut ggufs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf") && p.is_file())
        .collect();
    ggufs.sort();
    match ggufs.len() {
        0 => {}
        1 => return inspect_gguf(&ggufs[0]),
        n => {
            return Err(ModelError::Unsupported(format!(
                "{} holds {n} .gguf files; keep exactly one",
                dir.display()
            )));
        }
    }
    let shards = st::shards(dir)?;
    if shards.is_empty() {
        return Err(ModelError::Unsupported(format!(
            "{} holds no .gguf or .safetensors file",
            dir.display()
        )));
    }
    inspect_safetensors(dir, shards)
}

/// Inspects one GGUF file.
///
/// # Errors
/// Read and parse errors.
pub fn inspect_gguf(path: &Path) -> Result<ModelInfo, ModelError> {
    let file = gguf::read(path)?;
    let heads = file.arch_u64("attention.head_count");
    let embedding = file.arch_u64("embedding_length");
    let head_dim = file
        .arch_u64("attention.key_length")
        .or_else(|| match (embedding, heads) {
            (Some(e), Some(h)) if h > 0 => Some(e / h),
            _ => None,
        });
    let value_head_dim = file.arch_u64("attention.value_length").or(head_dim);
    let vocab_size =
        file.arch_u64("vocab_size")
            .or_else(|| match file.metadata.get("tokenizer.ggml.tokens") {
                Some(gguf::Value::Array { len, .. }) => Some(*len),
                _ => None,
            });
    let quantization = file
        .metadata
        .get("general.file_type")
        .and_then(gguf::Value::as_u64)
        .and_then(gguf::file_type_name)
        .map(String::from)
        .or_else(|| file.bytes_by_type().first().map(|(t, _)| t.clone()));
    Ok(ModelInfo {
        format: ModelFormat::Gguf,
        files: vec![path.to_path_buf()],
        architecture: file.architecture().map(String::from),
        parameters: file.tensors.iter().map(gguf::TensorInfo::elements).sum(),
        weights_bytes: file.tensors.iter().map(|t| t.bytes).sum(),
        quantization,
        layers: file.arch_u64("block_count"),
        heads,
        kv_heads: file.arch_u64("attention.head_count_kv").or(heads),
        head_dim,
        value_head_dim,
        embedding_length: embedding,
        vocab_size,
        feed_forward_length: file.arch_u64("feed_forward_length"),
        max_context_length: file.arch_u64("context_length"),
    })
}

fn inspect_safetensors(dir: &Path, shards: Vec<PathBuf>) -> Result<ModelInfo, ModelError> {
    let mut parameters = 0;
    let mut bytes = 0;
    let mut by_dtype = std::collections::BTreeMap::<String, u64>::new();
    for shard in &shards {
        let s = st::read_shard(shard)?;
        parameters += s.parameters;
        bytes += s.bytes;
        for (d, b) in s.bytes_by_dtype {
            *by_dtype.entry(d).or_default() += b;
        }
    }
    let config = st::read_config(dir)?.unwrap_or_default();
    let dominant = by_dtype
        .iter()
        .max_by_key(|(_, b)| **b)
        .map(|(d, _)| d.clone());
    let quantization = config
        .quantization
        .clone()
        .or_else(|| config.torch_dtype.as_deref().map(canonical_dtype))
        .or(dominant);
    Ok(ModelInfo {
        format: ModelFormat::Safetensors,
        files: shards,
        architecture: config.architecture,
        parameters,
        weights_bytes: bytes,
        quantization,
        layers: config.layers,
        heads: config.heads,
        kv_heads: config.kv_heads,
        head_dim: config.head_dim,
        value_head_dim: config.head_dim,
        embedding_length: config.hidden_size,
        vocab_size: config.vocab_size,
        feed_forward_length: config.intermediate_size,
        max_context_length: config.max_position_embeddings,
    })
}

/// `bfloat16` → `BF16`, so GGUF and safetensors models read alike.
fn canonical_dtype(dtype: &str) -> String {
    match dtype {
        "bfloat16" => "BF16".into(),
        "float16" | "half" => "F16".into(),
        "float32" | "float" => "F32".into(),
        other => other.to_uppercase(),
    }
}

//! safetensors models: shard headers (through the `safetensors` crate's `Metadata`, which checks
//! the offsets) and the Hugging Face `config.json` beside them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata};
use serde_json::Value;

use crate::ModelError;

/// The largest header accepted (the crate's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// What one shard holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardSummary {
    /// Elements over all tensors.
    pub parameters: u64,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Bytes per dtype name (e.g. `BF16`).
    pub bytes_by_dtype: BTreeMap<String, u64>,
}

/// Reads one shard's header; the tensor data is not read, so sparse test files work.
///
/// # Errors
/// [`ModelError::Io`]; [`ModelError::Corrupt`] for a bad header or a file shorter than it says.
pub fn read_shard(path: &Path) -> Result<ShardSummary, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt {
        path: path.display().to_string(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_bytes = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| corrupt(format!("no header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n.saturating_add(8) > file_bytes {
        return Err(corrupt(format!(
            "header length {n} does not fit a {file_bytes}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| corrupt(format!("truncated header: {e}")))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("invalid safetensors header: {e}")))?;
    let data_len = metadata.data_len() as u64;
    if 8 + n + data_len > file_bytes {
        return Err(corrupt(format!(
            "header describes {data_len} bytes of data but the file has {}",
            file_bytes - 8 - n
        )));
    }
    let mut summary = ShardSummary::default();
    for info in metadata.tensors().values() {
        let elements: u64 = info.shape.iter().map(|d| *d as u64).product();
        let bytes = (info.data_offsets.1 - info.data_offsets.0) as u64;
        summary.parameters += elements;
        summary.bytes += bytes;
        *summary
            .bytes_by_dtype
            .entry(dtype_name(info.dtype))
            .or_default() += bytes;
    }
    Ok(summary)
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// The shards of the model in `dir`: those named by `model.safetensors.index.json` when it
/// exists (so stray files are not counted), else every `*.safetensors` file.
///
/// # Errors
/// An unreadable directory or index; an index naming a missing shard.
pub fn shards(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: index.display().to_string(),
            message: e.to_string(),
        })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Corrupt {
                path: index.display().to_string(),
                message: "no weight_map object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values().filter_map(Value::as_str) {
            // Shard names are plain file names; anything else could leave the model directory.
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(ModelError::Corrupt {
                    path: index.display().to_string(),
                    message: format!("shard name {shard:?} is not a file name"),
                });
            }
            let path = dir.join(shard);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        for f in &files {
            if !f.is_file() {
                return Err(ModelError::Corrupt {
                    path: index.display().to_string(),
                    message: format!("names shard {} which does not exist", f.display()),
                });
            }
        }
        return Ok(files);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The fields of a Hugging Face `config.json` that memory planning needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HfConfig {
    /// `architectures[0]`, else `model_type`.
    pub architecture: Option<String>,
    /// `num_hidden_layers`.
    pub layers: Option<u64>,
    /// `num_attention_heads`.
    pub heads: Option<u64>,
    /// `num_key_value_heads` (defaults to `heads`: no grouped-query attention).
    pub kv_heads: Option<u64>,
    /// `head_dim`, else `hidden_size / num_attention_heads`.
    pub head_dim: Option<u64>,
    /// `hidden_size`.
    pub hidden_size: Option<u64>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: Option<u64>,
    /// `torch_dtype` (or `dtype` in newer transformers).
    pub torch_dtype: Option<String>,
    /// `quantization_config.quant_method`, with `bits` when given (e.g. `gptq-4bit`).
    pub quantization: Option<String>,
    /// `vocab_size`.
    pub vocab_size: Option<u64>,
    /// `intermediate_size`.
    pub intermediate_size: Option<u64>,
}

/// Reads `dir/config.json`; `None` when there is none.
///
/// # Errors
/// [`ModelError::Corrupt`] for a file that is not JSON.
pub fn read_config(dir: &Path) -> Result<Option<HfConfig>, ModelError> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(&path, e)),
    };
    let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(Some(parse_config(&json)))
}

/// The planning fields of a parsed `config.json`. Multimodal models keep the language model's
/// shape under `text_config`; its fields win when present.
pub fn parse_config(json: &Value) -> HfConfig {
    let text = json.get("text_config").filter(|v| v.is_object());
    let num = |key: &str| {
        text.and_then(|t| t.get(key))
            .and_then(Value::as_u64)
            .or_else(|| json.get(key).and_then(Value::as_u64))
    };
    let string = |key: &str| {
        json.get(key)
            .and_then(Value::as_str)
            .or_else(|| text.and_then(|t| t.get(key)).and_then(Value::as_str))
            .map(String::from)
    };
    let heads = num("num_attention_heads");
    let hidden_size = num("hidden_size");
    let head_dim = num("head_dim").or_else(|| match (hidden_size, heads) {
        (Some(h), Some(n)) if n > 0 => Some(h / n),
        _ => None,
    });
    let quantization = json
        .get("quantization_config")
        .and_then(Value::as_object)
        .map(|q| {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("quantized");
            match q.get("bits").and_then(Value::as_u64) {
                Some(bits) => format!("{method}-{bits}bit"),
                None => method.to_string(),
            }
        });
    HfConfig {
        architecture: json
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(String::from)
            .or_else(|| string("model_type")),
        layers: num("num_hidden_layers").or_else(|| num("n_layer")),
        heads,
        kv_heads: num("num_key_value_heads").or(heads),
        head_dim,
        hidden_size,
        max_position_embeddings: num("max_position_embeddings")
            .or_else(|| num("max_sequence_length")),
        torch_dtype: string("torch_dtype").or_else(|| string("dtype")),
        quantization,
        vocab_size: num("vocab_size"),
        intermediate_size: num("intermediate_size"),
    }
}

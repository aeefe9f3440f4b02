//! A small GGUF reader: the header's metadata and the tensor infos, never the tensor data.
//!
//! Written here rather than taken from a crate because only the header is needed, the format is
//! small and stable (v2/v3), and the table of quantisation block sizes must follow llama.cpp's
//! newest types (MXFP4, TQ*) which the published crates lag behind. Tested against files written
//! by PyPI `gguf` (the reference writer).

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::ModelError;

/// A metadata value. Arrays keep their length; small numeric arrays (per-layer head counts)
/// keep their values too, so long token lists do not stay in memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string (lossy).
    String(String),
    /// An array: its length, and its numeric values when it has at most [`KEPT_ARRAY`] of them.
    Array {
        /// Number of elements.
        len: u64,
        /// The values, for short numeric arrays.
        values: Vec<Value>,
    },
}

/// Numeric arrays up to this length keep their values.
pub const KEPT_ARRAY: u64 = 4096;

impl Value {
    /// The value as an unsigned integer; for arrays, their largest element (llama.cpp allows
    /// per-layer head counts as arrays; the largest layer decides the memory).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(v) => Some(*v),
            Value::Int(v) => u64::try_from(*v).ok(),
            Value::Array { values, .. } => values.iter().filter_map(Value::as_u64).max(),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (ggml order).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub type_id: u32,
    /// Offset inside the data section.
    pub offset: u64,
    /// Bytes of its data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file's header.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// File size in bytes.
    pub file_bytes: u64,
}

/// `(name, elements per block, bytes per block)` of the ggml types, by id (ggml.h `ggml_type`).
fn ggml_type(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

/// The name of ggml type `id` (`"type42"` for ids this table does not know).
pub fn type_name(id: u32) -> String {
    ggml_type(id).map_or_else(|| format!("type{id}"), |(n, _, _)| n.to_string())
}

/// The name of a `general.file_type` value (llama.cpp `llama_ftype`), e.g. 15 → `Q4_K_M`.
pub fn file_type_name(ftype: u64) -> Option<&'static str> {
    Some(match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Limits that keep a corrupt header from allocating without bound.
const MAX_STRING: u64 = 1 << 24;
const MAX_DIMS: u32 = 8;

struct Reader<R> {
    inner: R,
    pos: u64,
    file_bytes: u64,
    path: String,
}

impl<R: Read> Reader<R> {
    fn bad(&self, what: impl Into<String>) -> ModelError {
        ModelError::Corrupt {
            path: self.path.clone(),
            message: format!("{} (at byte {})", what.into(), self.pos),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.bad(format!("truncated header: {e}")))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count that must be plausible for this file: every element takes at least one byte.
    fn count(&mut self, what: &str) -> Result<u64, ModelError> {
        let n = self.u64()?;
        if n > self.file_bytes {
            return Err(self.bad(format!("{what} {n} is larger than the file")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let len = self.u64()?;
        if len > MAX_STRING || len > self.file_bytes {
            return Err(self.bad(format!("string of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.bad(format!("truncated string: {e}")))?;
        self.pos += len;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<Value, ModelError> {
        Ok(match type_id {
            0 => Value::Uint(u64::from(self.bytes::<1>()?[0])),
            1 => Value::Int(i64::from(i8::from_le_bytes(self.bytes()?))),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.bytes()?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => Value::Uint(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let len = self.count("array length")?;
                let keep = len <= KEPT_ARRAY && inner != 8 && inner != 9;
                let mut values = Vec::new();
                for _ in 0..len {
                    let v = self.value(inner, depth + 1)?;
                    if keep {
                        values.push(v);
                    }
                }
                Value::Array { len, values }
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.bad(format!("unknown metadata type {other}"))),
        })
    }
}

/// Reads the header of the GGUF file at `path`.
///
/// # Errors
/// [`ModelError::Io`] when it cannot be read; [`ModelError::Corrupt`] naming what is wrong.
pub fn read(path: &Path) -> Result<GgufFile, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_bytes = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        file_bytes,
        path: path.display().to_string(),
    };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(r.bad("not a GGUF file (magic is not \"GGUF\")"));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.bad(format!("GGUF version {version} is not supported (2 or 3)")));
    }
    let tensor_count = r.count("tensor count")?;
    let kv_count = r.count("metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let type_id = r.u32()?;
        let value = r.value(type_id, 0)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count.min(1 << 16) as usize);
    for _ in 0..tensor_count {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(r.bad(format!("tensor {name} has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let type_id = r.u32()?;
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            type_id,
            offset,
            bytes: 0,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .filter(|a| *a > 0)
        .unwrap_or(32);
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let data_bytes = file_bytes.saturating_sub(data_start);
    // Sizes from the type table; a type the table does not know is sized by the distance to the
    // next tensor's offset (data is laid out in offset order).
    let mut by_offset: Vec<usize> = (0..tensors.len()).collect();
    by_offset.sort_by_key(|&i| tensors[i].offset);
    for (k, &i) in by_offset.iter().enumerate() {
        let t = &tensors[i];
        let elements = t
            .dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| r.bad(format!("tensor {} is too large", t.name)))?;
        let bytes = match ggml_type(t.type_id) {
            Some((_, block, block_bytes)) => elements.div_ceil(block).saturating_mul(block_bytes),
            None => {
                let end = by_offset
                    .get(k + 1)
                    .map_or(data_bytes, |&j| tensors[j].offset);
                end.saturating_sub(t.offset)
            }
        };
        if t.offset.saturating_add(bytes) > data_bytes {
            return Err(r.bad(format!(
                "tensor {} ends past the end of the file (is it truncated?)",
                t.name
            )));
        }
        tensors[i].bytes = bytes;
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        file_bytes,
    })
}

impl GgufFile {
    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
    }

    /// `{architecture}.{key}` as an integer.
    pub fn arch_u64(&self, key: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata
            .get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
    }

    /// Bytes of tensor data per ggml type name, largest first.
    pub fn bytes_by_type(&self) -> Vec<(String, u64)> {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for t in &self.tensors {
            *by.entry(type_name(t.type_id)).or_default() += t.bytes;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

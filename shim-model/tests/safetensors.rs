//! safetensors models: small ones written through the `safetensors` crate, and a sharded
//! Llama-3-8B-shaped one as sparse files (headers real, data holes), with exact counts.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use shim_model::{FitProfile, GpuMemory, ModelFormat, inspect, plan};

#[test]
fn a_small_model_written_by_the_crate_reads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![0u8; 16 * 8 * 2];
    let b = vec![0u8; 8 * 4];
    let views = [
        (
            "embed",
            TensorView::new(Dtype::BF16, vec![16, 8], &a).unwrap(),
        ),
        ("norm", TensorView::new(Dtype::F32, vec![8], &b).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures":["TinyForCausalLM"],"num_hidden_layers":2,"num_attention_heads":4,
            "hidden_size":8,"max_position_embeddings":512,"torch_dtype":"bfloat16","vocab_size":16}"#,
    )
    .unwrap();
    let info = inspect(dir.path()).unwrap();
    assert_eq!(info.format, ModelFormat::Safetensors);
    assert_eq!(info.parameters, 16 * 8 + 8);
    assert_eq!(info.weights_bytes, 16 * 8 * 2 + 8 * 4);
    assert_eq!(info.architecture.as_deref(), Some("TinyForCausalLM"));
    assert_eq!(info.quantization.as_deref(), Some("BF16"));
    // No num_key_value_heads: every head has its own KV; no head_dim: hidden ÷ heads.
    assert_eq!(info.kv_heads, Some(4));
    assert_eq!(info.head_dim, Some(2));
    assert_eq!(info.max_context_length, Some(512));
}

/// Writes a safetensors file whose header lists `tensors` (bf16) and whose data is a hole.
fn sparse_shard(path: &Path, tensors: &[(String, Vec<u64>)]) -> u64 {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&text).unwrap();
    f.set_len(8 + text.len() as u64 + offset).unwrap();
    offset
}

#[test]
fn a_sharded_llama_3_8b_shape_counts_8_030_261_248_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (vocab, hidden, inter, layers, kv_dim) = (128_256u64, 4096u64, 14_336u64, 32u64, 1024u64);
    let mut tensors: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![hidden, hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, hidden]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    tensors.push(("model.norm.weight".into(), vec![hidden]));
    tensors.push(("lm_head.weight".into(), vec![vocab, hidden]));
    let half = tensors.len() / 2;
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut total = 0;
    let mut weight_map = HashMap::new();
    for (name, part) in names.iter().zip([&tensors[..half], &tensors[half..]]) {
        total += sparse_shard(&dir.path().join(name), part);
        for (t, _) in part {
            weight_map.insert(t.clone(), name.to_string());
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::to_vec(
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )
        .unwrap(),
    )
    .unwrap();
    // A stray file the index does not name is not counted.
    sparse_shard(
        &dir.path().join("stray.safetensors"),
        &[("x".into(), vec![1000])],
    );
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"hidden_size":4096,"max_position_embeddings":8192,
            "torch_dtype":"bfloat16","vocab_size":128256}"#,
    )
    .unwrap();
    let info = inspect(dir.path()).unwrap();
    assert_eq!(info.parameters, 8_030_261_248);
    assert_eq!(info.weights_bytes, 2 * 8_030_261_248);
    assert_eq!(info.kv_heads, Some(8));
    assert_eq!(info.head_dim, Some(128));
    assert_eq!(info.files.len(), 2);

    // vLLM at 8192 tokens: 14.96 GiB weights + 1 GiB KV cache + 2 GiB overhead.
    let gpu = |gib: u64| GpuMemory {
        id: "0".into(),
        total_bytes: gib << 30,
        free_bytes: gib << 30,
    };
    let fits = plan(&info, &FitProfile::vllm(), None, 1, 1, Some(&[gpu(24)])).unwrap();
    assert_eq!(fits.fits, Some(true));
    assert_eq!(fits.estimate.kv_cache_bytes, 1 << 30);
    let too_small = plan(
        &info,
        &FitProfile::vllm(),
        None,
        1,
        1,
        Some(&[gpu(16), gpu(16)]),
    )
    .unwrap();
    assert_eq!(too_small.fits, Some(false));
    assert!(
        too_small.message.starts_with(
            "needs 18.0 GiB per GPU (weights 15.0, KV cache 1.0 for 8192 tokens, overhead 2.0) \
             but the largest free GPU has 14.4 GiB usable"
        ),
        "{}",
        too_small.message
    );
    assert!(
        too_small
            .message
            .ends_with("; 2 GPUs per replica would fit"),
        "{}",
        too_small.message
    );
}

#[test]
fn broken_headers_and_indexes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Header says 100 bytes of data, file holds none.
    let header = br#"{"w":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("describes 100 bytes of data"), "{err}");

    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    )
    .unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("header length"), "{err}");

    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map":{"w":"../../etc/passwd"}}"#,
    )
    .unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("is not a file name"), "{err}");
}

//! The GGUF reader against files written by PyPI `gguf` (the reference writer), and against
//! broken files.

mod common;

use common::{Shape, python, write_gguf};
use shim_model::{ModelError, ModelFormat, inspect};

#[test]
fn gguf_files_from_the_reference_writer_read_exactly() {
    let Some(python) = python("gguf, numpy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (ty, quant, bytes_per_weight) in [
        ("f32", "F32", 4.0),
        ("f16", "F16", 2.0),
        ("q8_0", "Q8_0", 34.0 / 32.0),
    ] {
        let model = dir.path().join(ty);
        std::fs::create_dir_all(&model).unwrap();
        // A GQA shape whose rows are multiples of Q8_0's 32-element blocks.
        let shape = Shape {
            layers: 3,
            embd: 128,
            heads: 8,
            kv_heads: 2,
            ff: 256,
            vocab: 320,
            ctx: 8192,
        };
        write_gguf(&python, &model.join("m.gguf"), shape, ty);
        let info = inspect(&model).unwrap();
        assert_eq!(info.format, ModelFormat::Gguf);
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert_eq!(info.parameters, shape.parameters(), "{ty}");
        assert_eq!(info.quantization.as_deref(), Some(quant));
        assert_eq!(info.layers, Some(3));
        assert_eq!(info.heads, Some(8));
        assert_eq!(info.kv_heads, Some(2));
        assert_eq!(info.head_dim, Some(16));
        assert_eq!(info.embedding_length, Some(128));
        assert_eq!(info.vocab_size, Some(320));
        assert_eq!(info.max_context_length, Some(8192));
        // Norms stay f32; every matrix has the file's type.
        let norms = 2 * shape.embd * shape.layers + shape.embd;
        let matrices = shape.parameters() - norms;
        let expected = norms * 4 + (matrices as f64 * bytes_per_weight) as u64;
        assert_eq!(info.weights_bytes, expected, "{ty}");
        // The data section ends the file: the weights cannot exceed it.
        let file_len = std::fs::metadata(model.join("m.gguf")).unwrap().len();
        assert!(info.weights_bytes < file_len);
    }
}

#[test]
fn the_tiny_model_reads_as_the_xtask_writes_it() {
    let Some(python) = python("gguf, numpy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/tiny_model.py");
    let status = std::process::Command::new(&python)
        .arg(script)
        .arg(dir.path().join("tiny.gguf"))
        .status()
        .unwrap();
    assert!(status.success());
    let info = inspect(dir.path()).unwrap();
    assert_eq!(info.parameters, Shape::TINY.parameters());
    assert_eq!(info.weights_bytes, Shape::TINY.parameters() * 4);
    assert_eq!(info.quantization.as_deref(), Some("F32"));
    assert_eq!(info.max_context_length, Some(2048));
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn broken_files_are_clear_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bad.gguf", b"GGUF but not really a model");
    let err = inspect(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");

    write(dir.path(), "bad.gguf", b"NOPE\x03\x00\x00\x00");
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");

    // Version 3, one tensor, no metadata; the tensor claims a huge string name.
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend(1u64.to_le_bytes());
    header.extend(0u64.to_le_bytes());
    header.extend(u64::MAX.to_le_bytes());
    write(dir.path(), "bad.gguf", &header);
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("string of"), "{err}");

    // A tensor whose data lies past the end of the file (a truncated download).
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend(1u64.to_le_bytes());
    header.extend(0u64.to_le_bytes());
    header.extend(1u64.to_le_bytes());
    header.push(b'w');
    header.extend(1u32.to_le_bytes());
    header.extend(1024u64.to_le_bytes());
    header.extend(0u32.to_le_bytes()); // f32
    header.extend(0u64.to_le_bytes());
    write(dir.path(), "bad.gguf", &header);
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("past the end of the file"), "{err}");

    write(dir.path(), "second.gguf", b"GGUF");
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("holds 2 .gguf files"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = inspect(empty.path()).unwrap_err().to_string();
    assert!(err.contains("no .gguf or .safetensors"), "{err}");
}

//! Shared by shim-model's tests: the llama.cpp environment's python and a GGUF writer.

#![allow(dead_code)] // each test file uses part of this

use std::path::{Path, PathBuf};
use std::process::Command;

/// The python with `gguf` (and `llama_cpp`) that `cargo xtask ci` passes in
/// `XMOD_SHIM_LLAMA_PYTHON`. Under `CI` a missing one fails the test; elsewhere the test says it
/// skipped (build it with `cargo xtask llama-env`).
pub fn python(needs: &str) -> Option<PathBuf> {
    let Some(python) = std::env::var_os("XMOD_SHIM_LLAMA_PYTHON").map(PathBuf::from) else {
        assert!(
            std::env::var("CI").is_err(),
            "XMOD_SHIM_LLAMA_PYTHON is not set: CI runs the tests through `cargo xtask ci`, which sets it"
        );
        eprintln!(
            "SKIPPED: set XMOD_SHIM_LLAMA_PYTHON=$(cargo xtask llama-env), or run `cargo xtask ci`"
        );
        return None;
    };
    let ok = Command::new(&python)
        .args(["-c", &format!("import {needs}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "XMOD_SHIM_LLAMA_PYTHON={} cannot import {needs}",
        python.display()
    );
    Some(python)
}

/// A llama shape for `make_gguf.py`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub layers: u64,
    pub embd: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ff: u64,
    pub vocab: u64,
    pub ctx: u64,
}

impl Shape {
    /// The tiny model of `xtask/tiny_model.py`.
    pub const TINY: Shape = Shape {
        layers: 2,
        embd: 64,
        heads: 4,
        kv_heads: 4,
        ff: 128,
        vocab: 259,
        ctx: 2048,
    };

    /// About 125 M parameters, with grouped-query attention (12 heads, 4 KV heads).
    pub const SMALL: Shape = Shape {
        layers: 12,
        embd: 768,
        heads: 12,
        kv_heads: 4,
        ff: 2048,
        vocab: 32_000,
        ctx: 4096,
    };

    /// Exact parameter count of the llama layout `make_gguf.py` writes.
    pub fn parameters(&self) -> u64 {
        let kv_dim = self.embd / self.heads * self.kv_heads;
        let per_layer = 2 * self.embd // norms
            + 2 * self.embd * self.embd // q, output
            + 2 * kv_dim * self.embd // k, v
            + 3 * self.ff * self.embd; // gate, up, down
        2 * self.vocab * self.embd + self.layers * per_layer + self.embd
    }
}

/// Writes a GGUF of `shape` with tensor type `ty` (f32, f16, q8_0).
pub fn write_gguf(python: &Path, out: &Path, shape: Shape, ty: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_gguf.py");
    let status = Command::new(python)
        .arg(script)
        .arg(out)
        .args(["--layers", &shape.layers.to_string()])
        .args(["--embd", &shape.embd.to_string()])
        .args(["--heads", &shape.heads.to_string()])
        .args(["--kv-heads", &shape.kv_heads.to_string()])
        .args(["--ff", &shape.ff.to_string()])
        .args(["--vocab", &shape.vocab.to_string()])
        .args(["--ctx", &shape.ctx.to_string()])
        .args(["--type", ty])
        .status()
        .expect("run make_gguf.py");
    assert!(status.success(), "make_gguf.py failed");
}

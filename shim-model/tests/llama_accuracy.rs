//! The estimate against llama.cpp itself: generated models (the tiny one of `cargo xtask
//! tiny-model`, and a ~125M-parameter one) are loaded with llama-cpp-python, verbose, and the
//! buffer sizes llama.cpp logs (model, KV cache, compute plus output) are compared with
//! shim-model's estimate, each within 10 %. Run with `-- --nocapture` to see the figures.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Shape, python, write_gguf};
use shim_model::{FitProfile, estimate, inspect};

/// llama.cpp's buffers, MiB, as it logs them (summed over devices).
#[derive(Debug, Default)]
struct Logged {
    model: f64,
    kv: f64,
    compute: f64,
}

/// Sums `<anything> <what> buffer size = <x> MiB` lines.
fn parse(log: &str) -> Logged {
    let mut logged = Logged::default();
    for line in log.lines() {
        let Some((left, right)) = line.split_once("buffer size") else {
            continue;
        };
        let Some(mib) = right
            .trim_start_matches([' ', '='])
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if left.contains("model") {
            logged.model += mib;
        } else if left.contains("KV") {
            logged.kv += mib;
        } else if left.contains("compute") || left.contains("output") {
            logged.compute += mib;
        }
    }
    logged
}

const LOAD: &str = r#"
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=512,
                      n_ubatch=512, n_gpu_layers=0, verbose=True)
print("loaded", file=sys.stderr)
"#;

fn load(python: &Path, model: &Path, ctx: u64) -> String {
    let out = Command::new(python)
        .args(["-c", LOAD])
        .arg(model)
        .arg(ctx.to_string())
        .output()
        .expect("run llama-cpp-python");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && log.contains("loaded"),
        "load failed:\n{log}"
    );
    log
}

fn within(estimated: u64, logged_mib: f64, what: &str, case: &str) {
    let est_mib = estimated as f64 / (1u64 << 20) as f64;
    let error = (est_mib - logged_mib).abs() / logged_mib;
    eprintln!(
        "{case:<24} {what:<8} estimate {est_mib:>9.2} MiB  llama.cpp {logged_mib:>9.2} MiB  {:+.1} %",
        (est_mib / logged_mib - 1.0) * 100.0
    );
    assert!(
        error <= 0.10,
        "{case}: {what} estimate {est_mib:.2} MiB vs llama.cpp {logged_mib:.2} MiB"
    );
}

#[test]
fn the_estimate_is_within_10_percent_of_llama_cpps_buffers() {
    let Some(python) = python("llama_cpp, gguf, numpy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    let status = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/tiny_model.py"))
        .arg(tiny.join("tiny.gguf"))
        .status()
        .unwrap();
    assert!(status.success());
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    write_gguf(&python, &small.join("small.gguf"), Shape::SMALL, "f16");

    let profile = FitProfile::llamacpp(2048);
    for (name, model_dir, file, ctx) in [
        ("tiny", &tiny, "tiny.gguf", 2048u64),
        ("tiny", &tiny, "tiny.gguf", 8192),
        ("small-125M-f16", &small, "small.gguf", 256),
        ("small-125M-f16", &small, "small.gguf", 512),
        ("small-125M-f16", &small, "small.gguf", 2048),
        ("small-125M-f16", &small, "small.gguf", 8192),
    ] {
        let info = inspect(model_dir).unwrap();
        let e = estimate(&info, &profile, Some(ctx), 1).unwrap();
        let logged = parse(&load(&python, &model_dir.join(file), ctx));
        let case = format!("{name} ctx {ctx}");
        within(e.weights_bytes, logged.model, "weights", &case);
        within(e.kv_cache_bytes, logged.kv, "KV", &case);
        within(e.compute_bytes, logged.compute, "compute", &case);
    }
}

//! Will it fit? The real binary with a fake `nvidia-smi` first on its PATH (three GPUs of 80, 24
//! and 48 GiB): the GPU inventory, admission (422 with the numbers before anything starts), the
//! dry run's estimate, best-fit placement, and the models list's metadata. The `vllm` preset
//! keeps its memory profile but launches the built-in mock engine, so no GPU is needed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// The fake: prints `gpus.csv` beside it, so a test could change the numbers.
fn fake_nvidia_smi(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    std::fs::write(
        bin.join("gpus.csv"),
        "0, GPU-aaaa, Fake A100 80GB, 81920, 0\n\
         1, GPU-bbbb, Fake RTX 4090, 24576, 0\n\
         2, GPU-cccc, Fake L40S, 49152, 0\n",
    )
    .unwrap();
    let script = bin.join("nvidia-smi");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat '{}'\n", bin.join("gpus.csv").display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn start(root: &Path, port: u16) -> Shim {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // vLLM's memory profile, the mock engine's launch (the mock takes no TP or context flag).
    let config = root.join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "engines:\n  vllm:\n    command: [\"{BIN}\", \"mock-engine\"]\n    \
             args: [\"--host\", \"{{host}}\", \"--port\", \"{{port}}\", \"--served-model-name\", \"{{served_name}}\", \"{{model_dir}}\"]\n    \
             acceleratorFlag: null\n    contextLengthFlag: null\n    extraArgs: []\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(data.join("shim.log")).unwrap();
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(BIN)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .args(["--default-engine", "vllm"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--model-root")
        .arg(root.join("models"))
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let shim = Shim {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&shim.url("/healthz")).is_err() {
        assert!(
            Instant::now() < deadline,
            "shim did not start:\n{}",
            read_log(&data)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    shim
}

fn gpus(shim: &Shim) -> Vec<Value> {
    let envelope = get(&shim.url("/api/v1/gpus")).unwrap();
    assert_eq!(envelope["code"], 0, "{envelope}");
    envelope["data"]["gpus"].as_array().unwrap().clone()
}

fn post(shim: &Shim, path: &str, body: Value) -> Value {
    send(reqwest::Method::POST, &shim.url(path), Some(body))
}

#[test]
fn admission_inventory_and_best_fit_placement_with_a_fake_nvidia_smi() {
    let root = tempfile::tempdir().unwrap();
    let _reaper = Reaper {
        marker: root.path().display().to_string(),
    };
    fake_nvidia_smi(&root.path().join("bin"));
    llama_8b(&root.path().join("models/llama-8b"));
    let shim = start(root.path(), free_port());

    // Inventory: what nvidia-smi says, in bytes, nobody holding anything.
    let list = gpus(&shim);
    assert_eq!(list.len(), 3);
    assert_eq!(list[1]["index"], 1);
    assert_eq!(list[1]["uuid"], "GPU-bbbb");
    assert_eq!(list[1]["name"], "Fake RTX 4090");
    assert_eq!(list[1]["memoryTotalBytes"], 24_576 * MIB);
    assert_eq!(list[1]["memoryUsedBytes"], 0);
    assert_eq!(list[1]["memoryFreeBytes"], 24_576 * MIB);
    assert_eq!(list[1]["heldBy"], Value::Null);

    // The models list reads the headers.
    let models = get(&shim.url("/api/v1/modserv/list")).unwrap();
    let m = &models["data"][0];
    assert_eq!(m["modelName"], "llama-8b");
    assert_eq!(m["format"], "safetensors");
    assert_eq!(m["architecture"], "LlamaForCausalLM");
    assert_eq!(m["parameters"], 8_030_261_248u64);
    assert_eq!(m["quantization"], "BF16");
    assert_eq!(m["weightsBytes"], 2 * 8_030_261_248u64);
    assert_eq!(m["maxContextLength"], 8192);

    // 512k tokens of KV cache fit on no single GPU: 422 before anything is stored, with the
    // numbers and what would fit.
    let too_big = json!({"modelName": "llama-8b", "contextLength": 524_288,
                         "resourceRequirements": {"acceleratorCount": 1}});
    let refused = post(&shim, "/api/v1/modserv/deploy", too_big.clone());
    assert_eq!(refused["code"], 422, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains(
            "needs 81.0 GiB per GPU (weights 15.0, KV cache 64.0 for 524288 tokens, overhead 2.0) \
             but the largest free GPU has 72.0 GiB usable; 8192 tokens would fit, or 2 GPUs"
        ),
        "{message}"
    );
    assert_eq!(refused["data"]["estimate"]["fits"], false);
    assert_eq!(refused["data"]["estimate"]["maxContextLength"], 8192);
    let services = get(&shim.url("/api/v1/modserv")).unwrap();
    assert_eq!(services["data"], json!([]), "nothing was accepted");
    let dry = post(&shim, "/api/v1/modserv/deploy?dryRun=true", too_big);
    assert_eq!(dry["code"], 422, "{dry}");

    // The dry run of one that fits shows the estimate.
    let fits = json!({"modelName": "llama-8b", "contextLength": 8192,
                      "resourceRequirements": {"acceleratorCount": 1}});
    let dry = post(&shim, "/api/v1/modserv/deploy?dryRun=true", fits.clone());
    assert_eq!(dry["code"], 0, "{dry}");
    let e = &dry["data"]["estimate"];
    assert_eq!(e["fits"], true);
    assert_eq!(e["contextLength"], 8192);
    assert_eq!(e["tensorParallel"], 1);
    assert_eq!(e["weightsBytes"], 2 * 8_030_261_248u64);
    assert_eq!(e["kvCacheBytes"], 1u64 << 30);
    assert_eq!(e["overheadBytes"], 2u64 << 30);
    assert_eq!(e["perGpuBytes"], 2 * 8_030_261_248u64 + (3u64 << 30));

    // 18 GiB per GPU: best fit is the 24 GiB GPU (index 1), not the lowest index.
    let id = deploy(&shim, fits);
    let (data, _) = wait_status(&shim, &id, 60, |d| d["status"] == "running");
    assert_eq!(data["status"], "running", "{data}");
    let held: HashMap<String, Value> = gpus(&shim)
        .into_iter()
        .map(|g| (g["index"].to_string(), g["heldBy"].clone()))
        .collect();
    assert_eq!(held["1"], json!(id), "{held:?}");
    assert_eq!(held["0"], Value::Null, "{held:?}");
    assert_eq!(held["2"], Value::Null, "{held:?}");

    // An update that cannot fit is refused; the service keeps running its spec.
    let refused = send(
        reqwest::Method::PUT,
        &shim.url(&format!("/api/v1/modserv/{id}")),
        Some(json!({"modelName": "llama-8b", "contextLength": 1_048_576,
                    "resourceRequirements": {"acceleratorCount": 1}})),
    );
    assert_eq!(refused["code"], 422, "{refused}");

    // GPU memory gauges.
    let metrics = client()
        .get(shim.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "xmod_shim_gpu_memory_total_bytes{{gpu=\"2\"}} {}",
            49_152 * MIB
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("xmod_shim_gpu_held{gpu=\"1\"} 1"),
        "{metrics}"
    );

    let deleted = send(
        reqwest::Method::DELETE,
        &shim.url(&format!("/api/v1/modserv/{id}")),
        None,
    );
    assert_eq!(deleted["code"], 0, "{deleted}");
    wait_status(&shim, &id, 30, |d| d["status"] == "notExist");
}

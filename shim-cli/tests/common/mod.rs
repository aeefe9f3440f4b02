//! Helpers shared by the end-to-end tests: start the real binary, talk to it like the real client.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_model-serve-shim");

/// A running shim; killed on drop so a failing test leaves nothing behind.
pub struct Shim {
    pub child: Child,
    pub base: String,
}

impl Shim {
    pub fn start(data: &Path, models: &Path, port: u16) -> Shim {
        Self::start_with(data, models, port, &[])
    }

    /// Starts the shim with extra flags (e.g. `--config FILE`).
    pub fn start_with(data: &Path, models: &Path, port: u16, extra: &[&str]) -> Shim {
        std::fs::create_dir_all(data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("shim.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--default-engine",
                "mock",
            ])
            .arg("--data-dir")
            .arg(data)
            .arg("--model-root")
            .arg(models)
            .args(extra)
            .env("XMOD_SHIM_ENGINE__RESYNCINTERVALSECS", "2")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start model-serve-shim");
        let shim = Shim {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&format!("{}/healthz", shim.base)).is_err() {
            assert!(
                Instant::now() < deadline,
                "shim did not come up; log:\n{}",
                read_log(data)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        shim
    }

    /// SIGTERM and wait: a graceful stop that leaves the engines running.
    pub fn stop(mut self) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "shim did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a client subcommand against this shim: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("XMOD_SHIM_SERVER", &self.base)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read_log(data: &Path) -> String {
    std::fs::read_to_string(data.join("shim.log")).unwrap_or_default()
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn get(url: &str) -> reqwest::Result<Value> {
    client().get(url).send()?.json()
}

/// Sends exactly what the real client sends: JSON with a charset parameter.
pub fn send(method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json;charset=utf-8")
            .body(body.to_string());
    }
    request.send().unwrap().json().unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls a service until `done` holds for its status data; returns every status word seen.
pub fn wait_status(
    shim: &Shim,
    id: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> (Value, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let envelope = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
        assert_eq!(envelope["code"], 0, "{envelope}");
        let data = envelope["data"].clone();
        let word = data["status"].as_str().unwrap().to_string();
        assert!(
            [
                "pending",
                "initializing",
                "running",
                "failed",
                "terminating",
                "notExist"
            ]
            .contains(&word.as_str()),
            "not one of the client's six words: {word}"
        );
        if word != "running" {
            assert_eq!(
                data["endpoint"], "",
                "endpoint must be empty until running: {data}"
            );
        }
        if seen.last() != Some(&word) {
            seen.push(word);
        }
        if done(&data) {
            return (data, seen);
        }
        assert!(
            Instant::now() < deadline,
            "timed out; last status {data}; seen {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn chat(endpoint: &str, model: &str) -> Value {
    let response = client()
        .post(endpoint)
        .json(&json!({ "model": model, "messages": [{ "role": "user", "content": "hello" }], "max_tokens": 8 }))
        .send()
        .unwrap();
    assert!(
        response.status().is_success(),
        "chat failed: {}",
        response.status()
    );
    response.json().unwrap()
}

/// Pids of engines started with `--port <port>` (found by their command line).
pub fn engine_pids(port: u16) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .windows(2)
            .any(|w| w[0] == "--port" && w[1] == port.to_string())
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn port_of(endpoint: &str) -> u16 {
    let url = reqwest::Url::parse(endpoint).unwrap();
    url.port().unwrap()
}

pub fn alive(pid: u32) -> bool {
    // A zombie has exited; only its entry remains until reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

pub fn deploy(shim: &Shim, body: Value) -> String {
    let envelope = send(
        reqwest::Method::POST,
        &shim.url("/api/v1/modserv/deploy"),
        Some(body),
    );
    assert_eq!(envelope["code"], 0, "{envelope}");
    envelope["data"]["serviceId"].as_str().unwrap().to_string()
}

/// Kills, on drop, every process whose command line mentions `marker` (the test's temporary
/// model directory), so engines left by a failing test do not outlive it.
pub struct Reaper {
    pub marker: String,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() as i32
                && String::from_utf8_lossy(&cmdline).contains(&self.marker)
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// A Llama-3-8B-shaped safetensors model: the real header, the data a sparse hole.
pub fn llama_8b(dir: &Path) {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).unwrap();
    let (vocab, hidden, inter, kv) = (128_256u64, 4096u64, 14_336u64, 1024u64);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..32 {
        for (n, s) in [
            ("input_layernorm", vec![hidden]),
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![kv, hidden]),
            ("self_attn.v_proj", vec![kv, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("post_attention_layernorm", vec![hidden]),
            ("mlp.gate_proj", vec![inter, hidden]),
            ("mlp.up_proj", vec![inter, hidden]),
            ("mlp.down_proj", vec![hidden, inter]),
        ] {
            shapes.push((format!("model.layers.{l}.{n}.weight"), s));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in &shapes {
        let bytes = shape.iter().product::<u64>() * 2;
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&text).unwrap();
    f.set_len(8 + text.len() as u64 + offset).unwrap();
    std::fs::write(
        dir.join("config.json"),
        json!({
            "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "vocab_size": 128256
        })
        .to_string(),
    )
    .unwrap();
}

/// Polls `probe` every 100 ms until it returns `Some`, or panics naming `what` after `secs`.
pub fn wait_for<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Response headers by which the mock engine names the replica that answered (its hostname, and
/// the address it listens on): `mock_engine::HOST_HEADER` and `mock_engine::LISTEN_HEADER`.
pub const MOCK_HOST_HEADER: &str = "x-mock-engine-host";
pub const MOCK_LISTEN_HEADER: &str = "x-mock-engine-listen";

/// A chat completion answered through the gateway.
#[derive(Debug)]
pub struct Answer {
    /// The answering mock replica's hostname.
    pub host: String,
    /// The address the answering mock replica listens on.
    pub listen: String,
    /// The reply's text (the streamed deltas joined).
    pub text: String,
}

/// `POST /v1/chat/completions` through the shim's gateway (no API key), streamed or not;
/// panics unless a mock engine answers it in full.
pub fn gateway_chat(shim: &Shim, model: &str, stream: bool) -> Answer {
    use std::io::Read as _;
    let mut response = client()
        .post(shim.url("/v1/chat/completions"))
        .json(&json!({"model": model, "stream": stream, "max_tokens": 6,
                      "messages": [{"role": "user", "content": "which replica answers"}]}))
        .send()
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (host, listen) = (header(MOCK_HOST_HEADER), header(MOCK_LISTEN_HEADER));
    let status = response.status();
    let mut body = String::new();
    response.read_to_string(&mut body).unwrap();
    assert_eq!(status, 200, "{body}");
    let text = if stream {
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        body.split("\n\n")
            .filter_map(|frame| frame.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str::<Value>(data).unwrap())
            .filter_map(|event| {
                event["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    } else {
        let reply: Value = serde_json::from_str(&body).unwrap();
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(text.starts_with("[mock engine]"), "{body}");
    assert!(!listen.is_empty(), "no {MOCK_LISTEN_HEADER} header: {body}");
    Answer { host, listen, text }
}

/// The base URLs of a service's ready replicas, as its status shows them.
pub fn replicas_of(shim: &Shim, id: &str) -> Vec<String> {
    let envelope = get(&shim.url(&format!("/api/v1/modserv/{id}"))).unwrap();
    assert_eq!(envelope["code"], 0, "{envelope}");
    let mut replicas: Vec<String> = envelope["data"]["replicas"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|r| r.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    replicas.sort();
    replicas
}

//! `cargo xtask bench gateway`: the OpenAI gateway against nginx and against no proxy at all.
//!
//! One run starts the release server with two mock-engine replicas (process shimlet), nginx
//! (`least_conn`, keep-alive, access log off) in front of the same two replicas, and drives each
//! target with the release load generator (`shim-gateway/examples/loadgen.rs`) at 64 connections:
//! plain chat requests for throughput and latency, streamed ones for time to first byte. Then it
//! holds 10,000 idle streams through the gateway and reports the server's RSS throughout.
//! The server logs at `warn` here (its per-request access log is `info`), as nginx's is off.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Busy connections per run.
const CONNECTIONS: usize = 64;
/// Seconds per measured run.
const SECS: u64 = 8;
/// Idle streams the gateway should hold.
const IDLE_STREAMS: usize = 10_000;

/// Kills a child process on drop, so a failed bench leaves nothing running.
struct Running(Child, &'static str);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.1);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tiny HTTP/1.1 client (one request per connection): enough to deploy and poll.
pub(crate) fn http(
    method: &str,
    addr: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    // One write: `write!` on the bare stream sends each piece as its own segment.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("response without a header end")?;
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {head}\n{body}");
    }
    Ok(body.to_owned())
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `key=value` fields of the load generator's output line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn ensure_nginx() -> anyhow::Result<PathBuf> {
    let found = |p: &str| Path::new(p).is_file().then(|| PathBuf::from(p));
    if let Some(nginx) = found("/usr/sbin/nginx") {
        return Ok(nginx);
    }
    eprintln!("installing nginx-light with apt-get");
    super::run(Command::new("apt-get").args(["update", "-qq"]))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "nginx-light"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    found("/usr/sbin/nginx").context("nginx-light installed but /usr/sbin/nginx is missing")
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| super::root().join("target"), PathBuf::from)
}

/// Streams each process may open here: the gateway needs two sockets per proxied stream.
fn nofile_limit() -> usize {
    let out = Command::new("sh").args(["-c", "ulimit -n"]).output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// `args`: `--no-build` uses the release binaries already built (e.g. while the tree does not
/// compile).
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.iter().any(|a| a == "--no-build") {
        build()?;
    }
    measure_all()
}

fn build() -> anyhow::Result<()> {
    super::cargo(&[
        "build",
        "--release",
        "-p",
        "shim-cli",
        "--bin",
        "model-serve-shim",
        "-p",
        "shim-gateway",
        "--example",
        "loadgen",
    ])
}

fn measure_all() -> anyhow::Result<()> {
    let release = target_dir().join("release");
    let shim = release.join("model-serve-shim");
    let loadgen = release.join("examples").join("loadgen");
    let nginx = ensure_nginx()?;

    let work = std::env::temp_dir().join(format!("xmod-gateway-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    for model in ["bench", "idle"] {
        std::fs::create_dir_all(work.join("models").join(model))?;
    }
    // `mockidle`: the mock engine with a very slow second token, so streams stay open and idle.
    let config = work.join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "engines:\n  mockidle:\n    command: [\"{}\", \"mock-engine\"]\n    args: [\"--host\", \"{{host}}\", \"--port\", \"{{port}}\", \"--served-model-name\", \"{{served_name}}\", \"{{model_dir}}\"]\n    extraArgs: [\"--token-delay-ms\", \"600000\"]\n    healthPath: /health\n    startupTimeoutSecs: 120\n",
            shim.display()
        ),
    )?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let server = Running(
        Command::new(&shim)
            .args(["--port", &port.to_string(), "--log-level", "warn"])
            .args(["--default-engine", "mock", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(work.join("data"))
            .arg("--model-root")
            .arg(work.join("models"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("shim.log"))?)
            .spawn()
            .context("start model-serve-shim")?,
        "model-serve-shim",
    );
    let server_pid = server.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http("GET", &addr, "/healthz", None).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut ids = Vec::new();
    for (model, engine) in [("bench", "mock"), ("idle", "mockidle")] {
        let body = format!(
            r#"{{"modelName":"{model}","engine":"{engine}","replicaCount":2,"resourceRequirements":{{"acceleratorCount":0}}}}"#
        );
        let answer = http("POST", &addr, "/api/v1/modserv/deploy", Some(&body))?;
        let id = answer
            .split("\"serviceId\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .context("deploy answer without serviceId")?
            .to_owned();
        ids.push(id);
    }
    let result = measure(&addr, &ids, server_pid, &loadgen, &nginx, &work);
    for id in &ids {
        let _ = http("DELETE", &addr, &format!("/api/v1/modserv/{id}"), None);
    }
    // Wait for the replicas to be gone before the server stops (it leaves workloads running).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && ids.iter().any(|id| {
            http("GET", &addr, &format!("/api/v1/modserv/{id}"), None)
                .is_ok_and(|s| !s.contains("notExist"))
        })
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure(
    addr: &str,
    ids: &[String],
    server_pid: u32,
    loadgen: &Path,
    nginx: &Path,
    work: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        while !http("GET", addr, &format!("/api/v1/modserv/{id}"), None)?
            .contains("\"status\":\"running\"")
        {
            anyhow::ensure!(Instant::now() < deadline, "{id} did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Warm up through the gateway, then read both replicas' addresses from its metrics.
    let chat = r#"{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
    for _ in 0..20 {
        http("POST", addr, "/v1/chat/completions", Some(chat))?;
    }
    let metrics = http("GET", addr, "/metrics", None)?;
    let replicas: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("xmod_shim_gateway_replica_requests_total{model=\"bench\""))
        .filter_map(|l| l.split("replica=\"http://").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        replicas.len() == 2,
        "expected two bench replicas in /metrics, found {replicas:?}"
    );

    let nginx_port = free_port()?;
    std::fs::create_dir_all(work.join("nginx"))?;
    let nginx_conf = work.join("nginx").join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             upstream replicas {{ least_conn; server {a}; server {b}; keepalive 128; }}\n\
             server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://replicas; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n}}\n",
            dir = work.join("nginx").display(),
            a = replicas[0],
            b = replicas[1],
        ),
    )?;
    let _nginx = Running(
        Command::new(nginx)
            .arg("-p")
            .arg(work.join("nginx"))
            .arg("-c")
            .arg(&nginx_conf)
            .args(["-g", "daemon off;"])
            .spawn()
            .context("start nginx")?,
        "nginx",
    );
    std::thread::sleep(Duration::from_millis(500));

    let load =
        |target: &str, model: &str, mode: &str, connections: usize| -> anyhow::Result<String> {
            let out = Command::new(loadgen)
                .args(["--url", &format!("http://{target}"), "--model", model])
                .args(["--mode", mode, "--connections", &connections.to_string()])
                .args([
                    "--secs",
                    &SECS.to_string(),
                    "--rss-pid",
                    &server_pid.to_string(),
                ])
                .output()
                .context("run loadgen")?;
            anyhow::ensure!(
                out.status.success(),
                "loadgen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
    let nginx_addr = format!("127.0.0.1:{nginx_port}");
    let rss_before = rss_mib(server_pid);
    let mut rows = Vec::new();
    for (name, target) in [
        ("direct (1 replica)", replicas[0].as_str()),
        ("nginx least_conn", nginx_addr.as_str()),
        ("xmod-shim gateway", addr),
    ] {
        let chat = load(target, "bench", "chat", CONNECTIONS)?;
        let stream = load(target, "bench", "stream", CONNECTIONS)?;
        println!("{name:20} chat:   {chat}\n{:20} stream: {stream}", "");
        rows.push((name, chat, stream));
    }
    let rss_after = rss_mib(server_pid);
    // One connection: the proxy's own added latency, without queueing behind 63 others for a
    // CPU (on a small machine the 64-connection figures are mostly that queueing).
    let mut single = Vec::new();
    for (name, target) in [
        ("direct (1 replica)", replicas[0].as_str()),
        ("nginx least_conn", nginx_addr.as_str()),
        ("xmod-shim gateway", addr),
    ] {
        let chat = load(target, "bench", "chat", 1)?;
        let stream = load(target, "bench", "stream", 1)?;
        println!(
            "{name:20} 1 conn chat:   {chat}\n{:20} 1 conn stream: {stream}",
            ""
        );
        single.push((chat, stream));
    }

    let limit = nofile_limit();
    // Client socket + replica socket per stream, plus headroom for everything else.
    let idle = IDLE_STREAMS.min(limit.saturating_sub(200) / 2);
    if idle < IDLE_STREAMS {
        println!(
            "note: open-file limit {limit} caps idle streams at {idle} (the gateway holds 2 sockets per stream)"
        );
    }
    let held = load(addr, "idle", "idle", idle)?;
    println!("idle streams through the gateway: {held}");

    let direct = &rows[0];
    let nginx_row = &rows[1];
    let gateway = &rows[2];
    let ratio = field(&gateway.1, "rps") / field(&nginx_row.1, "rps").max(1.0);
    let added_p50 = (field(&gateway.1, "p50_us") - field(&direct.1, "p50_us")) / 1000.0;
    let nginx_p50 = (field(&nginx_row.1, "p50_us") - field(&direct.1, "p50_us")) / 1000.0;
    let added_ttfb = (field(&gateway.2, "ttfb_p99_us") - field(&direct.2, "ttfb_p99_us")) / 1000.0;
    let nginx_ttfb =
        (field(&nginx_row.2, "ttfb_p99_us") - field(&direct.2, "ttfb_p99_us")) / 1000.0;
    println!("\n== gateway vs nginx, {CONNECTIONS} connections, {SECS}s per run ==");
    println!(
        "throughput: gateway {:.0} req/s, nginx {:.0} req/s, direct {:.0} req/s -> gateway/nginx = {ratio:.2}x",
        field(&gateway.1, "rps"),
        field(&nginx_row.1, "rps"),
        field(&direct.1, "rps")
    );
    println!("added p50 latency: gateway {added_p50:.3} ms, nginx {nginx_p50:.3} ms");
    println!("added TTFB p99 (streams): gateway {added_ttfb:.3} ms, nginx {nginx_ttfb:.3} ms");
    let added = |row: usize, text: fn(&(String, String)) -> &String, key: &str| {
        (field(text(&single[row]), key) - field(text(&single[0]), key)) / 1000.0
    };
    println!(
        "1 connection: added p50 gateway {:.3} ms, nginx {:.3} ms; added TTFB p99 gateway {:.3} ms, nginx {:.3} ms",
        added(2, |r| &r.0, "p50_us"),
        added(1, |r| &r.0, "p50_us"),
        added(2, |r| &r.1, "ttfb_p99_us"),
        added(1, |r| &r.1, "ttfb_p99_us"),
    );
    println!(
        "idle streams held: {} of {idle}; server RSS while holding {:.1} MiB",
        field(&held, "held"),
        field(&held, "rss_kib") / 1024.0
    );
    println!(
        "server RSS: {rss_before:.1} MiB before load, {rss_after:.1} MiB after the busy runs (growth {:.1} MiB)",
        rss_after - rss_before
    );
    Ok(())
}

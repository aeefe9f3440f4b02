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

/// CPU time (user + system) that `pids` have used so far, in microseconds (Linux's `USER_HZ`
/// is 100 ticks a second).
fn cpu_micros(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name: state is the first, utime the 12th, stime the 13th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 10_000
}

/// The child processes of `pid` (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `key=value` fields of the load generator's output line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// nginx's worker processes: as many as the server's async runtime has worker threads (tokio's
/// default, one per CPU), so both proxies get the same share of the machine.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
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

/// Files each process may open here: the gateway needs two sockets per proxied stream, the load
/// generator one, so 10,000 idle streams need more than the usual hard limit of 20,000 in the
/// gateway's process. Raises this process's limits (children inherit them), the hard one too
/// when allowed (root), and returns the soft limit in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    /// Idle streams × 2 sockets, plus room for replicas' pipes, the store and the listener.
    const WANTED: u64 = 2 * IDLE_STREAMS as u64 + 4096;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let new_hard = hard.max(WANTED.min(ceiling));
    if setrlimit(Resource::RLIMIT_NOFILE, new_hard, new_hard).is_ok() {
        return new_hard;
    }
    // Not allowed to raise the hard limit: the soft one can still go up to it.
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// `args`: `--no-build` uses the release binaries already built (e.g. while the tree does not
/// compile); `--rounds N` repeats the 64-connection runs N times (direct, nginx, gateway in turn
/// each round), so a noisy neighbour on a shared machine shows as spread, not as a verdict.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let rounds = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .context("--rounds needs a positive number")?,
        None => 1,
    };
    if !args.iter().any(|a| a == "--no-build") {
        build()?;
    }
    measure_all(rounds)
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

fn measure_all(rounds: usize) -> anyhow::Result<()> {
    let release = target_dir().join("release");
    let shim = release.join("model-serve-shim");
    let loadgen = release.join("examples").join("loadgen");
    let nginx = ensure_nginx()?;
    let nofile = raise_nofile_limit();
    let size = std::fs::metadata(&shim)
        .context("the release binary")?
        .len();
    println!(
        "release binary: {:.1} MB ({size} bytes, every plugin in)",
        size as f64 / 1e6
    );
    println!(
        "open-file limit for the server, nginx and the load generator: {nofile} (the server raises \
         its soft limit to the hard one at start)"
    );

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
    let result = measure(
        &addr,
        &ids,
        server_pid,
        &loadgen,
        &nginx,
        &work,
        Limits { nofile, rounds },
    );
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

/// How far a run goes: the open-file limit in force and the rounds of busy runs.
#[derive(Clone, Copy)]
struct Limits {
    nofile: u64,
    rounds: usize,
}

fn measure(
    addr: &str,
    ids: &[String],
    server_pid: u32,
    loadgen: &Path,
    nginx: &Path,
    work: &Path,
    Limits { nofile, rounds }: Limits,
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
            "worker_processes {workers};\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             upstream replicas {{ least_conn; server {a}; server {b}; keepalive 128; }}\n\
             server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://replicas; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }}\n}}\n",
            dir = work.join("nginx").display(),
            workers = workers(),
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
    let nginx_workers = children(_nginx.0.id());
    // The proxy's CPU time per request is the fairest comparison on a shared machine: it does
    // not depend on how much CPU the neighbours leave.
    let load_measured =
        |target: &str, mode: &str, connections: usize, proxy: &[u32]| -> anyhow::Result<String> {
            let before = cpu_micros(proxy);
            let line = load(target, "bench", mode, connections)?;
            let used = cpu_micros(proxy) - before;
            if proxy.is_empty() {
                return Ok(line);
            }
            let per_request = used as f64 / field(&line, "requests").max(1.0);
            Ok(format!("{line} proxy_cpu_us={per_request:.1}"))
        };
    let nginx_addr = format!("127.0.0.1:{nginx_port}");
    let rss_before = rss_mib(server_pid);
    // Per round: (chat, stream) output lines of direct, nginx and the gateway.
    let mut rounds_out: Vec<[(String, String); 3]> = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            println!("-- round {round} of {rounds}");
        }
        let mut rows = Vec::new();
        for (name, target, proxy) in [
            ("direct (1 replica)", replicas[0].as_str(), &[][..]),
            ("nginx least_conn", nginx_addr.as_str(), &nginx_workers[..]),
            ("xmod-shim gateway", addr, &[server_pid][..]),
        ] {
            let chat = load_measured(target, "chat", CONNECTIONS, proxy)?;
            let stream = load_measured(target, "stream", CONNECTIONS, proxy)?;
            println!("{name:20} chat:   {chat}\n{:20} stream: {stream}", "");
            rows.push((chat, stream));
        }
        let [direct, nginx_row, gateway] = <[(String, String); 3]>::try_from(rows)
            .map_err(|_| anyhow::anyhow!("three targets per round"))?;
        rounds_out.push([direct, nginx_row, gateway]);
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

    let limit = usize::try_from(nofile).unwrap_or(usize::MAX);
    // Client socket + replica socket per stream, beside what the server has open already (its
    // listener, store, log, pooled connections) and a little headroom.
    let open = std::fs::read_dir(format!("/proc/{server_pid}/fd")).map_or(200, Iterator::count);
    let idle = IDLE_STREAMS.min(limit.saturating_sub(open + 16) / 2);
    if idle < IDLE_STREAMS {
        println!(
            "note: the open-file limit {limit} (hard; raising it needs CAP_SYS_RESOURCE) with {open} \
             files open in the server caps idle streams at {idle}: the gateway holds 2 sockets per stream"
        );
    }
    let held = load(addr, "idle", "idle", idle)?;
    println!("idle streams through the gateway: {held}");

    // Each round's figures, then their medians.
    let figures: Vec<[f64; 6]> = rounds_out
        .iter()
        .map(|[direct, nginx_row, gateway]| {
            let ms = |a: &str, b: &str, key: &str| (field(a, key) - field(b, key)) / 1000.0;
            [
                field(&gateway.0, "rps"),
                field(&nginx_row.0, "rps"),
                field(&direct.0, "rps"),
                ms(&gateway.0, &direct.0, "p50_us"),
                ms(&nginx_row.0, &direct.0, "p50_us"),
                ms(&gateway.1, &direct.1, "ttfb_p99_us"),
            ]
        })
        .collect();
    let nginx_ttfbs: Vec<f64> = rounds_out
        .iter()
        .map(|[direct, nginx_row, _]| {
            (field(&nginx_row.1, "ttfb_p99_us") - field(&direct.1, "ttfb_p99_us")) / 1000.0
        })
        .collect();
    let median = |mut values: Vec<f64>| -> f64 {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    let column = |i: usize| median(figures.iter().map(|f| f[i]).collect());
    let ratios: Vec<f64> = figures.iter().map(|f| f[0] / f[1].max(1.0)).collect();
    let ratio = median(ratios.clone());
    let (added_p50, nginx_p50) = (column(3), column(4));
    let (added_ttfb, nginx_ttfb) = (column(5), median(nginx_ttfbs));
    let what = if rounds > 1 {
        format!("medians of {rounds} rounds")
    } else {
        "one round".to_owned()
    };
    println!(
        "\n== gateway vs nginx, {CONNECTIONS} connections, {SECS}s per run, {what}; nginx has {} worker processes, the server {} runtime threads ==",
        workers(),
        workers()
    );
    if rounds > 1 {
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!("gateway/nginx throughput per round: {}", each.join(" "));
    }
    println!(
        "throughput: gateway {:.0} req/s, nginx {:.0} req/s, direct {:.0} req/s -> gateway/nginx = {ratio:.2}x",
        column(0),
        column(1),
        column(2),
    );
    let cpu = |row: usize, text: fn(&(String, String)) -> &String| {
        median(
            rounds_out
                .iter()
                .map(|r| field(text(&r[row]), "proxy_cpu_us"))
                .collect(),
        )
    };
    println!(
        "proxy CPU per request (user + system): chat gateway {:.1} us, nginx {:.1} us; stream gateway {:.1} us, nginx {:.1} us",
        cpu(2, |r| &r.0),
        cpu(1, |r| &r.0),
        cpu(2, |r| &r.1),
        cpu(1, |r| &r.1),
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

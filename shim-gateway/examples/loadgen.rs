//! Load generator for `cargo xtask bench gateway`: keeps N HTTP/1.1 keep-alive connections busy
//! with OpenAI chat requests (plain or streamed) and reports throughput and latency, or holds N
//! streams open and idle. Prints one line of `key=value` fields.
//!
//! ```text
//! loadgen --url http://127.0.0.1:8080 --model bench --mode chat --connections 64 --secs 10
//! loadgen --url … --model idle --mode idle --connections 10000 --secs 10 [--rss-pid PID]
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    host: String,
    model: String,
    mode: String,
    connections: usize,
    secs: u64,
    rss_pid: Option<u32>,
}

fn args() -> Args {
    let mut url = String::from("http://127.0.0.1:8080");
    let mut model = String::from("bench");
    let mut mode = String::from("chat");
    let mut connections = 64;
    let mut secs = 10;
    let mut rss_pid = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = value,
            "--model" => model = value,
            "--mode" => mode = value,
            "--connections" => connections = value.parse().expect("--connections: a number"),
            "--secs" => secs = value.parse().expect("--secs: a number"),
            "--rss-pid" => rss_pid = Some(value.parse().expect("--rss-pid: a pid")),
            other => panic!("unknown flag {other}"),
        }
    }
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let addr = host.parse().expect("--url must be http://IP:PORT");
    Args {
        addr,
        host,
        model,
        mode,
        connections,
        secs,
        rss_pid,
    }
}

fn request(args: &Args, body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("host", &args.host)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request")
}

async fn connect(addr: SocketAddr) -> Option<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Busy connections for `secs`: latency per request and time to the first body byte.
async fn run_busy(args: Arc<Args>, stream: bool) {
    let body = Bytes::from(
        serde_json::json!({
            "model": args.model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "stream": stream,
        })
        .to_string(),
    );
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let args = args.clone();
        let body = body.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut ttfbs = Vec::new();
            let mut sender = None;
            while Instant::now() < deadline {
                if sender.is_none() {
                    sender = connect(args.addr).await;
                    if sender.is_none() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let s = sender.as_mut().expect("connected");
                if s.ready().await.is_err() {
                    sender = None;
                    continue;
                }
                let started = Instant::now();
                let result = async {
                    let response = s.send_request(request(&args, &body)).await.ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    let mut body = response.into_body();
                    let mut first = None;
                    while let Some(frame) = body.frame().await {
                        let frame = frame.ok()?;
                        if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                            first = Some(started.elapsed());
                        }
                    }
                    first
                }
                .await;
                match result {
                    Some(first) => {
                        latencies.push(started.elapsed().as_micros() as u64);
                        ttfbs.push(first.as_micros() as u64);
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        sender = None;
                    }
                }
            }
            (latencies, ttfbs)
        }));
    }
    let mut latencies = Vec::new();
    let mut ttfbs = Vec::new();
    for task in tasks {
        let (l, t) = task.await.expect("task");
        latencies.extend(l);
        ttfbs.extend(t);
    }
    latencies.sort_unstable();
    ttfbs.sort_unstable();
    println!(
        "requests={} errors={} rps={:.0} p50_us={} p99_us={} ttfb_p50_us={} ttfb_p99_us={}",
        latencies.len(),
        errors.load(Ordering::Relaxed),
        latencies.len() as f64 / args.secs as f64,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&ttfbs, 0.5),
        percentile(&ttfbs, 0.99),
    );
}

/// Opens `connections` streams, waits for each one's first byte, holds them `secs`, and counts
/// how many are still open then.
async fn run_idle(args: Arc<Args>) {
    let body = Bytes::from(
        serde_json::json!({
            "model": args.model,
            "messages": [{"role": "user", "content": "hold"}],
            "max_tokens": 4,
            "stream": true,
        })
        .to_string(),
    );
    let opened = Arc::new(AtomicU64::new(0));
    let open_at_end = Arc::new(AtomicU64::new(0));
    // Connect in waves so the accept backlog is not overrun.
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let release = Arc::new(tokio::sync::Notify::new());
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (args, body, opened, open_at_end, connecting, release, released) = (
            args.clone(),
            body.clone(),
            opened.clone(),
            open_at_end.clone(),
            connecting.clone(),
            release.clone(),
            released.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire().await.expect("semaphore");
            let Some(mut sender) = connect(args.addr).await else {
                return;
            };
            let Ok(response) = sender.send_request(request(&args, &body)).await else {
                return;
            };
            if !response.status().is_success() {
                return;
            }
            let mut body = response.into_body();
            let Some(Ok(_first)) = body.frame().await else {
                return;
            };
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            // Idle until the hold ends; a stream that ends or breaks meanwhile is lost.
            let notified = release.notified();
            if released.load(Ordering::SeqCst) {
                open_at_end.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::select! {
                () = notified => { open_at_end.fetch_add(1, Ordering::Relaxed); }
                _ = body.frame() => {}
            }
        }));
    }
    let started = Instant::now();
    let target = args.connections as u64;
    while opened.load(Ordering::Relaxed) < target && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = started.elapsed();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let rss = args.rss_pid.map_or(0, rss_kib);
    released.store(true, Ordering::SeqCst);
    release.notify_waiters();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    println!(
        "opened={} held={} ramp_ms={} rss_kib={rss}",
        opened.load(Ordering::Relaxed),
        open_at_end.load(Ordering::Relaxed),
        ramp.as_millis(),
    );
}

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    match args.mode.as_str() {
        "chat" => run_busy(args, false).await,
        "stream" => run_busy(args, true).await,
        "idle" => run_idle(args).await,
        other => panic!("unknown --mode {other}: chat, stream or idle"),
    }
}

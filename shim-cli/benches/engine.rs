//! Engine and status-API benchmark (`cargo xtask bench`). Prints figures; asserts nothing.
//!
//! 1. Deploys N services (default 1,000) through the real `opensourcellm` pipeline and the
//!    embedded redb store onto the in-memory instant test runtime (it runs nothing: this measures
//!    the engine, not an inference engine), and reports the time until all are running, engine
//!    CPU time per service and RSS growth per service.
//! 2. With those services managed, measures status GET throughput and p99 latency at concurrency
//!    C (default 64) over keep-alive HTTP/1.1, next to a bare hyper "hello" server measured the
//!    same way in the same run.
//!
//! Usage: `cargo xtask bench [--services N] [--concurrency C] [--seconds S] [--rounds R]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use shim_core::store::RedbStore;
use shim_core::testing::InstantShimlet;
use shim_core::{DeploySpec, Engine, EngineConfig, Phase};

struct Options {
    services: usize,
    concurrency: usize,
    seconds: u64,
    rounds: usize,
}

fn options() -> Options {
    let mut o = Options {
        services: 1000,
        concurrency: 64,
        seconds: 3,
        rounds: 5,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), value) {
            ("--services", Some(v)) => o.services = v as usize,
            ("--concurrency", Some(v)) => o.concurrency = v as usize,
            ("--seconds", Some(v)) => o.seconds = v,
            ("--rounds", Some(v)) => o.rounds = (v as usize).max(1),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Resident set size from /proc (KiB).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the command name.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn main() {
    let o = options();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models/bench")).unwrap();

    let engine = server_rt.block_on(async {
        let store = RedbStore::open(dir.path().join("state.redb"), 200).unwrap();
        let config = EngineConfig {
            model_root: dir.path().join("models"),
            data_dir: dir.path().to_path_buf(),
            default_engine: "mock".into(),
            gpus: Some(Vec::new()),
            ..EngineConfig::default()
        };
        Engine::builder()
            .config(config)
            .store(Arc::new(store))
            .shimlet_instance(|ctx| Arc::new(InstantShimlet::with_notifier(ctx.notifier)))
            .pipeline_named("opensourcellm")
            .build()
            .await
            .unwrap()
    });
    // Link the built-in pipeline crate so `opensourcellm` is registered.
    let _ = shim_pipeline::opensourcellm;

    println!(
        "== engine: deploy {} services (opensourcellm pipeline, redb store, instant test runtime)",
        o.services
    );
    let rss_before = rss_kib();
    let cpu_before = cpu_time();
    let started = Instant::now();
    let ids: Vec<String> = server_rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..o.services {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                engine.deploy(DeploySpec::named("bench")).await.unwrap()
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        loop {
            let running = engine
                .phase_counts()
                .iter()
                .find(|(p, _)| *p == Phase::Running)
                .map_or(0, |(_, n)| *n);
            if running == o.services {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "services did not all become running"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ids
    });
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    // Let the store writer and event persistence settle before reading memory.
    std::thread::sleep(Duration::from_millis(300));
    let rss_growth = rss_kib().saturating_sub(rss_before);
    println!(
        "all {} running after:        {:.3} s",
        o.services,
        elapsed.as_secs_f64()
    );
    println!(
        "engine CPU time per service: {:.3} ms",
        cpu.as_secs_f64() * 1000.0 / o.services as f64
    );
    println!(
        "RSS growth per service:      {:.1} KiB ({} KiB total)",
        rss_growth as f64 / o.services as f64,
        rss_growth
    );

    let state = shim_server::AppState::new(engine.clone(), shim_server::ServerConfig::default());
    let shim_addr = server_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(shim_server::serve(listener, state, std::future::pending()));
        addr
    });
    let hello_addr = server_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"hello"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    });

    println!(
        "\n== HTTP: {} connections, {} alternating rounds of {} s per server, {} managed services",
        o.concurrency,
        o.rounds,
        o.seconds,
        ids.len()
    );
    let ids = Arc::new(ids);
    // Alternate the two servers and take each one's median round, so drift in the machine's load
    // (other processes on 2 cores) hits both alike.
    let mut bare = Vec::new();
    let mut shim = Vec::new();
    for _ in 0..o.rounds {
        bare.push(client_rt.block_on(load(
            hello_addr,
            o.concurrency,
            o.seconds,
            Arc::new(vec![]),
            false,
        )));
        shim.push(client_rt.block_on(load(shim_addr, o.concurrency, o.seconds, ids.clone(), true)));
    }
    let (bare, shim) = (median(bare), median(shim));
    println!(
        "bare hyper hello:  {:>9.0} req/s   p50 {:.2} ms   p99 {:.2} ms   (median round)",
        bare.rps, bare.p50_ms, bare.p99_ms
    );
    println!(
        "status GET:        {:>9.0} req/s   p50 {:.2} ms   p99 {:.2} ms   (median round)",
        shim.rps, shim.p50_ms, shim.p99_ms
    );
    println!("status GET / bare: {:.1} %", shim.rps / bare.rps * 100.0);
    println!(
        "\ntargets (2-core machine): all running within 2 s; RSS growth <= 20 KiB/service; status GET >= 70 % of bare with p99 <= 5 ms"
    );
    server_rt.block_on(engine.shutdown());
}

struct LoadResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The round with the median throughput.
fn median(mut rounds: Vec<LoadResult>) -> LoadResult {
    rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    rounds.swap_remove(rounds.len() / 2)
}

/// `concurrency` keep-alive connections each sending GETs back to back for `seconds`.
async fn load(
    addr: std::net::SocketAddr,
    concurrency: usize,
    seconds: u64,
    ids: Arc<Vec<String>>,
    status: bool,
) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let stop = stop.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                let path = if status {
                    format!("/api/v1/modserv/{}", ids[n % ids.len()])
                } else {
                    "/".to_string()
                };
                n += concurrency;
                let request = hyper::Request::get(path)
                    .header("host", "bench")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let sent = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                assert!(response.status().is_success());
                let body = response.into_body().collect().await.unwrap().to_bytes();
                if status {
                    assert!(
                        body.windows(9).any(|w| w == b"\"running\""),
                        "status GET did not report running"
                    );
                }
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    LoadResult {
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

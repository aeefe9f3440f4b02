//! `cargo xtask bench k8s [--services N] [--binary PATH]`: several replicas on a real control
//! plane.
//!
//! Starts `shared/k8s-lab` (no scheduler: its fake kubelet binds every pod itself, so 1,000 pods
//! fit on its one node), installs the ModelService CRD and `deploy/rbac.yaml`, and runs two
//! release shims (`--store kubernetes --shimlet k8s`) as the ServiceAccount of `rbac.yaml`, so
//! the audit log tells their requests apart. Then it deploys N mock-engine services (default
//! 1,000) through the leader and prints:
//!
//! - API server requests per deploy (the ServiceAccount's, from the audit log, ÷ N);
//! - RSS of leader and follower before the deploys and at N services, and per service;
//! - status GET throughput on the follower (keep-alive connections, a few seconds);
//! - failover: after a kill -9 of the leader, seconds until the follower leads, and until a
//!   deploy sent to it right after the kill reads running.
//!
//! Everything it starts stops on every exit: the shims and the lab on drop, and a watchdog
//! process that runs `down.sh` and kills the shims if this process dies without unwinding
//! (Ctrl-C, kill).

#[allow(clippy::all, dead_code)]
#[path = "../../shim-cli/tests/common/k8s_lab.rs"]
mod k8s_lab;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::gateway_bench::{free_port, http, rss_mib, target_dir};
use k8s_lab::Lab;

const NAMESPACE: &str = "xmod-shim";
const USER: &str = "system:serviceaccount:xmod-shim:xmod-shim";
/// Deploy requests in flight at once.
const DEPLOYERS: usize = 8;
/// Concurrent status readers, and how long they read.
const READERS: usize = 16;
const READ_SECS: u64 = 5;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut services = 1000usize;
    let mut binary = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--services" => {
                services = rest
                    .next()
                    .context("--services needs a number")?
                    .parse()
                    .context("--services needs a number")?;
            }
            "--binary" => {
                binary = Some(PathBuf::from(rest.next().context("--binary needs a path")?))
            }
            other => bail!(
                "unknown argument {other:?}; usage: cargo xtask bench k8s [--services N] [--binary PATH]"
            ),
        }
    }
    anyhow::ensure!(services > 0, "--services must be at least 1");
    // `--binary`: another build (e.g. one kept from before a change), as it is.
    let bin = match binary {
        Some(bin) => bin,
        None => {
            super::cargo(&["build", "--release", "-p", "shim-cli"])?;
            target_dir().join("release").join("model-serve-shim")
        }
    };
    anyhow::ensure!(bin.is_file(), "{} is missing", bin.display());
    bench(&bin, services)
}

/// A shim process: killed (SIGKILL) on drop.
struct Shim {
    child: Option<Child>,
    pid: u32,
    addr: String,
    log: PathBuf,
}

impl Shim {
    fn start(bin: &Path, dir: &Path, config: &Path, pids: &Path) -> anyhow::Result<Shim> {
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::create_dir_all(dir.join("models"))?;
        let port = free_port()?;
        let log_path = dir.join("shim.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .args(["--default-engine", "mock", "--store", "kubernetes"])
            .args(["--shimlet", "k8s", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--model-root")
            .arg(dir.join("models"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        // For the watchdog.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pids)?;
        writeln!(file, "{pid}")?;
        let shim = Shim {
            child: Some(child),
            pid,
            addr: format!("127.0.0.1:{port}"),
            log: log_path,
        };
        wait("a shim to answer /healthz", 60, || {
            http("GET", &shim.addr, "/healthz", None).ok().map(|_| ())
        })
        .with_context(|| shim.tail())?;
        Ok(shim)
    }

    fn leads(&self) -> bool {
        http("GET", &self.addr, "/healthz", None)
            .ok()
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .is_some_and(|h| h["data"]["leader"] == true)
    }

    fn rss_kib(&self) -> f64 {
        rss_mib(self.pid) * 1024.0
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "shim log ({}):\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// `(running, all)` services, as this shim lists them.
    fn running(&self) -> (usize, usize) {
        let Ok(body) = http("GET", &self.addr, "/api/v1/modserv", None) else {
            return (0, 0);
        };
        let Ok(list) = serde_json::from_str::<Value>(&body) else {
            return (0, 0);
        };
        let items = list["data"].as_array().cloned().unwrap_or_default();
        let running = items.iter().filter(|s| s["status"] == "running").count();
        (running, items.len())
    }

    fn status(&self, id: &str) -> Option<String> {
        let body = http("GET", &self.addr, &format!("/api/v1/modserv/{id}"), None).ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["status"].as_str().map(str::to_string)
    }

    fn deploy(&self, model: &str) -> anyhow::Result<String> {
        let body = json!({"modelName": model, "engine": "mock", "replicaCount": 1,
                          "resourceRequirements": {"acceleratorCount": 0}});
        let answer = http(
            "POST",
            &self.addr,
            "/api/v1/modserv/deploy",
            Some(&body.to_string()),
        )?;
        let v: Value = serde_json::from_str(&answer)?;
        v["data"]["serviceId"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("deploy answered {answer}"))
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `probe` every 100 ms until it gives a value; a progress line every 5 s; fails after
/// `secs`.
fn wait<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if started.elapsed() > Duration::from_secs(secs) {
            bail!("gave up waiting for {what} after {secs} s");
        }
        if said.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  waiting for {what} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `down.sh` and kills the shims once this process is gone, however it ends; a no-op
/// after a normal exit (the lab's folder is gone by then).
fn watchdog(state: &Path, pids: &Path) -> anyhow::Result<()> {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         if [ -f '{pids}' ]; then for p in $(cat '{pids}'); do kill -9 $p 2>/dev/null; done; fi; \
         bash '{down}' '{state}' >/dev/null 2>&1",
        me = std::process::id(),
        pids = pids.display(),
        down = k8s_lab::lab_dir().join("down.sh").display(),
        state = state.display(),
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the clean-up watchdog")?;
    Ok(())
}

/// The ServiceAccount's finished requests so far, by `verb resource`.
fn requests(lab: &Lab) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for e in lab.requests_by(USER) {
        let object = &e["objectRef"];
        let mut resource = object["resource"].as_str().unwrap_or("").to_string();
        if let Some(sub) = object["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        *by.entry(format!("{} {resource}", e["verb"].as_str().unwrap_or("")))
            .or_default() += 1;
    }
    by
}

fn bench(bin: &Path, n: usize) -> anyhow::Result<()> {
    eprintln!("starting the k8s lab (no scheduler)");
    let lab = Lab::up_with(&[("K8S_LAB_SCHEDULER", "0")]);
    let pids = lab.state.path().join("bench-shims.pids");
    watchdog(lab.state.path(), &pids)?;
    let root = super::root();
    lab.apply_file(NAMESPACE, &root.join("deploy/crds/modelservices.yaml"));
    wait("the ModelService CRD to be Established", 30, || {
        let crd = lab.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/modelservices.xmod-shim.io",
        );
        crd["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
            .then_some(())
    })?;
    lab.namespace(NAMESPACE);
    lab.apply_file(NAMESPACE, &root.join("deploy/rbac.yaml"));
    let kubeconfig = lab.service_account_kubeconfig(NAMESPACE, "xmod-shim");
    // JSON is YAML.
    let config = lab.state.path().join("bench-shim.yaml");
    std::fs::write(
        &config,
        json!({
            "plugins": {"defaultShimlet": "k8s"},
            "pipelines": {"opensourcellm": {"checkModelDir": false}},
            "shimlets": {"k8s": {"kubeConfig": kubeconfig, "namespace": NAMESPACE,
                                  "qps": 500.0, "burst": 1000}},
        })
        .to_string(),
    )?;

    let dirs: Vec<PathBuf> = (0..2)
        .map(|i| lab.state.path().join(format!("bench-shim-{i}")))
        .collect();
    let mut shims = Vec::new();
    for dir in &dirs {
        shims.push(Shim::start(bin, dir, &config, &pids)?);
    }
    let leader = wait("one shim to lead", 60, || {
        let leading: Vec<usize> = (0..shims.len()).filter(|&i| shims[i].leads()).collect();
        (leading.len() == 1).then(|| leading[0])
    })?;
    let follower = 1 - leader;
    eprintln!("shim {leader} leads; settling 3 s");
    std::thread::sleep(Duration::from_secs(3));
    let rss_before = [shims[leader].rss_kib(), shims[follower].rss_kib()];
    let before = requests(&lab);

    // N deploys through the leader, DEPLOYERS at a time.
    eprintln!("deploying {n} services through the leader, {DEPLOYERS} at a time");
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    std::thread::scope(|scope| {
        for _ in 0..DEPLOYERS {
            let (next, ids, failures, shim) = (&next, &ids, &failures, &shims[leader]);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    match shim.deploy(&format!("m{i}")) {
                        Ok(id) => ids.lock().unwrap().push(id),
                        Err(e) => failures.lock().unwrap().push(format!("m{i}: {e:#}")),
                    }
                }
            });
        }
        let mut said = Instant::now();
        while next.load(Ordering::SeqCst) < n + DEPLOYERS {
            if said.elapsed() >= Duration::from_secs(5) {
                let (running, _) = shims[leader].running();
                eprintln!(
                    "  {:.0} s: {} deploys accepted, {running} running",
                    started.elapsed().as_secs_f64(),
                    ids.lock().unwrap().len()
                );
                said = Instant::now();
            }
            if ids.lock().unwrap().len() + failures.lock().unwrap().len() >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let failures = failures.lock().unwrap().clone();
    if !failures.is_empty() {
        bail!(
            "{} deploys failed, e.g. {}\n{}",
            failures.len(),
            failures[0],
            shims[leader].tail()
        );
    }
    let accepted = started.elapsed();
    eprintln!(
        "{n} deploys accepted in {:.1} s; waiting for all to read running",
        accepted.as_secs_f64()
    );
    let limit = 300 + n as u64;
    let mut last_say = Instant::now();
    wait(
        &format!("{n} services running on the leader"),
        limit,
        || {
            let (running, all) = shims[leader].running();
            if last_say.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "  {:.0} s: {running}/{all} running on the leader",
                    started.elapsed().as_secs_f64()
                );
                last_say = Instant::now();
            }
            (running >= n).then_some(())
        },
    )?;
    let all_running = started.elapsed();
    let after = requests(&lab);
    wait(
        &format!("{n} services running on the follower"),
        120,
        || (shims[follower].running().0 >= n).then_some(()),
    )?;
    eprintln!("all {n} running; settling 5 s");
    std::thread::sleep(Duration::from_secs(5));
    let rss_at_n = [shims[leader].rss_kib(), shims[follower].rss_kib()];

    // Status reads on the follower.
    let ids = ids.lock().unwrap().clone();
    eprintln!("status GETs on the follower: {READERS} connections for {READ_SECS} s");
    let (reads, errors, read_secs) = read_load(&shims[follower].addr, &ids)?;

    // Failover.
    eprintln!("kill -9 of the leader");
    shims[leader].kill();
    let killed = Instant::now();
    let late_id = shims[follower].deploy("after-kill")?;
    let took_over = wait("the follower to lead", 120, || {
        shims[follower].leads().then(|| killed.elapsed())
    })?;
    let late_running = wait(
        "the deploy sent after the kill to read running",
        180,
        || {
            (shims[follower].status(&late_id).as_deref() == Some("running"))
                .then(|| killed.elapsed())
        },
    )?;

    // Figures.
    let mut made = 0usize;
    let mut leases = 0usize;
    let mut by_kind = Vec::new();
    for (key, count) in &after {
        let d = count - before.get(key).copied().unwrap_or(0);
        if key.ends_with(" leases") {
            // The election's renewals: by the clock, not by the deploys.
            leases += d;
        } else if d > 0 {
            made += d;
            by_kind.push((d, key.clone()));
        }
    }
    by_kind.sort_by(|a, b| b.cmp(a));
    let per = |kib: f64| kib / n as f64;
    let mib = |kib: f64| kib / 1024.0;
    println!(
        "\n== Kubernetes store, 2 replicas, {n} services (k8s lab; {}) ==",
        bin.display()
    );
    println!(
        "deploys: {n} accepted in {:.1} s, all running after {:.1} s",
        accepted.as_secs_f64(),
        all_running.as_secs_f64()
    );
    println!(
        "API requests by the shims' ServiceAccount during the deploys: {made} = {:.1} per deploy \
         (besides {leases} Lease reads and renewals)",
        made as f64 / n as f64
    );
    let breakdown: Vec<String> = by_kind
        .iter()
        .map(|(d, k)| format!("{k} {:.2}", *d as f64 / n as f64))
        .collect();
    println!("  per deploy: {}", breakdown.join(", "));
    for (i, name) in ["leader", "follower"].iter().enumerate() {
        println!(
            "RSS {name:8}: {:.1} MiB before, {:.1} MiB at {n} services = {:.1} KiB per service",
            mib(rss_before[i]),
            mib(rss_at_n[i]),
            per(rss_at_n[i] - rss_before[i])
        );
    }
    println!(
        "status GET on the follower: {reads} reads in {read_secs:.1} s = {:.0} reads/s ({READERS} keep-alive connections, {errors} errors)",
        reads as f64 / read_secs
    );
    println!(
        "failover after kill -9 of the leader: follower leads after {:.1} s; a deploy sent after the kill running after {:.1} s",
        took_over.as_secs_f64(),
        late_running.as_secs_f64()
    );
    drop(shims);
    drop(lab);
    Ok(())
}

/// [`READERS`] keep-alive connections GET the status of random services for [`READ_SECS`];
/// returns (answered reads, errors, seconds).
fn read_load(addr: &str, ids: &[String]) -> anyhow::Result<(usize, usize, f64)> {
    let reads = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let started = Instant::now();
    let until = started + Duration::from_secs(READ_SECS);
    std::thread::scope(|scope| {
        for t in 0..READERS {
            let (reads, errors) = (&reads, &errors);
            scope.spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut i = t * 7919;
                while Instant::now() < until {
                    i = i.wrapping_add(104_729);
                    let path = format!("/api/v1/modserv/{}", ids[i % ids.len()]);
                    let c = match conn.take() {
                        Some(c) => c,
                        None => match TcpStream::connect(addr) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                BufReader::new(s)
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                    };
                    match get_keep_alive(c, addr, &path) {
                        Ok((200, c)) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                            conn = Some(c);
                        }
                        Ok((_, c)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            conn = Some(c);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    Ok((
        reads.into_inner(),
        errors.into_inner(),
        started.elapsed().as_secs_f64(),
    ))
}

/// One GET on a kept-alive connection; the body is read (by `Content-Length`) and dropped.
fn get_keep_alive(
    mut conn: BufReader<TcpStream>,
    addr: &str,
    path: &str,
) -> std::io::Result<(u16, BufReader<TcpStream>)> {
    // One write (no Nagle delay between pieces of a request).
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<u64>().ok();
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("no Content-Length"))?;
    std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink())?;
    Ok((code, conn))
}

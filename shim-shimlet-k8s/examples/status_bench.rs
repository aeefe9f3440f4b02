//! Status reads with the Kubernetes shimlet and 1,000 managed services: throughput of
//! `observe`, then of `GET /api/v1/modserv/{id}` through the real engine and HTTP server, and the
//! number of API server requests each kind of read causes (must be 0).
//!
//! The cluster is the fake API server of the integration tests (kube's client over a
//! `tower_test` mock), holding 1,000 ready Deployments, Services and Pods that the shimlet's
//! watches list at start. Run with:
//!
//! ```text
//! cargo run -p shim-shimlet-k8s --example status_bench --release [-- SERVICES ROUNDS]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Behaviour, FakeCluster, Kind};
use serde_json::json;
use shim_core::queue::WorkQueue;
use shim_core::{DeploySpec, Engine, EngineConfig, Notifier, Phase, Shimlet, WorkloadState};
use shim_shimlet_k8s::{K8sShimlet, object_name};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);

    let cluster = FakeCluster::new(Behaviour::default());
    let ids: Vec<String> = (0..services).map(|i| format!("{i:08x}")).collect();
    for id in &ids {
        populate(&cluster, id);
    }

    let started = Instant::now();
    let queue = Arc::new(WorkQueue::new());
    let shimlet = Arc::new(
        K8sShimlet::with_client(
            cluster.client(),
            common::config(),
            "/srv/models".into(),
            Notifier::new(queue.clone()),
        )
        .await
        .expect("the shimlet starts"),
    );
    let start_up = started.elapsed();
    // Watches open just after their lists; counting starts once all three are open.
    cluster.wait_for_watches(3).await;
    let start_requests = cluster.request_count();
    for id in &ids {
        assert_eq!(
            shimlet.observe(id).await.unwrap().state,
            WorkloadState::Ready,
            "the initial list made {id} ready"
        );
    }

    // One reader.
    let before = cluster.request_count();
    let started = Instant::now();
    for _ in 0..rounds {
        for id in &ids {
            let seen = shimlet.observe(id).await.unwrap();
            debug_assert_eq!(seen.state, WorkloadState::Ready);
        }
    }
    let single = started.elapsed();
    let single_reads = rounds * ids.len();

    // Sixteen readers at once (status GETs arrive concurrently).
    let readers = 16;
    let started = Instant::now();
    let tasks: Vec<_> = (0..readers)
        .map(|r| {
            let shimlet = shimlet.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut ready = 0usize;
                for round in 0..rounds / 4 {
                    for id in ids.iter().skip((r + round) % 7) {
                        if shimlet.observe(id).await.unwrap().state == WorkloadState::Ready {
                            ready += 1;
                        }
                    }
                }
                ready
            })
        })
        .collect();
    let mut parallel_reads = 0;
    for task in tasks {
        parallel_reads += task.await.unwrap();
    }
    let parallel = started.elapsed();
    let during_reads = cluster.request_count() - before;

    // Watch fan-in: every Deployment loses its ready replica; how long until all reads show it.
    let started = Instant::now();
    for id in &ids {
        let name = object_name(id, "bench");
        cluster.modify(Kind::Deployment, &name, |d| {
            d["status"]["readyReplicas"] = json!(0);
        });
    }
    loop {
        let mut all = true;
        for id in &ids {
            all &= shimlet.observe(id).await.unwrap().state == WorkloadState::Starting;
        }
        if all {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "watch events did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let fan_in = started.elapsed();
    let mut notified = std::collections::HashSet::new();
    while let Ok(Some(id)) = tokio::time::timeout(Duration::from_millis(50), queue.next()).await {
        queue.done(&id);
        notified.insert(id);
    }

    println!("Kubernetes shimlet status reads, {services} managed services (fake API server)");
    println!(
        "  start-up (check + list and watch 3 kinds, {} objects): {:>8.1} ms, {start_requests} requests",
        services * 3,
        start_up.as_secs_f64() * 1e3
    );
    println!(
        "  observe, 1 reader:   {single_reads:>9} reads in {:>7.1} ms = {:>12.0} reads/s ({:.0} ns/read)",
        single.as_secs_f64() * 1e3,
        single_reads as f64 / single.as_secs_f64(),
        single.as_nanos() as f64 / single_reads as f64
    );
    println!(
        "  observe, {readers} readers: {parallel_reads:>9} reads in {:>7.1} ms = {:>12.0} reads/s",
        parallel.as_secs_f64() * 1e3,
        parallel_reads as f64 / parallel.as_secs_f64()
    );
    println!(
        "  API server requests during {} reads: {during_reads}",
        single_reads + parallel_reads
    );
    println!(
        "  watch fan-in: {services} Deployment changes visible to observe after {:.1} ms; {} services notified",
        fan_in.as_secs_f64() * 1e3,
        notified.len()
    );
    assert_eq!(during_reads, 0, "status reads must not call the API server");
    status_gets_over_http(services, 5).await;
}

/// The engine and HTTP server over a second fake cluster: `services` deployed through the
/// opensourcellm pipeline, then 64 connections send status GETs for `seconds`.
async fn status_gets_over_http(services: usize, seconds: u64) {
    let cluster = FakeCluster::new(Behaviour {
        auto_rollout: true,
        instant_delete: true,
        ..Behaviour::default()
    });
    let config = EngineConfig {
        default_engine: "mock".into(),
        gpus: Some(Vec::new()),
        plugins: Arc::new(json!({
            "pipelines": { "opensourcellm": { "checkModelDir": false, "pollIntervalMs": 20 } },
        })),
        ..EngineConfig::default()
    };
    let shimlet = K8sShimlet::with_client(
        cluster.client(),
        common::config(),
        "/srv/models".into(),
        Notifier::detached(),
    )
    .await
    .expect("the shimlet starts");
    let pipeline = shim_pipeline::opensourcellm(&config.plugin_settings()).expect("pipeline");
    let engine = Engine::builder()
        .config(config)
        .shimlet_instance(move |ctx| {
            shimlet.set_notifier(ctx.notifier.clone());
            Arc::new(shimlet)
        })
        .pipeline(pipeline)
        .build()
        .await
        .expect("the engine starts");
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..services {
        ids.push(
            engine
                .deploy(DeploySpec::named("bench"))
                .await
                .expect("deploy"),
        );
    }
    while engine
        .phase_counts()
        .iter()
        .find(|(p, _)| *p == Phase::Running)
        .map_or(0, |(_, n)| *n)
        < services
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "services did not all run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deployed = started.elapsed();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let state = shim_server::AppState::new(engine.clone(), shim_server::ServerConfig::default());
    tokio::spawn(shim_server::serve(listener, state, std::future::pending()));

    let http = reqwest::Client::new();
    let ids = Arc::new(ids);
    let before = cluster.request_count();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..64)
        .map(|worker| {
            let (http, ids) = (http.clone(), ids.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = worker;
                while Instant::now() < deadline {
                    let url = format!("http://{address}/api/v1/modserv/{}", ids[n % ids.len()]);
                    n += 64;
                    let sent = Instant::now();
                    let body = http
                        .get(&url)
                        .send()
                        .await
                        .expect("GET")
                        .text()
                        .await
                        .expect("body");
                    latencies.push(sent.elapsed());
                    assert!(body.contains("\"running\""), "{body}");
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("load task"));
    }
    let during = cluster.request_count() - before;
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "  status GET over HTTP ({services} services deployed through the engine in {:.1} s): \
         {} GETs in {seconds} s = {:.0} req/s, p99 {:.2} ms, API server requests during the GETs: {during}",
        deployed.as_secs_f64(),
        latencies.len(),
        latencies.len() as f64 / seconds as f64,
        p99.as_secs_f64() * 1e3
    );
    assert_eq!(during, 0, "status GETs must not call the API server");
    engine.shutdown().await;
}

/// One ready service: Deployment (rolled out), Service, Pod.
fn populate(cluster: &FakeCluster, id: &str) {
    let name = object_name(id, "bench");
    let labels = json!({"app.kubernetes.io/managed-by": "xmod-shim", "xmod-shim/service-id": id});
    cluster.put(
        Kind::Deployment,
        json!({
            "metadata": {"name": name, "labels": labels,
                "annotations": {"xmod-shim/generation": "1", "xmod-shim/model-name": "bench"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "engine", "image": "xmod-shim/mock-engine:latest"}]}}},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                "readyReplicas": 1, "availableReplicas": 1},
        }),
    );
    cluster.put(
        Kind::Service,
        json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"type": "ClusterIP", "selector": labels,
                "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
        }),
    );
    cluster.put(
        Kind::Pod,
        json!({
            "metadata": {"name": format!("{name}-7c9d8f6b5-p0"), "labels": labels},
            "spec": {"containers": [{"name": "engine", "image": "xmod-shim/mock-engine:latest"}]},
            "status": {"phase": "Running", "hostIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]},
        }),
    );
}

//! Status reads with the Kubernetes shimlet and 1,000 managed services: throughput of
//! `observe` and the number of API server requests the reads cause (must be 0).
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
use shim_core::{Notifier, Shimlet, WorkloadState};
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

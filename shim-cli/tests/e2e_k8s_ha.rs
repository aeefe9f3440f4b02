//! Several shims on one cluster (`engine.store: kubernetes`, `shared/k8s-lab`), as the
//! ServiceAccount of `deploy/rbac.yaml`: one leader (the Lease holder) reconciles, every
//! replica answers the whole API.
//!
//! Three shims. A deploy accepted by one follower and deleted through the other shows on the
//! first follower's event stream as the leader runs it (running, terminating, deleted). Then
//! 20 deploys sent round-robin to all three; kill -9 of the leader while they are
//! in flight, then of the replica that took over → all 20 running on the survivor, exactly 20
//! Deployments, and every status read sent to a live follower meanwhile answered. Then, with
//! every shim stopped, a ModelService deleted with foreground propagation takes its Deployment
//! and Service with it (ownerReferences: the cluster's garbage collector needs no shim).

mod common;
#[path = "common/k8s_lab.rs"]
mod k8s_lab;
#[path = "common/k8s_store.rs"]
mod k8s_store;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Shim, deploy, free_port, get, wait_for};
use k8s_store::{NAMESPACE, lab_with_crd_and_rbac, mock, start_shim, workloads_of};
use serde_json::json;

/// Whether the shim at `base` holds the Lease (its /healthz says so).
fn leads(base: &str) -> bool {
    get(&format!("{base}/healthz"))
        .map(|h| h["data"]["leader"] == true)
        .unwrap_or(false)
}

/// The `data:` lines of a server-sent event stream, as they arrive.
fn sse_lines(url: &str) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let response = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
        .get(url)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{url}");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(response).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data:")
                && tx.send(data.trim().to_string()).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Waits (30 s at most) for a transition of service `id` to phase `to` on `stream`.
fn wait_for_transition(stream: &std::sync::mpsc::Receiver<String>, id: &str, to: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let data = stream
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no transition of {id} to {to} on the follower's stream"));
        let event: serde_json::Value = serde_json::from_str(&data).unwrap();
        if event["serviceId"] == id && event["type"] == "transition" && event["to"] == to {
            return;
        }
    }
}

/// The one live shim that leads, waiting for one to.
fn leader_of(bases: &[String], alive: &[bool], secs: u64) -> usize {
    wait_for("one shim to lead", secs, || {
        let leading: Vec<usize> = (0..bases.len())
            .filter(|&i| alive[i] && leads(&bases[i]))
            .collect();
        (leading.len() == 1).then(|| leading[0])
    })
}

#[test]
fn three_replicas_survive_two_kills_with_20_deploys_in_flight() {
    let (lab, kubeconfig) = lab_with_crd_and_rbac();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut shims: Vec<Option<Shim>> = dirs
        .iter()
        .map(|d| Some(start_shim(d.path(), &kubeconfig, free_port())))
        .collect();
    let bases: Vec<String> = shims
        .iter()
        .map(|s| s.as_ref().unwrap().base.clone())
        .collect();
    let mut alive = vec![true; 3];
    let first = leader_of(&bases, &alive, 30);
    eprintln!("leader: shim {first}");

    // A follower's event stream tells the leader's story: a deploy accepted by one follower,
    // run by the leader, and deleted through the other follower, seen on the first one's
    // /api/v1/events (the events travel through the ModelService, no side channel).
    let followers: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    let stream = sse_lines(&format!("{}/api/v1/events", bases[followers[0]]));
    let probe = deploy(shims[followers[0]].as_ref().unwrap(), mock("probe"));
    wait_for_transition(&stream, &probe, "running");
    common::send(
        reqwest::Method::DELETE,
        &shims[followers[1]]
            .as_ref()
            .unwrap()
            .url(&format!("/api/v1/modserv/{probe}")),
        None,
    );
    wait_for_transition(&stream, &probe, "terminating");
    wait_for_transition(&stream, &probe, "deleted");
    wait_for("the probe's workload to go", 60, || {
        lab.deployments(NAMESPACE).is_empty().then_some(())
    });

    // Status reads against every live follower, all along: each must be answered.
    let live: Arc<Vec<AtomicBool>> = Arc::new((0..3).map(|_| AtomicBool::new(true)).collect());
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let reads = Arc::new(AtomicUsize::new(0));
    let unanswered: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (live, ids, reads, unanswered, stop, bases) = (
            live.clone(),
            ids.clone(),
            reads.clone(),
            unanswered.clone(),
            stop.clone(),
            bases.clone(),
        );
        std::thread::spawn(move || {
            let client = common::client();
            while !stop.load(Ordering::SeqCst) {
                let known = ids.lock().unwrap().clone();
                for (i, base) in bases.iter().enumerate() {
                    for id in &known {
                        // A shim killed between the check and the read is not a follower
                        // failing to answer.
                        if !live[i].load(Ordering::SeqCst) || leads(base) {
                            continue;
                        }
                        let answer = client
                            .get(format!("{base}/api/v1/modserv/{id}"))
                            .send()
                            .map(|r| r.status().as_u16());
                        if !live[i].load(Ordering::SeqCst) {
                            continue;
                        }
                        reads.fetch_add(1, Ordering::SeqCst);
                        match answer {
                            Ok(200) => {}
                            other => unanswered
                                .lock()
                                .unwrap()
                                .push(format!("shim {i} {id}: {other:?}")),
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // 20 deploys, round-robin over the three shims; the leader dies while they are in flight.
    for n in 0..20 {
        let shim = shims[n % 3].as_ref().unwrap();
        let id = deploy(shim, mock(&format!("m{n}")));
        ids.lock().unwrap().push(id);
    }
    let kill = |i: usize, shims: &mut Vec<Option<Shim>>, alive: &mut Vec<bool>| {
        live[i].store(false, Ordering::SeqCst);
        alive[i] = false;
        let mut shim = shims[i].take().unwrap();
        shim.child.kill().unwrap(); // SIGKILL: no lease release, no goodbye
        shim.child.wait().unwrap();
    };
    kill(first, &mut shims, &mut alive);
    let killed_at = Instant::now();
    let second = leader_of(&bases, &alive, 40);
    let first_failover = killed_at.elapsed();
    eprintln!(
        "shim {second} took over {:.1} s after the kill -9 of the leader",
        first_failover.as_secs_f64()
    );
    kill(second, &mut shims, &mut alive);
    let killed_at = Instant::now();
    let survivor = leader_of(&bases, &alive, 40);
    let second_failover = killed_at.elapsed();
    eprintln!(
        "shim {survivor} took over {:.1} s after the kill -9 of the second leader",
        second_failover.as_secs_f64()
    );

    // All 20 running on the survivor, within 30 s of its taking over.
    let all: Vec<String> = ids.lock().unwrap().clone();
    let base = &bases[survivor];
    wait_for("all 20 services running on the survivor", 30, || {
        all.iter()
            .all(|id| {
                get(&format!("{base}/api/v1/modserv/{id}"))
                    .is_ok_and(|e| e["data"]["status"] == "running")
            })
            .then_some(())
    });
    let running_after = killed_at.elapsed();
    eprintln!(
        "all 20 running {:.1} s after the second kill",
        running_after.as_secs_f64()
    );
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let unanswered = unanswered.lock().unwrap().clone();
    let reads = reads.load(Ordering::SeqCst);
    assert!(reads > 0, "no status read reached a follower");
    assert!(
        unanswered.is_empty(),
        "followers left {} of {reads} status reads unanswered: {unanswered:?}",
        unanswered.len()
    );
    eprintln!("followers answered all {reads} status reads during the kills");
    let deployments = lab.deployments(NAMESPACE);
    assert_eq!(deployments.len(), 20, "{deployments:?}");
    for id in &all {
        let (d, s) = workloads_of(&lab, id);
        assert_eq!((d.len(), s.len()), (1, 1), "{id}: {d:?} {s:?}");
    }

    // No shim at all: the cluster itself removes a deleted ModelService's workload.
    shims[survivor].take().unwrap().stop();
    let victim = &all[0];
    let (deployments, _) = workloads_of(&lab, victim);
    let owners = lab.get(&format!(
        "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{}",
        deployments[0]
    ))["metadata"]["ownerReferences"]
        .clone();
    let model_service = k8s_store::model_service(&lab, victim).expect("the ModelService");
    assert_eq!(
        owners[0]["uid"], model_service["metadata"]["uid"],
        "the Deployment's owner: {owners}"
    );
    let (code, body) = lab.request(
        "DELETE",
        &k8s_store::model_service_path(victim),
        Some(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})),
    );
    assert!(code == 200 || code == 202, "delete: {code} {body}");
    let collected = Instant::now();
    // The collector takes about a second here; kube-controller-manager can lag far behind on
    // a loaded 2-core CI machine (seen once: over 60 s), hence the margin.
    wait_for("the garbage collector to remove the workload", 180, || {
        (workloads_of(&lab, victim) == (vec![], vec![])).then_some(())
    });
    eprintln!(
        "with no shim running, the Deployment and Service went {:.1} s after the ModelService's delete",
        collected.elapsed().as_secs_f64()
    );
    // The ModelService waits, terminating, for a shim to confirm the teardown.
    let held = k8s_store::model_service(&lab, victim).expect("held by the finalizer");
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");

    // A shim that starts again finishes it: the ModelService goes, and REST says notExist.
    let restarted = start_shim(dirs[survivor].path(), &kubeconfig, free_port());
    leader_of(std::slice::from_ref(&restarted.base), &[true], 40);
    wait_for("the held ModelService to go", 60, || {
        k8s_store::model_service(&lab, victim)
            .is_none()
            .then_some(())
    });
    let envelope = get(&restarted.url(&format!("/api/v1/modserv/{victim}"))).unwrap();
    assert_eq!(envelope["data"]["status"], "notExist", "{envelope}");
}

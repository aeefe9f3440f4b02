//! The OpenAI gateway in front of two pods on the k8s shimlet with `replicaAddresses: pods`,
//! against a real control plane (`shared/k8s-lab`), as the ServiceAccount of `deploy/rbac.yaml`.
//!
//! The fake kubelet runs no container, so the test plays the container runtime: the lab's pod
//! network is the subnet of a Docker bridge network made for the test, and once a pod is Ready
//! the real mock engine starts in a container at that pod's IP (`docker run --ip`), listening on
//! the pod's container port. The shim learns the pods' addresses from the EndpointSlices only,
//! and requests through `/v1/chat/completions`, streamed and not, reach both pods. (Loopback pod
//! IPs, `K8S_LAB_POD_CIDR=127.0.0.0/8`, would spare Docker, but the API server refuses loopback
//! addresses in EndpointSlices, so the EndpointSlice controller never publishes such pods.)
//!
//! The audit log shows the shim watching EndpointSlices and making no request per status read,
//! per gateway request, or while idle. Without a Docker Engine the test skips with a notice,
//! except under `CI=true`, where it fails.

mod common;
#[path = "common/docker.rs"]
mod docker;
// Only `build` is used here; the rest serves the xtask.
#[allow(dead_code)]
#[path = "../../xtask/src/docker_image.rs"]
mod docker_image;
#[path = "common/k8s_lab.rs"]
mod k8s_lab;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    BIN, Shim, deploy, free_port, gateway_chat, read_log, replicas_of, wait_for, wait_status,
};
use docker::{Cleanup, create_network, docker, docker_available};
use k8s_lab::Lab;
use serde_json::{Value, json};

const NAMESPACE: &str = "xmod-shim";
/// The identity `deploy/rbac.yaml` creates and binds.
const SHIM_USER: &str = "system:serviceaccount:xmod-shim:xmod-shim";
/// The mock preset's container port.
const PORT: u16 = docker_image::MOCK_ENGINE_PORT;

/// Names and IPs of the service's Ready pods (not being deleted).
fn ready_pods(lab: &Lab, id: &str) -> Vec<(String, String)> {
    let list = lab.get(&format!(
        "/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=xmod-shim/service-id%3D{id}"
    ));
    let ready = |pod: &Value| {
        pod["metadata"]["deletionTimestamp"].is_null()
            && pod["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    };
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pod| ready(pod))
        .filter_map(|pod| {
            Some((
                pod["metadata"]["name"].as_str()?.to_string(),
                pod["status"]["podIP"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn urls(ips: &[&str]) -> Vec<String> {
    let mut urls: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:{PORT}")).collect();
    urls.sort();
    urls
}

/// Which engines answer `n` requests, plain and streamed, by the address they listen on.
fn answered_by(shim: &Shim, n: usize) -> BTreeSet<String> {
    [false, true]
        .into_iter()
        .flat_map(|stream| (0..n).map(move |_| gateway_chat(shim, "demo", stream).listen))
        .collect()
}

/// Waits until the service's replicas are exactly `expected`; the message shows the slices.
fn wait_replicas(shim: &Shim, lab: &Lab, id: &str, expected: &[String], data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicas_of(shim, id) != expected {
        assert!(
            Instant::now() < deadline,
            "replicas {:?}, not the pods' {expected:?}; EndpointSlices: {}\nlog:\n{}",
            replicas_of(shim, id),
            lab.get(&format!(
                "/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
            )),
            read_log(data)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pod's "container": the mock engine at the pod's IP on the test's network.
fn start_engine(network: &str, image: &str, ip: &str, cleanup: &mut Cleanup) -> String {
    let port = PORT.to_string();
    let container = docker(&[
        "run",
        "-d",
        "--network",
        network,
        "--ip",
        ip,
        "--label",
        "xmod-shim-test=k8s-gateway",
        image,
        "--host",
        ip,
        "--port",
        &port,
        "--served-model-name",
        "demo",
    ]);
    cleanup.containers.push(container.clone());
    wait_for(&format!("the mock engine at {ip}:{PORT}"), 30, || {
        std::net::TcpStream::connect((ip, PORT)).ok()
    });
    container
}

#[test]
fn with_pod_addresses_both_pods_answer_through_the_gateway() {
    if !docker_available() {
        return;
    }
    let test = format!("xmod-shim-k8s-gateway-{}", std::process::id());
    let image = format!("xmod-shim/mock-engine:{}", &test["xmod-shim-".len()..]);
    let mut cleanup = Cleanup::default();
    cleanup.images.push(image.clone());
    docker_image::build(&image, Path::new(BIN)).expect("building the mock-engine image");
    // A /20 keeps two pods from hashing to one IP (odds 1 in 4093); its first host is the
    // bridge's, which the fake kubelet never hands out.
    let seed = std::process::id() as usize;
    let candidates: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "10.{}.{}.0/20",
                200 + (seed + i) % 50,
                16 * ((seed / 50 + i) % 16)
            )
        })
        .collect();
    let subnet = create_network(&test, &candidates);
    cleanup.networks.push(test.clone());

    let lab = Lab::up_with(&[("K8S_LAB_POD_CIDR", &subnet)]);
    let kubeconfig = lab.with_shipped_rbac(NAMESPACE);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("shim.yaml");
    let settings = json!({
        "plugins": {"defaultShimlet": "k8s"},
        "pipelines": {"opensourcellm": {"checkModelDir": false}},
        "shimlets": {"k8s": {"kubeConfig": kubeconfig, "namespace": NAMESPACE,
                             "replicaAddresses": "pods"}},
    });
    std::fs::write(&config, serde_yaml::to_string(&settings).unwrap()).unwrap();
    let shim = Shim::start_with(
        &data,
        &dir.path().join("models"),
        free_port(),
        &["--config", config.to_str().unwrap()],
    );

    let id = deploy(
        &shim,
        json!({"modelName": "demo", "engine": "mock", "replicaCount": 2,
               "resourceRequirements": {"acceleratorCount": 0}}),
    );
    wait_status(&shim, &id, 60, |d| d["status"] == "running");
    // The fake kubelet hashes each pod's uid into the subnet, so two pods share an IP once in
    // about 4,000 deploys (seen once in CI): then one of them is deleted, and its replacement
    // (a new uid) gets another IP. A real cluster never hands out one IP twice.
    let mut rerolled = 0;
    let pods = wait_for("two Ready pods with their own IPs", 60, || {
        let pods = ready_pods(&lab, &id);
        if pods.len() != 2 {
            return None;
        }
        if pods[0].1 != pods[1].1 {
            return Some(pods);
        }
        assert!(
            rerolled < 3,
            "the fake kubelet keeps giving both pods one IP: {pods:?}"
        );
        rerolled += 1;
        eprintln!(
            "both pods got {}; deleting {} for a new uid",
            pods[0].1, pods[0].0
        );
        let (code, body) = lab.request(
            "DELETE",
            &format!("/api/v1/namespaces/{NAMESPACE}/pods/{}", pods[0].0),
            None,
        );
        assert_eq!(code, 200, "{body}");
        None
    });
    let ips: Vec<&str> = pods.iter().map(|(_, ip)| ip.as_str()).collect();

    // The replicas are the pods, from the EndpointSlices, not the Service.
    wait_replicas(&shim, &lab, &id, &urls(&ips), &data);
    let mut engines: Vec<String> = ips
        .iter()
        .map(|ip| start_engine(&test, &image, ip, &mut cleanup))
        .collect();
    let before = lab.requests_by(SHIM_USER).len();
    let answered = answered_by(&shim, 10);
    let expected: BTreeSet<String> = ips.iter().map(|ip| format!("{ip}:{PORT}")).collect();
    assert_eq!(answered, expected, "log:\n{}", read_log(&data));
    eprintln!("pods {pods:?} answered on {answered:?}");

    // Status reads and gateway requests never reach the API server.
    for _ in 0..100 {
        assert_eq!(replicas_of(&shim, &id).len(), 2);
    }
    let during = &lab.requests_by(SHIM_USER)[before..];
    assert!(during.is_empty(), "requests: {during:#?}");
    let used = lab.permissions_used_by(SHIM_USER);
    for permission in ["endpointslices:list", "endpointslices:watch"] {
        assert!(used.contains(permission), "{permission} not used: {used:?}");
    }

    // A pod replaced behind the shim's back: its successor takes its place among the replicas,
    // and requests sent meanwhile are answered (a refused one is retried on the other pod).
    let (gone_name, gone_ip) = pods[0].clone();
    let kept_ip = pods[1].1.clone();
    docker(&["rm", "-f", &engines.remove(0)]);
    let (code, body) = lab.request(
        "DELETE",
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{gone_name}"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    for _ in 0..4 {
        let answer = gateway_chat(&shim, "demo", false);
        assert_eq!(answer.listen, format!("{kept_ip}:{PORT}"));
    }
    let new_ip = wait_for("a replacement pod", 30, || {
        ready_pods(&lab, &id)
            .into_iter()
            .map(|(_, ip)| ip)
            .find(|ip| *ip != kept_ip)
    });
    assert_ne!(
        new_ip, gone_ip,
        "the fake kubelet gave the new pod the old one's IP"
    );
    wait_replicas(&shim, &lab, &id, &urls(&[&kept_ip, &new_ip]), &data);
    engines.push(start_engine(&test, &image, &new_ip, &mut cleanup));
    // A replica that refused a connection (the new pod before its engine listened) sits out
    // the gateway's cool-down (5 s) before it is tried again.
    wait_for("the new pod to answer through the gateway", 20, || {
        let answer = gateway_chat(&shim, "demo", false);
        (answer.listen == format!("{new_ip}:{PORT}")).then_some(())
    });
    let answered = answered_by(&shim, 10);
    let expected: BTreeSet<String> = [&kept_ip, &new_ip]
        .iter()
        .map(|ip| format!("{ip}:{PORT}"))
        .collect();
    assert_eq!(answered, expected);

    // Idle: the EndpointSlice watch stays open and nothing polls.
    std::thread::sleep(Duration::from_secs(1));
    let before = lab.requests_by(SHIM_USER).len();
    std::thread::sleep(Duration::from_secs(10));
    let idle = &lab.requests_by(SHIM_USER)[before..];
    assert!(idle.is_empty(), "requests while idle: {idle:#?}");
    drop(shim);
    drop(lab);
}

//! A real Kubernetes control plane for tests: `shared/k8s-lab` (kube-apiserver, controller-manager
//! and scheduler v1.36.2, etcd, and a fake kubelet that makes pods Ready without containers).
//!
//! [`Lab::up`] starts one on free ports in its own temporary directory and [`Drop`] stops it.
//! Tests talk to the API server as `admin` through `curl` (which the lab needs anyway), so they
//! need no Kubernetes client of their own. The lab is part of the project's shared folder: a
//! checkout without it fails the test, never skips it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// `shared/k8s-lab`, beside the project checkout.
pub fn lab_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/k8s-lab")
        .canonicalize()
        .unwrap_or_else(|e| {
            panic!(
                "the k8s lab is missing: {}/../../shared/k8s-lab ({e}); the Kubernetes tests \
                 run against it (see its README)",
                env!("CARGO_MANIFEST_DIR")
            )
        });
    assert!(
        dir.join("up.sh").is_file(),
        "{} has no up.sh",
        dir.display()
    );
    dir
}

/// One running cluster.
pub struct Lab {
    pub state: tempfile::TempDir,
    pub apiserver: String,
    pub ca: PathBuf,
    pub audit_log: PathBuf,
    pub admin_kubeconfig: PathBuf,
    admin_token: String,
    /// The API server's command line, kept while it is stopped.
    stopped_apiserver: Option<Vec<String>>,
    /// An API server this test restarted (a child of the test): reaped after `down.sh`.
    restarted_apiserver: Option<std::process::Child>,
}

impl Lab {
    /// Starts a cluster (about 3 s; 6 s the first time, when the binaries are unpacked).
    pub fn up() -> Lab {
        Self::up_with(&[])
    }

    /// As [`Lab::up`], with environment knobs for `up.sh` (e.g. `K8S_LAB_SCHEDULER=0`).
    pub fn up_with(env: &[(&str, &str)]) -> Lab {
        let state = tempfile::Builder::new()
            .prefix("k8s-lab-")
            .tempdir()
            .unwrap();
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(lab_dir().join("up.sh"))
            .arg(state.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("running k8s-lab/up.sh");
        assert!(
            out.status.success(),
            "k8s-lab/up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("k8s lab up in {:.1} s", started.elapsed().as_secs_f64());
        let env = std::fs::read_to_string(state.path().join("env")).unwrap();
        let var = |name: &str| -> String {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} missing from the lab's env:\n{env}"))
                .trim_matches('\'')
                .to_string()
        };
        let admin_kubeconfig = PathBuf::from(var("KUBECONFIG"));
        let admin_token = std::fs::read_to_string(&admin_kubeconfig)
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_string))
            .expect("a token in the admin kubeconfig");
        Lab {
            apiserver: var("K8S_LAB_APISERVER"),
            ca: PathBuf::from(var("K8S_LAB_CA")),
            audit_log: PathBuf::from(var("K8S_LAB_AUDIT_LOG")),
            admin_kubeconfig,
            admin_token,
            stopped_apiserver: None,
            restarted_apiserver: None,
            state,
        }
    }

    /// One request as `admin`: (HTTP status, body as JSON or `null`).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.request_as(
            &self.admin_token.clone(),
            method,
            path,
            body,
            "application/json",
        )
    }

    fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> (u16, Value) {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "20", "-X", method, "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", &format!("Content-Type: {content_type}")])
            .args(["-w", "\n%{http_code}"]);
        if let Some(body) = body {
            curl.args(["--data-binary", &body.to_string()]);
        }
        let out = curl
            .arg(format!("{}{path}", self.apiserver))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code: u16 = code.trim().parse().unwrap_or(0);
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// A JSON merge patch as admin (e.g. scaling a Deployment behind the shim's back).
    pub fn request_merge_patch(&self, path: &str, patch: &Value) -> (u16, Value) {
        self.request_as(
            &self.admin_token.clone(),
            "PATCH",
            path,
            Some(patch),
            "application/merge-patch+json",
        )
    }

    /// GET as admin; panics unless 200.
    pub fn get(&self, path: &str) -> Value {
        let (code, body) = self.request("GET", path, None);
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    /// Creates an object as admin (201 or 409 = already there).
    pub fn create(&self, collection: &str, object: &Value) {
        let (code, body) = self.request("POST", collection, Some(object));
        assert!(
            code == 201 || code == 409,
            "POST {collection}: {code} {body}"
        );
    }

    /// Creates every object of a multi-document YAML file in `namespace`, as shipped (only the
    /// kinds the project's manifests use).
    pub fn apply_file(&self, namespace: &str, file: &Path) {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(doc).unwrap();
            if object.is_null() {
                continue;
            }
            let collection = match object["kind"].as_str().unwrap() {
                "ServiceAccount" => format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
                "Role" => {
                    format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles")
                }
                "RoleBinding" => format!(
                    "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"
                ),
                // Cluster-scoped: `namespace` does not apply.
                "CustomResourceDefinition" => {
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions".to_string()
                }
                other => panic!("{}: no collection known for kind {other}", file.display()),
            };
            self.create(&collection, &object);
        }
    }

    /// Creates a namespace.
    pub fn namespace(&self, name: &str) {
        self.create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        );
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` (a bound token from
    /// the TokenRequest API), with `namespace` as its default.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let (code, body) = self.request(
            "POST",
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
            Some(
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 86400}}),
            ),
        );
        assert_eq!(code, 201, "TokenRequest: {body}");
        let token = body["status"]["token"].as_str().unwrap();
        let path = self
            .state
            .path()
            .join(format!("kubeconfig-{namespace}-{name}"));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {
                "server": self.apiserver,
                "certificate-authority": self.ca,
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {
                "cluster": "lab", "user": name, "namespace": namespace,
            }}],
            "current-context": "lab",
        });
        std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
        path
    }

    /// Names of the Deployments in `namespace`.
    pub fn deployments(&self, namespace: &str) -> Vec<String> {
        let list = self.get(&format!("/apis/apps/v1/namespaces/{namespace}/deployments"));
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// `resource:verb` (with `resource/subresource`) of every request `user` made, finished or
    /// still open (a watch logs `ResponseStarted` first).
    pub fn permissions_used_by(&self, user: &str) -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["user"]["username"] == user)
            .map(|e| {
                let object = &e["objectRef"];
                let resource = object["resource"].as_str().unwrap_or("");
                let resource = match object["subresource"].as_str() {
                    Some(sub) => format!("{resource}/{sub}"),
                    None => resource.to_string(),
                };
                format!("{resource}:{}", e["verb"].as_str().unwrap_or(""))
            })
            .collect()
    }

    /// Requests that `user` made so far, from the audit log (one `ResponseComplete` each).
    pub fn requests_by(&self, user: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .collect()
    }

    fn pid_file(&self, component: &str) -> PathBuf {
        self.state.path().join(format!("{component}.pid"))
    }

    /// Stops the API server (SIGTERM, then SIGKILL after 5 s: it would drain its watches for
    /// longer); etcd and the rest stay.
    pub fn stop_apiserver(&mut self) {
        let pid = std::fs::read_to_string(self.pid_file("kube-apiserver")).unwrap();
        let pid = pid.trim().to_string();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let gone = || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(&pid);
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !gone() {
            Command::new("kill").args(["-KILL", &pid]).status().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !gone() {
                assert!(Instant::now() < deadline, "kube-apiserver survived SIGKILL");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.stopped_apiserver = Some(args);
        eprintln!("kube-apiserver stopped");
    }

    /// Starts the API server again with the same command line; returns once `/readyz` answers.
    pub fn start_apiserver(&mut self) {
        let args = self
            .stopped_apiserver
            .take()
            .expect("start_apiserver after stop_apiserver");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.state.path().join("kube-apiserver.log"))
            .unwrap();
        // Its own session, like up.sh starts it, so down.sh finds it by its recorded pid.
        let child = Command::new("setsid")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("restarting kube-apiserver");
        std::fs::write(self.pid_file("kube-apiserver"), child.id().to_string()).unwrap();
        if let Some(mut earlier) = self.restarted_apiserver.replace(child) {
            let _ = earlier.wait(); // stopped by stop_apiserver
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, _) = self.request("GET", "/readyz", None);
            if code == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not come back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("kube-apiserver ready again");
    }
}

fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Lab {
    /// Stops the cluster; with `K8S_LAB_KEEP=1` leaves it (and its logs) for a look, and says
    /// where.
    fn drop(&mut self) {
        if std::env::var_os("K8S_LAB_KEEP").is_some_and(|v| v == "1") {
            let dir = std::mem::replace(&mut self.state, tempfile::tempdir().unwrap()).keep();
            eprintln!(
                "K8S_LAB_KEEP=1: the lab keeps running in {}; stop it with {}/down.sh {0}",
                dir.display(),
                lab_dir().display()
            );
            return;
        }
        let _ = Command::new("bash")
            .arg(lab_dir().join("down.sh"))
            .arg(self.state.path())
            .stdout(Stdio::null())
            .status();
        if let Some(mut child) = self.restarted_apiserver.take() {
            let _ = child.wait(); // down.sh stopped it
        }
    }
}

//! HTTPS through the real binary: `service.tls` serves the API over TLS with the given
//! certificate, and a renewed certificate written over the files is served without a restart.
//! Certificates are made with the `openssl` command (which the k8s lab needs too) and checked
//! with `curl` and `openssl s_client`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, free_port};

/// A self-signed certificate for 127.0.0.1 with common name `cn`.
fn certificate(dir: &Path, cn: &str) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={cn}")])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem.new"))
        .arg("-out")
        .arg(dir.join("cert.pem.new"))
        .stderr(Stdio::null())
        .status()
        .expect("running openssl (needed for the TLS test)");
    assert!(status.success());
    // Renamed into place, as certificate tools do, so the server never reads half a file.
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
}

/// The common name of the certificate the server presents.
fn served_cn(port: u16) -> String {
    let s_client = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = s_client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("subject=").map(str::to_string))
        .unwrap_or_default()
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn https_with_the_configured_certificate_reloaded_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    certificate(&certs, "first");
    let config = dir.path().join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "service:\n  tls:\n    certFile: {}\n    keyFile: {}\n",
            certs.join("cert.pem").display(),
            certs.join("key.pem").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut shim = Command::new(BIN)
        .args(["--port", &port.to_string(), "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--model-root")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = scopeguard(&mut shim);
    let ca = certs.join("cert.pem");
    let ca = ca.to_str().unwrap();
    let url = format!("https://127.0.0.1:{port}/healthz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&["--cacert", ca, &url]).0 {
        assert!(Instant::now() < deadline, "no HTTPS answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, body) = curl(&[
        "--cacert",
        ca,
        &format!("https://127.0.0.1:{port}/api/v1/modserv"),
    ]);
    assert!(ok && body.contains("\"code\":0"), "{body}");
    assert!(
        !curl(&[&format!("http://127.0.0.1:{port}/healthz")]).0,
        "plain HTTP answered on the TLS port"
    );
    assert!(served_cn(port).contains("first"));

    // Renewed: the new certificate is served within a few seconds, no restart.
    certificate(&certs, "second");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !served_cn(port).contains("second") {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ca = certs.join("cert.pem");
    assert!(curl(&["--cacert", ca.to_str().unwrap(), &url]).0);
    drop(guard);
}

/// Kills the shim when the test ends, passing or not.
fn scopeguard(child: &mut std::process::Child) -> impl Drop + '_ {
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Kill(child)
}

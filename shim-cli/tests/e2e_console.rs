//! The web console in a real headless Chromium, driven over WebDriver (chromedriver), against the
//! real binary with the process runtime and the built-in mock engine:
//! - an operator deploys from the form, watches the service turn running without a reload, reads
//!   and follows its logs, chats with it through the gateway (streamed token by token), scales
//!   it, visits every page and deletes it;
//! - a thousand services stay quick to filter and page, a change asks for the operator token,
//!   and the dark theme switches on;
//! - the deploy form shows the memory estimate and the GPUs page the inventory (fake nvidia-smi).
//!
//! On every test the browser's console must stay free of errors, and each page passes an
//! accessibility audit (labels, names, contrast). A screenshot of each page is saved (to
//! `XMOD_SHIM_SCREENSHOTS` when set, else to the test's temporary directory).
//!
//! Chromium and chromedriver come from the Debian packages `chromium` and `chromium-driver`
//! (`cargo xtask ci` installs them). Under `CI=true` their absence fails the test; elsewhere the
//! test says loudly that it did not run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Prints to the real stderr: libtest captures `eprintln!` of passing tests, and a skipped or
/// partial run must be seen.
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The first of `names` found on PATH (or the path given in `env`).
fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// The page audit run by [`Browser::audit`]; returns a list of problems.
const AUDIT: &str = r#"
const problems = [];
const visible = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (visible(el) && !(el.labels && el.labels.length) && !el.getAttribute('aria-label')) {
    problems.push(`unlabelled ${el.tagName} #${el.id}`);
  }
}
for (const el of document.querySelectorAll('button, a[href]')) {
  if (visible(el) && !(el.textContent.trim() || el.getAttribute('aria-label'))) {
    problems.push(`nameless ${el.tagName} ${el.outerHTML.slice(0, 80)}`);
  }
}
const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
const lum = ([r, g, b]) => {
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
};
const background = (el) => {
  for (; el; el = el.parentElement) {
    const c = rgb(getComputedStyle(el).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
  }
  return [255, 255, 255];
};
for (const el of document.querySelectorAll('body *')) {
  const text = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!text || !visible(el) || el.closest('[disabled], .skip, option, dialog:not([open])')) continue;
  const style = getComputedStyle(el);
  const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(el))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const large = parseFloat(style.fontSize) >= 24 || (parseFloat(style.fontSize) >= 18.66 && Number(style.fontWeight) >= 700);
  if (ratio < (large ? 3 : 4.5)) {
    problems.push(`contrast ${ratio.toFixed(2)} of "${el.textContent.trim().slice(0, 40)}" (${style.color} on ${background(el)})`);
  }
}
return problems;
"#;

/// chromedriver as a child process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(program: &Path, log: &Path) -> Driver {
        let port = free_port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's log endpoint (`POST /session/{id}/se/log`): what the page wrote to its console,
/// uncaught exceptions and failed loads included. Not part of W3C WebDriver, so fantoccini has no
/// method for it; this is its documented extension point.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

struct Browser {
    client: Client,
    shots: PathBuf,
    /// Every console entry seen so far (the log endpoint returns each entry once).
    log: Vec<Value>,
}

impl Browser {
    /// Evaluates `expr` until it is truthy; returns its value.
    async fn until(&self, expr: &str, what: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let script = format!("return ({expr});");
        loop {
            let value = self.client.execute(&script, vec![]).await.unwrap();
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                let page = self
                    .client
                    .execute("return document.getElementById('main').innerText", vec![])
                    .await
                    .unwrap_or_default();
                panic!("timed out waiting for {what} ({expr}); the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("cannot click {css}: {e}"));
    }

    async fn shot(&self, name: &str) {
        // The page as a person lands on it: from the top, without the passing notifications.
        self.client
            .execute(
                "window.scrollTo(0, 0); document.getElementById('toasts').replaceChildren()",
                vec![],
            )
            .await
            .unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Accessibility basics of the page as shown: every form control has a label, every button
    /// and link a name, and visible text reaches WCAG AA contrast against what is behind it.
    async fn audit(&self, page: &str) {
        let problems = self.client.execute(AUDIT, vec![]).await.unwrap();
        assert_eq!(problems, json!([]), "accessibility problems on {page}");
    }

    async fn collect_log(&mut self) {
        let entries = self.client.issue_cmd(BrowserLog).await.unwrap();
        self.log
            .extend(entries.as_array().cloned().unwrap_or_default());
    }
}

/// Chromium and chromedriver, or `None` (after a loud message) when they are missing outside CI.
/// Under `CI=true` a missing browser fails the test instead.
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let chromium = find_program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let chromedriver = find_program("CHROMEDRIVER", &["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        assert!(
            !ci,
            "CI=true but chromium or chromedriver is missing: install the Debian packages \
             `chromium` and `chromium-driver` (cargo xtask ci does)"
        );
        loud!(
            "\n\n*** SKIPPED: the web console's browser test did not run: chromium or chromedriver \
             is not installed (apt-get install chromium chromium-driver). Under CI=true this fails. ***\n"
        );
        return None;
    };
    Some((chromium, chromedriver))
}

/// A new headless Chromium session with its console log recorded.
async fn session(driver: &Driver, chromium: &Path, shots: &Path) -> Browser {
    let mut caps = Capabilities::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,860"],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromedriver session");
    Browser {
        client,
        shots: shots.to_path_buf(),
        log: Vec::new(),
    }
}

/// Console entries at level SEVERE.
fn errors(log: &[Value]) -> Vec<&Value> {
    log.iter().filter(|e| e["level"] == "SEVERE").collect()
}

fn screenshots_dir(tmp: &Path) -> PathBuf {
    let shots = std::env::var_os("XMOD_SHIM_SCREENSHOTS")
        .map_or_else(|| tmp.join("screenshots"), PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    shots
}

/// The gateway's API key in the first test's server.
const GATEWAY_KEY: &str = "console-test-gateway-key";

#[test]
fn an_operator_deploys_watches_reads_logs_chats_and_deletes_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    std::fs::create_dir_all(models.join("demo")).unwrap();
    let shots = screenshots_dir(dir.path());
    // Two GPUs declared in config (no real one needed): the form then asks for one per replica,
    // and the GPUs page shows the service holding one.
    let config = dir.path().join("shim.yaml");
    // The gateway wants an API key (its own, not the operator token): the playground asks.
    std::fs::write(
        &config,
        format!(
            "engine:\n  gpus: [\"0\", \"1\"]\ngateway:\n  apiKeys:\n    - key: {GATEWAY_KEY}\n"
        ),
    )
    .unwrap();
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    // What the server offers besides the core API (other issues add them); the test then expects
    // the console to use them, or to say plainly that they are missing.
    let has_route = |path: &str| {
        client()
            .get(shim.url(path))
            .send()
            .is_ok_and(|r| r.status() != reqwest::StatusCode::NOT_FOUND)
    };
    // A service whose model is missing fails at once: the table then shows a reason too.
    deploy(
        &shim,
        json!({ "modelName": "qwen-missing", "engine": "mock" }),
    );
    let gateway = has_route("/v1/models");
    let gpus = has_route("/api/v1/gpus");
    let driver = Driver::start(&chromedriver, &dir.path().join("chromedriver.log"));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (service_id, log) = runtime.block_on(async {
        let mut b = session(&driver, &chromium, &shots).await;

        // The services page, empty, with its live stream connected.
        b.client.goto(&shim.url("/ui")).await.unwrap();
        b.until("document.querySelector('#services-table') !== null", "the services table", 20)
            .await;
        b.until("document.getElementById('live').textContent === 'live'", "the live stream", 20)
            .await;
        // A marker that a reload would wipe: every later step must happen without one.
        b.client
            .execute("window.__noReload = true", vec![])
            .await
            .unwrap();

        // Deploy from the form: the mock model, the mock engine, a dry run first.
        b.click("a[data-page=deploy]").await;
        b.until(
            "document.querySelector('#deploy-model option[value=demo]') !== null",
            "the model list",
            20,
        )
        .await;
        let form = b.client.find(Locator::Css("#deploy-engine")).await.unwrap();
        form.select_by_value("mock").await.unwrap();
        if gpus {
            // The server has a GPU, so the form proposes one per replica.
            let proposed = b
                .until(
                    "document.getElementById('deploy-gpus').value",
                    "the GPU field",
                    10,
                )
                .await;
            assert_eq!(proposed, json!("1"));
        }
        // The mock engine streams a token every 40 ms, so streaming is observable.
        b.client
            .find(Locator::Css("#deploy-env"))
            .await
            .unwrap()
            .send_keys("MOCK_TOKEN_DELAY_MS=40")
            .await
            .unwrap();
        let confirm_disabled = b
            .client
            .execute("return document.getElementById('deploy-confirm').disabled", vec![])
            .await
            .unwrap();
        assert_eq!(confirm_disabled, json!(true), "deploy before a dry run");
        b.click("#deploy-preview").await;
        b.until(
            "document.querySelector('#dry-run details pre') !== null \
             && !document.getElementById('deploy-confirm').disabled",
            "the dry run",
            30,
        )
        .await;
        let rendered = b
            .until("document.querySelector('#dry-run').innerText", "the rendered workload", 5)
            .await;
        assert!(
            rendered.as_str().unwrap().contains("mock-engine"),
            "the dry run shows the mock engine's command: {rendered}"
        );
        b.audit("deploy").await;
        b.shot("deploy").await;
        b.click("#deploy-confirm").await;
        let hash = b
            .until(
                "location.hash.startsWith('#/service/') && location.hash",
                "the detail page after deploying",
                20,
            )
            .await;
        let service_id = hash
            .as_str()
            .unwrap()
            .trim_start_matches("#/service/")
            .to_string();

        // Back to the table: the new service turns running there by itself.
        b.click("a[data-page=services]").await;
        let row = format!("#services-table tr[data-id='{service_id}']");
        b.until(
            &format!(
                "document.querySelector(\"{row}\") \
                 && document.querySelector(\"{row} .status\").textContent === 'running'"
            ),
            "the service running in the table",
            60,
        )
        .await;
        let row_text = b
            .until(
                &format!("document.querySelector(\"{row}\").innerText"),
                "the row",
                5,
            )
            .await;
        let row_text = row_text.as_str().unwrap();
        assert!(row_text.contains("demo") && row_text.contains("mock"), "{row_text}");
        assert!(row_text.contains("1/1"), "ready/desired: {row_text}");
        assert!(row_text.contains("/v1/chat/completions"), "endpoint: {row_text}");
        b.audit("services").await;
        b.shot("services").await;

        // The detail page: pipeline done, events, and the engine log.
        b.click(&format!("{row} a[href^='#/service/']")).await;
        b.until(
            "document.querySelector('#service-facts .status')?.textContent === 'running'",
            "the detail page",
            20,
        )
        .await;
        b.until(
            "[...document.querySelectorAll('#steps li')].length > 0 && \
             [...document.querySelectorAll('#steps li')].every(li => ['succeeded','skipped'].includes(li.dataset.state))",
            "every pipeline step done",
            20,
        )
        .await;
        b.until(
            "document.getElementById('timeline').innerText.includes('→ running')",
            "the transition to running in the timeline",
            20,
        )
        .await;
        // The ready replica and its address, beside the service's endpoint.
        let replica = b
            .until(
                "document.querySelector('#replicas li code')?.textContent",
                "the ready replica's address",
                20,
            )
            .await;
        assert!(
            replica.as_str().unwrap().starts_with("http://127.0.0.1:"),
            "{replica}"
        );
        b.click("#show-logs").await;
        let logs = b
            .until(
                "document.getElementById('logs').textContent.includes('mock') \
                 && document.getElementById('logs').textContent",
                "the engine log",
                20,
            )
            .await;
        assert!(
            !logs.as_str().unwrap().starts_with("Logs unavailable"),
            "{logs}"
        );
        b.audit("detail").await;
        b.shot("detail").await;

        // The log is followed: a second replica, started while the page watches, shows up in it
        // (each replica's lines are marked once there are two).
        b.client
            .execute(
                "fetch(`/api/v1/modserv/${arguments[0]}`, {method: 'PATCH',
                   headers: {'Content-Type': 'application/merge-patch+json'},
                   body: JSON.stringify({replicaCount: 2})})",
                vec![json!(service_id)],
            )
            .await
            .unwrap();
        b.until(
            "document.getElementById('logs').textContent.includes('[replica 1]')",
            "the second replica's lines in the followed log",
            30,
        )
        .await;

        // The playground: a streamed answer through the gateway, token by token.
        // From the running service straight to the playground, its model chosen.
        // (The link shows while the service runs; the scale-up above converges first.)
        b.until(
            "document.querySelector(\"#main a[href^='#/playground']:not([hidden])\") \
             && document.querySelector('#service-facts .status')?.textContent === 'running'",
            "the service running again with two replicas",
            60,
        )
        .await;
        b.click("#main a[href^='#/playground']").await;
        if gateway {
            // Refused without the key; with it, the list opens.
            b.until(
                "document.getElementById('chat-notice').textContent.includes('gateway API key')",
                "the request for the gateway key",
                20,
            )
            .await;
            b.client
                .find(Locator::Css("#gateway-key"))
                .await
                .unwrap()
                .send_keys(&format!("{GATEWAY_KEY}\u{e004}")) // Tab: the field's change event
                .await
                .unwrap();
            b.until(
                "document.querySelector('#chat-model option[value=demo]') !== null",
                "the gateway's model list",
                30,
            )
            .await;
            let chosen = b
                .client
                .execute("return document.getElementById('chat-model').value", vec![])
                .await
                .unwrap();
            assert_eq!(chosen, json!("demo"));
            // Records every text the answer shows while it streams.
            b.client
                .execute(
                    "window.__seen = [];
                     new MutationObserver(() => {
                       const a = document.querySelector('#chat .msg.assistant');
                       if (a && a.textContent) window.__seen.push(a.textContent);
                     }).observe(document.getElementById('chat'),
                                {subtree: true, childList: true, characterData: true});",
                    vec![],
                )
                .await
                .unwrap();
            b.client
                .find(Locator::Css("#chat-input"))
                .await
                .unwrap()
                .send_keys("hello there from the browser test")
                .await
                .unwrap();
            b.click("#chat-send").await;
            let answer = b
                .until(
                    "!document.querySelector('#chat .msg.assistant[aria-busy]') \
                     && document.querySelector('#chat .msg.assistant')?.textContent",
                    "a chat answer",
                    30,
                )
                .await;
            assert!(
                b.client
                    .find_all(Locator::Css("#chat .msg.error"))
                    .await
                    .unwrap()
                    .is_empty(),
                "the chat showed an error"
            );
            let seen = b.client.execute("return window.__seen", vec![]).await.unwrap();
            let distinct: std::collections::BTreeSet<&str> = seen
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                distinct.len() >= 3,
                "the answer arrived in one piece, not token by token: {seen}; answer {answer}"
            );
        } else {
            // No gateway on this server yet: the page says so, and a message fails visibly.
            b.until(
                "document.getElementById('chat-notice').textContent.includes('no OpenAI gateway')",
                "the missing-gateway notice",
                20,
            )
            .await;
            b.client
                .find(Locator::Css("#chat-input"))
                .await
                .unwrap()
                .send_keys("hello")
                .await
                .unwrap();
            b.click("#chat-send").await;
            b.until(
                "document.querySelector('#chat .msg.error')?.textContent",
                "the failed request shown in the chat",
                20,
            )
            .await;
            loud!(
                "NOTE: this server has no OpenAI gateway (/v1/models is 404): the playground was \
                 tested up to the request, not the streamed answer"
            );
        }
        b.audit("playground").await;
        b.shot("playground").await;

        b.click("a[data-page=gpus]").await;
        if gpus {
            b.until(
                &format!(
                    "document.querySelector('#gpus-table td.held')?.innerText.includes('{service_id}')"
                ),
                "the GPU held by the service",
                20,
            )
            .await;
        } else {
            b.until(
                "document.getElementById('main').innerText.includes('does not report GPUs')",
                "the GPUs page saying the route is missing",
                20,
            )
            .await;
        }
        b.audit("gpus").await;
        b.shot("gpus").await;
        b.click("a[data-page=plugins]").await;
        let plugins = b
            .until(
                "document.querySelectorAll('#main table').length === 2 && document.getElementById('main').innerText",
                "the plugins page",
                20,
            )
            .await;
        assert!(plugins.as_str().unwrap().contains("process"), "{plugins}");
        b.audit("plugins").await;
        b.shot("plugins").await;

        // Scale to three replicas from the table: the desired count follows at once (the third
        // waits for a GPU).
        b.click("a[data-page=services]").await;
        b.until(&format!("document.querySelector(\"{row}\")"), "the row again", 20)
            .await;
        let replicas = b
            .client
            .find(Locator::Css(&format!("{row} input[type=number]")))
            .await
            .unwrap();
        replicas.clear().await.unwrap();
        replicas.send_keys("3").await.unwrap();
        b.click(&format!("{row} .inline button")).await;
        b.until(
            &format!("document.querySelector(\"{row} td.mono\").textContent.endsWith('/3')"),
            "three replicas desired",
            20,
        )
        .await;

        // Delete from the table, with the confirmation dialog; the row goes away by itself.
        b.click(&format!("{row} button.danger")).await;
        b.until(
            "document.getElementById('confirm-dialog').open",
            "the confirmation dialog",
            5,
        )
        .await;
        b.click("#confirm-ok").await;
        b.until(
            &format!("document.querySelector(\"{row}\") === null"),
            "the row to disappear after the delete",
            60,
        )
        .await;
        b.shot("services-after-delete").await;
        let no_reload = b
            .client
            .execute("return window.__noReload === true", vec![])
            .await
            .unwrap();
        assert_eq!(no_reload, json!(true), "the page was reloaded");

        b.collect_log().await;
        let log = std::mem::take(&mut b.log);
        b.client.close().await.unwrap();
        (service_id, log)
    });

    // The server agrees: the service is gone.
    let (status, _) = wait_status(&shim, &service_id, 30, |d| d["status"] == "notExist");
    assert_eq!(status["status"], "notExist");
    // Deploy, two replicas (from the detail page), three (from the table), delete.
    assert_eq!(status["generation"], 4, "{status}");

    // No errors in the browser's console. A route another issue has not delivered yet is
    // probed once and answered 404; Chromium logs that fetch as a failed load, which is the only
    // error allowed, and only for a route checked above to be absent.
    let missing: Vec<&str> = [
        (!gateway).then_some("/v1/models"),
        (!gateway).then_some("/v1/chat/completions"),
        (!gpus).then_some("/api/v1/gpus"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let errors: Vec<&Value> = errors(&log)
        .into_iter()
        .filter(|e| {
            let text = e["message"].as_str().unwrap_or_default();
            let absent = text.contains("404")
                && missing
                    .iter()
                    .any(|path| text.contains(&format!("{path} ")));
            // The model list asked once before the gateway key was given.
            let keyless = text.contains("status of 401") && text.contains("/v1/models ");
            !(absent || keyless)
        })
        .collect();
    assert!(errors.is_empty(), "browser console errors: {errors:#?}");
    for name in [
        "deploy",
        "services",
        "detail",
        "playground",
        "gpus",
        "plugins",
    ] {
        let png = std::fs::read(shots.join(format!("{name}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{name}.png"
        );
    }
    if std::env::var_os("XMOD_SHIM_SCREENSHOTS").is_none() {
        loud!("screenshots checked; set XMOD_SHIM_SCREENSHOTS=DIR to keep them");
    }
}

/// A thousand services (their model is missing, so each fails fast without starting a process)
/// and a server with an operator token: the table stays quick to filter and page, a delete asks
/// for the token (kept in session storage, never in the URL) and then goes through, and the dark
/// theme can be switched on.
#[test]
fn a_thousand_services_stay_responsive_and_changes_ask_for_the_operator_token() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    const TOKEN: &str = "s3cret-operator-token";
    const COUNT: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let _reaper = Reaper {
        marker: models.display().to_string(),
    };
    let config = dir.path().join("shim.yaml");
    std::fs::write(&config, format!("service:\n  authToken: {TOKEN}\n")).unwrap();
    let shots = screenshots_dir(dir.path());
    let shim = Shim::start_with(
        &data,
        &models,
        free_port(),
        &["--config", config.to_str().unwrap()],
    );
    let http = client();
    for i in 0..COUNT {
        let response = http
            .post(shim.url("/api/v1/modserv/deploy"))
            .bearer_auth(TOKEN)
            .json(&json!({ "modelName": format!("absent-{i:04}") }))
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "deploy {i}: {}",
            response.status()
        );
    }
    let driver = Driver::start(&chromedriver, &dir.path().join("chromedriver.log"));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let log = runtime.block_on(async {
        let mut b = session(&driver, &chromium, &shots).await;
        b.client.goto(&shim.url("/ui")).await.unwrap();
        b.until(
            &format!(
                "document.getElementById('service-summary').textContent.startsWith('{COUNT} services')"
            ),
            "all services listed",
            60,
        )
        .await;
        b.until(
            &format!(
                "document.getElementById('service-summary').textContent.includes('{COUNT} failed')"
            ),
            "every service failed (its model is missing), shown live",
            120,
        )
        .await;
        let rows = b
            .client
            .execute(
                "return document.querySelectorAll('#services-table tbody tr').length",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(rows, json!(50), "one page of rows, not a thousand");

        // Filtering and paging a thousand services are immediate (measured in the page, around
        // the synchronous redraws).
        let took = b
            .client
            .execute(
                "const box = document.getElementById('service-filter');
                 const t0 = performance.now();
                 box.value = 'absent-09';
                 box.dispatchEvent(new Event('input'));
                 const filtered = document.querySelectorAll('#services-table tbody tr').length;
                 box.value = '';
                 box.dispatchEvent(new Event('input'));
                 [...document.querySelectorAll('.pager button')].pop().click();
                 return [performance.now() - t0, filtered,
                         document.querySelector('.pager span').textContent];",
                vec![],
            )
            .await
            .unwrap();
        let ms = took[0].as_f64().unwrap();
        assert_eq!(took[1], json!(50), "absent-0900..0999 match, one page shown: {took}");
        assert_eq!(took[2], json!("Page 2 of 20"), "{took}");
        assert!(ms < 500.0, "filtering and paging took {ms} ms");
        b.audit("services-1000").await;
        b.shot("services-1000").await;

        // A change without the token: the console asks for it, then retries.
        let first = b
            .client
            .execute(
                "return document.querySelector('#services-table tbody tr').dataset.id",
                vec![],
            )
            .await
            .unwrap();
        let row = format!("#services-table tr[data-id='{}']", first.as_str().unwrap());
        b.click(&format!("{row} button.danger")).await;
        b.until(
            "document.getElementById('confirm-dialog').open",
            "the confirmation",
            5,
        )
        .await;
        b.click("#confirm-ok").await;
        b.until(
            "document.getElementById('token-dialog').open",
            "the token dialog",
            10,
        )
        .await;
        b.client
            .find(Locator::Css("#token-input"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        b.click("#token-dialog button[value=ok]").await;
        b.until(
            &format!("document.querySelector(\"{row}\") === null"),
            "the deleted service to leave the table",
            30,
        )
        .await;
        let kept = b
            .client
            .execute(
                "return [sessionStorage.getItem('xmod.operatorToken'), location.href]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(kept[0], json!(TOKEN), "the token is kept for the session");
        assert!(
            !kept[1].as_str().unwrap().contains(TOKEN),
            "token in the URL: {kept}"
        );

        // The dark theme from the toggle.
        b.click("#theme-toggle").await;
        let background = b
            .until(
                "document.documentElement.dataset.theme === 'dark' \
                 && getComputedStyle(document.body).backgroundColor",
                "the dark theme",
                5,
            )
            .await;
        assert_eq!(background, json!("rgb(15, 19, 24)"));
        b.audit("services-dark").await;
        b.shot("services-dark").await;

        b.collect_log().await;
        let log = std::mem::take(&mut b.log);
        b.client.close().await.unwrap();
        log
    });
    // The first delete was refused with 401 before the token was given, and Chromium logs that
    // response as a failed load. Nothing else may be an error.
    let unexpected: Vec<&Value> = errors(&log)
        .into_iter()
        .filter(|e| {
            !e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("status of 401")
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "browser console errors: {unexpected:#?}"
    );
}

/// A fake `nvidia-smi` (prints `gpus.csv`) first on the shim's PATH: the same fixture as
/// `e2e_fit.rs`, so the console shows a real-looking GPU inventory and memory estimate.
fn fake_nvidia_smi(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    std::fs::write(
        bin.join("gpus.csv"),
        "0, GPU-aaaa, Fake A100 80GB, 81920, 0\n1, GPU-bbbb, Fake RTX 4090, 24576, 0\n",
    )
    .unwrap();
    let script = bin.join("nvidia-smi");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat '{}'\n", bin.join("gpus.csv").display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Deploy with the memory estimate: the form shows the model's facts, a dry run that does not fit
/// says so with the numbers and keeps Deploy off, a smaller context fits and deploys, and the
/// GPUs page shows the inventory and who holds what.
#[test]
fn the_deploy_form_shows_the_memory_estimate_and_the_gpus_page_the_inventory() {
    let Some((chromium, chromedriver)) = browser_programs() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = dir.path().join("models");
    let _reaper = Reaper {
        marker: dir.path().display().to_string(),
    };
    fake_nvidia_smi(&dir.path().join("bin"));
    llama_8b(&models.join("llama-8b"));
    let shots = screenshots_dir(dir.path());
    // vLLM's memory profile with the mock engine's launch (as in e2e_fit.rs).
    let config = dir.path().join("shim.yaml");
    std::fs::write(
        &config,
        format!(
            "engines:\n  vllm:\n    command: [\"{BIN}\", \"mock-engine\"]\n    \
             args: [\"--host\", \"{{host}}\", \"--port\", \"{{port}}\", \"--served-model-name\", \"{{served_name}}\", \"{{model_dir}}\"]\n    \
             acceleratorFlag: null\n    contextLengthFlag: null\n    extraArgs: []\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let log = std::fs::File::create(data.join("shim.log")).unwrap();
    let port = free_port();
    let path = format!(
        "{}:{}",
        dir.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(BIN)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .args(["--default-engine", "vllm", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .arg("--model-root")
        .arg(&models)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let shim = Shim {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&shim.url("/healthz")).is_err() {
        assert!(Instant::now() < deadline, "{}", read_log(&data));
        std::thread::sleep(Duration::from_millis(100));
    }
    let gpus_listed = get(&shim.url("/api/v1/gpus")).is_ok_and(|e| e["code"] == 0);
    let driver = Driver::start(&chromedriver, &dir.path().join("chromedriver.log"));
    if !gpus_listed {
        // The inventory and the estimate come with another issue; until this server has them,
        // the console must say so plainly (and still render the dry run), which is checked here.
        loud!("NOTE: this server has no /api/v1/gpus: checking the console's degraded pages");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let b = session(&driver, &chromium, &shots).await;
            b.client.goto(&shim.url("/ui#/gpus")).await.unwrap();
            b.until(
                "document.getElementById('main').innerText.includes('does not report GPUs')",
                "the GPUs page saying the route is missing",
                20,
            )
            .await;
            b.click("a[data-page=deploy]").await;
            b.until(
                "document.querySelector('#deploy-model option[value=llama-8b]') !== null",
                "the model list",
                20,
            )
            .await;
            b.click("#deploy-preview").await;
            b.until(
                "document.getElementById('dry-run').innerText.includes('No memory estimate')",
                "the dry run without an estimate",
                30,
            )
            .await;
            b.client.close().await.unwrap();
        });
        return;
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let log = runtime.block_on(async {
        let mut b = session(&driver, &chromium, &shots).await;
        b.client.goto(&shim.url("/ui#/deploy")).await.unwrap();
        let facts = b
            .until(
                "document.getElementById('deploy-model-info').textContent",
                "the model's facts",
                20,
            )
            .await;
        let facts = facts.as_str().unwrap();
        for fact in [
            "safetensors",
            "LlamaForCausalLM",
            "8.0 B params",
            "BF16",
            "15.0 GiB",
            "ctx ≤ 8192",
        ] {
            assert!(facts.contains(fact), "{fact} missing from {facts}");
        }

        // Half a million tokens of context: the dry run says it does not fit, and why.
        let context = b
            .client
            .find(Locator::Css("#deploy-context"))
            .await
            .unwrap();
        context.send_keys("524288").await.unwrap();
        b.click("#deploy-preview").await;
        let estimate = b
            .until(
                "document.getElementById('estimate')?.innerText",
                "the memory estimate",
                30,
            )
            .await;
        let estimate = estimate.as_str().unwrap();
        assert!(estimate.contains("Does not fit"), "{estimate}");
        assert!(estimate.contains("8192 tokens would fit"), "{estimate}");
        // Deploy stays off (it would be refused the same way), and the form says why.
        let state = b
            .client
            .execute(
                "return [document.getElementById('deploy-confirm').disabled, \
                         document.getElementById('deploy-error').textContent]",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(state[0], json!(true), "{state}");
        assert!(
            state[1]
                .as_str()
                .unwrap()
                .contains("needs 81.0 GiB per GPU"),
            "{state}"
        );
        b.audit("deploy-does-not-fit").await;
        b.shot("deploy-does-not-fit").await;

        // A context that fits: preview, then deploy.
        context.clear().await.unwrap();
        context.send_keys("4096").await.unwrap();
        b.click("#deploy-preview").await;
        b.until(
            "document.getElementById('estimate')?.innerText.includes('Fits') \
             && !document.getElementById('deploy-confirm').disabled",
            "a fitting estimate",
            30,
        )
        .await;
        b.audit("deploy-fits").await;
        b.shot("deploy-fits").await;
        b.click("#deploy-confirm").await;
        let hash = b
            .until(
                "location.hash.startsWith('#/service/') && location.hash",
                "the detail page",
                20,
            )
            .await;
        let id = hash
            .as_str()
            .unwrap()
            .trim_start_matches("#/service/")
            .to_string();
        b.until(
            "document.querySelector('#service-facts .status')?.textContent === 'running'",
            "the service running",
            60,
        )
        .await;

        // The inventory: names, memory, and the service holding a GPU.
        b.click("a[data-page=gpus]").await;
        let table = b
            .until(
                &format!(
                    "document.querySelector('#gpus-table')?.innerText.includes('{id}') \
                     && document.querySelector('#gpus-table').innerText"
                ),
                "the GPU inventory with the holder",
                20,
            )
            .await;
        let table = table.as_str().unwrap();
        assert!(
            table.contains("Fake A100 80GB") && table.contains("Fake RTX 4090"),
            "{table}"
        );
        assert!(
            table.contains("80.0 GiB") && table.contains("llama-8b"),
            "{table}"
        );
        b.audit("gpus-inventory").await;
        b.shot("gpus-inventory").await;

        b.collect_log().await;
        let log = std::mem::take(&mut b.log);
        b.client.close().await.unwrap();
        log
    });
    // The refused dry run answered 422, which Chromium logs as a failed load; nothing else may
    // be an error.
    let unexpected: Vec<&Value> = errors(&log)
        .into_iter()
        .filter(|e| {
            !e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("status of 422")
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "browser console errors: {unexpected:#?}"
    );
}

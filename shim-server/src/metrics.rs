//! HTTP request counters and the Prometheus text exposition of `/metrics`.
//!
//! The status GET is the hot path (clients poll it, benchmarks hammer it), so counting a request
//! takes no lock: every (route, method, code) that can occur with a known code has a fixed slot
//! in a flat array of atomics, found by index arithmetic. Only unusual status codes go through a
//! mutex-guarded map.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use axum::http::{Method, StatusCode};
use shim_core::Engine;
use shim_core::engine::RECONCILE_BUCKETS;

use crate::ROUTES;

/// Route label of requests that matched no route (kept apart so ids cannot explode cardinality).
const UNMATCHED: &str = "unmatched";

/// Methods with their own label; anything else is counted as `OTHER`.
const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "OTHER",
];

/// Status codes with a lock-free slot; others go to the fallback map.
const CODES: [u16; 14] = [
    200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 500, 501, 502, 503,
];

/// Counts HTTP requests by matched route, method and status code.
pub struct HttpMetrics {
    /// Distinct paths of [`ROUTES`], then [`UNMATCHED`].
    routes: Vec<&'static str>,
    /// `routes.len() * METHODS.len() * CODES.len()` counters.
    slots: Box<[AtomicU64]>,
    /// Counters for codes not in [`CODES`].
    other: Mutex<HashMap<(usize, usize, u16), u64>>,
    /// Metrics of routers mounted beside the API (the OpenAI gateway), appended to `/metrics`.
    extra: OnceLock<ExtraMetrics>,
}

/// Writes more Prometheus text at the end of `/metrics`.
pub type ExtraMetrics = Box<dyn Fn(&mut String) + Send + Sync>;

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("routes", &self.routes)
            .field("extra", &self.extra.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpMetrics {
    /// Zeroed counters for every route of [`ROUTES`].
    pub fn new() -> Self {
        let mut routes: Vec<&'static str> = Vec::new();
        for &(_, path) in ROUTES {
            if !routes.contains(&path) {
                routes.push(path);
            }
        }
        routes.push(UNMATCHED);
        let slots = (0..routes.len() * METHODS.len() * CODES.len())
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            routes,
            slots,
            other: Mutex::default(),
            extra: OnceLock::new(),
        }
    }

    /// Appends `render`'s text to every `/metrics` answer (set once; later calls are ignored).
    pub fn append(&self, render: ExtraMetrics) {
        if self.extra.set(render).is_err() {
            tracing::warn!("extra /metrics renderer already set; ignoring another");
        }
    }

    /// Index of a matched route template (`None`/unknown → the unmatched label).
    pub(crate) fn route_index(&self, matched: Option<&str>) -> usize {
        let unmatched = self.routes.len() - 1;
        matched
            .and_then(|m| self.routes[..unmatched].iter().position(|r| *r == m))
            .unwrap_or(unmatched)
    }

    /// Counts one request.
    pub(crate) fn record(&self, route: usize, method: &Method, status: StatusCode) {
        let method = method_index(method);
        let code = status.as_u16();
        match CODES.iter().position(|c| *c == code) {
            Some(c) => {
                let slot = (route * METHODS.len() + method) * CODES.len() + c;
                if let Some(counter) = self.slots.get(slot) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                // A poisoned lock only means another thread panicked mid-increment; keep counting.
                let mut other = self.other.lock().unwrap_or_else(|e| e.into_inner());
                *other.entry((route, method, code)).or_default() += 1;
            }
        }
    }

    /// Requests counted so far for one label set (tests and embedders).
    pub fn requests(&self, route: &str, method: &str, code: u16) -> u64 {
        self.series()
            .into_iter()
            .filter(|(r, m, c, _)| *r == route && *m == method && *c == code)
            .map(|(_, _, _, n)| n)
            .sum()
    }

    /// Every non-zero counter as (route, method, code, count), in a stable order.
    fn series(&self) -> Vec<(&'static str, &'static str, u16, u64)> {
        let mut out = Vec::new();
        for (r, route) in self.routes.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, code) in CODES.iter().enumerate() {
                    let slot = (r * METHODS.len() + m) * CODES.len() + c;
                    let n = self
                        .slots
                        .get(slot)
                        .map_or(0, |a| a.load(Ordering::Relaxed));
                    if n > 0 {
                        out.push((*route, *method, *code, n));
                    }
                }
            }
        }
        let other = self.other.lock().unwrap_or_else(|e| e.into_inner());
        for (&(r, m, code), &n) in other.iter() {
            if let (Some(route), Some(method)) = (self.routes.get(r), METHODS.get(m)) {
                out.push((*route, *method, code, n));
            }
        }
        out.sort_unstable();
        out
    }
}

fn method_index(method: &Method) -> usize {
    let name = method.as_str();
    METHODS
        .iter()
        .position(|m| *m == name)
        .unwrap_or(METHODS.len() - 1)
}

/// The Prometheus text exposition (format 0.0.4) of the engine's and the server's metrics.
pub(crate) fn render(engine: &Engine, http: &HttpMetrics) -> String {
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        out,
        "# HELP xmod_shim_services Live services per lifecycle phase.\n\
         # TYPE xmod_shim_services gauge"
    );
    for (phase, count) in engine.phase_counts() {
        let _ = writeln!(out, "xmod_shim_services{{phase=\"{phase}\"}} {count}");
    }

    let _ = writeln!(
        out,
        "# HELP xmod_shim_leader 1 while this replica runs the reconciler (always, for a single shim).\n\
         # TYPE xmod_shim_leader gauge\n\
         xmod_shim_leader {}",
        u8::from(engine.is_leader())
    );

    let stats = engine.reconcile_stats();
    let total = stats.total.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let micros = stats.micros.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP xmod_shim_reconcile_total Reconciles finished.\n\
         # TYPE xmod_shim_reconcile_total counter\n\
         xmod_shim_reconcile_total {total}\n\
         # HELP xmod_shim_reconcile_errors_total Reconciles that ended in an error and were retried.\n\
         # TYPE xmod_shim_reconcile_errors_total counter\n\
         xmod_shim_reconcile_errors_total {errors}\n\
         # HELP xmod_shim_reconcile_duration_seconds Time one reconcile took.\n\
         # TYPE xmod_shim_reconcile_duration_seconds histogram"
    );
    // The engine's buckets are already cumulative (each counts reconciles <= its bound). The
    // counters are read one by one while workers update them, so clamp to keep the series
    // monotonic, as Prometheus requires.
    let mut running = 0;
    for (bucket, bound) in stats.buckets.iter().zip(RECONCILE_BUCKETS) {
        running = bucket.load(Ordering::Relaxed).max(running);
        let _ = writeln!(
            out,
            "xmod_shim_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {running}"
        );
    }
    let count = total.max(running);
    let _ = writeln!(
        out,
        "xmod_shim_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
         xmod_shim_reconcile_duration_seconds_sum {}\n\
         xmod_shim_reconcile_duration_seconds_count {count}",
        micros as f64 / 1e6
    );

    let _ = writeln!(
        out,
        "# HELP xmod_shim_http_requests_total HTTP requests by route template, method and status.\n\
         # TYPE xmod_shim_http_requests_total counter"
    );
    for (route, method, code, n) in http.series() {
        let _ = writeln!(
            out,
            "xmod_shim_http_requests_total{{route=\"{}\",method=\"{method}\",code=\"{code}\"}} {n}",
            escape_label(route)
        );
    }
    if let Some(extra) = http.extra.get() {
        extra(&mut out);
    }
    out
}

/// Escapes a label value as the text format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// GPU memory gauges (only GPUs whose memory nvidia-smi reports).
pub(crate) fn render_gpus(out: &mut String, gpus: &[shim_core::GpuStatus]) {
    type Field = fn(&shim_core::GpuStatus) -> Option<u64>;
    let series: [(&str, &str, Field); 3] = [
        ("total", "Total memory of each GPU, bytes.", |g| {
            g.memory_total_bytes
        }),
        (
            "used",
            "Memory in use on each GPU (by anything), bytes.",
            |g| g.memory_used_bytes,
        ),
        ("free", "Free memory of each GPU, bytes.", |g| {
            g.memory_free_bytes
        }),
    ];
    for (name, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP xmod_shim_gpu_memory_{name}_bytes {help}\n# TYPE xmod_shim_gpu_memory_{name}_bytes gauge"
        );
        for gpu in gpus {
            if let Some(v) = value(gpu) {
                let _ = writeln!(
                    out,
                    "xmod_shim_gpu_memory_{name}_bytes{{gpu=\"{}\"}} {v}",
                    escape_label(&gpu.id)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP xmod_shim_gpu_held Whether a service holds the GPU (1) or not (0).\n# TYPE xmod_shim_gpu_held gauge"
    );
    for gpu in gpus {
        let _ = writeln!(
            out,
            "xmod_shim_gpu_held{{gpu=\"{}\"}} {}",
            escape_label(&gpu.id),
            u8::from(gpu.held_by.is_some())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_on_their_labels_including_unusual_codes() {
        let m = HttpMetrics::new();
        let status = m.route_index(Some("/api/v1/modserv/{serviceId}"));
        m.record(status, &Method::GET, StatusCode::OK);
        m.record(status, &Method::GET, StatusCode::OK);
        m.record(status, &Method::GET, StatusCode::IM_A_TEAPOT);
        m.record(
            m.route_index(Some("/nope")),
            &Method::POST,
            StatusCode::NOT_FOUND,
        );
        m.record(
            m.route_index(None),
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::OK,
        );
        assert_eq!(m.requests("/api/v1/modserv/{serviceId}", "GET", 200), 2);
        assert_eq!(m.requests("/api/v1/modserv/{serviceId}", "GET", 418), 1);
        assert_eq!(m.requests(UNMATCHED, "POST", 404), 1);
        assert_eq!(m.requests(UNMATCHED, "OTHER", 200), 1);
        assert_eq!(m.requests("/healthz", "GET", 200), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

//! Per-model gateway metrics and their Prometheus text.
//!
//! Counting takes no lock on the hot path once a model's counters exist: each model has one
//! [`ModelMetrics`] of atomics, found under a read lock. The model label is always a served name
//! the engine knows (or `unknown` for requests routed nowhere), so clients cannot grow the label
//! set by sending made-up names.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Label of requests that matched no model (bad JSON, unknown names, auth failures).
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// Upper bounds (seconds) of the time-to-first-byte and duration histograms.
const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// Status codes with a lock-free counter; others go through a small map.
const CODES: [u16; 12] = [200, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504];

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket, then one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, model: &str) {
        let mut running = 0;
        for (bucket, bound) in self.buckets.iter().zip(BUCKETS) {
            running += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{model=\"{model}\",le=\"{bound}\"}} {running}"
            );
        }
        running += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {running}\n\
             {name}_sum{{model=\"{model}\"}} {sum}\n\
             {name}_count{{model=\"{model}\"}} {running}"
        );
    }
}

/// Counters of one model.
#[derive(Debug, Default)]
pub(crate) struct ModelMetrics {
    codes: [AtomicU64; CODES.len()],
    other_codes: Mutex<BTreeMap<u16, u64>>,
    pub(crate) in_flight: AtomicI64,
    pub(crate) queue_depth: AtomicI64,
    ttfb: Histogram,
    duration: Histogram,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    retries: AtomicU64,
    /// Requests sent per replica base URL: shows that every replica serves.
    replicas: RwLock<HashMap<String, AtomicU64>>,
}

impl ModelMetrics {
    pub(crate) fn count_code(&self, code: u16) {
        match CODES.iter().position(|c| *c == code) {
            Some(i) => {
                self.codes[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let mut other = self.other_codes.lock().unwrap_or_else(|e| e.into_inner());
                *other.entry(code).or_default() += 1;
            }
        }
    }

    pub(crate) fn count_replica(&self, replica: &str) {
        if let Some(n) = self
            .replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(replica)
        {
            n.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.replicas
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(replica.to_owned())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    fn replica_counts(&self) -> Vec<(String, u64)> {
        let replicas = self.replicas.read().unwrap_or_else(|e| e.into_inner());
        let mut counts: Vec<(String, u64)> = replicas
            .iter()
            .map(|(url, n)| (url.clone(), n.load(Ordering::Relaxed)))
            .collect();
        counts.sort();
        counts
    }

    pub(crate) fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_ttfb(&self, ttfb: Duration) {
        self.ttfb.observe(ttfb);
    }

    pub(crate) fn observe_duration(&self, duration: Duration) {
        self.duration.observe(duration);
    }

    pub(crate) fn add_tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    fn codes(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = CODES
            .iter()
            .zip(&self.codes)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let other = self.other_codes.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(other.iter().map(|(c, n)| (*c, *n)));
        out.sort_unstable();
        out
    }
}

/// One per-model series: name, help text, and how to read it.
type Series<T> = (&'static str, &'static str, fn(&ModelMetrics) -> T);

/// Every model's counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    models: RwLock<HashMap<String, Arc<ModelMetrics>>>,
}

impl Metrics {
    /// The counters of `model`, created on first use.
    pub(crate) fn model(&self, model: &str) -> Arc<ModelMetrics> {
        if let Some(m) = self
            .models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return m.clone();
        }
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(model.to_owned())
            .or_default()
            .clone()
    }

    /// Requests of `model` answered with `code` so far (tests and embedders).
    pub(crate) fn requests(&self, model: &str, code: u16) -> u64 {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models.get(model).map_or(0, |m| {
            m.codes()
                .into_iter()
                .find(|(c, _)| *c == code)
                .map_or(0, |(_, n)| n)
        })
    }

    /// Requests `model` sent to each replica so far.
    pub(crate) fn replica_requests(&self, model: &str) -> HashMap<String, u64> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models
            .get(model)
            .map_or_else(HashMap::new, |m| m.replica_counts().into_iter().collect())
    }

    /// Appends the Prometheus text exposition (format 0.0.4) of every model's counters.
    pub(crate) fn render(&self, out: &mut String) {
        let models: Vec<(String, Arc<ModelMetrics>)> = {
            let models = self.models.read().unwrap_or_else(|e| e.into_inner());
            let mut list: Vec<_> = models.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            list
        };
        let labelled: Vec<(String, &ModelMetrics)> = models
            .iter()
            .map(|(name, m)| (escape_label(name), m.as_ref()))
            .collect();

        let _ = writeln!(
            out,
            "# HELP xmod_shim_gateway_requests_total Gateway requests by model and status code.\n\
             # TYPE xmod_shim_gateway_requests_total counter"
        );
        for (model, m) in &labelled {
            for (code, n) in m.codes() {
                let _ = writeln!(
                    out,
                    "xmod_shim_gateway_requests_total{{model=\"{model}\",code=\"{code}\"}} {n}"
                );
            }
        }
        let gauges: [Series<i64>; 2] = [
            (
                "xmod_shim_gateway_in_flight",
                "Requests being answered by a replica.",
                |m| m.in_flight.load(Ordering::Relaxed),
            ),
            (
                "xmod_shim_gateway_queue_depth",
                "Requests waiting for a starting model.",
                |m| m.queue_depth.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (model, m) in &labelled {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", read(m));
            }
        }
        let counters: [Series<u64>; 3] = [
            (
                "xmod_shim_gateway_prompt_tokens_total",
                "Prompt tokens reported in responses' usage.",
                |m| m.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "xmod_shim_gateway_completion_tokens_total",
                "Completion tokens reported in responses' usage.",
                |m| m.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "xmod_shim_gateway_retries_total",
                "Requests retried on another replica.",
                |m| m.retries.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (model, m) in &labelled {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", read(m));
            }
        }
        let _ = writeln!(
            out,
            "# HELP xmod_shim_gateway_replica_requests_total Requests sent to each replica.\n\
             # TYPE xmod_shim_gateway_replica_requests_total counter"
        );
        for (model, m) in &labelled {
            for (replica, n) in m.replica_counts() {
                let _ = writeln!(
                    out,
                    "xmod_shim_gateway_replica_requests_total{{model=\"{model}\",replica=\"{}\"}} {n}",
                    escape_label(&replica)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP xmod_shim_gateway_ttfb_seconds Time from request to the first response byte.\n\
             # TYPE xmod_shim_gateway_ttfb_seconds histogram"
        );
        for (model, m) in &labelled {
            m.ttfb.render(out, "xmod_shim_gateway_ttfb_seconds", model);
        }
        let _ = writeln!(
            out,
            "# HELP xmod_shim_gateway_request_duration_seconds Time from request to the last response byte.\n\
             # TYPE xmod_shim_gateway_request_duration_seconds histogram"
        );
        for (model, m) in &labelled {
            m.duration
                .render(out, "xmod_shim_gateway_request_duration_seconds", model);
        }
    }
}

/// Escapes a label value as the text format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_per_model_with_cumulative_buckets() {
        let metrics = Metrics::default();
        let m = metrics.model("llama");
        m.count_code(200);
        m.count_code(418);
        m.observe_ttfb(Duration::from_millis(3));
        m.observe_ttfb(Duration::from_secs(500));
        m.add_tokens(5, 7);
        m.count_replica("http://a");
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("xmod_shim_gateway_requests_total{model=\"llama\",code=\"200\"} 1"));
        assert!(out.contains("xmod_shim_gateway_requests_total{model=\"llama\",code=\"418\"} 1"));
        assert!(
            out.contains("xmod_shim_gateway_ttfb_seconds_bucket{model=\"llama\",le=\"0.005\"} 1")
        );
        assert!(
            out.contains("xmod_shim_gateway_ttfb_seconds_bucket{model=\"llama\",le=\"+Inf\"} 2")
        );
        assert!(out.contains("xmod_shim_gateway_prompt_tokens_total{model=\"llama\"} 5"));
        assert!(out.contains("xmod_shim_gateway_completion_tokens_total{model=\"llama\"} 7"));
        assert!(out.contains("replica=\"http://a\"} 1"));
        assert_eq!(metrics.requests("llama", 200), 1);
    }
}

//! The response body handed to the client: the replica's body frame by frame (never buffered),
//! plus what the gateway learns on the way (first byte, token usage) and reports at the end.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;

use crate::balance::InFlight;
use crate::metrics::ModelMetrics;
use crate::upstream::ResponseBody;

/// Most bytes of a plain JSON response kept to read its `usage`; larger ones go uncounted.
const MAX_JSON_SCAN: usize = 4 * 1024 * 1024;

/// Most bytes of one unfinished SSE line kept while waiting for its end.
const MAX_SSE_LINE: usize = 1024 * 1024;

/// Counts a model's request as in flight until dropped.
#[derive(Debug)]
pub(crate) struct ModelInFlight(pub(crate) Arc<ModelMetrics>);

impl ModelInFlight {
    pub(crate) fn new(metrics: Arc<ModelMetrics>) -> Self {
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for ModelInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one proxied request reports when its body ends or the client goes away.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) model_in_flight: ModelInFlight,
    pub(crate) _replica_in_flight: InFlight,
    pub(crate) started: Instant,
    pub(crate) request_id: String,
    pub(crate) model: String,
    pub(crate) replica: String,
    pub(crate) status: u16,
    pub(crate) retried: bool,
    first_byte: Option<Duration>,
    usage: UsageScan,
    /// How the body ended: `None` while streaming, then "complete", "client gone" or the error.
    end: Option<Cow<'static, str>>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model_in_flight: ModelInFlight,
        replica_in_flight: InFlight,
        started: Instant,
        request_id: String,
        model: String,
        replica: String,
        status: u16,
        retried: bool,
    ) -> Self {
        Self {
            model_in_flight,
            _replica_in_flight: replica_in_flight,
            started,
            request_id,
            model,
            replica,
            status,
            retried,
            first_byte: None,
            usage: UsageScan::new(Mode::Off),
            end: None,
        }
    }

    /// How to look for token usage: in server-sent events, in a JSON body, or not at all.
    pub(crate) fn set_scan(&mut self, streaming: bool, json: bool) {
        let mode = if streaming {
            Mode::Sse(Vec::new())
        } else if json {
            Mode::Json(Vec::new())
        } else {
            Mode::Off
        };
        self.usage = UsageScan::new(mode);
    }

    fn on_data(&mut self, data: &[u8]) {
        if self.first_byte.is_none() && !data.is_empty() {
            let ttfb = self.started.elapsed();
            self.first_byte = Some(ttfb);
            self.model_in_flight.0.observe_ttfb(ttfb);
        }
        self.usage.feed(data);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let metrics = &self.model_in_flight.0;
        metrics.observe_duration(duration);
        let (prompt, completion) = self.usage.finish();
        metrics.add_tokens(prompt, completion);
        let end = self.end.as_deref().unwrap_or("client gone");
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            replica = %self.replica,
            status = self.status,
            retried = self.retried,
            ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1e3),
            duration_ms = duration.as_secs_f64() * 1e3,
            prompt_tokens = prompt,
            completion_tokens = completion,
            end,
            "gateway request"
        );
    }
}

/// The replica's body on its way to the client, metered: first byte, token usage and how it
/// ended go into the request's [`Report`]. Dropping it before its end (the client went away)
/// drops the replica's connection too, which cancels the generation upstream; a body read to
/// its end returns the connection to the pool.
#[derive(Debug)]
pub(crate) struct MeteredBody {
    inner: ResponseBody,
    report: Option<Report>,
}

impl MeteredBody {
    pub(crate) fn new(inner: ResponseBody, report: Report) -> Self {
        Self {
            inner,
            report: Some(report),
        }
    }

    /// The body's length when the replica sent one.
    pub(crate) fn length(&self) -> Option<u64> {
        self.inner.length()
    }

    /// The next piece of the body; `None` at its end.
    pub(crate) fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let poll = self.inner.poll_data(cx);
        if let Poll::Ready(next) = &poll {
            self.observe(next);
        }
        poll
    }

    /// The next piece of the body from what was read already, without waiting: `None` when
    /// more must be read first.
    pub(crate) fn buffered(&mut self) -> Option<Option<io::Result<Bytes>>> {
        let next = self.inner.buffered()?.transpose();
        self.observe(&next);
        Some(next)
    }

    fn observe(&mut self, next: &Option<io::Result<Bytes>>) {
        match next {
            Some(Ok(data)) => {
                if let Some(report) = self.report.as_mut() {
                    report.on_data(data);
                }
            }
            Some(Err(err)) => {
                if let Some(mut report) = self.report.take() {
                    report.end = Some(Cow::Owned(format!("replica error: {err}")));
                }
            }
            None => {
                if let Some(mut report) = self.report.take() {
                    report.end = Some(Cow::Borrowed("complete"));
                }
            }
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // A body that was empty from the start is never polled, yet it is complete.
        if self.inner.is_end()
            && let Some(report) = self.report.as_mut()
        {
            report.end.get_or_insert(Cow::Borrowed("complete"));
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut()
            .poll_data(cx)
            .map(|next| next.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.length() {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

/// How a body is scanned for `usage`.
#[derive(Debug)]
enum Mode {
    Off,
    /// Server-sent events: the unfinished line so far.
    Sse(Vec<u8>),
    /// A JSON body: its bytes so far (up to [`MAX_JSON_SCAN`]).
    Json(Vec<u8>),
}

/// Reads token counts from `usage` as the body passes.
#[derive(Debug)]
struct UsageScan {
    mode: Mode,
    /// The last usage seen: engines that report usage per chunk send running totals.
    seen: Option<(u64, u64)>,
}

#[derive(Deserialize)]
struct UsageProbe {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

fn parse_usage(json: &[u8]) -> Option<(u64, u64)> {
    let usage = serde_json::from_slice::<UsageProbe>(json).ok()?.usage?;
    Some((
        usage.prompt_tokens.unwrap_or(0),
        usage.completion_tokens.unwrap_or(0),
    ))
}

/// One complete SSE line: usage of a `data:` event that carries it.
fn sse_line_usage(line: &[u8]) -> Option<(u64, u64)> {
    let payload = line.strip_prefix(b"data:")?;
    if !payload.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    parse_usage(payload.trim_ascii())
}

impl UsageScan {
    fn new(mode: Mode) -> Self {
        Self { mode, seen: None }
    }

    fn feed(&mut self, data: &[u8]) {
        match &mut self.mode {
            Mode::Sse(line) => {
                let mut rest = data;
                while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                    let piece = &rest[..end];
                    let found = if line.is_empty() {
                        sse_line_usage(piece)
                    } else {
                        line.extend_from_slice(piece);
                        let found = sse_line_usage(line);
                        line.clear();
                        found
                    };
                    if found.is_some() {
                        self.seen = found;
                    }
                    rest = &rest[end + 1..];
                }
                if line.len() + rest.len() <= MAX_SSE_LINE {
                    line.extend_from_slice(rest);
                } else {
                    line.clear();
                }
            }
            Mode::Json(buf) => {
                if buf.len() + data.len() <= MAX_JSON_SCAN {
                    buf.extend_from_slice(data);
                } else {
                    self.mode = Mode::Off;
                }
            }
            Mode::Off => {}
        }
    }

    /// Prompt and completion tokens seen (zero when the engine sent no usage).
    fn finish(&mut self) -> (u64, u64) {
        if let Mode::Json(buf) = &self.mode {
            self.seen = parse_usage(buf);
        }
        self.seen.unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_split_sse_lines_and_json_bodies() {
        let mut sse = UsageScan::new(Mode::Sse(Vec::new()));
        sse.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"us",
        );
        sse.feed(b"age\":{\"prompt_tokens\":3,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n");
        assert_eq!(sse.finish(), (3, 9));

        let mut json = UsageScan::new(Mode::Json(Vec::new()));
        json.feed(b"{\"usage\":{\"prompt_tokens\":4,");
        json.feed(b"\"completion_tokens\":2}}");
        assert_eq!(json.finish(), (4, 2));

        let mut none = UsageScan::new(Mode::Sse(Vec::new()));
        none.feed(b"data: {\"usage\":null}\n\n");
        assert_eq!(none.finish(), (0, 0));
    }
}

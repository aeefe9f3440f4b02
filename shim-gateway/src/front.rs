//! The gateway's own HTTP/1.1 front: it reads each new connection first, answers the requests
//! that are plainly the gateway's (`POST /v1/...` with a JSON body of known length), and hands
//! the connection to the general HTTP server (hyper and the router) at the first request that
//! is anything else, with the bytes it read of it.
//!
//! Why a front of our own: a proxied request is one read from the client, one write and a read
//! at the replica, and one write back. With hyper's server and client around those four system
//! calls, the server spent about twice nginx's CPU per request; here a request is parsed once
//! (`httparse`), passed on in one write, and the answer goes back in one write as it arrives,
//! all in the connection's own task, with nothing in between. Everything unusual (HTTP/1.0,
//! chunked or oversized request bodies, `Expect`, upgrades, other paths) goes to hyper, which
//! handles it fully, so this file only ever meets the common case.

use std::future::{Future as _, poll_fn};
use std::io::{self, Write as _};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{Gateway, Inbound, Proxied, REQUEST_ID};

/// Most bytes of a request head the front reads before leaving the request to hyper.
const MAX_HEAD: usize = 16 * 1024;

/// Most bytes of a request body reserved before they arrive.
const READ_AHEAD: usize = 1024 * 1024;

/// Most headers in a request the front takes.
const MAX_HEADERS: usize = 64;

/// Most bytes a client may send ahead (pipelining) while its answer streams; past this the
/// front stops reading until the answer is done.
const MAX_AHEAD: usize = 64 * 1024;

/// A connection the front gives back: the socket and what was read of its next request.
pub type Handoff = (TcpStream, Bytes);

/// What the head at the front of the buffer is.
enum Head {
    /// Not all there yet.
    Partial,
    /// Not a request the front takes: hyper gets the connection.
    Foreign,
    /// A gateway request whose body is `length` bytes after `head` bytes of head.
    Ours {
        head: usize,
        length: usize,
        close: bool,
        inbound: Inbound,
    },
}

fn parse_head(buf: &[u8], max_body: usize) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Head::Partial,
        // Too long, too many headers or malformed: hyper answers it properly.
        Ok(httparse::Status::Partial) | Err(_) => return Head::Foreign,
    };
    let (Some("POST"), Some(path), Some(1)) = (request.method, request.path, request.version)
    else {
        return Head::Foreign;
    };
    if !path.starts_with("/v1/") || path == "/v1/models" || path.starts_with("/v1/models/") {
        return Head::Foreign;
    }
    let mut inbound = Inbound {
        target: path.to_owned(),
        ..Inbound::default()
    };
    let mut length = None;
    let mut close = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (length, value) {
                (None, Some(n)) => length = Some(n),
                _ => return Head::Foreign,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Head::Foreign;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= crate::asks_close(header.value);
        } else {
            inbound.header(name, header.value);
        }
    }
    match length {
        // Over the limit: the router answers 413 and deals with the unread body.
        Some(length) if length <= max_body => Head::Ours {
            head,
            length,
            close,
            inbound,
        },
        _ => Head::Foreign,
    }
}

/// Reads from the client while its answer is on its way: `true` once it has gone (closed its
/// side or reset), so the request can be given up. Bytes it sends ahead are kept for later.
fn poll_client_gone(stream: &TcpStream, read: &mut BytesMut, cx: &mut Context<'_>) -> bool {
    while read.len() < MAX_AHEAD {
        match stream.poll_read_ready(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(())) => {}
        }
        read.reserve(1024);
        match stream.try_read_buf(read) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

impl Gateway {
    /// Serves `stream` while its requests are the gateway's, and gives it back, with what was
    /// read of the next request, at the first one that is not: the caller serves the rest of
    /// the connection with its HTTP server. `None` when the connection has ended (or
    /// `stopping` fired while it was idle).
    pub async fn serve_connection(
        &self,
        mut stream: TcpStream,
        stopping: CancellationToken,
    ) -> Option<Handoff> {
        let max_body = self.inner.config.max_body_bytes;
        let mut read = BytesMut::with_capacity(4096);
        let mut out = Vec::new();
        loop {
            let (head, length, close, inbound) = loop {
                match parse_head(&read, max_body) {
                    Head::Ours {
                        head,
                        length,
                        close,
                        inbound,
                    } => break (head, length, close, inbound),
                    Head::Foreign => return Some((stream, read.freeze())),
                    Head::Partial => {}
                }
                if read.capacity() - read.len() < 1024 {
                    read.reserve(4096);
                }
                let got = if read.is_empty() {
                    // Between requests: a shutdown closes the idle connection.
                    tokio::select! {
                        biased;
                        () = stopping.cancelled() => return None,
                        got = stream.read_buf(&mut read) => got,
                    }
                } else {
                    stream.read_buf(&mut read).await
                };
                if !matches!(got, Ok(n) if n > 0) {
                    return None;
                }
            };
            let started = Instant::now();
            let total = head + length;
            while read.len() < total {
                // Room for what is still to come, at most 1 MiB ahead of what arrived: a
                // client that only claims a long body does not get that much memory for it.
                let wanted = (total - read.len()).min(READ_AHEAD);
                if read.capacity() - read.len() < wanted {
                    read.reserve(wanted);
                }
                if !matches!(stream.read_buf(&mut read).await, Ok(n) if n > 0) {
                    return None;
                }
            }
            let mut request = read.split_to(total);
            let mut inbound = inbound;
            inbound.body = request.split_off(head).freeze();
            let request_id = inbound.request_id();

            // Routing may wait for a cold start: a client that leaves meanwhile is let go.
            let outcome = {
                let mut handling = pin!(self.handle(inbound, &request_id, started));
                poll_fn(|cx| {
                    if let Poll::Ready(outcome) = handling.as_mut().poll(cx) {
                        return Poll::Ready(Some(outcome));
                    }
                    if poll_client_gone(&stream, &mut read, cx) {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await?
            };
            out.clear();
            match outcome {
                Ok(proxied) => {
                    let answer = Answer {
                        request_id: &request_id,
                        close,
                    };
                    if !stream_answer(&mut stream, &mut read, &mut out, proxied, answer).await {
                        return None;
                    }
                }
                Err(refusal) => {
                    let error = self.refused(refusal, &request_id, started);
                    let body = error.body();
                    let mut extra = HeaderMap::new();
                    extra.extend(error.headers());
                    extra.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    write_head(
                        &mut out,
                        error.status,
                        &extra,
                        &request_id,
                        Some(body.len() as u64),
                        close,
                    );
                    out.extend_from_slice(&body);
                    if stream.write_all(&out).await.is_err() {
                        return None;
                    }
                }
            }
            if close || stopping.is_cancelled() {
                let _ = stream.shutdown().await;
                return None;
            }
            // The buffer's space before the next request: what a long body left behind goes.
            if read.is_empty() && read.capacity() > 64 * 1024 {
                read = BytesMut::with_capacity(4096);
            }
        }
    }
}

/// How the answer to one request is to be written.
struct Answer<'a> {
    request_id: &'a str,
    /// The client asked for the connection to close after it.
    close: bool,
}

/// Streams a replica's answer to the client: head and body as they come, each write
/// carrying everything read from the replica so far. False when the connection cannot go
/// on (the client left, or the replica broke off mid-answer and the client must see the
/// answer cut).
async fn stream_answer(
    stream: &mut TcpStream,
    read: &mut BytesMut,
    out: &mut Vec<u8>,
    Proxied {
        status,
        headers,
        mut body,
    }: Proxied,
    Answer { request_id, close }: Answer<'_>,
) -> bool {
    let length = body.length();
    let chunked = length.is_none();
    write_head(out, status, &headers, request_id, length, close);
    // `Some(true)`: the body ended; `Some(false)`: it broke off.
    let mut ended = None;
    let push = |next: Option<io::Result<Bytes>>, out: &mut Vec<u8>| match next {
        Some(Ok(data)) => {
            if chunked && !data.is_empty() {
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(&data);
            }
            None
        }
        None => {
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Some(true)
        }
        Some(Err(_)) => Some(false),
    };
    loop {
        while ended.is_none()
            && let Some(next) = body.buffered()
        {
            ended = push(next, out);
        }
        if !out.is_empty() {
            if stream.write_all(out).await.is_err() {
                return false;
            }
            out.clear();
        }
        if let Some(done) = ended {
            return done;
        }
        let next = poll_fn(|cx| {
            if let Poll::Ready(next) = body.poll_data(cx) {
                return Poll::Ready(Some(next));
            }
            if poll_client_gone(stream, read, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match next {
            Some(next) => ended = push(next, out),
            // Dropping the body closes the replica's connection: the generation stops.
            None => return false,
        }
    }
}

/// A response head: status line, `headers`, the request id, and the framing (`length`, else
/// chunked; none for statuses without a body).
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    request_id: &str,
    length: Option<u64>,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == REQUEST_ID {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(REQUEST_ID.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    match length {
        _ if bodiless => {}
        Some(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(head: &str) -> Option<(usize, usize, bool, Inbound)> {
        match parse_head(head.as_bytes(), 100) {
            Head::Ours {
                head,
                length,
                close,
                inbound,
            } => Some((head, length, close, inbound)),
            Head::Partial => panic!("partial: {head:?}"),
            Head::Foreign => None,
        }
    }

    #[test]
    fn the_front_takes_only_plain_gateway_posts() {
        let head = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: shim\r\nContent-Length: 12\r\n\
                    Authorization: Bearer k\r\nX-Request-Id: r1\r\nConnection: keep-alive, close\r\n\
                    X-Custom: v\r\n\r\n";
        let (len, length, close, inbound) = ours(head).unwrap();
        assert_eq!((len, length, close), (head.len(), 12, true));
        assert_eq!(inbound.target, "/v1/chat/completions?x=1");
        assert_eq!(inbound.authorization.as_deref(), Some("Bearer k"));
        assert_eq!(inbound.request_id.as_deref(), Some("r1"));
        // Host, length, key, request id and connection headers are the gateway's to set.
        assert_eq!(inbound.headers, b"X-Custom: v\r\n");

        for foreign in [
            "GET /v1/chat/completions HTTP/1.1\r\n\r\n",
            "POST /api/v1/modserv/deploy HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "POST /v1/models HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "POST /v1/models/x HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.0\r\ncontent-length: 2\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.1\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            // Over the body limit (100 here): the router answers 413.
            "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 101\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(ours(foreign).is_none(), "{foreign:?}");
        }
        assert!(matches!(
            parse_head(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-le", 100),
            Head::Partial
        ));
    }

    #[test]
    fn heads_carry_framing_and_the_request_id() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "text/event-stream".parse().unwrap());
        headers.insert(REQUEST_ID, "from-replica".parse().unwrap());
        let mut out = Vec::new();
        write_head(&mut out, StatusCode::OK, &headers, "id1", None, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: id1\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        let mut out = Vec::new();
        write_head(
            &mut out,
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            "id2",
            Some(7),
            true,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nx-request-id: id2\r\ncontent-length: 7\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        write_head(
            &mut out,
            StatusCode::NO_CONTENT,
            &HeaderMap::new(),
            "id3",
            Some(0),
            false,
        );
        assert!(!String::from_utf8(out).unwrap().contains("content-length"));
    }
}

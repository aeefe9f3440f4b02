//! Kept-alive HTTP/1.1 connections to replicas, spoken directly: a small last-in-first-out pool
//! per replica, a request written in one piece, the response head parsed with `httparse`, and
//! the body read frame by frame by whoever holds it.
//!
//! The gateway speaks HTTP/1.1 to replicas itself rather than through hyper's client: a proxied
//! request is one write and a few reads, and hyper's machinery around them (a connection task or
//! future, request and response types, header maps built and rebuilt) cost more than the system
//! calls did. Nothing runs in the background: a connection is read only by the [`ResponseBody`]
//! that holds it, in the task of the request using it.
//!
//! A connection leaves the pool for one request and goes back only when that request's response
//! body has been read to its end. A body dropped early (the client went away) drops the
//! connection with it, which closes the socket and so cancels the generation in the engine.
//! Idle connections are not watched: one the replica closed meanwhile (its keep-alive timeout, a
//! restart) is found closed when it is taken out, or when a request on it meets the end of the
//! connection before any byte of an answer; the request then goes out on the next connection,
//! as nginx does with its kept-alive upstream connections.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// How long a connection to a replica may take before it counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle connections kept per replica; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Replicas whose pools are kept; past this, pools without idle connections are forgotten.
const MAX_ORIGINS: usize = 1024;

/// Most bytes of a response head; a longer one is a broken replica.
const MAX_HEAD: usize = 64 * 1024;

/// Most headers in a response head.
const MAX_HEADERS: usize = 96;

/// Most bytes of a chunk-size line (the size and any extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8 * 1024;

/// Why a request did not get a response.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be made, or nothing of the request left: another replica may be
    /// asked.
    Connect(String),
    /// The request may have reached the engine: never resend it.
    Send(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(err) | Self::Send(err) => f.write_str(err),
        }
    }
}

/// One open connection to a replica, with the bytes read from it and not used yet.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    read: BytesMut,
    origin: Arc<Origin>,
}

impl Connection {
    /// Whether the replica has closed (or written to) this idle connection; asks the socket
    /// only when the reactor saw it become readable, so a live one costs no system call.
    fn closed(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads what the socket has into `read`; `Ok(0)` at the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_SIZE / 4 {
            self.read.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }

    /// Puts the connection back for the next request.
    fn release(self) {
        // Bytes beyond the response mean the two sides disagree on framing: never reuse.
        if !self.read.is_empty() || self.closed() {
            return;
        }
        let origin = self.origin.clone();
        let mut idle = origin.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest idle connection is the likeliest to have been closed by the replica.
        if idle.front().is_some_and(Connection::closed) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(self);
        }
    }
}

/// A replica's answer: status, end-to-end headers and the body still to read.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) status: StatusCode,
    /// The replica's headers less those about the connection or its framing.
    pub(crate) headers: HeaderMap,
    pub(crate) body: ResponseBody,
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding: where in it the reader is.
    Chunked(Chunk),
    /// Until the replica closes the connection (no length, not chunked).
    UntilClose,
    /// Read to its end.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailer,
}

/// The body of a replica's response, read from its connection as it is asked for. Read to its
/// end, it returns the connection to the pool; dropped before, it closes it.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    connection: Option<Connection>,
    framing: Framing,
    /// Whether the connection may carry another request once the body has been read.
    reusable: bool,
}

impl ResponseBody {
    /// Whether the body has been read to its end.
    pub(crate) fn is_end(&self) -> bool {
        self.framing == Framing::Done
    }

    /// The body's length when the replica sent one.
    pub(crate) fn length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            Framing::Chunked(_) | Framing::UntilClose => None,
        }
    }

    /// The next piece of the body: `None` at its end.
    pub(crate) fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            if let Some(next) = self.buffered() {
                return Poll::Ready(next.transpose());
            }
            let Some(connection) = self.connection.as_mut() else {
                return Poll::Ready(Some(Err(io::ErrorKind::NotConnected.into())));
            };
            match connection.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => {
                    self.connection = None;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Ok(0)) => {
                    self.connection = None;
                    if self.framing == Framing::UntilClose {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the replica closed the connection before the end of the response",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// The next piece of the body from what was read already, without asking the socket:
    /// `None` when more must be read first.
    pub(crate) fn buffered(&mut self) -> Option<io::Result<Option<Bytes>>> {
        loop {
            let connection = match self.framing {
                Framing::Done => return Some(Ok(None)),
                _ => self.connection.as_mut()?,
            };
            let read = &mut connection.read;
            match self.framing {
                Framing::Done => return Some(Ok(None)),
                Framing::UntilClose => {
                    return (!read.is_empty()).then(|| Ok(Some(read.split().freeze())));
                }
                Framing::Length(0) => self.finish(),
                Framing::Length(left) => {
                    if read.is_empty() {
                        return None;
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
                    let data = read.split_to(take).freeze();
                    self.framing = Framing::Length(left - take as u64);
                    if left == take as u64 {
                        self.finish();
                    }
                    return Some(Ok(Some(data)));
                }
                Framing::Chunked(Chunk::Size) => {
                    let line = match take_line(read) {
                        Ok(Some(line)) => line,
                        Ok(None) => return None,
                        Err(err) => return Some(Err(err)),
                    };
                    match chunk_size(&line) {
                        Some(0) => self.framing = Framing::Chunked(Chunk::Trailer),
                        Some(n) => self.framing = Framing::Chunked(Chunk::Data(n)),
                        None => return Some(Err(bad("a malformed chunk size"))),
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if read.is_empty() {
                        return None;
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
                    let data = read.split_to(take).freeze();
                    self.framing = Framing::Chunked(if left == take as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take as u64)
                    });
                    return Some(Ok(Some(data)));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if read.len() < 2 {
                        return None;
                    }
                    if &read[..2] != b"\r\n" {
                        return Some(Err(bad("chunk data not followed by CRLF")));
                    }
                    read.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailer) => match take_line(read) {
                    Ok(Some(line)) if line.is_empty() => self.finish(),
                    Ok(Some(_trailer)) => {}
                    Ok(None) => return None,
                    Err(err) => return Some(Err(err)),
                },
            }
        }
    }

    /// The body has ended: the connection goes back to the pool when it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(connection) = self.connection.take()
            && self.reusable
        {
            connection.release();
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the replica sent {what}"),
    )
}

/// One CRLF-ended line from the front of `read`, without its CRLF; `Ok(None)` until it is all
/// there.
fn take_line(read: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match memchr::memchr(b'\n', read) {
        Some(end) => {
            let mut line = read.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if read.len() > MAX_CHUNK_LINE => Err(bad("an overlong chunk line")),
        None => Ok(None),
    }
}

/// The size in a chunk-size line (hex digits, then optional `;extensions`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |size, b| {
        let digit = char::from(*b).to_digit(16)?;
        Some(size * 16 + u64::from(digit))
    })
}

/// How a request on a connection failed.
enum Failure {
    /// Nothing came back and the request can be sent again (a pooled connection the replica
    /// had closed, or the write itself failed).
    Unsent(String),
    /// The request may have been taken: never resent.
    Sent(String),
}

/// A response head, parsed.
struct Head {
    /// Its length in bytes.
    len: usize,
    code: u16,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
}

/// Parses the response head at the front of `read`: `Ok(None)` until it is all there. Kept
/// apart from the reading so the parser's header array never lives across an await (it would
/// make every connection's task that much bigger).
fn parse_head(read: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let len = match head.parse(read) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("a response head over 64 KiB".into()),
        Err(err) => return Err(format!("a malformed response head: {err}")),
    };
    let code = head.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    let mut reusable = head.version == Some(1);
    let mut kept = HeaderMap::with_capacity(head.headers.len());
    for header in head.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("a bad content-length")?;
            if framing == Framing::UntilClose {
                framing = Framing::Length(length);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked wins over a length (RFC 9112 6.3).
            if header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                framing = Framing::Chunked(Chunk::Size);
            } else {
                reusable = false;
                framing = Framing::UntilClose;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            reusable &= !crate::asks_close(header.value);
        } else if !crate::is_hop_by_hop_name(name)
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(header.value),
            )
        {
            kept.append(name, value);
        }
    }
    if code == 204 || code == 304 {
        framing = Framing::Length(0);
    }
    if framing == Framing::UntilClose {
        reusable = false;
    }
    Ok(Some(Head {
        len,
        code,
        headers: kept,
        framing,
        reusable,
    }))
}

/// Writes `request` on `connection` and reads the response head.
async fn exchange(mut connection: Connection, request: &[u8]) -> Result<Exchange, Failure> {
    if let Err(err) = connection.stream.write_all(request).await {
        return Err(Failure::Unsent(err.to_string()));
    }
    loop {
        match parse_head(&connection.read).map_err(Failure::Sent)? {
            // Interim answers (100 Continue and the like) are skipped; 101 never comes, as no
            // request asks to switch protocols.
            Some(head) if (100..200).contains(&head.code) && head.code != 101 => {
                connection.read.advance(head.len);
                continue;
            }
            Some(head) => {
                let status = StatusCode::from_u16(head.code)
                    .map_err(|_| Failure::Sent(format!("the replica sent status {}", head.code)))?;
                connection.read.advance(head.len);
                let mut body = ResponseBody {
                    connection: Some(connection),
                    framing: head.framing,
                    reusable: head.reusable,
                };
                if body.framing == Framing::Length(0) {
                    body.finish();
                }
                return Ok(Exchange {
                    status,
                    headers: head.headers,
                    body,
                });
            }
            None => {}
        }
        let before = connection.read.len();
        match poll_fn(|cx| connection.poll_fill(cx)).await {
            Ok(0) if before == 0 => {
                return Err(Failure::Unsent(
                    "the replica closed the connection without answering".into(),
                ));
            }
            Ok(0) => return Err(Failure::Sent("the response head was cut off".into())),
            Ok(_) => {}
            Err(err) if before == 0 => return Err(Failure::Unsent(err.to_string())),
            Err(err) => return Err(Failure::Sent(err.to_string())),
        }
    }
}

/// One replica's idle connections.
#[derive(Debug)]
struct Origin {
    /// `host:port` to connect to.
    address: String,
    /// The `Host` header: the address as the replica's URL wrote it.
    host: String,
    /// The path of the replica's base URL, without its last `/`, put before each request's.
    prefix: String,
    /// Most recently used at the back.
    idle: Mutex<VecDeque<Connection>>,
}

impl Origin {
    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(connection) = idle.pop_back() {
            if !connection.closed() {
                return Some(connection);
            }
        }
        None
    }

    async fn connect(self: &Arc<Self>) -> Result<Connection, UpstreamError> {
        let address = self.address.as_str();
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()))
            })?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        // Small requests and SSE events must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            read: BytesMut::new(),
            origin: self.clone(),
        })
    }
}

/// A request for a replica, as the client sent it less what the gateway changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a str,
    /// Path and query, starting with `/`.
    pub(crate) target: &'a str,
    /// Header lines (`name: value\r\n` each) to pass on; `Host` and `Content-Length` are the
    /// gateway's.
    pub(crate) headers: &'a [u8],
    pub(crate) body: &'a [u8],
}

/// Every replica's pool.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    origins: RwLock<HashMap<String, Arc<Origin>>>,
}

impl Upstreams {
    fn origin(&self, base: &str) -> Result<Arc<Origin>, String> {
        if let Some(origin) = self
            .origins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(base)
        {
            return Ok(origin.clone());
        }
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("bad replica address {base}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "bad replica address {base}: only http:// is supported"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("bad replica address {base}: no host"))?;
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let mut origins = self.origins.write().unwrap_or_else(|e| e.into_inner());
        // Replicas come and go with new ports; forget those with nothing pooled.
        if origins.len() >= MAX_ORIGINS {
            origins.retain(|_, o| !o.idle.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        }
        let origin = origins.entry(base.to_owned()).or_insert_with(|| {
            Arc::new(Origin {
                address,
                host: authority.as_str().to_owned(),
                prefix,
                idle: Mutex::new(VecDeque::new()),
            })
        });
        Ok(origin.clone())
    }

    /// Sends `request` to the replica at `base` (`http://host:port[/prefix]`), on a pooled
    /// connection or a new one, and returns once the response head has arrived.
    ///
    /// # Errors
    /// [`UpstreamError::Connect`] when no connection could be made or nothing was sent (a bad
    /// address counts too), [`UpstreamError::Send`] when the request may have reached the
    /// engine.
    pub(crate) async fn send(
        &self,
        base: &str,
        request: Outgoing<'_>,
    ) -> Result<Exchange, UpstreamError> {
        let origin = self.origin(base).map_err(UpstreamError::Connect)?;
        let wire = encode(&origin, request);
        // Pooled connections first; one the replica closed meanwhile gives the request back,
        // and the next one is tried. A new connection is the last resort.
        while let Some(connection) = origin.checkout() {
            match exchange(connection, &wire).await {
                Ok(exchange) => return Ok(exchange),
                Err(Failure::Unsent(err)) => {
                    tracing::debug!(replica = base, error = %err, "pooled connection was closed; trying the next");
                }
                Err(Failure::Sent(err)) => return Err(UpstreamError::Send(err)),
            }
        }
        let connection = origin.connect().await?;
        exchange(connection, &wire)
            .await
            .map_err(|failure| match failure {
                Failure::Unsent(err) => UpstreamError::Connect(err),
                Failure::Sent(err) => UpstreamError::Send(err),
            })
    }
}

/// The request as it goes on the wire: one buffer, so one write.
fn encode(origin: &Origin, request: Outgoing<'_>) -> Vec<u8> {
    let mut wire = Vec::with_capacity(
        64 + origin.prefix.len()
            + request.target.len()
            + origin.host.len()
            + request.headers.len()
            + request.body.len(),
    );
    wire.extend_from_slice(request.method.as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(origin.prefix.as_bytes());
    wire.extend_from_slice(request.target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    wire.extend_from_slice(origin.host.as_bytes());
    wire.extend_from_slice(b"\r\n");
    wire.extend_from_slice(request.headers);
    wire.extend_from_slice(b"content-length: ");
    wire.extend_from_slice(itoa::Buffer::new().format(request.body.len()).as_bytes());
    wire.extend_from_slice(b"\r\n\r\n");
    wire.extend_from_slice(request.body);
    wire
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn replica_addresses_are_parsed_once() {
        let upstreams = Upstreams::default();
        let origin = upstreams.origin("http://127.0.0.1:9000").unwrap();
        assert_eq!(origin.host, "127.0.0.1:9000");
        assert!(Arc::ptr_eq(
            &origin,
            &upstreams.origin("http://127.0.0.1:9000").unwrap()
        ));
        assert!(upstreams.origin("https://127.0.0.1:9000").is_err());
        assert_eq!(
            upstreams.origin("http://engine").unwrap().address,
            "engine:80"
        );
        assert_eq!(
            upstreams.origin("http://e:1/base/").unwrap().prefix,
            "/base"
        );
        assert!(upstreams.origin("not a url").is_err());
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"A;name=value"), Some(10));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"xyz"), None);
        assert_eq!(chunk_size(b"ffffffffffffffff"), None);
    }

    /// A replica that answers each request it reads with the next of `answers`, written in
    /// pieces of `piece` bytes to exercise every split, and reports the requests it got.
    async fn replica(
        answers: Vec<&'static [u8]>,
        piece: usize,
    ) -> (String, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut request = vec![0u8; 4096];
                let n = socket.read(&mut request).await.unwrap();
                request.truncate(n);
                seen.push(request);
                for part in answer.chunks(piece) {
                    socket.write_all(part).await.unwrap();
                    socket.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
            seen
        });
        (base, task)
    }

    /// A bodiless POST to `target`.
    fn post(target: &'static str) -> Outgoing<'static> {
        Outgoing {
            method: "POST",
            target,
            headers: b"",
            body: b"",
        }
    }

    async fn read_all(body: &mut ResponseBody) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(data) = poll_fn(|cx| body.poll_data(cx)).await {
            all.extend_from_slice(&data?);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn chunked_and_sized_answers_are_read_and_the_connection_reused() {
        for piece in [1, 3, 1000] {
            let (base, replica) = replica(
                vec![
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\nconnection: keep-alive\r\n\r\n5;x=y\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\ntrailer: t\r\n\r\n",
                    b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\nbody",
                    b"HTTP/1.1 204 No Content\r\n\r\n",
                ],
                piece,
            )
            .await;
            let upstreams = Upstreams::default();
            let request = Outgoing {
                headers: b"x-request-id: abc\r\n",
                body: b"{}",
                ..post("/v1/chat/completions")
            };
            let mut first = upstreams.send(&base, request).await.unwrap();
            assert_eq!(first.status, 200);
            assert_eq!(first.headers["content-type"], "text/event-stream");
            assert!(first.headers.get("transfer-encoding").is_none());
            assert!(first.headers.get("connection").is_none());
            assert_eq!(read_all(&mut first.body).await.unwrap(), b"hello world");
            assert!(first.body.is_end());

            let mut second = upstreams.send(&base, request).await.unwrap();
            assert_eq!(second.status, 201);
            assert_eq!(second.body.length(), Some(4));
            assert_eq!(read_all(&mut second.body).await.unwrap(), b"body");

            let mut third = upstreams.send(&base, request).await.unwrap();
            assert_eq!(third.status, 204);
            assert!(third.body.is_end());
            assert!(read_all(&mut third.body).await.unwrap().is_empty());

            // All three went over the one connection the replica accepted.
            let seen = replica.await.unwrap();
            assert_eq!(seen.len(), 3);
            let text = String::from_utf8(seen[0].clone()).unwrap();
            assert!(
                text.starts_with("POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:"),
                "{text}"
            );
            assert!(
                text.contains("\r\nx-request-id: abc\r\ncontent-length: 2\r\n\r\n{}"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_cut_off_body_is_an_error_and_a_closed_pooled_connection_is_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            // First connection: one full answer, then closed while idle in the pool.
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            drop(socket);
            // Second connection: an answer cut off in its body.
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await
                .unwrap();
        });
        let upstreams = Upstreams::default();
        let request = post("/x");
        let mut first = upstreams.send(&base, request).await.unwrap();
        assert_eq!(read_all(&mut first.body).await.unwrap(), b"ok");
        // Let the close reach this side, then send again: a new connection carries it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut second = upstreams.send(&base, request).await.unwrap();
        let err = read_all(&mut second.body).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let upstreams = Upstreams::default();
        let request = post("/x");
        let err = upstreams
            .send(&format!("http://127.0.0.1:{port}"), request)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
    }
}

//! The HTTP/1.1 upstream fast path: a request without a body (the common `GET`) is written to
//! the client connection's own kept-alive upstream connection and its response is read in
//! the client connection's task. There is no connection task, channel or hand-off between the
//! two sides, which for small requests is most of what hyper's client costs.
//!
//! Requests with a body, upgrades and `CONNECT` keep using hyper's client (the body has to
//! stream both ways at once, which a task of its own does well).
//!
//! Framing of the response follows RFC 9112 section 6.3, strictly: a malformed head, chunk
//! line or conflicting `Content-Length` fails the request (`503`) and closes the upstream
//! connection, so a confused upstream can never make one response's bytes pass for the next.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Initial size of an upstream connection's read buffer; it grows up to the head limit.
const READ_BUFFER: usize = 16 * 1024;
/// Longest chunk extension accepted in a chunked response.
const MAX_CHUNK_EXTENSION: usize = 4096;

/// Why the fast path failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FastError {
    /// The upstream closed (or reset) a reused connection before sending a byte of the
    /// response: it had timed the idle connection out. Safe to retry on a new connection.
    #[error("upstream closed the kept-alive connection")]
    Stale,
    #[error("upstream i/o: {0}")]
    Io(#[from] io::Error),
    #[error("upstream response: {0}")]
    Protocol(&'static str),
}

/// One upstream HTTP/1.1 connection with its read buffer.
pub(crate) struct H1Conn {
    stream: TcpStream,
    /// Bytes read but not consumed are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The request head being written (kept to reuse its allocation).
    pub(crate) head: Vec<u8>,
}

/// Where an idle kept-alive connection waits for the next request of its client connection.
pub(crate) type IdleSlot = Arc<Mutex<Option<H1Conn>>>;

impl H1Conn {
    pub(crate) fn new(stream: TcpStream) -> Self {
        H1Conn {
            stream,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            head: Vec::with_capacity(512),
        }
    }

    /// Whether an idle connection can carry another request: nothing (no end of stream,
    /// reset or stray bytes) has arrived on it since its last response. Costs a system call
    /// only when the reactor has seen the socket readable.
    pub(crate) fn idle_ok(&self) -> bool {
        if self.start != self.end {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    fn unread(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes (at most `limit` may be buffered unconsumed); `0` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < limit {
                let grown = (self.buf.len() * 2).min(limit);
                self.buf.resize(grown, 0);
            } else {
                return Poll::Ready(Err(io::Error::other("upstream response head too large")));
            }
        }
        let Some(spare) = self.buf.get_mut(self.end..) else {
            return Poll::Ready(Err(io::Error::other("read buffer")));
        };
        let mut rb = ReadBuf::new(spare);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx, limit)).await
    }
}

/// Writes `req`'s head (HTTP/1.1, headers as they are now) into `out`.
pub(crate) fn encode_head<B>(req: &Request<B>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let uri = req.uri();
    if uri.scheme().is_some() {
        // Absolute form, as the client sent it.
        out.extend_from_slice(uri.to_string().as_bytes());
    } else {
        match uri.path_and_query() {
            Some(pq) => out.extend_from_slice(pq.as_str().as_bytes()),
            None => out.push(b'/'),
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    Empty,
    /// `Content-Length`: bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size (`digits` so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// Skipping a chunk extension (`seen` bytes so far).
    Extension {
        size: u64,
        seen: usize,
    },
    /// After the size line's `\r`.
    SizeLf {
        size: u64,
    },
    /// Bytes of chunk data left.
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// Sends the head in `conn.head` and reads the response head. `head_request`: the request was
/// `HEAD` (the response then has no body whatever its headers say).
pub(crate) async fn roundtrip(
    conn: &mut H1Conn,
    head_request: bool,
    reused: bool,
    max_head: usize,
    max_headers: usize,
) -> Result<(Response<()>, BodyState), FastError> {
    if let Err(e) = conn.stream.write_all(&conn.head).await {
        return Err(if reused { FastError::Stale } else { e.into() });
    }
    let mut first = true;
    loop {
        let parsed = parse_head(conn.unread(), max_headers)?;
        let Some((used, resp, framing, keep_alive)) = parsed else {
            match conn.fill(max_head).await {
                Ok(0) if reused && first && conn.start == conn.end => return Err(FastError::Stale),
                Ok(0) => return Err(FastError::Protocol("closed before the response head")),
                Ok(_) => {}
                Err(e) if reused && first && conn.start == conn.end => {
                    tracing::debug!(error = %e, "reused upstream connection failed");
                    return Err(FastError::Stale);
                }
                Err(e) => return Err(e.into()),
            }
            first = false;
            continue;
        };
        conn.consume(used);
        let status = resp.status();
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(FastError::Protocol("101 without an upgrade request"));
            }
            // An interim response (103 Early Hints, a stray 100): the real one follows.
            continue;
        }
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else {
            framing
        };
        let keep_alive = keep_alive && framing != Framing::Close;
        return Ok((
            resp,
            BodyState {
                framing,
                keep_alive,
            },
        ));
    }
}

/// What the response head says about the body and the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyState {
    framing: Framing,
    keep_alive: bool,
}

type ParsedHead = (usize, Response<()>, Framing, bool);

/// Parses a response head from `bytes`: `None` if incomplete; (bytes used, response, framing,
/// whether the connection may be reused).
fn parse_head(bytes: &[u8], max_headers: usize) -> Result<Option<ParsedHead>, FastError> {
    const STACK_HEADERS: usize = 64;
    let mut on_stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut on_heap;
    let headers: &mut [httparse::Header<'_>] = if max_headers <= STACK_HEADERS {
        on_stack.get_mut(..max_headers).unwrap_or_default()
    } else {
        on_heap = vec![httparse::EMPTY_HEADER; max_headers];
        &mut on_heap
    };
    let mut parsed = httparse::Response::new(headers);
    let used = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(FastError::Protocol("malformed response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| FastError::Protocol("invalid status code"))?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut keep_alive = parsed.version == Some(1);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| FastError::Protocol("invalid header name"))?;
        let value =
            HeaderValue::from_bytes(h.value).map_err(|_| FastError::Protocol("invalid header"))?;
        if name == http::header::CONTENT_LENGTH {
            for part in h.value.split(|b| *b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or(FastError::Protocol("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(FastError::Protocol("conflicting content-length"));
                }
                length = Some(n);
            }
        } else if name == http::header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the last coding says whether the body is chunked.
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == http::header::CONNECTION
            && h.value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep_alive = false;
        }
        map.append(name, value);
    }
    let framing = if transfer_encoding {
        // Transfer-Encoding wins over Content-Length; a message with both is suspect, so its
        // connection is not reused.
        if length.is_some() {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size { size: 0, digits: 0 })
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = map;
    Ok(Some((used, resp, framing, keep_alive)))
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

/// The response body read straight from the upstream connection, in the client connection's
/// task. When the body ends cleanly on a reusable connection, the connection goes back to
/// its client connection's idle slot for the next request.
pub(crate) struct UpstreamBody {
    conn: Option<H1Conn>,
    state: BodyState,
    home: IdleSlot,
    max_head: usize,
}

impl UpstreamBody {
    pub(crate) fn new(conn: H1Conn, state: BodyState, home: IdleSlot, max_head: usize) -> Self {
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            home,
            max_head,
        };
        if body.state.framing == Framing::Empty || body.state.framing == Framing::Length(0) {
            body.finish();
        }
        body
    }

    /// The body is complete: park the connection for the next request if it can carry one.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.state.keep_alive
            && conn.start == conn.end
            && let Ok(mut slot) = self.home.lock()
        {
            *slot = Some(conn);
        }
        self.state.framing = Framing::Empty;
    }

    fn fail(&mut self, what: &'static str) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        self.state.framing = Framing::Empty;
        Poll::Ready(Some(Err(io::Error::other(what))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state.framing {
                Framing::Empty | Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    let avail = conn.unread();
                    if avail.is_empty() {
                        match ready!(conn.poll_fill(cx, this.max_head)) {
                            Ok(0) => return this.fail("upstream closed mid-body"),
                            Ok(_) => continue,
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(avail.len());
                    let data = Bytes::copy_from_slice(avail.get(..take).unwrap_or_default());
                    conn.consume(take);
                    let left = left - take as u64;
                    this.state.framing = Framing::Length(left);
                    if left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    let avail = conn.unread();
                    if avail.is_empty() {
                        match ready!(conn.poll_fill(cx, this.max_head)) {
                            Ok(0) => {
                                this.conn = None;
                                this.state.framing = Framing::Empty;
                                return Poll::Ready(None);
                            }
                            Ok(_) => continue,
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                    let data = Bytes::copy_from_slice(avail);
                    let n = avail.len();
                    conn.consume(n);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(chunk) => match decode_chunked(conn, chunk) {
                    Decoded::Frame(next, frame) => {
                        this.state.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Decoded::End(trailers) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Decoded::More(next) => {
                        this.state.framing = Framing::Chunked(next);
                        match ready!(conn.poll_fill(cx, this.max_head)) {
                            Ok(0) => return this.fail("upstream closed mid-body"),
                            Ok(_) => {}
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                    }
                    Decoded::Invalid(what) => return this.fail(what),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.state.framing, Framing::Empty | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

enum Decoded {
    Frame(Chunk, Frame<Bytes>),
    End(Option<HeaderMap>),
    More(Chunk),
    Invalid(&'static str),
}

/// Decodes what the buffer holds of a chunked body, from state `chunk`.
fn decode_chunked(conn: &mut H1Conn, mut chunk: Chunk) -> Decoded {
    loop {
        if chunk == Chunk::Trailers {
            return decode_trailers(conn);
        }
        if let Chunk::Data(left) = chunk {
            let avail = conn.unread();
            if avail.is_empty() {
                return Decoded::More(chunk);
            }
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(avail.len());
            let data = Bytes::copy_from_slice(avail.get(..take).unwrap_or_default());
            conn.consume(take);
            let left = left - take as u64;
            let next = if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            };
            return Decoded::Frame(next, Frame::data(data));
        }
        let Some(&b) = conn.unread().first() else {
            return Decoded::More(chunk);
        };
        conn.consume(1);
        chunk = match (chunk, b) {
            (Chunk::Size { size, digits }, b) if b.is_ascii_hexdigit() => {
                if digits >= 15 {
                    return Decoded::Invalid("chunk size too large");
                }
                let v = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => b - b'A' + 10,
                };
                Chunk::Size {
                    size: size * 16 + u64::from(v),
                    digits: digits + 1,
                }
            }
            (Chunk::Size { size, digits }, b';' | b' ' | b'\t') if digits > 0 => {
                Chunk::Extension { size, seen: 0 }
            }
            (Chunk::Size { size, digits }, b'\r') if digits > 0 => Chunk::SizeLf { size },
            (Chunk::Extension { size, .. }, b'\r') => Chunk::SizeLf { size },
            (Chunk::Extension { size, seen }, b) if b != b'\n' => {
                if seen >= MAX_CHUNK_EXTENSION {
                    return Decoded::Invalid("chunk extension too long");
                }
                Chunk::Extension {
                    size,
                    seen: seen + 1,
                }
            }
            (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::Trailers,
            (Chunk::SizeLf { size }, b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size { size: 0, digits: 0 },
            _ => return Decoded::Invalid("malformed chunked body"),
        };
    }
}

/// The trailer section after the last chunk: an empty line, or fields and an empty line.
fn decode_trailers(conn: &mut H1Conn) -> Decoded {
    let avail = conn.unread();
    if avail.len() < 2 {
        return Decoded::More(Chunk::Trailers);
    }
    if avail.starts_with(b"\r\n") {
        conn.consume(2);
        return Decoded::End(None);
    }
    let Some(end) = avail.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Decoded::More(Chunk::Trailers);
    };
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let Some(section) = avail.get(..end + 4) else {
        return Decoded::Invalid("trailers");
    };
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Decoded::Invalid("malformed trailers"),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for f in parsed {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) {
            map.append(n, v);
        }
    }
    conn.consume(end + 4);
    Decoded::End(Some(map))
}

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
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::chain::Registration;

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
    /// Held while the connection lives (egress clients' connections, see `chain`).
    _registration: Option<Registration>,
}

/// Where an idle kept-alive connection waits for the next request of its client connection.
pub(crate) type IdleSlot = Arc<Mutex<Option<H1Conn>>>;

impl H1Conn {
    /// A new connection and its registration, if any.
    pub(crate) fn connected((stream, registration): (TcpStream, Option<Registration>)) -> Self {
        H1Conn {
            stream,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            head: Vec::with_capacity(512),
            _registration: registration,
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
        let Some((used, resp, framing, keep_alive, copied)) = parsed else {
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
        // A whole `Content-Length` body that arrived with the head came along in its copy.
        let mut ready = None;
        let mut framing = framing;
        if let Framing::Length(n) = framing
            && n > 0
            && let Some(body) = usize::try_from(n)
                .ok()
                .and_then(|n| Some(used..used.checked_add(n)?))
                .filter(|r| r.end <= copied.len())
        {
            conn.consume(body.len());
            ready = Some(copied.slice(body));
            framing = Framing::Length(0);
        }
        return Ok((
            resp,
            BodyState {
                framing,
                keep_alive,
                ready,
            },
        ));
    }
}

/// What the response head says about the body and the connection.
#[derive(Debug)]
pub(crate) struct BodyState {
    framing: Framing,
    keep_alive: bool,
    /// Body bytes already read, sent before anything else.
    ready: Option<Bytes>,
}

/// A parsed response head: bytes used, the response, its framing, whether the connection may
/// be reused.
type ParsedHead = (usize, Response<()>, Framing, bool, Bytes);

/// Body bytes that are copied along with the head when they are already buffered.
const PREFETCH: usize = 4096;

/// Header slots for one response head; uninitialised, so a parse costs nothing per slot.
const HEADER_SLOTS: usize = 128;

/// Parses a response head at the start of `bytes`: `None` if incomplete. Header values are
/// slices of one copy of the head, not one allocation each.
fn parse_head(bytes: &[u8], max_headers: usize) -> Result<Option<ParsedHead>, FastError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; HEADER_SLOTS];
    let mut on_heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= HEADER_SLOTS {
        slots.get_mut(..max_headers).unwrap_or_default()
    } else {
        on_heap = Vec::with_capacity(max_headers);
        on_heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut on_heap
    };
    let mut parsed = httparse::Response::new(&mut []);
    let used = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        bytes,
        slots,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(FastError::Protocol("malformed response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| FastError::Protocol("invalid status code"))?;
    // The copy takes a small body that is already buffered along (see `roundtrip`).
    let copied = bytes.len().min(used.saturating_add(PREFETCH));
    let head = Bytes::copy_from_slice(bytes.get(..copied).unwrap_or_default());
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut keep_alive = parsed.version == Some(1);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| FastError::Protocol("invalid header name"))?;
        // `h.value` lies inside `bytes[..used]`, so at the same offset inside `head`.
        let value = if h.value.is_empty() {
            HeaderValue::from_static("")
        } else {
            let offset = (h.value.as_ptr() as usize).wrapping_sub(bytes.as_ptr() as usize);
            let value = offset
                .checked_add(h.value.len())
                .filter(|end| *end <= used)
                .map(|end| head.slice(offset..end))
                .ok_or(FastError::Protocol("header value"))?;
            HeaderValue::from_maybe_shared(value)
                .map_err(|_| FastError::Protocol("invalid header"))?
        };
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
    Ok(Some((used, resp, framing, keep_alive, head)))
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
        if let Some(data) = this.state.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
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
        self.state.ready.is_none()
            && (self.conn.is_none()
                || matches!(self.state.framing, Framing::Empty | Framing::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.state.ready.as_ref().map_or(0, |b| b.len() as u64);
        match self.state.framing {
            Framing::Empty => SizeHint::with_exact(ready),
            Framing::Length(n) => SizeHint::with_exact(ready.saturating_add(n)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn head(bytes: &[u8]) -> Result<Option<ParsedHead>, FastError> {
        parse_head(bytes, 100)
    }

    #[test]
    fn response_heads() {
        let ok = |b: &[u8]| {
            head(b)
                .ok()
                .flatten()
                .map(|(n, r, f, k, _)| (n, r.status(), f, k))
        };
        let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(r, Some((38, StatusCode::OK, Framing::Length(5), true)));
        assert!(matches!(head(b"HTTP/1.1 200 OK\r\nContent-Le"), Ok(None)));
        assert!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err()
        );
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n").is_err());
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n").is_err());
        assert!(head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(head(b"garbage\r\n\r\n").is_err());
        let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(r.map(|r| r.2), Some(Framing::Length(5)));
        // Transfer-Encoding wins; with a Content-Length too the connection is not reused.
        let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            r.map(|r| (r.2, r.3)),
            Some((Framing::Chunked(Chunk::Size { size: 0, digits: 0 }), false))
        );
        let r = ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!(r.map(|r| r.2), Some(Framing::Close));
        let r =
            ok(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.map(|r| r.3), Some(false));
        let r = ok(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.map(|r| r.3), Some(false));
        let r = ok(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(r.map(|r| r.2), Some(Framing::Close));
    }

    /// An upstream on loopback that answers each connection's requests with `answers`, in
    /// turn, each written in pieces of `piece` bytes; returns its address.
    async fn upstream(answers: Vec<Vec<u8>>, piece: usize) -> Option<std::net::SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = l.local_addr().ok()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for a in answers {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
                            }
                        }
                        for p in a.chunks(piece.max(1)) {
                            if s.write_all(p).await.is_err() {
                                return;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                });
            }
        });
        Some(addr)
    }

    struct Got {
        status: StatusCode,
        body: Vec<u8>,
        trailers: Option<HeaderMap>,
        parked: bool,
    }

    async fn exchange(
        slot: &IdleSlot,
        addr: std::net::SocketAddr,
        method: &str,
    ) -> Result<Got, String> {
        let taken = slot.lock().ok().and_then(|mut s| s.take());
        let reused = taken.is_some();
        let mut conn = match taken {
            Some(c) => c,
            None => H1Conn::connected((
                TcpStream::connect(addr).await.map_err(|e| e.to_string())?,
                None,
            )),
        };
        let req = Request::builder()
            .method(method)
            .uri("/x?y")
            .header("host", "h")
            .body(())
            .map_err(|e| e.to_string())?;
        encode_head(&req, &mut conn.head);
        assert_eq!(
            conn.head,
            format!("{method} /x?y HTTP/1.1\r\nhost: h\r\n\r\n").as_bytes()
        );
        let (resp, state) = roundtrip(&mut conn, method == "HEAD", reused, 65536, 100)
            .await
            .map_err(|e| e.to_string())?;
        let body = UpstreamBody::new(conn, state, slot.clone(), 65536);
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok(Got {
            status: resp.status(),
            body: collected.to_bytes().to_vec(),
            trailers,
            parked: slot.lock().is_ok_and(|s| s.is_some()),
        })
    }

    #[tokio::test]
    async fn chunked_bodies_in_any_pieces() {
        let answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\nA\r\n, chunked!\r\n0\r\nX-Sum: 1\r\n\r\n"
            .to_vec();
        for piece in [1, 3, 7, 4096] {
            let Some(addr) = upstream(vec![answer.clone(), answer.clone()], piece).await else {
                return;
            };
            let slot = IdleSlot::default();
            for _ in 0..2 {
                let got = exchange(&slot, addr, "GET").await;
                let got = got.unwrap_or_else(|e| panic!("piece {piece}: {e}"));
                assert_eq!(got.status, 200);
                assert_eq!(got.body, b"hello, chunked!");
                let sum = got.trailers.as_ref().and_then(|t| t.get("x-sum"));
                assert_eq!(sum.map(HeaderValue::as_bytes), Some(&b"1"[..]));
                assert!(got.parked, "the connection is reused");
            }
        }
    }

    #[tokio::test]
    async fn malformed_chunks_fail_and_close() {
        let slot = IdleSlot::default();
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        ] {
            let Some(addr) = upstream(vec![bad.to_vec()], 4096).await else {
                return;
            };
            assert!(exchange(&slot, addr, "GET").await.is_err());
            assert!(slot.lock().is_ok_and(|s| s.is_none()));
        }
    }

    #[tokio::test]
    async fn bodies_without_length_and_without_body() {
        // HEAD: the Content-Length describes a body that is not sent.
        let answers = vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nX-Empty:\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
        ];
        let Some(addr) = upstream(answers, 4096).await else {
            return;
        };
        let slot = IdleSlot::default();
        let head = exchange(&slot, addr, "HEAD").await;
        assert!(head.as_ref().is_ok_and(|g| g.body.is_empty() && g.parked));
        let none = exchange(&slot, addr, "GET").await;
        assert!(none.as_ref().is_ok_and(|g| g.status == 204 && g.parked));
        // A body that came with the head; an empty header value.
        let sized = exchange(&slot, addr, "GET").await;
        assert!(sized.as_ref().is_ok_and(|g| g.body == b"hello" && g.parked));
        // Close-delimited: the upstream closes after its last answer, which ends the body;
        // the connection is not kept.
        let close = exchange(&slot, addr, "GET").await;
        assert!(
            close
                .as_ref()
                .is_ok_and(|g| g.body == b"until the end" && !g.parked)
        );
    }

    #[tokio::test]
    async fn closed_idle_connections_are_noticed() {
        let Some(addr) = upstream(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()],
            4096,
        )
        .await
        else {
            return;
        };
        let slot = IdleSlot::default();
        assert!(exchange(&slot, addr, "GET").await.is_ok_and(|g| g.parked));
        // The upstream answered its one request and dropped the connection.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let conn = slot.lock().ok().and_then(|mut s| s.take());
        let Some(mut conn) = conn else {
            panic!("the connection was parked");
        };
        assert!(!conn.idle_ok());
        // Had the close not been seen yet, the request fails as `Stale` (retried by the
        // caller), not as an upstream error.
        let sent = roundtrip(&mut conn, false, true, 65536, 100).await;
        assert!(matches!(sent, Err(FastError::Stale)), "{sent:?}");
    }
}

//! Upstream DNS-over-TCP connections shared by many queries.
//!
//! Opening a connection per query costs a handshake (a round trip, three system calls, an
//! epoll registration) and leaves a socket in TIME_WAIT. Instead each server gets one
//! connection on which queries are pipelined (RFC 7766 §6.2.1): every query is written under
//! a random ID free on that connection, the connection's reader matches each answer to the
//! query waiting on its ID and checks it repeats the question, and the [`TcpExchange`]
//! restores the client's ID.
//!
//! - **Mismatched answers** (unknown ID, another question, not a response, late after a
//!   timeout) are dropped and counted; the query keeps waiting. Nothing is learned from them.
//! - **Closed connections.** When the server closes the connection or it fails, the queries
//!   waiting on it fail at once (the caller may retry once on a fresh connection, since a
//!   server may close an idle connection just as a query is written) and the next query
//!   connects again.
//! - **Idle connections** are closed after `idle` with no query in flight.
//! - **Bounded.** At most [`MAX_SERVERS`] servers have a connection (the least recently used
//!   is closed) and [`MAX_WAITERS_PER_SOCKET`] queries wait on one.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::stats::Counters;
use crate::upstream::{IdSource, MAX_SERVERS, MAX_WAITERS_PER_SOCKET};
use crate::wire::{self, DnsMessage, Question};

/// Draws of a random ID before giving up on a crowded connection.
const ID_DRAWS: usize = 32;

struct Waiter {
    question: Question,
    tx: oneshot::Sender<(Vec<u8>, DnsMessage)>,
}

struct Waiters {
    by_id: HashMap<u16, Waiter>,
    ids: IdSource,
}

/// One connection to a server and the queries waiting on it.
struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Mutex<Waiters>,
    dead: AtomicBool,
    /// Queries sent on it so far (a reused connection is one with more than one).
    sent: AtomicU64,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Every update is a plain insert/remove: a poisoned map is still consistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails its waiting queries (their senders drop).
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.lock().by_id.clear();
    }

    /// Reads answers until the connection ends, handing each to its query.
    async fn read(self: Arc<Self>, mut rd: OwnedReadHalf, idle: Duration, counters: Arc<Counters>) {
        loop {
            let frame = match tokio::time::timeout(idle, read_frame(&mut rd)).await {
                Ok(Ok(f)) => f,
                // Idle: close if nothing waits, else let the queries' own timeouts decide.
                Err(_) if self.lock().by_id.is_empty() => break,
                Err(_) => continue,
                Ok(Err(_)) => break,
            };
            let Ok(answer) = wire::parse_answer(&frame) else {
                Counters::inc(&counters.malformed_answers);
                continue;
            };
            let waiter = {
                let mut w = self.lock();
                let matches = w.by_id.get(&answer.id).is_some_and(|q| {
                    answer.is_response
                        && answer.questions.len() == 1
                        && answer.questions.first() == Some(&q.question)
                });
                if matches {
                    w.by_id.remove(&answer.id)
                } else {
                    None
                }
            };
            match waiter {
                Some(w) => {
                    let _ = w.tx.send((frame, answer));
                }
                None => Counters::inc(&counters.mismatched_answers),
            }
        }
        self.kill();
        // Let the server see the close.
        let _ = self.writer.lock().await.shutdown().await;
    }
}

/// A query written to a connection, waiting for its answer. Dropping it frees its ID.
pub(crate) struct TcpExchange {
    conn: Arc<Conn>,
    upstream_id: u16,
    client_id: [u8; 2],
    rx: oneshot::Receiver<(Vec<u8>, DnsMessage)>,
    /// Whether the connection had carried queries before this one.
    pub(crate) reused: bool,
}

impl TcpExchange {
    /// The answer (a response with this query's ID and question), the client's ID restored;
    /// `None` if the connection ended first.
    pub(crate) async fn recv(&mut self) -> Option<(Vec<u8>, DnsMessage)> {
        let (data, answer) = (&mut self.rx).await.ok()?;
        Some(crate::upstream::with_client_id(
            data,
            answer,
            self.client_id,
        ))
    }
}

impl Drop for TcpExchange {
    fn drop(&mut self) {
        // Closed first: a waiter under this ID with an open channel is a later query's.
        self.rx.close();
        let mut w = self.conn.lock();
        if w.by_id
            .get(&self.upstream_id)
            .is_some_and(|q| q.tx.is_closed())
        {
            w.by_id.remove(&self.upstream_id);
        }
    }
}

struct Server {
    conn: Option<Arc<Conn>>,
    last_used: u64,
}

/// The upstream TCP connections of every server the proxy forwards to.
pub(crate) struct TcpUpstreamPool {
    mark: Option<u32>,
    idle: Duration,
    servers: Mutex<HashMap<SocketAddr, Server>>,
    /// Serialises connecting, so concurrent queries to a new server share one connection.
    connecting: tokio::sync::Mutex<()>,
    counters: Arc<Counters>,
    clock: AtomicU64,
}

impl Drop for TcpUpstreamPool {
    fn drop(&mut self) {
        let servers = self.servers.get_mut().unwrap_or_else(|p| p.into_inner());
        for c in servers.values().filter_map(|s| s.conn.as_ref()) {
            c.kill();
        }
    }
}

impl TcpUpstreamPool {
    pub(crate) fn new(mark: Option<u32>, idle: Duration, counters: Arc<Counters>) -> Self {
        TcpUpstreamPool {
            mark,
            idle,
            servers: Mutex::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
            counters,
            clock: AtomicU64::new(0),
        }
    }

    fn servers(&self) -> MutexGuard<'_, HashMap<SocketAddr, Server>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, server: SocketAddr) -> Option<Arc<Conn>> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut servers = self.servers();
        let s = servers.get_mut(&server)?;
        s.last_used = now;
        s.conn.clone().filter(|c| !c.dead.load(Ordering::Relaxed))
    }

    /// A live connection to `server`, connecting if there is none; `fresh` forces a new one.
    async fn conn(&self, server: SocketAddr, fresh: bool) -> io::Result<Arc<Conn>> {
        if !fresh && let Some(c) = self.live(server) {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        // Someone else may have connected while we waited.
        if !fresh && let Some(c) = self.live(server) {
            return Ok(c);
        }
        let sock = if server.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        if let Some(mark) = self.mark {
            socket2::SockRef::from(&sock).set_mark(mark)?;
        }
        let stream = sock.connect(server).await?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            waiters: Mutex::new(Waiters {
                by_id: HashMap::new(),
                ids: IdSource::new(),
            }),
            dead: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        });
        tokio::spawn(conn.clone().read(rd, self.idle, self.counters.clone()));
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut servers = self.servers();
        if !servers.contains_key(&server) && servers.len() >= MAX_SERVERS {
            let oldest = servers
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(a, _)| *a);
            if let Some(c) = oldest.and_then(|a| servers.remove(&a)).and_then(|s| s.conn) {
                c.kill();
            }
        }
        let old = servers.insert(
            server,
            Server {
                conn: Some(conn.clone()),
                last_used: now,
            },
        );
        // A replaced connection finishes the queries it carries, then idles out.
        drop(old);
        Ok(conn)
    }

    /// Writes `query` (asking `question`) to a connection to `server` under a fresh ID and
    /// registers for its answer; `fresh` opens a new connection instead of reusing one.
    /// `query` is left as it was.
    pub(crate) async fn send(
        &self,
        server: SocketAddr,
        query: &[u8],
        question: &Question,
        fresh: bool,
    ) -> io::Result<TcpExchange> {
        let client_id = match query.get(..2) {
            Some(&[a, b]) => [a, b],
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no DNS header")),
        };
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
        let conn = self.conn(server, fresh).await?;
        let (tx, rx) = oneshot::channel();
        let upstream_id = {
            let mut w = conn.lock();
            // Checked under the lock `kill` clears the waiters with: either that sees this
            // query or this sees the connection dead.
            if conn.dead.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "upstream connection closed",
                ));
            }
            if w.by_id.len() >= MAX_WAITERS_PER_SOCKET {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "too many queries in flight on one upstream connection",
                ));
            }
            let mut free = None;
            for _ in 0..ID_DRAWS {
                let id = w.ids.next()?;
                if !w.by_id.contains_key(&id) {
                    free = Some(id);
                    break;
                }
            }
            let id = free.ok_or_else(|| {
                io::Error::new(io::ErrorKind::WouldBlock, "no free upstream DNS ID")
            })?;
            w.by_id.insert(
                id,
                Waiter {
                    question: question.clone(),
                    tx,
                },
            );
            id
        };
        let reused = conn.sent.fetch_add(1, Ordering::Relaxed) > 0;
        let exchange = TcpExchange {
            conn: conn.clone(),
            upstream_id,
            client_id,
            rx,
            reused,
        };
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&upstream_id.to_be_bytes());
        frame.extend_from_slice(query.get(2..).unwrap_or_default());
        // One write per message, under the lock, so pipelined messages never interleave.
        let written = conn.writer.lock().await.write_all(&frame).await;
        if let Err(e) = written {
            conn.kill();
            return Err(e);
        }
        Ok(exchange)
    }

    /// Connections currently held (tests).
    #[cfg(test)]
    fn connections(&self) -> usize {
        self.servers()
            .values()
            .filter(|s| {
                s.conn
                    .as_ref()
                    .is_some_and(|c| !c.dead.load(Ordering::Relaxed))
            })
            .count()
    }
}

/// Reads one length-prefixed message.
async fn read_frame(rd: &mut OwnedReadHalf) -> io::Result<Vec<u8>> {
    let len = usize::from(rd.read_u16().await?);
    let mut buf = vec![0u8; len];
    rd.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::wire::{build_query, parse_message};

    const WAIT: Duration = Duration::from_secs(3);

    /// How the fake server treats a connection.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Holds `n` queries, then echoes them as responses in reverse order.
        ReverseAfter(usize),
        /// Answers one query, then closes.
        OneAndClose,
        /// Answers each query first with a copy asking another question, then properly.
        DecoyFirst,
    }

    async fn frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
        let len = usize::from(s.read_u16().await?);
        let mut b = vec![0u8; len];
        s.read_exact(&mut b).await?;
        Ok(b)
    }

    async fn send(s: &mut TcpStream, m: &[u8]) {
        let mut out = u16::try_from(m.len()).unwrap_or(0).to_be_bytes().to_vec();
        out.extend_from_slice(m);
        let _ = s.write_all(&out).await;
    }

    fn respond(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        if let Some(b) = r.get_mut(2) {
            *b |= 0x80;
        }
        r
    }

    /// A server; returns its address and the count of accepted connections.
    async fn server(b: Behaviour) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Ok(q) = frame(&mut s).await {
                        match b {
                            Behaviour::ReverseAfter(n) => {
                                held.push(respond(&q));
                                if held.len() == n {
                                    for r in held.drain(..).rev() {
                                        send(&mut s, &r).await;
                                    }
                                }
                            }
                            Behaviour::OneAndClose => {
                                send(&mut s, &respond(&q)).await;
                                return;
                            }
                            Behaviour::DecoyFirst => {
                                let id = u16::from_be_bytes([q[0], q[1]]);
                                let decoy = build_query(id, "evil-site.com.", 1).expect("decoy");
                                send(&mut s, &respond(&decoy)).await;
                                send(&mut s, &respond(&q)).await;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool() -> (Arc<TcpUpstreamPool>, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        (
            Arc::new(TcpUpstreamPool::new(
                None,
                Duration::from_secs(10),
                c.clone(),
            )),
            c,
        )
    }

    async fn ask(
        p: &TcpUpstreamPool,
        up: SocketAddr,
        id: u16,
        name: &str,
    ) -> io::Result<TcpExchange> {
        let q = build_query(id, name, 1).expect("query");
        let question = parse_message(&q).expect("parses").questions[0].clone();
        p.send(up, &q, &question, false).await
    }

    /// Many queries at once, all with the same client ID, answered in reverse order on one
    /// connection: each gets its own answer with its ID restored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_on_one_connection_and_matched_by_id() {
        const N: usize = 50;
        let (up, accepted) = server(Behaviour::ReverseAfter(N)).await;
        let (p, _) = pool();
        // Connect first, so all queries share the connection.
        let mut tasks = Vec::new();
        for i in 0..N {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("q{i}.example.");
                let mut ex = ask(&p, up, 7, &name).await.expect("send");
                let (a, m) = tokio::time::timeout(WAIT, ex.recv())
                    .await
                    .expect("in time")
                    .expect("answer");
                assert_eq!(&a[..2], &[0, 7]);
                assert_eq!(m.questions[0].name, name);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(p.connections(), 1);
    }

    /// Sequential queries reuse the connection.
    #[tokio::test]
    async fn sequential_queries_reuse_the_connection() {
        let (up, accepted) = server(Behaviour::ReverseAfter(1)).await;
        let (p, _) = pool();
        for i in 0..5u16 {
            let mut ex = ask(&p, up, i, "a.example.").await.expect("send");
            assert_eq!(ex.reused, i > 0);
            let (_, m) = tokio::time::timeout(WAIT, ex.recv())
                .await
                .expect("in time")
                .expect("answer");
            assert_eq!(m.id, i);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A server that closes after each answer: the next query connects again.
    #[tokio::test]
    async fn closed_connection_is_replaced() {
        let (up, accepted) = server(Behaviour::OneAndClose).await;
        let (p, _) = pool();
        for i in 0..3u16 {
            let mut got = None;
            // The close may not have been seen yet: one retry on a fresh connection, as the
            // proxy does.
            for fresh in [false, true] {
                let q = build_query(i, "b.example.", 1).expect("query");
                let question = parse_message(&q).expect("parses").questions[0].clone();
                let mut ex = p.send(up, &q, &question, fresh).await.expect("send");
                if let Ok(Some(a)) = tokio::time::timeout(WAIT, ex.recv()).await {
                    got = Some(a);
                    break;
                }
            }
            assert_eq!(got.map(|(_, m)| m.id), Some(i));
        }
        assert!(accepted.load(Ordering::SeqCst) >= 3);
    }

    /// An answer to another question under the query's ID is dropped and counted; the real
    /// answer still arrives.
    #[tokio::test]
    async fn mismatched_answer_is_dropped() {
        let (up, _) = server(Behaviour::DecoyFirst).await;
        let (p, c) = pool();
        let mut ex = ask(&p, up, 3, "api.stripe.com.").await.expect("send");
        let (_, m) = tokio::time::timeout(WAIT, ex.recv())
            .await
            .expect("in time")
            .expect("answer");
        assert_eq!(m.questions[0].name, "api.stripe.com.");
        assert_eq!(c.snapshot().mismatched_answers, 1);
    }
}

//! Upstream UDP sockets shared by many queries.
//!
//! A fresh socket per query costs five system calls and an epoll registration and was the
//! proxy's main cost. Instead, each upstream server gets a few connected sockets; every
//! forwarded query takes a random message ID that is free on its socket, the datagram is sent
//! with that ID, and the socket's reader task checks each answer (a response repeating the
//! question) and hands it to the query waiting on its ID (the [`Exchange`]), which restores
//! the client's ID.
//!
//! - **Spoofing.** The kernel only delivers datagrams from the server's address and port to a
//!   connected socket; the ID is drawn from the OS random source; and a socket is retired
//!   after [`MAX_QUERIES_PER_SOCKET`] queries, so its source port keeps changing, as a fresh
//!   socket per query did, only less often.
//! - **Late, unsolicited and duplicate answers** find no waiter (the query timed out, was
//!   answered, or never was) and are dropped and counted; so are answers that do not repeat
//!   the question, and the query keeps waiting until its timeout.
//! - **Bounded.** At most [`MAX_SERVERS`] servers (the least recently used is dropped),
//!   `sockets_per_server` sockets each, [`MAX_WAITERS_PER_SOCKET`] queries in flight per socket;
//!   a retired socket's reader ends when its last query ends.
//! - **No task per query.** A query sent with [`UpstreamPool::send_detached`] leaves a
//!   callback instead of a channel: the socket's reader runs it with the answer (or the
//!   reader's sweep with [`Outcome::Timeout`] once its deadline passed), so an answer costs
//!   no task wake-up or hand-over. [`UpstreamPool::send`] (an [`Exchange`] to await) serves
//!   callers that want to wait themselves.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};

use crate::stats::Counters;
use crate::wire::{self, DnsMessage, MAX_MESSAGE_LEN, Question};

/// A socket's source port is used for this many queries, then a fresh socket replaces it.
pub(crate) const MAX_QUERIES_PER_SOCKET: u32 = 10_000;

/// At most this many servers have sockets; beyond it the least recently used loses them.
pub(crate) const MAX_SERVERS: usize = 64;

/// At most this many queries wait on one socket (a sixth of the ID space, so a free random
/// ID is found in a few draws).
pub(crate) const MAX_WAITERS_PER_SOCKET: usize = 10_000;

/// Random IDs drawn per `getrandom` call.
const RANDOM_IDS: usize = 128;

/// Draws of a random ID before giving up on a crowded socket.
const ID_DRAWS: usize = 32;

/// How often a socket's reader looks for detached queries past their deadline (so a
/// deadline is met within this much).
const SWEEP_EVERY: Duration = Duration::from_millis(20);

/// IDs from the OS random source, fetched in batches.
pub(crate) struct IdSource {
    buf: [u16; RANDOM_IDS],
    next: usize,
}

impl IdSource {
    pub(crate) fn new() -> Self {
        IdSource {
            buf: [0; RANDOM_IDS],
            next: RANDOM_IDS,
        }
    }

    pub(crate) fn next(&mut self) -> io::Result<u16> {
        if self.next >= RANDOM_IDS {
            fill_random(&mut self.buf)?;
            self.next = 0;
        }
        let id = self.buf.get(self.next).copied().unwrap_or(0);
        self.next += 1;
        Ok(id)
    }
}

fn fill_random(buf: &mut [u16]) -> io::Result<()> {
    let len = std::mem::size_of_val(buf);
    let mut done = 0;
    while done < len {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which is plain
        // integers (any bit pattern is valid) and outlives the call.
        let r = unsafe {
            libc::getrandom(
                buf.as_mut_ptr().cast::<u8>().add(done).cast(),
                len - done,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(r).unwrap_or(0);
    }
    Ok(())
}

/// How a detached query ended.
pub(crate) enum Outcome {
    /// Its answer (a response with its ID and question), the client's ID restored.
    Answer(Vec<u8>, DnsMessage),
    /// No answer by its deadline.
    Timeout,
    /// Sending failed or the socket failed.
    Failed,
}

/// The callback of a detached query; called exactly once.
pub(crate) type Done = Box<dyn FnOnce(Outcome) + Send>;

/// Where a waiting query's answer goes.
enum Reply {
    /// To the [`Exchange`] awaiting it.
    Channel(oneshot::Sender<(Vec<u8>, DnsMessage)>),
    /// To a callback, run by the socket's reader.
    Detached {
        client_id: [u8; 2],
        deadline: Instant,
        done: Done,
    },
}

/// A query waiting for its answer: the question the answer must repeat.
struct Waiter {
    question: Question,
    reply: Reply,
}

impl Waiter {
    /// Tells a detached query it failed; a channel's receiver sees its sender dropped.
    fn fail(self, why: Outcome) {
        if let Reply::Detached { done, .. } = self.reply {
            done(why);
        }
    }
}

struct Waiters {
    by_id: HashMap<u16, Waiter>,
    ids: IdSource,
}

/// One connected upstream socket and the queries waiting on it.
struct UpSocket {
    socket: UdpSocket,
    waiters: Mutex<Waiters>,
    uses: AtomicU32,
    retired: AtomicBool,
    /// Set by the reader as it ends: a query registered after that fails at once instead of
    /// waiting for a reader that is gone.
    closed: AtomicBool,
    /// Wakes the reader to check whether it may end.
    wake: Notify,
}

impl UpSocket {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Every update is a plain insert/remove: a poisoned map is still consistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn done(&self) -> bool {
        self.retired.load(Ordering::Relaxed) && self.lock().by_id.is_empty()
    }

    /// Fails every waiting query (callbacks run outside the lock).
    fn fail_all(&self) {
        let drained: Vec<Waiter> = self.lock().by_id.drain().map(|(_, w)| w).collect();
        for w in drained {
            w.fail(Outcome::Failed);
        }
    }

    /// Times out the detached queries whose deadline passed.
    fn sweep(&self, now: Instant) {
        let expired: Vec<Waiter> = {
            let mut w = self.lock();
            let ids: Vec<u16> = w
                .by_id
                .iter()
                .filter(
                    |(_, q)| matches!(q.reply, Reply::Detached { deadline, .. } if deadline <= now),
                )
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| w.by_id.remove(id)).collect()
        };
        for w in expired {
            w.fail(Outcome::Timeout);
        }
    }

    /// Receives answers and hands each to the query waiting on its ID; on the way out, fails
    /// whatever still waits (see `closed`).
    async fn read(self: Arc<Self>, counters: Arc<Counters>) {
        self.clone().read_until_done(counters).await;
        self.closed.store(true, Ordering::SeqCst);
        self.fail_all();
    }

    async fn read_until_done(self: Arc<Self>, counters: Arc<Counters>) {
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.done() {
                return;
            }
            let n = tokio::select! {
                r = self.socket.recv(&mut buf) => r,
                () = self.wake.notified() => continue,
                _ = sweep.tick() => {
                    self.sweep(Instant::now());
                    continue;
                }
            };
            let n = match n {
                Ok(n) => n,
                // The server's port is closed (ICMP): fail the waiting queries at once rather
                // than at their timeout, and keep the socket for the next ones.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.fail_all();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "upstream DNS socket failed; replacing it");
                    self.retired.store(true, Ordering::Relaxed);
                    return;
                }
            };
            let data = buf.get(..n).unwrap_or_default();
            let Ok(mut answer) = wire::parse_answer(data) else {
                Counters::inc(&counters.malformed_answers);
                continue;
            };
            // The answer to a waiting query: a response under its ID repeating exactly its
            // question. Anything else (late, duplicated, unsolicited, another question) is
            // dropped and the query keeps waiting.
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
            match waiter.map(|w| w.reply) {
                Some(Reply::Channel(tx)) => {
                    let _ = tx.send((data.to_vec(), answer));
                }
                Some(Reply::Detached {
                    client_id, done, ..
                }) => {
                    let mut data = data.to_vec();
                    if let Some(id) = data.get_mut(..2) {
                        id.copy_from_slice(&client_id);
                    }
                    answer.id = u16::from_be_bytes(client_id);
                    done(Outcome::Answer(data, answer));
                }
                None => Counters::inc(&counters.mismatched_answers),
            }
        }
    }
}

fn client_id(query: &[u8]) -> io::Result<[u8; 2]> {
    match query.get(..2) {
        Some(&[a, b]) => Ok([a, b]),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "no DNS header")),
    }
}

/// A query sent upstream, waiting for its answer. Dropping it (answer taken, timeout,
/// cancellation) frees its ID.
pub(crate) struct Exchange {
    socket: Arc<UpSocket>,
    upstream_id: u16,
    client_id: [u8; 2],
    rx: oneshot::Receiver<(Vec<u8>, DnsMessage)>,
}

impl Exchange {
    /// The answer (a response with this query's ID and question), with the client's ID
    /// restored; `None` if the socket failed (the query gets SERVFAIL).
    pub(crate) async fn recv(&mut self) -> Option<(Vec<u8>, DnsMessage)> {
        let (data, answer) = (&mut self.rx).await.ok()?;
        Some(with_client_id(data, answer, self.client_id))
    }
}

/// An upstream answer under the ID the client chose (the proxy sent its own upstream).
pub(crate) fn with_client_id(
    mut data: Vec<u8>,
    mut answer: DnsMessage,
    client_id: [u8; 2],
) -> (Vec<u8>, DnsMessage) {
    if let Some(id) = data.get_mut(..2) {
        id.copy_from_slice(&client_id);
    }
    answer.id = u16::from_be_bytes(client_id);
    (data, answer)
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Closed first: a waiter under this ID with an open channel is a later query's
        // (the ID was freed by the answer and reused) and stays.
        self.rx.close();
        let empty = {
            let mut w = self.socket.lock();
            let ours = w
                .by_id
                .get(&self.upstream_id)
                .is_some_and(|q| matches!(&q.reply, Reply::Channel(tx) if tx.is_closed()));
            if ours {
                w.by_id.remove(&self.upstream_id);
            }
            w.by_id.is_empty()
        };
        if empty && self.socket.retired.load(Ordering::Relaxed) {
            self.socket.wake.notify_one();
        }
    }
}

struct Server {
    slots: Vec<Option<Arc<UpSocket>>>,
    last_used: u64,
}

/// The upstream sockets of every server the proxy forwards to.
pub(crate) struct UpstreamPool {
    mark: Option<u32>,
    sockets_per_server: usize,
    /// Queries per socket before it is replaced ([`MAX_QUERIES_PER_SOCKET`]).
    max_uses: u32,
    servers: Mutex<HashMap<SocketAddr, Server>>,
    counters: Arc<Counters>,
    /// Spreads queries over a server's sockets.
    next: AtomicUsize,
    /// Orders servers by last use.
    clock: AtomicU64,
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        // Let the readers end once their queries have.
        let servers = self.servers.get_mut().unwrap_or_else(|p| p.into_inner());
        for s in servers.values().flat_map(|s| s.slots.iter().flatten()) {
            s.retire();
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(
        sockets_per_server: usize,
        mark: Option<u32>,
        counters: Arc<Counters>,
    ) -> Self {
        UpstreamPool {
            mark,
            sockets_per_server: sockets_per_server.max(1),
            max_uses: MAX_QUERIES_PER_SOCKET,
            servers: Mutex::new(HashMap::new()),
            counters,
            next: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
        }
    }

    /// Sends `query` (asking `question`) to `server` under a fresh ID (the client's ID is
    /// restored in the bytes before returning) and registers for its answer. Must be called
    /// inside a tokio runtime.
    pub(crate) async fn send(
        &self,
        server: SocketAddr,
        query: &mut [u8],
        question: &Question,
    ) -> io::Result<Exchange> {
        let client_id = client_id(query)?;
        let (tx, rx) = oneshot::channel();
        let (socket, upstream_id) = self.register(server, question.clone(), Reply::Channel(tx))?;
        // From here on, dropping the exchange frees the ID.
        let exchange = Exchange {
            socket: socket.clone(),
            upstream_id,
            client_id,
            rx,
        };
        if let Some(id) = query.get_mut(..2) {
            id.copy_from_slice(&upstream_id.to_be_bytes());
        }
        let sent = socket.socket.send(query).await;
        if let Some(id) = query.get_mut(..2) {
            id.copy_from_slice(&client_id);
        }
        sent?;
        Ok(exchange)
    }

    /// Sends `query` (asking `question`; its ID is overwritten) to `server` and leaves `done`
    /// to be called exactly once: by the socket's reader with the answer (client ID
    /// restored), by its sweep with [`Outcome::Timeout`] after `deadline`, or with
    /// [`Outcome::Failed`] (possibly before this returns) if sending or the socket fails.
    pub(crate) async fn send_detached(
        &self,
        server: SocketAddr,
        query: &mut [u8],
        question: Question,
        deadline: Instant,
        done: Done,
    ) {
        let client_id = match client_id(query) {
            Ok(id) => id,
            Err(_) => return done(Outcome::Failed),
        };
        let reply = Reply::Detached {
            client_id,
            deadline,
            done,
        };
        // `register` hands the reply back when it cannot take it.
        let (socket, upstream_id) = match self.register_or_return(server, question, reply) {
            Ok(x) => x,
            Err(reply) => {
                if let Reply::Detached { done, .. } = reply {
                    done(Outcome::Failed);
                }
                return;
            }
        };
        if let Some(id) = query.get_mut(..2) {
            id.copy_from_slice(&upstream_id.to_be_bytes());
        }
        if socket.socket.send(query).await.is_err() {
            // Unless the reader or the sweep got to it first.
            let w = socket.lock().by_id.remove(&upstream_id);
            if let Some(w) = w {
                w.fail(Outcome::Failed);
            }
        }
    }

    fn register(
        &self,
        server: SocketAddr,
        question: Question,
        reply: Reply,
    ) -> io::Result<(Arc<UpSocket>, u16)> {
        self.register_or_return(server, question, reply)
            .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "no upstream DNS slot"))
    }

    /// Registers `reply` under a free random ID of one of `server`'s sockets; on failure
    /// hands `reply` back.
    fn register_or_return(
        &self,
        server: SocketAddr,
        question: Question,
        reply: Reply,
    ) -> Result<(Arc<UpSocket>, u16), Reply> {
        let Ok(socket) = self.socket(server) else {
            return Err(reply);
        };
        let mut w = socket.lock();
        if w.by_id.len() >= MAX_WAITERS_PER_SOCKET {
            return Err(reply);
        }
        let mut free = None;
        for _ in 0..ID_DRAWS {
            let Ok(id) = w.ids.next() else {
                break;
            };
            if !w.by_id.contains_key(&id) {
                free = Some(id);
                break;
            }
        }
        let Some(id) = free else {
            return Err(reply);
        };
        // Checked under the lock the reader's final drain takes: either the drain sees this
        // waiter or this sees the reader gone.
        if socket.closed.load(Ordering::SeqCst) {
            return Err(reply);
        }
        w.by_id.insert(id, Waiter { question, reply });
        drop(w);
        Ok((socket, id))
    }

    /// A socket for `server`: the next slot's, replacing it if missing, failed or used up.
    fn socket(&self, server: SocketAddr) -> io::Result<Arc<UpSocket>> {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.sockets_per_server;
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if !servers.contains_key(&server) && servers.len() >= MAX_SERVERS {
            let oldest = servers
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(a, _)| *a);
            if let Some(s) = oldest.and_then(|a| servers.remove(&a)) {
                s.slots.iter().flatten().for_each(|s| s.retire());
            }
        }
        let entry = servers.entry(server).or_insert_with(|| Server {
            slots: vec![None; self.sockets_per_server],
            last_used: now,
        });
        entry.last_used = now;
        let Some(cell) = entry.slots.get_mut(slot) else {
            return Err(io::Error::other("upstream socket slot out of range"));
        };
        if let Some(s) = cell {
            if !s.retired.load(Ordering::Relaxed)
                && s.uses.fetch_add(1, Ordering::Relaxed) < self.max_uses
            {
                return Ok(s.clone());
            }
            s.retire();
        }
        let fresh = Arc::new(UpSocket {
            socket: self.connect(server)?,
            waiters: Mutex::new(Waiters {
                by_id: HashMap::new(),
                ids: IdSource::new(),
            }),
            uses: AtomicU32::new(1),
            retired: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        tokio::spawn(fresh.clone().read(self.counters.clone()));
        *cell = Some(fresh.clone());
        Ok(fresh)
    }

    fn connect(&self, server: SocketAddr) -> io::Result<UdpSocket> {
        let bind: SocketAddr = if server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let s = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if let Some(mark) = self.mark {
            s.set_mark(mark)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&bind.into())?;
        // Connected: the kernel drops datagrams from anyone but the server.
        s.connect(&server.into())?;
        UdpSocket::from_std(s.into())
    }

    /// Sockets currently held for `server` (tests).
    #[cfg(test)]
    fn sockets(&self, server: SocketAddr) -> usize {
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        servers
            .get(&server)
            .map(|s| s.slots.iter().flatten().count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wire::{build_query, parse_message};

    const WAIT: Duration = Duration::from_secs(3);

    /// How the fake server treats each query.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Echoes it back as a response.
        Echo,
        /// Never answers.
        Silent,
        /// Holds every query until `n` arrived, then answers them in reverse order.
        ReverseAfter(usize),
    }

    async fn server(b: Behaviour) -> (SocketAddr, Arc<UdpSocket>) {
        let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let addr = s.local_addr().expect("addr");
        let sock = s.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            let mut held = Vec::new();
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let mut r = buf[..n].to_vec();
                r[2] |= 0x80;
                match b {
                    Behaviour::Echo => {
                        let _ = sock.send_to(&r, from).await;
                    }
                    Behaviour::Silent => {}
                    Behaviour::ReverseAfter(k) => {
                        held.push((r, from));
                        if held.len() == k {
                            for (r, from) in held.drain(..).rev() {
                                let _ = sock.send_to(&r, from).await;
                            }
                        }
                    }
                }
            }
        });
        (addr, s)
    }

    async fn ask(p: &UpstreamPool, up: SocketAddr, q: &mut [u8]) -> io::Result<Exchange> {
        let question = parse_message(q).expect("query").questions[0].clone();
        p.send(up, q, &question).await
    }

    fn pool(sockets: usize) -> (UpstreamPool, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        (UpstreamPool::new(sockets, None, c.clone()), c)
    }

    fn waiting(p: &UpstreamPool) -> usize {
        let servers = p.servers.lock().expect("lock");
        servers
            .values()
            .flat_map(|s| s.slots.iter().flatten())
            .map(|s| s.lock().by_id.len())
            .sum()
    }

    #[tokio::test]
    async fn answer_carries_the_client_id_and_the_query_is_unchanged() {
        let (up, _s) = server(Behaviour::Echo).await;
        let (p, _) = pool(2);
        let q = build_query(0xabcd, "a.example.", 1).expect("query");
        let mut sent = q.clone();
        let mut ex = ask(&p, up, &mut sent).await.expect("send");
        assert_eq!(sent, q, "the caller's bytes are restored");
        let (a, m) = tokio::time::timeout(WAIT, ex.recv())
            .await
            .expect("in time")
            .expect("answer");
        assert_eq!(parse_message(&a).expect("parses"), m);
        assert_eq!(m.id, 0xabcd);
        assert!(m.is_response);
        drop(ex);
        assert_eq!(waiting(&p), 0);
    }

    /// Many queries with the same client ID at once, answered out of order: each gets its own
    /// answer (the question tells them apart).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn colliding_client_ids_are_told_apart() {
        const N: usize = 200;
        let (up, _s) = server(Behaviour::ReverseAfter(N)).await;
        let (p, _) = pool(3);
        let p = Arc::new(p);
        let mut tasks = Vec::new();
        for i in 0..N {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("q{i}.example.");
                let mut q = build_query(7, &name, 1).expect("query");
                let mut ex = ask(&p, up, &mut q).await.expect("send");
                let (a, m) = tokio::time::timeout(WAIT, ex.recv())
                    .await
                    .expect("in time")
                    .expect("answer");
                assert_eq!(&a[..2], &[0, 7]);
                assert_eq!(m.id, 7);
                assert_eq!(m.questions[0].name, name);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(waiting(&p), 0);
        assert!(p.sockets(up) <= 3);
    }

    /// A lost answer leaves the query to its timeout; the ID is freed; the answer arriving
    /// late afterwards is dropped and counted, and the socket keeps working.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_then_late_answer() {
        let (up, srv) = server(Behaviour::Silent).await;
        let (p, c) = pool(1);
        let mut q = build_query(1, "late.example.", 1).expect("query");
        let mut ex = ask(&p, up, &mut q).await.expect("send");
        assert!(
            tokio::time::timeout(Duration::from_millis(100), ex.recv())
                .await
                .is_err()
        );
        assert_eq!(waiting(&p), 1);
        let upstream_id = ex.upstream_id;
        drop(ex);
        assert_eq!(waiting(&p), 0);
        // The late answer, to the proxy's socket.
        let mut late = q.clone();
        late[..2].copy_from_slice(&upstream_id.to_be_bytes());
        late[2] |= 0x80;
        let proxy_side = {
            let servers = p.servers.lock().expect("lock");
            let s = servers[&up].slots[0].clone().expect("socket");
            s.socket.local_addr().expect("addr")
        };
        srv.send_to(&late, proxy_side).await.expect("send late");
        // Garbage too: a 1-byte datagram and 40 bytes of noise.
        srv.send_to(&[0xff], proxy_side).await.expect("send");
        srv.send_to(&[0x5a; 40], proxy_side).await.expect("send");
        let deadline = tokio::time::Instant::now() + WAIT;
        while c.snapshot().mismatched_answers + c.snapshot().malformed_answers < 3 {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", c.snapshot());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(c.snapshot().mismatched_answers, 1);
        assert_eq!(c.snapshot().malformed_answers, 2);
        assert_eq!(p.sockets(up), 1);
    }

    /// Copies of an answer beyond the waiter's queue are dropped, never block the reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_of_copies_does_not_block() {
        let (up, srv) = server(Behaviour::Silent).await;
        let (p, _) = pool(1);
        let mut q = build_query(9, "flood.example.", 1).expect("query");
        let mut ex = ask(&p, up, &mut q).await.expect("send");
        let proxy_side = {
            let servers = p.servers.lock().expect("lock");
            let s = servers[&up].slots[0].clone().expect("socket");
            s.socket.local_addr().expect("addr")
        };
        let mut a = q.clone();
        a[..2].copy_from_slice(&ex.upstream_id.to_be_bytes());
        a[2] |= 0x80;
        for _ in 0..50 {
            srv.send_to(&a, proxy_side).await.expect("send");
        }
        let (got, _) = tokio::time::timeout(WAIT, ex.recv())
            .await
            .expect("in time")
            .expect("answer");
        assert_eq!(&got[..2], &[0, 9]);
        drop(ex);
        // The reader still serves new queries.
        let (up2, _s2) = server(Behaviour::Echo).await;
        let mut q = build_query(10, "next.example.", 1).expect("query");
        let mut ex = ask(&p, up2, &mut q).await.expect("send");
        assert!(tokio::time::timeout(WAIT, ex.recv()).await.is_ok());
    }

    /// Sockets are replaced after their quota of queries; the retired one's reader ends when
    /// its last query does; the servers table is bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_rotate_and_servers_are_bounded() {
        let (up, _s) = server(Behaviour::Echo).await;
        let (mut p, _) = pool(1);
        p.max_uses = 3;
        let mut ports = std::collections::HashSet::new();
        for i in 0..9u16 {
            let mut q = build_query(i, "rot.example.", 1).expect("query");
            let mut ex = ask(&p, up, &mut q).await.expect("send");
            assert!(tokio::time::timeout(WAIT, ex.recv()).await.is_ok());
            let servers = p.servers.lock().expect("lock");
            let s = servers[&up].slots[0].clone().expect("socket");
            ports.insert(s.socket.local_addr().expect("addr").port());
        }
        assert_eq!(ports.len(), 3, "a fresh source port every 3 queries");
        for _ in 0..MAX_SERVERS + 5 {
            let (other, _s) = server(Behaviour::Silent).await;
            let mut q = build_query(1, "x.example.", 1).expect("query");
            drop(ask(&p, other, &mut q).await.expect("send"));
        }
        assert!(p.servers.lock().expect("lock").len() <= MAX_SERVERS);
    }

    /// A detached query's callback runs once: with the answer (client ID restored), or with
    /// a timeout from the sweep when the server is silent; the ID is freed either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detached_queries_get_their_answer_or_time_out() {
        let (echo, _s) = server(Behaviour::Echo).await;
        let (silent, _s2) = server(Behaviour::Silent).await;
        let (p, _) = pool(1);
        for (up, want_answer) in [(echo, true), (silent, false)] {
            let mut q = build_query(0x0102, "d.example.", 1).expect("query");
            let question = parse_message(&q).expect("query").questions[0].clone();
            let (tx, rx) = oneshot::channel();
            let deadline = Instant::now() + Duration::from_millis(100);
            let done: Done = Box::new(move |o| {
                let _ = tx.send(match o {
                    Outcome::Answer(a, m) => Some((a, m)),
                    Outcome::Timeout => None,
                    Outcome::Failed => panic!("failed"),
                });
            });
            p.send_detached(up, &mut q, question, deadline, done).await;
            let got = tokio::time::timeout(WAIT, rx)
                .await
                .expect("called in time")
                .expect("called");
            match got {
                Some((a, m)) => {
                    assert!(want_answer);
                    assert_eq!(&a[..2], &[1, 2]);
                    assert_eq!(m.id, 0x0102);
                }
                None => assert!(!want_answer, "timed out"),
            }
            assert_eq!(waiting(&p), 0);
        }
    }

    #[tokio::test]
    async fn closed_port_fails_fast() {
        let free = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let up = free.local_addr().expect("addr");
        drop(free);
        let (p, _) = pool(1);
        let mut q = build_query(1, "closed.example.", 1).expect("query");
        match ask(&p, up, &mut q).await {
            // Refused on send: fine.
            Err(_) => {}
            Ok(mut ex) => {
                let r = tokio::time::timeout(WAIT, ex.recv())
                    .await
                    .expect("fails fast");
                assert!(r.is_none());
            }
        }
    }
}

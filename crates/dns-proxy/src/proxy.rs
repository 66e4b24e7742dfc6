//! The proxy: decide each query, forward the allowed ones to their original server, check
//! and learn from the answer, release it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weir_identity::Identity;
use weir_l7_proxy::{EndpointId, IdentityResolver, OriginalDestination};

use crate::cache::NameCache;
use crate::config::{DenyResponse, DnsProxyConfig};
use crate::learn::{DnsLearner, Learned, LearnedIp};
use crate::policy::{DnsDecision, DnsDenyReason, DnsPolicyStore, Transport};
use crate::record::{DnsRecord, DnsRecordKind, DnsSink, DnsVerdict};
use crate::stats::{Counters, DnsProxyStats};
use crate::tcp_upstream::TcpUpstreamPool;
use crate::udp::DnsUdpSocket;
use crate::upstream::{Outcome, UpstreamPool};
use crate::wire::{self, DnsMessage, MAX_MESSAGE_LEN, ParseError, rcode, resolve_chain, rtype};

/// Where a query came from and which server it was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryContext {
    /// The client.
    pub source: SocketAddr,
    /// The DNS server the client addressed (the original destination): allowed queries go
    /// there.
    pub server: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
}

/// The DNS proxy. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct DnsProxy {
    shared: Arc<Shared>,
}

struct Shared {
    config: DnsProxyConfig,
    policy: Arc<DnsPolicyStore>,
    identities: Arc<dyn IdentityResolver>,
    learner: Arc<dyn DnsLearner>,
    cache: Arc<NameCache>,
    sink: Arc<dyn DnsSink>,
    counters: Arc<Counters>,
    permits: Arc<Semaphore>,
    upstream: UpstreamPool,
    tcp_upstream: TcpUpstreamPool,
}

impl std::fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxy")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A query that was allowed and awaits forwarding.
struct Pending {
    ctx: QueryContext,
    raw: Vec<u8>,
    query: DnsMessage,
    /// The decoded query, when the quick reader could not read it.
    msg: Option<Message>,
    endpoint: EndpointId,
    server_identity: Identity,
    rule: Option<Arc<str>>,
    time: SystemTime,
    started: Instant,
    _permit: OwnedSemaphorePermit,
}

/// What to do with a query after the policy decision.
enum Step {
    /// Answer at once (or drop, for `None`).
    Reply(Option<Vec<u8>>),
    /// Forward upstream.
    Forward(Box<Pending>),
}

/// Why forwarding produced no answer.
enum UpstreamError {
    Timeout,
    Io,
}

impl DnsProxy {
    /// A proxy enforcing the snapshots published to `policy`, recording answers in `cache`
    /// after `learner` applied them, and reporting to `sink`.
    pub fn new(
        config: DnsProxyConfig,
        policy: Arc<DnsPolicyStore>,
        identities: Arc<dyn IdentityResolver>,
        learner: Arc<dyn DnsLearner>,
        cache: Arc<NameCache>,
        sink: Arc<dyn DnsSink>,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        DnsProxy {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(config.max_outstanding.max(1))),
                upstream: UpstreamPool::new(
                    config.upstream_sockets,
                    config.upstream_mark,
                    counters.clone(),
                ),
                tcp_upstream: TcpUpstreamPool::new(
                    config.upstream_mark,
                    config.tcp_idle_timeout,
                    counters.clone(),
                ),
                config,
                policy,
                identities,
                learner,
                cache,
                sink,
                counters,
            }),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> DnsProxyStats {
        self.shared.counters.snapshot()
    }

    /// The name cache the proxy records answers in.
    pub fn cache(&self) -> &Arc<NameCache> {
        &self.shared.cache
    }

    /// Handles one query end to end and returns the bytes to send back (`None`: send
    /// nothing). Transport-independent: the UDP and TCP servers use it, and so can tests.
    pub async fn handle(&self, ctx: QueryContext, query: &[u8]) -> Option<Vec<u8>> {
        match self.begin(ctx, query) {
            Step::Reply(r) => r,
            Step::Forward(p) => Some(self.finish(*p).await),
        }
    }

    /// Serves DNS over UDP on `socket` until receiving fails for good. Denied and malformed
    /// queries are answered inline; allowed ones are sent upstream inline too, and their
    /// answers are checked, learned from and released by the upstream socket's reader (a
    /// task is spawned only when that has to wait, e.g. for a slow learner).
    pub async fn serve_udp(&self, socket: DnsUdpSocket) -> io::Error {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let mut scratch = Vec::with_capacity(512);
        loop {
            let (n, source, server) = match socket.recv(&mut buf).await {
                Ok(x) => x,
                // ICMP errors from earlier replies surface here on some kernels; keep going.
                Err(e) if is_transient(&e) => continue,
                Err(e) => return e,
            };
            let ctx = QueryContext {
                source,
                server,
                transport: Transport::Udp,
            };
            let data = buf.get(..n).unwrap_or_default();
            match self.begin(ctx, data) {
                Step::Reply(None) => {}
                Step::Reply(Some(r)) => {
                    if let Err(e) = socket.reply(&r, source, server).await {
                        tracing::debug!(error = %e, %source, "DNS reply failed");
                    }
                }
                Step::Forward(p) => self.forward_udp(*p, &socket, &mut scratch).await,
            }
        }
    }

    /// Serves DNS over TCP on `listener` until accepting fails for good. Each connection's
    /// original destination comes from `destinations` (transparent, NAT or static, as for
    /// the HTTP proxy); queries on a connection are answered in order.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        destinations: Arc<dyn OriginalDestination>,
    ) -> io::Error {
        loop {
            let (stream, source) = match listener.accept().await {
                Ok(x) => x,
                Err(e) if is_transient(&e) => {
                    // Out of descriptors: give connections a moment to close.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(e) => return e,
            };
            let server = match destinations.original_destination(&stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, %source, "no original destination; closing");
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let ctx = QueryContext {
                    source,
                    server,
                    transport: Transport::Tcp,
                };
                if let Err(e) = this.serve_tcp_connection(stream, ctx).await {
                    tracing::debug!(error = %e, %source, "DNS TCP connection ended");
                }
            });
        }
    }

    /// Serves one TCP client connection (length-prefixed messages) until it closes or idles.
    pub async fn serve_tcp_connection(
        &self,
        mut stream: TcpStream,
        ctx: QueryContext,
    ) -> io::Result<()> {
        let idle = self.shared.config.tcp_idle_timeout;
        loop {
            let msg = match tokio::time::timeout(idle, read_framed(&mut stream)).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r?,
            };
            match self.handle(ctx, &msg).await {
                Some(reply) => write_framed(&mut stream, &reply).await?,
                // Nothing to say to a client that sends non-DNS: hang up.
                None => return Ok(()),
            }
        }
    }

    fn begin(&self, ctx: QueryContext, raw: &[u8]) -> Step {
        let sh = &self.shared;
        Counters::inc(&sh.counters.queries);
        let time = SystemTime::now();
        let started = Instant::now();
        let endpoint = sh.identities.local_endpoint(ctx.source.ip());
        let server_identity = sh.identities.identity(ctx.server.ip());
        let mut rec = DnsRecord {
            time,
            kind: DnsRecordKind::Query,
            transport: ctx.transport,
            endpoint,
            source: ctx.source,
            server: ctx.server,
            server_identity,
            id: wire::header_id(raw).unwrap_or(0),
            query: String::new(),
            qtypes: Vec::new(),
            rcode: None,
            ips: Vec::new(),
            cnames: Vec::new(),
            ttl: None,
            verdict: DnsVerdict::Malformed,
            rule: None,
            latency: Duration::ZERO,
        };
        // Never answer something that is itself an answer (no reflection loops), nor
        // something without a header to answer.
        if raw.len() < 12 || wire::header_is_response(raw) {
            Counters::inc(&sh.counters.dropped);
            return Step::Reply(None);
        }
        let parsed = match wire::quick_query(raw) {
            Some(q) => Ok((q, None)),
            None => wire::decode(raw).map(|(q, m)| (q, Some(m))),
        };
        let (query, msg) = match parsed {
            Ok(x) => x,
            Err(ParseError::TooShort(_)) => {
                Counters::inc(&sh.counters.dropped);
                return Step::Reply(None);
            }
            Err(_) => {
                Counters::inc(&sh.counters.malformed);
                return self.answer_now(rec, wire::header_only_reply(raw, rcode::FORMERR));
            }
        };
        rec.query = query
            .questions
            .first()
            .map(|q| q.name.clone())
            .unwrap_or_default();
        rec.qtypes = query
            .questions
            .iter()
            .map(|q| wire::qtype_name(q.qtype))
            .collect();
        if query.opcode != 0 {
            Counters::inc(&sh.counters.malformed);
            return self.answer_now(rec, wire::reply(msg.as_ref(), raw, rcode::NOTIMP));
        }
        let Some(question) = query
            .questions
            .first()
            .filter(|_| query.questions.len() == 1)
        else {
            Counters::inc(&sh.counters.malformed);
            return self.answer_now(rec, wire::reply(msg.as_ref(), raw, rcode::FORMERR));
        };
        let decision = match endpoint {
            _ if question.qclass != rtype::CLASS_IN => DnsDecision {
                denied: Some(DnsDenyReason::UnsupportedClass),
                rule: None,
                rule_text: None,
            },
            None => DnsDecision {
                denied: Some(DnsDenyReason::NoPolicy),
                rule: None,
                rule_text: None,
            },
            Some(ep) => sh.policy.load().decide(
                ep,
                server_identity,
                ctx.transport,
                ctx.server.port(),
                &question.name,
            ),
        };
        rec.rule = decision.rule_text.as_deref().map(str::to_owned);
        let (Some(ep), None) = (endpoint, decision.denied) else {
            let reason = decision.denied.unwrap_or(DnsDenyReason::NoPolicy);
            Counters::inc(&sh.counters.denied);
            rec.verdict = DnsVerdict::Denied(reason);
            let code = match sh.config.deny_response {
                DenyResponse::Refused => rcode::REFUSED,
                DenyResponse::NameError => rcode::NXDOMAIN,
            };
            return self.answer_now(rec, wire::reply(msg.as_ref(), raw, code));
        };
        let Ok(permit) = sh.permits.clone().try_acquire_owned() else {
            Counters::inc(&sh.counters.overloaded);
            rec.verdict = DnsVerdict::Error;
            return self.answer_now(rec, wire::reply(msg.as_ref(), raw, rcode::SERVFAIL));
        };
        rec.verdict = DnsVerdict::Forwarded;
        let rule = decision.rule_text;
        sh.sink.record(rec);
        Step::Forward(Box::new(Pending {
            ctx,
            raw: raw.to_vec(),
            query,
            msg,
            endpoint: ep,
            server_identity,
            rule,
            time,
            started,
            _permit: permit,
        }))
    }

    /// Records the query and the proxy's own answer to it.
    fn answer_now(&self, mut rec: DnsRecord, reply: Option<Vec<u8>>) -> Step {
        let sink = &self.shared.sink;
        sink.record(rec.clone());
        rec.kind = DnsRecordKind::Response;
        rec.rcode = reply
            .as_deref()
            .and_then(|r| r.get(3))
            .map(|b| u16::from(b & 0x0f));
        sink.record(rec);
        Step::Reply(reply)
    }

    /// Forwards an allowed UDP query; its answer is completed and sent to the client by the
    /// upstream socket's reader (see [`UpstreamPool::send_detached`]).
    async fn forward_udp(&self, p: Pending, socket: &Arc<DnsUdpSocket>, scratch: &mut Vec<u8>) {
        let sh = &self.shared;
        Counters::inc(&sh.counters.forwarded);
        let (source, server) = (p.ctx.source, p.ctx.server);
        let Some(question) = p.query.questions.first().cloned() else {
            let r = self.complete(p, Outcome::Failed).await;
            return reply_udp(socket, &r, (source, server)).await;
        };
        // The ID is rewritten on the copy that goes upstream; `p.raw` stays the client's.
        scratch.clear();
        scratch.extend_from_slice(&p.raw);
        let deadline = p.started + sh.config.upstream_timeout;
        let this = self.clone();
        let sock = socket.clone();
        let done = Box::new(move |outcome: Outcome| {
            run_inline(async move {
                let r = this.complete(p, outcome).await;
                reply_udp(&sock, &r, (source, server)).await;
            });
        });
        sh.upstream
            .send_detached(server, scratch, question, deadline, done)
            .await;
    }

    async fn finish(&self, mut p: Pending) -> Vec<u8> {
        Counters::inc(&self.shared.counters.forwarded);
        let exchanged = tokio::time::timeout(
            self.shared.config.upstream_timeout,
            self.exchange(p.ctx, &mut p.raw, &p.query),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout));
        let outcome = match exchanged {
            Ok((raw, answer)) => Outcome::Answer(raw, answer),
            Err(UpstreamError::Timeout) => Outcome::Timeout,
            Err(UpstreamError::Io) => Outcome::Failed,
        };
        self.complete(p, outcome).await
    }

    /// Checks, learns from and records the upstream outcome of a forwarded query; returns
    /// the bytes for the client.
    async fn complete(&self, p: Pending, outcome: Outcome) -> Vec<u8> {
        let sh = &self.shared;
        let mut rec = DnsRecord {
            time: p.time,
            kind: DnsRecordKind::Response,
            transport: p.ctx.transport,
            endpoint: Some(p.endpoint),
            source: p.ctx.source,
            server: p.ctx.server,
            server_identity: p.server_identity,
            id: p.query.id,
            query: p
                .query
                .questions
                .first()
                .map(|q| q.name.clone())
                .unwrap_or_default(),
            qtypes: p
                .query
                .questions
                .iter()
                .map(|q| wire::qtype_name(q.qtype))
                .collect(),
            rcode: None,
            ips: Vec::new(),
            cnames: Vec::new(),
            ttl: None,
            verdict: DnsVerdict::Forwarded,
            rule: p.rule.as_deref().map(str::to_owned),
            latency: Duration::ZERO,
        };
        let (raw_answer, answer) = match outcome {
            Outcome::Answer(raw, answer) => (raw, answer),
            Outcome::Timeout => {
                Counters::inc(&sh.counters.upstream_timeouts);
                return self.fail(rec, &p, rcode::SERVFAIL);
            }
            Outcome::Failed => {
                Counters::inc(&sh.counters.upstream_errors);
                return self.fail(rec, &p, rcode::SERVFAIL);
            }
        };
        rec.rcode = Some(answer.rcode);
        if answer.rcode == rcode::NOERROR {
            let res = resolve_chain(&rec.query, &answer.answers);
            rec.ips = res.ips.iter().map(|(ip, _)| *ip).collect();
            rec.ttl = res.ips.iter().map(|(_, t)| *t).min();
            rec.cnames = res.names.iter().skip(1).cloned().collect();
            if !res.ips.is_empty() {
                let now = SystemTime::now();
                let ips: Vec<LearnedIp> = res
                    .ips
                    .iter()
                    .map(|&(ip, ttl)| LearnedIp {
                        ip,
                        ttl: sh.cache.effective_ttl(ttl),
                    })
                    .collect();
                let selectors = sh
                    .policy
                    .load()
                    .fqdn_selectors()
                    .matching_any(res.names.iter().map(String::as_str));
                if !selectors.is_empty() {
                    let learned = Learned {
                        endpoint: p.endpoint,
                        name: rec.query.clone(),
                        aliases: rec.cnames.clone(),
                        ips: ips.clone(),
                        selectors,
                    };
                    let r =
                        tokio::time::timeout(sh.config.learn_timeout, sh.learner.learn(&learned))
                            .await;
                    match r {
                        Ok(Ok(())) => Counters::inc(&sh.counters.learned),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, name = %rec.query, "learning failed; SERVFAIL");
                            Counters::inc(&sh.counters.learn_failures);
                            return self.fail(rec, &p, rcode::SERVFAIL);
                        }
                        Err(_) => {
                            tracing::warn!(name = %rec.query, "learning timed out; SERVFAIL");
                            Counters::inc(&sh.counters.learn_failures);
                            return self.fail(rec, &p, rcode::SERVFAIL);
                        }
                    }
                }
                let pairs: Vec<_> = ips.iter().map(|l| (l.ip, l.ttl)).collect();
                for name in &res.names {
                    sh.cache.insert(p.endpoint, name, &pairs, now);
                }
            }
        }
        rec.latency = p.started.elapsed();
        sh.sink.record(rec);
        raw_answer
    }

    /// Answers the client with an error code of the proxy's own, recording it.
    fn fail(&self, mut rec: DnsRecord, p: &Pending, code: u16) -> Vec<u8> {
        rec.verdict = DnsVerdict::Error;
        rec.rcode = Some(code);
        rec.ips.clear();
        rec.ttl = None;
        rec.latency = p.started.elapsed();
        self.shared.sink.record(rec);
        wire::reply(p.msg.as_ref(), &p.raw, code).unwrap_or_default()
    }

    /// Sends the client's query to its server and waits for the answer to exactly that
    /// query, carrying the client's ID. Over UDP the ID is rewritten on the way (see
    /// [`UpstreamPool`]); `raw` is left as it was.
    async fn exchange(
        &self,
        ctx: QueryContext,
        raw: &mut [u8],
        query: &DnsMessage,
    ) -> Result<(Vec<u8>, DnsMessage), UpstreamError> {
        match ctx.transport {
            Transport::Udp => self.exchange_udp(ctx.server, raw, query).await,
            Transport::Tcp => self.exchange_tcp(ctx.server, raw, query).await,
        }
    }

    async fn exchange_udp(
        &self,
        server: SocketAddr,
        raw: &mut [u8],
        query: &DnsMessage,
    ) -> Result<(Vec<u8>, DnsMessage), UpstreamError> {
        let question = query.questions.first().ok_or(UpstreamError::Io)?;
        let mut exchange = self
            .shared
            .upstream
            .send(server, raw, question)
            .await
            .map_err(|_| UpstreamError::Io)?;
        // The pool checked ID, QR and question.
        exchange.recv().await.ok_or(UpstreamError::Io)
    }

    async fn exchange_tcp(
        &self,
        server: SocketAddr,
        raw: &[u8],
        query: &DnsMessage,
    ) -> Result<(Vec<u8>, DnsMessage), UpstreamError> {
        let question = query.questions.first().ok_or(UpstreamError::Io)?;
        let pool = &self.shared.tcp_upstream;
        // A reused connection the server closed just as the query went out fails it: once
        // more on a fresh connection.
        for fresh in [false, true] {
            let mut exchange = match pool.send(server, raw, question, fresh).await {
                Ok(x) => x,
                Err(_) if !fresh => continue,
                Err(_) => return Err(UpstreamError::Io),
            };
            // The pool checked ID, QR and question.
            if let Some(answer) = exchange.recv().await {
                return Ok(answer);
            }
            if !exchange.reused {
                break;
            }
        }
        Err(UpstreamError::Io)
    }
}

/// Sends an answer to a UDP client `(source, server)`.
async fn reply_udp(socket: &DnsUdpSocket, data: &[u8], (source, server): (SocketAddr, SocketAddr)) {
    if let Err(e) = socket.reply(data, source, server).await {
        tracing::debug!(error = %e, %source, "DNS reply failed");
    }
}

/// Runs `fut` on the caller's task as far as it goes without waiting (usually to the end:
/// the learner and the reply rarely block); only if it has to wait does it get a task of its
/// own. Saves a task spawn and a wake-up per answer. Must be called inside a tokio runtime.
fn run_inline(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    // Unconstrained: the calling task's cooperative budget must not make it wait for nothing.
    let mut fut = Box::pin(tokio::task::unconstrained(fut));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if fut.as_mut().poll(&mut cx).is_pending() {
        // Polled again on its task, with a real waker.
        tokio::spawn(fut);
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::EMFILE)
        || e.raw_os_error() == Some(libc::ENFILE)
}

/// Reads one length-prefixed DNS message.
async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = usize::from(stream.read_u16().await?);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one length-prefixed DNS message.
async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

//! Accepting and serving client connections.

use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weir_policy_model::Direction;

use crate::config::ProxyConfig;
use crate::context::{ConnectionContext, IdentityResolver, OriginalDestination, UpstreamMark};
use crate::io::{Activity, Tracked};
use crate::policy::PolicyStore;
use crate::record::FlowSink;
use crate::service::{ConnState, Shared, handle};

/// hyper's HTTP/1 header limit when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// The HTTP proxy. Cheap to share (`Arc`); one instance serves any number of listeners.
pub struct L7Proxy {
    shared: Arc<Shared>,
    destinations: Arc<dyn OriginalDestination>,
    identities: Arc<dyn IdentityResolver>,
    permits: Arc<Semaphore>,
    builder: auto::Builder<TokioExecutor>,
}

impl std::fmt::Debug for L7Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L7Proxy")
            .field("config", &self.shared.config)
            .field("free_connection_slots", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl L7Proxy {
    /// A proxy enforcing the snapshots published to `policy`, reporting to `sink`.
    pub fn new(
        config: ProxyConfig,
        policy: Arc<PolicyStore>,
        destinations: Arc<dyn OriginalDestination>,
        identities: Arc<dyn IdentityResolver>,
        sink: Arc<dyn FlowSink>,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .keep_alive(true);
        // hyper's default limit is 100 headers; setting it, even to 100, makes hyper fill a
        // header array for every request it parses, so it is only set when it differs.
        if config.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            builder.http1().max_headers(config.max_headers);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(config.max_concurrent_streams)
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        L7Proxy {
            permits: Arc::new(Semaphore::new(config.max_connections.max(1))),
            shared: Arc::new(Shared {
                config,
                policy,
                sink,
                upstream_mark: None,
                own_upstreams: Arc::default(),
            }),
            destinations,
            identities,
            builder,
        }
    }

    /// Marks every upstream connection with what `mark` says (see [`UpstreamMark`]).
    pub fn with_upstream_mark(mut self, mark: Arc<dyn UpstreamMark>) -> Self {
        self.shared = Arc::new(Shared {
            config: self.shared.config.clone(),
            policy: self.shared.policy.clone(),
            sink: self.shared.sink.clone(),
            upstream_mark: Some(mark),
            own_upstreams: self.shared.own_upstreams.clone(),
        });
        self
    }

    /// Accepts connections on `listener` (whose traffic is in `direction` as seen from the
    /// local endpoints) until accepting fails for good; each connection is served on its own
    /// task. At most `max_connections` are served at once across all listeners.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, direction: Direction) -> io::Error {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return io::Error::other("connection semaphore closed");
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) if is_transient(&e) => {
                    // Out of descriptors or a connection reset before accept: back off, go on.
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return e,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let ctx = match ConnectionContext::resolve(
                    &stream,
                    direction,
                    this.destinations.as_ref(),
                    this.identities.as_ref(),
                ) {
                    Ok(mut ctx) => {
                        // Our own egress side forwarding for a client: judge the client.
                        if direction == Direction::Ingress
                            && let Some(client) = this.shared.own_upstreams.client_of(ctx.source)
                        {
                            ctx.remote_identity = client;
                        }
                        ctx
                    }
                    Err(e) => {
                        // Without a destination there is nothing safe to do: close.
                        tracing::debug!(error = %e, "cannot resolve connection");
                        return;
                    }
                };
                this.serve_connection_with_permit(stream, ctx, permit).await;
            });
        }
    }

    /// Serves one already-accepted connection with a known context until it closes. Counts
    /// against `max_connections` (waiting for a slot if all are taken).
    pub async fn serve_connection(&self, stream: TcpStream, ctx: ConnectionContext) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        self.serve_connection_with_permit(stream, ctx, permit).await;
    }

    /// Serves one client connection over any byte stream (for example an in-memory duplex
    /// in tests and fuzzing), with a known context, until it closes. Counts against
    /// `max_connections` like [`serve_connection`](Self::serve_connection).
    pub async fn serve_stream<S>(&self, stream: S, ctx: ConnectionContext)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        self.serve_io(stream, ctx, permit).await;
    }

    async fn serve_connection_with_permit(
        &self,
        stream: TcpStream,
        ctx: ConnectionContext,
        permit: OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        self.serve_io(stream, ctx, permit).await;
    }

    async fn serve_io<S>(&self, stream: S, ctx: ConnectionContext, _permit: OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let state = Arc::new(ConnState::new(ctx, self.shared.clone()));
        let svc_state = state.clone();
        let service = service_fn(move |req| handle(svc_state.clone(), req));
        let io = TokioIo::new(Tracked::new(stream, activity.clone()));
        let mut conn = pin!(self.builder.serve_connection_with_upgrades(io, service));
        let idle = self.shared.config.idle_timeout;
        let period = (idle / 4).max(Duration::from_millis(10));
        let mut tick = pin!(tokio::time::sleep(period));
        let mut armed = false;
        // The activity count at the last tick that saw it change, and when that was.
        let mut last = (activity.count(), Instant::now());
        // The connection is polled on every wake; the idle timer only when it has fired
        // (`is_elapsed` is one atomic load, where polling it re-registers the waker each time).
        let served = std::future::poll_fn(|cx| {
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            loop {
                if armed && !tick.is_elapsed() {
                    return Poll::Pending;
                }
                if armed {
                    let now = Instant::now();
                    let count = activity.count();
                    if count != last.0 || state.in_flight.load(Ordering::Relaxed) != 0 {
                        last = (count, now);
                    } else if now.saturating_duration_since(last.1) >= idle {
                        return Poll::Ready(None);
                    }
                    tick.as_mut().reset((now + period).into());
                }
                armed = true;
                // Registers this task's waker with the timer; an already due deadline loops.
                if tick.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        })
        .await;
        if let Some(res) = served {
            if let Err(e) = res {
                tracing::debug!(error = %e, "client connection");
            }
            return;
        }
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(idle, conn).await;
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

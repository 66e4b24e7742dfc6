//! The L7 proxy's client side on arbitrary bytes: the input is written as one client
//! connection (HTTP/1, or HTTP/2 when it starts with the preface) into
//! `L7Proxy::serve_stream` over an in-memory duplex stream, with a compiled policy and a real
//! upstream on loopback, and the client reads whatever comes back. Nothing may panic, and the
//! connection must end once the client has sent everything and closed its side.
#![no_main]

#[path = "l7_common.rs"]
mod l7_common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_l7_proxy::{
    ConnectionContext, L7Proxy, NullSink, PolicyStore, ProxyConfig, StaticDestination,
    StaticIdentities,
};
use weir_policy_model::Direction;

struct Env {
    rt: tokio::runtime::Runtime,
    proxy: Arc<L7Proxy>,
    ctx: ConnectionContext,
}

/// The upstream: reads the whole body, answers `200 ok`.
async fn upstream(req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn env() -> Option<Env> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let upstream_addr: SocketAddr = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = l.local_addr().ok()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(
                    auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), service_fn(upstream))
                        .into_owned(),
                );
            }
        });
        Some(addr)
    })?;
    let snapshot = l7_common::snapshot(upstream_addr.port())?;
    // Short timeouts: an input that stops mid-request must not stall the fuzzer.
    let config = ProxyConfig {
        header_read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(200),
        max_denied_body_drain: 4096,
        ..ProxyConfig::default()
    };
    let proxy = Arc::new(L7Proxy::new(
        config,
        Arc::new(PolicyStore::new(snapshot)),
        Arc::new(StaticDestination::always(upstream_addr)),
        Arc::new(StaticIdentities::default()),
        Arc::new(NullSink),
    ));
    let ctx = ConnectionContext {
        endpoint: Some(l7_common::ENDPOINT),
        direction: Direction::Ingress,
        remote_identity: l7_common::FRONTEND,
        local_identity: l7_common::API,
        original_destination: upstream_addr,
        source: SocketAddr::from(([127, 0, 0, 1], 40000)),
    };
    Some(Env { rt, proxy, ctx })
}

thread_local! {
    static ENV: Option<Env> = env();
}

fuzz_target!(|data: &[u8]| {
    ENV.with(|env| {
        let Some(env) = env else {
            panic!("fuzz environment must start");
        };
        env.rt.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let proxy = env.proxy.clone();
            let ctx = env.ctx.clone();
            let served = tokio::spawn(async move { proxy.serve_stream(server, ctx).await });
            let (mut rd, mut wr) = tokio::io::split(client);
            let write = async {
                let _ = wr.write_all(data).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
            };
            let done = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(write, read);
                let _ = served.await;
            })
            .await;
            assert!(done.is_ok(), "the connection did not end");
        });
    });
});

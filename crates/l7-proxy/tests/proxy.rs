//! The proxy on loopback, with a real upstream and real clients.

mod common;

use std::time::Duration;

use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_l7_proxy::{ACCESS_DENIED_BODY, DenyReason, PolicySnapshot, ProxyConfig, RecordVerdict};

const RULE: &str = "production/api-l7-policy ingress[0]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_api_l7_policy_on_one_keep_alive_connection() {
    let mut h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut c = h1_client(h.proxy_addr).await;
    let cases = [
        (req("GET", "/api/products", ""), 200),
        (req("POST", "/api/orders", "{\"item\":1}"), 200),
        (req("GET", "/api/users/42", ""), 200),
        (req("GET", "/api/users/42/orders", ""), 403),
        (req("DELETE", "/api/users/42", ""), 403),
        (req("POST", "/api/products", "denied body"), 403),
        (req("GET", "/api/products", ""), 200),
    ];
    for (r, want) in cases {
        let what = format!("{} {}", r.method(), r.uri());
        c.ready().await.expect("client connection ready");
        let resp = c.send_request(r).await.expect(&what);
        let len = resp.headers().get("content-length").cloned();
        let (status, body) = read(resp).await;
        assert_eq!(status, want, "{what}: {body}");
        if want == 403 {
            assert_eq!(body, ACCESS_DENIED_BODY);
            assert_eq!(len.as_ref().map(|v| v.as_bytes()), Some(&b"15"[..]));
        } else {
            assert!(body.starts_with(&what), "{what}: upstream saw {body}");
        }
    }
    // Records: one per request, in order, with verdict and rule.
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(h.records.recv().await.unwrap());
    }
    let r = &got[0];
    assert_eq!(r.verdict, RecordVerdict::Forwarded);
    assert_eq!(r.rule.as_deref(), Some(RULE));
    assert_eq!(r.url, "/api/products");
    assert_eq!(r.host.as_deref(), Some("api-server:8080"));
    assert_eq!(r.status, 200);
    assert_eq!(r.remote_identity, FRONTEND);
    assert_eq!(r.endpoint, Some(ENDPOINT));
    assert_eq!(r.destination, h.upstream_addr);
    assert_eq!(
        got[3].verdict,
        RecordVerdict::Denied(DenyReason::NoRuleMatched)
    );
    assert_eq!(got[3].status, 403);
    assert_eq!(got[4].method, "DELETE");
    assert_eq!(h.sink.dropped(), 0);
}

/// Pipelined requests with mixed verdicts: answers come back in order, the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_mixed_verdicts() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    let paths = [
        ("GET", "/api/products"),
        ("DELETE", "/api/products"),
        ("GET", "/api/users/1"),
        ("GET", "/api/users/x"),
        ("POST", "/api/orders"),
    ];
    let mut batch = String::new();
    for (m, p) in paths {
        batch.push_str(&format!(
            "{m} {p} HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n"
        ));
    }
    batch.push_str("GET /api/products HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    s.write_all(batch.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(
        statuses,
        ["200", "403", "200", "403", "200", "200"],
        "{out}"
    );
}

/// A 50 MB chunked upload streams through (the upstream counts every byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_body() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut c = h1_client(h.proxy_addr).await;
    const SIZE: usize = 50 * 1024 * 1024;
    let r = Request::post("/api/orders")
        .header("host", "api")
        .body(Repeat { left: SIZE })
        .unwrap();
    let (status, body) = read(c.send_request(r).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("POST /api/orders {SIZE}"));
}

/// `Expect: 100-continue`: the proxy asks for the body only once the request is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    s.write_all(
        b"POST /api/orders HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    s.write_all(b"hello").await.unwrap();
    let mut all = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        all.extend_from_slice(&buf[..n]);
        if n == 0 || String::from_utf8_lossy(&all).contains("POST /api/orders 5") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// HTTP/2 prior knowledge, 200 concurrent streams on one connection, half denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_many_concurrent_streams() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let c = h2_client(h.proxy_addr).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (path, want) = if i % 2 == 0 {
                (format!("http://api-server:8080/api/users/{i}"), 200)
            } else {
                (format!("http://api-server:8080/api/users/{i}/orders"), 403)
            };
            let resp = c.send_request(get(&path)).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let (status, _) = read(resp).await;
            assert_eq!(status, want, "{path}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn grpc_call(method: &str) -> Request<http_body_util::Full<bytes::Bytes>> {
    Request::post(format!(
        "http://api-server:8080/mypackage.MyService/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])))
    .unwrap()
}

/// gRPC over h2c: allowed calls reach the server (trailers pass through), a denied call gets
/// trailers-only `grpc-status: 7`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_allowed_and_denied() {
    use http_body_util::BodyExt;
    let mut h = start(snapshot(GRPC_L7_POLICY), ProxyConfig::default()).await;
    let mut c = h2_client(h.proxy_addr).await;
    for m in ["GetItems", "CreateItem"] {
        let resp = c.send_request(grpc_call(m)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0", "{m}");
        assert_eq!(collected.to_bytes().len(), 7);
    }
    let resp = c.send_request(grpc_call("DeleteItem")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "7");
    assert_eq!(resp.headers()["grpc-message"], "Access denied");
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    assert!(collected.to_bytes().is_empty());
    let mut last = None;
    for _ in 0..3 {
        last = h.records.recv().await;
    }
    let last = last.unwrap();
    assert_eq!(last.grpc_status, Some(7));
    assert_eq!(last.version, http::Version::HTTP_2);
    assert_eq!(last.url, "/mypackage.MyService/DeleteItem");
}

/// Malformed requests get a clean 400 and the connection closes; the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api/products HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        b"GET /a b c HTTP/1.1\r\n\r\n",
        b"GET /api/products HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"\x00\x01\x02\xff\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("connection closes")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{garbage:?} -> {text}");
    }
    let mut c = h1_client(h.proxy_addr).await;
    let (status, _) = read(c.send_request(get("/api/products")).await.unwrap()).await;
    assert_eq!(status, 200);
}

/// Paths are matched as sent; method case matters; duplicate headers are joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_method_and_header_tricks() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    let cases = [
        ("GET", "/api/%70roducts", "403"),
        ("GET", "/api/products/../products", "403"),
        ("GET", "/api/users/42/../../admin", "403"),
        ("GET", "//api/products", "403"),
        ("GET", "/api/products?x=1", "403"),
        ("get", "/api/products", "403"),
        ("Get", "/api/products", "403"),
        ("GET", "/api/users/%34%32", "403"),
        ("GET", "/api/products", "200"),
    ];
    for (m, p, want) in cases {
        s.write_all(format!("{m} {p} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert_eq!(&text[9..12], want, "{m} {p}: {text}");
    }
}

const HEADER_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: header-policy
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: api-server
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
      toPorts:
        - ports:
            - port: '8080'
              protocol: TCP
          rules:
            http:
              - method: GET
                path: '/api/products'
                headers: ['X-Token: a']
"#;

/// A published snapshot decides the next request on an already open keep-alive connection;
/// an empty snapshot fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_swap_applies_to_open_connections() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut c = h1_client(h.proxy_addr).await;
    async fn send(
        c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
        tokens: &[&str],
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        let mut r = get("/api/products");
        for t in tokens {
            r.headers_mut().append("x-token", t.parse().unwrap());
        }
        // The client connection turns idle a moment after the previous body ends.
        c.ready().await?;
        c.send_request(r).await
    }
    assert_eq!(read(send(&mut c, &[]).await.unwrap()).await.0, 200);

    h.store.publish(snapshot(HEADER_POLICY));
    assert_eq!(read(send(&mut c, &[]).await.unwrap()).await.0, 403);
    let resp = send(&mut c, &["a"]).await.unwrap();
    assert_eq!(resp.headers()["x-saw-token"], "a");
    assert_eq!(read(resp).await.0, 200);
    // Duplicates are joined ("a,b" is not "a"); case of the name does not matter.
    assert_eq!(read(send(&mut c, &["a", "b"]).await.unwrap()).await.0, 403);
    assert_eq!(read(send(&mut c, &["A"]).await.unwrap()).await.0, 403);

    h.store.publish(PolicySnapshot::empty());
    assert_eq!(read(send(&mut c, &["a"]).await.unwrap()).await.0, 403);
    h.store
        .update(|s| s.with_endpoint(ENDPOINT, std::sync::Arc::new(compile(API_L7_POLICY))));
    assert_eq!(read(send(&mut c, &[]).await.unwrap()).await.0, 200);
}

/// No policy at all, or a connection that is not to a local endpoint: every request is 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_without_policy() {
    let mut h = start(PolicySnapshot::empty(), ProxyConfig::default()).await;
    let mut c = h1_client(h.proxy_addr).await;
    let (status, body) = read(c.send_request(get("/api/products")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (403, ACCESS_DENIED_BODY));
    let r = h.records.recv().await.unwrap();
    assert_eq!(r.verdict, RecordVerdict::Denied(DenyReason::NoPolicy));

    // A policy for the endpoint, but on another port: still denied.
    let other_port = API_L7_POLICY.replace("'8080'", "'9090'");
    h.store.publish(snapshot(&other_port));
    c.ready().await.unwrap();
    let (status, _) = read(c.send_request(get("/api/products")).await.unwrap()).await;
    assert_eq!(status, 403);
}

/// An idle keep-alive connection is closed after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let h = start(snapshot(API_L7_POLICY), config).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the proxy")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// Over-long or too many headers are refused, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits() {
    let config = ProxyConfig {
        max_headers: 10,
        ..ProxyConfig::default()
    };
    let h = start(snapshot(API_L7_POLICY), config).await;
    let mut many = String::from("GET /api/products HTTP/1.1\r\nHost: a\r\n");
    for i in 0..20 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let huge = format!(
        "GET /api/products HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "v".repeat(200 * 1024)
    );
    for (name, raw) in [("many", many), ("huge", huge)] {
        let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
        let _ = s.write_all(raw.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("connection closes");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
            "{name}: {text}"
        );
    }
}

/// An allowed upgrade becomes a byte tunnel to the upstream; a denied one gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_when_allowed() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    s.write_all(b"GET /admin HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");

    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    s.write_all(
        b"GET /api/products HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut got = vec![0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping over the tunnel");
}

/// Reads from `s` until `want` has arrived (or fails after 5 s), returning everything read.
async fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&all).contains(want) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waiting for {want:?}, got {:?}",
                    String::from_utf8_lossy(&all)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {want:?}: {}",
            String::from_utf8_lossy(&all)
        );
        all.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// A body streams through both ways as it is sent: the first chunk of an unfinished upload
/// reaches the upstream, and the upstream's echo of it reaches the client, before the client
/// sends the rest. A proxy that buffered whole bodies would wait for the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_without_being_buffered_whole() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    s.write_all(
        b"POST /api/orders HTTP/1.1\r\nHost: api\r\nX-Echo: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
          b\r\nfirst-chunk\r\n",
    )
    .await
    .unwrap();
    let got = read_until(&mut s, "first-chunk").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    s.write_all(b"c\r\nsecond-chunk\r\n0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "second-chunk").await;
}

/// In a pipeline, a denied request's body is skipped, not parsed as the next request (a body
/// that looks like a request cannot smuggle one past the policy), and the requests after it
/// are decided on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_denied_bodies_are_skipped() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    let smuggled = "GET /admin HTTP/1.1\r\nHost: api\r\n\r\n";
    let batch = format!(
        "POST /api/products HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n{smuggled}\
         POST /api/orders HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
         GET /api/users/7 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        smuggled.len()
    );
    s.write_all(batch.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["403", "200", "200"], "{out}");
    assert!(out.contains("POST /api/orders 3"), "{out}");
    assert!(out.contains("GET /api/users/7 0"), "{out}");
    assert!(!out.contains("/admin"), "{out}");
}

/// Two `Host` headers make the request ambiguous (the policy could check one and the backend
/// use the other): 400, as RFC 9112 requires, and nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_host_headers_get_400() {
    let h = start(snapshot(API_L7_POLICY), ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    s.write_all(b"GET /api/products HTTP/1.1\r\nHost: api\r\nHost: evil\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("connection closes")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

//! Hostile clients and upstreams: raw malformed queries, and a fake upstream that answers
//! with the wrong ID, the wrong question, or extra records for other names.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::net::UdpSocket;
use weir_dns_proxy::wire::{build_query, parse_message, rcode};
use weir_dns_proxy::{CacheConfig, DnsProxyConfig};

const A: u16 = 1;
const SHORT: Duration = Duration::from_millis(400);

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.trim_end_matches('.').split('.') {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// An answer to `query` with the given ID and A records (`None` name = the question's name,
/// via a compression pointer).
fn answer(query: &[u8], id: u16, records: &[(Option<&str>, [u8; 4])]) -> Vec<u8> {
    let mut out = query.to_vec();
    out[0..2].copy_from_slice(&id.to_be_bytes());
    out[2] |= 0x80;
    out[3] = 0x80;
    out[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
    for (name, ip) in records {
        match name {
            None => out.extend_from_slice(&[0xc0, 12]),
            Some(n) => out.extend_from_slice(&encode_name(n)),
        }
        out.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(ip);
    }
    out
}

#[derive(Clone, Copy)]
enum Fake {
    /// Answers with ID+1 only.
    WrongId,
    /// Answers a different question first, then correctly with extra records for other
    /// names.
    WrongQuestionThenExtras,
    /// Sends garbage, then a response that is not a response (QR clear), then nothing.
    Garbage,
}

async fn fake_upstream(kind: Fake) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let q = buf[..n].to_vec();
            let id = u16::from_be_bytes([q[0], q[1]]);
            let replies: Vec<Vec<u8>> = match kind {
                Fake::WrongId => vec![answer(&q, id.wrapping_add(1), &[(None, [203, 0, 113, 99])])],
                Fake::WrongQuestionThenExtras => {
                    let other = build_query(id, "api.github.com.", A).expect("query");
                    vec![
                        answer(&other, id, &[(None, [203, 0, 113, 98])]),
                        answer(
                            &q,
                            id,
                            &[
                                (None, [203, 0, 113, 10]),
                                (Some("evil-site.com"), [198, 51, 100, 66]),
                                (Some("api.github.com"), [203, 0, 113, 97]),
                            ],
                        ),
                    ]
                }
                Fake::Garbage => {
                    let mut not_response = answer(&q, id, &[(None, [1, 2, 3, 4])]);
                    not_response[2] &= 0x7f;
                    vec![vec![0xde, 0xad, 0xbe, 0xef], q.clone(), not_response]
                }
            };
            for r in replies {
                let _ = s.send_to(&r, from).await;
            }
        }
    });
    addr
}

fn config() -> DnsProxyConfig {
    DnsProxyConfig {
        upstream_timeout: Duration::from_millis(300),
        ..Default::default()
    }
}

async fn harness(upstream: SocketAddr) -> Harness {
    start(
        upstream,
        snapshot(&seed_policy(upstream.port())),
        config(),
        CacheConfig::default(),
        RecordingLearner::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_id_is_dropped_then_servfail() {
    let up = fake_upstream(Fake::WrongId).await;
    let h = harness(up).await;
    let (m, _) = udp_query(h.udp, 0x4242, "api.stripe.com", A, Duration::from_secs(3))
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::SERVFAIL);
    assert_eq!(m.id, 0x4242);
    assert!(m.answers.is_empty());
    let st = h.proxy.stats();
    assert_eq!(st.mismatched_answers, 1);
    assert_eq!(st.upstream_timeouts, 1);
    assert!(h.learner.calls().is_empty());
    assert!(h.cache.entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_question_and_extra_records_teach_nothing() {
    let up = fake_upstream(Fake::WrongQuestionThenExtras).await;
    let h = harness(up).await;
    let (m, _) = udp_query(h.udp, 7, "api.stripe.com", A, Duration::from_secs(3))
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::NOERROR);
    assert_eq!(h.proxy.stats().mismatched_answers, 1);
    let calls = h.learner.calls();
    assert_eq!(calls.len(), 1);
    let learned: Vec<IpAddr> = calls[0].0.ips.iter().map(|l| l.ip).collect();
    assert_eq!(learned, vec![IpAddr::from([203, 0, 113, 10])]);
    assert!(!h.cache.contains_ip(IpAddr::from([198, 51, 100, 66])));
    assert!(!h.cache.contains_ip(IpAddr::from([203, 0, 113, 97])));
    assert!(!h.cache.contains_ip(IpAddr::from([203, 0, 113, 98])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_upstream_is_dropped() {
    let up = fake_upstream(Fake::Garbage).await;
    let h = harness(up).await;
    let (m, _) = udp_query(h.udp, 8, "api.stripe.com", A, Duration::from_secs(3))
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::SERVFAIL);
    let st = h.proxy.stats();
    assert_eq!(st.malformed_answers, 1);
    assert_eq!(st.mismatched_answers, 2);
    assert!(h.learner.calls().is_empty());
}

/// An upstream that loses queries for `lost*` names, answers `late*` names after the proxy's
/// timeout, precedes every answer with junk and a copy under a wrong ID, and answers the rest
/// in bursts out of order.
async fn flaky_upstream() -> SocketAddr {
    let s = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        let mut burst = Vec::new();
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let q = buf[..n].to_vec();
            let Ok(m) = parse_message(&q) else { continue };
            let name = m.questions[0].name.clone();
            let id = m.id;
            let a = answer(&q, id, &[(None, [203, 0, 113, 10])]);
            if name.starts_with("lost") {
                continue;
            }
            if name.starts_with("late") {
                let s = s.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    let _ = s.send_to(&a, from).await;
                });
                continue;
            }
            let _ = s.send_to(&[0xff, 0x00, 0x13], from).await;
            let _ = s
                .send_to(&answer(&q, id ^ 0x5555, &[(None, [6, 6, 6, 6])]), from)
                .await;
            burst.push((a, from));
            if burst.len() >= 4 {
                for (r, to) in burst.drain(..).rev() {
                    let _ = s.send_to(&r, to).await;
                }
            }
        }
    });
    addr
}

/// Many concurrent clients with the same query ID through one proxy, against an upstream that
/// loses, delays, duplicates and corrupts: every client gets its own answer or SERVFAIL, never
/// another client's; nothing is learned from junk; the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_upstream_sockets_survive_a_flaky_server() {
    let up = flaky_upstream().await;
    let h = start(
        up,
        snapshot(&seed_policy(up.port())),
        config(),
        CacheConfig::default(),
        RecordingLearner::default(),
    )
    .await;
    let udp = h.udp;
    let mut tasks = Vec::new();
    for i in 0..48u16 {
        tasks.push(tokio::spawn(async move {
            let kind = match i % 6 {
                0 => "lost",
                1 => "late",
                _ => "ok",
            };
            let name = format!("{kind}{i}.example.com.");
            let r = udp_query(udp, 0x0101, &name, A, Duration::from_secs(3)).await;
            (kind, name, r)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (kind, name, r) = t.await.expect("task");
        let (m, _) = r.unwrap_or_else(|| panic!("{name}: no reply"));
        assert_eq!(m.id, 0x0101, "{name}");
        assert_eq!(m.questions[0].name, name, "{name}: another client's answer");
        match kind {
            "ok" => {
                // 32 answered queries: bursts of 4 leave none behind.
                assert_eq!(m.rcode, rcode::NOERROR, "{name}");
                assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 10])], "{name}");
                ok += 1;
            }
            _ => assert_eq!(m.rcode, rcode::SERVFAIL, "{name}"),
        }
    }
    assert_eq!(ok, 32, "{ok} of 32 answered");
    // Late answers arrive after their queries timed out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = h.proxy.stats();
    assert!(st.mismatched_answers >= 32, "{st:?}");
    assert!(st.malformed_answers >= 32, "{st:?}");
    assert!(st.upstream_timeouts >= 16, "{st:?}");
    assert!(!h.cache.contains_ip(IpAddr::from([6, 6, 6, 6])));
    // Still serving.
    let (m, _) = udp_query(udp, 3, "ok-again.example.com", A, Duration::from_secs(3))
        .await
        .expect("answer");
    assert_eq!(m.questions[0].name, "ok-again.example.com.");
}

/// Malformed queries from clients: clear answers where a header exists, silence otherwise,
/// never a crash; the proxy keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries() {
    let up = fake_upstream(Fake::WrongQuestionThenExtras).await;
    let h = harness(up).await;
    let good = build_query(0x0102, "api.stripe.com.", A).expect("query");

    // Shorter than a header: dropped.
    assert!(udp_raw(h.udp, &good[..7], SHORT).await.is_none());
    // Empty datagram: dropped.
    assert!(udp_raw(h.udp, &[], SHORT).await.is_none());

    let expect = |bytes: Option<(Vec<u8>, std::time::Instant)>, code: u16, what: &str| {
        let (r, _) = bytes.unwrap_or_else(|| panic!("{what}: no reply"));
        let m = parse_message(&r).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.id, 0x0102, "{what}");
        assert!(m.is_response, "{what}");
        assert_eq!(m.rcode, code, "{what}");
    };

    // Truncated question: FORMERR.
    expect(
        udp_raw(h.udp, &good[..good.len() - 3], SHORT).await,
        rcode::FORMERR,
        "truncated",
    );
    // Compression-pointer loop in the question: FORMERR.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    expect(udp_raw(h.udp, &looped, SHORT).await, rcode::FORMERR, "loop");
    // Two questions: FORMERR.
    let mut two = good.clone();
    two[5] = 2;
    two.extend_from_slice(&good[12..]);
    expect(
        udp_raw(h.udp, &two, SHORT).await,
        rcode::FORMERR,
        "two questions",
    );
    // No question: FORMERR.
    let mut none = good[..12].to_vec();
    none[5] = 0;
    expect(
        udp_raw(h.udp, &none, SHORT).await,
        rcode::FORMERR,
        "no question",
    );
    // Opcode STATUS: NOTIMP.
    let mut status = good.clone();
    status[2] = (status[2] & 0x87) | (2 << 3);
    expect(
        udp_raw(h.udp, &status, SHORT).await,
        rcode::NOTIMP,
        "opcode",
    );
    // Class CHAOS: refused.
    let mut chaos = good.clone();
    let n = chaos.len();
    chaos[n - 1] = 3;
    expect(
        udp_raw(h.udp, &chaos, SHORT).await,
        rcode::REFUSED,
        "class CH",
    );
    // Garbage after a header that claims records: FORMERR.
    let mut junk = good[..12].to_vec();
    junk[7] = 5;
    junk.extend_from_slice(&[0xff; 40]);
    expect(udp_raw(h.udp, &junk, SHORT).await, rcode::FORMERR, "junk");
    // A response sent as a query: dropped (no reflection).
    let resp = answer(&good, 0x0102, &[(None, [1, 1, 1, 1])]);
    assert!(udp_raw(h.udp, &resp, SHORT).await.is_none());
    // Trailing bytes beyond the message are tolerated or rejected, never a crash.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 100]);
    let _ = udp_raw(h.udp, &trailing, SHORT).await;
    // An oversized (but valid-length) UDP datagram without EDNS: parsed on its merits.
    let mut big = good.clone();
    big.extend_from_slice(&vec![0u8; 60_000]);
    let _ = udp_raw(h.udp, &big, SHORT).await;

    assert!(h.learner.calls().is_empty());
    // Still serving.
    let (m, _) = udp_query(h.udp, 9, "api.stripe.com", A, Duration::from_secs(3))
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::NOERROR);
    assert!(h.proxy.stats().malformed >= 6);
}

/// Malformed TCP: a zero-length or junk frame closes nothing but the bad request's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tcp_frames() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = fake_upstream(Fake::WrongId).await;
    let h = harness(up).await;
    let mut s = tokio::net::TcpStream::connect(h.tcp)
        .await
        .expect("connect");
    // A 20-byte frame of junk with a header: FORMERR, connection stays.
    let mut frame = vec![0, 20, 0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&[0xc0, 12, 0xc0, 14, 0, 1, 0, 1]);
    s.write_all(&frame).await.expect("write");
    let len = s.read_u16().await.expect("len");
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.expect("body");
    let m = parse_message(&buf).expect("reply parses");
    assert_eq!(m.id, 0x1234);
    assert_eq!(m.rcode, rcode::FORMERR);
    // A frame shorter than a header: the connection is closed.
    s.write_all(&[0, 3, 1, 2, 3]).await.expect("write");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?}");
}

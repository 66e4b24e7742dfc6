//! The proxy on loopback in front of a real dnsmasq (skipped with a message if dnsmasq is not
//! installed).

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use weir_dns_proxy::wire::rcode;
use weir_dns_proxy::{
    CacheConfig, DenyResponse, DnsProxyConfig, DnsRecordKind, DnsVerdict, NoConnections,
};
use weir_l7_match::DnsRule;

const A: u16 = 1;
const AAAA: u16 = 28;
const WAIT: Duration = Duration::from_secs(3);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// The seed's policy: every name may be asked over UDP; answers for the `toFQDNs` names are
/// learned before the client gets them; other names are answered but teach nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_policy_answers_and_learns_before_release() {
    let Some(dns) = dnsmasq().await else { return };
    let learner = RecordingLearner {
        delay: Duration::from_millis(50),
        ..Default::default()
    };
    let mut h = start(
        dns.addr,
        snapshot(&seed_policy(dns.addr.port())),
        DnsProxyConfig::default(),
        CacheConfig::default(),
        learner,
    )
    .await;

    let sent = Instant::now();
    let (m, received) = udp_query(h.udp, 0xbeef, "API.Stripe.com.", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.id, 0xbeef, "the client's ID is preserved");
    assert_eq!(m.rcode, rcode::NOERROR);
    assert_eq!(ips(&m), vec![ip("203.0.113.10")]);
    let calls = h.learner.calls();
    assert_eq!(calls.len(), 1);
    let (learned, learned_at) = &calls[0];
    assert!(
        *learned_at <= received,
        "the learner finished before the client got the answer"
    );
    assert!(received.duration_since(sent) >= Duration::from_millis(50));
    assert_eq!(learned.endpoint, ENDPOINT);
    assert_eq!(learned.name, "api.stripe.com.");
    assert_eq!(learned.ips.len(), 1);
    assert_eq!(learned.ips[0].ip, ip("203.0.113.10"));
    assert_eq!(learned.ips[0].ttl, 300);
    assert_eq!(
        learned.selectors,
        vec![DnsRule::MatchName("api.stripe.com".into())]
    );
    assert_eq!(
        h.cache
            .lookup(ENDPOINT, "api.stripe.com.", SystemTime::now()),
        vec![ip("203.0.113.10")]
    );

    // IPv6 and a second selector.
    let (m, _) = udp_query(h.udp, 2, "api.github.com", AAAA, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("2001:db8::20")]);
    // `*.amazonaws.com` selects one label only: s3 is learned, a.b is answered but not.
    let (m, _) = udp_query(h.udp, 3, "s3.amazonaws.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("203.0.113.30")]);
    let (m, _) = udp_query(h.udp, 4, "a.b.amazonaws.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("203.0.113.31")]);
    // evil-site.com resolves (the DNS rule is `*`) but no selector selects it.
    let (m, _) = udp_query(h.udp, 5, "evil-site.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("198.51.100.66")]);
    let learned: Vec<String> = h.learner.calls().into_iter().map(|(l, _)| l.name).collect();
    assert_eq!(
        learned,
        vec!["api.stripe.com.", "api.github.com.", "s3.amazonaws.com."]
    );
    // Cached all the same (for `fqdn cache list` and flows).
    assert_eq!(
        h.cache.names_for_ip(ip("198.51.100.66")),
        vec!["evil-site.com."]
    );

    // DNS over TCP is not covered by the seed's UDP rule: refused, not forwarded.
    let before = h.proxy.stats().forwarded;
    let m = tcp_query(h.tcp, 6, "api.stripe.com", A)
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::REFUSED);
    assert_eq!(m.id, 6);
    assert_eq!(h.proxy.stats().forwarded, before);

    // Flow records: query + response per query.
    let first = h.records.recv().await.expect("record");
    assert_eq!(first.kind, DnsRecordKind::Query);
    assert_eq!(first.query, "api.stripe.com.");
    assert_eq!(first.qtypes, vec!["A".to_string()]);
    assert_eq!(first.verdict, DnsVerdict::Forwarded);
    assert_eq!(
        first.rule.as_deref(),
        Some("production/allow-external-apis egress[1]")
    );
    assert_eq!(first.server_identity, KUBE_DNS);
    let resp = h.records.recv().await.expect("record");
    assert_eq!(resp.kind, DnsRecordKind::Response);
    assert_eq!(resp.rcode, Some(0));
    assert_eq!(resp.ips, vec![ip("203.0.113.10")]);
    assert_eq!(resp.ttl, Some(300));
    assert!(resp.latency >= Duration::from_millis(50));
}

/// Names outside the DNS rules are refused at once and never reach dnsmasq; `*.amazonaws.com`
/// admits one label; TCP works when the rule allows it; NXDOMAIN is configurable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_rules_refuse_without_upstream() {
    let Some(dns) = dnsmasq().await else { return };
    let h = start(
        dns.addr,
        snapshot(&restricted_policy(dns.addr.port())),
        DnsProxyConfig::default(),
        CacheConfig::default(),
        RecordingLearner::default(),
    )
    .await;
    for (name, want) in [
        ("evil-site.com", rcode::REFUSED),
        ("a.b.amazonaws.com", rcode::REFUSED),
        ("amazonaws.com", rcode::REFUSED),
        ("api.github.com", rcode::REFUSED),
    ] {
        let t = Instant::now();
        let (m, _) = udp_query(h.udp, 10, name, A, WAIT).await.expect("answer");
        assert_eq!(m.rcode, want, "{name}");
        assert_eq!(m.id, 10);
        assert_eq!(m.questions.len(), 1, "the question is echoed");
        assert!(m.answers.is_empty());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(
        h.proxy.stats().forwarded,
        0,
        "denied queries never reach upstream"
    );
    assert_eq!(h.proxy.stats().denied, 4);
    assert!(h.learner.calls().is_empty());

    let (m, _) = udp_query(h.udp, 11, "S3.AMAZONAWS.COM", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("203.0.113.30")]);
    let m = tcp_query(h.tcp, 12, "api.stripe.com", A)
        .await
        .expect("tcp answer");
    assert_eq!(m.id, 12);
    assert_eq!(ips(&m), vec![ip("203.0.113.10")]);
    let m = tcp_query(h.tcp, 13, "evil-site.com", A)
        .await
        .expect("tcp answer");
    assert_eq!(m.rcode, rcode::REFUSED);
    assert_eq!(h.learner.calls().len(), 2);

    // NXDOMAIN instead of REFUSED.
    let h2 = start(
        dns.addr,
        snapshot(&restricted_policy(dns.addr.port())),
        DnsProxyConfig {
            deny_response: DenyResponse::NameError,
            ..Default::default()
        },
        CacheConfig::default(),
        RecordingLearner::default(),
    )
    .await;
    let (m, _) = udp_query(h2.udp, 14, "evil-site.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::NXDOMAIN);
}

/// A CNAME chain: the alias's target is learned under the selector that selects the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chain_is_followed() {
    let Some(dns) = dnsmasq().await else { return };
    let h = start(
        dns.addr,
        snapshot(&seed_policy(dns.addr.port())),
        DnsProxyConfig::default(),
        CacheConfig::default(),
        RecordingLearner::default(),
    )
    .await;
    let (m, _) = udp_query(h.udp, 20, "www.stripe.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(ips(&m), vec![ip("203.0.113.10")]);
    let calls = h.learner.calls();
    assert_eq!(calls.len(), 1);
    let l = &calls[0].0;
    assert_eq!(l.name, "www.stripe.com.");
    assert_eq!(l.aliases, vec!["api.stripe.com.".to_string()]);
    assert_eq!(l.ips[0].ip, ip("203.0.113.10"));
    assert_eq!(
        l.selectors,
        vec![DnsRule::MatchName("api.stripe.com".into())]
    );
    let now = SystemTime::now();
    for name in ["www.stripe.com.", "api.stripe.com."] {
        assert_eq!(
            h.cache.lookup(ENDPOINT, name, now),
            vec![ip("203.0.113.10")]
        );
    }
}

/// TTL 1 raised to the minimum TTL; the cache expires it after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_ttl_and_expiry() {
    let Some(dns) = dnsmasq().await else { return };
    let h = start(
        dns.addr,
        snapshot(&seed_policy(dns.addr.port())),
        DnsProxyConfig::default(),
        CacheConfig {
            min_ttl: Duration::from_secs(5),
            ..Default::default()
        },
        RecordingLearner::default(),
    )
    .await;
    let (m, _) = udp_query(h.udp, 30, "short.example.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.answers[0].ttl, 1, "the client sees the server's TTL");
    let calls = h.learner.calls();
    assert_eq!(calls[0].0.ips[0].ttl, 5);
    let now = SystemTime::now();
    assert_eq!(
        h.cache.lookup(ENDPOINT, "short.example.com.", now),
        vec![ip("203.0.113.50")]
    );
    assert!(h.cache.expired(now + Duration::from_secs(4)).is_empty());
    let later = now + Duration::from_secs(6);
    assert_eq!(h.cache.expired(later).len(), 1);
    assert_eq!(h.cache.gc(later, &NoConnections).len(), 1);
    assert!(!h.cache.contains_ip(ip("203.0.113.50")));
}

/// A failing learner: the client gets SERVFAIL, nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_failure_fails_closed() {
    let Some(dns) = dnsmasq().await else { return };
    let h = start(
        dns.addr,
        snapshot(&seed_policy(dns.addr.port())),
        DnsProxyConfig::default(),
        CacheConfig::default(),
        RecordingLearner {
            fail: true,
            ..Default::default()
        },
    )
    .await;
    let (m, _) = udp_query(h.udp, 40, "api.stripe.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::SERVFAIL);
    assert_eq!(m.id, 40);
    assert!(m.answers.is_empty());
    assert_eq!(h.proxy.stats().learn_failures, 1);
    assert!(h.cache.entries().is_empty());
    // Names no selector selects do not need the learner and still resolve.
    let (m, _) = udp_query(h.udp, 41, "evil-site.com", A, WAIT)
        .await
        .expect("answer");
    assert_eq!(m.rcode, rcode::NOERROR);
}

//! Counters: what the proxy dropped, refused or failed, for metrics and tests.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A snapshot of the proxy's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct DnsProxyStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> DnsProxyStats {
                DnsProxyStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Queries received (well-formed or not).
    queries,
    /// Queries forwarded upstream.
    forwarded,
    /// Queries denied by policy.
    denied,
    /// Queries answered FORMERR or NOTIMP.
    malformed,
    /// Messages dropped without a reply (no header, or QR set).
    dropped,
    /// Upstream messages that were not the answer to a forwarded query (wrong question, not
    /// a response, or an ID no query waits for: late after a timeout, duplicated or
    /// unsolicited): dropped, nothing learned.
    mismatched_answers,
    /// Upstream messages that did not parse: dropped.
    malformed_answers,
    /// Upstream timeouts (answered SERVFAIL).
    upstream_timeouts,
    /// Upstream I/O errors (answered SERVFAIL).
    upstream_errors,
    /// Answers whose learning failed or timed out (answered SERVFAIL).
    learn_failures,
    /// Answers learned from (the learner was called and succeeded).
    learned,
    /// Queries refused for lack of capacity (answered SERVFAIL).
    overloaded,
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

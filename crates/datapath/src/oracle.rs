//! The verdict a kernel backend must give a new flow: the compiler's [`decide`], translated to
//! datapath terms. There is one definition of the lookup rule in the project (the compiler's);
//! the fake and every kernel test use it through here.

use weir_policy_compiler::{Flow, MapState, decide};
use weir_policy_model::Direction;

use crate::Verdict;

impl From<weir_policy_compiler::Verdict> for Verdict {
    fn from(v: weir_policy_compiler::Verdict) -> Self {
        match v {
            weir_policy_compiler::Verdict::Allow => Verdict::Allow,
            weir_policy_compiler::Verdict::Redirect { proxy_port } => {
                Verdict::Redirect { proxy_port }
            }
            weir_policy_compiler::Verdict::Deny { reason } => Verdict::Drop { reason },
        }
    }
}

/// The kernel verdict for the first packet of `flow` under `map` (`decide`'s verdict).
pub fn expected_verdict(map: &MapState, flow: &Flow) -> Verdict {
    decide(map, flow).verdict.into()
}

/// What a backend answers in a `BPF_PROG_TEST_RUN` of the first packet of a flow whose
/// policy verdict is `decided`. Test runs have no proxy listening: a redirect leaving a pod
/// fails closed (178, no proxy socket), while TCP and UDP entering a pod are hairpinned
/// towards the proxy (a redirect verdict; the socket lookup happens on the second pass, in
/// the other hook). Redirects the kernel cannot steer at all (SCTP, ICMP) drop with 178 too.
/// IPv6 neighbour discovery (ICMPv6 133–137) passes without policy, as in Cilium.
pub fn test_run_verdict(
    decided: Verdict,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Verdict {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMPV6: u8 = 58;
    if protocol == ICMPV6 && (133..=137).contains(&port) {
        return Verdict::Allow;
    }
    match decided {
        Verdict::Redirect { .. }
            if direction == Direction::Ingress && matches!(protocol, TCP | UDP) =>
        {
            decided
        }
        Verdict::Redirect { .. } => Verdict::Drop {
            reason: weir_datapath_abi::drop_reason::PROXY_LOOKUP_FAILED,
        },
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use weir_identity::Identity;
    use weir_policy_compiler::{EntryAction, PolicyEntry, PolicyKey};

    use super::*;

    fn flow(remote: u32, protocol: u8, port: u16) -> Flow {
        Flow {
            remote: Identity(remote),
            direction: Direction::Ingress,
            protocol,
            port,
        }
    }

    #[test]
    fn translates_decide() {
        let mut m = MapState::default();
        assert_eq!(
            expected_verdict(&m, &flow(300, 6, 80)),
            Verdict::Drop { reason: 133 }
        );
        let key = |identity, protocol, port, prefix_len| PolicyKey {
            identity: Identity(identity),
            direction: Direction::Ingress,
            protocol,
            port,
            prefix_len,
        };
        let entry = |action| PolicyEntry {
            action,
            derived_from: Default::default(),
        };
        m.entries
            .insert(key(300, 6, 80, 24), entry(EntryAction::Allow));
        assert_eq!(expected_verdict(&m, &flow(300, 6, 80)), Verdict::Allow);
        m.entries.insert(key(0, 6, 0, 8), entry(EntryAction::Deny));
        assert_eq!(
            expected_verdict(&m, &flow(300, 6, 80)),
            Verdict::Drop { reason: 181 }
        );
        m.entries.clear();
        m.entries.insert(
            key(5, 0, 0, 0),
            entry(EntryAction::Redirect {
                proxy_port: 15001,
                priority: 1,
            }),
        );
        assert_eq!(
            expected_verdict(&m, &flow(5, 6, 8080)),
            Verdict::Redirect { proxy_port: 15001 }
        );
    }
}

//! Turns normalised rules and identities into per-endpoint [`MapState`]: the entries of the
//! kernel policy map, keyed exactly as the datapath keys them, each remembering the rules that
//! produced it. [`decide`] mirrors the kernel lookup and is the oracle for datapath tests;
//! [`L7Policy`] tells the proxies which requests to let through.
//!
//! The semantics are Cilium's (see the project's `reference/semantics.md` §1–§5): default deny
//! per direction once a selecting rule enables it, union of allows, deny beats allow, L4 allow
//! shadows L7 on the same peer and port, CIDR rules never select cluster identities.

mod compile;
mod decide;
mod identities;
mod intern;
mod l7;
mod mapstate;
mod peer_index;
mod peers;
mod policy_update;
mod prefold;
mod repository;

pub use compile::{
    Compiler, CompilerConfig, DNS_REDIRECT_PRIORITY, EndpointInfo, EndpointPolicy, EnforcementMode,
    HTTP_REDIRECT_PRIORITY,
};
pub use decide::{Decision, Flow, Verdict, decide};
pub use identities::{IdentityInfo, IdentityTable, NamedPorts};
pub use l7::{L7Contribution, L7Peers, L7Policy, L7RuleSet, L7Verdict};
pub use mapstate::*;
pub use peers::{CLUSTER_LABEL_KEY, fqdn_label};
pub use repository::{PolicyRepository, Revision, policy_selects};

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

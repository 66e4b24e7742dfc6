//! `weir-cni`: a CNI 1.0 plugin joining pods to a Weir node.
//!
//! - [`spec`]: the CNI specification's data (environment, config, results,
//!   errors), pure and unit-tested;
//! - [`ipam`]: host-local address allocation from the node's pod CIDR;
//! - [`netlink`]: veth, addresses, routes (rtnetlink);
//! - [`agent`]: registration with the Weir agent over its unix-socket API;
//! - [`plugin`]: ADD / DEL / CHECK / VERSION, composed from the above.

pub mod agent;
pub mod ipam;
pub mod netlink;
pub mod plugin;
pub mod spec;

pub use plugin::run;
pub use spec::{CniError, ErrorCode};

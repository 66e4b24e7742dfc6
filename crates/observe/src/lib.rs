//! Hubble-compatible flows for Weir.
//!
//! Datapath verdict events and proxy records become [`Flow`](proto::flow::Flow)s
//! ([`enrich`]), enriched with endpoints, identities and the policy decision behind each
//! verdict; they go into a bounded ring ([`Observer`]) that counts every event it could not
//! keep; readers select them with Hubble's filters ([`filter`]) through the Observer gRPC
//! service ([`server`]) and print them like `hubble observe` ([`format`]); [`metrics`] keeps
//! Hubble's Prometheus metrics and serves them over HTTP ([`http`]).

pub mod enrich;
pub mod filter;
pub mod format;
pub mod http;
pub mod metrics;
pub mod model;
pub mod names;
pub mod observer;
pub mod proto;
pub mod ring;
pub mod server;
pub mod snapshot;

pub use enrich::{EndpointMeta, Enricher, FlowContext, NoContext};
pub use filter::{FilterError, FilterSet};
pub use metrics::{AgentStats, Metrics};
pub use names::{DnsNames, NameIndex, NoNames};
pub use observer::{Follower, Observer, ObserverConfig, ObserverStatus};
pub use ring::{DEFAULT_CAPACITY, Event, FlowRing};
pub use snapshot::ContextSnapshot;

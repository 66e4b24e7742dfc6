//! The reference Weir agent, as a library: the [`Manager`](manager::Manager) that keeps
//! endpoints, identities, policies and a [`Datapath`](weir_datapath::Datapath) consistent, the
//! [`DirectorySource`](policy_source::DirectorySource) policy watcher, and the gRPC services.
//! The `weir-agent` binary composes them with the datapath backend chosen at build time.

pub mod api;
pub mod config;
pub mod fqdn_grace;
pub mod manager;
pub mod observe;
pub mod policy_api;
pub mod policy_source;
pub mod policy_store;
pub mod proxies;

//! The generated Hubble-schema messages (packages `flow` and `observer`).

/// Package `flow`: [`Flow`](flow::Flow), [`FlowFilter`](flow::FlowFilter), [`LostEvent`](flow::LostEvent), ...
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod flow {
    tonic::include_proto!("flow");
}

/// Package `observer`: the `Observer` service, its client and its server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod observer {
    tonic::include_proto!("observer");
}

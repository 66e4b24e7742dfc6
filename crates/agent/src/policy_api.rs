//! `PolicyService`: policy import and delete over the API, through the [`PolicyStore`].

use tonic::{Request, Response, Status};
use tracing::info;
use weir_agent_api::v1::{
    DeletePolicyRequest, DeletePolicyResponse, ImportPoliciesRequest, ImportPoliciesResponse,
    policy_service_server::PolicyService,
};
use weir_datapath::Datapath;

use crate::api::Shared;
use crate::policy_store::{PolicyQuery, PolicyStore, StoreError, describe, parse_kind};

/// Serves `PolicyService` over a shared manager and the agent's policy directory.
pub struct PolicyApi<D: Datapath> {
    manager: Shared<D>,
    store: PolicyStore,
}

impl<D: Datapath> PolicyApi<D> {
    /// The service; `store` is over the directory the agent watches.
    pub fn new(manager: Shared<D>, store: PolicyStore) -> Self {
        PolicyApi { manager, store }
    }
}

fn status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::NotFound(m) => Status::not_found(format!("no policy {m}")),
        StoreError::Conflict(m) => Status::failed_precondition(m),
        e @ (StoreError::Io { .. } | StoreError::Manager(_)) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl<D: Datapath + Send + 'static> PolicyService for PolicyApi<D> {
    async fn import_policies(
        &self,
        request: Request<ImportPoliciesRequest>,
    ) -> Result<Response<ImportPoliciesResponse>, Status> {
        let docs: Vec<(String, String)> = request
            .into_inner()
            .files
            .into_iter()
            .map(|d| (d.name, d.text))
            .collect();
        // The lock is held from validation to the last map update: the plan is made against
        // the state it changes.
        let mut m = self.manager.lock().await;
        let plan = self
            .store
            .plan_import(&docs, m.policy_files())
            .map_err(status)?;
        let policies: Vec<String> = plan.policies.iter().map(describe).collect();
        let files = plan.commit(&mut m).map_err(status)?;
        let revision = m.compiler().repository().revision().0;
        info!(policies = policies.len(), revision, "policies imported");
        Ok(Response::new(ImportPoliciesResponse {
            revision,
            policies,
            files: files.iter().map(|p| p.display().to_string()).collect(),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let req = request.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(parse_kind(&req.kind).ok_or_else(|| {
                Status::invalid_argument(format!("{:?} is not a policy kind", req.kind))
            })?)
        };
        if req.name.is_empty() {
            return Err(Status::invalid_argument("a policy name is required"));
        }
        let query = PolicyQuery {
            namespace: Some(req.namespace).filter(|n| !n.is_empty()),
            name: req.name,
            kind,
        };
        let mut m = self.manager.lock().await;
        let plan = self
            .store
            .plan_delete(&query, m.policy_files())
            .map_err(status)?;
        let deleted = plan.policies.first().map(describe).unwrap_or_default();
        let files = plan.commit(&mut m).map_err(status)?;
        let revision = m.compiler().repository().revision().0;
        info!(policy = %deleted, revision, "policy deleted");
        Ok(Response::new(DeletePolicyResponse {
            revision,
            deleted,
            files: files.iter().map(|p| p.display().to_string()).collect(),
        }))
    }
}

//! gRPC adapter for `trove.v1.Admin`, generic over [`UsageStore`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trove_proto::pb::{self, admin_server::Admin};
use trove_proto::types::Namespace;
use trove_proto::UsageStore;

use super::{split, status, Access, OpenAccess, Permission};

/// Serves `trove.v1.Admin` from any [`UsageStore`].
#[derive(Debug)]
pub struct AdminService<S: ?Sized> {
    store: Arc<S>,
    access: Access,
}

impl<S: ?Sized> AdminService<S> {
    /// Wraps a store.
    pub fn new(store: Arc<S>) -> Self {
        AdminService {
            store,
            access: Arc::new(OpenAccess),
        }
    }

    /// Consults `access` on every call (by default everything is allowed).
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }
}

#[tonic::async_trait]
impl<S: UsageStore + ?Sized> Admin for AdminService<S> {
    #[tracing::instrument(skip_all, fields(ns = ?request.get_ref().namespace))]
    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let (extensions, request) = split(request);
        if request.all_namespaces {
            // Every namespace the caller may read, and nothing of the others
            // (not even their names).
            let rows = self.store.namespace_usage(None).await.map_err(status)?;
            let rows = rows
                .into_iter()
                .filter(|row| {
                    Namespace::new(&row.namespace).is_ok_and(|ns| {
                        self.access
                            .authorize(&extensions, &ns, &[Permission::Read])
                            .is_ok()
                    })
                })
                .collect();
            return Ok(Response::new(pb::UsageResponse { rows }));
        }
        let ns = Namespace::new(&request.namespace).map_err(status)?;
        self.access
            .authorize(&extensions, &ns, &[Permission::Read])?;
        let rows = self
            .store
            .namespace_usage(Some(&ns))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UsageResponse { rows }))
    }
}

//! [`UsageStore`] over gRPC (`trove.v1.Admin`).

use async_trait::async_trait;
use trove_proto::admin::UsageRow;
use trove_proto::pb;
use trove_proto::types::Namespace;
use trove_proto::{Error, UsageStore};

use crate::TroveClient;

#[async_trait]
impl UsageStore for TroveClient {
    async fn namespace_usage(&self, namespace: Option<&Namespace>) -> Result<Vec<UsageRow>, Error> {
        let mut client = self.admin.clone();
        let reply = client
            .usage(pb::UsageRequest {
                namespace: namespace
                    .map(|ns| ns.as_str().to_owned())
                    .unwrap_or_default(),
                all_namespaces: namespace.is_none(),
            })
            .await?;
        Ok(reply.into_inner().rows)
    }
}

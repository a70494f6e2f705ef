//! The start-up probe: refuses to run on a store that silently ignores
//! conditional writes, since atomic publishing depends on them.

use super::*;

impl BucketStore {
    /// Refuses to run on a store that silently ignores conditional writes:
    /// atomic publishing depends on them.
    pub(crate) async fn probe_conditional_writes(&self) -> Result<(), Error> {
        let path = self.path("probe/conditional-put");
        let first = self
            .inner
            .bucket
            .put(&path, PutPayload::from_static(b"probe"))
            .await
            .map_err(|e| bucket_error("write the conditional-write probe", &e))?;
        let refuse = |what: &str| Error::FailedPrecondition {
            message: format!(
                "the object store at {} does not enforce {what}; Trove needs it to publish \
                 writes atomically and will not run on this store",
                self.inner.bucket
            ),
        };
        if first.e_tag.is_none() && first.version.is_none() {
            return Err(refuse("object versions (no ETag returned)"));
        }
        let stale = UpdateVersion {
            e_tag: Some("\"00000000000000000000000000000000\"".into()),
            version: None,
        };
        for (mode, what) in [
            (PutMode::Create, "create-if-absent (If-None-Match: *)"),
            (PutMode::Update(stale), "update-if-version (If-Match)"),
        ] {
            // Both writes must be refused: the key exists, the version is stale.
            match self
                .inner
                .bucket
                .put_opts(&path, PutPayload::from_static(b"again"), mode.into())
                .await
            {
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Ok(_)
                | Err(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => return Err(refuse(what)),
                Err(e) => return Err(bucket_error(&format!("probe {what}"), &e)),
            }
        }
        match self
            .inner
            .bucket
            .put_opts(
                &path,
                PutPayload::from_static(b"probe"),
                PutMode::Update(first.into()).into(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e @ object_store::Error::Precondition { .. }) => Err(Error::FailedPrecondition {
                message: format!(
                    "the object store at {} refused an update with the version it just returned \
                     ({e}); conditional writes do not work on it",
                    self.inner.bucket
                ),
            }),
            Err(e) => Err(bucket_error("probe update-if-version", &e)),
        }
    }
}

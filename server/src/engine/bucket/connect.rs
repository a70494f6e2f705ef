//! Builds a [`BucketStore`] from a store URL and the usual environment.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::ObjectStore as Bucket;
use trove_proto::Error;

use super::{BucketOptions, BucketStore};

/// Where the engine's objects live, parsed from a store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `s3`, `gs`, `az` or `memory`.
    pub scheme: String,
    /// Bucket (or container).
    pub bucket: String,
    /// Key prefix everything is stored under (may be empty).
    pub root: String,
}

impl StoreUrl {
    /// Parses `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// or `memory://` (a process-local store that forgets everything at exit,
    /// for trying things out).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::invalid("store", format!("{url:?} {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("is not a URL like s3://bucket/prefix"))?;
        let scheme = match scheme {
            "s3" | "s3a" => "s3",
            "gs" => "gs",
            "az" | "azure" | "abfs" => "az",
            "memory" => "memory",
            other => {
                return Err(bad(&format!(
                    "has scheme {other:?}; use s3://, gs://, az:// or memory://"
                )))
            }
        };
        let (bucket, root) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() && scheme != "memory" {
            return Err(bad("names no bucket"));
        }
        Ok(StoreUrl {
            scheme: scheme.to_owned(),
            bucket: bucket.to_owned(),
            root: root.trim_matches('/').to_owned(),
        })
    }
}

/// Connects to the store at `url`. Credentials, region and the rest come
/// from the provider's usual variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`);
/// `s3_endpoint`, when given, points S3 at a compatible server (SeaweedFS,
/// MinIO, Ceph), plain HTTP allowed for `http://` endpoints.
pub async fn connect(
    url: &str,
    s3_endpoint: Option<&str>,
    options: BucketOptions,
) -> Result<BucketStore, Error> {
    let parsed = StoreUrl::parse(url)?;
    // The HTTP client's TLS uses rustls with ring as its one crypto provider;
    // installing it again (a second store in one process) changes nothing.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed =
        |e: object_store::Error| Error::invalid("store", format!("cannot use {url:?}: {e}"));
    let bucket: Arc<dyn Bucket> = match parsed.scheme.as_str() {
        "s3" => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(&parsed.bucket);
            if let Some(endpoint) = s3_endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            Arc::new(builder.build().map_err(failed)?)
        }
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&parsed.bucket)
                .build()
                .map_err(failed)?,
        ),
        "az" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_container_name(&parsed.bucket)
                .build()
                .map_err(failed)?,
        ),
        _ => Arc::new(object_store::memory::InMemory::new()),
    };
    BucketStore::open(bucket, &parsed.root, options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store URLs name a scheme, a bucket and an optional prefix.
    #[test]
    fn store_urls() {
        let url = StoreUrl::parse("s3://trove/ci/cache/").expect("valid");
        assert_eq!(
            (url.scheme.as_str(), url.bucket.as_str(), url.root.as_str()),
            ("s3", "trove", "ci/cache")
        );
        assert_eq!(StoreUrl::parse("gs://b").expect("valid").root, "");
        assert!(StoreUrl::parse("ftp://b/x").is_err());
        assert!(StoreUrl::parse("s3:///x").is_err());
        assert!(StoreUrl::parse("trove").is_err());
    }
}

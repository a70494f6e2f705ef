//! The conformance suite against the bucket engine: on an in-memory object
//! store (always), and on the S3 cluster that CI starts (SeaweedFS: 1 master,
//! 3 volume servers, a filer and the S3 gateway), skipped with a message
//! when no cluster is configured outside CI.

mod memory {
    trove_tests::conformance_suite!(trove_tests::target::bucket_memory_target());
}

mod seaweedfs {
    trove_tests::conformance_suite!(trove_tests::target::bucket_s3_target());
}

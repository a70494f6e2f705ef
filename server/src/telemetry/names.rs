//! Names the call layer gives calls: bounded metric labels for request
//! paths, gRPC status names, and the `grpc-timeout` header's value.

use std::time::Duration;

/// The name of a numeric `grpc-status` value, as metrics and logs show it.
pub fn code_name(code: &str) -> &'static str {
    match code.trim().parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::Unknown) => "UNKNOWN",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Err(_) => "UNKNOWN",
    }
}

/// Methods of the services this server answers; anything else is labelled
/// `unknown` so that arbitrary paths cannot create unbounded metric series.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "trove.v1.Objects",
        &[
            "Put",
            "Get",
            "Delete",
            "Stat",
            "List",
            "FindMissing",
            "PutStream",
            "GetStream",
        ],
    ),
    (
        "trove.v1.Artifacts",
        &["Put", "Get", "Delete", "Stat", "List"],
    ),
    (
        "trove.v1.Entries",
        &[
            "Append", "Read", "Replace", "Delete", "Exists", "Ensure", "List",
        ],
    ),
    (
        "trove.v1.Cache",
        &[
            "Upload",
            "Download",
            "BranchRefs",
            "WriteBranchRefs",
            "Prune",
            "PruneAll",
            "ListRefs",
        ],
    ),
    ("trove.v1.Admin", &["Usage"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

/// The `(service, method)` labels for a request path.
pub fn labels(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match KNOWN.iter().find(|(s, _)| *s == service) {
        Some((s, methods)) if methods.contains(&method) => ((*s).to_owned(), method.to_owned()),
        Some((s, _)) => ((*s).to_owned(), "unknown".to_owned()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// Parses a `grpc-timeout` header value (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric labels are bounded: unknown services and methods collapse to "unknown".
    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            labels("/trove.v1.Objects/Put"),
            ("trove.v1.Objects".into(), "Put".into())
        );
        assert_eq!(
            labels("/trove.v1.Objects/Nope"),
            ("trove.v1.Objects".into(), "unknown".into())
        );
        assert_eq!(labels("/x.y/z"), ("unknown".into(), "unknown".into()));
        assert_eq!(labels(""), ("unknown".into(), "unknown".into()));
    }

    /// grpc-timeout values in every unit parse; malformed ones are ignored.
    #[test]
    fn grpc_timeout_parsing() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "10x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}

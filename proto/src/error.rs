//! The one error type of every Trove trait, and its one mapping to gRPC
//! statuses (and back, for the client).
//!
//! Expected outcomes (a missing cassette, a cache miss) are values, never
//! errors. Messages name the offending field or key so the caller knows what
//! to fix.

use std::fmt;

/// Result alias used by every trait in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure a Trove operation can report, whatever implements it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed; `field` names the part to fix.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Request field at fault, e.g. `key` or `header.hash`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The addressed item does not exist.
    #[error("{kind} not found: {key}")]
    NotFound {
        /// What was looked up, e.g. `artifact`.
        kind: String,
        /// The key, shortened for display.
        key: String,
    },
    /// The operation is valid but the current state does not allow it.
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// What is in the way.
        message: String,
    },
    /// A configured limit was hit.
    #[error("{limit} exceeded: {message}")]
    ResourceExhausted {
        /// Name of the limit, e.g. `max_message_bytes (16777216)`.
        limit: String,
        /// Details.
        message: String,
    },
    /// The caller sent no credentials, or credentials the server does not know.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// What to send instead.
        message: String,
    },
    /// The caller is known but not allowed this operation on this namespace.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// Which permission or namespace is outside the caller's grant.
        message: String,
    },
    /// The service cannot take the call right now; retrying may succeed.
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// The caller (or the peer) cancelled the operation before it completed.
    #[error("cancelled: {message}")]
    Cancelled {
        /// Why.
        message: String,
    },
    /// The caller's deadline passed before the operation completed.
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded {
        /// Details.
        message: String,
    },
    /// Stored data is unreadable or does not match its recorded checksum.
    #[error("data loss: {message}")]
    DataLoss {
        /// What was found damaged.
        message: String,
    },
    /// This implementation does not offer the operation.
    #[error("not implemented: {operation}")]
    Unimplemented {
        /// The operation asked for.
        operation: String,
    },
    /// A bug or an unexpected failure of the storage engine.
    #[error("internal error: {message}")]
    Internal {
        /// Details for the operator.
        message: String,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::NotFound`] for an item of `kind` under `key`.
    pub fn not_found(kind: impl Into<String>, key: &str) -> Self {
        Error::NotFound {
            kind: kind.into(),
            key: shorten(key),
        }
    }

    /// An [`Error::Internal`] carrying `err`'s message.
    pub fn internal(err: impl fmt::Display) -> Self {
        Error::Internal {
            message: err.to_string(),
        }
    }

    /// An [`Error::ResourceExhausted`] naming `limit`.
    pub fn exhausted(limit: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ResourceExhausted {
            limit: limit.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::NotFound { .. } => tonic::Code::NotFound,
            Error::FailedPrecondition { .. } => tonic::Code::FailedPrecondition,
            Error::ResourceExhausted { .. } => tonic::Code::ResourceExhausted,
            Error::Unauthenticated { .. } => tonic::Code::Unauthenticated,
            Error::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            Error::Unavailable { .. } => tonic::Code::Unavailable,
            Error::Cancelled { .. } => tonic::Code::Cancelled,
            Error::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
            Error::DataLoss { .. } => tonic::Code::DataLoss,
            Error::Unimplemented { .. } => tonic::Code::Unimplemented,
            Error::Internal { .. } => tonic::Code::Internal,
        }
    }
}

/// Shortens a caller-supplied value for error messages: keys can be 1 KiB and
/// contain control characters, which must not flood or garble logs.
pub fn shorten(value: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut out: String = value.chars().take(MAX_CHARS).collect::<String>();
    out = out.escape_debug().to_string();
    if value.chars().count() > MAX_CHARS {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

// Metadata keys that carry the structured parts of an error across the wire,
// so the client can rebuild the same variant the server produced.
const META_FIELD: &str = "trove-field";
const META_KIND: &str = "trove-kind";
const META_LIMIT: &str = "trove-limit";

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let mut status = tonic::Status::new(err.code(), err.to_string());
        let extra = match &err {
            Error::InvalidArgument { field, .. } => Some((META_FIELD, field)),
            Error::NotFound { kind, .. } => Some((META_KIND, kind)),
            Error::ResourceExhausted { limit, .. } => Some((META_LIMIT, limit)),
            _ => None,
        };
        if let Some((name, value)) = extra {
            if let Ok(value) = value.parse() {
                status.metadata_mut().insert(name, value);
            }
        }
        status
    }
}

/// Removes the prefix our own `Display` put in front of a message.
fn strip(message: &str, prefix: &str) -> String {
    message.strip_prefix(prefix).unwrap_or(message).to_owned()
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let meta = |name: &str| {
            status
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let message = status.message().to_owned();
        // Strip the "<variant prefix>: " our own Display added, so a round trip
        // through the wire does not repeat it.
        let after_colon = |m: &str| {
            m.split_once(": ")
                .map_or_else(|| m.to_owned(), |(_, rest)| rest.to_owned())
        };
        match status.code() {
            tonic::Code::InvalidArgument => match meta(META_FIELD) {
                Some(field) => Error::InvalidArgument {
                    field,
                    reason: after_colon(&message),
                },
                None => Error::InvalidArgument {
                    field: "request".into(),
                    reason: message,
                },
            },
            tonic::Code::NotFound => match meta(META_KIND) {
                Some(kind) => Error::NotFound {
                    kind,
                    key: after_colon(&message),
                },
                None => Error::NotFound {
                    kind: "item".into(),
                    key: message,
                },
            },
            tonic::Code::FailedPrecondition => Error::FailedPrecondition {
                message: after_colon(&message),
            },
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => match meta(META_LIMIT) {
                Some(limit) => Error::ResourceExhausted {
                    limit,
                    message: after_colon(&message),
                },
                None => Error::ResourceExhausted {
                    limit: "server limit".into(),
                    message,
                },
            },
            tonic::Code::Unauthenticated => Error::Unauthenticated {
                message: strip(&message, "unauthenticated: "),
            },
            tonic::Code::PermissionDenied => Error::PermissionDenied {
                message: strip(&message, "permission denied: "),
            },
            tonic::Code::Unavailable => Error::Unavailable {
                message: strip(&message, "unavailable: "),
            },
            tonic::Code::Cancelled => Error::Cancelled {
                message: strip(&message, "cancelled: "),
            },
            tonic::Code::DeadlineExceeded => Error::DeadlineExceeded {
                message: strip(&message, "deadline exceeded: "),
            },
            tonic::Code::DataLoss => Error::DataLoss {
                message: after_colon(&message),
            },
            tonic::Code::Unimplemented => Error::Unimplemented {
                operation: strip(&message, "not implemented: "),
            },
            tonic::Code::Internal => Error::Internal {
                message: strip(&message, "internal error: "),
            },
            other => Error::Internal {
                message: format!("{other:?}: {message}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant survives the trip to a gRPC status and back unchanged.
    #[test]
    fn status_round_trip_preserves_variants() {
        let cases = vec![
            Error::invalid("key", "must not be empty"),
            Error::not_found("artifact", "a/b"),
            Error::FailedPrecondition {
                message: "busy".into(),
            },
            Error::exhausted("max_message_bytes (16)", "message of 20 bytes"),
            Error::DataLoss {
                message: "blob 7 is missing".into(),
            },
            Error::Unavailable {
                message: "disk: busy".into(),
            },
            Error::Unauthenticated {
                message: "send a bearer token".into(),
            },
            Error::PermissionDenied {
                message: "no write on namespace ci".into(),
            },
            Error::Cancelled {
                message: "gone".into(),
            },
            Error::DeadlineExceeded {
                message: "slow".into(),
            },
            Error::Unimplemented {
                operation: "x".into(),
            },
            Error::internal("bug: here"),
        ];
        for err in cases {
            let status = tonic::Status::from(err.clone());
            assert_eq!(status.code(), err.code());
            assert_eq!(Error::from(status), err);
        }
    }

    /// Values in messages are quoted, escaped and cut to a readable length.
    #[test]
    fn shorten_escapes_and_truncates() {
        assert_eq!(shorten("a\0b"), "\"a\\0b\"");
        let long = "x".repeat(500);
        let short = shorten(&long);
        assert!(short.len() < 100, "{short}");
        assert!(short.ends_with("...\""));
    }
}

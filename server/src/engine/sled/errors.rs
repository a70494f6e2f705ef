//! How the sled engine's failures become domain errors: sled's own, an
//! aborted transaction's, an I/O failure's (a full disk is
//! RESOURCE_EXHAUSTED), and damage found while reading a body (DATA_LOSS).
//! The one mapping to gRPC codes lives in `trove-proto`.

use sled::transaction::ConflictableTransactionError;
use trove_proto::Error;

/// Maps a failed read of a stored body: damage (bytes that fail their
/// SHA-256) is DATA_LOSS naming the item, anything else an I/O failure.
pub fn read_error(what: &str, err: &std::io::Error) -> Error {
    if err.kind() == std::io::ErrorKind::InvalidData {
        Error::DataLoss {
            message: format!("{what} is damaged: its bytes fail their SHA-256 check"),
        }
    } else {
        io_error("read value", err)
    }
}

/// Maps a failed sled transaction: an abort carries our own error, anything
/// else is a storage failure.
pub fn tx_error(err: sled::transaction::TransactionError<Error>) -> Error {
    match err {
        sled::transaction::TransactionError::Abort(err) => err,
        sled::transaction::TransactionError::Storage(err) => sled_error(err),
    }
}

/// Maps a failed logged write's body: an abort carries our own error, a
/// storage error is sled's.
pub fn body_error(err: ConflictableTransactionError<Error>) -> Error {
    match err {
        ConflictableTransactionError::Abort(err) => err,
        ConflictableTransactionError::Storage(err) => sled_error(err),
        ConflictableTransactionError::Conflict => Error::internal(
            "a logged write reported a conflict, which cannot happen under the log's lock",
        ),
        // The enum is non-exhaustive upstream.
        #[allow(unreachable_patterns)]
        _ => Error::internal("a logged write failed in an unknown way"),
    }
}

/// Maps a sled failure to the domain error.
pub fn sled_error(err: sled::Error) -> Error {
    match err {
        sled::Error::Io(e) => io_error("storage", &e),
        sled::Error::Corruption { .. } => {
            let incident = crate::engine::incident("read the database", &err);
            Error::DataLoss {
                message: format!(
                    "the database is damaged (incident {incident}); give the incident id to the \
                     operator"
                ),
            }
        }
        other => {
            let incident = crate::engine::incident("storage engine", &other);
            Error::internal(format!(
                "the storage engine failed (incident {incident}); give the incident id to the \
                 operator"
            ))
        }
    }
}

/// Maps an I/O failure during `what` to the domain error: a full disk is
/// `ResourceExhausted`, anything else `Unavailable` (retrying may succeed).
pub fn io_error(what: &str, err: &std::io::Error) -> Error {
    if err.kind() == std::io::ErrorKind::StorageFull {
        return Error::exhausted("disk space", format!("{what}: {err}"));
    }
    // I/O errors can name files; they stay in the log.
    let incident = crate::engine::incident(what, err);
    Error::Unavailable {
        message: format!(
            "{what} failed: {} (incident {incident}); retry, and give the incident id to the \
             operator if it persists",
            err.kind()
        ),
    }
}

//! What the command line tells its caller: the exit codes (one per kind of
//! failure a script may want to branch on), the failure type every command
//! returns, and the formatting of sizes and times for people. The codes are
//! listed for users in `args::EXIT_CODES_HELP`; keep the two in step.

use std::process::ExitCode;

use trove_client::trove_proto::Error;

/// Why a command failed, and the exit code that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Standard output was closed by its reader: stop quietly.
    OutputClosed = 0,
    /// Anything else: local I/O, an unexpected server error.
    Failure = 1,
    // 2 is left to clap: the command line itself is wrong.
    /// The item does not exist, or the cache missed.
    NotFound = 3,
    /// The server or the CLI refused the input.
    Invalid = 4,
    /// No or unknown credentials, or outside the caller's grant.
    Denied = 5,
    /// The server cannot be reached or is not serving.
    Unavailable = 6,
    /// A server limit was reached.
    Exhausted = 7,
    /// Stored data is damaged.
    DataLoss = 8,
    /// Interrupted by Ctrl-C (SIGINT), as shells report it: 128 + 2.
    Interrupted = 130,
}

/// A failed command: what to print on standard error and how to exit.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// One line for the person or the log reading it.
    pub message: String,
}

impl Failure {
    /// A failure with an explicit kind.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }

    /// A local I/O failure on `what` (a file name, "standard input").
    pub fn io(what: &str, err: &std::io::Error) -> Self {
        Failure::new(Exit::Failure, format!("{what}: {err}"))
    }

    /// A failed write to standard output. A reader that went away (a closed
    /// pipe) is not an error of ours: the command stops quietly with success.
    pub fn stdout(err: &std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::new(Exit::OutputClosed, "")
        } else {
            Failure::io("standard output", err)
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit as u8)
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        let exit = match &err {
            Error::NotFound { .. } => Exit::NotFound,
            Error::InvalidArgument { .. } | Error::FailedPrecondition { .. } => Exit::Invalid,
            Error::Unauthenticated { .. } | Error::PermissionDenied { .. } => Exit::Denied,
            Error::Unavailable { .. }
            | Error::DeadlineExceeded { .. }
            | Error::Cancelled { .. } => Exit::Unavailable,
            Error::ResourceExhausted { .. } => Exit::Exhausted,
            Error::DataLoss { .. } => Exit::DataLoss,
            _ => Exit::Failure,
        };
        Failure::new(exit, err.to_string())
    }
}

/// The result every command returns.
pub type Outcome<T = ()> = Result<T, Failure>;

/// Sizes for people: `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// Microseconds since the epoch as RFC 3339 in UTC, to the second.
pub fn human_time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| micros.to_string())
}

/// Prints one JSON value on its own line.
pub fn print_json(value: &serde_json::Value) -> Outcome {
    write_line(format_args!("{value}"))
}

/// Writes one line to standard output (what [`out!`] expands to).
pub fn write_line(line: std::fmt::Arguments<'_>) -> Outcome {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}").map_err(|e| Failure::stdout(&e))
}

/// Like `println!`, but a closed standard output ends the command quietly
/// (`trove objects ls | head`) instead of panicking; other write errors fail
/// it. Use only in functions returning [`Outcome`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::report::write_line(format_args!($($arg)*))?
    };
}
pub(crate) use out;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every server error kind a script may branch on has its own code.
    #[test]
    fn errors_map_to_distinct_codes() {
        let cases = [
            (Error::not_found("artifact", "k"), Exit::NotFound),
            (Error::invalid("key", "must not be empty"), Exit::Invalid),
            (
                Error::PermissionDenied {
                    message: "no".into(),
                },
                Exit::Denied,
            ),
            (
                Error::Unauthenticated {
                    message: "no".into(),
                },
                Exit::Denied,
            ),
            (
                Error::Unavailable {
                    message: "down".into(),
                },
                Exit::Unavailable,
            ),
            (
                Error::exhausted("max_message_bytes", "big"),
                Exit::Exhausted,
            ),
            (
                Error::DataLoss {
                    message: "bad".into(),
                },
                Exit::DataLoss,
            ),
            (Error::internal("bug"), Exit::Failure),
        ];
        for (err, exit) in cases {
            assert_eq!(Failure::from(err.clone()).exit, exit, "{err}");
        }
    }

    /// Times print as UTC RFC 3339; sizes with binary units.
    #[test]
    fn human_formats() {
        assert_eq!(human_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(human_bytes(1536 * 1024), "1.50 MiB");
    }
}

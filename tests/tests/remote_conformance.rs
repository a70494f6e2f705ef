//! The conformance suite against the real `trove-server` binary, through the
//! Rust client over loopback.

trove_tests::conformance_suite!(trove_tests::target::remote_target());

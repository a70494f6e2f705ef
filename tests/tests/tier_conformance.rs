//! The conformance suite against a server that is a tier in front of
//! another server (`--upstream`), and against a chain of two tiers: a
//! sidecar keeps every contract of the server it fronts.

mod one_tier {
    trove_tests::conformance_suite!(trove_tests::target::tier_target(1));
}

mod two_tiers {
    trove_tests::conformance_suite!(trove_tests::target::tier_target(2));
}

//! The conformance suite against the sled store in-process, in strict and
//! relaxed durability.

mod strict {
    trove_tests::conformance_suite!(trove_tests::target::sled_target(Default::default()));
}

mod relaxed {
    use trove_server::engine::sled::{Durability, StoreOptions};

    fn relaxed() -> StoreOptions {
        StoreOptions {
            durability: Durability::Relaxed,
            ..Default::default()
        }
    }

    trove_tests::conformance_suite!(trove_tests::target::sled_target(relaxed()));
}

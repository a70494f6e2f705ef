//! The sizes and durations of one run, in the three modes (`tiny`, `quick`,
//! `full`). The workloads that read them live beside this file.

use std::time::Duration;

use super::{KIB, MIB};

/// Sizes and durations of one run.
#[derive(Debug, Clone)]
pub struct Params {
    /// `tiny`, `quick` or `full`.
    pub mode: &'static str,
    /// How long each closed-loop or open-loop measurement runs.
    pub duration: Duration,
    /// Callers in flight for the throughput workloads.
    pub concurrency: usize,
    /// Size of the small values.
    pub small_bytes: usize,
    /// Keys the small gets pick from.
    pub small_keys: usize,
    /// Hashes per find-missing call.
    pub find_missing_batch: usize,
    /// Entries in the cassette that is read back.
    pub cassette_entries: usize,
    /// Sizes of the bulk object puts and gets.
    pub bulk_sizes: Vec<usize>,
    /// Size of a cache archive.
    pub archive_bytes: usize,
    /// Concurrency levels of the scaling curve.
    pub concurrency_levels: Vec<usize>,
    /// Payload sizes of the scaling curve.
    pub payload_sizes: Vec<usize>,
    /// Stored-item counts of the scaling curve.
    pub store_levels: Vec<u64>,
    /// 4 KiB values stored before the eviction run (about 55% are evicted).
    pub eviction_values: usize,
    /// The workload groups to run (every group when empty).
    pub only: Vec<String>,
}

impl Params {
    /// Whether the workload group `name` runs in this run.
    pub fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == name)
    }

    /// Finishes in under two minutes on 2 cores.
    pub fn quick() -> Self {
        Params {
            mode: "quick",
            duration: Duration::from_millis(1000),
            concurrency: 16,
            small_bytes: 4 * KIB,
            small_keys: 1000,
            find_missing_batch: 1000,
            cassette_entries: 20_000,
            bulk_sizes: vec![64 * MIB],
            archive_bytes: 5 * MIB,
            concurrency_levels: vec![1, 4, 16, 64, 256],
            payload_sizes: vec![KIB, 16 * KIB, 256 * KIB, 4 * MIB, 64 * MIB],
            store_levels: vec![1_000, 10_000, 100_000],
            eviction_values: 40_000,
            only: Vec::new(),
        }
    }

    /// Every size the issue asks for, with longer measurements.
    pub fn full() -> Self {
        Params {
            mode: "full",
            duration: Duration::from_secs(5),
            small_keys: 10_000,
            cassette_entries: 200_000,
            bulk_sizes: vec![64 * MIB, 1024 * MIB],
            concurrency_levels: vec![1, 2, 4, 8, 16, 32, 64, 128, 256],
            payload_sizes: vec![
                KIB,
                4 * KIB,
                16 * KIB,
                64 * KIB,
                256 * KIB,
                MIB,
                4 * MIB,
                16 * MIB,
                64 * MIB,
            ],
            store_levels: vec![1_000, 10_000, 100_000, 1_000_000],
            eviction_values: 200_000,
            only: Vec::new(),
            ..Self::quick()
        }
    }

    /// Tiny sizes: checks that every workload still runs, measures nothing useful.
    pub fn tiny() -> Self {
        Params {
            mode: "tiny",
            duration: Duration::from_millis(100),
            concurrency: 4,
            small_keys: 20,
            find_missing_batch: 20,
            cassette_entries: 300,
            bulk_sizes: vec![2 * MIB],
            archive_bytes: 64 * KIB,
            concurrency_levels: vec![1, 4],
            payload_sizes: vec![KIB, 128 * KIB],
            store_levels: vec![100, 300],
            eviction_values: 400,
            only: Vec::new(),
            ..Self::quick()
        }
    }
}

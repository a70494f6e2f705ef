//! Cache retention, planned once for every engine: given a tier's refs (their
//! upload times, oldest first), the prune options and the time, which refs go.
//! Pure functions: the engines read the refs and carry the plan out in their
//! own atomic steps (and skip a ref re-uploaded since it was judged).

use trove_proto::cache::PruneOptions;

/// What a prune of one tier removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrunePlan {
    /// The whole PR branch: its newest ref is older than the branch TTL.
    WholeBranch,
    /// These refs, as indices into the refs given (oldest first).
    Refs(Vec<usize>),
}

/// Whether `options` can remove anything from a tier (PR tiers also honour
/// the branch TTL); when not, a prune is a no-op that reads nothing.
pub fn has_work(options: &PruneOptions, is_pr: bool) -> bool {
    options.count > 0
        || options.duration_seconds > 0
        || (is_pr && options.pr_branch_ttl_seconds > 0)
}

/// Plans a prune of one tier whose refs were uploaded at `uploaded_at`
/// (microseconds, oldest first). Each knob applies only when positive:
/// `count` keeps the newest N, `duration_seconds` removes refs older than
/// `now` minus it, and on a PR tier the branch TTL removes the whole branch
/// when even its newest ref is older than `now` minus the TTL.
pub fn plan(uploaded_at: &[i64], is_pr: bool, options: &PruneOptions, now: i64) -> PrunePlan {
    if is_pr && options.pr_branch_ttl_seconds > 0 {
        let cutoff = cutoff(options.pr_branch_ttl_seconds, now);
        if uploaded_at.last().is_some_and(|newest| *newest < cutoff) {
            return PrunePlan::WholeBranch;
        }
    }
    let keep_from = match usize::try_from(options.count) {
        Ok(count) if count > 0 => uploaded_at.len().saturating_sub(count),
        _ => 0,
    };
    let older_than = (options.duration_seconds > 0).then(|| cutoff(options.duration_seconds, now));
    PrunePlan::Refs(
        uploaded_at
            .iter()
            .enumerate()
            .filter(|(i, at)| *i < keep_from || older_than.is_some_and(|c| **at < c))
            .map(|(i, _)| i)
            .collect(),
    )
}

/// Whether a PR branch whose newest ref was uploaded at `newest` has
/// outlived `ttl_seconds` (for `prune_all`).
pub fn branch_expired(newest: Option<i64>, ttl_seconds: i64, now: i64) -> bool {
    ttl_seconds > 0 && newest.is_some_and(|newest| newest < cutoff(ttl_seconds, now))
}

/// `now` minus `seconds`, in microseconds, saturating.
fn cutoff(seconds: i64, now: i64) -> i64 {
    now.saturating_sub(seconds.saturating_mul(1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    fn options(count: i64, duration_seconds: i64, pr_branch_ttl_seconds: i64) -> PruneOptions {
        PruneOptions {
            count,
            duration_seconds,
            pr_branch_ttl_seconds,
        }
    }

    /// Count keeps the newest N; age removes the old; both combine by union.
    #[test]
    fn count_and_age_combine() {
        let refs = [10 * SEC, 20 * SEC, 30 * SEC, 40 * SEC];
        let now = 45 * SEC;
        assert_eq!(
            plan(&refs, false, &options(2, 0, 0), now),
            PrunePlan::Refs(vec![0, 1])
        );
        assert_eq!(
            plan(&refs, false, &options(0, 20, 0), now),
            PrunePlan::Refs(vec![0, 1])
        );
        assert_eq!(
            plan(&refs, false, &options(3, 30, 0), now),
            PrunePlan::Refs(vec![0])
        );
        assert_eq!(
            plan(&refs, false, &options(9, 0, 0), now),
            PrunePlan::Refs(vec![])
        );
    }

    /// The branch TTL takes a whole PR branch, never main, and only when
    /// even its newest ref is too old.
    #[test]
    fn branch_ttl_applies_to_pr_tiers_only() {
        let refs = [10 * SEC, 20 * SEC];
        assert_eq!(
            plan(&refs, true, &options(0, 0, 5), 30 * SEC),
            PrunePlan::WholeBranch
        );
        assert_eq!(
            plan(&refs, true, &options(0, 0, 15), 30 * SEC),
            PrunePlan::Refs(vec![])
        );
        assert_eq!(
            plan(&refs, false, &options(0, 0, 5), 30 * SEC),
            PrunePlan::Refs(vec![])
        );
        assert!(!has_work(&options(0, 0, 5), false));
        assert!(has_work(&options(0, 0, 5), true));
        assert!(!has_work(&options(-1, -1, -1), true));
        assert!(branch_expired(Some(SEC), 1, 3 * SEC));
        assert!(!branch_expired(None, 1, 3 * SEC));
        assert!(!branch_expired(Some(SEC), 0, 3 * SEC));
    }

    /// Huge knobs saturate instead of overflowing: the cutoff of the
    /// longest duration from the latest time is 0, so only the ref uploaded
    /// before the epoch is older than it.
    #[test]
    fn extreme_values_saturate() {
        let refs = [i64::MIN, 0, i64::MAX];
        assert_eq!(
            plan(
                &refs,
                true,
                &options(i64::MAX, i64::MAX, i64::MAX),
                i64::MAX
            ),
            PrunePlan::Refs(vec![0])
        );
        assert_eq!(
            plan(&refs, false, &options(1, 0, 0), 0),
            PrunePlan::Refs(vec![0, 1])
        );
    }
}

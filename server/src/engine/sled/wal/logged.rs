//! Transactions whose effects are captured for the log.
//!
//! A [`LoggedTx`] wraps sled's transactional trees and remembers, per key,
//! the value before the transaction (to undo it if its log record cannot be
//! made durable) and the value after it (the record replayed after a crash).
//! Effects are absolute values, never deltas, so replaying a record twice
//! leaves the same state as replaying it once.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sled::transaction::{TransactionalTree, UnabortableTransactionError};
use sled::IVec;

/// One key's change: its value before and after (absent when `None`).
#[derive(Debug, Clone)]
pub struct Change {
    /// The value before the transaction.
    pub before: Option<IVec>,
    /// The value the transaction left.
    pub after: Option<IVec>,
}

/// The changes of one transaction to one tree, by key.
pub type TreeChanges = BTreeMap<IVec, Change>;

/// The trees of one logged transaction, each recording its changes.
pub struct LoggedTx<'a> {
    trees: &'a [TransactionalTree],
    changes: Vec<RefCell<TreeChanges>>,
}

impl<'a> LoggedTx<'a> {
    pub(super) fn new(trees: &'a [TransactionalTree]) -> Self {
        LoggedTx {
            trees,
            changes: trees.iter().map(|_| RefCell::default()).collect(),
        }
    }

    /// The `index`-th tree given to the write, in the order given.
    ///
    /// # Panics
    /// When `index` is out of range: a programming error at the call site,
    /// which always names trees it passed.
    pub fn tree(&self, index: usize) -> LoggedTree<'_> {
        LoggedTree {
            tree: &self.trees[index],
            changes: &self.changes[index],
        }
    }

    /// The changes made, one map per tree; empty when nothing changed.
    pub(super) fn into_changes(self) -> Vec<TreeChanges> {
        self.changes.into_iter().map(RefCell::into_inner).collect()
    }
}

/// One tree of a [`LoggedTx`]: sled's transactional operations, recorded.
pub struct LoggedTree<'a> {
    tree: &'a TransactionalTree,
    changes: &'a RefCell<TreeChanges>,
}

type TxResult<T> = Result<T, UnabortableTransactionError>;

impl LoggedTree<'_> {
    /// The value under `key`, seeing this transaction's own writes.
    pub fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        self.tree.get(key)
    }

    /// Sets `key` to `value`; returns the value it had.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> TxResult<Option<IVec>> {
        let key = IVec::from(key.as_ref());
        let value = value.into();
        let old = self.tree.insert(key.clone(), value.clone())?;
        self.record(key, old.clone(), Some(value));
        Ok(old)
    }

    /// Removes `key`; returns the value it had.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        let key = IVec::from(key.as_ref());
        let old = self.tree.remove(key.clone())?;
        self.record(key, old.clone(), None);
        Ok(old)
    }

    fn record(&self, key: IVec, old: Option<IVec>, after: Option<IVec>) {
        self.changes
            .borrow_mut()
            .entry(key)
            .and_modify(|change| change.after = after.clone())
            .or_insert(Change { before: old, after });
    }
}

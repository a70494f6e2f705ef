//! Changes gathered for the log before they reach sled.
//!
//! A [`LoggedTx`] is an overlay over sled's trees: reads see the overlay's
//! own writes first, writes stay in the overlay, and per key it remembers
//! the value before (to undo the change if its log record cannot be made
//! durable) and the value after (the record replayed after a crash). The
//! log applies the overlay to sled only when the body succeeded, so an
//! aborted write changes nothing. Effects are absolute values, never
//! deltas, so replaying a record twice leaves the same state as replaying
//! it once.
//!
//! Why not sled's own transactions: every write already runs under the
//! log's lock, so they add no isolation between writers, and in sled 0.34
//! each one seals and writes out sled's I/O buffer twice, handing the write
//! to sled's I/O threads: that cost, not the log's `fdatasync`, bounded
//! strict writes.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use sled::transaction::UnabortableTransactionError;
use sled::IVec;

use crate::engine::sled::packs::{PackLoc, Packs};

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
    trees: &'a [sled::Tree],
    changes: Vec<RefCell<TreeChanges>>,
    /// Values read from sled and not (yet) changed, so that a key read and
    /// then written is read once.
    reads: Vec<RefCell<BTreeMap<IVec, Option<IVec>>>>,
    packs: Option<&'a Packs>,
    /// Values to put in packs, with their places.
    packed: RefCell<Vec<(PackLoc, IVec)>>,
    relocating: Cell<bool>,
}

impl<'a> LoggedTx<'a> {
    pub(super) fn new(trees: &'a [sled::Tree], packs: Option<&'a Packs>) -> Self {
        LoggedTx {
            trees,
            changes: trees.iter().map(|_| RefCell::default()).collect(),
            reads: trees.iter().map(|_| RefCell::default()).collect(),
            packs,
            packed: RefCell::default(),
            relocating: Cell::new(false),
        }
    }

    /// Reserves a place in a pack for `bytes`; the write's record carries
    /// them, and applying it puts them there before any pointer to them is
    /// visible. `None` when this log keeps no packs. A write that fails
    /// afterwards leaves the place unused (dead bytes for compaction).
    pub fn pack(&self, bytes: &[u8]) -> Option<PackLoc> {
        let loc = self.packs?.reserve(bytes.len() as u64);
        self.packed.borrow_mut().push((loc, IVec::from(bytes)));
        Some(loc)
    }

    /// Marks this write as moving values between packs: the records change
    /// only where their bytes are, which is not a use.
    pub fn set_relocating(&self) {
        self.relocating.set(true);
    }

    /// See [`LoggedTx::set_relocating`].
    pub fn relocating(&self) -> bool {
        self.relocating.get()
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
            reads: &self.reads[index],
        }
    }

    /// The name of the `index`-th tree.
    pub fn tree_name(&self, index: usize) -> IVec {
        self.trees[index].name()
    }

    /// What the write changed so far in the `index`-th tree, by key.
    pub fn changes(&self, index: usize) -> std::cell::Ref<'_, TreeChanges> {
        self.changes[index].borrow()
    }

    /// The changes made, one map per tree (empty when nothing changed),
    /// and the values to put in packs.
    pub(super) fn into_changes(self) -> (Vec<TreeChanges>, Vec<(PackLoc, IVec)>) {
        (
            self.changes.into_iter().map(RefCell::into_inner).collect(),
            self.packed.into_inner(),
        )
    }
}

/// One tree of a [`LoggedTx`]: reads through the overlay, recorded writes.
pub struct LoggedTree<'a> {
    tree: &'a sled::Tree,
    changes: &'a RefCell<TreeChanges>,
    reads: &'a RefCell<BTreeMap<IVec, Option<IVec>>>,
}

type TxResult<T> = Result<T, UnabortableTransactionError>;

impl LoggedTree<'_> {
    /// The tree as committed, without this write's changes (for scans).
    pub fn committed(&self) -> &sled::Tree {
        self.tree
    }

    /// The value under `key`, seeing this write's own changes.
    pub fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        if let Some(change) = self.changes.borrow().get(key.as_ref()) {
            return Ok(change.after.clone());
        }
        self.read(key.as_ref())
    }

    /// The committed value under `key`, read from sled once per write.
    fn read(&self, key: &[u8]) -> TxResult<Option<IVec>> {
        if let Some(value) = self.reads.borrow().get(key) {
            return Ok(value.clone());
        }
        let value = self
            .tree
            .get(key)
            .map_err(UnabortableTransactionError::Storage)?;
        self.reads
            .borrow_mut()
            .insert(IVec::from(key), value.clone());
        Ok(value)
    }

    /// Sets `key` to `value`; returns the value it had.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> TxResult<Option<IVec>> {
        self.record(IVec::from(key.as_ref()), Some(value.into()))
    }

    /// Removes `key`; returns the value it had.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<Option<IVec>> {
        self.record(IVec::from(key.as_ref()), None)
    }

    fn record(&self, key: IVec, after: Option<IVec>) -> TxResult<Option<IVec>> {
        let mut changes = self.changes.borrow_mut();
        if let Some(change) = changes.get_mut(&key) {
            return Ok(std::mem::replace(&mut change.after, after));
        }
        let before = self.read(&key)?;
        changes.insert(
            key,
            Change {
                before: before.clone(),
                after,
            },
        );
        Ok(before)
    }
}

//! Storage: a small [`Store`] trait over ordered bytes, with two engines —
//! [`SledStore`] (durable, on disk) and [`MemoryStore`] (tests, simulation) —
//! plus the node's persistent identity ([`load_or_create_node_id`]).
//!
//! The store knows nothing of CRDTs: the node reads a key's bytes, merges in its
//! own code under a per-key lock, and writes the result back in one batch.

mod memory;
mod node_id;
mod sled_engine;

pub use memory::MemoryStore;
pub use node_id::{load_or_create_node_id, random_node_id, NODE_ID_FILE};
pub use sled_engine::SledStore;

use crate::metrics::Histogram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// When a write counts as done.
///
/// | mode | `apply` returns | a crash (power loss, `kill -9`) can lose |
/// |---|---|---|
/// | `Sync` (default) | after the batch is fsynced; concurrent writers share one fsync (group commit) | nothing acknowledged |
/// | `Interval(d)` | at once; a background thread fsyncs every `d` | writes acknowledged in the last `d` (plus the fsync time) |
/// | `None` | at once; a background flush every 500 ms, nothing more | the writes of the last 500 ms, or more under load |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after fsync, with group commit.
    #[default]
    Sync,
    /// Acknowledge at once; fsync periodically.
    Interval(Duration),
    /// Acknowledge at once; never fsync explicitly.
    None,
}

/// A stored key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One change in a [`Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Set a key.
    Put(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Vec<u8>),
}

/// Changes applied atomically: all or none, even across a crash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    changes: Vec<Change>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds a put.
    pub fn put(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Batch {
        self.changes.push(Change::Put(key.into(), value.into()));
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<Vec<u8>>) -> Batch {
        self.changes.push(Change::Delete(key.into()));
        self
    }

    /// The changes, in order (a later change to a key wins).
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Numbers an engine reports for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    /// Bytes the engine occupies (on disk, or in memory for the memory engine).
    pub size_bytes: u64,
    /// Batches applied.
    pub batches: u64,
    /// Latency of each flush (fsync); `None` for an engine that never flushes.
    pub flush_latency: Option<Arc<Histogram>>,
}

impl StoreStats {
    /// The stats as Prometheus gauges: (name, help, value).
    pub fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        vec![
            (
                "calmkv_store_size_bytes",
                "Bytes the storage engine occupies.",
                self.size_bytes as f64,
            ),
            ("calmkv_store_batches", "Write batches applied.", self.batches as f64),
        ]
    }
}

/// Why a store operation failed. The operation may or may not have been applied
/// only where the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed. A failed `apply` may have been applied but not made
    /// durable; a failed read changed nothing.
    #[error("storage engine: {source}")]
    Engine {
        /// The engine's error (kept opaque so that only the engine's file knows
        /// the engine).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file of the data directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node id file exists but does not hold a valid id; refusing to invent a
    /// new identity over it (that would reuse or fork the node's dots).
    #[error("{}: not a valid node id ({reason}); restore it or wipe the data directory", path.display())]
    BadNodeId {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The background flusher failed earlier; durability can no longer be promised.
    #[error("an earlier flush failed: {reason}")]
    FlushFailed {
        /// What the engine said then.
        reason: String,
    },
}

/// An ordered key-value engine with atomic batches and a durability barrier.
///
/// Calls block (a `Sync` apply waits for fsync); async callers run them on the
/// blocking pool.
pub trait Store: Send + Sync {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries whose keys start with `prefix`, in key order, after
    /// `start_after` (exclusive) when given.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Applies every change of `batch` atomically, durable as configured.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;

    /// Returns once everything applied so far is durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Size and flush numbers for the metrics.
    fn stats(&self) -> Result<StoreStats, StoreError>;
}

/// The start of a scan: just after `start_after` if it lies within `prefix`.
pub(crate) fn scan_start(prefix: &[u8], start_after: Option<&[u8]>) -> Vec<u8> {
    match start_after {
        Some(after) if after >= prefix => {
            let mut start = after.to_vec();
            start.push(0); // the smallest key greater than `after`
            start
        }
        _ => prefix.to_vec(),
    }
}

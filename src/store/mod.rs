//! Storage: a small [`Store`] trait over ordered bytes, with three durable
//! engines on disk — [`SledStore`], [`FjallStore`] and [`RedbStore`] — and
//! [`MemoryStore`] and [`FaultyStore`] (tests, simulation), plus the node's persistent identity
//! ([`load_or_create_node_id`]).
//!
//! The store knows nothing of CRDTs: the node reads a key's bytes, merges in its
//! own code under a per-key lock, and writes the result back in one batch.
//!
//! - `durability.rs`: the [`Durability`] modes and what each can lose.
//! - `group_commit.rs`: many `Sync` writers, one flush (engine-independent).
//! - `counting.rs`: [`CountingStore`], which counts the bytes handed to an
//!   engine.
//! - `commit_policy.rs`: the durability modes over group commit, for engines
//!   whose flush is one call (fjall, redb).
//! - `sled_engine.rs`: [`SledStore`], the only file that names sled.
//! - `fjall_engine.rs`: [`FjallStore`], the only file that names fjall.
//! - `redb_engine.rs`: [`RedbStore`], the only file that names redb.
//! - `engine.rs`: [`Engine`] and [`open`], which opens a store directory only
//!   with the engine that made it.
//! - `marker.rs`: the store directory's marker file (engine, format version).
//! - `memory.rs`: [`MemoryStore`].
//! - `faulty.rs`: [`FaultyStore`], a wrapper that injects disk faults and
//!   crashes (tests, simulation).
//! - `space.rs`: [`SpaceGuard`], which refuses writes before the disk is full.
//! - `node_id.rs`: the node id file.

mod commit_policy;
mod counting;
mod durability;
mod engine;
mod faulty;
mod fjall_engine;
mod group_commit;
mod marker;
mod memory;
mod node_id;
mod redb_engine;
mod sled_engine;
mod space;

pub use commit_policy::CommitTicket;
pub use counting::{CountingStore, WriteCounts};
pub use durability::{
    Durability, FLUSH_INTERVAL_MAX, FLUSH_INTERVAL_MIN, NONE_UNFLUSHED_BATCHES_MAX,
    UNFLUSHED_BATCHES_MAX,
};
pub use engine::{open, open_reserving, Engine, UnknownEngine};
pub use faulty::{CrashReport, Fault, FaultRates, FaultyStore};
pub use fjall_engine::FjallStore;
pub use marker::{STORE_FORMAT_VERSION, STORE_MARKER_FILE};
pub use memory::MemoryStore;
pub use node_id::{load_or_create_node_id, random_node_id, NODE_ID_FILE};
pub use redb_engine::RedbStore;
pub use sled_engine::SledStore;
pub use space::{
    SpaceGuard, ENGINE_FULL_RESUME_BYTES, FREE_BYTES_MIN_DEFAULT, WRITABLE_FREE_BYTES_EXTRA,
    WRITE_STALL_MAX,
};

use crate::metrics::Histogram;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// Bytes the engine occupies: on disk for the disk engines (sled: its data
    /// file and blob files; fjall and redb: blocks allocated to their files),
    /// keys plus values for the memory engine.
    pub size_bytes: u64,
    /// Batches applied.
    pub batches: u64,
    /// Latency of each flush this engine ran itself (group commits and explicit
    /// flushes; not sled's own periodic flusher under `Interval` and `None`).
    /// `None` for an engine that never flushes.
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

/// Why a store operation failed. Each variant says whether the store changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed. A failed read changed nothing; a failed `apply` may
    /// have applied its batch (visible to reads) without making it durable.
    #[error("storage engine: {source}")]
    Engine {
        /// The engine's error (kept opaque so that only the engine's file knows
        /// the engine).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file of the data directory could not be read, written or synced. When
    /// it was the sync of a flush, the store refuses writes from then on
    /// ([`StoreError::FlushFailed`]); the batch being acknowledged, if any, is
    /// applied but not durable.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node id file exists but does not hold a valid id; refusing to invent a
    /// new identity over it (that would reuse or fork the node's dots). Nothing
    /// changed: the file is left as found.
    #[error("{}: not a valid node id ({reason}); restore it or wipe the data directory", path.display())]
    BadNodeId {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A flush failed, now or earlier. The kernel may have dropped the pages it
    /// could not write, so a later flush proves nothing: the store refuses every
    /// write from then on, before applying it (nothing changed), until the node
    /// restarts and recovers from what reached the disk. A `Sync` `apply` that was
    /// waiting when the flush failed has its batch applied but not durable.
    #[error("an earlier flush failed, so writes are refused until restart: {reason}")]
    FlushFailed {
        /// What the first failed flush said.
        reason: String,
    },
    /// The data directory is locked by another process, or by a handle of this
    /// process that did not close in time. Nothing was opened.
    #[error("{} is in use by another process (or another store of this one): {source}", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
        /// What the engine said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store directory was made by another engine. Nothing on disk changed.
    #[error("{} holds a {found} store; it cannot be opened with {requested}", path.display())]
    EngineMismatch {
        /// The store directory.
        path: PathBuf,
        /// The engine that made it.
        found: Engine,
        /// The engine asked for.
        requested: Engine,
    },
    /// A new store directory was asked of an engine that only opens existing
    /// ones (sled). Nothing was created.
    #[error("{}: {engine} opens existing store directories only; make new ones with fjall or redb", path.display())]
    EngineRetired {
        /// The store directory.
        path: PathBuf,
        /// The engine asked for.
        engine: Engine,
    },
    /// The store directory is of a newer format than this build reads (a newer
    /// calmkv made it). Nothing on disk changed.
    #[error("{} is in store format {found}; this build reads format {supported} and older", path.display())]
    UnsupportedFormat {
        /// The store directory.
        path: PathBuf,
        /// The directory's format.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// The store directory's marker file is malformed, or the directory holds
    /// files but no marker. Nothing on disk changed.
    #[error("{}: {reason}", path.display())]
    BadMarker {
        /// The marker file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file system holding the store has too little free space for this
    /// batch and the reserve the store keeps ([`FREE_BYTES_MIN_DEFAULT`]), or
    /// the engine itself ran out of space writing it. Nothing changed: the
    /// batch was refused before the engine saw it, or the engine was reopened
    /// from its files without it ([`SpaceGuard`]). Reads keep working, and
    /// writes are accepted again once space is freed.
    #[error("{}: {available_bytes} bytes free, this write needs {needed_bytes} (with the reserve); free some space", path.display())]
    InsufficientStorage {
        /// The store directory.
        path: PathBuf,
        /// Bytes free for the store when it looked.
        available_bytes: u64,
        /// Bytes the batch needs free, the reserve included.
        needed_bytes: u64,
    },
    /// Writes started and none has finished for `stalled_for` (the device does
    /// not answer). Only the readiness probe reports it ([`Store::writable`]);
    /// nothing changed.
    #[error("writes have not finished for {stalled_for:?}: the disk does not answer")]
    WritesStalled {
        /// Since when no write finished while some were waiting.
        stalled_for: std::time::Duration,
    },
    /// The durability setting cannot be used. Nothing was opened.
    #[error("durability {durability:?}: {reason}")]
    InvalidDurability {
        /// The setting.
        durability: Durability,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// An ordered key-value engine with atomic batches and a durability barrier.
///
/// Every engine has the same semantics: a batch is atomic (all or nothing, even
/// across a crash) and isolated (a `get` or a scan page sees all of it or none of
/// it); a scan page is ordered by key.
///
/// Calls block (a `Sync` apply waits for the disk); async callers run them on
/// the blocking pool (`tokio::task::spawn_blocking`), unless the store
/// [`serves_inline`](Store::serves_inline): then they call `get`,
/// `apply_deferred` and `barrier` on their own thread and await the ticket.
pub trait Store: Send + Sync {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries whose keys start with `prefix`, in key order, after
    /// `start_after` (exclusive) when given. A page is one consistent view: it
    /// holds all of a concurrent batch or none of it.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Applies every change of `batch` atomically (a later change to a key wins),
    /// durable as configured.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;

    /// Applies `batch` as [`Store::apply`] does, but returns once it is applied
    /// (visible to reads), with the ticket to wait on before acknowledging it
    /// under the store's durability. The default applies it whole and returns
    /// a ready ticket.
    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        self.apply(batch)?;
        Ok(CommitTicket::ready())
    }

    /// A ticket for a writer that read the store and applied nothing: it
    /// resolves once every batch applied before the call may be acknowledged
    /// (what the writer saw may be a batch still waiting for its flush). The
    /// default is ready: an engine whose `apply` returns only once durable.
    fn barrier(&self) -> CommitTicket {
        CommitTicket::ready()
    }

    /// Whether `get`, `apply_deferred` and `barrier` return within
    /// microseconds (no wait for the device: a `get` may read a page the OS
    /// has not cached, which is one disk read), so that an async caller may
    /// run them on its own thread. The default is `false`: an engine whose
    /// apply waits for the device, or whose calls may stall behind a flush.
    fn serves_inline(&self) -> bool {
        false
    }

    /// Returns once everything applied before the call is durable, in every
    /// durability mode.
    fn flush(&self) -> Result<(), StoreError>;

    /// Size and flush numbers for the metrics.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Whether a write now could be accepted, for the readiness probe: the
    /// error a write would meet (a failed flush, a full disk, writes that do
    /// not finish), without writing. Cheap, and it blocks on nothing a stuck
    /// write holds.
    fn writable(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A boxed store (what [`open`] returns) is a store, so wrappers such as
/// [`CountingStore`] take one.
impl Store for Box<dyn Store> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(key)
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        (**self).scan_prefix(prefix, start_after, limit)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        (**self).apply(batch)
    }

    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        (**self).apply_deferred(batch)
    }

    fn barrier(&self) -> CommitTicket {
        (**self).barrier()
    }

    fn serves_inline(&self) -> bool {
        (**self).serves_inline()
    }

    fn flush(&self) -> Result<(), StoreError> {
        (**self).flush()
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        (**self).stats()
    }

    fn writable(&self) -> Result<(), StoreError> {
        (**self).writable()
    }
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

/// A scan page from an engine's ordered rows starting at [`scan_start`]: the
/// rows while their keys carry `prefix`, at most `limit` of them. Each engine
/// maps its own rows and errors into `rows`, which are read lazily.
pub(crate) fn collect_page(
    rows: impl Iterator<Item = Result<Entry, StoreError>>,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<Entry>, StoreError> {
    let mut page = Vec::new();
    if limit == 0 {
        return Ok(page);
    }
    for row in rows {
        let (key, value) = row?;
        if !key.starts_with(prefix) {
            break;
        }
        page.push((key, value));
        if page.len() == limit {
            break;
        }
    }
    Ok(page)
}

/// Whether this process has opened a store in `dir` before; with `record`,
/// remembers that it has now. An engine whose lock outlives its handle for a
/// moment (background threads finishing) waits for it only in a directory this
/// process opened: any other lock is another process's.
pub(crate) fn opened_in_this_process(dir: &Path, record: bool) -> bool {
    static OPENED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut opened = OPENED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if record {
        !opened.insert(dir)
    } else {
        opened.contains(&dir)
    }
}

/// The bytes the files under `dir` occupy on the device: allocated blocks, not
/// lengths, since fjall preallocates its journal as a sparse file. Files and
/// directories that vanish during the walk (an engine compacting) count as
/// empty. Descends at most [`DIR_DEPTH_MAX`] levels.
pub(crate) fn allocated_bytes(dir: &Path) -> Result<u64, StoreError> {
    fn walk(dir: &Path, depth: usize) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let mut total = 0;
        for entry in entries {
            let entry = entry.map_err(io)?;
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            total += metadata.blocks() * 512;
            if metadata.is_dir() && depth < DIR_DEPTH_MAX {
                total += walk(&entry.path(), depth + 1)?;
            }
        }
        Ok(total)
    }
    walk(dir, 0)
}

/// How deep [`allocated_bytes`] looks: fjall nests three levels.
const DIR_DEPTH_MAX: usize = 8;

/// Behaviour every engine must share, run against each.
#[cfg(test)]
mod contract_tests {
    use super::*;
    use std::thread;

    /// Each engine, named, with the directory that must outlive it.
    fn engines() -> Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> {
        let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let sled = SledStore::open(dirs[0].path(), Durability::Sync).unwrap();
        let fjall = FjallStore::open(dirs[1].path(), Durability::Sync).unwrap();
        let redb = RedbStore::open(dirs[2].path(), Durability::Sync).unwrap();
        let [sled_dir, fjall_dir, redb_dir] = dirs;
        vec![
            ("memory", Box::new(MemoryStore::new()), None),
            ("sled", Box::new(sled), Some(sled_dir)),
            ("fjall", Box::new(fjall), Some(fjall_dir)),
            ("redb", Box::new(redb), Some(redb_dir)),
        ]
    }

    fn keys(rows: Vec<Entry>) -> Vec<String> {
        rows.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect()
    }

    #[test]
    fn a_batch_applies_every_change_in_order() {
        for (name, store, _dir) in engines() {
            store.apply(Batch::new().put("a", "1").put("b", "2")).unwrap();
            store.apply(Batch::new().delete("a").put("b", "3").put("c", "4").delete("c")).unwrap();
            store.apply(Batch::new().put("d", "1").put("d", "2")).unwrap();
            assert_eq!(store.get(b"a").unwrap(), None, "{name}");
            assert_eq!(store.get(b"b").unwrap(), Some(b"3".to_vec()), "{name}");
            assert_eq!(store.get(b"c").unwrap(), None, "{name}");
            assert_eq!(store.get(b"d").unwrap(), Some(b"2".to_vec()), "{name}");
        }
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        for (name, store, _dir) in engines() {
            store.apply(Batch::new().put("k", "v")).unwrap();
            store.apply(Batch::new()).unwrap();
            let all = store.scan_prefix(b"", None, usize::MAX).unwrap();
            assert_eq!(all, [(b"k".to_vec(), b"v".to_vec())], "{name}");
        }
    }

    #[test]
    fn scan_respects_prefix_limit_and_cursor() {
        for (name, store, _dir) in engines() {
            let mut batch = Batch::new().put("a", "").put("c", "");
            for key in ["b/1", "b/2", "b/3", "b0"] {
                batch = batch.put(key, key);
            }
            store.apply(batch).unwrap();
            let scan = |prefix: &str, after: Option<&str>, limit| {
                keys(store.scan_prefix(prefix.as_bytes(), after.map(str::as_bytes), limit).unwrap())
            };
            assert_eq!(scan("b/", None, 2), ["b/1", "b/2"], "{name}");
            assert_eq!(scan("b/", Some("b/2"), 2), ["b/3"], "{name}");
            assert_eq!(scan("b/", Some("b/3"), 2), [] as [&str; 0], "{name}");
            assert_eq!(scan("b/", None, 0), [] as [&str; 0], "{name}");
            assert_eq!(scan("", None, 100).len(), 6, "{name}");
            // A cursor before the prefix starts at the prefix; one past it ends.
            assert_eq!(scan("b/", Some("a"), 10), ["b/1", "b/2", "b/3"], "{name}");
            assert_eq!(scan("b/", Some("b0"), 10), [] as [&str; 0], "{name}");
            // A cursor that is not a stored key still splits the range.
            assert_eq!(scan("b/", Some("b/15"), 10), ["b/2", "b/3"], "{name}");
            assert_eq!(scan("", Some("b/3"), 10), ["b0", "c"], "{name}");
        }
    }

    /// A writer moves a token between the first and the last key of a prefix, one
    /// batch per move, with enough keys between them that sled keeps the two in
    /// different tree nodes; every scan page sees the token exactly once.
    #[test]
    fn a_scan_never_sees_half_a_batch() {
        for (name, store, _dir) in engines() {
            let store: &dyn Store = &*store;
            let mut filler = Batch::new().put("p/a", "token");
            for i in 0..2_000 {
                filler = filler.put(format!("p/m/{i:05}"), vec![0; 64]);
            }
            store.apply(filler).unwrap();
            let moves = 200;
            thread::scope(|scope| {
                scope.spawn(|| {
                    for i in 0..moves {
                        let (from, to) = if i % 2 == 0 { ("p/a", "p/z") } else { ("p/z", "p/a") };
                        store.apply(Batch::new().delete(from).put(to, "token")).unwrap();
                    }
                });
                for _ in 0..moves {
                    let page = store.scan_prefix(b"p/", None, usize::MAX).unwrap();
                    let tokens = page.iter().filter(|(_, v)| v.as_slice() == b"token").count();
                    assert_eq!(tokens, 1, "{name}: a scan saw part of a batch");
                }
            });
        }
    }

    #[test]
    fn size_counts_the_data() {
        for (name, store, _dir) in engines() {
            let empty = store.stats().unwrap();
            // Random bytes: fjall compresses its journal and tables.
            let value: Vec<u8> = (0..10_000).map(|_| rand::random()).collect();
            store.apply(Batch::new().put("k", value)).unwrap();
            let full = store.stats().unwrap();
            assert!(full.size_bytes >= 10_000, "{name}: {full:?}");
            assert!(full.size_bytes > empty.size_bytes, "{name}: {empty:?} then {full:?}");
            assert_eq!(full.batches, empty.batches + 1, "{name}");
        }
    }
}

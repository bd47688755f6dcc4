//! A full disk as an ordinary error: [`SpaceGuard`] refuses a batch, before the
//! engine sees it, when the file system holding the store would keep less than
//! a reserve free after it ([`StoreError::InsufficientStorage`]; nothing
//! changed). Reads never look at it, and once space is freed the next batch is
//! accepted again: no restart.
//!
//! Why before the engine: an engine that runs out of space in the middle of a
//! write does not come back by itself. fjall poisons its database on a failed
//! journal write, redb refuses every later transaction after an I/O error, and
//! sled 0.34 has lost data that way. The reserve also leaves the engines room
//! for what they write on their own — fjall's memtable flushes and compactions,
//! redb's file growth, sled's segments — so it is a heuristic, not a proof: a
//! compaction larger than the reserve, or another process filling the disk,
//! can still make the engine itself fail for lack of space.
//!
//! When it does (the OS said ENOSPC or EDQUOT, to a write or to a flush), the
//! guard answers that batch with the same [`StoreError::InsufficientStorage`]
//! and reopens the engine from its directory at once — what a restart would
//! do: the engine recovers from what reached its files, so the refused batch
//! is not there even if the engine had applied it before its flush failed. From
//! then on writes are refused until [`ENGINE_FULL_RESUME_BYTES`] more than the
//! reserve are free; reads go on. A flush that fails for any other reason is
//! not retried: see [`StoreError::FlushFailed`].
//!
//! The check is one `fstatvfs` of the store directory per batch.

use super::{Batch, Change, CommitTicket, Entry, Store, StoreError, StoreStats};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// The free bytes a store keeps on its file system by default: room for
/// fjall's memtable flushes (8 MiB each) and compactions of a small store,
/// redb's and sled's file growth, and the rest of the system.
pub const FREE_BYTES_MIN_DEFAULT: u64 = 128 << 20;

/// The bytes a batch adds at most before the engine's own overhead: its keys
/// and values.
pub(crate) fn batch_bytes(batch: &Batch) -> u64 {
    batch
        .changes()
        .iter()
        .map(|change| match change {
            Change::Put(k, v) => (k.len() + v.len()) as u64,
            Change::Delete(k) => k.len() as u64,
        })
        .sum()
}

/// What the OS says for a full disk (`strerror(ENOSPC)`), as it appears in the
/// text of a failed flush that the group commit kept.
const NO_SPACE_TEXT: &str = "No space left on device";

/// Whether `error` is, or was caused by, the OS saying the disk (or the
/// user's quota) is full.
pub(crate) fn is_no_space(error: &StoreError) -> bool {
    fn io_no_space(error: &std::io::Error) -> bool {
        use rustix::io::Errno;
        error.kind() == std::io::ErrorKind::StorageFull
            || error.kind() == std::io::ErrorKind::QuotaExceeded
            || error.raw_os_error() == Some(Errno::NOSPC.raw_os_error())
            || error.raw_os_error() == Some(Errno::DQUOT.raw_os_error())
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = match error {
        StoreError::InsufficientStorage { .. } => return true,
        StoreError::FlushFailed { reason } => return reason.contains(NO_SPACE_TEXT),
        StoreError::Io { source, .. } => Some(source),
        StoreError::Engine { source } => Some(&**source),
        _ => None,
    };
    while let Some(error) = next {
        if error.downcast_ref::<std::io::Error>().is_some_and(io_no_space) {
            return true;
        }
        next = error.source();
    }
    false
}

/// Opens the guarded engine again from its directory.
pub(crate) type Reopen = Box<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send + Sync>;

/// After the engine itself ran out of space, the free bytes beyond the
/// reserve (and the batch) that writes wait for: room for the engine's own
/// writes (a fjall memtable flush is 8 MiB), so that the next write does not
/// fail in the engine again at once, and cost another reopen.
pub const ENGINE_FULL_RESUME_BYTES: u64 = 8 << 20;

/// Free bytes beyond the reserve that [`Store::writable`] asks for: a write
/// of the largest value the node takes by default (1 MiB) must fit, so that a
/// disk that refuses the writes clients send is not ready even if a tiny write
/// would still fit.
pub const WRITABLE_FREE_BYTES_EXTRA: u64 = 1 << 20;

/// How long writes may wait with none finishing before [`Store::writable`]
/// says they are stalled (the readiness probe turns not ready): well above a
/// slow fsync under load, well below what a client waits for an answer.
pub const WRITE_STALL_MAX: Duration = Duration::from_secs(5);

/// Writes in flight, and when the last one finished (or the first began),
/// for [`WRITE_STALL_MAX`]: two atomic updates per write.
#[derive(Debug)]
struct Progress {
    /// When the guard was made; times below are milliseconds since.
    epoch: Instant,
    in_flight: AtomicU64,
    last_ms: AtomicU64,
}

impl Progress {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How long writes have waited with none finishing, if some are waiting.
    fn stalled_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return None;
        }
        let since = self.now_ms().saturating_sub(self.last_ms.load(Ordering::Acquire));
        Some(Duration::from_millis(since))
    }
}

/// One write in flight; its end is progress.
struct InFlight<'a>(&'a Progress);

impl<'a> InFlight<'a> {
    fn enter(progress: &'a Progress) -> InFlight<'a> {
        if progress.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            progress.last_ms.store(progress.now_ms(), Ordering::Release);
        }
        InFlight(progress)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The guarded engine and how many times it was opened.
struct Opened {
    /// The engine; `None` after a reopen failed.
    engine: Option<Box<dyn Store>>,
    /// 1 for the first open, one more per reopen.
    generation: u64,
}

/// A store whose writes are refused while its file system is (nearly) full.
pub struct SpaceGuard {
    inner: RwLock<Opened>,
    /// How to open the engine again after it ran out of space (`None`: the
    /// guard cannot, and writes stay refused once it did).
    reopen: Option<Reopen>,
    /// The engine itself ran out of space: writes wait for
    /// [`ENGINE_FULL_RESUME_BYTES`] more.
    engine_full: AtomicBool,
    dir: PathBuf,
    /// The store directory, open for `fstatvfs`.
    dir_file: File,
    free_bytes_min: u64,
    progress: Progress,
}

impl SpaceGuard {
    /// Guards `inner`, whose files live in `dir`, keeping `free_bytes_min`
    /// bytes free. If the engine itself runs out of space, its writes stay
    /// refused for good; [`open`](super::open) guards with a reopen instead.
    pub fn new(
        inner: Box<dyn Store>,
        dir: &Path,
        free_bytes_min: u64,
    ) -> Result<SpaceGuard, StoreError> {
        SpaceGuard::with_reopen(inner, None, dir, free_bytes_min)
    }

    /// Opens the engine with `open` and guards it; after the engine ran out of
    /// space, `open` opens it again.
    pub(crate) fn reopening(
        open: Reopen,
        dir: &Path,
        free_bytes_min: u64,
    ) -> Result<SpaceGuard, StoreError> {
        let inner = open()?;
        SpaceGuard::with_reopen(inner, Some(open), dir, free_bytes_min)
    }

    fn with_reopen(
        inner: Box<dyn Store>,
        reopen: Option<Reopen>,
        dir: &Path,
        free_bytes_min: u64,
    ) -> Result<SpaceGuard, StoreError> {
        let dir_file =
            File::open(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        Ok(SpaceGuard {
            inner: RwLock::new(Opened { engine: Some(inner), generation: 1 }),
            reopen,
            engine_full: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            dir_file,
            free_bytes_min,
            progress: Progress {
                epoch: Instant::now(),
                in_flight: AtomicU64::new(0),
                last_ms: AtomicU64::new(0),
            },
        })
    }

    /// Bytes an unprivileged writer may still use on the store's file system.
    pub fn available_bytes(&self) -> Result<u64, StoreError> {
        let stat = rustix::fs::fstatvfs(&self.dir_file)
            .map_err(|errno| StoreError::Io { path: self.dir.clone(), source: errno.into() })?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Whether the engine itself ran out of space, and writes wait for
    /// [`ENGINE_FULL_RESUME_BYTES`] beyond the reserve.
    pub fn engine_full(&self) -> bool {
        self.engine_full.load(Ordering::Acquire)
    }

    /// The refusal of a batch that needs `needed_bytes` free.
    fn insufficient(&self, needed_bytes: u64) -> StoreError {
        StoreError::InsufficientStorage {
            path: self.dir.clone(),
            available_bytes: self.available_bytes().unwrap_or(0),
            needed_bytes,
        }
    }

    /// The engine for a read or a write, opened again first if the last
    /// reopen failed.
    fn opened(&self) -> Result<RwLockReadGuard<'_, Opened>, StoreError> {
        let opened = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        if opened.engine.is_some() {
            return Ok(opened);
        }
        let generation = opened.generation;
        drop(opened);
        self.reopen_engine(generation)?;
        Ok(self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Drops the engine of `generation` and opens it again from its directory,
    /// as a restart would: it recovers from what reached its files, so a
    /// batch that it applied but could not make durable is gone. A caller that
    /// finds a newer generation already open goes on with it.
    fn reopen_engine(&self, generation: u64) -> Result<(), StoreError> {
        let Some(reopen) = &self.reopen else {
            return Err(self.insufficient(self.free_bytes_min));
        };
        let mut opened = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if opened.generation != generation && opened.engine.is_some() {
            return Ok(());
        }
        // The old engine must let go of its files (and locks) first.
        opened.engine = None;
        opened.generation += 1;
        let engine = reopen().map_err(|error| {
            tracing::error!(%error, dir = %self.dir.display(), "the store could not be reopened");
            if is_no_space(&error) {
                self.insufficient(self.free_bytes_min)
            } else {
                error
            }
        })?;
        opened.engine = Some(engine);
        tracing::warn!(dir = %self.dir.display(), "the store was reopened from its files");
        Ok(())
    }

    /// Runs `read` on the engine.
    fn read<T>(
        &self,
        read: impl FnOnce(&dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let opened = self.opened()?;
        match opened.engine.as_deref() {
            Some(store) => read(store),
            None => Err(self.insufficient(self.free_bytes_min)),
        }
    }

    /// Refuses `batch` when it would eat into the reserve (or the engine ran
    /// out of space and there is not yet room to resume), else hands it to
    /// the engine with `apply`; an engine that runs out of space is reopened.
    fn write<T>(
        &self,
        batch: Batch,
        apply: impl FnOnce(&dyn Store, Batch) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let engine_full = self.engine_full();
        let headroom = if engine_full { ENGINE_FULL_RESUME_BYTES } else { 0 };
        let needed_bytes =
            self.free_bytes_min.saturating_add(batch_bytes(&batch)).saturating_add(headroom);
        let available_bytes = self.available_bytes()?;
        if available_bytes < needed_bytes || (engine_full && self.reopen.is_none()) {
            return Err(StoreError::InsufficientStorage {
                path: self.dir.clone(),
                available_bytes,
                needed_bytes,
            });
        }
        if engine_full {
            self.engine_full.store(false, Ordering::Release);
        }
        let _in_flight = InFlight::enter(&self.progress);
        let opened = self.opened()?;
        let generation = opened.generation;
        let Some(store) = opened.engine.as_deref() else {
            return Err(self.insufficient(needed_bytes));
        };
        let result = apply(store, batch);
        drop(opened);
        result.map_err(|error| self.engine_failed(generation, error, needed_bytes))
    }

    /// After the engine of `generation` failed with `error`: when the OS said
    /// the disk is full, the engine is reopened at once (dropping what the
    /// failed write left applied but not durable) and writes wait for room.
    fn engine_failed(&self, generation: u64, error: StoreError, needed_bytes: u64) -> StoreError {
        if !is_no_space(&error) {
            return error;
        }
        if !self.engine_full.swap(true, Ordering::AcqRel) {
            tracing::warn!(%error, "the storage engine ran out of space; writes are refused until space is freed");
        }
        if let Err(reopen) = self.reopen_engine(generation) {
            tracing::error!(error = %reopen, "reopening the full store failed; reads and writes retry it");
        }
        self.insufficient(needed_bytes)
    }
}

impl Store for SpaceGuard {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|store| store.get(key))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.read(|store| store.scan_prefix(prefix, start_after, limit))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.write(batch, |store, batch| store.apply(batch))
    }

    fn apply_deferred(&self, batch: Batch) -> Result<CommitTicket, StoreError> {
        self.write(batch, |store, batch| store.apply_deferred(batch))
    }

    fn barrier(&self) -> CommitTicket {
        match self.opened() {
            Ok(opened) => match opened.engine.as_deref() {
                Some(store) => store.barrier(),
                None => CommitTicket::ready(),
            },
            Err(_) => CommitTicket::ready(),
        }
    }

    /// As the engine's: the guard's own work is one `fstatvfs`. The one wait
    /// it adds is rare: while the engine is reopened after it ran out of
    /// space, reads and writes wait for the reopen.
    fn serves_inline(&self) -> bool {
        self.opened()
            .ok()
            .and_then(|opened| opened.engine.as_deref().map(|s| s.serves_inline()))
            .unwrap_or(false)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let opened = self.opened()?;
        let generation = opened.generation;
        let Some(store) = opened.engine.as_deref() else {
            return Err(self.insufficient(self.free_bytes_min));
        };
        let result = store.flush();
        drop(opened);
        result.map_err(|error| self.engine_failed(generation, error, self.free_bytes_min))
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|store| store.stats())
    }

    /// Not while writes are stalled ([`WRITE_STALL_MAX`]), the engine is out
    /// of space, the reserve and [`WRITABLE_FREE_BYTES_EXTRA`] are not free, or
    /// the engine refuses writes (a failed flush). Waits for nothing a write holds: while the engine is
    /// being reopened it says so rather than wait.
    fn writable(&self) -> Result<(), StoreError> {
        if let Some(stalled_for) = self.progress.stalled_for() {
            if stalled_for > WRITE_STALL_MAX {
                return Err(StoreError::WritesStalled { stalled_for });
            }
        }
        if self.engine_full() {
            let needed = self.free_bytes_min.saturating_add(ENGINE_FULL_RESUME_BYTES);
            if self.reopen.is_none() || self.available_bytes()? < needed {
                return Err(self.insufficient(needed));
            }
        } else {
            let needed = self.free_bytes_min.saturating_add(WRITABLE_FREE_BYTES_EXTRA);
            if self.available_bytes()? < needed {
                return Err(self.insufficient(needed));
            }
        }
        let opened = match self.inner.try_read() {
            Ok(opened) => opened,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(StoreError::WritesStalled { stalled_for: Duration::ZERO })
            }
        };
        match opened.engine.as_deref() {
            Some(store) => store.writable(),
            None => Err(self.insufficient(self.free_bytes_min)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_batch_that_would_eat_into_the_reserve_is_refused_unapplied() {
        let dir = tempfile::tempdir().unwrap();
        let probe = SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), 0).unwrap();
        let available = probe.available_bytes().unwrap();
        assert!(available > 1 << 20, "the test needs a little free space");
        // A reserve just below what is free: a one-byte value fits, a large one
        // does not (other processes may take some space meanwhile, so the
        // margins are wide).
        let guard =
            SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), available - (512 << 10))
                .unwrap();
        guard.apply(Batch::new().put("small", "v")).unwrap();
        let result = guard.apply(Batch::new().put("large", vec![0; 4 << 20]));
        assert!(
            matches!(result, Err(StoreError::InsufficientStorage { needed_bytes, .. })
                if needed_bytes > available),
            "{result:?}"
        );
        assert_eq!(guard.get(b"large").unwrap(), None, "the refused batch changed nothing");
        assert_eq!(guard.get(b"small").unwrap(), Some(b"v".to_vec()), "reads still work");
        assert_eq!(guard.stats().unwrap().batches, 1);
    }

    #[test]
    fn the_os_saying_the_disk_is_full_is_seen_under_engine_errors() {
        let enospc = || std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        let engine = StoreError::Engine { source: Box::new(enospc()) };
        assert!(is_no_space(&engine));
        assert!(is_no_space(&StoreError::Io { path: "f".into(), source: enospc() }));
        let failed = StoreError::FlushFailed { reason: engine.to_string() };
        assert!(is_no_space(&failed), "{failed}");
        let eio = std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error());
        assert!(!is_no_space(&StoreError::Engine { source: Box::new(eio) }));
        assert!(!is_no_space(&StoreError::FlushFailed { reason: "EIO".into() }));
    }

    /// An engine that runs out of space itself (a `FaultyStore` armed with
    /// `NoSpace`, applying nothing): the batch is refused as
    /// `InsufficientStorage`, the engine is reopened at once, and the next
    /// write, with the room back (this disk has it), goes to the new engine.
    #[test]
    fn an_engine_out_of_space_is_reopened_and_takes_writes_once_there_is_room() {
        use crate::store::{Durability, Fault, FaultyStore};
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let opens = Arc::new(AtomicUsize::new(0));
        let counted = opens.clone();
        let open: Reopen = Box::new(move || {
            let store = FaultyStore::new(Box::new(MemoryStore::new()), Durability::Sync);
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                store.arm(Fault::NoSpace);
            }
            Ok(Box::new(store))
        });
        let guard = SpaceGuard::reopening(open, dir.path(), 0).unwrap();
        let result = guard.apply(Batch::new().put("k", "v"));
        assert!(matches!(result, Err(StoreError::InsufficientStorage { .. })), "{result:?}");
        assert_eq!(opens.load(Ordering::SeqCst), 2, "reopened at once");
        assert!(guard.engine_full());
        assert_eq!(guard.get(b"k").unwrap(), None);
        guard.apply(Batch::new().put("k", "v2")).unwrap();
        assert!(!guard.engine_full());
        assert_eq!(guard.get(b"k").unwrap(), Some(b"v2".to_vec()));
        guard.writable().unwrap();
    }

    #[test]
    fn without_a_reopen_an_engine_out_of_space_stays_refused() {
        use crate::store::{Durability, Fault, FaultyStore};
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(Box::new(MemoryStore::new()), Durability::Sync);
        store.arm(Fault::NoSpace);
        let guard = SpaceGuard::new(Box::new(store), dir.path(), 0).unwrap();
        for _ in 0..2 {
            let result = guard.apply(Batch::new().put("k", "v"));
            assert!(matches!(result, Err(StoreError::InsufficientStorage { .. })), "{result:?}");
        }
        assert!(matches!(guard.writable(), Err(StoreError::InsufficientStorage { .. })));
        assert_eq!(guard.get(b"k").unwrap(), None, "reads still work");
    }

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let guard = SpaceGuard::new(Box::new(MemoryStore::new()), dir.path(), u64::MAX).unwrap();
        let result = guard.apply(Batch::new().put("k", "v"));
        assert!(matches!(result, Err(StoreError::InsufficientStorage { .. })), "{result:?}");
        assert_eq!(guard.scan_prefix(b"", None, 10).unwrap(), []);
    }
}

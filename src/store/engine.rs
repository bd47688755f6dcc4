//! Choosing an engine: [`Engine`] names the three disk engines, and [`open`]
//! opens a store directory with one of them — only if the directory's marker
//! (see `marker.rs`) says that engine made it, in a format this build reads.

use super::marker::{self, Marker};
use super::FREE_BYTES_MIN_DEFAULT;
use super::{Durability, FjallStore, RedbStore, SledStore, SpaceGuard, Store, StoreError};
use std::path::Path;

/// A disk engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Engine {
    /// sled 0.34.7: a log-structured B-tree, calmkv's first engine. It opens
    /// the store directories it made, and makes no new ones
    /// ([`StoreError::EngineRetired`]): it fails the space test (overwritten
    /// values are never reclaimed while calmkv runs it).
    Sled,
    /// fjall 3: an LSM tree with a journal.
    #[default]
    Fjall,
    /// redb 5: a copy-on-write B-tree in one file.
    Redb,
}

impl Engine {
    /// Every engine.
    pub const ALL: [Engine; 3] = [Engine::Sled, Engine::Fjall, Engine::Redb];

    /// The engines that make new store directories.
    pub const FOR_NEW_STORES: [Engine; 2] = [Engine::Fjall, Engine::Redb];

    /// Whether the engine makes new store directories (sled only opens old ones).
    pub fn makes_new_stores(self) -> bool {
        Engine::FOR_NEW_STORES.contains(&self)
    }

    /// The engine's name, as `--engine` and the marker file spell it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Fjall => "fjall",
            Engine::Redb => "redb",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an engine's.
#[derive(Debug, thiserror::Error)]
#[error("unknown storage engine {name:?} (expected sled, fjall or redb)")]
pub struct UnknownEngine {
    /// The name given.
    pub name: String,
}

impl std::str::FromStr for Engine {
    type Err = UnknownEngine;

    fn from_str(name: &str) -> Result<Engine, UnknownEngine> {
        Engine::ALL
            .into_iter()
            .find(|engine| engine.name() == name)
            .ok_or_else(|| UnknownEngine { name: name.to_string() })
    }
}

/// sled's files in a store directory that predates the marker file: calmkv
/// 0.1 wrote sled directories without one.
const LEGACY_SLED_FILES: [&str; 2] = ["conf", "db"];

/// What a directory without a marker holds.
enum Unmarked {
    /// Nothing (or no directory yet): a new store.
    Empty,
    /// A sled store from before the marker.
    LegacySled,
    /// Something else: not a store this build made.
    Unknown,
}

fn unmarked(dir: &Path) -> Result<Unmarked, StoreError> {
    let mut names = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Unmarked::Empty),
        Err(source) => return Err(StoreError::Io { path: dir.to_path_buf(), source }),
    };
    names.sort();
    if names.is_empty() {
        Ok(Unmarked::Empty)
    } else if LEGACY_SLED_FILES.iter().all(|file| names.iter().any(|n| n == file)) {
        Ok(Unmarked::LegacySled)
    } else {
        Ok(Unmarked::Unknown)
    }
}

/// Refuses a directory made by `found` when `requested` is another engine.
fn check(dir: &Path, found: Engine, requested: Option<Engine>) -> Result<Engine, StoreError> {
    match requested {
        Some(requested) if requested != found => {
            Err(StoreError::EngineMismatch { path: dir.to_path_buf(), found, requested })
        }
        _ => Ok(found),
    }
}

/// Opens (or creates) the store in `dir`: with `engine` when given, else with
/// the engine the directory records, or [`Engine::default`] for a new one.
///
/// A new directory gets a marker naming its engine before the engine writes
/// anything. A directory whose marker names another engine than `engine` is
/// refused with [`StoreError::EngineMismatch`], one of a newer format with
/// [`StoreError::UnsupportedFormat`], one holding files but no marker (and no
/// sled store from before markers) with [`StoreError::BadMarker`]; in each case
/// nothing on disk changes. A sled directory from before markers opens with
/// sled, and gets its marker once sled has opened it.
///
/// The store refuses writes that would leave less than
/// [`FREE_BYTES_MIN_DEFAULT`] free on its file system ([`SpaceGuard`]), and
/// writes the engine itself could not make for lack of space, with
/// [`StoreError::InsufficientStorage`]; once space is freed it reopens the
/// engine and takes writes again.
pub fn open(
    engine: Option<Engine>,
    dir: &Path,
    durability: Durability,
) -> Result<Box<dyn Store>, StoreError> {
    open_reserving(engine, dir, durability, FREE_BYTES_MIN_DEFAULT)
}

/// [`open`], keeping `free_bytes_min` bytes free instead of the default.
pub fn open_reserving(
    engine: Option<Engine>,
    dir: &Path,
    durability: Durability,
    free_bytes_min: u64,
) -> Result<Box<dyn Store>, StoreError> {
    let durability = durability.validate()?;
    let mut legacy = false;
    let mut older_format = false;
    let chosen = match marker::read(dir)? {
        Some(found) => {
            older_format = found.format < marker::STORE_FORMAT_VERSION;
            check(dir, found.engine, engine)?
        }
        None => match unmarked(dir)? {
            Unmarked::Empty => {
                let new = engine.unwrap_or_default();
                if !new.makes_new_stores() {
                    return Err(StoreError::EngineRetired { path: dir.to_path_buf(), engine: new });
                }
                std::fs::create_dir_all(dir)
                    .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
                // Another process may have won the race with another engine.
                let created = marker::create(dir, Marker::current(new))?;
                check(dir, created.engine, Some(new))?
            }
            Unmarked::LegacySled => {
                legacy = true;
                check(dir, Engine::Sled, engine)?
            }
            Unmarked::Unknown => {
                let path = dir.join(marker::STORE_MARKER_FILE);
                let reason = "the directory holds files but no marker: not a calmkv store";
                return Err(StoreError::BadMarker { path, reason });
            }
        },
    };
    let engine_dir = dir.to_path_buf();
    let open_engine = move || -> Result<Box<dyn Store>, StoreError> {
        Ok(match chosen {
            Engine::Sled => Box::new(SledStore::open(&engine_dir, durability)?),
            Engine::Fjall => Box::new(FjallStore::open(&engine_dir, durability)?),
            Engine::Redb => Box::new(RedbStore::open(&engine_dir, durability)?),
        })
    };
    // The guard opens the engine, and opens it again after it ran out of
    // space; not sled, which reports its files corrupt when opened again after
    // an ENOSPC (tests/space.rs): its writes stay refused until a restart.
    let guard = if chosen == Engine::Sled {
        SpaceGuard::new(open_engine()?, dir, free_bytes_min)?
    } else {
        SpaceGuard::reopening(Box::new(open_engine), dir, free_bytes_min)?
    };
    if legacy {
        let created = marker::create(dir, Marker::current(Engine::Sled))?;
        check(dir, created.engine, Some(Engine::Sled))?;
    }
    if older_format {
        // Before anything is written in this build's format: from here on an
        // older build refuses the directory instead of misreading it.
        marker::upgrade(dir, Marker::current(chosen))?;
    }
    Ok(Box::new(guard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Batch;
    use std::collections::BTreeMap;

    /// Every file under `dir` with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(next) = todo.pop() {
            for entry in std::fs::read_dir(&next).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    files.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        files
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for engine in Engine::ALL {
            assert_eq!(engine.name().parse::<Engine>().unwrap(), engine);
        }
        assert!("rocksdb".parse::<Engine>().is_err());
        assert!("Sled".parse::<Engine>().is_err());
    }

    /// Makes a store of `engine` in `dir` holding `k = v`: sled's the way calmkv
    /// made them before markers, then opened once through [`open`].
    fn make(engine: Engine, dir: &Path) {
        if engine == Engine::Sled {
            let sled = SledStore::open(dir, Durability::Sync).unwrap();
            sled.apply(Batch::new().put("k", "v")).unwrap();
            drop(sled);
            drop(open(Some(Engine::Sled), dir, Durability::Sync).unwrap());
        } else {
            let store = open(Some(engine), dir, Durability::Sync).unwrap();
            store.apply(Batch::new().put("k", "v")).unwrap();
        }
    }

    #[test]
    fn sled_makes_no_new_store_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let result = open(Some(Engine::Sled), &path, Durability::Sync);
        assert!(
            matches!(result, Err(StoreError::EngineRetired { engine: Engine::Sled, .. })),
            "{:?}",
            result.err()
        );
        assert!(!path.exists());
        let empty = tempfile::tempdir().unwrap();
        assert!(open(Some(Engine::Sled), empty.path(), Durability::Sync).is_err());
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_new_directory_records_its_engine_and_reopens_with_it() {
        for engine in Engine::FOR_NEW_STORES {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let store = open(Some(engine), &path, Durability::Sync).unwrap();
            store.apply(Batch::new().put("k", "v")).unwrap();
            drop(store);
            assert_eq!(marker::read(&path).unwrap(), Some(Marker::current(engine)));
            let store = open(Some(engine), &path, Durability::Sync).unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()), "{engine}");
        }
    }

    #[test]
    fn another_engine_is_refused_and_changes_nothing_on_disk() {
        for made_by in Engine::ALL {
            let dir = tempfile::tempdir().unwrap();
            make(made_by, dir.path());
            let before = snapshot(dir.path());
            for other in Engine::ALL.into_iter().filter(|e| *e != made_by) {
                let result = open(Some(other), dir.path(), Durability::Sync);
                assert!(
                    matches!(result, Err(StoreError::EngineMismatch { found, requested, .. })
                        if found == made_by && requested == other),
                    "{made_by} opened with {other}: {:?}",
                    result.err()
                );
                assert_eq!(snapshot(dir.path()), before, "{made_by} opened with {other}");
            }
            let store = open(Some(made_by), dir.path(), Durability::Sync).unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
        }
    }

    #[test]
    fn a_newer_format_is_refused_and_changes_nothing_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(Some(Engine::Fjall), dir.path(), Durability::Sync).unwrap());
        let newer = "calmkv store\nformat 3\nengine fjall\n";
        std::fs::write(dir.path().join(marker::STORE_MARKER_FILE), newer).unwrap();
        let before = snapshot(dir.path());
        for engine in Engine::ALL {
            let result = open(Some(engine), dir.path(), Durability::Sync);
            assert!(
                matches!(result, Err(StoreError::UnsupportedFormat { found: 3, supported: 2, .. })),
                "{engine}: {:?}",
                result.err()
            );
        }
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn a_format_1_directory_opens_and_its_marker_is_raised() {
        for engine in Engine::FOR_NEW_STORES {
            let dir = tempfile::tempdir().unwrap();
            let store = open(Some(engine), dir.path(), Durability::Sync).unwrap();
            store.apply(Batch::new().put("k", "v")).unwrap();
            drop(store);
            let v1 = format!("calmkv store\nformat 1\nengine {engine}\n");
            std::fs::write(dir.path().join(marker::STORE_MARKER_FILE), v1).unwrap();
            let store = open(None, dir.path(), Durability::Sync).unwrap();
            assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()), "{engine}");
            assert_eq!(marker::read(dir.path()).unwrap(), Some(Marker::current(engine)));
        }
    }

    /// A sled directory as calmkv wrote it before markers: made by the sled
    /// engine alone.
    #[test]
    fn a_sled_directory_without_a_marker_opens_with_sled_only() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path(), Durability::Sync).unwrap();
        sled.apply(Batch::new().put("old", "data")).unwrap();
        drop(sled);
        assert_eq!(marker::read(dir.path()).unwrap(), None);
        let before = snapshot(dir.path());
        for other in [Engine::Fjall, Engine::Redb] {
            let result = open(Some(other), dir.path(), Durability::Sync);
            assert!(
                matches!(result, Err(StoreError::EngineMismatch { found: Engine::Sled, .. })),
                "{other}: {:?}",
                result.err()
            );
            assert_eq!(snapshot(dir.path()), before, "{other}");
        }
        let store = open(None, dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.get(b"old").unwrap(), Some(b"data".to_vec()));
        assert_eq!(marker::read(dir.path()).unwrap(), Some(Marker::current(Engine::Sled)));
    }

    #[test]
    fn without_an_engine_a_directory_opens_with_its_own_and_a_new_one_with_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(Some(Engine::Redb), dir.path(), Durability::Sync).unwrap();
        store.apply(Batch::new().put("k", "v")).unwrap();
        drop(store);
        let store = open(None, dir.path(), Durability::Sync).unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"v".to_vec()));
        drop(store);
        let new = dir.path().join("new");
        drop(open(None, &new, Durability::Sync).unwrap());
        assert_eq!(marker::read(&new).unwrap(), Some(Marker::current(Engine::default())));
    }

    #[test]
    fn a_directory_of_unknown_files_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        for engine in Engine::ALL {
            let result = open(Some(engine), dir.path(), Durability::Sync);
            assert!(matches!(result, Err(StoreError::BadMarker { .. })), "{:?}", result.err());
        }
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["notes.txt"]);
    }

    #[test]
    fn an_invalid_durability_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let result =
            open(Some(Engine::Fjall), &path, Durability::Interval(std::time::Duration::ZERO));
        assert!(matches!(result, Err(StoreError::InvalidDurability { .. })));
        assert!(!path.exists());
    }
}

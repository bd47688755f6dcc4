//! The store directory's marker file: which engine made the directory, and in
//! which format of calmkv's store, so that a directory is never opened with an
//! engine that cannot read it, nor by a build older than its format.
//!
//! The file (`calmkv-store`) is text, three lines:
//!
//! ```text
//! calmkv store
//! format 2
//! engine fjall
//! ```
//!
//! It is created once, before the engine writes anything, atomically and
//! durably (a temporary file, fsynced, hard-linked to its name — which fails if
//! the name exists, so two processes starting at once agree on one marker —
//! then the directory fsynced). It is rewritten only to raise an older format
//! to this build's ([`upgrade`]), atomically too (a rename over it), after the
//! engine opened and before anything is written. The format line comes
//! before the engine line, so a newer format is recognised as such even if it
//! names an engine this build does not know.
//!
//! Formats: 1 kept each key's whole envelope in one row; 2 adds the per-key
//! delta log and a longer digest index entry (`node/delta_log.rs`). A format-2
//! build reads format-1 rows as they are, so the upgrade moves no data; a
//! format-1 build would misread a format-2 directory, so it must refuse it.

use super::{Engine, StoreError};
use std::io::{ErrorKind, Read, Write};
use std::path::Path;

/// The marker file, inside the store directory.
pub const STORE_MARKER_FILE: &str = "calmkv-store";

/// The format of calmkv's store that this build writes and reads. A directory
/// of a newer format is refused ([`StoreError::UnsupportedFormat`]).
pub const STORE_FORMAT_VERSION: u32 = 2;

/// The first line of every marker.
const MAGIC: &str = "calmkv store";

/// A marker is a few dozen bytes; a longer file is not one.
const MARKER_BYTES_MAX: u64 = 256;

/// What a marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) format: u32,
    pub(crate) engine: Engine,
}

impl Marker {
    /// The marker this build writes for `engine`.
    pub(crate) fn current(engine: Engine) -> Marker {
        Marker { format: STORE_FORMAT_VERSION, engine }
    }

    fn encode(self) -> String {
        format!("{MAGIC}\nformat {}\nengine {}\n", self.format, self.engine)
    }

    /// Decodes a marker. A newer format is [`StoreError::UnsupportedFormat`],
    /// whatever follows its format line.
    fn decode(path: &Path, bytes: &[u8]) -> Result<Marker, StoreError> {
        let bad = |reason| StoreError::BadMarker { path: path.to_path_buf(), reason };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.split_inclusive('\n');
        if lines.next() != Some("calmkv store\n") {
            return Err(bad("the first line is not `calmkv store`"));
        }
        let format = lines
            .next()
            .and_then(|line| line.strip_prefix("format "))
            .and_then(|line| line.strip_suffix('\n'))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u32>().ok())
            .ok_or_else(|| bad("the second line is not `format N`"))?;
        if format > STORE_FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: format,
                supported: STORE_FORMAT_VERSION,
            });
        }
        if format == 0 {
            return Err(bad("format 0 does not exist"));
        }
        let engine = lines
            .next()
            .and_then(|line| line.strip_prefix("engine "))
            .and_then(|line| line.strip_suffix('\n'))
            .and_then(|name| name.parse::<Engine>().ok())
            .ok_or_else(|| bad("the third line is not `engine sled|fjall|redb`"))?;
        if lines.next().is_some() {
            return Err(bad("more than three lines"));
        }
        Ok(Marker { format, engine })
    }
}

/// The marker of the store in `dir`, `None` if there is none (or no `dir`).
pub(crate) fn read(dir: &Path) -> Result<Option<Marker>, StoreError> {
    let path = dir.join(STORE_MARKER_FILE);
    let mut bytes = Vec::new();
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    file.take(MARKER_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| StoreError::Io { path: path.clone(), source })?;
    if bytes.len() as u64 > MARKER_BYTES_MAX {
        return Err(StoreError::BadMarker { path, reason: "longer than any marker" });
    }
    Marker::decode(&path, &bytes).map(Some)
}

/// Creates the marker in the existing directory `dir`, atomically and durably;
/// returns the marker that is there afterwards: `marker`, or the one another
/// process created first.
pub(crate) fn create(dir: &Path, marker: Marker) -> Result<Marker, StoreError> {
    let path = dir.join(STORE_MARKER_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    // A name of its own, so that concurrent creators do not write one file.
    let unique: u64 = rand::random();
    let temp = dir.join(format!("{STORE_MARKER_FILE}.{}.{unique:016x}.tmp", std::process::id()));
    let written = std::fs::File::create_new(&temp)
        .and_then(|mut file| {
            file.write_all(marker.encode().as_bytes())?;
            file.sync_all()
        })
        .map_err(io(&temp));
    let linked = written.and_then(|()| match std::fs::hard_link(&temp, &path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(&path)(e)),
    });
    let _ = std::fs::remove_file(&temp);
    if !linked? {
        return read(dir)?.ok_or(StoreError::BadMarker { path, reason: "vanished while opening" });
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(marker)
}

/// Raises the marker of `dir` to `marker` (same engine, this build's format):
/// a temporary file, fsynced, renamed over the marker, the directory fsynced.
/// A crash leaves the old marker or the new one, never neither.
pub(crate) fn upgrade(dir: &Path, marker: Marker) -> Result<(), StoreError> {
    let path = dir.join(STORE_MARKER_FILE);
    let unique: u64 = rand::random();
    let temp = dir.join(format!("{STORE_MARKER_FILE}.{}.{unique:016x}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let written = std::fs::File::create_new(&temp)
        .and_then(|mut file| {
            file.write_all(marker.encode().as_bytes())?;
            file.sync_all()
        })
        .map_err(io(&temp))
        .and_then(|()| std::fs::rename(&temp, &path).map_err(io(&path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Marker, StoreError> {
        Marker::decode(Path::new(STORE_MARKER_FILE), bytes)
    }

    /// Stored samples of every format this build reads.
    #[test]
    fn format_1_and_2_markers_decode() {
        for (text, format, engine) in [
            ("calmkv store\nformat 1\nengine sled\n", 1, Engine::Sled),
            ("calmkv store\nformat 1\nengine fjall\n", 1, Engine::Fjall),
            ("calmkv store\nformat 1\nengine redb\n", 1, Engine::Redb),
            ("calmkv store\nformat 2\nengine sled\n", 2, Engine::Sled),
            ("calmkv store\nformat 2\nengine fjall\n", 2, Engine::Fjall),
            ("calmkv store\nformat 2\nengine redb\n", 2, Engine::Redb),
        ] {
            let marker = decode(text.as_bytes()).unwrap();
            assert_eq!(marker, Marker { format, engine });
            assert_eq!(marker.encode(), text, "encoding is the inverse");
        }
    }

    #[test]
    fn upgrade_replaces_the_marker_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), Marker { format: 1, engine: Engine::Redb }).unwrap();
        upgrade(dir.path(), Marker::current(Engine::Redb)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(Marker::current(Engine::Redb)));
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [STORE_MARKER_FILE]);
    }

    #[test]
    fn a_newer_format_is_unsupported_whatever_follows() {
        for text in
            ["calmkv store\nformat 3\nengine sled\n", "calmkv store\nformat 7\nengine lmdb\n"]
        {
            let result = decode(text.as_bytes());
            assert!(
                matches!(result, Err(StoreError::UnsupportedFormat { found, supported: 2, .. }) if found > 2),
                "{text:?}: {result:?}"
            );
        }
    }

    #[test]
    fn malformed_markers_are_refused() {
        let garbage: [&[u8]; 11] = [
            b"",
            b"\n",
            b"calmkv store\n",
            b"calmkv store\nformat 1\n",
            b"calmkv store\nformat 1\nengine sled",
            b"calmkv store\nformat 1\nengine rocksdb\n",
            b"calmkv store\nformat 0\nengine sled\n",
            b"calmkv store\nformat +1\nengine sled\n",
            b"calmkv store\nformat 99999999999\nengine sled\n",
            b"calmkv store\nformat 1\nengine sled\nextra\n",
            b"\xff\xfe garbage",
        ];
        for bytes in garbage {
            let result = decode(bytes);
            assert!(matches!(result, Err(StoreError::BadMarker { .. })), "{bytes:?}: {result:?}");
        }
    }

    #[test]
    fn create_is_atomic_and_keeps_the_first_marker() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let first = create(dir.path(), Marker::current(Engine::Fjall)).unwrap();
        assert_eq!(first, Marker::current(Engine::Fjall));
        // A second creator finds the first marker and gets it back.
        let second = create(dir.path(), Marker::current(Engine::Redb)).unwrap();
        assert_eq!(second, first);
        assert_eq!(read(dir.path()).unwrap(), Some(first));
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [STORE_MARKER_FILE], "no temporary file is left behind");
    }

    #[test]
    fn an_oversized_marker_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STORE_MARKER_FILE), vec![b'x'; 10_000]).unwrap();
        assert!(matches!(read(dir.path()), Err(StoreError::BadMarker { .. })));
    }
}

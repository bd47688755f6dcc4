//! The node's identity: a random non-zero 64-bit id, created on first start and
//! kept in the data directory, so dots the node issues are never reused by another
//! node. A wiped directory means a new node.
//!
//! The file holds the id as 16 lowercase hex digits and a newline. It is created
//! once, atomically and durably: written to a temporary file, fsynced, then
//! hard-linked to its name, which fails if the name exists — so two processes
//! starting at once on one directory agree on one id — and the directory is
//! fsynced. It is never rewritten. A file that does not hold exactly that format
//! is an error, never a reason to invent a new identity.

use super::StoreError;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;

/// The file, inside the data directory, that holds the id.
pub const NODE_ID_FILE: &str = "node-id";

/// The file's exact length: 16 hex digits and a newline.
const NODE_ID_FILE_BYTES: usize = 17;

/// A fresh random non-zero id.
pub fn random_node_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// Reads the id in `dir`, creating it (atomically, durably) on first start.
/// `dir` must exist.
pub fn load_or_create_node_id(dir: &Path) -> Result<u64, StoreError> {
    match read_node_id(dir) {
        Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
            create_node_id(dir)
        }
        result => result,
    }
}

fn read_node_id(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join(NODE_ID_FILE);
    let bad = |reason| StoreError::BadNodeId { path: path.clone(), reason };
    let mut bytes = Vec::with_capacity(NODE_ID_FILE_BYTES + 1);
    std::fs::File::open(&path)
        // One byte more than a valid file, to tell "too long" from "exact".
        .and_then(|file| file.take(NODE_ID_FILE_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|source| StoreError::Io { path: path.clone(), source })?;
    let digits = bytes.strip_suffix(b"\n").ok_or_else(|| bad("it does not end with a newline"))?;
    if digits.len() != 16 {
        return Err(bad("expected 16 hex digits"));
    }
    if !digits.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("not lowercase hexadecimal"));
    }
    let text = std::str::from_utf8(digits).expect("checked: ASCII hex digits");
    let id = u64::from_str_radix(text, 16).expect("checked: 16 hex digits fit in a u64");
    if id == 0 {
        return Err(bad("the id is zero"));
    }
    Ok(id)
}

fn create_node_id(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join(NODE_ID_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let id = random_node_id();
    // A name of its own, so that concurrent creators do not write one file.
    let temp = dir.join(format!("{NODE_ID_FILE}.{}.{:016x}.tmp", std::process::id(), id));
    let written = std::fs::File::create_new(&temp)
        .and_then(|mut file| {
            file.write_all(format!("{id:016x}\n").as_bytes())?;
            file.sync_all()
        })
        .map_err(io(&temp));
    let linked = written.and_then(|()| match std::fs::hard_link(&temp, &path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(&path)(e)),
    });
    // The temporary file is only a name now (or garbage after an error).
    let _ = std::fs::remove_file(&temp);
    if !linked? {
        // Another process created the id first: it is this node's id too.
        return read_node_id(dir);
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn node_id_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_node_id(dir.path()).unwrap();
        assert_ne!(first, 0);
        assert_eq!(load_or_create_node_id(dir.path()).unwrap(), first);
        let text = std::fs::read_to_string(dir.path().join(NODE_ID_FILE)).unwrap();
        assert_eq!(text, format!("{first:016x}\n"));
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [NODE_ID_FILE], "no temporary file is left behind");
    }

    #[test]
    fn a_wiped_directory_gets_a_new_id() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_ne!(
            load_or_create_node_id(a.path()).unwrap(),
            load_or_create_node_id(b.path()).unwrap()
        );
    }

    #[test]
    fn a_corrupt_node_id_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: [&[u8]; 10] = [
            b"",
            b"\n",
            b"xyz\n",
            b"0000000000000000\n",
            b"12345\n",
            b"0123456789abcdef",          // cut short
            b"0123456789abcdef\n\n",      // too long
            b"+123456789abcdef\n",        // a sign that `from_str_radix` would take
            b"0123456789ABCDEF\n",        // not the format this code writes
            b"\xff\xfe\x00\x01garbage\n", // not text at all
        ];
        for garbage in garbage {
            std::fs::write(dir.path().join(NODE_ID_FILE), garbage).unwrap();
            let result = load_or_create_node_id(dir.path());
            assert!(matches!(result, Err(StoreError::BadNodeId { .. })), "{garbage:?}: {result:?}");
            assert_eq!(std::fs::read(dir.path().join(NODE_ID_FILE)).unwrap(), garbage);
        }
    }

    #[test]
    fn a_missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let result = load_or_create_node_id(&dir.path().join("missing"));
        assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_id() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = thread::scope(|scope| {
            let handles: Vec<_> =
                (0..8).map(|_| scope.spawn(|| load_or_create_node_id(dir.path()))).collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(ids.iter().all(|&id| id == ids[0]), "{ids:x?}");
        assert_eq!(load_or_create_node_id(dir.path()).unwrap(), ids[0]);
    }
}

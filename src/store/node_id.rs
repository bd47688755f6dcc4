//! The node's identity: a random non-zero 64-bit id, created on first start and
//! kept in the data directory, so dots the node issues are never reused by another
//! node. A wiped directory means a new node.

use super::StoreError;
use std::io::Write;
use std::path::Path;

/// The file, inside the data directory, that holds the id (16 hex digits).
pub const NODE_ID_FILE: &str = "node-id";

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
pub fn load_or_create_node_id(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join(NODE_ID_FILE);
    let io = |source| StoreError::Io { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bad = |reason| StoreError::BadNodeId { path: path.clone(), reason };
            let text = text.trim_end_matches('\n');
            if text.len() != 16 {
                return Err(bad("expected 16 hex digits"));
            }
            let id = u64::from_str_radix(text, 16).map_err(|_| bad("not hexadecimal"))?;
            if id == 0 {
                return Err(bad("the id is zero"));
            }
            Ok(id)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = random_node_id();
            let temp = dir.join(format!("{NODE_ID_FILE}.tmp"));
            let mut file = std::fs::File::create(&temp).map_err(io)?;
            writeln!(file, "{id:016x}").map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&temp, &path).map_err(io)?;
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(id)
        }
        Err(error) => Err(io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_node_id(dir.path()).unwrap();
        assert_ne!(first, 0);
        assert_eq!(load_or_create_node_id(dir.path()).unwrap(), first);
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
        for garbage in ["", "xyz", "0000000000000000\n", "12345"] {
            std::fs::write(dir.path().join(NODE_ID_FILE), garbage).unwrap();
            let result = load_or_create_node_id(dir.path());
            assert!(matches!(result, Err(StoreError::BadNodeId { .. })), "{garbage:?}: {result:?}");
            assert_eq!(std::fs::read_to_string(dir.path().join(NODE_ID_FILE)).unwrap(), garbage);
        }
    }
}

//! The membership state file: our last bump and the members we knew, so a
//! restarted node comes back under a larger bump and can rejoin the members
//! it knew even when every seed is down.
//!
//! ```text
//! STATE_VERSION | MessagePack (named fields) of PersistedState
//! ```
//!
//! Written whole to `<path>.tmp`, fsynced, then renamed over `<path>`, so a
//! crash leaves either the old or the new file. Validated after reading.

use crate::identity::NodeIdentity;
use foca::{Member, State};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Format version of the state file.
pub const STATE_VERSION: u8 = 1;
/// Largest state file read back (a cluster of thousands of members fits).
pub const STATE_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Most members written to or read from the state file.
pub const STATE_MEMBERS_MAX: usize = 16_384;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file system refused.
    #[error("membership state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is larger than [`STATE_FILE_BYTES_MAX`].
    #[error(
        "membership state file {path} is {bytes} bytes, over the {STATE_FILE_BYTES_MAX} byte limit"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Written by a format version this build does not know.
    #[error("membership state file {path} has unknown version {version:?}")]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its first byte (None when empty).
        version: Option<u8>,
    },
    /// The body does not decode.
    #[error("membership state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        source: rmp_serde::decode::Error,
    },
    /// The body decodes but breaks a limit or rule.
    #[error("membership state file {path} is invalid: {rule}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which rule it breaks.
        rule: &'static str,
    },
}

/// A member as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedMember {
    /// Its identity.
    pub id: NodeIdentity,
    /// Its SWIM incarnation.
    pub incarnation: u16,
    /// 0 alive, 1 suspect, 2 down.
    pub state: u8,
}

impl PersistedMember {
    pub(crate) fn from_member(m: &Member<NodeIdentity>) -> PersistedMember {
        let state = match m.state() {
            State::Alive => 0,
            State::Suspect => 1,
            State::Down => 2,
        };
        PersistedMember { id: *m.id(), incarnation: m.incarnation(), state }
    }

    pub(crate) fn to_member(&self) -> Option<Member<NodeIdentity>> {
        let state = match self.state {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            _ => return None,
        };
        Some(Member::new(self.id, self.incarnation, state))
    }
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The node this file belongs to.
    pub node_id: u64,
    /// The largest bump this node has used.
    pub bump: u64,
    /// Every member known when written (ourselves excluded).
    pub members: Vec<PersistedMember>,
}

fn io_error(path: &Path, source: std::io::Error) -> StateFileError {
    StateFileError::Io { path: path.to_owned(), source }
}

/// Reads the state file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<PersistedState>, StateFileError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, e)),
    };
    let mut bytes = Vec::new();
    file.take(STATE_FILE_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(|e| io_error(path, e))?;
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if len > STATE_FILE_BYTES_MAX {
        return Err(StateFileError::TooLarge { path: path.to_owned(), bytes: len });
    }
    decode(path, &bytes).map(Some)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<PersistedState, StateFileError> {
    match bytes.first() {
        Some(&STATE_VERSION) => {}
        other => {
            return Err(StateFileError::UnknownVersion {
                path: path.to_owned(),
                version: other.copied(),
            })
        }
    }
    let state: PersistedState = rmp_serde::from_slice(&bytes[1..])
        .map_err(|source| StateFileError::Corrupt { path: path.to_owned(), source })?;
    let invalid = |rule| Err(StateFileError::Invalid { path: path.to_owned(), rule });
    if state.members.len() > STATE_MEMBERS_MAX {
        return invalid("too many members");
    }
    if state.members.iter().any(|m| m.to_member().is_none()) {
        return invalid("unknown member state");
    }
    Ok(state)
}

/// Writes the state file atomically (temporary file, fsync, rename).
pub fn store(path: &Path, state: &PersistedState) -> Result<(), StateFileError> {
    assert!(state.members.len() <= STATE_MEMBERS_MAX, "caller bounds the members");
    let mut bytes = vec![STATE_VERSION];
    rmp_serde::encode::write_named(&mut bytes, state).expect("plain data always encodes");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| io_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeMeta;

    fn sample() -> PersistedState {
        PersistedState {
            node_id: 7,
            bump: 42,
            members: vec![PersistedMember {
                id: NodeIdentity {
                    node_id: 8,
                    gossip_addr: "127.0.0.1:7001".parse().unwrap(),
                    bump: 3,
                    meta: NodeMeta::unspecified(),
                },
                incarnation: 2,
                state: 1,
            }],
        }
    }

    #[test]
    fn state_round_trips_and_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gossip.state");
        assert!(load(&path).unwrap().is_none());
        store(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gossip.state");
        std::fs::write(&path, [STATE_VERSION, 0xc1, 0xff]).unwrap();
        assert!(matches!(load(&path), Err(StateFileError::Corrupt { .. })));
        std::fs::write(&path, [9u8, 1, 2]).unwrap();
        assert!(matches!(
            load(&path),
            Err(StateFileError::UnknownVersion { version: Some(9), .. })
        ));
        std::fs::write(&path, []).unwrap();
        assert!(matches!(load(&path), Err(StateFileError::UnknownVersion { version: None, .. })));
    }

    #[test]
    fn version_1_sample_still_decodes() {
        // `sample()` as written by format version 1; must decode forever.
        const STORED_V1: &[u8] = &[
            0x01, 0x83, 0xa7, 0x6e, 0x6f, 0x64, 0x65, 0x5f, 0x69, 0x64, 0x07, 0xa4, 0x62, 0x75,
            0x6d, 0x70, 0x2a, 0xa7, 0x6d, 0x65, 0x6d, 0x62, 0x65, 0x72, 0x73, 0x91, 0x83, 0xa2,
            0x69, 0x64, 0x84, 0xa7, 0x6e, 0x6f, 0x64, 0x65, 0x5f, 0x69, 0x64, 0x08, 0xab, 0x67,
            0x6f, 0x73, 0x73, 0x69, 0x70, 0x5f, 0x61, 0x64, 0x64, 0x72, 0x81, 0xa2, 0x56, 0x34,
            0x92, 0x94, 0x7f, 0x00, 0x00, 0x01, 0xcd, 0x1b, 0x59, 0xa4, 0x62, 0x75, 0x6d, 0x70,
            0x03, 0xa4, 0x6d, 0x65, 0x74, 0x61, 0x83, 0xa9, 0x68, 0x74, 0x74, 0x70, 0x5f, 0x61,
            0x64, 0x64, 0x72, 0x81, 0xa2, 0x56, 0x34, 0x92, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00,
            0xa9, 0x70, 0x65, 0x65, 0x72, 0x5f, 0x61, 0x64, 0x64, 0x72, 0x81, 0xa2, 0x56, 0x34,
            0x92, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0xaf, 0x69, 0x6e, 0x76, 0x61, 0x72, 0x69,
            0x61, 0x6e, 0x74, 0x73, 0x5f, 0x68, 0x61, 0x73, 0x68, 0x00, 0xab, 0x69, 0x6e, 0x63,
            0x61, 0x72, 0x6e, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x02, 0xa5, 0x73, 0x74, 0x61, 0x74,
            0x65, 0x01,
        ];
        assert_eq!(decode(Path::new("x"), STORED_V1).unwrap(), sample());
    }
}

//! A key's rows in the store: its base envelope, its delta log, and its digest
//! index entry (store format 2).
//!
//! - `d/` key → the base, `encode(Envelope)`.
//! - `l/` key `0x00` seq (u64, big-endian) → one delta, `encode(Envelope)`. A
//!   key has no control characters, so `l/` key `0x00` is a prefix of this
//!   key's log rows only.
//! - `h/` bucket key → the entry hash of the key's merged state (u64,
//!   little-endian), then the bytes of the key's rows (u64, little-endian). A
//!   format-1 entry has the hash only.
//!
//! A key's state is the join of its base and every delta of its log. A write
//! is one batch: either it appends its delta as a row (when the log stays
//! within a quarter of the merged state's encoding), or it folds — puts the
//! merged state as the new base and deletes every log row it read. Either batch
//! also replaces the index entry. So a write costs its delta plus, amortised,
//! a constant times its delta (a fold of `B` bytes comes after at least `B / 4`
//! bytes of deltas). The argument for exactness and crash safety is in
//! docs/storage.md, "Writes cost what they change".

use crate::envelope::Envelope;
use crate::error::NodeError;
use crate::replication::digest::{entry_hash, BUCKETS};
use crate::store::{Batch, Store};
use calmkv_crdts::{decode, encode, Crdt};

/// Prefix of a key's base row.
pub(super) const DATA_PREFIX: &[u8] = b"d/";
/// Prefix of the log rows.
pub(super) const LOG_PREFIX: &[u8] = b"l/";
/// Prefix of the digest index: `h/` + bucket (u16, big-endian) + key.
pub(super) const HASH_PREFIX: &[u8] = b"h/";
/// Ends the key in a log row's key, before the sequence number.
const LOG_KEY_END: u8 = 0;
/// The log of a key is folded once its deltas would exceed 1 / this of the
/// merged state's encoding: the geometric bound that makes a fold's bytes
/// amortise to a constant times the deltas it absorbs.
pub const LOG_SHARE_OF_BASE_INV: u64 = 4;
/// Bytes of a format-2 index entry's value: hash, then the key's row bytes.
const INDEX_VALUE_BYTES: usize = 16;
/// Bytes of a format-1 index entry's value: the hash only.
const INDEX_VALUE_BYTES_V1: usize = 8;

/// The base row's key.
pub(super) fn base_key(key: &str) -> Vec<u8> {
    [DATA_PREFIX, key.as_bytes()].concat()
}

/// The prefix of every log row of `key`, and of nothing else.
fn log_prefix(key: &str) -> Vec<u8> {
    let mut prefix = [LOG_PREFIX, key.as_bytes()].concat();
    prefix.push(LOG_KEY_END);
    prefix
}

fn log_key(key: &str, seq: u64) -> Vec<u8> {
    let mut row = log_prefix(key);
    row.extend_from_slice(&seq.to_be_bytes());
    row
}

/// The index entry's key.
pub(super) fn index_key(bucket: u16, key: &str) -> Vec<u8> {
    [HASH_PREFIX, &bucket.to_be_bytes(), key.as_bytes()].concat()
}

/// A digest index entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IndexEntry {
    /// The digest bucket.
    pub(super) bucket: u16,
    /// The entry hash of the key's merged state.
    pub(super) hash: u64,
    /// The bytes of the key's rows (keys and values, this entry's included);
    /// `None` in a format-1 entry.
    pub(super) row_bytes: Option<u64>,
}

/// Decodes a digest index entry.
pub(super) fn parse_index_entry(index_key: &[u8], value: &[u8]) -> Result<IndexEntry, NodeError> {
    let corrupt =
        || NodeError::CorruptIndex { entry: String::from_utf8_lossy(index_key).into_owned() };
    let bucket = index_key.get(HASH_PREFIX.len()..HASH_PREFIX.len() + 2).ok_or_else(corrupt)?;
    let bucket = u16::from_be_bytes([bucket[0], bucket[1]]);
    if usize::from(bucket) >= BUCKETS {
        return Err(corrupt());
    }
    let word = |at: usize| -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&value[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    match value.len() {
        INDEX_VALUE_BYTES_V1 => Ok(IndexEntry { bucket, hash: word(0), row_bytes: None }),
        INDEX_VALUE_BYTES => Ok(IndexEntry { bucket, hash: word(0), row_bytes: Some(word(8)) }),
        _ => Err(corrupt()),
    }
}

/// The user key of an index entry's key.
pub(super) fn index_entry_name(index_key: &[u8]) -> String {
    String::from_utf8_lossy(&index_key[HASH_PREFIX.len() + 2..]).into_owned()
}

/// The bytes a key's rows occupy when its index entry is of format 1 (no log
/// rows can exist then: any format-2 write rewrites the entry).
pub(super) fn row_bytes_v1(store: &dyn Store, index_key: &[u8]) -> Result<u64, NodeError> {
    let name = index_entry_name(index_key);
    let base = store.get(&base_key(&name))?;
    let base_row = base.map_or(0, |value| DATA_PREFIX.len() + name.len() + value.len());
    Ok((base_row + index_key.len() + INDEX_VALUE_BYTES_V1) as u64)
}

/// A key as stored: its merged state, and what a write needs to replace it.
#[derive(Debug, Default)]
pub(super) struct Stored {
    /// The base joined with every delta of the log.
    pub(super) state: Envelope,
    /// The base row's value length, `None` without a base.
    base_value_bytes: Option<usize>,
    /// Sequence numbers of the log rows, in order.
    log_seqs: Vec<u64>,
    /// Bytes of the log rows' values.
    log_value_bytes: u64,
    /// Bytes of the log rows, keys and values.
    log_row_bytes: u64,
    /// The index entry's hash and value length, `None` without one.
    index: Option<(u64, usize)>,
}

impl Stored {
    /// Whether the key has deltas not yet folded into its base.
    pub(super) fn has_log(&self) -> bool {
        !self.log_seqs.is_empty()
    }

    /// Bytes of every row of the key, as the live-bytes count has them.
    fn row_bytes(&self, key: &str, bucket: u16) -> u64 {
        let base = self.base_value_bytes.map_or(0, |v| DATA_PREFIX.len() + key.len() + v);
        let index = self.index.map_or(0, |(_, v)| index_key(bucket, key).len() + v);
        base as u64 + self.log_row_bytes + index as u64
    }
}

fn corrupt(key: &str) -> impl Fn(calmkv_crdts::DecodeError) -> NodeError + '_ {
    move |source| NodeError::Corrupt { key: key.to_string(), source }
}

/// Reads a key's merged state. The log is read first (its row 0, then, if
/// there is one, the whole log in one scan: one consistent view), then the base: a fold that lands in between only moves
/// rows the scan saw into the base, so the join is the key's state at some
/// moment between the two reads, never an older one (docs/storage.md).
pub(super) fn load(store: &dyn Store, key: &str) -> Result<Envelope, NodeError> {
    Ok(load_rows(store, key)?.state)
}

fn load_rows(store: &dyn Store, key: &str) -> Result<Stored, NodeError> {
    let prefix = log_prefix(key);
    // A log's rows are numbered 0, 1, … from its last fold, so a key without
    // row 0 has no log: a point read (which an LSM's filters answer cheaply)
    // saves the scan. Otherwise the log, bounded by the fold rule (a quarter
    // of the state), is read whole, in one scan.
    let log = match store.get(&log_key(key, 0))? {
        None => Vec::new(),
        Some(_) => store.scan_prefix(&prefix, None, usize::MAX)?,
    };
    let mut stored = Stored::default();
    if let Some(bytes) = store.get(&base_key(key))? {
        stored.state = decode(&bytes).map_err(corrupt(key))?;
        stored.base_value_bytes = Some(bytes.len());
    }
    for (row, bytes) in &log {
        let seq: [u8; 8] = row[prefix.len()..]
            .try_into()
            .map_err(|_| NodeError::CorruptIndex { entry: String::from_utf8_lossy(row).into() })?;
        let delta: Envelope = decode(bytes).map_err(corrupt(key))?;
        stored.state.merge(&delta);
        stored.log_seqs.push(u64::from_be_bytes(seq));
        stored.log_value_bytes += bytes.len() as u64;
        stored.log_row_bytes += (row.len() + bytes.len()) as u64;
    }
    Ok(stored)
}

/// Reads a key for a write (under its lock): its rows and its index entry.
pub(super) fn load_for_write(
    store: &dyn Store,
    key: &str,
    bucket: u16,
) -> Result<Stored, NodeError> {
    let mut stored = load_rows(store, key)?;
    let index_row = index_key(bucket, key);
    if let Some(value) = store.get(&index_row)? {
        let entry = parse_index_entry(&index_row, &value)?;
        stored.index = Some((entry.hash, value.len()));
    }
    Ok(stored)
}

/// A planned write of one key: the batch, and how it moves the digest and the
/// live-bytes count.
#[derive(Debug)]
pub(super) struct Write {
    /// Everything the write changes, atomically.
    pub(super) batch: Batch,
    /// The index entry's hash before (0 without one) and after.
    pub(super) old_hash: u64,
    /// The entry hash of the new merged state.
    pub(super) new_hash: u64,
    /// Bytes of the key's rows before and after.
    pub(super) old_row_bytes: u64,
    /// Bytes of the key's rows after the write.
    pub(super) new_row_bytes: u64,
}

/// Plans the write that takes `key` from `stored` to `state`.
///
/// `delta`, when given, must satisfy `stored.state ⊔ delta == state`; it is
/// appended to the log if the log then stays within its share of the state.
/// Without a delta (or past the share, or without a base) the write folds.
pub(super) fn plan(
    key: &str,
    bucket: u16,
    stored: &Stored,
    state: &Envelope,
    delta: Option<&Envelope>,
) -> Write {
    let state_bytes = encode(state).expect("an envelope always encodes");
    let new_hash = entry_hash(key, &state_bytes);
    let index_row = index_key(bucket, key);
    let old_row_bytes = stored.row_bytes(key, bucket);
    let index_row_bytes = (index_row.len() + INDEX_VALUE_BYTES) as u64;
    let appended = delta.filter(|_| stored.base_value_bytes.is_some()).and_then(|delta| {
        let delta_bytes = encode(delta).expect("an envelope always encodes");
        let log_after = stored.log_value_bytes + delta_bytes.len() as u64;
        (log_after.saturating_mul(LOG_SHARE_OF_BASE_INV) <= state_bytes.len() as u64)
            .then_some(delta_bytes)
    });
    let (batch, new_row_bytes) = match appended {
        Some(delta_bytes) => {
            // Rows are numbered from 0 after each fold (a fold deletes every
            // row), without gaps.
            let seq = stored.log_seqs.last().map_or(0, |last| last + 1);
            let row = log_key(key, seq);
            let base = stored.base_value_bytes.map_or(0, |v| DATA_PREFIX.len() + key.len() + v);
            let rows = base as u64
                + stored.log_row_bytes
                + (row.len() + delta_bytes.len()) as u64
                + index_row_bytes;
            (Batch::new().put(row, delta_bytes), rows)
        }
        None => {
            let base = base_key(key);
            let rows = (base.len() + state_bytes.len()) as u64 + index_row_bytes;
            let mut batch = Batch::new().put(base, state_bytes);
            for seq in &stored.log_seqs {
                batch = batch.delete(log_key(key, *seq));
            }
            (batch, rows)
        }
    };
    let mut value = Vec::with_capacity(INDEX_VALUE_BYTES);
    value.extend_from_slice(&new_hash.to_le_bytes());
    value.extend_from_slice(&new_row_bytes.to_le_bytes());
    Write {
        batch: batch.put(index_row, value),
        old_hash: stored.index.map_or(0, |(hash, _)| hash),
        new_hash,
        old_row_bytes,
        new_row_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_prefix_covers_its_key_only() {
        let (a, ab) = (log_key("a", 7), log_key("ab", 0));
        assert!(a.starts_with(&log_prefix("a")));
        assert!(!ab.starts_with(&log_prefix("a")));
        assert!(log_key("a", 1) < log_key("a", 256), "sequence numbers sort numerically");
    }

    #[test]
    fn index_entries_of_both_formats_decode_and_others_are_corrupt() {
        let row = index_key(3, "k");
        let v1 = 9u64.to_le_bytes();
        let v2 = [9u64.to_le_bytes(), 40u64.to_le_bytes()].concat();
        assert_eq!(
            parse_index_entry(&row, &v1).unwrap(),
            IndexEntry { bucket: 3, hash: 9, row_bytes: None }
        );
        assert_eq!(
            parse_index_entry(&row, &v2).unwrap(),
            IndexEntry { bucket: 3, hash: 9, row_bytes: Some(40) }
        );
        for bad in [&v2[..3], &v2[..12], &[0; 17][..]] {
            assert!(matches!(parse_index_entry(&row, bad), Err(NodeError::CorruptIndex { .. })));
        }
        let far = index_key(BUCKETS as u16, "k");
        assert!(matches!(parse_index_entry(&far, &v1), Err(NodeError::CorruptIndex { .. })));
        assert_eq!(index_entry_name(&row), "k");
    }
}

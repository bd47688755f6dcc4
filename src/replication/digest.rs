//! A digest of a node's whole key space that is cheap to keep current and cheap
//! to compare, so anti-entropy costs follow the number of differing keys, not the
//! number of keys.
//!
//! Every stored key has an *entry hash*: xxh3 of the key and its encoded
//! envelope, so two replicas hold equal states for a key exactly when (up to hash
//! collisions) their entry hashes agree. Keys fall into [`BUCKETS`] buckets by a
//! hash of the key alone; a bucket's hash is the XOR of its entries' hashes, and a
//! group's hash the XOR of its [`BUCKETS_PER_GROUP`] buckets. XOR makes every
//! level incrementally updatable: a write replaces one entry hash and XORs the
//! difference into one bucket. Comparing two nodes walks down only where hashes
//! differ: groups, then buckets, then the keys of those buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Buckets of the key space.
pub const BUCKETS: usize = 1024;
/// Buckets in one group; the top level of the digest has `BUCKETS / BUCKETS_PER_GROUP`
/// group hashes.
pub const BUCKETS_PER_GROUP: usize = 32;
/// Groups in the digest.
pub const GROUPS: usize = BUCKETS / BUCKETS_PER_GROUP;

const _: () = assert!(BUCKETS.is_multiple_of(BUCKETS_PER_GROUP));
const _: () = assert!(BUCKETS <= u16::MAX as usize + 1, "bucket numbers are stored as u16");

/// The bucket a key falls in.
pub fn bucket_of(key: &str) -> u16 {
    (xxh3_64(key.as_bytes()) % BUCKETS as u64) as u16
}

/// The hash of a key's stored state.
pub fn entry_hash(key: &str, envelope_bytes: &[u8]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(envelope_bytes);
    hasher.digest()
}

/// The bucket hashes of one node, updated in place as keys change.
#[derive(Debug)]
pub struct Digest {
    buckets: Box<[AtomicU64]>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Digest {
    /// Replaces the entry hash `old` (0 when the key was absent) by `new` in the
    /// key's bucket.
    pub fn replace(&self, bucket: u16, old: u64, new: u64) {
        self.buckets[usize::from(bucket)].fetch_xor(old ^ new, Ordering::Relaxed);
    }

    /// The hash of one bucket.
    pub fn bucket(&self, bucket: u16) -> u64 {
        self.buckets[usize::from(bucket)].load(Ordering::Relaxed)
    }

    /// The hashes of the buckets of one group, in bucket order.
    pub fn group(&self, group: usize) -> Vec<u64> {
        let first = group * BUCKETS_PER_GROUP;
        (first..first + BUCKETS_PER_GROUP)
            .map(|b| self.buckets[b].load(Ordering::Relaxed))
            .collect()
    }

    /// The top level: one hash per group.
    pub fn top(&self) -> Vec<u64> {
        (0..GROUPS).map(|g| self.group(g).into_iter().fold(0, |acc, h| acc ^ h)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_an_entry_twice_restores_the_digest() {
        let digest = Digest::default();
        let before = digest.top();
        digest.replace(7, 0, 0xABCD);
        assert_ne!(digest.top(), before);
        digest.replace(7, 0xABCD, 0);
        assert_eq!(digest.top(), before);
    }

    #[test]
    fn the_digest_does_not_depend_on_the_order_of_writes() {
        let (a, b) = (Digest::default(), Digest::default());
        let entries = [(3u16, 11u64), (3, 12), (900, 13)];
        entries.iter().for_each(|&(bucket, h)| a.replace(bucket, 0, h));
        entries.iter().rev().for_each(|&(bucket, h)| b.replace(bucket, 0, h));
        assert_eq!(a.top(), b.top());
        assert_eq!(a.group(0), b.group(0));
    }

    #[test]
    fn entry_hashes_separate_key_from_value() {
        assert_ne!(entry_hash("ab", b"c"), entry_hash("a", b"bc"));
    }
}

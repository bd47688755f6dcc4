//! Which CRDT actor a node mints its dots as.
//!
//! A dot `(actor, n)` must name one write forever. A node mints the next dot
//! of a key from the highest it holds, so a write that was applied but never
//! made durable (a failed fsync, or any write under `interval`/`none` before a
//! crash) leaves a hole: after the restart the node does not know it minted
//! that dot, mints it again for another write, and a replica that already
//! received the first one (anti-entropy reads what is applied, durable or
//! not) drops the second as seen — an acknowledged write lost, or replicas
//! that never agree. So a node that did not stop cleanly mints as a new actor.
//!
//! The store's row [`ACTOR_ROW`] holds the actor and whether its node stopped
//! cleanly (`Node::mark_clean`, from the server's shutdown and `Db::close`:
//! after a successful flush, nothing it minted can be lost). On open: a clean actor is used again; otherwise — a crash, or a
//! store from before this row existed that holds keys — the node derives a
//! new actor from its id and the previous actor, deterministically (a
//! simulation's seed still replays), and records it as running, durably,
//! before it mints anything. A new store uses the node's id.
//!
//! The cost of a new actor is one more entry in the causal context of each
//! key it writes: one per crash, not per restart.

use crate::error::NodeError;
use crate::store::{Batch, Store};
use calmkv_crdts::NodeId;

/// The row: 8 bytes of actor (little-endian), 1 byte clean (1) or running (0).
pub(super) const ACTOR_ROW: &[u8] = b"a/actor";

/// The actor a node opening `store` mints as, and whether it is recorded
/// running (durably). A store that refuses the record (a full disk) still
/// opens, for reads: the node records the actor before its first write that
/// mints a dot, and that write fails as any write would.
pub(super) fn choose(
    id: NodeId,
    store: &dyn Store,
    has_keys: bool,
) -> Result<(NodeId, bool), NodeError> {
    let actor = match read(store)? {
        Some((actor, true)) => actor,
        Some((previous, false)) => successor(id, previous),
        None if has_keys => successor(id, id),
        None => id,
    };
    let recorded = record(store, actor, false).is_ok();
    Ok((actor, recorded))
}

/// Records `actor` as clean or running, durably.
pub(super) fn record(store: &dyn Store, actor: NodeId, clean: bool) -> Result<(), NodeError> {
    let mut row = actor.0.to_le_bytes().to_vec();
    row.push(u8::from(clean));
    store.apply(Batch::new().put(ACTOR_ROW, row))?;
    store.flush()?;
    Ok(())
}

/// Whether the row names `actor`: a node that another has replaced (the
/// store reopened while it was alive) records nothing.
pub(super) fn owns(store: &dyn Store, actor: NodeId) -> Result<bool, NodeError> {
    Ok(read(store)?.is_some_and(|(recorded, _)| recorded == actor))
}

/// The row, if any; a malformed row reads as a running actor that is not
/// this node's id, so the next actor is fresh.
fn read(store: &dyn Store) -> Result<Option<(NodeId, bool)>, NodeError> {
    let Some(row) = store.get(ACTOR_ROW)? else { return Ok(None) };
    match <[u8; 9]>::try_from(row.as_slice()) {
        Ok(bytes) => {
            let actor = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            Ok(Some((NodeId(actor), bytes[8] == 1)))
        }
        Err(_) => Ok(Some((NodeId(row.len() as u64), false))),
    }
}

/// The actor after `previous`: a 64-bit mix of both, never the coordinator's
/// actor (`u64::MAX`) nor 0.
fn successor(id: NodeId, previous: NodeId) -> NodeId {
    let mut x = previous.0 ^ id.0.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    loop {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if z != 0 && z != u64::MAX && z != previous.0 && z != id.0 {
            return NodeId(z);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_new_store_mints_as_the_node_a_clean_one_again_a_crashed_one_anew() {
        let store = MemoryStore::new();
        assert_eq!(choose(NodeId(7), &store, false).unwrap(), (NodeId(7), true));
        // Not marked clean: a crash.
        let (second, _) = choose(NodeId(7), &store, true).unwrap();
        assert_ne!(second, NodeId(7));
        record(&store, second, true).unwrap();
        assert_eq!(choose(NodeId(7), &store, true).unwrap().0, second);
        let (third, _) = choose(NodeId(7), &store, true).unwrap();
        assert!(third != second && third != NodeId(7));
    }

    #[test]
    fn a_store_with_keys_and_no_row_mints_anew_and_the_choice_is_deterministic() {
        let (a, b) = (MemoryStore::new(), MemoryStore::new());
        let (x, y) =
            (choose(NodeId(3), &a, true).unwrap().0, choose(NodeId(3), &b, true).unwrap().0);
        assert_eq!(x, y);
        assert_ne!(x, NodeId(3));
    }

    #[test]
    fn a_replaced_node_does_not_own_the_row() {
        let store = MemoryStore::new();
        let (first, _) = choose(NodeId(1), &store, false).unwrap();
        let (second, _) = choose(NodeId(1), &store, true).unwrap();
        assert!(!owns(&store, first).unwrap());
        assert!(owns(&store, second).unwrap());
    }
}

//! `calmkv-gossip`: SWIM membership for calmkv, on the `foca` crate, and the
//! transport it runs over. It knows nothing of CRDTs.
//!
//! Empty for now: membership arrives with the cluster work (DESIGN.md §2, §4).
#![warn(missing_docs)]

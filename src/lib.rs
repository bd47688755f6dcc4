//! `calmkv`: the node — storage, replication, invariants, and the HTTP and embedded
//! faces. Built up issue by issue on top of `calmkv-crdts`.

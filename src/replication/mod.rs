//! Replication between nodes: what travels, and how differences are found.
//!
//! Built sans-IO: the digest and the anti-entropy exchange take inputs and return
//! outputs, so a deterministic simulator can drive them with any interleaving,
//! loss or duplication, and the network layer only moves bytes.

pub mod admission;
pub mod anti_entropy;
pub mod cluster;
pub mod digest;
pub mod frame;
pub mod handshake;
pub mod harvest;
pub mod message;
pub mod outbox;
pub mod parts;
pub mod peer;
pub mod request;

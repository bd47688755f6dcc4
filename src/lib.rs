//! `calmkv`: a key-value store that stays available when the network breaks, by
//! merging CRDTs instead of coordinating wherever the application's invariants
//! allow it.
//!
//! # Embedded use
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let db = calmkv::Db::open(dir.path()).unwrap();
//!
//! db.counter("visits").incr(1).unwrap();
//! db.set("cart/alice").add("apple").unwrap();
//! assert_eq!(db.counter("visits").get().unwrap(), 1);
//!
//! // Registers return their context; writing it back supersedes what was read.
//! db.register("greeting").put("hello", None).unwrap();
//! let read = db.register("greeting").get().unwrap().unwrap();
//! db.register("greeting").put("hello, world", Some(&read.context)).unwrap();
//! assert_eq!(db.register("greeting").get().unwrap().unwrap().values, ["hello, world"]);
//! ```
//!
//! # Layout
//!
//! `docs/design.md` is the whole picture; in short:
//!
//! - [`Db`] and its typed handles (`db.rs`): the embedded face.
//! - [`Node`] (`node.rs`): applies [`Op`]s (`op.rs`) to keys, reads and scans.
//!   Both faces call it and nothing else. `node/delta_log.rs`: a key's rows
//!   (base, delta log, digest entry) and the append-or-fold rule.
//! - [`Envelope`] (`envelope.rs`): what one key stores; [`ReadResult`] (`read.rs`).
//! - `store/`: the [`Store`](store::Store) trait, the disk engines (fjall,
//!   redb, sled for old directories) and the in-memory engine, durability modes
//!   and group commit, the free-space reserve, and the node id.
//! - `invariants/`: declarations, the I-confluence analysis, routing.
//! - `replication/`: the peer channel (handshake, frames and parts, heartbeats,
//!   outbox with coalesced deltas), delta push, admission of remote states,
//!   anti-entropy over the digest, one request helper for reads and `w` waits,
//!   harvest reads.
//! - `quorum/`: the coordinator, an openraft group that serializes the
//!   operations invariants route to it.
//! - `http/`: the HTTP API (axum), its limits, errors and metrics.
//! - [`server::Server`] (`server.rs`): a whole running node — store, HTTP, peer
//!   channel, gossip, coordinator, anti-entropy — for `calmkv serve`,
//!   `calmkv demo` and the examples.
//! - [`Config`] and [`Limits`]: every setting and bound.

pub mod config;
pub mod db;
pub mod envelope;
pub mod error;
pub mod http;
pub mod invariants;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod op;
pub mod quorum;
pub mod read;
pub mod replication;
pub mod server;
pub mod store;

pub use config::Config;
pub use db::Db;
pub use envelope::{Envelope, KeyType};
pub use error::NodeError;
pub use limits::Limits;
pub use node::{Applied, Node, ScanPage};
pub use op::{Action, CounterOp, CrdtOp, FlagOp, Key, MapOp, Op, SetOp};
pub use read::{ReadResult, TypedValue};

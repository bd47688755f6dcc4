//! `calmkv-gossip`: SWIM membership for calmkv, on the `foca` crate, and the
//! transport it runs over. It knows nothing of CRDTs.
//!
//! # Layout
//!
//! - [`identity`]: [`NodeIdentity`] (node id, gossip address, per-boot bump,
//!   [`NodeMeta`]) and foca's `Identity` rules for it.
//! - [`codec`]: the versioned, compact MessagePack wire format of packets.
//! - [`auth`]: packets sealed with XChaCha20-Poly1305 when a cluster secret is set.
//! - [`transport`]: the [`Transport`] trait and [`UdpTransport`].
//! - [`mem_network`]: an in-memory network (loss, partitions) for tests.
//! - `timers`: the loop's timer queue (never drops, never reorders).
//! - `agent`: the gossip loop that owns `Foca`, and the receive task.
//! - [`events`]: the membership view, its events, and subscriptions.
//! - [`state_file`]: the persisted membership state (bump + members).
//! - [`metrics`], the counters (atomics).
//! - [`membership`]: [`Membership`], the handle the node holds, and its config.
//!
//! # Using it
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use calmkv_gossip::{GossipConfig, Membership, NodeMeta, UdpTransport};
//! use std::sync::Arc;
//! let transport = Arc::new(UdpTransport::bind("127.0.0.1:7946".parse()?).await?);
//! let meta = NodeMeta {
//!     http_addr: "127.0.0.1:7070".parse()?,
//!     peer_addr: "127.0.0.1:7071".parse()?,
//!     invariants_hash: 0,
//! };
//! let mut config = GossipConfig::new(42, meta);
//! config.seeds = vec!["127.0.0.1:7947".parse()?];
//! config.state_path = Some("calmkv-data/gossip.state".into());
//! let membership = Membership::start(config, transport).await?;
//! let mut events = membership.subscribe();
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}; members now {:?}", membership.members());
//! }
//! membership.leave().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod agent;
pub mod auth;
pub mod codec;
pub mod events;
pub mod identity;
pub mod mem_network;
pub mod membership;
pub mod metrics;
pub mod state_file;
mod timers;
pub mod transport;

pub use events::{EventStream, MemberInfo, MemberState, MembershipEvent};
pub use identity::{NodeIdentity, NodeMeta};
pub use mem_network::{MemNetwork, MemTransport};
pub use membership::{lan_swim_config, GossipConfig, GossipError, MembersWatch, Membership};
pub use metrics::{GossipMetrics, MetricsSnapshot};
pub use transport::{SendError, Transport, UdpTransport};

/// Largest gossip datagram sent or accepted, nonce and tag included:
/// below a 1,500-byte Ethernet MTU after IP and UDP headers, so packets are
/// never fragmented. Larger datagrams are dropped and counted.
pub const GOSSIP_PACKET_BYTES_MAX: usize = 1400;

const _: () = assert!(GOSSIP_PACKET_BYTES_MAX > auth::SEAL_BYTES + 512);

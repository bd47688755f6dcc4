//! `calmkv-crdts`: the conflict-free replicated data types of calmkv, and the
//! clocks they stand on. Pure: no I/O, no async, no storage.
//!
//! # Layout
//!
//! - Causality: [`Dot`] and [`NodeId`] (`dot.rs`), [`VersionVector`]
//!   (`version_vector.rs`), [`CausalContext`] (`context.rs`).
//! - Ordering for last-writer-wins: [`LamportClock`], [`HybridClock`] (`clock.rs`).
//! - The [`Crdt`] trait with its laws, [`Limits`] and [`CrdtError`] (`crdt.rs`).
//! - Dot stores, the shared core of the causal types (`dot_store.rs`).
//! - Types, one file each: [`GCounter`], [`PnCounter`], [`LwwRegister`],
//!   [`MvRegister`], [`OrSet`], [`OrMap`], [`EwFlag`], and [`CausalCounter`] (the
//!   counter that lives inside maps).
//! - [`Value`], the state of one calmkv key: one causal CRDT per type (`value.rs`).
//! - The versioned encoding of states for disk and wire (`encoding.rs`).
//!
//! # Using a type
//!
//! Every mutation returns a *delta*, a small state holding just its effect; merging
//! it into any replica applies the mutation there. Replicas converge by merging
//! deltas or full states, in any order, any number of times.
//!
//! ```
//! use calmkv_crdts::{Crdt, Limits, NodeId, OrSet};
//!
//! let (a, b) = (NodeId(1), NodeId(2));
//! let limits = Limits::default();
//! let mut on_a = OrSet::new();
//! let mut on_b = OrSet::new();
//!
//! let add = on_a.add(a, "apple", &limits).unwrap();
//! on_b.merge(&add);
//! // Concurrently: b removes the apple while a adds it again.
//! let remove = on_b.remove(&"apple");
//! let re_add = on_a.add(a, "apple", &limits).unwrap();
//! on_a.merge(&remove);
//! on_b.merge(&re_add);
//! // Add wins, on both replicas.
//! assert!(on_a.contains(&"apple") && on_b.contains(&"apple"));
//! assert_eq!(on_a, on_b);
//! # let _ = b;
//! ```
#![warn(missing_docs)]

mod causal_counter;
mod clock;
mod context;
mod crdt;
mod dot;
pub mod dot_store;
pub mod encoding;
mod ew_flag;
mod g_counter;
mod lww_register;
mod mv_register;
mod or_map;
mod or_set;
mod pn_counter;
mod value;
mod version_vector;

pub use causal_counter::{CausalCounter, CounterShare};
pub use clock::{Hlc, HybridClock, LamportClock};
pub use context::CausalContext;
pub use crdt::{Crdt, CrdtError, Limits, MalformedReason};
pub use dot::{Dot, NodeId};
pub use dot_store::{Causal, DotFun, DotMap, DotSet, DotStore, Embed};
pub use encoding::{decode, encode, DecodeError, EncodeError};
pub use ew_flag::EwFlag;
pub use g_counter::GCounter;
pub use lww_register::{LwwRegister, Stamp};
pub use mv_register::MvRegister;
pub use or_map::OrMap;
pub use or_set::OrSet;
pub use pn_counter::PnCounter;
pub use value::{Kind, Value, ValueStore};
pub use version_vector::VersionVector;

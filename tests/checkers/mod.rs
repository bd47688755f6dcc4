//! History checkers for the simulations: each takes what clients did and saw
//! and says whether calmkv kept its promise, independently of calmkv's own
//! code (a checker that called the node's evaluator would share its bugs).
//!
//! - `history.rs`: [`History`], every client operation with its invocation,
//!   completion and [`Outcome`] (ok, failed, indeterminate).
//! - `set.rs`: no acknowledged add lost, nothing never added appears, adds
//!   stable once read on a replica.
//! - `counter.rs`: every read between the acknowledged and attempted bounds.
//! - `register.rs`: multi-value registers (an acknowledged write is present or
//!   causally overwritten) and last-writer-wins registers (the documented
//!   order decides, whatever the clocks said).
//! - `invariants.rs`: no observation on any replica violates a declaration.
//! - `linearizable.rs`: coordinated operations against a sequential model
//!   (Wing and Gong's search with memoisation), indeterminate ones included.
//! - `convergence.rs`: after healing, every replica holds the same state.
//!
//! Each checker's own tests, with histories known to be bad, are in
//! `tests/history_checkers.rs`.

// Each simulation uses some of the checkers.
#![allow(dead_code)]

pub mod convergence;
pub mod counter;
pub mod history;
pub mod invariants;
pub mod linearizable;
pub mod register;
pub mod set;

pub use history::{History, Outcome};

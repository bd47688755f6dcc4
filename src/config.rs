//! Configuration of a node, shared by `calmkv serve` and the embedded [`Db`].
//!
//! [`Db`]: crate::Db

use crate::error::NodeError;
use crate::invariants::Invariants;
use crate::store::{self, Durability, Engine, MemoryStore, Store};
use crate::{Limits, Node};
use calmkv_crdts::NodeId;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where and how a node keeps its data.
#[derive(Clone, Debug)]
pub struct Config {
    /// The data directory: the store and the node id live here.
    pub data_dir: PathBuf,
    /// The disk engine. A data directory keeps the engine that created it:
    /// `Some` other engine is refused (`StoreError::EngineMismatch`, nothing
    /// changes); `None` opens an existing directory with its own engine and
    /// creates a new one with [`Engine::default`].
    pub engine: Option<Engine>,
    /// When a write counts as durable.
    pub durability: Durability,
    /// Bytes the store keeps free on its file system: a write that would eat
    /// into them is refused (`StoreError::InsufficientStorage`, nothing changes).
    pub free_bytes_min: u64,
    /// The bounds the node enforces.
    pub limits: Limits,
    /// Keep data in memory only (tests, simulation): nothing survives the process,
    /// and a new node id is drawn on every open.
    pub in_memory: bool,
    /// The invariants the node enforces (none by default).
    pub invariants: Arc<Invariants>,
}

impl Config {
    /// The default directory, relative to the working directory.
    pub const DEFAULT_DATA_DIR: &'static str = "./calmkv-data";

    /// A configuration with defaults and the given data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            engine: None,
            durability: Durability::default(),
            free_bytes_min: store::FREE_BYTES_MIN_DEFAULT,
            limits: Limits::default(),
            in_memory: false,
            invariants: Arc::new(Invariants::none()),
        }
    }

    /// A configuration for a node that keeps nothing on disk.
    pub fn in_memory() -> Config {
        Config { in_memory: true, ..Config::new(Path::new("")) }
    }

    /// The directory of the node's store, inside the data directory.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Opens the store and the node identity, and builds the node.
    pub fn open_node(&self) -> Result<Node, NodeError> {
        self.limits.validate().map_err(|reason| NodeError::InvalidConfig { reason })?;
        let (id, store): (u64, Arc<dyn Store>) = if self.in_memory {
            (store::random_node_id(), Arc::new(MemoryStore::new()))
        } else {
            std::fs::create_dir_all(&self.data_dir).map_err(|source| {
                NodeError::from(store::StoreError::Io { path: self.data_dir.clone(), source })
            })?;
            let id = store::load_or_create_node_id(&self.data_dir)?;
            let store = store::open_reserving(
                self.engine,
                &self.store_dir(),
                self.durability,
                self.free_bytes_min,
            )?;
            (id, Arc::from(store))
        };
        Ok(Node::open(NodeId(id), store, self.limits.clone())?
            .with_invariants(self.invariants.clone()))
    }
}

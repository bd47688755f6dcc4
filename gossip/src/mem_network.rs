//! An in-memory datagram network for tests: endpoints bound to socket
//! addresses, seeded random loss, partitions, and a record of recent
//! packets. Delivery is immediate (a bounded channel per endpoint), so
//! under `tokio::time::pause()` whole clusters run in virtual time; with
//! a current-thread runtime and a fixed seed a run is reproducible.

use crate::transport::{SendError, Transport};
use rand::{RngExt, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Datagrams an endpoint may have queued before further ones are dropped.
pub const MEM_ENDPOINT_QUEUE_MAX: usize = 1024;
/// Packets kept by [`MemNetwork::recent_packets`].
pub const MEM_RECENT_PACKETS_MAX: usize = 256;

/// One datagram seen by the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender.
    pub from: SocketAddr,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// Counters of the simulated network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemNetworkStats {
    /// Datagrams queued at their destination.
    pub delivered: u64,
    /// Dropped by simulated loss.
    pub dropped_loss: u64,
    /// Dropped because sender and receiver are on different sides of a partition.
    pub dropped_partition: u64,
    /// Dropped because nothing is bound at the destination.
    pub dropped_unbound: u64,
    /// Dropped because the destination's queue was full.
    pub dropped_queue_full: u64,
}

struct Endpoint {
    generation: u64,
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
}

struct NetInner {
    endpoints: HashMap<SocketAddr, Endpoint>,
    next_generation: u64,
    /// Partition group of each listed address; unlisted ones are group 0.
    groups: HashMap<SocketAddr, u32>,
    loss_probability: f64,
    rng: rand::rngs::StdRng,
    recent: VecDeque<Datagram>,
    stats: MemNetworkStats,
}

impl NetInner {
    fn group(&self, addr: &SocketAddr) -> u32 {
        self.groups.get(addr).copied().unwrap_or(0)
    }

    fn deliver(&mut self, datagram: Datagram, simulate_faults: bool) {
        if simulate_faults {
            if self.group(&datagram.from) != self.group(&datagram.to) {
                self.stats.dropped_partition += 1;
                return;
            }
            if self.loss_probability > 0.0 && self.rng.random_bool(self.loss_probability) {
                self.stats.dropped_loss += 1;
                return;
            }
        }
        let Some(endpoint) = self.endpoints.get(&datagram.to) else {
            self.stats.dropped_unbound += 1;
            return;
        };
        if self.recent.len() == MEM_RECENT_PACKETS_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back(datagram.clone());
        match endpoint.tx.try_send((datagram.bytes, datagram.from)) {
            Ok(()) => self.stats.delivered += 1,
            Err(mpsc::error::TrySendError::Full(_)) => self.stats.dropped_queue_full += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => self.stats.dropped_unbound += 1,
        }
    }
}

/// A simulated network. Cheap to clone; clones share the network.
#[derive(Clone)]
pub struct MemNetwork {
    inner: Arc<Mutex<NetInner>>,
}

impl std::fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork").field("stats", &self.stats()).finish()
    }
}

impl MemNetwork {
    /// An empty network whose random loss is drawn from `seed`.
    pub fn new(seed: u64) -> MemNetwork {
        MemNetwork {
            inner: Arc::new(Mutex::new(NetInner {
                endpoints: HashMap::new(),
                next_generation: 0,
                groups: HashMap::new(),
                loss_probability: 0.0,
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                recent: VecDeque::new(),
                stats: MemNetworkStats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetInner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds `addr`. A previous binding of the same address is replaced (as
    /// when a crashed process's port is reused); its transport then reads
    /// nothing more.
    pub fn bind(&self, addr: SocketAddr) -> Arc<MemTransport> {
        let (tx, rx) = mpsc::channel(MEM_ENDPOINT_QUEUE_MAX);
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner.endpoints.insert(addr, Endpoint { generation, tx });
        Arc::new(MemTransport {
            net: self.clone(),
            addr,
            generation,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Splits the network: each listed group reaches only itself; addresses
    /// not listed reach only each other.
    pub fn partition(&self, groups: &[&[SocketAddr]]) {
        let mut inner = self.lock();
        inner.groups.clear();
        for (i, group) in groups.iter().enumerate() {
            let id = u32::try_from(i + 1).expect("fewer than 2^32 groups");
            for addr in group.iter() {
                inner.groups.insert(*addr, id);
            }
        }
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.lock().groups.clear();
    }

    /// Drops each datagram with `probability` (0.0 ..= 1.0).
    pub fn set_loss(&self, probability: f64) {
        assert!((0.0..=1.0).contains(&probability), "loss probability {probability}");
        self.lock().loss_probability = probability;
    }

    /// Delivers raw bytes as if `from` had sent them, bypassing loss and
    /// partitions (for bad-input tests).
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.lock().deliver(Datagram { from, to, bytes }, false);
    }

    /// The last [`MEM_RECENT_PACKETS_MAX`] datagrams delivered, oldest first.
    pub fn recent_packets(&self) -> Vec<Datagram> {
        self.lock().recent.iter().cloned().collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> MemNetworkStats {
        self.lock().stats
    }
}

/// An endpoint of a [`MemNetwork`]. Dropping it unbinds its address.
pub struct MemTransport {
    net: MemNetwork,
    addr: SocketAddr,
    generation: u64,
    rx: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport").field("addr", &self.addr).finish()
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        let mut inner = self.net.lock();
        if inner.endpoints.get(&self.addr).map(|e| e.generation) == Some(self.generation) {
            inner.endpoints.remove(&self.addr);
        }
    }
}

impl Transport for MemTransport {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn send_to(&self, to: SocketAddr, packet: &[u8]) -> Result<(), SendError> {
        let datagram = Datagram { from: self.addr, to, bytes: packet.to_vec() };
        self.net.lock().deliver(datagram, true);
        Ok(())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let received = self.rx.lock().await.recv().await;
        let Some((bytes, from)) = received else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "address rebound"));
        };
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok((bytes.len(), from))
    }
}

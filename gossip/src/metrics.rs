//! Counters of the gossip layer (atomics, shared by the loop, the receive
//! task and readers). Members by state are computed from the membership
//! view when read, see [`crate::Membership::metrics`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters. All monotonic.
#[derive(Debug, Default)]
pub struct GossipMetrics {
    pub(crate) packets_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) packets_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) dropped_auth: AtomicU64,
    pub(crate) dropped_size: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) dropped_inbox_full: AtomicU64,
    pub(crate) send_failures: AtomicU64,
    pub(crate) recv_errors: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) state_write_failures: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// A point-in-time copy of the counters plus members by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Datagrams handed to the transport.
    pub packets_sent: u64,
    /// Bytes handed to the transport (tags included).
    pub bytes_sent: u64,
    /// Datagrams read from the transport (before any check).
    pub packets_received: u64,
    /// Bytes read from the transport.
    pub bytes_received: u64,
    /// Dropped: missing or wrong authentication tag.
    pub dropped_auth: u64,
    /// Dropped: larger than [`crate::GOSSIP_PACKET_BYTES_MAX`].
    pub dropped_size: u64,
    /// Dropped: authenticated (or no secret) but undecodable.
    pub decode_errors: u64,
    /// Decoded but refused by foca (e.g. data claiming to come from us).
    pub protocol_errors: u64,
    /// Dropped: the loop's inbox was full.
    pub dropped_inbox_full: u64,
    /// Outgoing datagrams the transport refused (full or failed).
    pub send_failures: u64,
    /// Transient receive errors of the transport.
    pub recv_errors: u64,
    /// Membership events not delivered to a full subscriber.
    pub events_dropped: u64,
    /// Failed writes of the membership state file.
    pub state_write_failures: u64,
    /// Other members currently alive.
    pub members_alive: u64,
    /// Other members currently suspect.
    pub members_suspect: u64,
    /// Other members currently known as down.
    pub members_down: u64,
}

impl GossipMetrics {
    /// Copies the counters (member counts left at zero).
    pub fn counters(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            packets_sent: get(&self.packets_sent),
            bytes_sent: get(&self.bytes_sent),
            packets_received: get(&self.packets_received),
            bytes_received: get(&self.bytes_received),
            dropped_auth: get(&self.dropped_auth),
            dropped_size: get(&self.dropped_size),
            decode_errors: get(&self.decode_errors),
            protocol_errors: get(&self.protocol_errors),
            dropped_inbox_full: get(&self.dropped_inbox_full),
            send_failures: get(&self.send_failures),
            recv_errors: get(&self.recv_errors),
            events_dropped: get(&self.events_dropped),
            state_write_failures: get(&self.state_write_failures),
            members_alive: 0,
            members_suspect: 0,
            members_down: 0,
        }
    }
}

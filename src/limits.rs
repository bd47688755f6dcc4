//! Every bound the node enforces, with its default (the design's limits table).
//!
//! A request that crosses a bound is refused with a typed error and changes
//! nothing. Defaults are the design's; every field can be set through [`Config`]
//! or the command line.
//!
//! [`Config`]: crate::Config

use std::time::Duration;

/// The node's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes of UTF-8.
    pub key_bytes_max: usize,
    /// Largest register value, in bytes.
    pub value_bytes_max: usize,
    /// Longest set member or map field name, in bytes.
    pub member_bytes_max: usize,
    /// Largest HTTP request body.
    pub body_bytes_max: usize,
    /// Members per set and fields per map.
    pub members_max: usize,
    /// Concurrent values per register.
    pub siblings_max: usize,
    /// Depth of maps nested in maps.
    pub map_depth_max: usize,
    /// HTTP requests served at once; past it requests get `503 overloaded`.
    pub in_flight_requests_max: usize,
    /// Keys per scan page.
    pub scan_page_max: usize,
    /// Time one HTTP request may take before it is answered `503 timeout`.
    pub request_timeout: Duration,
    /// Size of the encoded context token a client may send.
    pub context_bytes_max: usize,
    /// Entries (writer nodes plus outstanding dots) of one key's stored causal
    /// context. A client's context can no longer grow it (it is restricted to
    /// what the replica has seen); the bound guards against peers and against
    /// history piling up, and is crossed with `409 limit_exceeded`.
    pub context_entries_max: usize,
    /// Time a client has to send a request's headers (and, on a keep-alive
    /// connection, the longest idle wait for the next request); past it the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body once its headers
    /// arrived; past it the request is answered `408 body_timeout` and the
    /// connection closed. No in-flight permit is held meanwhile.
    pub body_read_timeout: Duration,
    /// HTTP connections open at once from one client IP address; more are
    /// closed at once.
    pub http_connections_per_ip_max: usize,
    /// HTTP connections open at once from all clients; more are closed at once.
    pub http_connections_max: usize,
    /// Bytes of request bodies being read at once, over all connections: each
    /// request reserves its declared length (or `body_bytes_max` when it
    /// declares none) before its body is read, and is answered
    /// `503 overloaded` when the reservation does not fit.
    pub body_buffer_bytes_max: usize,
}

impl Limits {
    /// Default longest key (1 KiB).
    pub const KEY_BYTES_MAX: usize = 1024;
    /// Default largest value (1 MiB).
    pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
    /// Default longest set member or field name (1 KiB).
    pub const MEMBER_BYTES_MAX: usize = 1024;
    /// Default largest request body (2 MiB).
    pub const BODY_BYTES_MAX: usize = 2 * 1024 * 1024;
    /// Default members per set or map.
    pub const MEMBERS_MAX: usize = calmkv_crdts::Limits::MEMBERS_MAX;
    /// Default siblings per register.
    pub const SIBLINGS_MAX: usize = calmkv_crdts::Limits::SIBLINGS_MAX;
    /// Default depth of nested maps.
    pub const MAP_DEPTH_MAX: usize = 8;
    /// Default in-flight HTTP requests.
    pub const IN_FLIGHT_REQUESTS_MAX: usize = 1024;
    /// Default keys per scan page.
    pub const SCAN_PAGE_MAX: usize = 1000;
    /// Default request timeout.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default largest context token (64 KiB).
    pub const CONTEXT_BYTES_MAX: usize = 64 * 1024;
    /// Default entries of a key's stored context.
    pub const CONTEXT_ENTRIES_MAX: usize = calmkv_crdts::Limits::CONTEXT_ENTRIES_MAX;
    /// Default header read timeout.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default body read timeout.
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default HTTP connections per client IP.
    pub const HTTP_CONNECTIONS_PER_IP_MAX: usize = 256;
    /// Default HTTP connections in all.
    pub const HTTP_CONNECTIONS_MAX: usize = 8192;
    /// Default bytes of request bodies read at once (256 MiB: 128 bodies of
    /// the largest default size).
    pub const BODY_BUFFER_BYTES_MAX: usize = 256 * 1024 * 1024;

    /// Checks that the bounds can work together: every count at least 1, a value
    /// smaller than a request body, a member no larger than a value.
    pub fn validate(&self) -> Result<(), String> {
        let counts = [
            ("key_bytes_max", self.key_bytes_max),
            ("value_bytes_max", self.value_bytes_max),
            ("member_bytes_max", self.member_bytes_max),
            ("body_bytes_max", self.body_bytes_max),
            ("members_max", self.members_max),
            ("siblings_max", self.siblings_max),
            ("map_depth_max", self.map_depth_max),
            ("in_flight_requests_max", self.in_flight_requests_max),
            ("scan_page_max", self.scan_page_max),
            ("context_bytes_max", self.context_bytes_max),
            ("context_entries_max", self.context_entries_max),
            ("http_connections_per_ip_max", self.http_connections_per_ip_max),
            ("http_connections_max", self.http_connections_max),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.value_bytes_max >= self.body_bytes_max {
            return Err("value_bytes_max must be smaller than body_bytes_max".into());
        }
        if self.body_buffer_bytes_max < self.body_bytes_max {
            return Err("body_buffer_bytes_max must hold at least one body_bytes_max".into());
        }
        if self.member_bytes_max > self.value_bytes_max {
            return Err("member_bytes_max must not exceed value_bytes_max".into());
        }
        if self.map_depth_max > MAP_DEPTH_MAX_ON_THE_WIRE {
            return Err(format!(
                "map_depth_max must be at most {MAP_DEPTH_MAX_ON_THE_WIRE}: deeper states \
                 would not fit the nesting bound of peer frames"
            ));
        }
        let times = [
            ("request_timeout", self.request_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ];
        if let Some((name, _)) = times.iter().find(|(_, t)| t.is_zero()) {
            return Err(format!("{name} must be longer than zero"));
        }
        Ok(())
    }

    /// The bounds the CRDT mutators enforce.
    pub fn crdt(&self) -> calmkv_crdts::Limits {
        calmkv_crdts::Limits {
            members_max: self.members_max,
            siblings_max: self.siblings_max,
            context_entries_max: self.context_entries_max,
            depth_max: self.map_depth_max,
            value_bytes_max: self.value_bytes_max,
            member_bytes_max: self.member_bytes_max,
        }
    }
}

/// Deepest map nesting a peer frame can carry (see
/// [`FRAME_NESTING_MAX`](crate::replication::frame::FRAME_NESTING_MAX)).
pub const MAP_DEPTH_MAX_ON_THE_WIRE: usize = {
    use crate::replication::frame::{
        FRAME_NESTING_MAX, FRAME_NESTING_OVERHEAD, FRAME_NESTING_PER_MAP_LEVEL,
    };
    (FRAME_NESTING_MAX - FRAME_NESTING_OVERHEAD) / FRAME_NESTING_PER_MAP_LEVEL
};
const _: () = assert!(Limits::MAP_DEPTH_MAX <= MAP_DEPTH_MAX_ON_THE_WIRE);

// A value must fit in a request body with room for the request around it.
const _: () = assert!(Limits::VALUE_BYTES_MAX < Limits::BODY_BYTES_MAX);
const _: () = assert!(Limits::MEMBER_BYTES_MAX <= Limits::VALUE_BYTES_MAX);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: Self::KEY_BYTES_MAX,
            value_bytes_max: Self::VALUE_BYTES_MAX,
            member_bytes_max: Self::MEMBER_BYTES_MAX,
            body_bytes_max: Self::BODY_BYTES_MAX,
            members_max: Self::MEMBERS_MAX,
            siblings_max: Self::SIBLINGS_MAX,
            map_depth_max: Self::MAP_DEPTH_MAX,
            in_flight_requests_max: Self::IN_FLIGHT_REQUESTS_MAX,
            scan_page_max: Self::SCAN_PAGE_MAX,
            request_timeout: Self::REQUEST_TIMEOUT,
            context_bytes_max: Self::CONTEXT_BYTES_MAX,
            context_entries_max: Self::CONTEXT_ENTRIES_MAX,
            header_read_timeout: Self::HEADER_READ_TIMEOUT,
            body_read_timeout: Self::BODY_READ_TIMEOUT,
            http_connections_per_ip_max: Self::HTTP_CONNECTIONS_PER_IP_MAX,
            http_connections_max: Self::HTTP_CONNECTIONS_MAX,
            body_buffer_bytes_max: Self::BODY_BUFFER_BYTES_MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn a_zero_bound_or_a_value_larger_than_a_body_is_refused() {
        let zero = Limits { in_flight_requests_max: 0, ..Limits::default() };
        assert_eq!(zero.validate(), Err("in_flight_requests_max must be at least 1".into()));
        let inverted = Limits { value_bytes_max: 10, body_bytes_max: 10, ..Limits::default() };
        assert!(inverted.validate().is_err());
        let no_time = Limits { request_timeout: Duration::ZERO, ..Limits::default() };
        assert!(no_time.validate().is_err());
    }
}

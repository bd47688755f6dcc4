//! Every bound the node enforces, with its default (DESIGN.md §8).
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

    /// The bounds the CRDT mutators enforce.
    pub fn crdt(&self) -> calmkv_crdts::Limits {
        calmkv_crdts::Limits { members_max: self.members_max, siblings_max: self.siblings_max }
    }
}

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
        }
    }
}

//! Packet authentication: with a cluster secret, every gossip packet ends
//! with an HMAC-SHA256 tag over its bytes, and a packet whose tag does not
//! verify is dropped before any decoding.
//!
//! The MAC is keyed with the cluster secret and starts with a domain label,
//! so a gossip packet can never pass for a peer-channel frame (which uses the
//! same secret) or the other way round.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the authentication tag appended to each packet.
pub const TAG_BYTES: usize = 32;

/// Domain-separation label mixed into every tag.
const DOMAIN: &[u8] = b"calmkv-gossip-v1\0";

/// The shared cluster secret, ready to tag and verify packets.
#[derive(Clone)]
pub struct PacketAuth {
    mac: Hmac<Sha256>,
}

impl PacketAuth {
    /// Prepares tagging with `secret` (any length; HMAC hashes long keys).
    pub fn new(secret: &[u8]) -> PacketAuth {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(DOMAIN);
        PacketAuth { mac }
    }

    /// Appends the tag of `packet` to it.
    pub fn seal(&self, packet: &mut Vec<u8>) {
        let mut mac = self.mac.clone();
        mac.update(packet);
        let tag = mac.finalize().into_bytes();
        packet.extend_from_slice(&tag);
    }

    /// The payload of `packet` if its trailing tag verifies (constant-time
    /// comparison); `None` for a wrong tag or a packet shorter than a tag.
    pub fn open<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        let split = packet.len().checked_sub(TAG_BYTES)?;
        let (payload, tag) = packet.split_at(split);
        let mut mac = self.mac.clone();
        mac.update(payload);
        mac.verify_slice(tag).ok()?;
        Some(payload)
    }
}

impl std::fmt::Debug for PacketAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketAuth(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_packet_opens_and_tampering_is_caught() {
        let auth = PacketAuth::new(b"a cluster secret of some length");
        let mut packet = b"hello".to_vec();
        auth.seal(&mut packet);
        assert_eq!(packet.len(), 5 + TAG_BYTES);
        assert_eq!(auth.open(&packet), Some(&b"hello"[..]));

        let mut flipped = packet.clone();
        flipped[0] ^= 1;
        assert_eq!(auth.open(&flipped), None);
        assert_eq!(auth.open(&packet[..TAG_BYTES - 1]), None);
        assert_eq!(PacketAuth::new(b"another secret").open(&packet), None);
    }
}

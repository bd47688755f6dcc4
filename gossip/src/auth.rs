//! Packet sealing: with a cluster secret, every gossip packet is encrypted and
//! authenticated with XChaCha20-Poly1305, and a packet that does not open is
//! dropped before any decoding.
//!
//! ```text
//! packet = nonce (24 bytes) | ciphertext of the payload | tag (16 bytes)
//! ```
//!
//! The key is derived from the secret with a domain label (HMAC-SHA256 of the
//! label under the secret), so a gossip packet can never pass for a
//! peer-channel or quorum frame sealed with the same secret, or the other way
//! round. Nonces are a random 16-byte prefix drawn once per sealer and a
//! 64-bit counter, never repeated under one key. A keyring (several secrets)
//! seals with the first and opens with any, so a secret can be rotated
//! without downtime.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngExt;
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes sealing adds to a packet: the nonce and the tag.
pub const SEAL_BYTES: usize = NONCE_BYTES + TAG_BYTES;
/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 24;
/// Bytes of the authentication tag.
pub const TAG_BYTES: usize = 16;

/// Domain-separation label of the packet key.
const DOMAIN: &[u8] = b"calmkv-gossip-packet-key-v2\0";

/// The cluster's secrets, ready to seal and open packets.
#[derive(Clone)]
pub struct PacketAuth {
    /// The first secret's cipher seals; every one opens.
    ciphers: Vec<XChaCha20Poly1305>,
    nonce_prefix: [u8; NONCE_BYTES - 8],
    /// Shared by clones, so no two of them seal under one nonce.
    sealed: Arc<AtomicU64>,
}

fn cipher(secret: &[u8]) -> XChaCha20Poly1305 {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(DOMAIN);
    let key: [u8; 32] = mac.finalize().into_bytes().into();
    XChaCha20Poly1305::new(&key.into())
}

impl PacketAuth {
    /// Prepares sealing with `secret` (any length; the configuration asks for
    /// at least 16 bytes).
    pub fn new(secret: &[u8]) -> PacketAuth {
        PacketAuth::keyring(secret, &[])
    }

    /// Seals with `first`, opens with `first` or any of `others`.
    pub fn keyring(first: &[u8], others: &[Vec<u8>]) -> PacketAuth {
        let mut ciphers = vec![cipher(first)];
        ciphers.extend(others.iter().map(|s| cipher(s)));
        let nonce_prefix = rand::make_rng::<rand::rngs::StdRng>().random();
        PacketAuth { ciphers, nonce_prefix, sealed: Arc::new(AtomicU64::new(0)) }
    }

    /// Encrypts `packet` in place: nonce in front, tag behind.
    pub fn seal(&self, packet: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..NONCE_BYTES - 8].copy_from_slice(&self.nonce_prefix);
        let count = self.sealed.fetch_add(1, Ordering::Relaxed);
        nonce[NONCE_BYTES - 8..].copy_from_slice(&count.to_be_bytes());
        let tag = self.ciphers[0]
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"", packet)
            .expect("a datagram always encrypts");
        packet.splice(0..0, nonce);
        packet.extend_from_slice(&tag);
    }

    /// The payload of `packet` if it opens under one of the secrets (the tag is
    /// checked in constant time before anything is decrypted); `None` for a
    /// wrong key, a tampered packet, or one shorter than [`SEAL_BYTES`].
    pub fn open(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let ciphertext_len = packet.len().checked_sub(SEAL_BYTES)?;
        let (nonce, rest) = packet.split_at(NONCE_BYTES);
        let (ciphertext, tag) = rest.split_at(ciphertext_len);
        let nonce = XNonce::from_slice(nonce);
        self.ciphers.iter().find_map(|cipher| {
            let mut payload = ciphertext.to_vec();
            cipher.decrypt_in_place_detached(nonce, b"", &mut payload, tag.into()).ok()?;
            Some(payload)
        })
    }
}

impl std::fmt::Debug for PacketAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PacketAuth({} secrets)", self.ciphers.len())
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
        assert_eq!(packet.len(), 5 + SEAL_BYTES);
        assert!(!packet.windows(5).any(|w| w == b"hello"), "encrypted");
        assert_eq!(auth.open(&packet), Some(b"hello".to_vec()));

        for i in 0..packet.len() {
            let mut flipped = packet.clone();
            flipped[i] ^= 1;
            assert_eq!(auth.open(&flipped), None, "byte {i}");
        }
        assert_eq!(auth.open(&packet[..SEAL_BYTES - 1]), None);
        assert_eq!(PacketAuth::new(b"another secret").open(&packet), None);
    }

    #[test]
    fn no_two_seals_share_a_nonce_even_across_clones() {
        let auth = PacketAuth::new(b"a cluster secret of some length");
        let clone = auth.clone();
        let (mut a, mut b) = (b"same".to_vec(), b"same".to_vec());
        auth.seal(&mut a);
        clone.seal(&mut b);
        assert_ne!(a[..NONCE_BYTES], b[..NONCE_BYTES]);
        assert_ne!(a, b);
    }

    #[test]
    fn a_keyring_opens_with_any_secret_and_seals_with_the_first() {
        let (old, new) = (b"the old cluster secret".to_vec(), b"the new cluster secret".to_vec());
        let rotating = PacketAuth::keyring(&new, std::slice::from_ref(&old));
        let mut from_old = b"payload".to_vec();
        PacketAuth::new(&old).seal(&mut from_old);
        assert_eq!(rotating.open(&from_old), Some(b"payload".to_vec()));
        let mut from_rotating = b"payload".to_vec();
        rotating.seal(&mut from_rotating);
        assert_eq!(PacketAuth::new(&new).open(&from_rotating), Some(b"payload".to_vec()));
        assert_eq!(PacketAuth::new(&old).open(&from_rotating), None);
    }
}

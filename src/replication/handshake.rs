//! The peer channel's handshake: who is on the other end of a connection, and
//! whether it holds the cluster secret, decided before any frame is read.
//!
//! ```text
//! dialer   -> acceptor  Hello  (46 bytes): magic "CKVP" | version | flags | node id u64 BE | nonce [32]
//! acceptor -> dialer    Hello  (46 bytes) | proof [32]
//! dialer   -> acceptor  proof [32]
//! ```
//!
//! Everything is fixed-size, so an acceptor reads at most
//! [`HANDSHAKE_READ_BYTES`] from a stranger. Bit 0 of `flags` says whether the
//! sender uses a cluster secret; nodes that disagree refuse each other
//! ([`HandshakeError::SecretMismatch`]). With a secret, each side's proof is
//! HMAC-SHA256 under the secret over a domain label, its role, both nonces and
//! its own node id, so a proof cannot be replayed on another connection, by the
//! other role, or for another id: the `from` of every later frame is the id the
//! dialer proved, never a claim. Both sides then derive a session key from the
//! dialer's secret, both nonces and both ids; every frame on the connection is
//! encrypted and authenticated under that key with its sequence number as the
//! nonce (see [`SessionKey`]), so frames cannot be read, forged, replayed across
//! connections or reordered within one.
//!
//! With a keyring (several secrets) a node proves with its first secret and
//! accepts a proof under any of its secrets; the session key comes from the
//! secret the dialer's proof verified under, which both sides know.
//!
//! Without a secret (loopback-only, see the server's protected mode) proofs
//! are zeros and not checked: the id is the dialer's claim.

use super::frame::{ClusterSecret, SessionKey};
use calmkv_crdts::NodeId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of every peer connection.
pub const MAGIC: [u8; 4] = *b"CKVP";
/// Version of the peer protocol (handshake and frames) this build speaks.
pub const PEER_PROTOCOL_VERSION: u8 = 5;
/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a proof (an HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;
/// Bytes of a [`Hello`].
pub const HELLO_BYTES: usize = 4 + 1 + 1 + 8 + NONCE_BYTES;
/// The most an acceptor reads from a connection before it is authenticated.
pub const HANDSHAKE_READ_BYTES: usize = HELLO_BYTES + PROOF_BYTES;
/// Default time a connection has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

const FLAG_SECRET: u8 = 1;
const PROOF_DOMAIN: &[u8] = b"calmkv-peer-handshake-v2\0";
const SESSION_DOMAIN: &[u8] = b"calmkv-peer-session-v2\0";

/// One side's opening message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Whether the sender uses a cluster secret.
    pub secret: bool,
    /// The sender's node id (proved by its proof when `secret`).
    pub node: NodeId,
    /// Fresh random bytes for this connection.
    pub nonce: [u8; NONCE_BYTES],
}

impl Hello {
    /// A hello from `node` with a fresh nonce.
    pub fn new(node: NodeId, secret: bool) -> Hello {
        Hello { secret, node, nonce: rand::random() }
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = PEER_PROTOCOL_VERSION;
        out[5] = if self.secret { FLAG_SECRET } else { 0 };
        out[6..14].copy_from_slice(&self.node.0.to_be_bytes());
        out[14..].copy_from_slice(&self.nonce);
        out
    }

    /// Parses the wire form; never panics.
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, HandshakeError> {
        if bytes[..4] != MAGIC {
            return Err(HandshakeError::NotAPeer);
        }
        if bytes[4] != PEER_PROTOCOL_VERSION {
            return Err(HandshakeError::UnsupportedVersion { found: bytes[4] });
        }
        if bytes[5] & !FLAG_SECRET != 0 {
            return Err(HandshakeError::NotAPeer);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[6..14]);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&bytes[14..]);
        Ok(Hello {
            secret: bytes[5] & FLAG_SECRET != 0,
            node: NodeId(u64::from_be_bytes(id)),
            nonce,
        })
    }
}

/// Which end of the connection a proof is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The node that opened the connection and writes frames on it.
    Dialer,
    /// The node that accepted it and reads them.
    Acceptor,
}

fn keyed(secret: &[u8], domain: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(domain);
    mac
}

/// What `node` in `role` sends to prove it holds `secret` (one secret of a
/// keyring) on the connection whose nonces are `dialer` and `acceptor`.
pub fn proof(
    secret: &[u8],
    role: Role,
    dialer: &[u8; NONCE_BYTES],
    acceptor: &[u8; NONCE_BYTES],
    node: NodeId,
) -> [u8; PROOF_BYTES] {
    proof_mac(secret, role, dialer, acceptor, node).finalize().into_bytes().into()
}

fn proof_mac(
    secret: &[u8],
    role: Role,
    dialer: &[u8; NONCE_BYTES],
    acceptor: &[u8; NONCE_BYTES],
    node: NodeId,
) -> Hmac<Sha256> {
    let mut mac = keyed(secret, PROOF_DOMAIN);
    mac.update(&[match role {
        Role::Dialer => b'D',
        Role::Acceptor => b'A',
    }]);
    mac.update(dialer);
    mac.update(acceptor);
    mac.update(&node.0.to_be_bytes());
    mac
}

/// Whether `presented` is the proof of `node` in `role` under `secret`
/// (constant time).
pub fn verify_proof(
    secret: &[u8],
    role: Role,
    dialer: &[u8; NONCE_BYTES],
    acceptor: &[u8; NONCE_BYTES],
    node: NodeId,
    presented: &[u8; PROOF_BYTES],
) -> bool {
    proof_mac(secret, role, dialer, acceptor, node).verify_slice(presented).is_ok()
}

/// The secret of `keyring` under which `presented` proves `node` in `role`.
fn proving_secret<'k>(
    keyring: &'k ClusterSecret,
    role: Role,
    dialer: &[u8; NONCE_BYTES],
    acceptor: &[u8; NONCE_BYTES],
    node: NodeId,
    presented: &[u8; PROOF_BYTES],
) -> Option<&'k [u8]> {
    keyring.all().find(|secret| verify_proof(secret, role, dialer, acceptor, node, presented))
}

/// The key that seals the frames of one connection, from the dialer's first
/// secret (the one its proof verified under).
pub fn session_key(secret: &[u8], dialer: &Hello, acceptor: &Hello) -> SessionKey {
    let mut mac = keyed(secret, SESSION_DOMAIN);
    mac.update(&dialer.nonce);
    mac.update(&acceptor.nonce);
    mac.update(&dialer.node.0.to_be_bytes());
    mac.update(&acceptor.node.0.to_be_bytes());
    SessionKey::new(mac.finalize().into_bytes().into())
}

/// Why a handshake failed; the connection is closed and the failure counted
/// under its [`RefusalKind`].
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other end closed or broke the connection before finishing.
    #[error("the connection closed during the handshake: {source}")]
    Io {
        /// What the socket said.
        #[from]
        source: std::io::Error,
    },
    /// The handshake did not finish in time.
    #[error("the handshake did not finish within {timeout:?}")]
    TimedOut {
        /// The deadline.
        timeout: Duration,
    },
    /// The first bytes are not a calmkv peer hello.
    #[error("not a calmkv peer handshake")]
    NotAPeer,
    /// A calmkv peer of a protocol version this build does not speak.
    #[error("peer protocol version {found}; this node speaks {PEER_PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// One side uses a cluster secret and the other does not.
    #[error(
        "the peer {} a cluster secret and this node {}",
        if *peer_has_secret { "uses" } else { "does not use" },
        if *peer_has_secret { "does not" } else { "does" }
    )]
    SecretMismatch {
        /// Whether the peer uses one.
        peer_has_secret: bool,
    },
    /// The peer's proof does not verify: it holds another cluster secret.
    #[error("the peer's proof does not verify: it has a different cluster secret")]
    WrongSecret,
    /// The dialed address is served by another node than the one expected.
    #[error("expected node {expected} at this address, found node {found}")]
    UnexpectedPeer {
        /// The node dialed.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// The peer claims this node's own id.
    #[error("the peer claims this node's own id")]
    OwnId,
}

/// Handshake failures as `/metrics` and `/v1/cluster` count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// The peer holds another cluster secret.
    WrongSecret,
    /// One side has a secret and the other none.
    SecretMismatch,
    /// Not a calmkv peer, another version, or an impossible identity.
    Malformed,
    /// The handshake took longer than its deadline.
    Timeout,
    /// The connection closed during the handshake.
    Incomplete,
    /// Closed unfinished to make room for a newer connection (too many
    /// handshakes at once).
    Evicted,
}

impl RefusalKind {
    /// Every kind, in order.
    pub const ALL: [RefusalKind; 6] = [
        RefusalKind::WrongSecret,
        RefusalKind::SecretMismatch,
        RefusalKind::Malformed,
        RefusalKind::Timeout,
        RefusalKind::Incomplete,
        RefusalKind::Evicted,
    ];

    /// The kind's name in metrics and `/v1/cluster`.
    pub fn name(self) -> &'static str {
        match self {
            RefusalKind::WrongSecret => "wrong_secret",
            RefusalKind::SecretMismatch => "secret_mismatch",
            RefusalKind::Malformed => "malformed",
            RefusalKind::Timeout => "timeout",
            RefusalKind::Incomplete => "incomplete",
            RefusalKind::Evicted => "evicted",
        }
    }
}

impl HandshakeError {
    /// How the failure is counted.
    pub fn kind(&self) -> RefusalKind {
        match self {
            HandshakeError::Io { .. } => RefusalKind::Incomplete,
            HandshakeError::TimedOut { .. } => RefusalKind::Timeout,
            HandshakeError::NotAPeer
            | HandshakeError::UnsupportedVersion { .. }
            | HandshakeError::UnexpectedPeer { .. }
            | HandshakeError::OwnId => RefusalKind::Malformed,
            HandshakeError::SecretMismatch { .. } => RefusalKind::SecretMismatch,
            HandshakeError::WrongSecret => RefusalKind::WrongSecret,
        }
    }
}

/// A finished handshake.
#[derive(Clone, Debug)]
pub struct Established {
    /// The node on the other end: proved with a secret, claimed without.
    pub peer: NodeId,
    /// Tags this connection's frames (with a secret).
    pub session: Option<SessionKey>,
}

async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, HandshakeError> {
    let mut bytes = [0u8; HELLO_BYTES];
    stream.read_exact(&mut bytes).await?;
    Hello::decode(&bytes)
}

fn check_peer_hello(
    hello: &Hello,
    secret: Option<&ClusterSecret>,
    own: NodeId,
) -> Result<(), HandshakeError> {
    if hello.secret != secret.is_some() {
        return Err(HandshakeError::SecretMismatch { peer_has_secret: hello.secret });
    }
    if hello.node == own {
        return Err(HandshakeError::OwnId);
    }
    Ok(())
}

/// Runs the acceptor's side within `timeout`: reads at most
/// [`HANDSHAKE_READ_BYTES`] and allocates nothing on the heap.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: Option<&ClusterSecret>,
    own: NodeId,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let exchange = async {
        let theirs = read_hello(stream).await?;
        // Answer before judging the hello, so that a dialer whose secret
        // setting differs learns it too and can say so.
        let ours = Hello::new(own, secret.is_some());
        let our_proof = match secret {
            Some(s) => proof(s.as_bytes(), Role::Acceptor, &theirs.nonce, &ours.nonce, own),
            None => [0u8; PROOF_BYTES],
        };
        let mut answer = [0u8; HELLO_BYTES + PROOF_BYTES];
        answer[..HELLO_BYTES].copy_from_slice(&ours.encode());
        answer[HELLO_BYTES..].copy_from_slice(&our_proof);
        stream.write_all(&answer).await?;
        stream.flush().await?;
        check_peer_hello(&theirs, secret, own)?;
        let mut their_proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut their_proof).await?;
        let session = match secret {
            Some(keyring) => {
                let (dialer, acceptor) = (&theirs.nonce, &ours.nonce);
                let proving = proving_secret(
                    keyring,
                    Role::Dialer,
                    dialer,
                    acceptor,
                    theirs.node,
                    &their_proof,
                )
                .ok_or(HandshakeError::WrongSecret)?;
                Some(session_key(proving, &theirs, &ours))
            }
            None => None,
        };
        Ok(Established { peer: theirs.node, session })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(HandshakeError::TimedOut { timeout }))
}

/// Runs the dialer's side within `timeout`, expecting node `expected` (when
/// known). On a wrong proof it still answers, with random bytes, before
/// failing, so the acceptor counts the wrong secret too.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: Option<&ClusterSecret>,
    own: NodeId,
    expected: Option<NodeId>,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let exchange = async {
        let ours = Hello::new(own, secret.is_some());
        stream.write_all(&ours.encode()).await?;
        stream.flush().await?;
        let theirs = read_hello(stream).await?;
        let mut their_proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut their_proof).await?;
        check_peer_hello(&theirs, secret, own)?;
        if let Some(expected) = expected.filter(|e| *e != theirs.node) {
            return Err(HandshakeError::UnexpectedPeer { expected, found: theirs.node });
        }
        let (our_proof, verified) = match secret {
            Some(keyring) => {
                let (dialer, acceptor) = (&ours.nonce, &theirs.nonce);
                let node = theirs.node;
                (
                    proof(keyring.as_bytes(), Role::Dialer, dialer, acceptor, own),
                    proving_secret(keyring, Role::Acceptor, dialer, acceptor, node, &their_proof)
                        .is_some(),
                )
            }
            None => ([0u8; PROOF_BYTES], true),
        };
        // Facing a node that did not prove the secret, send random bytes in
        // place of the proof: the acceptor still counts a wrong secret, and a
        // stranger gets no proof made over nonces it chose to replay elsewhere.
        let sent = if verified { our_proof } else { rand::random() };
        stream.write_all(&sent).await?;
        stream.flush().await?;
        if !verified {
            return Err(HandshakeError::WrongSecret);
        }
        let session = secret.map(|s| session_key(s.as_bytes(), &ours, &theirs));
        Ok(Established { peer: theirs.node, session })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(HandshakeError::TimedOut { timeout }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret(text: &[u8; 32]) -> ClusterSecret {
        ClusterSecret::new(*text).unwrap()
    }

    const A: &[u8; 32] = b"a cluster secret of 32 bytes....";
    const B: &[u8; 32] = b"another secret, also 32 bytes...";
    const T: Duration = Duration::from_secs(5);

    async fn run(
        dialer_secret: Option<ClusterSecret>,
        acceptor_secret: Option<ClusterSecret>,
    ) -> (Result<Established, HandshakeError>, Result<Established, HandshakeError>) {
        let (mut d, mut a) = tokio::io::duplex(1024);
        let dialer =
            async { dial(&mut d, dialer_secret.as_ref(), NodeId(1), Some(NodeId(2)), T).await };
        let acceptor = async { accept(&mut a, acceptor_secret.as_ref(), NodeId(2), T).await };
        tokio::join!(dialer, acceptor)
    }

    #[tokio::test]
    async fn both_sides_prove_the_same_secret_and_share_a_session_key() {
        let (dialer, acceptor) = run(Some(secret(A)), Some(secret(A))).await;
        let (dialer, acceptor) = (dialer.unwrap(), acceptor.unwrap());
        assert_eq!((dialer.peer, acceptor.peer), (NodeId(2), NodeId(1)));
        let mut frame = b"\x01frame".to_vec();
        dialer.session.as_ref().unwrap().seal(0, &mut frame);
        assert_ne!(&frame[..6], b"\x01frame", "encrypted");
        let mut replayed = frame.clone();
        assert!(
            !acceptor.session.as_ref().unwrap().open(1, &mut replayed),
            "bound to its sequence"
        );
        assert!(acceptor.session.as_ref().unwrap().open(0, &mut frame));
        assert_eq!(frame, b"\x01frame");
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (dialer, acceptor) = run(Some(secret(A)), Some(secret(B))).await;
        assert_eq!(dialer.unwrap_err().kind(), RefusalKind::WrongSecret);
        assert_eq!(acceptor.unwrap_err().kind(), RefusalKind::WrongSecret);
    }

    #[tokio::test]
    async fn a_node_without_a_secret_is_refused_by_one_with() {
        let (dialer, acceptor) = run(None, Some(secret(A))).await;
        assert_eq!(acceptor.unwrap_err().kind(), RefusalKind::SecretMismatch);
        assert!(dialer.is_err());
        let (dialer, _) = run(Some(secret(A)), None).await;
        assert_eq!(dialer.unwrap_err().kind(), RefusalKind::SecretMismatch);
    }

    #[tokio::test]
    async fn without_secrets_the_claimed_ids_are_taken() {
        let (dialer, acceptor) = run(None, None).await;
        assert_eq!(acceptor.unwrap().peer, NodeId(1));
        assert!(dialer.unwrap().session.is_none());
    }

    #[tokio::test]
    async fn a_silent_connection_times_out() {
        let (_d, mut a) = tokio::io::duplex(1024);
        let short = Duration::from_millis(20);
        let refused = accept(&mut a, Some(&secret(A)), NodeId(2), short).await.unwrap_err();
        assert_eq!(refused.kind(), RefusalKind::Timeout);
    }

    #[tokio::test]
    async fn a_keyring_accepts_its_second_secret_so_a_secret_can_rotate() {
        let old_and_new = ClusterSecret::keyring([A.to_vec(), B.to_vec()]).unwrap();
        let new_and_old = ClusterSecret::keyring([B.to_vec(), A.to_vec()]).unwrap();
        for (dialer, acceptor) in [
            (Some(old_and_new.clone()), Some(secret(A))),
            (Some(secret(A)), Some(old_and_new.clone())),
            (Some(new_and_old.clone()), Some(old_and_new.clone())),
            (Some(secret(B)), Some(new_and_old.clone())),
        ] {
            let (d, a) = run(dialer, acceptor).await;
            let (d, a) = (d.unwrap(), a.unwrap());
            let mut frame = b"\x01frame".to_vec();
            d.session.as_ref().unwrap().seal(0, &mut frame);
            assert!(a.session.as_ref().unwrap().open(0, &mut frame), "both derive one session key");
        }
        let (d, a) = run(Some(secret(B)), Some(secret(A))).await;
        assert_eq!(
            (d.unwrap_err().kind(), a.unwrap_err().kind()),
            (RefusalKind::WrongSecret, RefusalKind::WrongSecret)
        );
    }

    #[tokio::test]
    async fn a_dialer_gives_no_proof_to_an_acceptor_that_gave_none() {
        let (mut d, mut a) = tokio::io::duplex(1024);
        let dialer = async { dial(&mut d, Some(&secret(A)), NodeId(1), None, T).await };
        let impostor = async {
            let mut hello = [0u8; HELLO_BYTES];
            a.read_exact(&mut hello).await.unwrap();
            let theirs = Hello::decode(&hello).unwrap();
            let ours = Hello::new(NodeId(2), true);
            a.write_all(&ours.encode()).await.unwrap();
            a.write_all(&[0u8; PROOF_BYTES]).await.unwrap();
            let mut answer = [0u8; PROOF_BYTES];
            a.read_exact(&mut answer).await.unwrap();
            (theirs, ours, answer)
        };
        let (dialed, (theirs, ours, answer)) = tokio::join!(dialer, impostor);
        assert_eq!(dialed.unwrap_err().kind(), RefusalKind::WrongSecret);
        let real = proof(A, Role::Dialer, &theirs.nonce, &ours.nonce, NodeId(1));
        assert_ne!(answer, real, "the impostor got no usable proof");
    }

    #[test]
    fn a_proof_is_bound_to_role_nonces_and_id() {
        let s = *A;
        let (n1, n2) = ([1u8; 32], [2u8; 32]);
        let p = proof(&s, Role::Dialer, &n1, &n2, NodeId(7));
        assert!(verify_proof(&s, Role::Dialer, &n1, &n2, NodeId(7), &p));
        assert!(!verify_proof(&s, Role::Acceptor, &n1, &n2, NodeId(7), &p));
        assert!(!verify_proof(&s, Role::Dialer, &n2, &n1, NodeId(7), &p));
        assert!(!verify_proof(&s, Role::Dialer, &n1, &n2, NodeId(8), &p));
        assert!(!verify_proof(B, Role::Dialer, &n1, &n2, NodeId(7), &p));
    }

    proptest! {
        #[test]
        fn prop_hello_round_trips(secret in any::<bool>(), node in any::<u64>(), nonce in any::<[u8; 32]>()) {
            let hello = Hello { secret, node: NodeId(node), nonce };
            prop_assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic_the_hello_decoder(bytes in any::<[u8; 32]>(), more in any::<[u8; 14]>()) {
            let mut all = [0u8; HELLO_BYTES];
            all[..32].copy_from_slice(&bytes);
            all[32..].copy_from_slice(&more);
            let _ = Hello::decode(&all);
        }
    }
}

//! The quorum's RPCs over TCP: openraft's append-entries, vote and
//! install-snapshot, and the forwarding of proposals to the leader.
//!
//! One request and one response per exchange, each a length-prefixed frame of
//! the peer channel's format (version byte, MessagePack). With a cluster
//! secret, a connection opens with the peer channel's challenge-response
//! handshake (`replication::handshake`): the listener reads at most its fixed
//! 78 bytes from a stranger, and every frame after it is sealed under the
//! connection's session key with its sequence number as the nonce, so a
//! recorded frame can be replayed neither on another connection nor on the
//! same one. Without a secret (loopback only) frames are plain. A client keeps
//! one connection per target and reconnects after an error. A frame that
//! fails to decode or authenticate closes its connection and is counted; the
//! listener keeps serving.

use super::types::{Command, Outcome, TypeConfig};
use crate::replication::frame::{
    decode_body, decode_frame, encode_body, encode_frame, ClusterSecret, SessionKey,
};
use crate::replication::handshake;
use calmkv_crdts::NodeId;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Highest Raft term accepted from the network, in a request or a response.
/// Terms grow by one per election, so no real group gets near it (2^48
/// elections at one a millisecond take 8,900 years); a vote or heartbeat that
/// claims more is refused before openraft sees it, so no message can push a
/// voter's term to overflow.
pub const TERM_MAX: u64 = 1 << 48;

/// Whether a vote's term is within [`TERM_MAX`].
pub fn term_ok(vote: &openraft::Vote<u64>) -> bool {
    vote.leader_id().term <= TERM_MAX
}

/// How long an RPC may take when openraft gives no deadline.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// A request between quorum members. Built, encoded at once and dropped, so
/// the size of its largest variant costs nothing worth boxing for.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<u64>),
    /// Raft snapshot transfer (a chunk).
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Would the receiver vote for the sender? Asked before an election
    /// (see [`super::election`]); changes nothing on either side.
    PreVote(super::election::PreVote),
    /// A proposal to commit; `hops` counts forwards so far.
    Propose {
        /// The proposal, with its idempotency key.
        proposal: Command,
        /// Forwards so far.
        hops: u8,
        /// What is left of the proposer's deadline, in milliseconds: the
        /// receiver answers within it (0, from an older sender: the
        /// receiver's own bound, [`RPC_TIMEOUT`]).
        #[serde(default)]
        timeout_ms: u64,
    },
}

/// Why a forwarded proposal could not be decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ProposeFailure {
    /// No leader could commit it; it was not applied.
    NotApplied(String),
    /// The leader accepted it but did not confirm the commit; it may still be
    /// applied.
    Unknown(String),
}

/// A response to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Response {
    /// To [`Request::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To [`Request::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To [`Request::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// To [`Request::Propose`].
    Propose(Result<Outcome, ProposeFailure>),
    /// To [`Request::PreVote`].
    PreVote {
        /// Whether the receiver would vote for the sender.
        granted: bool,
    },
    /// The request was refused unread by Raft (a term past [`TERM_MAX`]):
    /// nothing was done.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Counters of the quorum's transport.
#[derive(Debug, Default)]
pub struct NetworkMetrics {
    /// Frames refused: oversized, truncated, unauthenticated or malformed.
    pub frames_refused: AtomicU64,
    /// Requests served.
    pub requests_served: AtomicU64,
    /// Raft requests or responses refused for a term past [`TERM_MAX`].
    pub terms_refused: AtomicU64,
    /// Connections refused past [`ListenerLimits::connections_max`].
    pub connections_refused: AtomicU64,
    /// Connections closed for silence past a read timeout.
    pub connections_timed_out: AtomicU64,
    /// Failed `accept` calls (each followed by a pause).
    pub accept_errors: AtomicU64,
    /// Connections closed because their handshake failed (a wrong or missing
    /// secret, a malformed hello, silence).
    pub handshakes_refused: AtomicU64,
}

/// Why an exchange with a quorum member failed, and whether the request may
/// have reached it.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct CallError {
    /// `false` when not one byte of the request left this node (the connection
    /// could not be opened, or the request could not be encoded): the member
    /// cannot have acted on it. `true` once any byte was handed to the socket.
    pub sent: bool,
    /// What failed.
    pub source: std::io::Error,
}

/// An open quorum connection: the stream, and with a secret the session key
/// and the sequence numbers of the frames sent and received on it.
struct Connection {
    stream: TcpStream,
    session: Option<SessionKey>,
    sent: u64,
    received: u64,
}

impl Connection {
    /// Opens a connection as a listener (`dialer == false`) or a client: with a
    /// secret, runs the handshake within `timeout` under a fresh node id (the
    /// quorum trusts the secret, not an identity).
    async fn establish(
        mut stream: TcpStream,
        secret: Option<&ClusterSecret>,
        dialer: bool,
        timeout: Duration,
    ) -> std::io::Result<Connection> {
        let session = match secret {
            None => None,
            Some(secret) => {
                let own = NodeId(rand::random());
                let established = if dialer {
                    handshake::dial(&mut stream, Some(secret), own, None, timeout).await
                } else {
                    handshake::accept(&mut stream, Some(secret), own, timeout).await
                };
                let established = established.map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
                })?;
                established.session
            }
        };
        Ok(Connection { stream, session, sent: 0, received: 0 })
    }

    /// Encodes (and with a session, seals) the next frame to send.
    fn frame<M: Serialize>(&mut self, message: &M) -> std::io::Result<Vec<u8>> {
        Ok(match &self.session {
            None => encode_frame(message, None).map_err(std::io::Error::other)?,
            Some(session) => {
                let mut body = encode_body(message).map_err(std::io::Error::other)?;
                session.seal(self.sent, &mut body);
                self.sent += 1;
                let mut frame = (body.len() as u32).to_be_bytes().to_vec();
                frame.extend_from_slice(&body);
                frame
            }
        })
    }

    async fn write<M: Serialize>(&mut self, message: &M) -> std::io::Result<()> {
        let frame = self.frame(message)?;
        self.stream.write_all(&frame).await
    }

    /// Reads the body of a frame of `len` bytes (its prefix already checked),
    /// growing the buffer only as bytes arrive, and opens it.
    async fn read_body<M: serde::de::DeserializeOwned>(
        &mut self,
        len: usize,
    ) -> std::io::Result<M> {
        let mut body = Vec::with_capacity(len.min(64 * 1024));
        (&mut self.stream).take(len as u64).read_to_end(&mut body).await?;
        if body.len() < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let invalid = |e: crate::replication::frame::FrameError| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, e)
        };
        match &self.session {
            None => decode_frame(&body, None).map_err(invalid),
            Some(session) => {
                if !session.open(self.received, &mut body) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a quorum frame does not open under the session key",
                    ));
                }
                self.received += 1;
                decode_body(&body).map_err(invalid)
            }
        }
    }

    /// Reads one frame: the prefix is checked against `max` before anything
    /// else is read.
    async fn read<M: serde::de::DeserializeOwned>(&mut self, max: usize) -> std::io::Result<M> {
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix).await?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {len} bytes is larger than the limit of {max}"),
            ));
        }
        self.read_body(len).await
    }
}

/// One connection to one quorum member.
pub struct Client {
    addr: String,
    secret: Option<ClusterSecret>,
    connection: Option<Connection>,
}

impl Client {
    /// A client of the member at `addr`; connects on first use.
    pub fn new(addr: String, secret: Option<ClusterSecret>) -> Client {
        Client { addr, secret, connection: None }
    }

    /// Sends `request` and waits for its response, within `timeout`. The
    /// error says whether the request may have reached the member.
    pub async fn call(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let mut sent = false;
        let result = tokio::time::timeout(timeout, self.exchange(request, &mut sent)).await;
        let result = result.unwrap_or_else(|_| {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "quorum RPC timed out"))
        });
        result.map_err(|source| {
            self.connection = None;
            CallError { sent, source }
        })
    }

    async fn exchange(&mut self, request: &Request, sent: &mut bool) -> std::io::Result<Response> {
        if self.connection.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let secret = self.secret.as_ref();
            let timeout = handshake::HANDSHAKE_TIMEOUT;
            self.connection = Some(Connection::establish(stream, secret, true, timeout).await?);
        }
        let connection = self.connection.as_mut().expect("connected above");
        // Encoded before anything is sent: a request that cannot be encoded
        // never leaves.
        let frame = connection.frame(request)?;
        *sent = true;
        connection.stream.write_all(&frame).await?;
        connection.read(QUORUM_FRAME_BYTES_MAX).await
    }
}

/// Longest quorum frame, in bytes, after the length prefix: the bound the
/// listener checks a prefix against before it reads (or allocates) anything
/// more. Room for an AppendEntries of at least one entry of the largest
/// allowed size ([`QUORUM_ENTRY_BYTES_MAX`]); a larger batch is split.
pub const QUORUM_FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest log entry (an encoded proposal with its key), in bytes: a
/// proposal past it is refused with `limit_exceeded` before it is proposed,
/// so every entry fits in a frame.
pub const QUORUM_ENTRY_BYTES_MAX: usize = 2 * 1024 * 1024;

// The frame encoder refuses frames past the peer channel's bound; the
// quorum's must not be larger, and an entry must fit in a frame with room
// for the rest of an AppendEntries.
const _: () = assert!(QUORUM_FRAME_BYTES_MAX <= crate::replication::frame::PEER_FRAME_BYTES_MAX);
const _: () = assert!(2 * QUORUM_ENTRY_BYTES_MAX <= QUORUM_FRAME_BYTES_MAX);

/// Bounds of a voter's quorum listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Connections served at once; one more is answered
    /// [`Response::Refused`] and closed. Voters keep a few each; a non-voter
    /// opens one per forwarded proposal in flight.
    pub connections_max: usize,
    /// Longest frame accepted, after the length prefix, in bytes.
    pub frame_bytes_max: usize,
    /// How long a new connection may take to send its first frame.
    pub handshake_timeout: Duration,
    /// How long an open connection may stay silent between frames.
    pub idle_timeout: Duration,
    /// How long a frame may take to arrive once its prefix has.
    pub frame_timeout: Duration,
}

impl Default for ListenerLimits {
    /// 64 connections (at most 256 MiB of frames being read), 4 MiB frames,
    /// 5 s to the first frame, 30 s of silence (Raft heartbeats come every
    /// 100 ms), 10 s per frame.
    fn default() -> ListenerLimits {
        ListenerLimits {
            connections_max: 64,
            frame_bytes_max: QUORUM_FRAME_BYTES_MAX,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// What serves incoming requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// The pause after a failed `accept` (out of file descriptors, say): doubling
/// from 5 ms to 1 s, back to none after a success, so the loop never spins.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    /// Shortest pause.
    pub const MIN: Duration = Duration::from_millis(5);
    /// Longest pause.
    pub const MAX: Duration = Duration::from_secs(1);

    /// The pause after one more failure in a row.
    pub fn failed(&mut self) -> Duration {
        self.next = (self.next * 2).clamp(Self::MIN, Self::MAX);
        self.next
    }

    /// A success: the next failure pauses the shortest time again.
    pub fn succeeded(&mut self) {
        self.next = Duration::ZERO;
    }
}

/// Accepts quorum connections on `listener` until the task is aborted,
/// within `limits`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    secret: Option<ClusterSecret>,
    metrics: Arc<NetworkMetrics>,
    limits: ListenerLimits,
) {
    let mut connections = tokio::task::JoinSet::new();
    let refusing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(error) => {
                metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
                let pause = backoff.failed();
                tracing::warn!(%error, ?pause, "accepting a quorum connection failed");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if connections.len() >= limits.connections_max {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            // Refusals being answered are bounded too: past as many again,
            // the connection is dropped unanswered.
            if refusing.load(Ordering::Relaxed) >= limits.connections_max {
                continue;
            }
            refusing.fetch_add(1, Ordering::Relaxed);
            let refusing = refusing.clone();
            let busy = Response::Refused {
                reason: format!("more than {} quorum connections", limits.connections_max),
            };
            // Answered on its own task, with a bound: a client that does not
            // read cannot hold the accept loop.
            // The request is drained unread (closing on unread bytes would
            // reset the connection before the answer is read).
            // With a secret, a stranger gets nothing before a handshake: the
            // connection is closed unanswered, which the client reads as
            // "not applied" (nothing of its request was sent).
            if secret.is_some() {
                refusing.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            if let Ok(frame) = encode_frame(&busy, None) {
                tokio::spawn(async move {
                    let answer = async {
                        stream.write_all(&frame).await?;
                        stream.shutdown().await?;
                        let mut sink = tokio::io::sink();
                        let drain = (&mut stream).take(limits.frame_bytes_max as u64 + 4);
                        tokio::io::copy(&mut { drain }, &mut sink).await
                    };
                    let _ = tokio::time::timeout(limits.handshake_timeout, answer).await;
                    refusing.fetch_sub(1, Ordering::Relaxed);
                });
            } else {
                refusing.fetch_sub(1, Ordering::Relaxed);
            }
            continue;
        }
        let (handler, secret, metrics) = (handler.clone(), secret.clone(), metrics.clone());
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            let timeout = limits.handshake_timeout;
            match Connection::establish(stream, secret.as_ref(), false, timeout).await {
                Ok(mut connection) => {
                    serve_connection(&mut connection, &*handler, &metrics, limits).await;
                }
                Err(error) => {
                    metrics.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%error, "quorum handshake refused; closing");
                }
            }
        });
    }
}

async fn serve_connection<H: Handler>(
    connection: &mut Connection,
    handler: &H,
    metrics: &NetworkMetrics,
    limits: ListenerLimits,
) {
    let mut wait = limits.handshake_timeout;
    loop {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(wait, connection.stream.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return, // closed
            Err(_) => {
                metrics.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > limits.frame_bytes_max {
            metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(len, "oversized quorum frame refused unread; closing");
            return;
        }
        let request: Request =
            match tokio::time::timeout(limits.frame_timeout, connection.read_body(len)).await {
                Ok(Ok(request)) => request,
                Ok(Err(error)) => {
                    metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%error, "quorum frame refused; closing");
                    return;
                }
                Err(_) => {
                    metrics.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
        metrics.requests_served.fetch_add(1, Ordering::Relaxed);
        let response = handler.handle(request).await;
        match tokio::time::timeout(limits.frame_timeout, connection.write(&response)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        wait = limits.idle_timeout;
    }
}

/// Makes openraft's per-target clients.
#[derive(Clone)]
pub struct Factory {
    /// The cluster secret.
    pub secret: Option<ClusterSecret>,
    /// Where responses refused for their term are counted.
    pub metrics: Arc<NetworkMetrics>,
}

/// openraft's client of one voter.
pub struct Network {
    target: u64,
    client: Client,
    metrics: Arc<NetworkMetrics>,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Network {
        Network {
            target,
            client: Client::new(node.addr.clone(), self.secret.clone()),
            metrics: self.metrics.clone(),
        }
    }
}

type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl Network {
    async fn rpc(&mut self, request: Request, option: &RPCOption) -> Result<Response, Unreachable> {
        let timeout = option.hard_ttl().min(RPC_TIMEOUT);
        self.client.call(&request, timeout).await.map_err(|e| Unreachable::new(&e.source))
    }

    fn remote<E: std::error::Error>(
        &self,
        error: RaftError<u64, E>,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("unexpected response kind")))
}

impl Network {
    /// A response whose vote claims a term past [`TERM_MAX`] is treated as
    /// no response: openraft never adopts such a term. (The error type is
    /// openraft's, as the trait methods return it.)
    #[allow(clippy::result_large_err)]
    fn checked<T, E: std::error::Error>(
        &self,
        answer: Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>,
        vote: impl Fn(&T) -> Option<openraft::Vote<u64>>,
    ) -> Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>> {
        match &answer {
            Ok(response) if vote(response).is_some_and(|v| !term_ok(&v)) => {
                self.metrics.terms_refused.fetch_add(1, Ordering::Relaxed);
                let error = std::io::Error::other("the response claims a term past the bound");
                Err(RPCError::Unreachable(Unreachable::new(&error)))
            }
            _ => answer,
        }
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<u64>> {
        // A batch that does not fit in one frame is cut to a prefix that
        // does, and answered as a partial success: openraft sends the rest
        // next. An entry fits alone (proposals are bounded well below).
        let mut request = Request::AppendEntries(rpc);
        let mut cut = None;
        while let Request::AppendEntries(rpc) = &mut request {
            let fits = rpc.entries.len() <= 1
                || encode_frame(&request, self.client.secret.as_ref())
                    .is_ok_and(|frame| frame.len() - 4 <= QUORUM_FRAME_BYTES_MAX);
            if fits {
                break;
            }
            let Request::AppendEntries(rpc) = &mut request else { unreachable!() };
            rpc.entries.truncate(rpc.entries.len() / 2);
            cut = rpc.entries.last().map(|entry| entry.log_id);
        }
        let answer = match self.rpc(request, &option).await? {
            Response::AppendEntries(Ok(AppendEntriesResponse::Success)) if cut.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(cut))
            }
            Response::AppendEntries(answer) => answer.map_err(|e| self.remote(e)),
            _ => Err(unexpected()),
        };
        self.checked(answer, |response| match response {
            AppendEntriesResponse::HigherVote(vote) => Some(*vote),
            _ => None,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let answer = match self.rpc(Request::InstallSnapshot(rpc), &option).await? {
            Response::InstallSnapshot(answer) => answer.map_err(|e| self.remote(e)),
            _ => Err(unexpected()),
        };
        self.checked(answer, |response| Some(response.vote))
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Rpc<VoteResponse<u64>> {
        let answer = match self.rpc(Request::Vote(rpc), &option).await? {
            Response::Vote(answer) => answer.map_err(|e| self.remote(e)),
            _ => Err(unexpected()),
        };
        self.checked(answer, |response| Some(response.vote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_doubling_up_to_a_bound_and_reset_on_success() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(pauses[0], AcceptBackoff::MIN);
        assert_eq!(pauses[1], AcceptBackoff::MIN * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), AcceptBackoff::MAX);
        backoff.succeeded();
        assert_eq!(backoff.failed(), AcceptBackoff::MIN);
    }
}

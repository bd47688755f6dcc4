//! The quorum's RPCs over TCP: openraft's append-entries, vote and
//! install-snapshot, and the forwarding of proposals to the leader.
//!
//! One request and one response per exchange, each a length-prefixed frame of
//! the peer channel's format (version byte, MessagePack, an HMAC tag when a
//! cluster secret is set). A client keeps one connection per target and
//! reconnects after an error. A frame that fails to decode or authenticate
//! closes its connection and is counted; the listener keeps serving.

use super::types::{Command, Outcome, TypeConfig};
use crate::replication::frame::{decode_frame, encode_frame, frame_len, ClusterSecret};
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

/// One connection to one quorum member.
pub struct Client {
    addr: String,
    secret: Option<ClusterSecret>,
    stream: Option<TcpStream>,
}

impl Client {
    /// A client of the member at `addr`; connects on first use.
    pub fn new(addr: String, secret: Option<ClusterSecret>) -> Client {
        Client { addr, secret, stream: None }
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
            self.stream = None;
            CallError { sent, source }
        })
    }

    async fn exchange(&mut self, request: &Request, sent: &mut bool) -> std::io::Result<Response> {
        let frame = encode_frame(request, self.secret.as_ref()).map_err(std::io::Error::other)?;
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        *sent = true;
        stream.write_all(&frame).await?;
        read_frame(stream, self.secret.as_ref()).await
    }
}

async fn read_frame<M: serde::de::DeserializeOwned>(
    stream: &mut TcpStream,
    secret: Option<&ClusterSecret>,
) -> std::io::Result<M> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = frame_len(prefix).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    decode_frame(&body, secret).map_err(std::io::Error::other)
}

/// What serves incoming requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// Accepts quorum connections on `listener` until the task is aborted.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    secret: Option<ClusterSecret>,
    metrics: Arc<NetworkMetrics>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let (handler, secret, metrics) = (handler.clone(), secret.clone(), metrics.clone());
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            loop {
                let request: Request = match read_frame(&mut stream, secret.as_ref()).await {
                    Ok(request) => request,
                    Err(error) => {
                        if error.kind() != std::io::ErrorKind::UnexpectedEof {
                            metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%error, "quorum frame refused; closing");
                        }
                        return;
                    }
                };
                metrics.requests_served.fetch_add(1, Ordering::Relaxed);
                let response = handler.handle(request).await;
                let Ok(frame) = encode_frame(&response, secret.as_ref()) else { return };
                if stream.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
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
        let answer = match self.rpc(Request::AppendEntries(rpc), &option).await? {
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

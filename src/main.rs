//! The `calmkv` command: run a node (`serve`) or talk to one (client commands).

use anyhow::{bail, Context as _};
use calmkv::invariants::Invariants;
use calmkv::replication::frame::ClusterSecret;
use calmkv::server::{GossipOptions, QuorumOptions, Server, ServerConfig, ServerError};
use calmkv::store::{Durability, Engine};
use calmkv::{Config, Limits};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod client;
mod demo;

/// Logs without `RUST_LOG`: calmkv at info. openraft reports every transient
/// unreachable voter (a node starting, a partition) at error level, so it is
/// silenced by default; `RUST_LOG=info,openraft=info` shows it. The quorum's
/// real failures reach clients as `coordination_unavailable`. The storage
/// engines log their routine work (recovery, compaction) at info; calmkv
/// reports what matters about the store itself, so they speak only to warn.
const DEFAULT_LOG_FILTER: &str = "info,openraft=off,fjall=warn,lsm_tree=warn,redb=warn,sled=warn";

/// calmkv: a key-value store that stays available when the network breaks.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: a local data directory and the HTTP API; with --gossip-addr
    /// and --peer-addr, a member of a cluster.
    Serve(Box<ServeArgs>),
    /// Start a local cluster of N nodes in this process (loopback ports,
    /// temporary data directories) and print each node's URLs; Ctrl-C stops it.
    Demo(demo::DemoArgs),
    /// List the cluster's members as a node sees them: SWIM state,
    /// incarnation, addresses.
    Members {
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Replace a dead quorum voter (ask the leader, with --url): start the new
    /// node first with --voters, --quorum-addr ADDR and --quorum-id NEW_ID.
    ReplaceVoter {
        /// The dead voter's id (see `quorum.voters` in /v1/cluster).
        dead: u64,
        /// The new voter's id, above every id the group used.
        new_id: u64,
        /// The new voter's quorum address.
        addr: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Explain which operations run locally and which need the quorum: the
    /// whole table, or one operation (incr, decr, add, remove, create, update,
    /// delete) on one key. Reads FILE when given, else asks a running node.
    Explain {
        /// The key.
        key: Option<String>,
        /// The operation.
        #[arg(requires = "key")]
        op: Option<String>,
        /// Analyze this declarations file instead of asking a node.
        #[arg(long)]
        invariants: Option<PathBuf>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Read a key (registers print their bytes; other types print JSON).
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Set a register. Reads the key first and writes with its context, so the
    /// value replaces what was there (use --sibling to add a concurrent value).
    Put {
        /// The key.
        key: String,
        /// The value (use --file to read it from a file, `-` for stdin).
        value: Option<String>,
        /// Read the value from this file (`-` for standard input).
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Write with this context token instead of reading one first.
        #[arg(long)]
        context: Option<String>,
        /// Write without a context: the value becomes a sibling of what is there.
        #[arg(long, conflicts_with = "context")]
        sibling: bool,
        /// Create only: fail if the key has a value.
        #[arg(long, conflicts_with_all = ["context", "sibling"])]
        if_absent: bool,
        /// Write a last-writer-wins register instead.
        #[arg(long, conflicts_with_all = ["context", "sibling", "if_absent"])]
        lww: bool,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Delete a key (what this node holds, or what --context saw).
    Del {
        /// The key.
        key: String,
        /// Delete only what this context token saw.
        #[arg(long)]
        context: Option<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Increment a counter; prints the new value.
    Incr {
        /// The key.
        key: String,
        /// The amount.
        #[arg(default_value_t = 1)]
        amount: u64,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Decrement a counter; prints the new value.
    Decr {
        /// The key.
        key: String,
        /// The amount.
        #[arg(default_value_t = 1)]
        amount: u64,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Add members to a set; prints the members.
    Sadd {
        /// The key.
        key: String,
        /// The members to add.
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Remove members from a set; prints the members.
    Srem {
        /// The key.
        key: String,
        /// The members to remove.
        #[arg(required = true)]
        members: Vec<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// List keys with a prefix, one per line with their types.
    Scan {
        /// The prefix (all keys when omitted).
        #[arg(default_value = "")]
        prefix: String,
        /// Keys per page.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Follow cursors until every key is listed (stops after --max-pages).
        #[arg(long)]
        all: bool,
        /// Most pages --all fetches.
        #[arg(long, default_value_t = 1000)]
        max_pages: usize,
        /// Start after this cursor (printed when more keys follow).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        conn: client::Conn,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    /// Acknowledge after fsync (concurrent writes share one flush).
    Sync,
    /// Flush every --flush-interval-ms; a crash loses at most that window.
    Interval,
    /// Never flush explicitly; a crash may lose recent writes.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    /// sled 0.34.7, a log-structured B-tree: opens the data directories it
    /// made (calmkv's first engine); makes no new ones, since it never reclaims
    /// overwritten values while calmkv runs it.
    Sled,
    /// fjall 3, an LSM tree with a journal (the default for new directories).
    Fjall,
    /// redb 5, a copy-on-write B-tree in one file.
    Redb,
}

impl From<EngineArg> for Engine {
    fn from(arg: EngineArg) -> Engine {
        match arg {
            EngineArg::Sled => Engine::Sled,
            EngineArg::Fjall => Engine::Fjall,
            EngineArg::Redb => Engine::Redb,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Where the node keeps its data and identity.
    #[arg(long, env = "CALMKV_DATA_DIR", default_value = Config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "CALMKV_HTTP_ADDR", default_value = "127.0.0.1:7070")]
    http_addr: String,
    /// The storage engine. A new data directory records it; an existing one
    /// keeps the engine that created it, so naming another is refused (nothing
    /// changes). Without it: the directory's own engine, or fjall for a new one.
    #[arg(long, env = "CALMKV_ENGINE", value_enum)]
    engine: Option<EngineArg>,
    /// Free space, in bytes, kept on the data directory's disk: a write that
    /// would eat into it is refused with `507 insufficient_storage` (reads go
    /// on), so the engines never meet a full disk themselves.
    #[arg(long, env = "CALMKV_FREE_BYTES_MIN", default_value_t = calmkv::store::FREE_BYTES_MIN_DEFAULT)]
    free_bytes_min: u64,
    /// When a write is acknowledged.
    #[arg(long, env = "CALMKV_DURABILITY", value_enum, default_value = "sync")]
    durability: DurabilityArg,
    /// Flush period for --durability interval, in milliseconds.
    #[arg(long, env = "CALMKV_FLUSH_INTERVAL_MS", default_value_t = 100)]
    flush_interval_ms: u64,
    /// Serve the HTTP API over HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CALMKV_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "CALMKV_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on every route but /healthz and /readyz.
    #[arg(long, env = "CALMKV_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Longest key, in bytes.
    #[arg(long, env = "CALMKV_MAX_KEY_BYTES", default_value_t = Limits::KEY_BYTES_MAX)]
    max_key_bytes: usize,
    /// Largest value, in bytes.
    #[arg(long, env = "CALMKV_MAX_VALUE_BYTES", default_value_t = Limits::VALUE_BYTES_MAX)]
    max_value_bytes: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "CALMKV_MAX_BODY_BYTES", default_value_t = Limits::BODY_BYTES_MAX)]
    max_body_bytes: usize,
    /// Members per set and fields per map.
    #[arg(long, env = "CALMKV_MAX_MEMBERS", default_value_t = Limits::MEMBERS_MAX)]
    max_members: usize,
    /// Concurrent values per register.
    #[arg(long, env = "CALMKV_MAX_SIBLINGS", default_value_t = Limits::SIBLINGS_MAX)]
    max_siblings: usize,
    /// HTTP requests served at once; more are answered 503 overloaded.
    #[arg(long, env = "CALMKV_MAX_IN_FLIGHT", default_value_t = Limits::IN_FLIGHT_REQUESTS_MAX)]
    max_in_flight: usize,
    /// Time a request may take before it is answered 503 timeout, in milliseconds.
    #[arg(long, env = "CALMKV_REQUEST_TIMEOUT_MS", default_value_t = Limits::REQUEST_TIMEOUT.as_millis() as u64)]
    request_timeout_ms: u64,
    /// Time a client has to send a request's headers, and the longest idle
    /// wait on a keep-alive connection, in milliseconds; then it is closed.
    #[arg(long, env = "CALMKV_HEADER_READ_TIMEOUT_MS", default_value_t = Limits::HEADER_READ_TIMEOUT.as_millis() as u64)]
    header_read_timeout_ms: u64,
    /// Time a client has to send a request's body, in milliseconds; then it is
    /// answered 408 body_timeout and the connection closed.
    #[arg(long, env = "CALMKV_BODY_READ_TIMEOUT_MS", default_value_t = Limits::BODY_READ_TIMEOUT.as_millis() as u64)]
    body_read_timeout_ms: u64,
    /// HTTP connections open at once from one client IP; more are closed at once.
    #[arg(long, env = "CALMKV_MAX_CONNECTIONS_PER_IP", default_value_t = Limits::HTTP_CONNECTIONS_PER_IP_MAX)]
    max_connections_per_ip: usize,
    /// HTTP connections open at once from all clients; more are closed at once.
    #[arg(long, env = "CALMKV_MAX_CONNECTIONS", default_value_t = Limits::HTTP_CONNECTIONS_MAX)]
    max_connections: usize,
    /// Bytes of request bodies read at once over all connections; a request
    /// whose declared length does not fit is answered 503 overloaded.
    #[arg(long, env = "CALMKV_MAX_BODY_BUFFER_BYTES", default_value_t = Limits::BODY_BUFFER_BYTES_MAX)]
    max_body_buffer_bytes: usize,
    /// Invariant declarations (TOML) to enforce; see docs/invariants.md.
    #[arg(long, env = "CALMKV_INVARIANTS")]
    invariants: Option<PathBuf>,
    /// UDP address for gossip membership: makes the node a cluster member
    /// (needs --peer-addr).
    #[arg(long, env = "CALMKV_GOSSIP_ADDR")]
    gossip_addr: Option<String>,
    /// TCP address of the peer channel that carries replication.
    #[arg(long, env = "CALMKV_PEER_ADDR")]
    peer_addr: Option<String>,
    /// Gossip addresses of cluster members to join through, comma-separated.
    #[arg(long, env = "CALMKV_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// Shared secret (at least 16 bytes) that authenticates and encrypts gossip
    /// packets, peer connections and quorum frames; every member needs it.
    /// Several, comma-separated, make a keyring for rotation: the first seals,
    /// every one opens. Without it, the peer, gossip and quorum listeners may
    /// bind to loopback addresses only.
    #[arg(long, env = "CALMKV_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// The quorum group's voters, by quorum address, comma-separated, the same
    /// list on every node (3 is the usual size). Operations that invariants
    /// route to the quorum go through them.
    #[arg(long, env = "CALMKV_VOTERS", value_delimiter = ',')]
    voters: Vec<String>,
    /// This node's quorum address, if it is one of --voters.
    #[arg(long, env = "CALMKV_QUORUM_ADDR")]
    quorum_addr: Option<String>,
    /// This voter's id when it replaces a dead one (see `calmkv replace-voter`).
    #[arg(long, env = "CALMKV_QUORUM_ID", requires = "quorum_addr")]
    quorum_id: Option<u64>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        if self.max_in_flight == 0 || self.max_members == 0 || self.max_siblings == 0 {
            bail!("--max-in-flight, --max-members and --max-siblings must be at least 1");
        }
        if self.max_value_bytes >= self.max_body_bytes {
            bail!("--max-value-bytes must be smaller than --max-body-bytes");
        }
        let durability = match self.durability {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Interval if self.flush_interval_ms == 0 => {
                bail!("--flush-interval-ms must be at least 1")
            }
            DurabilityArg::Interval => {
                Durability::Interval(Duration::from_millis(self.flush_interval_ms))
            }
            DurabilityArg::None => Durability::None,
        };
        let limits = Limits {
            key_bytes_max: self.max_key_bytes,
            value_bytes_max: self.max_value_bytes,
            body_bytes_max: self.max_body_bytes,
            members_max: self.max_members,
            siblings_max: self.max_siblings,
            in_flight_requests_max: self.max_in_flight,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(self.body_read_timeout_ms),
            http_connections_per_ip_max: self.max_connections_per_ip,
            http_connections_max: self.max_connections,
            body_buffer_bytes_max: self.max_body_buffer_bytes,
            ..Limits::default()
        };
        limits.validate().map_err(|reason| anyhow::anyhow!("invalid limits: {reason}"))?;
        let invariants = match &self.invariants {
            Some(path) => Invariants::load(path)?,
            None => Invariants::none(),
        };
        Ok(Config {
            engine: self.engine.map(Engine::from),
            free_bytes_min: self.free_bytes_min,
            durability,
            limits,
            invariants: Arc::new(invariants),
            ..Config::new(&self.data_dir)
        })
    }
}

impl ServeArgs {
    async fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig::new(self.config()?, self.http_addr.clone());
        config.auth_token = self.auth_token.clone();
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(calmkv::http::Tls::from_pem_files(cert, key)?);
        }
        config.peer_addr = self.peer_addr.clone();
        if let Some(secret) = &self.cluster_secret {
            config.cluster_secret = Some(ClusterSecret::parse(secret).context(
                "--cluster-secret must be at least 16 bytes (each of 1 to 8 comma-separated secrets)",
            )?);
        }
        if self.quorum_addr.is_some() && self.voters.is_empty() {
            bail!("--quorum-addr needs --voters");
        }
        if !self.voters.is_empty() {
            config.quorum = Some(QuorumOptions {
                voters: self.voters.clone(),
                listen: self.quorum_addr.clone(),
                id: self.quorum_id,
                ..QuorumOptions::default()
            });
        }
        match &self.gossip_addr {
            None if !self.join.is_empty() => bail!("--join needs --gossip-addr"),
            None => {}
            Some(_) if self.peer_addr.is_none() => bail!("--gossip-addr needs --peer-addr"),
            Some(addr) => {
                let seeds = resolve_all(&self.join).await?;
                config.gossip = Some(GossipOptions::new(addr.clone(), seeds));
            }
        }
        Ok(config)
    }
}

/// Resolves `host:port` strings to socket addresses.
async fn resolve_all(addrs: &[String]) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let mut resolved = Vec::new();
    for addr in addrs {
        let mut found = tokio::net::lookup_host(addr.as_str())
            .await
            .with_context(|| format!("cannot resolve {addr:?} (expected host:port)"))?;
        resolved.push(found.next().with_context(|| format!("{addr:?} resolves to nothing"))?);
    }
    Ok(resolved)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.server_config().await?;
    let stop = shutdown_signal();
    let server = Server::start(config).await.map_err(|error| match error {
        ServerError::Node(error) => anyhow::Error::new(error)
            .context(format!("cannot open the data directory {}", args.data_dir.display())),
        error => error.into(),
    })?;
    let id = server.node().id();
    let http_addr = server.http_addr();
    tracing::info!(
        node = %id, %http_addr, data_dir = %args.data_dir.display(), "calmkv node serving"
    );
    let scheme = if args.tls_cert.is_some() { "https" } else { "http" };
    println!("calmkv node {id} listening on {scheme}://{http_addr}");
    if let (Some(gossip), Some(peer)) = (server.gossip_addr(), server.peer()) {
        println!("calmkv node {id} gossip={gossip} peer={}", peer.addr);
    }
    stop.await;
    tracing::info!("finishing: leaving the cluster, draining requests, flushing the store");
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    // Registered now, not at the first poll: a SIGTERM that arrives between
    // "listening" and the first poll must stop the node gracefully, not kill it.
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let interrupt = async {
                match &mut interrupt {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let terminate = async {
                match &mut terminate {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt => tracing::info!("Ctrl-C: shutting down"),
                _ = terminate => tracing::info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C: shutting down");
        }
    }
}

/// How long the runtime waits, once the command is done, for blocking calls
/// still running (a write stuck on a disk that does not answer): the process
/// exits without them.
const RUNTIME_SHUTDOWN_MAX: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run());
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_MAX);
    code
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Demo(args) => demo::run(args).await,
        command => client::run(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, `a: b: c`, each said once: the
/// library's errors already include their source in their message, so a cause
/// whose text its wrapper said is skipped.
fn report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

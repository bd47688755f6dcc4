//! The `calmkv` command: run a node (`serve`) or talk to one (client commands).

use anyhow::{bail, Context as _};
use calmkv::http::{AppState, HttpConfig};
use calmkv::metrics::Metrics;
use calmkv::store::Durability;
use calmkv::{Config, Limits};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod client;

/// calmkv: a key-value store that stays available when the network breaks.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: a local data directory and the HTTP API.
    Serve(ServeArgs),
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

#[derive(Args)]
struct ServeArgs {
    /// Where the node keeps its data and identity.
    #[arg(long, env = "CALMKV_DATA_DIR", default_value = Config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "CALMKV_HTTP_ADDR", default_value = "127.0.0.1:7070")]
    http_addr: String,
    /// When a write is acknowledged.
    #[arg(long, env = "CALMKV_DURABILITY", value_enum, default_value = "sync")]
    durability: DurabilityArg,
    /// Flush period for --durability interval, in milliseconds.
    #[arg(long, env = "CALMKV_FLUSH_INTERVAL_MS", default_value_t = 100)]
    flush_interval_ms: u64,
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
            ..Limits::default()
        };
        Ok(Config { durability, limits, ..Config::new(&self.data_dir) })
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let node = tokio::task::spawn_blocking(move || config.open_node())
        .await?
        .with_context(|| format!("cannot open the data directory {}", args.data_dir.display()))?;
    let node = Arc::new(node);
    let listener = tokio::net::TcpListener::bind(&args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.http_addr))?;
    let http_addr = listener.local_addr()?.to_string();
    tracing::info!(
        node = %node.id(), %http_addr, data_dir = %args.data_dir.display(), "calmkv node serving"
    );
    println!("calmkv node {} listening on http://{http_addr}", node.id());
    let state = AppState::new(
        node.clone(),
        Metrics::new(),
        HttpConfig { auth_token: args.auth_token, http_addr },
    );
    calmkv::http::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("finishing: flushing the store");
    tokio::task::spawn_blocking(move || node.flush()).await??;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
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

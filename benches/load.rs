//! HTTP load generator: calmkv beside a server that does nothing, same client,
//! same run, so the ratio shows what calmkv costs per request.
//!
//! Targets, each a separate process started by this program on 127.0.0.1:
//! `calmkv-sync`, `calmkv-none` (and optionally `calmkv-interval`): the built
//! `calmkv serve` binary with a temporary data directory; `null`: a minimal axum
//! server (this same executable, `--serve-null`) answering `204` to PUT and `200`
//! to GET and POST without touching the request.
//!
//! Per target and workload, on a fresh server process: `--connections` HTTP/1.1
//! keep-alive connections (raw hyper, one per worker task, closed loop: a worker
//! sends its next request when the previous one has answered), first a prefill
//! writing every key once, then a warm-up and a measured phase. Workloads: `put`
//! (register overwrite carrying the `X-Context` of the worker's previous write of
//! that key, so no siblings pile up), `get` (the same keys), `incr`
//! (`POST {"counter":{"incr":1}}`), `mixed` (each connection alternates `put` and
//! `get`; reported per op). Every phase stops at `--duration-secs` or
//! `--requests-max`, whichever comes first, and every request at
//! `--request-timeout-ms`.
//!
//! Reported per phase and op: throughput and its ratio to the null server's;
//! latency p50/p99/p999/max from an HDR histogram (µs, 3 significant digits);
//! server cores busy, other processes' cores (a disturbed run shows here), and
//! CPU per request of server and client (from `/proc`); and for calmkv, from its
//! `/metrics`, store batches per flush, flushes per second, mean flush time and
//! the store's size at the end.
//!
//! Run: `cargo bench --bench load -- --duration-secs 10 --connections 32`
//! (`-- --help` for every option; docs/benchmarks.md for results). Without
//! `--bench` (as `cargo test --benches` runs it) it makes a short smoke run.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The header carrying a key's causal context.
const X_CONTEXT: &str = "x-context";
/// Largest latency the histograms hold, in µs (a minute).
const LATENCY_US_MAX: u64 = 60_000_000;
/// How long a server may take to print its address.
const STARTUP_WAIT_MAX: Duration = Duration::from_secs(30);
/// Bounds of the smoke run made without `--bench`.
const SMOKE_DURATION: Duration = Duration::from_secs(1);
const SMOKE_REQUESTS_MAX: u64 = 500;
const SMOKE_CONNECTIONS: usize = 4;
const SMOKE_KEYS: usize = 5;
/// Longest prefill (every connection writes each of its keys once).
const PREFILL_DURATION_MAX: Duration = Duration::from_secs(120);

/// calmkv beside a do-nothing axum server over HTTP/1.1 on 127.0.0.1.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Args {
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Length of the unrecorded warm-up before each measured phase, in seconds.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Most requests in one phase (measured or warm-up), over all connections.
    #[arg(long, default_value_t = 5_000_000)]
    requests_max: u64,
    /// Concurrent keep-alive connections, one worker each.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Keys each connection writes and reads in turn (`load/<conn>/<i>`).
    #[arg(long, default_value_t = 100)]
    keys_per_connection: usize,
    /// Size of a register value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Servers to drive, in order (comma-separated) [default:
    /// null,calmkv-sync,calmkv-none].
    #[arg(long, value_enum, value_delimiter = ',')]
    targets: Option<Vec<Target>>,
    /// Workloads per server, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "put,get,incr,mixed")]
    workloads: Vec<Workload>,
    /// Repeat the whole sequence of targets this many times (spots disturbed runs).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Threads of this client's runtime (1: the client uses at most one core).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// A request unanswered after this long counts as an error (ms).
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// The calmkv binary (default: the one cargo built with this bench).
    #[arg(long)]
    calmkv_bin: Option<PathBuf>,
    /// Internal: run the do-nothing server and print its address.
    #[arg(long, hide = true)]
    serve_null: bool,
    /// Passed by `cargo bench`; without it a short smoke run is made.
    #[arg(long, hide = true)]
    bench: bool,
    /// A benchmark name filter from `cargo bench -- <filter>`: the run happens only
    /// when "load" contains it.
    #[arg(hide = true)]
    filter: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Null,
    CalmkvSync,
    CalmkvInterval,
    CalmkvNone,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Null => "null",
            Target::CalmkvSync => "calmkv-sync",
            Target::CalmkvInterval => "calmkv-interval",
            Target::CalmkvNone => "calmkv-none",
        }
    }

    fn durability(self) -> Option<&'static str> {
        match self {
            Target::Null => None,
            Target::CalmkvSync => Some("sync"),
            Target::CalmkvInterval => Some("interval"),
            Target::CalmkvNone => Some("none"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Register overwrites.
    Put,
    /// Register reads.
    Get,
    /// Counter increments.
    Incr,
    /// Each connection alternates a register overwrite and a read of its keys.
    Mixed,
}

impl Workload {
    /// The operation of a connection's `n`-th request.
    fn op(self, n: u64) -> Op {
        match self {
            Workload::Put => Op::Put,
            Workload::Get => Op::Get,
            Workload::Incr => Op::Incr,
            Workload::Mixed if n.is_multiple_of(2) => Op::Put,
            Workload::Mixed => Op::Get,
        }
    }
}

/// One kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Put,
    Get,
    Incr,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Incr => "incr",
        }
    }

    fn expected(self) -> StatusCode {
        match self {
            Op::Put => StatusCode::NO_CONTENT,
            Op::Get | Op::Incr => StatusCode::OK,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.serve_null {
        return serve_null();
    }
    if args.filter.as_deref().is_some_and(|f| !"load".contains(f)) {
        return Ok(());
    }
    if !args.bench {
        println!("smoke run (no --bench): use `cargo bench --bench load` to measure");
        args.duration_secs = SMOKE_DURATION.as_secs();
        args.warmup_secs = 0;
        args.requests_max = args.requests_max.min(SMOKE_REQUESTS_MAX);
        args.connections = args.connections.min(SMOKE_CONNECTIONS);
        args.keys_per_connection = args.keys_per_connection.min(SMOKE_KEYS);
    }
    args.targets.get_or_insert_with(|| vec![Target::Null, Target::CalmkvSync, Target::CalmkvNone]);
    if args.connections == 0 || args.keys_per_connection == 0 || args.client_threads == 0 {
        bail!("--connections, --keys-per-connection and --client-threads must be at least 1");
    }
    let runtime = if args.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()?
    };
    let rows = runtime.block_on(run(&args))?;
    print_report(&args, &rows);
    if rows.iter().any(|r| r.failed() > 0) {
        eprintln!("some requests failed: see the failed column");
        std::process::exit(1);
    }
    Ok(())
}

/// Every workload on every target, every round; each on a fresh server.
async fn run(args: &Args) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        for &target in args.targets.as_deref().unwrap_or_default() {
            for &workload in &args.workloads {
                let server = Server::start(target, args)?;
                println!("round {round}: {} on {}", target.name(), server.addr);
                rows.extend(drive(args, round, target, workload, &server).await);
            }
        }
    }
    Ok(rows)
}

/// Prefill, warm-up and measured phase of one workload on a fresh server.
async fn drive(
    args: &Args,
    round: usize,
    target: Target,
    workload: Workload,
    server: &Server,
) -> Vec<Row> {
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let workers: Vec<Worker> = (0..args.connections)
        .map(|id| Worker::new(id, server.addr, args.keys_per_connection))
        .collect();
    let prefill = Bounds {
        duration: PREFILL_DURATION_MAX,
        total_max: args.requests_max,
        per_worker_max: Some(args.keys_per_connection as u64),
        stop_on_error: true,
    };
    let (workers, tally) = phase(workers, Workload::Put, prefill, &value, timeout).await;
    if tally.failed() > 0 {
        println!("  prefill of {} failed ({} requests): skipping", target.name(), tally.failed());
    }
    let warmup = Bounds {
        duration: Duration::from_secs(args.warmup_secs),
        total_max: args.requests_max,
        per_worker_max: None,
        stop_on_error: false,
    };
    let (workers, _) = phase(workers, workload, warmup, &value, timeout).await;
    let measured = Bounds {
        duration: Duration::from_secs(args.duration_secs),
        total_max: args.requests_max,
        per_worker_max: None,
        stop_on_error: false,
    };
    let before = Usage::sample(server).await;
    let started = Instant::now();
    let (_, tally) = phase(workers, workload, measured, &value, timeout).await;
    let elapsed = started.elapsed();
    let usage = Usage::sample(server).await.since(&before);
    let phase_ok = tally.ok();
    let mut rows = Vec::new();
    for (op, stats) in tally.ops {
        let errors = tally.errors;
        let row = Row { round, target, workload, op, elapsed, stats, phase_ok, errors, usage };
        println!("  {}", row.summary());
        rows.push(row);
    }
    rows
}

/// When a phase stops.
#[derive(Clone, Copy)]
struct Bounds {
    duration: Duration,
    total_max: u64,
    per_worker_max: Option<u64>,
    /// A worker stops at its first connection error or timeout.
    stop_on_error: bool,
}

/// What a phase observed of one kind of request.
#[derive(Debug)]
struct OpTally {
    latency_us: Histogram<u64>,
    ok: u64,
    /// Answers with another status than expected, by status.
    unexpected: BTreeMap<u16, u64>,
}

impl OpTally {
    fn new() -> OpTally {
        OpTally {
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds"),
            ok: 0,
            unexpected: BTreeMap::new(),
        }
    }
}

/// What a phase observed.
#[derive(Debug, Default)]
struct Tally {
    ops: BTreeMap<Op, OpTally>,
    /// Connection errors and timeouts.
    errors: u64,
}

impl Tally {
    fn record(&mut self, op: Op, outcome: anyhow::Result<StatusCode>, elapsed: Duration) {
        let stats = self.ops.entry(op).or_insert_with(OpTally::new);
        match outcome {
            Ok(status) if status == op.expected() => {
                stats.ok += 1;
                let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
                stats.latency_us.saturating_record(us.max(1));
            }
            Ok(status) => *stats.unexpected.entry(status.as_u16()).or_default() += 1,
            Err(_) => self.errors += 1,
        }
    }

    fn add(&mut self, other: Tally) {
        for (op, theirs) in other.ops {
            let ours = self.ops.entry(op).or_insert_with(OpTally::new);
            ours.latency_us.add(&theirs.latency_us).expect("same bounds");
            ours.ok += theirs.ok;
            for (status, n) in theirs.unexpected {
                *ours.unexpected.entry(status).or_default() += n;
            }
        }
        self.errors += other.errors;
    }

    fn ok(&self) -> u64 {
        self.ops.values().map(|t| t.ok).sum()
    }

    fn failed(&self) -> u64 {
        self.errors + self.ops.values().flat_map(|t| t.unexpected.values()).sum::<u64>()
    }
}

/// Runs one phase on every worker at once; gives the workers back.
async fn phase(
    workers: Vec<Worker>,
    workload: Workload,
    bounds: Bounds,
    value: &Bytes,
    timeout: Duration,
) -> (Vec<Worker>, Tally) {
    let deadline = Instant::now() + bounds.duration;
    let issued = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let (issued, value) = (issued.clone(), value.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut mine = 0;
                while Instant::now() < deadline
                    && bounds.per_worker_max.is_none_or(|max| mine < max)
                    && issued.fetch_add(1, Ordering::Relaxed) < bounds.total_max
                {
                    let op = workload.op(mine);
                    mine += 1;
                    let started = Instant::now();
                    let outcome = worker.one(op, &value, timeout).await;
                    tally.record(op, outcome, started.elapsed());
                    if bounds.stop_on_error && tally.errors > 0 {
                        break;
                    }
                }
                (worker, tally)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut total = Tally::default();
    for task in tasks {
        let (worker, tally) = task.await.expect("a worker task never panics");
        total.add(tally);
        back.push(worker);
    }
    (back, total)
}

/// One connection and the keys it owns.
struct Worker {
    id: usize,
    conn: Conn,
    /// The context of this worker's last write of each of its keys.
    contexts: Vec<Option<HeaderValue>>,
    /// The key of the next write and of the next read or increment.
    next_write: usize,
    next_other: usize,
}

impl Worker {
    fn new(id: usize, addr: SocketAddr, keys: usize) -> Worker {
        Worker {
            id,
            conn: Conn { addr, sender: None },
            contexts: vec![None; keys],
            next_write: 0,
            next_other: 0,
        }
    }

    /// Sends one request of `op` on the op's next key and returns the status.
    async fn one(
        &mut self,
        op: Op,
        value: &Bytes,
        timeout: Duration,
    ) -> anyhow::Result<StatusCode> {
        let keys = self.contexts.len();
        let cursor = if op == Op::Put { &mut self.next_write } else { &mut self.next_other };
        let slot = *cursor;
        *cursor = (slot + 1) % keys;
        let builder = Request::builder().header(HOST, "127.0.0.1");
        let request = match op {
            Op::Put => {
                let mut builder =
                    builder.method(Method::PUT).uri(format!("/v1/kv/load/{}/{slot}", self.id));
                if let Some(context) = &self.contexts[slot] {
                    builder = builder.header(X_CONTEXT, context.clone());
                }
                builder.body(Full::new(value.clone()))?
            }
            Op::Get => builder
                .method(Method::GET)
                .uri(format!("/v1/kv/load/{}/{slot}", self.id))
                .body(Full::new(Bytes::new()))?,
            Op::Incr => builder
                .method(Method::POST)
                .uri(format!("/v1/kv/ctr/{}/{slot}", self.id))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(br#"{"counter":{"incr":1}}"#)))?,
        };
        let (status, context, _) = self.conn.send(request, timeout).await?;
        if op == Op::Put && status == op.expected() {
            self.contexts[slot] = context;
        }
        Ok(status)
    }
}

/// An answer: status, `X-Context` header, body.
type Answer = (StatusCode, Option<HeaderValue>, Bytes);

/// A keep-alive HTTP/1.1 connection, opened on first use and again after an error.
struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    /// Sends a request and reads the whole answer: status, `X-Context` and body.
    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> anyhow::Result<Answer> {
        let result = tokio::time::timeout(timeout, self.exchange(request)).await;
        let result = result.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        if result.is_err() {
            self.sender = None; // the connection's state is unknown: start afresh
        }
        result
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        if self.sender.is_none() {
            self.sender = Some(connect(self.addr).await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let context = response.headers().get(X_CONTEXT).cloned();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, context, body))
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A server process started for the run; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// The null server exits when its standard input closes.
    _stdin: Option<ChildStdin>,
    /// calmkv's data directory, removed when dropped.
    data_dir: Option<tempfile::TempDir>,
    clock_ticks_per_second: f64,
}

impl Server {
    fn start(target: Target, args: &Args) -> anyhow::Result<Server> {
        let (mut command, data_dir) = match target.durability() {
            None => {
                let mut command = Command::new(std::env::current_exe()?);
                command.arg("--serve-null");
                (command, None)
            }
            Some(durability) => {
                let bin = args
                    .calmkv_bin
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_calmkv")));
                let dir = tempfile::tempdir()?;
                let mut command = Command::new(bin);
                command
                    .arg("serve")
                    .arg("--data-dir")
                    .arg(dir.path())
                    .args(["--http-addr", "127.0.0.1:0", "--durability", durability])
                    .env("RUST_LOG", "warn");
                (command, Some(dir))
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", target.name()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let addr = match read_address(stdout) {
            Ok(addr) => addr,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(error.context(format!("{} did not start", target.name())));
            }
        };
        let _stdin = if data_dir.is_none() { stdin } else { None };
        Ok(Server { child, addr, _stdin, data_dir, clock_ticks_per_second: clock_ticks() })
    }

    /// CPU time the server process has used (user + system), in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        process_cpu_seconds(&format!("/proc/{}/stat", self.child.id()), self.clock_ticks_per_second)
    }

    /// calmkv's store counters from its `/metrics`.
    async fn store_counters(&self) -> Option<StoreCounters> {
        self.data_dir.as_ref()?;
        let mut conn = Conn { addr: self.addr, sender: None };
        let request = Request::get("/metrics").header(HOST, "127.0.0.1");
        let request = request.body(Full::new(Bytes::new())).ok()?;
        let (_, _, body) = conn.send(request, STARTUP_WAIT_MAX).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        let metric = |name: &str| -> Option<f64> {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        };
        Some(StoreCounters {
            batches: metric("calmkv_store_batches")?,
            flushes: metric("calmkv_store_flush_seconds_count").unwrap_or(0.0),
            flush_seconds: metric("calmkv_store_flush_seconds_sum").unwrap_or(0.0),
            size_bytes: metric("calmkv_store_size_bytes").unwrap_or(0.0),
        })
    }
}

/// calmkv's store counters (`/metrics`): totals, or their change over a phase
/// (except the size, which stays the size at the end).
#[derive(Clone, Copy, Debug)]
struct StoreCounters {
    batches: f64,
    flushes: f64,
    flush_seconds: f64,
    size_bytes: f64,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the server's first line of output, `... listening on http://ADDR`.
fn read_address(stdout: std::process::ChildStdout) -> anyhow::Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = tx.send(reader.read_line(&mut line).map(|_| line));
        // Keep draining until the server exits, so it never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx.recv_timeout(STARTUP_WAIT_MAX).context("no address printed")??;
    let addr = line
        .trim()
        .rsplit_once("http://")
        .with_context(|| format!("unexpected first line {line:?}"))?
        .1;
    Ok(addr.parse()?)
}

/// The kernel's clock ticks per second, in which /proc reports CPU time.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process from its `/proc/<pid>/stat`, in seconds.
fn process_cpu_seconds(stat_path: &str, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Busy CPU time of the whole machine (every process, also those of other users
/// of a shared machine), in seconds: the `cpu` line of `/proc/stat` minus idle
/// and iowait.
fn machine_busy_seconds(ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> =
        stat.lines().next()?.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
    let (idle, iowait) = (fields.get(3)?, fields.get(4)?);
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    Some((fields.iter().take(8).sum::<f64>() - idle - iowait) / ticks_per_second)
}

/// CPU and store counters at one moment, or their change over a phase.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    server_cpu_s: Option<f64>,
    client_cpu_s: Option<f64>,
    /// CPU time the whole machine spent busy (all processes, `/proc/stat`).
    machine_cpu_s: Option<f64>,
    store: Option<StoreCounters>,
}

impl Usage {
    async fn sample(server: &Server) -> Usage {
        Usage {
            server_cpu_s: server.cpu_seconds(),
            client_cpu_s: process_cpu_seconds("/proc/self/stat", server.clock_ticks_per_second),
            machine_cpu_s: machine_busy_seconds(server.clock_ticks_per_second),
            store: server.store_counters().await,
        }
    }

    fn since(&self, before: &Usage) -> Usage {
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Usage {
            server_cpu_s: diff(self.server_cpu_s, before.server_cpu_s),
            client_cpu_s: diff(self.client_cpu_s, before.client_cpu_s),
            machine_cpu_s: diff(self.machine_cpu_s, before.machine_cpu_s),
            store: match (self.store, before.store) {
                (Some(a), Some(b)) => Some(StoreCounters {
                    batches: a.batches - b.batches,
                    flushes: a.flushes - b.flushes,
                    flush_seconds: a.flush_seconds - b.flush_seconds,
                    size_bytes: a.size_bytes,
                }),
                _ => None,
            },
        }
    }
}

/// One kind of request in one measured phase.
struct Row {
    round: usize,
    target: Target,
    workload: Workload,
    op: Op,
    elapsed: Duration,
    stats: OpTally,
    /// Requests answered in the whole phase (all ops), for CPU per request.
    phase_ok: u64,
    /// Connection errors and timeouts of the whole phase.
    errors: u64,
    usage: Usage,
}

impl Row {
    fn label(&self) -> String {
        match self.workload {
            Workload::Mixed => format!("mixed:{}", self.op.name()),
            _ => self.op.name().to_string(),
        }
    }

    fn per_second(&self) -> f64 {
        self.stats.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_us(&self, q: f64) -> u64 {
        self.stats.latency_us.value_at_quantile(q)
    }

    fn failed(&self) -> u64 {
        self.errors + self.stats.unexpected.values().sum::<u64>()
    }

    /// CPU µs per answered request of the phase.
    fn cpu_us_per_request(&self, seconds: Option<f64>) -> String {
        match seconds {
            Some(s) if self.phase_ok > 0 => format!("{:.0}", s * 1e6 / self.phase_ok as f64),
            _ => "–".into(),
        }
    }

    /// Cores the server kept busy on average.
    fn server_cores(&self) -> String {
        self.usage
            .server_cpu_s
            .map_or("–".into(), |s| format!("{:.2}", s / self.elapsed.as_secs_f64()))
    }

    /// Cores kept busy by everything but the server and this client: other
    /// users of the machine (and the kernel's own work). High values mean a
    /// disturbed measurement.
    fn other_cores(&self) -> String {
        let u = &self.usage;
        match (u.machine_cpu_s, u.server_cpu_s, u.client_cpu_s) {
            (Some(m), Some(s), Some(c)) => {
                format!("{:.2}", ((m - s - c) / self.elapsed.as_secs_f64()).max(0.0))
            }
            _ => "–".into(),
        }
    }

    /// (batches per flush, flushes per second, mean flush µs, store MiB).
    fn store_columns(&self) -> [String; 4] {
        match self.usage.store {
            Some(c) if c.flushes > 0.0 => [
                format!("{:.1}", c.batches / c.flushes),
                format!("{:.0}", c.flushes / self.elapsed.as_secs_f64()),
                format!("{:.0}", c.flush_seconds * 1e6 / c.flushes),
                format!("{:.0}", c.size_bytes / (1 << 20) as f64),
            ],
            Some(c) => {
                ["–".into(), "0".into(), "–".into(), format!("{:.0}", c.size_bytes / 1048576.0)]
            }
            None => ["–".into(), "–".into(), "–".into(), "–".into()],
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} {}: {} ok in {:.1} s = {:.0}/s, p50 {} p99 {} p999 {} max {} µs, \
             unexpected {:?}, errors {}",
            self.target.name(),
            self.label(),
            self.stats.ok,
            self.elapsed.as_secs_f64(),
            self.per_second(),
            self.quantile_us(0.5),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.stats.latency_us.max(),
            self.stats.unexpected,
            self.errors
        )
    }
}

fn print_report(args: &Args, rows: &[Row]) {
    println!(
        "\n{} connections, {} s per phase (+{} s warm-up), {} keys per connection, \
         {}-byte values, client threads {}\n",
        args.connections,
        args.duration_secs,
        args.warmup_secs,
        args.keys_per_connection,
        args.value_bytes,
        args.client_threads
    );
    println!(
        "| round | target | op | req/s | ×null | p50 µs | p99 µs | p999 µs | max µs | \
         ×null p50 | server cores | other cores | server CPU µs/req | client CPU µs/req | \
         batches/flush | flushes/s | flush µs | store MiB | failed |"
    );
    println!("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for row in rows {
        let null = rows.iter().find(|r| {
            r.round == row.round
                && r.workload == row.workload
                && r.op == row.op
                && r.target == Target::Null
        });
        let ratio = |a: f64, b: Option<f64>| b.map_or("–".into(), |b| format!("{:.2}", a / b));
        let [batches_per_flush, flushes_per_s, flush_us, store_mib] = row.store_columns();
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} \
             | {} | {} | {} |",
            row.round,
            row.target.name(),
            row.label(),
            row.per_second(),
            ratio(row.per_second(), null.map(Row::per_second)),
            row.quantile_us(0.5),
            row.quantile_us(0.99),
            row.quantile_us(0.999),
            row.stats.latency_us.max(),
            ratio(row.quantile_us(0.5) as f64, null.map(|n| n.quantile_us(0.5) as f64)),
            row.server_cores(),
            row.other_cores(),
            row.cpu_us_per_request(row.usage.server_cpu_s),
            row.cpu_us_per_request(row.usage.client_cpu_s),
            batches_per_flush,
            flushes_per_s,
            flush_us,
            store_mib,
            row.failed()
        );
    }
}

/// The do-nothing server: answers every key route at once, without reading the
/// store (there is none) and without parsing the body beyond receiving it. Exits
/// when its standard input closes, i.e. when the load generator is gone.
fn serve_null() -> anyhow::Result<()> {
    use axum::routing::get;
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let app = axum::Router::new()
            .route(
                "/v1/kv/{*key}",
                get(|| async { StatusCode::OK })
                    .put(|_body: Bytes| async { StatusCode::NO_CONTENT })
                    .post(|_body: Bytes| async { StatusCode::OK }),
            )
            .route("/healthz", get(|| async { "ok\n" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("null server listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

//! A harness for the real `calmkv` binary: start `calmkv serve` on a loopback
//! port chosen by the OS, wait until it is ready, stop it with SIGKILL or SIGTERM,
//! restart it on the same data directory, and run the client commands.
//!
//! ```ignore
//! let mut server = ServerProcess::start(&["--durability", "sync"]);
//! let url = server.url();
//! server.kill9();              // a crash: nothing is flushed
//! server.restart();            // same data directory, same flags, a new port
//! let stopped = server.terminate(); // SIGTERM, then the exit status and logs
//! ```
//!
//! The server listens on `127.0.0.1:0`; its address is read from the line
//! `listening on http://ADDR` the binary prints on stdout, so there is no port
//! race. Started means `GET /readyz` answers, polled under a deadline: 200, or
//! 503 when the store would refuse writes (some tests start on a full disk). A
//! running child is killed (SIGKILL) when its handle is dropped, so a failing
//! test never leaves a server behind. Every `CALMKV_*` variable of the test's
//! environment is removed from the child's, so only the flags a test passes count.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test, built by Cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_calmkv");
/// How long a server may take from spawn to ready.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM or SIGKILL.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long one client command may run.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// The pause between two checks of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A `Command` for the binary with a clean `CALMKV_*` environment and logs at
/// `info` (the tests look for log lines).
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CALMKV_") {
            command.env_remove(name);
        }
    }
    command
}

/// What a finished process said.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote on stdout (as text; invalid UTF-8 replaced).
    pub stdout: String,
    /// Everything it wrote on stdout, byte for byte.
    pub stdout_bytes: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: String,
}

impl Finished {
    /// Exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with both outputs unless the process exited with 0.
    pub fn assert_success(&self) -> &Finished {
        assert!(self.status.success(), "expected success, got {self:#?}");
        self
    }

    /// Panics with both outputs unless the process failed (non-zero exit).
    pub fn assert_failure(&self) -> &Finished {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "expected a non-zero exit, got {self:#?}"
        );
        self
    }
}

/// Reads a child's pipe to its end on a thread: each line goes to `lines` (if
/// given), and the whole text is the thread's result.
fn drain(
    pipe: impl Read + Send + 'static,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    all.extend_from_slice(&line);
                    if let Some(lines) = &lines {
                        let _ = lines.send(String::from_utf8_lossy(&line).into_owned());
                    }
                }
            }
        }
        all
    })
}

/// What a child printed, once it exited (its pipes then end).
fn finished(
    status: ExitStatus,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
) -> Finished {
    let stdout_bytes = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    Finished {
        status,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Waits for `child` to exit, killing it and panicking after `deadline`.
fn wait_with_deadline(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {deadline:?}; killed");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Runs the binary with `args` to completion (bounded by [`COMMAND_DEADLINE`]),
/// feeding it `stdin`.
pub fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Finished {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the calmkv binary starts");
    let stdout = drain(child.stdout.take().expect("piped stdout"), None);
    let stderr = drain(child.stderr.take().expect("piped stderr"), None);
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin).expect("the child reads its stdin");
    drop(input);
    let status = wait_with_deadline(&mut child, COMMAND_DEADLINE, &format!("calmkv {args:?}"));
    finished(status, stdout, stderr)
}

/// Runs the binary with `args` to completion (bounded by [`COMMAND_DEADLINE`]).
pub fn run(args: &[&str]) -> Finished {
    run_with_stdin(args, b"")
}

/// A `calmkv serve` child process and its data directory.
pub struct ServerProcess {
    data_dir: PathBuf,
    /// Keeps the temporary data directory alive (and removes it on drop).
    _temp: Option<tempfile::TempDir>,
    flags: Vec<String>,
    running: Option<Running>,
}

struct Running {
    child: Child,
    addr: SocketAddr,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl ServerProcess {
    /// Starts a server on a fresh temporary data directory with extra `flags`
    /// (e.g. `--durability none`), and waits until it is ready.
    pub fn start(flags: &[&str]) -> ServerProcess {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let data_dir = temp.path().join("data");
        let mut server = ServerProcess::unstarted(&data_dir, flags);
        server._temp = Some(temp);
        server.restart();
        server
    }

    /// Starts a server on `data_dir` (kept after the test) and waits until ready.
    pub fn start_in(data_dir: &Path, flags: &[&str]) -> ServerProcess {
        let mut server = ServerProcess::unstarted(data_dir, flags);
        server.restart();
        server
    }

    fn unstarted(data_dir: &Path, flags: &[&str]) -> ServerProcess {
        ServerProcess {
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            running: None,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The flags the server runs with (beyond the data directory and address).
    pub fn flags(&self) -> &[String] {
        &self.flags
    }

    /// Starts the server (again) on the same data directory with the same flags;
    /// it gets a new port. Panics if it is running.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "restart of a running server");
        let data_dir = self.data_dir.to_str().expect("a UTF-8 temporary path").to_string();
        let mut args = vec!["serve", "--data-dir", &data_dir, "--http-addr", "127.0.0.1:0"];
        args.extend(self.flags.iter().map(String::as_str));
        let mut child = command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the calmkv binary starts");
        let (lines, announced) = mpsc::channel();
        let stdout = drain(child.stdout.take().expect("piped stdout"), Some(lines));
        let stderr = drain(child.stderr.take().expect("piped stderr"), None);
        let deadline = Instant::now() + START_DEADLINE;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match announced.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        break addr;
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let status = child.wait();
                    let stderr = stderr.join().unwrap_or_default();
                    let stderr = String::from_utf8_lossy(&stderr);
                    panic!(
                        "calmkv {args:?} never said where it listens ({why:?}); \
                         exit {status:?}; stderr:\n{stderr}"
                    );
                }
            }
        };
        self.running = Some(Running { child, addr, stdout, stderr });
        self.wait_ready(deadline);
    }

    fn wait_ready(&mut self, deadline: Instant) {
        let addr = self.addr();
        loop {
            if let Ok((200 | 503, _)) = http_get(addr, "/readyz") {
                return;
            }
            let running = self.running.as_mut().expect("running");
            if let Some(status) = running.child.try_wait().expect("the child can be waited for") {
                panic!(
                    "calmkv serve exited with {status} before it was ready: {:#?}",
                    self.stop_logs(status)
                );
            }
            assert!(
                Instant::now() < deadline,
                "calmkv serve on {addr} not ready in {START_DEADLINE:?}"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The address of the HTTP API. Panics if the server is not running.
    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().expect("the server is running").addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.running.as_ref().expect("the server is running").child.id()
    }

    /// Kills the server with SIGKILL (a crash: no flush, no cleanup) and waits
    /// until the process is gone; returns what it printed.
    pub fn kill9(&mut self) -> Finished {
        let running = self.running.as_mut().expect("the server is running");
        running.child.kill().expect("SIGKILL is delivered");
        let status = wait_with_deadline(&mut running.child, STOP_DEADLINE, "calmkv after SIGKILL");
        self.stop_logs(status)
    }

    /// Asks the server to stop with SIGTERM and waits (bounded) for it to exit;
    /// returns its exit status and what it printed.
    pub fn terminate(&mut self) -> Finished {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("`kill` runs");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let running = self.running.as_mut().expect("the server is running");
        let status = wait_with_deadline(&mut running.child, STOP_DEADLINE, "calmkv after SIGTERM");
        self.stop_logs(status)
    }

    /// Collects the outputs of the exited child (the pipes end when it exits).
    fn stop_logs(&mut self, status: ExitStatus) -> Finished {
        let running = self.running.take().expect("the server was running");
        finished(status, running.stdout, running.stderr)
    }

    /// The node id `GET /v1/cluster` reports (`node.id`).
    pub fn node_id(&self) -> String {
        let (status, body) = http_get(self.addr(), "/v1/cluster").expect("GET /v1/cluster");
        assert_eq!(status, 200, "GET /v1/cluster: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON from /v1/cluster");
        json["node"]["id"].as_str().expect("node.id is a string").to_string()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// The address in `calmkv node <id> listening on http://ADDR`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on http://")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A minimal blocking `GET` over HTTP/1.1 (`Connection: close`), for readiness
/// and small JSON reads outside an async runtime: the status and the body.
/// Refuses chunked answers, which it does not decode.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Err(bad("a chunked answer; use an HTTP client"));
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    Ok((status, body.to_string()))
}

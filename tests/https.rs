//! HTTPS against the real binary: `serve --tls-cert/--tls-key` answers over TLS
//! only, the CLI reaches it with `--ca-cert`, refuses it without, and a client
//! that opens a connection and never finishes the handshake is cut off by the
//! header read timeout.
//!
//! The certificates in `tests/fixtures/tls/` are for these tests only: a test
//! CA (`ca.pem`, its key discarded) and a certificate for 127.0.0.1 and
//! localhost it signed, valid until 2126.

mod process;

use process::{command, run, Finished};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

struct TlsServer {
    child: Child,
    addr: SocketAddr,
    _temp: tempfile::TempDir,
}

impl TlsServer {
    fn start(extra: &[&str]) -> TlsServer {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        let (cert, key) = (fixture("server.pem"), fixture("server.key"));
        let mut args = vec!["serve", "--data-dir", dir.to_str().unwrap()];
        args.extend(["--http-addr", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key]);
        args.extend_from_slice(extra);
        let mut child =
            command(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut addr = None;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some((_, rest)) = line.split_once("listening on https://") {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                break;
            }
        }
        let addr = addr.expect("the server says where it listens over https");
        TlsServer { child, addr, _temp: temp }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Runs a client command against the server, trusting the test CA.
    fn cli(&self, args: &[&str]) -> Finished {
        let url = self.url();
        let ca = fixture("ca.pem");
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--ca-cert", &ca]);
        run(&all)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_cli_talks_https_with_the_ca_and_refuses_without_it() {
    let server = TlsServer::start(&[]);
    // "listening" is printed once the listener is bound and served.
    server.cli(&["put", "greeting", "hello over tls"]).assert_success();
    let get = server.cli(&["get", "greeting"]);
    get.assert_success();
    assert_eq!(get.stdout.trim_end(), "hello over tls");

    let untrusted = run(&["get", "greeting", "--url", &server.url()]);
    untrusted.assert_failure();
    assert!(untrusted.stderr.contains("cannot reach"), "{untrusted:#?}");

    // Plain HTTP on the TLS port gets no answer.
    let plain = process::http_get(server.addr, "/healthz");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
}

#[test]
fn a_stalled_tls_handshake_is_closed_by_the_header_timeout() {
    let server = TlsServer::start(&["--header-read-timeout-ms", "300"]);
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap(); // the start of a ClientHello
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = stalled.read(&mut byte);
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not answered: {read:?}");
    assert!(started.elapsed() < Duration::from_secs(9), "closed by the timeout");
}

#[test]
fn a_missing_key_file_is_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let cert = fixture("server.pem");
    let finished = run(&[
        "serve",
        "--data-dir",
        dir.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        "/nonexistent/server.key",
    ]);
    finished.assert_failure();
    assert!(finished.stderr.contains("cannot read the private key"), "{finished:#?}");
}

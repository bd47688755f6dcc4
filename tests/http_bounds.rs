//! The HTTP API bounded before trusted: connections that send headers and no
//! body hold no in-flight permit, slow bodies and slow headers are cut off by
//! their timeouts, and one client IP cannot open unbounded connections.
//!
//! Attackers connect from 127.0.0.2 or 127.0.0.3 and the well-behaved client
//! from 127.0.0.1, so the per-IP cap tells them apart (all on loopback).

mod common;

use calmkv::Limits;
use common::{wait_until, TestServer};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for the server to close a connection.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

fn addr(server: &TestServer) -> SocketAddr {
    let url = server.url("/");
    url.trim_start_matches("http://").trim_end_matches('/').parse().expect("a socket address")
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSE_DEADLINE, read).await.expect("the server closes the connection");
    String::from_utf8_lossy(&all).into_owned()
}

const HEADERS_NO_BODY: &[u8] =
    b"PUT /v1/kv/held HTTP/1.1\r\nHost: calmkv\r\nContent-Length: 100\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_without_a_body_hold_no_permit_and_do_not_starve_a_client() {
    let limits = Limits {
        in_flight_requests_max: 4,
        http_connections_per_ip_max: 16,
        body_read_timeout: Duration::from_secs(60),
        header_read_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = TestServer::builder().limits(limits).start().await;
    let to = addr(&server);
    let mut attackers = Vec::new();
    for _ in 0..12 {
        let mut stream = connect_from("127.0.0.2", to).await;
        stream.write_all(HEADERS_NO_BODY).await.unwrap();
        attackers.push(stream);
    }
    let connections = server.state().connections().clone();
    wait_until("the server waits on all 12 bodies", || {
        connections.reading_bodies.load(Ordering::Relaxed) == 12
    })
    .await;
    assert_eq!(server.state().in_flight_requests(), 0, "waiting bodies hold no permit");
    for i in 0..20 {
        let put = server.put(&format!("/v1/kv/ok{i}")).body("v").send().await.unwrap();
        assert_eq!(put.status(), 204, "write {i}: {:?}", put.text().await);
        let get = server.get(&format!("/v1/kv/ok{i}")).send().await.unwrap();
        assert_eq!(get.status(), 200, "read {i}");
    }
    assert!(server.node().read(&key("held")).unwrap().is_none(), "no body, nothing stored");
    drop(attackers);
    server.stop().await;
}

fn key(name: &str) -> calmkv::Key {
    calmkv::Key::new(name, &Limits::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_cut_off_with_408_and_changes_nothing() {
    let limits = Limits { body_read_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;
    let mut slow = connect_from("127.0.0.2", addr(&server)).await;
    slow.write_all(HEADERS_NO_BODY).await.unwrap();
    slow.write_all(b"ten bytes.").await.unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert!(server.node().read(&key("held")).unwrap().is_none());
    assert_eq!(server.state().connections().body_timeouts.load(Ordering::Relaxed), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_timeout() {
    let limits = Limits { header_read_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;
    let to = addr(&server);
    let mut slowloris = Vec::new();
    for i in 0..50 {
        let mut stream = connect_from("127.0.0.2", to).await;
        if i % 2 == 0 {
            // Half a request head, then silence; the others send nothing at all.
            stream.write_all(b"GET /v1/kv/a HTTP/1.1\r\nHost: calmkv\r\nX-Slow: ").await.unwrap();
        }
        slowloris.push(stream);
    }
    for stream in &mut slowloris {
        read_until_closed(stream).await;
    }
    let connections = server.state().connections().clone();
    wait_until("every slow connection is released", || {
        connections.open.load(Ordering::Relaxed) == 0
    })
    .await;
    let ok = server.get("/healthz").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_ip_cannot_open_more_than_its_cap() {
    let limits = Limits { http_connections_per_ip_max: 8, ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;
    let to = addr(&server);
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(connect_from("127.0.0.3", to).await);
    }
    let connections = server.state().connections().clone();
    wait_until("12 connections past the cap are refused", || {
        connections.refused.load(Ordering::Relaxed) == 12
    })
    .await;
    // Those past the cap were closed; those within it are still open.
    let mut closed = 0;
    for stream in &mut flood {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut byte)).await;
        if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(closed, 12);
    // Another client is not affected.
    let put = server.put("/v1/kv/mine").body("v").send().await.unwrap();
    assert_eq!(put.status(), 204);
    drop(flood);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_total_cap_are_refused_whatever_their_ip() {
    let limits =
        Limits { http_connections_per_ip_max: 8, http_connections_max: 10, ..Limits::default() };
    let server = TestServer::builder().limits(limits).start().await;
    let to = addr(&server);
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(connect_from("127.0.0.2", to).await);
    }
    for _ in 0..4 {
        open.push(connect_from("127.0.0.3", to).await);
    }
    let connections = server.state().connections().clone();
    wait_until("two connections past the total cap are refused", || {
        connections.refused.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(connections.open.load(Ordering::Relaxed), 10);
    drop(open);
    wait_until("the slots are released", || connections.open.load(Ordering::Relaxed) == 0).await;
    let put = server.put("/v1/kv/after").body("v").send().await.unwrap();
    assert_eq!(put.status(), 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_buffer_budget_are_shed_before_they_are_read() {
    // Room for two bodies of the largest size being read at once.
    let limits = Limits {
        value_bytes_max: 1024,
        member_bytes_max: 1024,
        body_bytes_max: 4096,
        body_buffer_bytes_max: 8192,
        body_read_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = TestServer::builder().limits(limits).start().await;
    let to = addr(&server);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from("127.0.0.2", to).await;
        let head = "PUT /v1/kv/held HTTP/1.1\r\nHost: calmkv\r\nContent-Length: 4096\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    let connections = server.state().connections().clone();
    wait_until("both bodies are being read", || {
        connections.reading_bodies.load(Ordering::Relaxed) == 2
    })
    .await;
    let shed = server.put("/v1/kv/third").body("v").send().await.unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(server.node().read(&key("third")).unwrap().is_none(), "nothing was applied");
    // A request without a body needs no room.
    assert_eq!(server.get("/v1/kv/third").send().await.unwrap().status(), 404);
    drop(slow);
    wait_until("the reservations are released", || {
        connections.reading_bodies.load(Ordering::Relaxed) == 0
    })
    .await;
    let put = server.put("/v1/kv/third").body("v").send().await.unwrap();
    assert_eq!(put.status(), 204);
    server.stop().await;
}

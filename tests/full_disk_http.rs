//! A full disk seen through the HTTP API of the real binary: on a small tmpfs
//! (mounted by the test; it needs root, and says so and skips without it),
//! with the store's default free-space reserve, writes are answered
//! `507 insufficient_storage` and change nothing, reads keep answering, writes
//! are accepted again once space is freed, and after a restart every
//! acknowledged write is there. `/readyz` answers not ready, with the reason,
//! within a second, and SIGTERM while writers keep hitting the full disk
//! stops the node within its shutdown bounds.
#![cfg(unix)]

mod process;
mod tmpfs;

use process::ServerProcess;
use tmpfs::{available_bytes, write_ballast, Tmpfs, MIB};

/// Larger than the default reserve (`FREE_BYTES_MIN_DEFAULT`, 128 MiB) and the
/// ballast's leftover room.
const TMPFS_BYTES: u64 = 192 * MIB;

/// Free space left above the reserve for the server's writes.
const ROOM_BYTES: u64 = 6 * MIB;

/// One value.
const VALUE_BYTES: usize = 64 << 10;

/// How long `/readyz` may take to answer.
const READY_ANSWER_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a SIGTERM may take to stop the node: its drain and final-flush
/// bounds, plus time to exit.
fn stop_bound() -> std::time::Duration {
    calmkv::server::SHUTDOWN_DRAIN_MAX
        + calmkv::server::SHUTDOWN_FLUSH_MAX
        + std::time::Duration::from_secs(5)
}

fn value(i: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut value = vec![0; VALUE_BYTES];
    rand::rng().fill_bytes(&mut value);
    value[..8].copy_from_slice(&(i as u64).to_le_bytes());
    value
}

#[test]
fn a_full_disk_answers_507_keeps_reads_and_recovers_once_space_is_freed() {
    let tmpfs = match Tmpfs::mount(TMPFS_BYTES) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED full-disk HTTP test: {reason} (it needs root)");
            return;
        }
    };
    let data_dir = tmpfs.path().join("data");
    let mut server = ServerProcess::start_in(&data_dir, &[]);
    let ballast = tmpfs.path().join("ballast");
    let reserve = calmkv::store::FREE_BYTES_MIN_DEFAULT;
    write_ballast(&ballast, available_bytes(tmpfs.path()) - reserve - ROOM_BYTES);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = reqwest::Client::new();
    // (status, body) of one request.
    let send = |request: reqwest::RequestBuilder| {
        runtime.block_on(async {
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            (status, response.bytes().await.expect("a body").to_vec())
        })
    };
    let url = server.url();
    let put = |url: &str, key: &str, body: Vec<u8>| {
        send(client.put(format!("{url}/v1/kv/{key}")).body(body))
    };
    let get = |url: &str, key: &str| send(client.get(format!("{url}/v1/kv/{key}")));
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let writes_max = 4 * (ROOM_BYTES as usize / VALUE_BYTES);
    let refused = loop {
        assert!(acked.len() < writes_max, "{writes_max} writes and no refusal");
        let key = format!("full/{:05}", acked.len());
        let body = value(acked.len());
        let (status, answer) = put(&url, &key, body.clone());
        if (200..300).contains(&status) {
            acked.push((key, body));
        } else {
            break (key, status, answer);
        }
    };
    let (refused_key, status, answer) = refused;
    assert_eq!(status, 507, "after {} writes: {}", acked.len(), String::from_utf8_lossy(&answer));
    let error: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(error["error"]["code"], "insufficient_storage", "{error}");
    println!("refused after {} writes: {error}", acked.len());

    // Not ready, with the reason, within a second; reads keep working.
    let started = std::time::Instant::now();
    let (status, body) = send(client.get(format!("{url}/readyz")));
    assert!(started.elapsed() < READY_ANSWER_MAX, "/readyz took {:?}", started.elapsed());
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready:") && body.contains("bytes free"), "{body:?}");

    assert_eq!(get(&url, &refused_key).0, 404, "the refused write is not there");
    for (key, body) in &acked {
        assert_eq!(get(&url, key), (200, body.clone()), "{key}");
    }

    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(send(client.get(format!("{url}/readyz"))).0, 200, "ready once space is freed");
    for i in 0..5 {
        let key = format!("after/{i}");
        let body = value(i);
        let (status, _) = put(&url, &key, body.clone());
        assert!((200..300).contains(&status), "after freeing space: {status}");
        acked.push((key, body));
    }

    server.terminate().assert_success();
    server.restart();
    let url = server.url();
    for (key, body) in &acked {
        assert_eq!(get(&url, key), (200, body.clone()), "{key} after the restart");
    }
}

/// Writers keep hitting a full disk (refused with 507) while the node gets
/// SIGTERM: it stops within its bounds, cleanly; restarted after space is
/// freed, it has every acknowledged write and takes new ones.
#[test]
fn sigterm_on_a_full_disk_with_writers_stops_the_node_in_time() {
    let tmpfs = match Tmpfs::mount(TMPFS_BYTES) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED full-disk SIGTERM test: {reason} (it needs root)");
            return;
        }
    };
    let data_dir = tmpfs.path().join("data");
    let mut server = ServerProcess::start_in(&data_dir, &[]);
    let ballast = tmpfs.path().join("ballast");
    let reserve = calmkv::store::FREE_BYTES_MIN_DEFAULT;
    write_ballast(&ballast, available_bytes(tmpfs.path()) - reserve - ROOM_BYTES);

    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = server.url();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Four writers: each until the server is gone; (key, value) acknowledged,
    // and how many were refused with 507.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, stopping, refusals) = (url.clone(), stopping.clone(), refusals.clone());
            runtime.spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(30))
                    .build()
                    .unwrap();
                let (mut acked, mut refused) = (Vec::new(), 0usize);
                for i in 0.. {
                    let key = format!("w{w}/{i:05}");
                    let body = value(i);
                    let request = client.put(format!("{url}/v1/kv/{key}")).body(body.clone());
                    match request.send().await {
                        Ok(response) if response.status().is_success() => acked.push((key, body)),
                        Ok(response) if response.status() == 507 => {
                            refused += 1;
                            refusals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(response) => panic!("{key}: {}", response.status()),
                        Err(error) => {
                            let stopped = stopping.load(std::sync::atomic::Ordering::SeqCst);
                            assert!(stopped, "{key}: the server went away before SIGTERM: {error}");
                            break;
                        }
                    }
                }
                (acked, refused)
            })
        })
        .collect();
    // Wait (bounded) until the disk refuses writes, then stop the node.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while refusals.load(std::sync::atomic::Ordering::SeqCst) < 8 {
        assert!(std::time::Instant::now() < deadline, "the disk never filled");
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling a condition
    }
    let (status, body) = runtime.block_on(async {
        let answer = reqwest::get(format!("{url}/readyz")).await.expect("readyz");
        (answer.status().as_u16(), answer.text().await.unwrap())
    });
    assert_eq!(status, 503, "{body}");
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let finished = server.terminate();
    let took = started.elapsed();
    finished.assert_success();
    println!("SIGTERM on a full disk with 4 writers: stopped in {took:?}");
    assert!(took < stop_bound(), "stopping took {took:?}");
    let mut acked = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (part, part_refused) = runtime.block_on(writer).unwrap();
        acked.extend(part);
        refused += part_refused;
    }
    assert!(refused > 0, "no write was refused");
    println!("{} writes acknowledged, {refused} refused with 507", acked.len());

    std::fs::remove_file(&ballast).unwrap();
    server.restart();
    let url = server.url();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for (key, body) in &acked {
            let response = client.get(format!("{url}/v1/kv/{key}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{key} after the restart");
            assert_eq!(&response.bytes().await.unwrap()[..], &body[..], "{key}");
        }
        let response = client.put(format!("{url}/v1/kv/after")).body("v").send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    });
}

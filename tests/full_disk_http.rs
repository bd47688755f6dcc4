//! A full disk seen through the HTTP API of the real binary: on a small tmpfs
//! (mounted by the test; it needs root, and says so and skips without it),
//! with the store's default free-space reserve, writes are answered
//! `507 insufficient_storage` and change nothing, reads keep answering, writes
//! are accepted again once space is freed, and after a restart every
//! acknowledged write is there.
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

    assert_eq!(get(&url, &refused_key).0, 404, "the refused write is not there");
    for (key, body) in &acked {
        assert_eq!(get(&url, key), (200, body.clone()), "{key}");
    }

    std::fs::remove_file(&ballast).unwrap();
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

//! A full disk seen through the HTTP API of the real binary: on a small tmpfs
//! (mounted by the test; it needs root, and says so and skips without it),
//! with the store's default free-space reserve, writes are answered
//! `507 insufficient_storage` and change nothing, reads keep answering, writes
//! are accepted again once space is freed, and after a restart every
//! acknowledged write is there.
#![cfg(unix)]

mod process;

use process::ServerProcess;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Larger than the default reserve (`FREE_BYTES_MIN_DEFAULT`, 128 MiB) and the
/// ballast's leftover room.
const TMPFS_BYTES: u64 = 192 * MIB;

/// Free space left above the reserve for the server's writes.
const ROOM_BYTES: u64 = 6 * MIB;

/// One value.
const VALUE_BYTES: usize = 64 << 10;

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount did not run: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!("mount -t tmpfs failed ({}): {}", output.status, stderr.trim()));
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("umount {} failed: {status:?}", self.dir.path().display());
        }
    }
}

fn available_bytes(path: &Path) -> u64 {
    let output = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().nth(1).expect("df prints a value").trim().parse().unwrap()
}

fn write_ballast(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xAB; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    file.sync_all().unwrap();
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
    let data_dir = tmpfs.dir.path().join("data");
    let mut server = ServerProcess::start_in(&data_dir, &[]);
    let ballast = tmpfs.dir.path().join("ballast");
    let reserve = calmkv::store::FREE_BYTES_MIN_DEFAULT;
    write_ballast(&ballast, available_bytes(tmpfs.dir.path()) - reserve - ROOM_BYTES);

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

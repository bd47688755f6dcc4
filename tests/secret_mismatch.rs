//! Two nodes started with different cluster secrets refuse each other, and say
//! so: the refusals are counted, logged, shown in `/v1/cluster` and printed by
//! `calmkv members`, instead of each node running alone in silence.

mod process;

use calmkv::replication::frame::ClusterSecret;
use calmkv::server::{connect_all, Server, ServerConfig};
use calmkv::Config;
use process::{http_get, run, ServerProcess};
use serde_json::Value as Json;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn cluster_of(addr: std::net::SocketAddr) -> Json {
    let (status, body) = http_get(addr, "/v1/cluster").expect("GET /v1/cluster");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

fn wait_for(what: &str, mut check: impl FnMut() -> Option<Json>) -> Json {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(seen) = check() {
            return seen;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn gossip_from_a_node_with_another_secret_is_refused_counted_logged_and_shown() {
    let temp = tempfile::tempdir().unwrap();
    let flags = ["--peer-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"];
    let mut first_flags = flags.to_vec();
    first_flags.extend(["--cluster-secret", "the first cluster's secret"]);
    let mut first = ServerProcess::start_in(&temp.path().join("a"), &first_flags);
    let seed = cluster_of(first.addr())["node"]["gossip_addr"].as_str().unwrap().to_string();
    let mut second_flags = flags.to_vec();
    second_flags.extend(["--cluster-secret", "another secret entirely", "--join", &seed]);
    let second = ServerProcess::start_in(&temp.path().join("b"), &second_flags);

    let refusals = wait_for("the first node refuses the second's gossip", || {
        let refusals = cluster_of(first.addr())["refusals"].clone();
        (refusals["gossip"]["wrong_secret"].as_u64() > Some(0)).then_some(refusals)
    });
    assert_eq!(refusals["gossip"]["undecodable"], 0, "{refusals}");
    let members = cluster_of(first.addr())["members"].as_array().unwrap().len();
    assert_eq!(members, 1, "the first node did not admit the second");

    let listed = run(&["members", "--url", &first.url()]);
    listed.assert_success();
    let line = listed.stdout.lines().find(|l| l.starts_with("refused since start:"));
    let line = line.unwrap_or_else(|| panic!("no refusals line: {}", listed.stdout));
    assert!(line.contains("gossip wrong_secret="), "{line}");
    assert!(line.contains("another --cluster-secret"), "{line}");

    drop(second);
    let stopped = first.terminate();
    assert!(
        stopped.stderr.contains("gossip packet failed authentication"),
        "the refusal is logged: {}",
        stopped.stderr
    );
    let warnings = stopped.stderr.matches("gossip packet failed authentication").count();
    assert!(warnings <= 4, "rate-limited: {warnings} warnings");
}

async fn server_with(secret: &[u8; 32]) -> Server {
    let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
    config.peer_addr = Some("127.0.0.1:0".into());
    config.cluster_secret = Some(ClusterSecret::new(*secret).unwrap());
    Server::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_different_secrets_refuse_each_others_handshakes_and_show_it() {
    let servers = vec![
        server_with(b"the first cluster secret, 32 b..").await,
        server_with(b"a different secret of 32 bytes..").await,
    ];
    connect_all(&servers);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for server in &servers {
        let url = format!("http://{}/v1/cluster", server.http_addr());
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let cluster: Json = http.get(&url).send().await.unwrap().json().await.unwrap();
            let refusals = &cluster["refusals"];
            if refusals["peer_handshakes"]["wrong_secret"].as_u64() > Some(0) {
                assert_eq!(refusals["peer_handshakes"]["malformed"], 0, "{refusals}");
                assert_eq!(refusals["remote_states"], 0, "{refusals}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no refusal shown: {cluster}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let metrics = http
            .get(format!("http://{}/metrics", server.http_addr()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counted = metrics.lines().any(|l| {
            l.strip_prefix("calmkv_peer_handshakes_refused_wrong_secret_total ")
                .is_some_and(|n| n != "0")
        });
        assert!(counted, "{metrics}");
        assert!(
            metrics.lines().any(|l| l == "calmkv_peer_handshakes_total 0"),
            "no handshake ever succeeded"
        );
    }
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

fn counter_of(node: &ServerProcess, key: &str) -> Option<i64> {
    match http_get(node.addr(), &format!("/v1/kv/{key}")) {
        Ok((200, body)) => serde_json::from_str::<Json>(&body).ok()?["value"].as_i64(),
        _ => None,
    }
}

#[test]
fn a_keyring_rotates_the_secret_without_splitting_the_cluster() {
    // Rotation from `old` to `new`: first every node gets `old,new` (seals
    // with old, opens both), then `new,old`, then `new`. Mid-way through the
    // second step, a node of each kind gossips and replicates both ways; a
    // node that skipped ahead to `new` alone cannot open what a node still
    // sealing with `old` sends, and says so.
    let temp = tempfile::tempdir().unwrap();
    let flags = ["--peer-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"];
    let (old, new) = ("the old cluster secret", "the new cluster secret");
    let first_ring = format!("{old},{new}");
    let mut old_flags = flags.to_vec();
    old_flags.extend(["--cluster-secret", &first_ring]);
    let first = ServerProcess::start_in(&temp.path().join("a"), &old_flags);
    let seed = cluster_of(first.addr())["node"]["gossip_addr"].as_str().unwrap().to_string();
    let keyring = format!("{new},{old}");
    let mut rotating_flags = flags.to_vec();
    rotating_flags.extend(["--cluster-secret", &keyring, "--join", &seed]);
    let second = ServerProcess::start_in(&temp.path().join("b"), &rotating_flags);
    for node in [&first, &second] {
        wait_for("both nodes see two alive members", || {
            let cluster = cluster_of(node.addr());
            let members = cluster["members"].as_array()?.clone();
            (members.len() == 2 && members.iter().all(|m| m["state"] == "alive")).then_some(cluster)
        });
    }
    run(&["incr", "rotated", "2", "--url", &first.url()]).assert_success();
    run(&["incr", "rotated", "3", "--url", &second.url()]).assert_success();
    for node in [&first, &second] {
        wait_for("both writes reach both nodes", || {
            (counter_of(node, "rotated") == Some(5)).then_some(Json::Null)
        });
    }
    let refused = cluster_of(first.addr())["refusals"].clone();
    assert_eq!(refused["gossip"]["wrong_secret"], 0, "{refused}");
    assert_eq!(refused["peer_handshakes"]["wrong_secret"], 0, "{refused}");

    let mut new_flags = flags.to_vec();
    new_flags.extend(["--cluster-secret", new, "--join", &seed]);
    let third = ServerProcess::start_in(&temp.path().join("c"), &new_flags);
    wait_for("the new-only node refuses the packets sealed with the old secret", || {
        let refusals = cluster_of(third.addr())["refusals"].clone();
        (refusals["gossip"]["wrong_secret"].as_u64() > Some(0)).then_some(refusals)
    });
}

#[test]
fn a_keyring_with_a_short_secret_is_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let finished = run(&[
        "serve",
        "--data-dir",
        dir.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--cluster-secret",
        "a long enough secret,short",
    ]);
    finished.assert_failure();
    assert!(
        finished.stderr.contains("--cluster-secret must be at least 16 bytes (each of"),
        "{finished:#?}"
    );
}

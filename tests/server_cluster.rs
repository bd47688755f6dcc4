//! Three whole nodes in one process — store, HTTP API, peer channel,
//! anti-entropy — wired as a full mesh on loopback and driven over HTTP.

use calmkv::server::{connect_all, Server, ServerConfig};
use calmkv::Config;
use std::time::Duration;

async fn start_three() -> Vec<Server> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        config.anti_entropy_period = Duration::from_millis(50);
        servers.push(Server::start(config).await.unwrap());
    }
    connect_all(&servers);
    servers
}

fn url(server: &Server, path: &str) -> String {
    format!("http://{}{path}", server.http_addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_node_1_is_read_on_node_3_and_a_quorum_survives_a_stopped_node() {
    let servers = start_three().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let put = http.put(url(&servers[0], "/v1/kv/greeting")).body("hello").send().await.unwrap();
    assert_eq!(put.status(), 204);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = http.get(url(&servers[2], "/v1/kv/greeting")).send().await.unwrap();
        if read.status() == 200 {
            assert_eq!(read.text().await.unwrap(), "hello");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 3 never saw the write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let all = http
        .get(url(&servers[1], "/v1/kv/greeting?consistency=all&min_harvest=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), 200);
    assert_eq!(all.headers()["x-replicas"], "3/3");

    let mut servers = servers;
    let stopped = servers.pop().unwrap();
    stopped.shutdown().await.unwrap();
    let quorum = http
        .get(url(&servers[0], "/v1/kv/greeting?consistency=quorum&timeout_ms=300"))
        .send()
        .await
        .unwrap();
    assert_eq!(quorum.status(), 200);
    assert_eq!(quorum.headers()["x-harvest"], "0.67");
    let all = http
        .get(url(&servers[0], "/v1/kv/greeting?consistency=all&timeout_ms=300"))
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), 503);
    let body: serde_json::Value = all.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_harvest");
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

/// Three servers that find each other through gossip alone (no hand-set peers):
/// a write on one reaches the others, `/v1/cluster` lists every member with its
/// SWIM state, and a node that stops is reported down by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_joined_by_gossip_replicate_and_report_a_stopped_member_down() {
    use calmkv::server::GossipOptions;
    let mut servers: Vec<Server> = Vec::new();
    for _ in 0..3 {
        let mut config = ServerConfig::new(Config::in_memory(), "127.0.0.1:0");
        config.peer_addr = Some("127.0.0.1:0".into());
        let seeds = servers.first().and_then(Server::gossip_addr).into_iter().collect();
        config.gossip = Some(GossipOptions::new("127.0.0.1:0", seeds));
        servers.push(Server::start(config).await.unwrap());
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let states = |server: &Server| {
        let http = http.clone();
        let url = url(server, "/v1/cluster");
        async move {
            let cluster: serde_json::Value =
                http.get(url).send().await.unwrap().json().await.unwrap();
            let mut states: Vec<String> = cluster["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["state"].as_str().unwrap().to_string())
                .collect();
            states.sort();
            states
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for server in &servers {
        while states(server).await != ["alive", "alive", "alive"] {
            assert!(tokio::time::Instant::now() < deadline, "gossip never joined the three");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let post = http
        .post(url(&servers[1], "/v1/kv/visits"))
        .body(r#"{"counter":{"incr":7}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    for server in [&servers[0], &servers[2]] {
        loop {
            let read = http.get(url(server, "/v1/kv/visits")).send().await.unwrap();
            if read.status() == 200 {
                let body: serde_json::Value = read.json().await.unwrap();
                assert_eq!(body["value"], 7);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the increment never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let stopped = servers.pop().unwrap();
    stopped.shutdown().await.unwrap();
    for server in &servers {
        while states(server).await != ["alive", "alive", "down"] {
            assert!(tokio::time::Instant::now() < deadline, "the stopped node is never down");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for server in servers {
        server.shutdown().await.unwrap();
    }
}

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

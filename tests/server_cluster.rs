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
    assert_eq!(all.headers()["x-harvest"], "0.67", "a 503 says its harvest too");
    assert_eq!(all.headers()["x-replicas"], "2/3");
    let body: serde_json::Value = all.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_harvest");
    let half = http
        .get(url(&servers[0], "/v1/kv/greeting?consistency=all&min_harvest=0.5&timeout_ms=300"))
        .send()
        .await
        .unwrap();
    assert_eq!(half.status(), 200, "min_harvest loosens all");
    assert_eq!(half.headers()["x-replicas"], "2/3");
    for consistency in ["one", "quorum"] {
        let started = tokio::time::Instant::now();
        let path = format!("/v1/kv/greeting?consistency={consistency}&timeout_ms=5000");
        let read = http.get(url(&servers[0], &path)).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(read.status(), 200);
        assert!(took < Duration::from_secs(1), "{consistency} took {took:?} of 5 s");
    }
    let missing = http
        .get(url(&servers[0], "/v1/kv/nothing?consistency=quorum&timeout_ms=5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-replicas"], "2/3", "a 404 says its harvest too");
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

const BANK: &str = "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n";

/// A bank on three whole servers (gossip, replication, a three-voter quorum):
/// increments are local, decrements are coordinated and refused below zero;
/// with two voters down, decrements fail with `coordination_unavailable` while
/// increments keep working; a node whose declarations differ from the others'
/// is refused writes, and `/v1/cluster` shows the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_on_three_servers_coordinates_only_decrements() {
    use calmkv::invariants::Invariants;
    use calmkv::quorum::Timings;
    use calmkv::server::{BoundListener, GossipOptions, QuorumOptions};
    use std::sync::Arc;
    // The voters' ports stay bound until each voter serves on its own.
    let bound: Vec<(String, BoundListener)> = (0..3)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            (listener.local_addr().unwrap().to_string(), BoundListener::new(listener))
        })
        .collect();
    let voters: Vec<String> = bound.iter().map(|(addr, _)| addr.clone()).collect();
    let invariants = Arc::new(Invariants::parse(BANK).unwrap());
    let start = |listen: Option<(String, BoundListener)>,
                 invariants: Arc<Invariants>,
                 seed: Option<std::net::SocketAddr>| {
        let voters = voters.clone();
        async move {
            let node = Config { invariants, ..Config::in_memory() };
            let mut config = ServerConfig::new(node, "127.0.0.1:0");
            config.peer_addr = Some("127.0.0.1:0".into());
            config.gossip = Some(GossipOptions::new("127.0.0.1:0", seed.into_iter().collect()));
            let timings = Timings {
                heartbeat: Duration::from_millis(50),
                election_min: Duration::from_millis(200),
            };
            let (listen, listener) = listen.unzip();
            config.quorum = Some(QuorumOptions { voters, listen, id: None, timings, listener });
            Server::start(config).await.unwrap()
        }
    };
    let first = start(Some(bound[0].clone()), invariants.clone(), None).await;
    let seed = first.gossip_addr();
    let mut servers = vec![first];
    for voter in &bound[1..] {
        servers.push(start(Some(voter.clone()), invariants.clone(), seed).await);
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |server: &Server, body: &'static str| {
        http.post(url(server, "/v1/kv/account/alice")).body(body).send()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while servers.iter().any(|s| s.quorum().unwrap().status().leader.is_none()) {
        assert!(tokio::time::Instant::now() < deadline, "no quorum leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let incr = post(&servers[0], r#"{"counter":{"incr":10}}"#).await.unwrap();
    assert_eq!(
        (incr.status().as_u16(), incr.headers()["x-coordination"].to_str().unwrap()),
        (200, "none")
    );
    // Node 3 decrements once the increment has reached it (delta push).
    while servers[2]
        .node()
        .envelope(&calmkv::Key::new("account/alice", &Default::default()).unwrap())
        .unwrap()
        .value
        .counter()
        .value()
        != 10
    {
        assert!(tokio::time::Instant::now() < deadline, "the increment never reached node 3");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let decr = post(&servers[2], r#"{"counter":{"decr":7}}"#).await.unwrap();
    assert_eq!(
        (decr.status().as_u16(), decr.headers()["x-coordination"].to_str().unwrap()),
        (200, "quorum")
    );
    let over = post(&servers[1], r#"{"counter":{"decr":4}}"#).await.unwrap();
    assert_eq!(over.status(), 409);
    let body: serde_json::Value = over.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invariant_violation");
    let cluster: serde_json::Value =
        http.get(url(&servers[0], "/v1/cluster")).send().await.unwrap().json().await.unwrap();
    assert_eq!(cluster["quorum"]["voters"].as_object().unwrap().len(), 3, "{cluster}");

    // A fourth node that missed the rule joins: its writes are refused, and
    // /v1/cluster on it shows that the others' declarations do not match.
    let stray = start(None, Arc::new(Invariants::none()), seed).await;
    while stray.membership().unwrap().members().len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the stray node never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = post(&stray, r#"{"counter":{"decr":100}}"#).await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "coordination_unavailable");
    let cluster: serde_json::Value =
        http.get(url(&stray, "/v1/cluster")).send().await.unwrap().json().await.unwrap();
    let mismatched = cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["invariants_match"] == false)
        .count();
    assert_eq!(mismatched, 3, "{cluster}");
    stray.shutdown().await.unwrap();

    // Two voters gone: no quorum. Decrements fail cleanly; increments go on.
    let survivor = servers.remove(0);
    for server in servers {
        server.shutdown().await.unwrap();
    }
    let incr = post(&survivor, r#"{"counter":{"incr":1}}"#).await.unwrap();
    assert_eq!(incr.status(), 200);
    let request = http
        .post(url(&survivor, "/v1/kv/account/alice?timeout_ms=1000"))
        .body(r#"{"counter":{"decr":1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(request.status(), 503);
    assert!(request.headers().contains_key("retry-after"));
    let body: serde_json::Value = request.json().await.unwrap();
    assert_eq!(body["error"]["code"], "coordination_unavailable");
    survivor.shutdown().await.unwrap();
}

//! A three-node cluster of real `calmkv serve` processes on loopback, joined by
//! gossip: writes on every node reach the others; a node killed with SIGKILL
//! misses writes, comes back under a new gossip identity on a new port, and
//! converges through anti-entropy.

mod process;

use process::{http_get, run, ServerProcess};
use serde_json::Value as Json;
use std::time::{Duration, Instant};

/// Ample for gossip to notice a join or a death and for anti-entropy (every 2 s)
/// to run a few rounds, on a loaded 2-core CI machine.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

fn cluster_of(node: &ServerProcess) -> Json {
    let (status, body) = http_get(node.addr(), "/v1/cluster").expect("GET /v1/cluster");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

fn states_seen_by(node: &ServerProcess) -> Vec<(String, String)> {
    let cluster = cluster_of(node);
    cluster["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
        .collect()
}

/// Polls `check` until it holds or the deadline passes (then panics with `what`
/// and the last observation).
fn wait_until<T: std::fmt::Debug>(
    what: &str,
    mut observe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + CONVERGE_DEADLINE;
    loop {
        let seen = observe();
        if check(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what}: still {seen:?} after {CONVERGE_DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The gossip bump under which `node` sees the member `id`.
fn bump_of(node: &ServerProcess, id: &str) -> u64 {
    let cluster = cluster_of(node);
    let member = cluster["members"].as_array().unwrap().iter().find(|m| m["id"] == id);
    member.and_then(|m| m["bump"].as_u64()).unwrap_or_else(|| panic!("no member {id}: {cluster}"))
}

fn counter(node: &ServerProcess, key: &str) -> i64 {
    match http_get(node.addr(), &format!("/v1/kv/{key}")) {
        Ok((200, body)) => {
            let json: Json = serde_json::from_str(&body).expect("JSON");
            json["value"].as_i64().unwrap_or_else(|| panic!("a counter: {body}"))
        }
        Ok((404, _)) => 0,
        other => panic!("reading {key}: {other:?}"),
    }
}

fn set_members(node: &ServerProcess, key: &str) -> Vec<String> {
    match http_get(node.addr(), &format!("/v1/kv/{key}")) {
        Ok((200, body)) => {
            let json: Json = serde_json::from_str(&body).expect("JSON");
            let mut members: Vec<String> = json["value"]
                .as_array()
                .unwrap_or_else(|| panic!("a set: {body}"))
                .iter()
                .map(|m| m.as_str().unwrap().to_string())
                .collect();
            members.sort();
            members
        }
        Ok((404, _)) => vec![],
        other => panic!("reading {key}: {other:?}"),
    }
}

#[test]
fn three_serve_processes_replicate_and_a_killed_node_converges_after_restart() {
    let temp = tempfile::tempdir().unwrap();
    let flags =
        ["--peer-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--durability", "none"];
    let first = ServerProcess::start_in(&temp.path().join("n1"), &flags);
    let seed = cluster_of(&first)["node"]["gossip_addr"].as_str().unwrap().to_string();
    let mut joined = flags.to_vec();
    joined.extend(["--join", seed.as_str()]);
    let second = ServerProcess::start_in(&temp.path().join("n2"), &joined);
    let mut third = ServerProcess::start_in(&temp.path().join("n3"), &joined);
    let nodes = [&first, &second, &third];
    for node in nodes {
        wait_until(
            "every node sees three alive members",
            || states_seen_by(node),
            |states| states.len() == 3 && states.iter().all(|(_, s)| s == "alive"),
        );
    }

    // Writes on every node reach every other.
    for (i, node) in nodes.iter().enumerate() {
        run(&["incr", "visits", "1", "--url", &node.url()]).assert_success();
        run(&["sadd", "seen", &format!("node-{}", i + 1), "--url", &node.url()]).assert_success();
    }
    for node in nodes {
        wait_until("the counter reaches 3 everywhere", || counter(node, "visits"), |v| *v == 3);
        wait_until(
            "the set holds every node's add everywhere",
            || set_members(node, "seen"),
            |m| m.len() == 3,
        );
    }

    // A crash: node 3 misses the writes made while it is down.
    let third_id = third.node_id();
    third.kill9();
    for node in [&first, &second] {
        for _ in 0..10 {
            run(&["incr", "visits", "1", "--url", &node.url()]).assert_success();
        }
    }
    run(&["sadd", "seen", "while-down", "--url", &first.url()]).assert_success();
    run(&["srem", "seen", "node-1", "--url", &second.url()]).assert_success();

    // Back on a new port under a new bump; the others see it alive again and
    // anti-entropy brings it everything it missed.
    let bump_before = bump_of(&first, &third_id);
    third.restart();
    assert_eq!(third.node_id(), third_id, "the data directory keeps the node id");
    for node in [&first, &second, &third] {
        wait_until(
            "every node sees three alive members after the restart",
            || states_seen_by(node),
            |states| states.len() == 3 && states.iter().all(|(_, s)| s == "alive"),
        );
    }
    wait_until(
        "node 1 sees node 3 under a new bump",
        || bump_of(&first, &third_id),
        |bump| *bump > bump_before,
    );
    let expected = vec!["node-2".to_string(), "node-3".to_string(), "while-down".to_string()];
    for node in [&first, &second, &third] {
        wait_until("the counter converges to 23", || counter(node, "visits"), |v| *v == 23);
        wait_until("the set converges", || set_members(node, "seen"), |m| *m == expected);
    }
}

/// `calmkv demo --nodes 3` prints one line per node, the nodes form one cluster
/// (`calmkv members` lists three alive), a write on node 1 is read on node 3,
/// and SIGTERM stops it cleanly and removes its temporary data.
#[test]
fn demo_starts_a_cluster_that_members_lists_and_sigterm_stops() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    // Its log goes to a file, shown if the demo does not start.
    let log = tempfile::NamedTempFile::new().unwrap();
    let stderr = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let mut demo = process::command(&["demo", "--nodes", "3", "--base-port", "0"])
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("calmkv demo starts");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = demo.stdout.take().unwrap();
    let mut demo = KillOnDrop(demo);
    let mut lines = BufReader::new(stdout).lines();
    let mut urls = Vec::new();
    for i in 1..=3 {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("no line for node {i}; the demo said:\n{}", stderr()))
            .unwrap();
        let prefix = format!("node {i} http=");
        let rest = line.strip_prefix(&prefix).unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (url, gossip) = rest.split_once(" gossip=").expect("a gossip address");
        assert!(gossip.parse::<std::net::SocketAddr>().is_ok(), "{line}");
        urls.push(url.to_string());
    }
    let quorum_line = lines.next().expect("the quorum line").unwrap();
    assert!(quorum_line.starts_with("quorum voters: nodes 1 to 3"), "{quorum_line}");
    let data_line = lines.next().expect("the data directory line").unwrap();
    let data_dir = data_line
        .strip_prefix("data in ")
        .and_then(|rest| rest.split(" (removed on exit)").next())
        .unwrap_or_else(|| panic!("unexpected line {data_line:?}"))
        .to_string();
    assert!(std::path::Path::new(&data_dir).is_dir());

    let members = run(&["members", "--url", &urls[2]]);
    members.assert_success();
    let alive = members.stdout.lines().filter(|l| l.contains(" alive ")).count();
    assert_eq!(alive, 3, "{}", members.stdout);

    run(&["put", "greeting", "hello", "--url", &urls[0]]).assert_success();
    wait_until(
        "node 3 reads node 1's write",
        || run(&["get", "greeting", "--url", &urls[2]]).stdout,
        |out| out == "hello",
    );

    let pid = demo.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "calmkv demo did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!std::path::Path::new(&data_dir).exists(), "the temporary data is removed");
}

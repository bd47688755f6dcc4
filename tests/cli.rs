//! The `calmkv` binary's command line: the client commands (`get put del incr
//! decr sadd srem scan`) against a spawned `calmkv serve`, their output and exit
//! codes and error messages, `--help`, and `serve` refusing invalid flags.
#![cfg(unix)]

mod process;

use process::{Finished, ServerProcess};
use serde_json::{json, Value};

/// Runs a client command against `server`.
fn cli(server: &ServerProcess, args: &[&str]) -> Finished {
    let url = server.url();
    let mut all = args.to_vec();
    all.extend(["--url", &url]);
    process::run(&all)
}

/// Runs a client command that must succeed; returns its stdout.
fn ok(server: &ServerProcess, args: &[&str]) -> String {
    let finished = cli(server, args);
    finished.assert_success();
    finished.stdout
}

/// Runs a client command that must fail with exit code 1; returns its stderr.
fn fails(server: &ServerProcess, args: &[&str]) -> String {
    let finished = cli(server, args);
    assert_eq!(finished.code(), Some(1), "{args:?}: {finished:#?}");
    assert!(finished.stderr.starts_with("error: "), "{args:?}: {finished:#?}");
    finished.stderr
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// An address nothing listens on: a port the OS just handed out, released.
fn unreachable_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[test]
fn put_then_get_prints_the_value_and_exits_zero() {
    let server = ServerProcess::start(&[]);
    let put = cli(&server, &["put", "greeting", "hello world"]);
    put.assert_success();
    assert_eq!(put.stdout, "", "put prints nothing on success");
    assert_eq!(ok(&server, &["get", "greeting"]), "hello world");
}

#[test]
fn put_replaces_the_value_by_writing_with_the_context_it_reads_first() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "k", "first"]);
    ok(&server, &["put", "k", "second"]);
    ok(&server, &["put", "k", "third"]);
    assert_eq!(ok(&server, &["get", "k"]), "third", "no siblings: each put replaced");
}

#[test]
fn put_sibling_creates_siblings_that_get_prints_as_json_and_a_plain_put_resolves() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "k", "a"]);
    ok(&server, &["put", "--sibling", "k", "b"]);
    let read = json(&ok(&server, &["get", "k"]));
    assert_eq!(read["type"], "register");
    assert_eq!(read["siblings"], json!(["a", "b"]));
    assert!(read["context"].as_str().is_some_and(|c| !c.is_empty()), "{read}");
    ok(&server, &["put", "k", "resolved"]);
    assert_eq!(ok(&server, &["get", "k"]), "resolved");
}

#[test]
fn put_with_an_explicit_context_supersedes_only_what_that_context_saw() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "k", "a"]);
    let context = json(&{
        ok(&server, &["put", "--sibling", "k", "b"]);
        ok(&server, &["get", "k"])
    })["context"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&server, &["put", "--sibling", "k", "c"]);
    ok(&server, &["put", "--context", &context, "k", "d"]);
    let read = json(&ok(&server, &["get", "k"]));
    assert_eq!(read["siblings"], json!(["c", "d"]), "c was not seen by the context");
}

#[test]
fn put_if_absent_creates_once_then_fails_with_precondition_failed() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "--if-absent", "user/ada", "first"]);
    let error = fails(&server, &["put", "--if-absent", "user/ada", "second"]);
    assert!(error.contains("precondition_failed"), "{error}");
    assert_eq!(ok(&server, &["get", "user/ada"]), "first", "the refused put changed nothing");
}

#[test]
fn put_reads_the_value_from_a_file_or_stdin_and_a_piped_get_writes_it_back_byte_for_byte() {
    let server = ServerProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("value.bin");
    let binary: Vec<u8> = (0..=255).rev().collect();
    std::fs::write(&path, &binary).unwrap();
    ok(&server, &["put", "f", "--file", path.to_str().unwrap()]);
    let get = cli(&server, &["get", "f"]);
    get.assert_success();
    assert_eq!(get.stdout_bytes, binary, "a piped get adds nothing to the value");
    let url = server.url();
    let piped = process::run_with_stdin(&["put", "s", "--file", "-", "--url", &url], b"piped in");
    piped.assert_success();
    assert_eq!(ok(&server, &["get", "s"]), "piped in");
    ok(&server, &["put", "t", "ends with a newline\n"]);
    assert_eq!(ok(&server, &["get", "t"]), "ends with a newline\n");
}

#[test]
fn put_lww_writes_a_last_writer_wins_register() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "--lww", "l", "one"]);
    ok(&server, &["put", "--lww", "l", "two"]);
    assert_eq!(ok(&server, &["get", "l"]), "two");
    let scan = ok(&server, &["scan", "l"]);
    assert_eq!(scan, "l\tlww\n");
}

#[test]
fn del_removes_the_key_and_get_then_fails_with_not_found() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["put", "k", "v"]);
    assert_eq!(ok(&server, &["del", "k"]), "");
    let error = fails(&server, &["get", "k"]);
    assert!(error.contains("not_found"), "{error}");
}

#[test]
fn incr_and_decr_print_the_new_value() {
    let server = ServerProcess::start(&[]);
    assert_eq!(ok(&server, &["incr", "hits"]), "1\n", "the default amount is 1");
    assert_eq!(ok(&server, &["incr", "hits", "5"]), "6\n");
    assert_eq!(ok(&server, &["decr", "hits", "2"]), "4\n");
    assert_eq!(ok(&server, &["decr", "hits"]), "3\n");
    assert_eq!(ok(&server, &["decr", "below", "3"]), "-3\n", "counters go below zero");
    let read = json(&ok(&server, &["get", "hits"]));
    assert_eq!((read["type"].clone(), read["value"].clone()), (json!("counter"), json!(3)));
}

#[test]
fn sadd_and_srem_print_the_members_in_order() {
    let server = ServerProcess::start(&[]);
    assert_eq!(json(&ok(&server, &["sadd", "s", "pear", "apple"])), json!(["apple", "pear"]));
    assert_eq!(json(&ok(&server, &["sadd", "s", "fig"])), json!(["apple", "fig", "pear"]));
    assert_eq!(json(&ok(&server, &["srem", "s", "apple", "pear"])), json!(["fig"]));
    assert_eq!(json(&ok(&server, &["get", "s"]))["value"], json!(["fig"]));
}

#[test]
fn a_command_of_the_wrong_type_fails_with_type_mismatch_and_changes_nothing() {
    let server = ServerProcess::start(&[]);
    ok(&server, &["sadd", "s", "a"]);
    for args in
        [&["incr", "s"][..], &["decr", "s"], &["put", "s", "v"], &["put", "--sibling", "s", "v"]]
    {
        let error = fails(&server, args);
        assert!(error.contains("type_mismatch"), "{args:?}: {error}");
    }
    ok(&server, &["incr", "c"]);
    let error = fails(&server, &["sadd", "c", "x"]);
    assert!(error.contains("type_mismatch"), "{error}");
    assert_eq!(json(&ok(&server, &["get", "s"]))["value"], json!(["a"]));
    assert_eq!(json(&ok(&server, &["get", "c"]))["value"], json!(1));
}

#[test]
fn a_bad_key_fails_with_bad_key() {
    let server = ServerProcess::start(&["--max-key-bytes", "8"]);
    let error = fails(&server, &["put", "much-too-long", "v"]);
    assert!(error.contains("bad_key"), "{error}");
    let error = fails(&server, &["incr", "much-too-long"]);
    assert!(error.contains("bad_key"), "{error}");
}

#[test]
fn every_command_against_an_unreachable_url_says_cannot_reach() {
    let url = unreachable_url();
    let commands: [&[&str]; 9] = [
        &["get", "k"],
        &["put", "k", "v"],
        &["put", "--sibling", "k", "v"],
        &["del", "k"],
        &["incr", "k"],
        &["decr", "k"],
        &["sadd", "k", "m"],
        &["srem", "k", "m"],
        &["scan"],
    ];
    for args in commands {
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--timeout-ms", "5000"]);
        let finished = process::run(&all);
        assert_eq!(finished.code(), Some(1), "{args:?}: {finished:#?}");
        assert!(
            finished.stderr.starts_with(&format!("error: cannot reach {url}")),
            "{args:?}: {}",
            finished.stderr
        );
    }
}

#[test]
fn the_auth_token_is_sent_when_given_and_its_absence_fails_with_unauthorized() {
    let server = ServerProcess::start(&["--auth-token", "s3cret"]);
    let error = fails(&server, &["incr", "c"]);
    assert!(error.contains("unauthorized"), "{error}");
    let error = fails(&server, &["put", "k", "v"]);
    assert!(error.contains("unauthorized"), "a failed context read is an error: {error}");
    assert_eq!(ok(&server, &["incr", "c", "--auth-token", "s3cret"]), "1\n");
    ok(&server, &["put", "k", "v", "--auth-token", "s3cret"]);
    assert_eq!(ok(&server, &["get", "k", "--auth-token", "s3cret"]), "v");
}

#[test]
fn scan_lists_keys_with_their_types_and_pages_with_a_cursor() {
    let server = ServerProcess::start(&[]);
    for i in 0..7 {
        ok(&server, &["put", &format!("p/{i}"), "v"]);
    }
    ok(&server, &["incr", "p/counter"]);
    ok(&server, &["sadd", "p/set", "m"]);
    ok(&server, &["put", "q/other", "v"]);
    let expected: Vec<String> = (0..7)
        .map(|i| format!("p/{i}\tregister"))
        .chain(["p/counter\tcounter".into(), "p/set\tset".into()])
        .collect();

    let first = cli(&server, &["scan", "p/", "--limit", "3"]);
    first.assert_success();
    assert_eq!(first.stdout.lines().collect::<Vec<_>>(), expected[..3]);
    assert!(first.stderr.contains("more keys follow"), "{first:#?}");
    assert!(first.stderr.contains("--cursor \"p/2\""), "{first:#?}");

    let second = ok(&server, &["scan", "p/", "--limit", "3", "--cursor", "p/2"]);
    assert_eq!(second.lines().collect::<Vec<_>>(), expected[3..6]);

    let all = cli(&server, &["scan", "p/", "--limit", "2", "--all"]);
    all.assert_success();
    assert_eq!(all.stdout.lines().collect::<Vec<_>>(), expected, "every page, in order");
    assert_eq!(all.stderr, "", "nothing follows");

    let capped = cli(&server, &["scan", "p/", "--limit", "2", "--all", "--max-pages", "2"]);
    capped.assert_success();
    assert_eq!(capped.stdout.lines().count(), 4);
    assert!(capped.stderr.contains("--max-pages"), "a capped --all says so: {capped:#?}");

    let everything = ok(&server, &["scan"]);
    assert_eq!(everything.lines().count(), 10, "{everything}");
}

#[test]
fn help_lists_the_commands_and_serve_help_lists_its_flags() {
    let help = process::run(&["--help"]);
    help.assert_success();
    let commands =
        ["serve", "demo", "members", "get", "put", "del", "incr", "decr", "sadd", "srem", "scan"];
    for command in commands {
        assert!(help.stdout.contains(command), "--help lacks {command}: {}", help.stdout);
    }
    let serve = process::run(&["serve", "--help"]);
    serve.assert_success();
    for flag in [
        "--data-dir",
        "--http-addr",
        "--durability",
        "--flush-interval-ms",
        "--auth-token",
        "--max-in-flight",
        "--max-key-bytes",
        "--max-value-bytes",
        "--gossip-addr",
        "--peer-addr",
        "--join",
        "--cluster-secret",
        "CALMKV_GOSSIP_ADDR",
        "CALMKV_DATA_DIR",
        "CALMKV_DURABILITY",
        "sync",
        "interval",
    ] {
        assert!(serve.stdout.contains(flag), "serve --help lacks {flag}: {}", serve.stdout);
    }
    let put = process::run(&["put", "--help"]);
    put.assert_success();
    for flag in ["--sibling", "--if-absent", "--context", "--file", "--url", "--lww"] {
        assert!(put.stdout.contains(flag), "put --help lacks {flag}: {}", put.stdout);
    }
}

#[test]
fn serve_refuses_invalid_flags_with_a_clear_message_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let cases: [(&[&str], &str); 9] = [
        (&["--join", "127.0.0.1:7946"], "--join needs --gossip-addr"),
        (&["--gossip-addr", "127.0.0.1:0"], "--gossip-addr needs --peer-addr"),
        (
            &["--gossip-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0", "--join", "nowhere"],
            "cannot resolve \"nowhere\"",
        ),
        (&["--cluster-secret", "short"], "--cluster-secret must be at least 16 bytes"),
        (&["--max-in-flight", "0"], "--max-in-flight"),
        (&["--durability", "interval", "--flush-interval-ms", "0"], "--flush-interval-ms"),
        (&["--max-value-bytes", "10", "--max-body-bytes", "10"], "--max-value-bytes"),
        (&["--durability", "sometimes"], "sometimes"),
        (&["--http-addr", "not-an-address"], "cannot listen on not-an-address"),
    ];
    for (flags, message) in cases {
        let mut args = vec!["serve", "--data-dir", data_dir];
        if !flags.contains(&"--http-addr") {
            args.extend(["--http-addr", "127.0.0.1:0"]);
        }
        args.extend(flags);
        let finished = process::run(&args);
        finished.assert_failure();
        assert!(finished.stderr.contains(message), "{flags:?}: {}", finished.stderr);
        assert_eq!(finished.stdout, "", "{flags:?}: it never said it listens");
    }
}

#[test]
fn serve_refuses_an_address_already_in_use() {
    let server = ServerProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let addr = server.addr().to_string();
    let data_dir = dir.path().to_str().unwrap();
    let finished = process::run(&["serve", "--data-dir", data_dir, "--http-addr", &addr]);
    finished.assert_failure();
    assert!(finished.stderr.contains(&format!("cannot listen on {addr}")), "{finished:#?}");
}

#[test]
fn serve_refuses_a_data_dir_another_server_holds() {
    let server = ServerProcess::start(&[]);
    let data_dir = server.data_dir().to_str().unwrap();
    let finished = process::run(&["serve", "--data-dir", data_dir, "--http-addr", "127.0.0.1:0"]);
    finished.assert_failure();
    assert!(finished.stderr.contains("cannot open the data directory"), "{finished:#?}");
    let lock = "is in use by another process";
    assert_eq!(finished.stderr.matches(lock).count(), 1, "each cause said once: {finished:#?}");
    assert_eq!(server.node_id().len(), 16, "the first server still serves");
}

#[test]
fn explain_reads_a_declarations_file_or_asks_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invariants.toml");
    std::fs::write(&file, "[[invariant]]\nkeys = \"account/*\"\ntype = \"counter\"\nmin = 0\n")
        .unwrap();
    let file = file.to_str().unwrap();
    let one = process::run(&["explain", "--invariants", file, "account/alice", "decr"]);
    one.assert_success();
    let answer = json(&one.stdout);
    assert_eq!(answer["route"], "quorum");
    assert_eq!(answer["counterexample"]["merged"], "value -1");
    let table = process::run(&["explain", "--invariants", file]);
    table.assert_success();
    assert_eq!(json(&table.stdout)["invariants"][0]["keys"], "account/*");
    let half = process::run(&["explain", "--invariants", file, "account/alice"]);
    half.assert_failure();
    assert!(half.stderr.contains("give an operation after the key"), "{}", half.stderr);

    let server = ServerProcess::start(&["--invariants", file]);
    let asked = ok(&server, &["explain", "account/bob", "incr"]);
    assert_eq!(json(&asked)["route"], "local");
    let bad = fails(&server, &["explain", "account/bob", "fly"]);
    assert!(bad.contains("bad_request") && bad.contains("unknown op"), "{bad}");
}

#[test]
fn serve_refuses_a_malformed_invariants_file_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[[invariant]]\nkeys = \"a/*\"\ntype = \"histogram\"\nmin = 0\n")
        .unwrap();
    let data_dir = dir.path().join("data");
    let finished = process::run(&[
        "serve",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--http-addr",
        "127.0.0.1:0",
        "--invariants",
        file.to_str().unwrap(),
    ]);
    finished.assert_failure();
    assert!(finished.stderr.contains("unknown type \"histogram\""), "{}", finished.stderr);
    assert_eq!(finished.stdout, "", "it never said it listens");
}

#[test]
fn serve_keeps_the_free_space_it_is_told_to_and_answers_writes_past_it_with_507() {
    let reserve = u64::MAX.to_string();
    let server = ServerProcess::start(&["--free-bytes-min", &reserve]);
    let url = server.url();
    let put = process::run(&["put", "k", "v", "--url", &url]);
    put.assert_failure();
    assert!(put.stderr.contains("insufficient_storage"), "{put:#?}");
    let (status, _) = process::http_get(server.addr(), "/v1/kv/k").unwrap();
    assert_eq!(status, 404, "a refused write stored nothing");
    let (status, _) = process::http_get(server.addr(), "/healthz").unwrap();
    assert_eq!(status, 200, "the node keeps serving");
}

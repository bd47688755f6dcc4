//! Protected mode against the real binary: without `--cluster-secret`, a peer,
//! gossip or quorum listener on an address other hosts can reach is refused at
//! start, before the data directory is opened or any port is bound.
//!
//! The refused addresses are in 192.0.2.0/24 (TEST-NET-1, never assigned to
//! this host), so even a build without the check could not bind them: the test
//! tells the two apart by the message, never by listening off loopback.

mod process;

use process::run;

const EXPOSED: &str = "192.0.2.1:0";

fn serve_refused(data_dir: &std::path::Path, flags: &[&str]) -> process::Finished {
    let dir = data_dir.to_str().expect("a UTF-8 path");
    let mut args = vec!["serve", "--data-dir", dir, "--http-addr", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let finished = run(&args);
    finished.assert_failure();
    finished
}

#[test]
fn an_exposed_listener_without_a_secret_is_refused_before_listening() {
    let cases: [(&str, Vec<&str>); 3] = [
        ("peer", vec!["--peer-addr", EXPOSED]),
        ("gossip", vec!["--gossip-addr", EXPOSED, "--peer-addr", "127.0.0.1:0"]),
        ("quorum", vec!["--voters", EXPOSED, "--quorum-addr", EXPOSED]),
    ];
    for (listener, flags) in cases {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let finished = serve_refused(&data_dir, &flags);
        assert!(
            finished.stderr.contains("--cluster-secret")
                && finished.stderr.contains(&format!("listen for {listener} traffic on {EXPOSED}")),
            "{listener}: the refusal names the listener and the flag: {finished:#?}"
        );
        assert!(!finished.stdout.contains("listening"), "{listener}: {finished:#?}");
        assert!(!data_dir.exists(), "{listener}: refused before the data directory is opened");
    }
}

#[test]
fn a_wildcard_address_counts_as_exposed() {
    // 0.0.0.0 would listen on every interface: refused, and (being refused
    // before binding) never actually bound.
    let temp = tempfile::tempdir().unwrap();
    let finished = serve_refused(&temp.path().join("data"), &["--peer-addr", "0.0.0.0:0"]);
    assert!(finished.stderr.contains("--cluster-secret"), "{finished:#?}");
}

#[test]
fn loopback_listeners_without_a_secret_start() {
    let mut server = process::ServerProcess::start(&[
        "--peer-addr",
        "127.0.0.1:0",
        "--gossip-addr",
        "127.0.0.1:0",
    ]);
    assert!(server.is_running());
    server.terminate();
}

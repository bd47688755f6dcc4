//! `--engine`: the binary creates a data directory with the engine it is
//! given (fjall or redb; sled only opens the stores it made before), reopens it
//! with that engine alone, and says what each engine is.
#![cfg(unix)]

mod process;

use process::ServerProcess;

#[test]
fn serve_help_names_every_engine() {
    let help = process::run(&["serve", "--help"]);
    help.assert_success();
    for engine in ["sled", "fjall", "redb"] {
        assert!(help.stdout.contains(engine), "--help does not name {engine}: {}", help.stdout);
    }
    assert!(help.stdout.contains("--engine"), "{}", help.stdout);
}

#[test]
fn sled_makes_no_new_data_directory() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let dir = data_dir.to_str().unwrap();
    let refused = process::run(&[
        "serve",
        "--data-dir",
        dir,
        "--http-addr",
        "127.0.0.1:0",
        "--engine",
        "sled",
    ]);
    refused.assert_failure();
    assert!(refused.stderr.contains("existing store directories only"), "{refused:#?}");
    assert!(!data_dir.join("store").exists(), "the refused start made a store");
}

#[test]
fn a_data_directory_keeps_its_engine_and_refuses_another() {
    for (made_by, other) in [("fjall", "redb"), ("redb", "sled"), ("sled", "fjall")] {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        if made_by == "sled" {
            // A store as calmkv made them before markers (sled makes no new ones).
            let sled = calmkv::store::SledStore::open(
                &data_dir.join("store"),
                calmkv::store::Durability::Sync,
            );
            drop(sled.unwrap());
        }
        let mut server = ServerProcess::start_in(&data_dir, &["--engine", made_by]);
        process::run(&["put", "k", made_by, "--url", &server.url()]).assert_success();
        server.terminate().assert_success();
        let marker = std::fs::read_to_string(data_dir.join("store/calmkv-store")).unwrap();
        assert!(marker.contains(&format!("engine {made_by}\n")), "{marker}");

        let dir = data_dir.to_str().unwrap();
        let refused = process::run(&[
            "serve",
            "--data-dir",
            dir,
            "--http-addr",
            "127.0.0.1:0",
            "--engine",
            other,
        ]);
        refused.assert_failure();
        assert!(
            refused.stderr.contains(made_by) && refused.stderr.contains(other),
            "{made_by} opened with {other}: {refused:#?}"
        );
        let after = std::fs::read_to_string(data_dir.join("store/calmkv-store")).unwrap();
        assert_eq!(after, marker, "the refused open changed the marker");

        // Without --engine the directory opens with its own engine.
        let server = ServerProcess::start_in(&data_dir, &[]);
        let get = process::run(&["get", "k", "--url", &server.url()]);
        get.assert_success();
        assert!(get.stdout.contains(made_by), "{get:#?}");
    }
}

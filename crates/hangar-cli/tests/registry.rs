//! `hangar pull` against a real registry: Debian's docker-registry on
//! 127.0.0.1 (a free port, its own storage), images pushed into it with
//! skopeo from OCI layouts the test builds. Traffic stays on loopback.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;
mod oci_layout;

use std::process::Command;

use common::*;
use hangar::bench_image::LocalRegistry;
use oci_layout::app_image;

fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        found,
        "the registry tests need {program} (apt-get install {package}); run `make deps` (CI={:?})",
        std::env::var("CI").ok()
    );
}

/// Debian's docker-registry on 127.0.0.1 with a free port and its own
/// storage (the same fixture `hangar bench image` uses).
fn start_registry() -> LocalRegistry {
    require("docker-registry", "docker-registry");
    require("skopeo", "skopeo");
    LocalRegistry::start(&scratch("registry")).unwrap()
}

/// Pushes a fresh app image as `hangar-test/<prefix>-N:1`; its full name.
fn push_app(registry: &LocalRegistry, prefix: &str) -> String {
    let layout = app_image(&scratch("layout"), None);
    registry
        .push(&layout, &format!("hangar-test/{}:1", unique(prefix)))
        .unwrap()
}

#[test]
fn pull_from_a_registry_then_run() {
    let state = shared_state();
    let registry = start_registry();
    let name = push_app(&registry, "app");

    let out = ok(&hangar(state, &["pull", &name]));
    assert!(out.starts_with(&format!("{name} sha256:")), "{out}");
    let listed = ok(&hangar(state, &["image", "ls"]));
    assert!(listed.contains(&name), "{listed}");
    let run = hangar(state, &["run", "--image", &name]);
    assert_eq!(
        text(&run.stdout),
        "hi from ID=hangar-test\n",
        "{}",
        text(&run.stderr)
    );

    let missing = hangar(
        state,
        &[
            "pull",
            &format!("127.0.0.1:{}/hangar-test/none:1", registry.port),
        ],
    );
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        text(&missing.stderr).contains("manifest unknown"),
        "{}",
        text(&missing.stderr)
    );
    ok(&hangar(state, &["image", "rm", &name]));
}

#[test]
fn a_blob_tampered_in_the_registry_is_refused() {
    let state = shared_state();
    let registry = start_registry();
    let name = push_app(&registry, "bad");
    // Flip a byte of the biggest blob in the registry's own storage.
    let blobs = registry.storage.join("docker/registry/v2/blobs/sha256");
    let mut files = Vec::new();
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            files.push(blob.unwrap().path().join("data"));
        }
    }
    let biggest = files
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&biggest, &bytes).unwrap();

    let out = hangar(state, &["pull", &name]);
    assert_eq!(out.status.code(), Some(125));
    // oci-client checks as it downloads; the blob store checks again.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Invalid digest") || stderr.contains("does not match its digest"),
        "{stderr}"
    );
    assert!(!ok(&hangar(state, &["image", "ls"])).contains(&name));
}

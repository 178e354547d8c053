//! `hangar image add URL` for cloud disk images, over HTTP from a server
//! on 127.0.0.1 (no VM boots): qcow2 and raw images made by qemu-img are
//! stored with their format, sha256 and URL; a wrong --sha256, a body cut
//! short of its Content-Length, a qcow2 with a backing file and a 404 are
//! refused, and a refused add leaves nothing in the state dir.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;
use std::process::Command;

use common::http::{serve, Reply};
use common::*;
use sha2::{Digest, Sha256};

/// `qemu-img create -f FORMAT [OPTIONS] FILE [SIZE]` in `dir`; returns
/// the file's bytes.
fn qemu_img(dir: &Path, file: &str, format: &str, options: &[&str], size: Option<&str>) -> Vec<u8> {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(["create", "-q", "-f", format])
        .args(options)
        .arg(file)
        .args(size)
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(out.status.success(), "qemu-img: {}", text(&out.stderr));
    std::fs::read(dir.join(file)).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Runs a refused `hangar` command: exit 125, one line naming `expect`.
#[track_caller]
fn refused(state: &Path, args: &[&str], expect: &[&str]) -> String {
    let out = hangar(state, args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
    for part in expect {
        assert!(
            stderr.contains(part),
            "{args:?}: expected {part:?} in {stderr}"
        );
    }
    stderr
}

/// `image inspect disk:NAME --json`.
fn disk_record(state: &Path, name: &str) -> serde_json::Value {
    let out = ok(&hangar(
        state,
        &["image", "inspect", &format!("disk:{name}"), "--json"],
    ));
    serde_json::from_str(&out).unwrap()
}

/// No disk image stored and nothing left in the scratch dir: the disk
/// store holds at most its empty `tmp`.
#[track_caller]
fn assert_nothing_stored(state: &Path, name: &str) {
    let out = hangar(state, &["image", "inspect", &format!("disk:{name}")]);
    assert!(!out.status.success(), "disk:{name} exists");
    let listed = ok(&hangar(state, &["--json", "image", "ls"]));
    assert!(!listed.contains("\"disk\""), "image ls: {listed}");
    let disks = state.join("images-v1").join("disks");
    let left: Vec<String> = std::fs::read_dir(&disks)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|entry| entry == "tmp"),
        "left in {}: {left:?}",
        disks.display()
    );
    let scratch: Vec<_> = std::fs::read_dir(disks.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "scratch files left: {scratch:?}");
}

#[test]
fn qcow2_and_raw_images_are_added_from_a_url_with_their_digest() {
    let dir = scratch("disk-url");
    let state = dir.join("state");
    let qcow2 = qemu_img(&dir, "x.qcow2", "qcow2", &[], Some("64M"));
    let raw = qemu_img(&dir, "x.raw", "raw", &[], Some("1M"));
    let base = serve(vec![
        ("/x.qcow2", Reply::Body(qcow2.clone())),
        ("/x.raw", Reply::Body(raw.clone())),
    ]);

    let url = format!("{base}/x.qcow2");
    let digest = sha256(&qcow2);
    let out = ok(&hangar(
        &state,
        &["image", "add", &url, "--name", "n", "--sha256", &digest],
    ));
    assert!(
        out.contains(&format!("disk:n qcow2 sha256:{digest}")),
        "{out}"
    );
    let record = disk_record(&state, "n");
    assert_eq!(record["format"], "qcow2", "{record}");
    assert_eq!(record["sha256"], digest.as_str(), "{record}");
    assert_eq!(record["source"], url.as_str(), "{record}");
    assert_eq!(record["virtual_size"], 64 << 20, "{record}");
    assert_eq!(record["file_size"], qcow2.len(), "{record}");

    // Raw, the digest given with its prefix; the name from the URL.
    let url = format!("{base}/x.raw");
    let digest = sha256(&raw);
    ok(&hangar(
        &state,
        &[
            "image",
            "add",
            &url,
            "--sha256",
            &format!("sha256:{digest}"),
        ],
    ));
    let record = disk_record(&state, "x");
    assert_eq!(record["format"], "raw", "{record}");
    assert_eq!(record["sha256"], digest.as_str(), "{record}");
    assert_eq!(record["source"], url.as_str(), "{record}");
    assert_eq!(record["virtual_size"], 1 << 20, "{record}");

    // A URL's credentials and signed query string are not recorded.
    let port = base.rsplit(':').next().unwrap();
    let secret = format!("http://user:hunter2@127.0.0.1:{port}/x.qcow2?sig=hunter2");
    ok(&hangar(&state, &["image", "add", &secret, "--name", "s"]));
    let record = disk_record(&state, "s");
    assert_eq!(
        record["source"],
        format!("http://***@127.0.0.1:{port}/x.qcow2?***"),
        "{record}"
    );

    // Stored as served, nothing left in the scratch dir.
    let disks = state.join("images-v1").join("disks");
    assert_eq!(std::fs::read(disks.join("n").join("disk")).unwrap(), qcow2);
    let scratch_left = std::fs::read_dir(disks.join("tmp")).unwrap().count();
    assert_eq!(scratch_left, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_digest_is_refused_naming_both_and_leaves_nothing() {
    let dir = scratch("disk-digest");
    let state = dir.join("state");
    let qcow2 = qemu_img(&dir, "x.qcow2", "qcow2", &[], Some("64M"));
    let base = serve(vec![("/x.qcow2", Reply::Body(qcow2.clone()))]);
    let wrong = sha256(b"something else");
    refused(
        &state,
        &[
            "image",
            "add",
            &format!("{base}/x.qcow2"),
            "--name",
            "n",
            "--sha256",
            &wrong,
        ],
        &[
            &format!("sha256:{}", sha256(&qcow2)),
            &format!("sha256:{wrong}"),
            "tampered",
        ],
    );
    assert_nothing_stored(&state, "n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_body_cut_short_is_refused_and_leaves_nothing() {
    let dir = scratch("disk-short");
    let state = dir.join("state");
    let qcow2 = qemu_img(&dir, "x.qcow2", "qcow2", &[], Some("64M"));
    let half = qcow2[..qcow2.len() / 2].to_vec();
    let base = serve(vec![(
        "/x.qcow2",
        Reply::Truncated {
            body: half,
            declared: qcow2.len(),
        },
    )]);
    let url = format!("{base}/x.qcow2");
    // With the right digest and without one: the download itself fails.
    let digest = sha256(&qcow2);
    for extra in [&["--sha256", digest.as_str()][..], &[]] {
        let mut args = vec!["image", "add", url.as_str(), "--name", "n"];
        args.extend_from_slice(extra);
        refused(&state, &args, &["disk image n", &url]);
        assert_nothing_stored(&state, "n");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_qcow2_with_a_backing_file_is_refused() {
    let dir = scratch("disk-backing");
    let state = dir.join("state");
    qemu_img(&dir, "base.qcow2", "qcow2", &[], Some("64M"));
    let overlay = qemu_img(
        &dir,
        "over.qcow2",
        "qcow2",
        &["-F", "qcow2", "-b", "base.qcow2"],
        None,
    );
    let base = serve(vec![("/over.qcow2", Reply::Body(overlay))]);
    let url = format!("{base}/over.qcow2");
    refused(
        &state,
        &["image", "add", &url, "--name", "n"],
        &[&url, "backing file; refused", "qemu-img convert"],
    );
    assert_nothing_stored(&state, "n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_image_names_the_status() {
    let dir = scratch("disk-404");
    let state = dir.join("state");
    let base = serve(vec![("/gone.qcow2", Reply::Status(410, "Gone"))]);
    for (path, status) in [
        ("/nothing.qcow2", "404 Not Found"),
        ("/gone.qcow2", "410 Gone"),
    ] {
        let url = format!("{base}{path}");
        refused(
            &state,
            &["image", "add", &url, "--name", "n"],
            &[&url, status],
        );
        assert_nothing_stored(&state, "n");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! Bad input: a one-line error that says what to do, a non-zero exit code,
//! and nothing created.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;

use common::*;

/// Runs hangar with `args` in a fresh state dir and checks the error and
/// that no VM record and no work dir were left.
#[track_caller]
fn refused(args: &[&str], env: &[(&str, &str)], expect: &str) {
    let state = tempfile_dir();
    let out = hangar_env(&state, args, env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in {stderr}"
    );
    assert_no_vms(&state);
    let _ = std::fs::remove_dir_all(&state);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("bad-input"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[track_caller]
fn assert_no_vms(state: &Path) {
    let ps = ok(&hangar(state, &["ps", "-a", "--json"]));
    assert_eq!(ps.trim(), "[]", "nothing recorded");
    let vms = state.join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "work dirs left: {left:?}");
}

#[test]
fn zero_memory_is_refused() {
    refused(&["run", "--memory", "0", "--", "true"], &[], "at least 64M");
}

#[test]
fn unparsable_memory_is_refused() {
    refused(&["run", "--memory", "lots", "--", "true"], &[], "e.g. 512M");
}

#[test]
fn zero_cpus_is_refused() {
    refused(&["create", "--name", "a", "--cpus", "0"], &[], "cpus is 0");
}

#[test]
fn bad_name_is_refused() {
    refused(
        &["create", "--name", "Bad Name"],
        &[],
        "name \"Bad Name\" is invalid",
    );
}

#[test]
fn unknown_image_is_refused() {
    refused(
        &["run", "--image", "alpine:3.20", "--", "true"],
        &[],
        "image alpine:3.20 is not in the image store",
    );
}

#[test]
fn missing_qemu_binary_is_refused() {
    refused(
        &["create", "--name", "a"],
        &[("HANGAR_QEMU", "/nonexistent/qemu-system-x86_64")],
        "apt-get install qemu-system-x86",
    );
}

#[test]
fn bad_accelerator_is_refused() {
    refused(&["--accel", "warp", "ps"], &[], "use kvm, tcg or auto");
}

#[test]
fn a_taken_name_is_refused_and_the_first_vm_is_untouched() {
    let state = tempfile_dir();
    let first = ok(&hangar(
        &state,
        &["create", "--name", "web", "--backend", "noop"],
    ));
    let out = hangar(&state, &["create", "--name", "web", "--backend", "noop"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr.contains("already exists"), "{stderr}");
    let ps = ok(&hangar(&state, &["ps", "-a", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], first.trim());
    assert_eq!(std::fs::read_dir(state.join("vms")).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn illegal_transitions_are_errors_not_no_ops() {
    let state = tempfile_dir();
    ok(&hangar(
        &state,
        &["create", "--name", "web", "--backend", "noop"],
    ));
    let out = hangar(&state, &["stop", "web"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("is created: cannot stop it"),
        "{}",
        text(&out.stderr)
    );
    ok(&hangar(&state, &["start", "web"]));
    let again = hangar(&state, &["start", "web"]);
    assert!(
        text(&again.stderr).contains("already running"),
        "{}",
        text(&again.stderr)
    );
    let rm = hangar(&state, &["rm", "web"]);
    assert!(
        text(&rm.stderr).contains("hangar rm -f"),
        "{}",
        text(&rm.stderr)
    );
    ok(&hangar(&state, &["rm", "-f", "web"]));
    assert_no_vms(&state);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn a_static_address_outside_user_networking_is_refused() {
    // SSH and every -p forward go to --ip: outside slirp's subnet (or on
    // its gateway/DNS address) the VM could never be reached.
    for (ip, expect) in [
        (
            "192.168.1.5/24",
            "--ip 192.168.1.5/24: is outside the subnet",
        ),
        (
            "10.0.2.2/24",
            "--ip 10.0.2.2/24: is the gateway's own address",
        ),
    ] {
        refused(
            &[
                "create",
                "--name",
                "a",
                "--backend",
                "noop",
                "--network",
                "user",
                "--ip",
                ip,
            ],
            &[],
            expect,
        );
    }
    refused(
        &[
            "create",
            "--name",
            "a",
            "--backend",
            "noop",
            "-p",
            "8080:80",
            "--ip",
            "10.0.2.15/24",
            "--gateway",
            "192.168.1.1",
        ],
        &[],
        "--gateway 192.168.1.1: user-mode networking's only router is 10.0.2.2",
    );
}

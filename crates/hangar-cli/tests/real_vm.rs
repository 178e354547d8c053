//! Real QEMU VMs booted from the embedded default image.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::time::Duration;

use common::*;

#[test]
fn run_passes_stdout_stderr_and_exit_code_through() {
    let state = shared_state();
    let out = hangar(
        state,
        &["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(text(&out.stdout), "out\n", "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).lines().any(|l| l == "err"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn run_reports_a_real_linux_guest_and_cleans_up() {
    let state = shared_state();
    let name = unique("uname");
    let out = ok(&hangar(
        state,
        &["run", "--name", &name, "--", "uname", "-a"],
    ));
    assert!(out.starts_with("Linux "), "{out}");
    assert!(out.contains(&name), "hostname is the VM name: {out}");
    let ps = ok(&hangar(state, &["ps", "-a", "--json"]));
    assert!(!ps.contains(&name), "run removed its VM: {ps}");
}

#[test]
fn a_signal_in_the_guest_exits_with_128_plus_n() {
    let state = shared_state();
    let out = hangar(state, &["run", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
}

#[test]
fn consecutive_runs_all_succeed() {
    let state = shared_state();
    let runs: usize = std::env::var("HANGAR_TEST_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut failures = Vec::new();
    for i in 0..runs {
        let out = hangar(state, &["run", "--", "true"]);
        if !out.status.success() {
            failures.push(format!("run {i}: {}\n{}", out.status, text(&out.stderr)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn stop_ends_qemu_and_records_stopped() {
    let state = shared_state();
    let name = unique("stop");
    ok(&hangar(state, &["create", "--name", &name]));
    let _guard = VmGuard {
        state,
        name: name.clone(),
    };
    ok(&hangar(state, &["start", &name]));
    let record = inspect(state, &name);
    assert_eq!(record["state"], "running");
    let pid = record["pid"].as_u64().expect("running VM has a pid") as u32;
    let exec = ok(&hangar(
        state,
        &["exec", &name, "--", "cat", "/proc/version"],
    ));
    assert!(exec.starts_with("Linux version"), "{exec}");

    ok(&hangar(state, &["stop", &name]));
    assert!(
        !process_running(pid),
        "QEMU pid {pid} still runs after stop"
    );
    let record = inspect(state, &name);
    assert_eq!(record["state"], "stopped", "{record:#}");
    assert!(record["pid"].is_null());

    // A stopped VM starts again.
    ok(&hangar(state, &["start", &name]));
    assert_eq!(inspect(state, &name)["state"], "running");
}

#[test]
fn qemu_killed_behind_hangars_back_shows_failed_with_reason() {
    let state = shared_state();
    let name = unique("sigkill");
    ok(&hangar(state, &["create", "--name", &name]));
    let _guard = VmGuard {
        state,
        name: name.clone(),
    };
    ok(&hangar(state, &["start", &name]));
    let pid = inspect(state, &name)["pid"].as_u64().expect("pid") as u32;
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_running(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ps = ok(&hangar(state, &["ps", "-a", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&ps).expect("json");
    let vm = list
        .as_array()
        .and_then(|vms| vms.iter().find(|vm| vm["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} missing from ps: {ps}"));
    assert_eq!(vm["state"], "failed", "{vm:#}");
    let reason = vm["exit_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("exited unexpectedly"), "{reason}");
    assert!(vm["pid"].is_null());
}

#[test]
fn state_dir_is_private_after_a_boot() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let state = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("private"));
    ok(&hangar(&state, &["create", "--name", "p"]));
    let _guard = VmGuard {
        state: &state,
        name: "p".into(),
    };
    ok(&hangar(&state, &["start", "p"]));
    let mut stack = vec![state.clone()];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            let kind = meta.file_type();
            if kind.is_dir() {
                assert_eq!(mode, 0o700, "{}", entry.path().display());
                stack.push(entry.path());
            } else if kind.is_file() || kind.is_socket() {
                assert_eq!(mode, 0o600, "{}", entry.path().display());
            }
            checked += 1;
        }
    }
    assert!(checked > 10, "checked only {checked} entries");
}

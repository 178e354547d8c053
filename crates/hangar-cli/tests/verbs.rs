//! Lifecycle verbs through the CLI, on the noop backend (fast, no VM) and
//! on a real QEMU VM where the backend matters (pause, kill, logs).

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use common::*;

fn state_of(state: &std::path::Path, vm: &str) -> String {
    inspect(state, vm)["state"].as_str().unwrap().to_owned()
}

#[test]
fn noop_vm_moves_through_every_verb() {
    let state = scratch("verbs");
    ok(&hangar(
        &state,
        &[
            "create",
            "--name",
            "a",
            "--backend",
            "noop",
            "-l",
            "role=web",
        ],
    ));
    ok(&hangar(&state, &["start", "a"]));
    ok(&hangar(&state, &["pause", "a"]));
    assert_eq!(state_of(&state, "a"), "paused");
    let again = hangar(&state, &["pause", "a"]);
    assert!(
        text(&again.stderr).contains("only a running VM pauses"),
        "{}",
        text(&again.stderr)
    );
    ok(&hangar(&state, &["resume", "a"]));
    ok(&hangar(&state, &["restart", "a"]));
    assert_eq!(state_of(&state, "a"), "running");
    ok(&hangar(&state, &["kill", "a", "--signal", "TERM"]));
    let record = inspect(&state, "a");
    assert_eq!(record["state"], "stopped");
    assert_eq!(record["exit_reason"], "killed with SIGTERM on request");
    ok(&hangar(
        &state,
        &["wait", "a", "--state", "stopped", "-t", "5"],
    ));
    let timeout = hangar(&state, &["wait", "a", "--state", "running", "-t", "1"]);
    assert!(
        text(&timeout.stderr).contains("did not reach running"),
        "{}",
        text(&timeout.stderr)
    );
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn ps_filters_by_namespace_state_and_label() {
    let state = scratch("filters");
    for (name, ns, label) in [
        ("a", "one", "role=web"),
        ("b", "one", "role=db"),
        ("c", "two", "role=web"),
    ] {
        ok(&hangar(
            &state,
            &[
                "create",
                "--name",
                name,
                "-n",
                ns,
                "-l",
                label,
                "--backend",
                "noop",
            ],
        ));
    }
    ok(&hangar(&state, &["start", "a"]));
    let names = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["ps", "--json"];
        full.extend_from_slice(args);
        let list: serde_json::Value = serde_json::from_str(&ok(&hangar(&state, &full))).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&[]), ["a"]);
    assert_eq!(names(&["-a"]), ["a", "b", "c"]);
    assert_eq!(names(&["-a", "-n", "one"]), ["a", "b"]);
    assert_eq!(names(&["--state", "created"]), ["b", "c"]);
    assert_eq!(names(&["-a", "-l", "role=web"]), ["a", "c"]);
    assert_eq!(names(&["-a", "-l", "role"]), ["a", "b", "c"]);
    let bad = hangar(&state, &["ps", "--state", "sleeping"]);
    assert!(
        text(&bad.stderr).contains("unknown state"),
        "{}",
        text(&bad.stderr)
    );
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn create_from_a_spec_file_in_each_format() {
    let state = scratch("specfile");
    let files = [
        (
            "web.toml",
            "name = \"web-toml\"\ncpus = 2\nmemory = \"512M\"\n",
        ),
        (
            "web.json",
            r#"{"name": "web-json", "cpus": 2, "memory": "512M"}"#,
        ),
        ("web.yaml", "name: web-yaml\ncpus: 2\nmemory: 512M\n"),
    ];
    for (file, body) in files {
        let path = state.join(file);
        std::fs::write(&path, body).unwrap();
        let path = path.to_str().unwrap();
        ok(&hangar(
            &state,
            &["create", "-f", path, "--backend", "noop"],
        ));
    }
    for name in ["web-toml", "web-json", "web-yaml"] {
        let record = inspect(&state, name);
        assert_eq!(record["spec"]["cpus"], 2);
        assert_eq!(record["spec"]["memory"], 512 * 1024 * 1024);
    }
    let bad = state.join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nmemroy = \"1G\"\n").unwrap();
    let out = hangar(
        &state,
        &["create", "-f", bad.to_str().unwrap(), "--backend", "noop"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("unknown field `memroy`"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn real_vm_pauses_resumes_logs_and_dies_by_signal() {
    let state = shared_state();
    let name = unique("verbs");
    ok(&hangar(state, &["create", "--name", &name]));
    let _guard = VmGuard {
        state,
        name: name.clone(),
    };
    ok(&hangar(state, &["start", &name]));
    ok(&hangar(state, &["pause", &name]));
    assert_eq!(state_of(state, &name), "paused");
    let paused_exec = hangar(state, &["exec", &name, "--", "true"]);
    assert!(
        text(&paused_exec.stderr).contains("resume it first"),
        "{}",
        text(&paused_exec.stderr)
    );
    ok(&hangar(state, &["resume", &name]));
    ok(&hangar(
        state,
        &[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo MARK-$((6*7)) > /dev/console",
        ],
    ));
    let logs = ok(&hangar(state, &["logs", &name]));
    assert!(logs.contains("MARK-42"), "console log: {logs}");
    assert!(logs.contains("hangar-agent: ready"), "console log: {logs}");
    let pid = inspect(state, &name)["pid"].as_u64().unwrap() as u32;
    ok(&hangar(state, &["kill", &name, "--signal", "KILL"]));
    assert!(!process_running(pid));
    let record = inspect(state, &name);
    assert_eq!(record["state"], "stopped");
    assert_eq!(record["exit_reason"], "killed with SIGKILL on request");
}

#[test]
fn console_attaches_runs_a_shell_command_and_detaches() {
    use std::io::Write;
    let state = shared_state();
    let name = unique("console");
    ok(&hangar(state, &["create", "--name", &name]));
    let _guard = VmGuard {
        state,
        name: name.clone(),
    };
    ok(&hangar(state, &["start", &name]));
    let mut child = std::process::Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args(["console", &name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The shell may still be starting: ask twice, a second apart.
    for _ in 0..2 {
        stdin.write_all(b"echo CONSOLE-$((6*7))\n").unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    stdin.write_all(&[0x1d]).unwrap();
    let output = wait_all(vec![child], std::time::Duration::from_secs(30)).remove(0);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("CONSOLE-42"),
        "console printed: {}",
        text(&output.stdout)
    );
    assert!(
        text(&output.stderr).contains("detached"),
        "{}",
        text(&output.stderr)
    );
    // Still running after detach.
    assert_eq!(inspect(state, &name)["state"], "running");
}

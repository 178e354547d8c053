//! `exec` on a real VM: stdin, failures that must not hurt the VM, time
//! limits, Ctrl-C forwarding, large output, many at once.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn stdin_output_and_failures() {
    let state = shared_state();
    let (vm, _guard) = running_vm("exec");

    let mut child = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args(["exec", "-i", &vm, "--", "sh", "-c", "tr a-z A-Z; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello stdin\n")
        .unwrap();
    let out = wait_all(vec![child], Duration::from_secs(60)).remove(0);
    assert_eq!(
        text(&out.stdout),
        "HELLO STDIN\nend\n",
        "{}",
        text(&out.stderr)
    );

    // Three MB of output arrive whole, in order.
    let big = ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "head -c 3000000 /dev/zero | tr '\\0' a",
        ],
    ));
    assert_eq!(big.len(), 3_000_000);
    assert!(big.bytes().all(|b| b == b'a'));

    for _ in 0..3 {
        let typo = hangar(state, &["exec", &vm, "--", "no-such-program"]);
        assert_eq!(typo.status.code(), Some(125));
        assert!(
            text(&typo.stderr).contains("could not start"),
            "{}",
            text(&typo.stderr)
        );
        let nowhere = hangar(state, &["exec", "-w", "/nowhere", &vm, "--", "true"]);
        assert!(
            text(&nowhere.stderr).contains("working directory /nowhere does not exist"),
            "{}",
            text(&nowhere.stderr)
        );
    }
    // The guest survived all of that.
    assert_eq!(
        ok(&hangar(state, &["exec", &vm, "--", "echo", "alive"])),
        "alive\n"
    );

    let slow = hangar(state, &["exec", "--timeout", "1", &vm, "--", "sleep", "60"]);
    assert_eq!(slow.status.code(), Some(124), "{}", text(&slow.stderr));
    assert!(
        text(&slow.stderr).contains("did not finish within 1s"),
        "{}",
        text(&slow.stderr)
    );
}

#[test]
fn ctrl_c_reaches_the_guest_command() {
    let state = shared_state();
    let (vm, _guard) = running_vm("sigint");
    let script = "trap 'echo got-int; exit 5' INT; echo armed; sleep 60 & wait";
    let mut child = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args(["exec", &vm, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the trap to be armed, then press Ctrl-C (SIGINT to hangar).
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("armed") {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "exec ended before arming: {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).unwrap();
    let out = wait_all(vec![child], Duration::from_secs(60)).remove(0);
    assert!(
        text(&rest).contains("got-int"),
        "stdout: {}{}",
        text(&seen),
        text(&rest)
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
}

#[test]
fn sixteen_execs_at_once_from_separate_processes() {
    let state = shared_state();
    let (vm, _guard) = running_vm("many");
    let children = (0..16)
        .map(|i| {
            let cmd = format!("sleep 1; echo exec-{i}");
            spawn_hangar(state, &["exec", &vm, "--", "sh", "-c", &cmd])
        })
        .collect();
    let outputs = wait_all(children, Duration::from_secs(120));
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "exec {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("exec-{i}\n"));
    }
}

/// A reader that stops reading stalls only its own exec: its output backs
/// up into its own agent port while other execs go on.
#[test]
fn a_stalled_reader_does_not_stall_other_execs() {
    let state = shared_state();
    let (vm, _guard) = running_vm("stall");
    // stdout is piped and never read: once the pipe and the channel fill,
    // this hangar blocks writing its output.
    let mut stalled = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args([
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "head -c 50000000 /dev/zero; echo done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        stalled.try_wait().unwrap().is_none(),
        "the stalled exec should still be blocked on its output"
    );
    let started = std::time::Instant::now();
    for i in 0..3 {
        let out = ok(&hangar(
            state,
            &["exec", &vm, "--", "echo", &format!("free-{i}")],
        ));
        assert_eq!(out, format!("free-{i}\n"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "other execs took {:?} while one reader stalled",
        started.elapsed()
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
}

/// Stdin the command never reads cannot wedge the session: `--timeout`
/// still kills it (flow control keeps the agent reading its channel).
#[test]
fn unread_stdin_does_not_block_timeout_or_signals() {
    let state = shared_state();
    let (vm, _guard) = running_vm("unread");
    let mut child = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args(["exec", "-i", "--timeout", "3", &vm, "--", "sleep", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let block = vec![b'x'; 1 << 20];
        for _ in 0..32 {
            if stdin.write_all(&block).is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let out = wait_all(vec![child], Duration::from_secs(60)).remove(0);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let _ = feeder.join();
}

/// A host that dies mid-exec closes its command's stdin, as a closed SSH
/// session would: `cat` ends instead of waiting forever.
#[test]
fn a_dead_host_closes_its_commands_stdin() {
    let state = shared_state();
    let (vm, _guard) = running_vm("hostgone");
    let mut child = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args([
            "exec",
            "-i",
            &vm,
            "--",
            "sh",
            "-c",
            "cat > /tmp/got; echo closed > /tmp/ended",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"partial\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    let _ = child.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ended = hangar(state, &["exec", &vm, "--", "cat", "/tmp/ended"]);
        if ended.status.success() {
            assert_eq!(text(&ended.stdout), "closed\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command's stdin stayed open after its host died"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = ok(&hangar(state, &["exec", &vm, "--", "cat", "/tmp/got"]));
    assert_eq!(got, "partial\n");
    drop(stdin);
}

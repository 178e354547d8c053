//! The agent beyond plain exec, on a real VM: users, pseudo-terminals
//! (driven through a real pty, as a person at a terminal would), guest
//! facts, and `cp` both ways with modes, symlinks and hostile cases.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn users_and_guest_facts() {
    let state = shared_state();
    let (vm, _guard) = running_vm("user");
    let id = |args: &[&str]| {
        let mut all = vec!["exec"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[&vm, "--", "id"]);
        ok(&hangar(state, &all))
    };
    assert!(id(&[]).starts_with("uid=0(root) gid=0(root)"));
    assert!(
        id(&["-u", "nobody"]).starts_with("uid=65534(nobody) gid=65534(nogroup)"),
        "{}",
        id(&["-u", "nobody"])
    );
    assert!(id(&["-u", "1000:50"]).starts_with("uid=1000 gid=50"));
    let home = ok(&hangar(
        state,
        &[
            "exec",
            "-u",
            "nobody",
            &vm,
            "--",
            "sh",
            "-c",
            "echo $HOME $USER",
        ],
    ));
    assert_eq!(home, "/nonexistent nobody\n");

    let unknown = hangar(state, &["exec", "-u", "bob", &vm, "--", "id"]);
    assert_eq!(unknown.status.code(), Some(125));
    assert!(
        text(&unknown.stderr).contains("user bob is not in the guest's /etc/passwd"),
        "{}",
        text(&unknown.stderr)
    );

    // The hello's facts are kept in the record.
    let record = inspect(state, &vm);
    let guest = &record["guest"];
    assert_eq!(guest["hostname"], vm.as_str());
    let release = ok(&hangar(state, &["exec", &vm, "--", "uname", "-r"]));
    assert_eq!(guest["kernel_release"], release.trim());
    let boot_ms = guest["boot_time_unix_ms"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        boot_ms <= now_ms + 60_000 && now_ms - boot_ms < 3_600_000,
        "guest boot time {boot_ms} vs host now {now_ms}"
    );
    assert!(guest["uptime_ms"].as_u64().unwrap() > 0);
}

#[test]
fn tty_without_a_terminal_merges_output() {
    let state = shared_state();
    let (vm, _guard) = running_vm("tty");
    let out = hangar(
        state,
        &[
            "exec",
            "-t",
            &vm,
            "--",
            "sh",
            "-c",
            "tty; stty size; echo err >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    // A terminal: its name, the default size, stderr on the same stream,
    // and the terminal's CR LF line ends.
    assert!(stdout.starts_with("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("24 80\r\n"), "{stdout:?}");
    assert!(stdout.contains("err\r\n"), "{stdout:?}");
    assert_eq!(text(&out.stderr), "");
}

/// Everything read from a pty's controller side, collected by a thread.
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn start(mut controller: fs::File) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the terminal side is closed by everyone: done.
            while let Ok(n) = controller.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self(seen)
    }

    /// Waits until `wanted` appears after byte `from`; returns where it ends.
    fn wait_for(&self, wanted: &str, from: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = text(&self.0.lock().unwrap());
            if let Some(at) = seen.get(from..).and_then(|tail| tail.find(wanted)) {
                return from + at + wanted.len();
            }
            assert!(
                Instant::now() < deadline,
                "{wanted:?} did not appear within {timeout:?}; the terminal showed:\n{:?}",
                seen.get(from..).unwrap_or("")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn interactive_tty_follows_the_terminal_and_restores_it() {
    use nix::pty::{openpty, Winsize};
    use nix::sys::termios::{tcgetattr, LocalFlags};

    let state = shared_state();
    let (vm, _guard) = running_vm("pty");
    let size = Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).unwrap();
    let terminal = fs::File::from(pty.slave);
    let terminal_path = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&terminal)
    ))
    .unwrap();
    let before = tcgetattr(&terminal).unwrap();
    assert!(before
        .local_flags
        .contains(LocalFlags::ICANON | LocalFlags::ECHO));

    let mut child = Command::new(hangar_bin())
        .arg("--state-dir")
        .arg(state)
        .args(["exec", "-it", &vm, "--", "sh"])
        .env_remove("HANGAR_HOME")
        .stdin(Stdio::from(terminal.try_clone().unwrap()))
        .stdout(Stdio::from(terminal.try_clone().unwrap()))
        .stderr(Stdio::from(terminal.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let mut keys = fs::File::from(pty.master);
    let screen = Screen::start(keys.try_clone().unwrap());
    let wait = Duration::from_secs(30);

    // While hangar runs, this terminal is raw (no local echo, no line
    // editing): keys go to the guest's terminal as typed.
    keys.write_all(b"stty size; echo ready-$((6*7))\n").unwrap();
    let at = screen.wait_for("30 100", 0, wait);
    let at = screen.wait_for("ready-42", at, wait);
    let during = tcgetattr(&terminal).unwrap();
    assert!(!during.local_flags.contains(LocalFlags::ICANON));
    assert!(!during.local_flags.contains(LocalFlags::ECHO));

    // The user's terminal grows: the guest's terminal follows.
    let resized = Command::new("stty")
        .args([
            "-F",
            terminal_path.to_str().unwrap(),
            "rows",
            "50",
            "cols",
            "132",
        ])
        .status()
        .unwrap();
    assert!(resized.success());
    std::thread::sleep(Duration::from_millis(500));
    keys.write_all(b"stty size\n").unwrap();
    let at = screen.wait_for("50 132", at, wait);

    // Ctrl-C reaches the guest as a key: the foreground sleep dies, the
    // shell lives on.
    keys.write_all(b"sleep 60\n").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    keys.write_all(&[0x03]).unwrap();
    keys.write_all(b"echo alive-$((7*6))\n").unwrap();
    let at = screen.wait_for("alive-42", at, Duration::from_secs(20));

    keys.write_all(b"exit 7\n").unwrap();
    let deadline = Instant::now() + wait;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "hangar exec -it did not end after `exit 7`; the terminal showed {:?}",
            text(&screen.0.lock().unwrap()[at..])
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(7));
    let after = tcgetattr(&terminal).unwrap();
    assert_eq!(
        after.local_flags, before.local_flags,
        "the terminal's mode is restored"
    );
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A tree with modes, nesting, links, an empty file and 8 MB of random
/// bytes (streamed in many frames).
fn sample_tree(root: &Path) -> std::path::PathBuf {
    let src = root.join("tree");
    fs::create_dir_all(src.join("nested/deeper")).unwrap();
    fs::write(src.join("tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(src.join("tool.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(src.join("empty"), "").unwrap();
    let mut random = vec![0u8; 8 << 20];
    let mut seed = Lcg(7);
    for byte in &mut random {
        *byte = seed.next(256) as u8;
    }
    fs::write(src.join("nested/deeper/blob"), &random).unwrap();
    symlink("nested/deeper/blob", src.join("relative")).unwrap();
    symlink("/etc/passwd", src.join("absolute")).unwrap();
    fs::set_permissions(src.join("nested"), fs::Permissions::from_mode(0o700)).unwrap();
    src
}

#[test]
fn cp_round_trips_trees_and_refuses_escapes() {
    let state = shared_state();
    let (vm, _guard) = running_vm("cp");
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_tree(tmp.path());
    let src_arg = src.to_str().unwrap();

    // Host -> guest, to a new name.
    ok(&hangar(
        state,
        &["cp", src_arg, &format!("{vm}:/tmp/copied")],
    ));
    let listing = ok(&hangar(
        state,
        &[
            "exec", &vm, "--", "sh", "-c",
            "cd /tmp/copied && stat -c '%a %n' tool.sh nested && readlink relative && readlink absolute && md5sum nested/deeper/blob && cat tool.sh",
        ],
    ));
    let md5 = Command::new("md5sum")
        .arg(src.join("nested/deeper/blob"))
        .output()
        .unwrap();
    let host_md5 = text(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        listing,
        format!(
            "750 tool.sh\n700 nested\nnested/deeper/blob\n/etc/passwd\n{host_md5}  nested/deeper/blob\n#!/bin/sh\necho tool\n"
        )
    );

    // Into an existing directory: the source keeps its name.
    ok(&hangar(
        state,
        &[
            "cp",
            src.join("tool.sh").to_str().unwrap(),
            &format!("{vm}:/tmp"),
        ],
    ));
    ok(&hangar(
        state,
        &["exec", &vm, "--", "test", "-x", "/tmp/tool.sh"],
    ));

    // Guest -> host, and the tree comes back the same.
    let back = tmp.path().join("back");
    ok(&hangar(
        state,
        &["cp", &format!("{vm}:/tmp/copied"), back.to_str().unwrap()],
    ));
    assert_eq!(mode(&back.join("tool.sh")), 0o750);
    assert_eq!(mode(&back.join("nested")), 0o700);
    assert_eq!(
        fs::read_link(back.join("absolute")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read(back.join("nested/deeper/blob")).unwrap(),
        fs::read(src.join("nested/deeper/blob")).unwrap()
    );
    assert_eq!(fs::read(back.join("empty")).unwrap(), b"");

    // A guest symlink in the destination is never followed: copying a
    // directory whose `escape/` would land through `escape -> /etc` fails
    // and writes nothing into /etc.
    ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "mkdir -p /tmp/trap/bundle && ln -s /etc /tmp/trap/bundle/escape",
        ],
    ));
    let bundle = tmp.path().join("bundle");
    fs::create_dir_all(bundle.join("escape")).unwrap();
    fs::write(bundle.join("escape/pwned"), "x").unwrap();
    let refused = hangar(
        state,
        &["cp", bundle.to_str().unwrap(), &format!("{vm}:/tmp/trap")],
    );
    assert_eq!(refused.status.code(), Some(125));
    assert!(
        text(&refused.stderr)
            .contains("would be written through the symlink /tmp/trap/bundle/escape"),
        "{}",
        text(&refused.stderr)
    );
    let pwned = hangar(state, &["exec", &vm, "--", "test", "-e", "/etc/pwned"]);
    assert_eq!(
        pwned.status.code(),
        Some(1),
        "nothing was written into /etc"
    );

    // What a guest sends is not trusted: setuid bits are dropped on the host.
    ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "echo x > /tmp/suid && chmod 4755 /tmp/suid",
        ],
    ));
    let suid = tmp.path().join("suid");
    ok(&hangar(
        state,
        &["cp", &format!("{vm}:/tmp/suid"), suid.to_str().unwrap()],
    ));
    assert_eq!(mode(&suid), 0o755);

    // Mistakes name the fix and change nothing.
    let missing = hangar(
        state,
        &[
            "cp",
            &format!("{vm}:/no/such"),
            tmp.path().join("x").to_str().unwrap(),
        ],
    );
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        text(&missing.stderr).contains("/no/such does not exist"),
        "{}",
        text(&missing.stderr)
    );
    assert!(!tmp.path().join("x").exists());
    let no_parent = hangar(state, &["cp", src_arg, &format!("{vm}:/no/such/dir")]);
    assert!(
        text(&no_parent.stderr).contains("the destination's directory /no/such does not exist"),
        "{}",
        text(&no_parent.stderr)
    );
    let both_host = hangar(state, &["cp", src_arg, "/tmp/elsewhere"]);
    assert!(text(&both_host.stderr).contains("one side must be in a VM"));
    let no_source = hangar(state, &["cp", "/no/such/file", &format!("{vm}:/tmp")]);
    assert!(
        text(&no_source.stderr).contains("/no/such/file does not exist"),
        "{}",
        text(&no_source.stderr)
    );
}

/// The agent as an ordinary service (what a disk image with its own init
/// runs): PID 1 leaves port 1 free (`hangar.ports=1`), a second agent is
/// started in the guest as a plain process on that port, and a host
/// session through it runs commands and copies files.
#[test]
fn the_agent_runs_as_a_service_too() {
    use hangar::guest::{AgentClient, CollectSink, ExecEvent};

    let state = shared_state();
    let vm = unique("service");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--kernel-arg", "hangar.ports=1"],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    ok(&hangar(state, &["start", &vm]));
    // The binary a disk image would carry: exported, copied in, started as
    // an ordinary process.
    let tmp = tempfile::tempdir().unwrap();
    let exported = tmp.path().join("hangar-agent");
    ok(&hangar(state, &["agent", "-o", exported.to_str().unwrap()]));
    ok(&hangar(
        state,
        &[
            "cp",
            exported.to_str().unwrap(),
            &format!("{vm}:/tmp/hangar-agent"),
        ],
    ));
    ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "setsid /tmp/hangar-agent --port 1 </dev/null >/tmp/service.log 2>&1 & echo $! > /tmp/service.pid",
        ],
    ));
    let record = inspect(state, &vm);
    let port1 = record["sockets"]["agent_extra"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let mut check = || Ok(());
    let mut client =
        AgentClient::connect(Path::new(&port1), Duration::from_secs(30), &mut check).unwrap();
    assert_eq!(client.facts().hostname, vm);

    let mut sink = CollectSink::default();
    let request = hangar::ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo $PPID; cat /tmp/service.pid".into(),
        ],
        ..Default::default()
    };
    let status = client.exec(request, &mut sink, &mut check).unwrap();
    assert_eq!(status, hangar::ExitStatus::Code(0));
    let out = text(&sink.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_ne!(
        lines[0], "1",
        "the command's parent is the service, not PID 1"
    );
    assert_eq!(lines[0], lines[1], "the service agent ran the command");

    // The streaming form: events one at a time, stdout and stderr apart.
    let request = hangar::ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo one; echo two >&2; exit 4".into(),
        ],
        ..Default::default()
    };
    let mut stream = client.start_exec(request, Default::default()).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match stream.next_event(&mut check).unwrap() {
            Some(ExecEvent::Stdout(chunk)) => out.extend(chunk),
            Some(ExecEvent::Stderr(chunk)) => err.extend(chunk),
            Some(ExecEvent::Exited(status)) => break status,
            None => {}
        }
    };
    drop(stream);
    assert_eq!(
        (out, err, status),
        (
            b"one\n".to_vec(),
            b"two\n".to_vec(),
            hangar::ExitStatus::Code(4)
        )
    );

    fs::write(tmp.path().join("note"), "via service").unwrap();
    client
        .copy_in(&tmp.path().join("note"), "/tmp/note", &mut check)
        .unwrap();
    let note = ok(&hangar(state, &["exec", &vm, "--", "cat", "/tmp/note"]));
    assert_eq!(note, "via service");
}

/// vsock: where the host has /dev/vhost-vsock a VM gets a vsock device and
/// sessions use it; where it has none (this CI machine), `--vsock` is
/// refused with the reason and nothing is created. Either way the guest
/// side is exercised: with `hangar.vsock=1` the agent loads the vsock
/// modules and listens, and the VM still answers over virtio-serial.
#[test]
fn vsock_is_used_where_the_host_has_it_and_refused_clearly_where_not() {
    let state = shared_state();
    let name = unique("vsock");
    let created = hangar(state, &["create", "--name", &name, "--vsock"]);
    if Path::new("/dev/vhost-vsock").exists() {
        ok(&created);
        let _guard = VmGuard {
            state,
            name: name.clone(),
        };
        ok(&hangar(state, &["start", &name]));
        let record = inspect(state, &name);
        assert_eq!(record["sockets"]["agent_vsock"]["transport"], "vsock");
        assert_eq!(
            ok(&hangar(state, &["exec", &name, "--", "echo", "hi"])),
            "hi\n"
        );
    } else {
        assert_eq!(created.status.code(), Some(125));
        assert!(
            text(&created.stderr).contains("no /dev/vhost-vsock"),
            "{}",
            text(&created.stderr)
        );
        let ps = ok(&hangar(state, &["ps", "-a", "--json"]));
        assert!(!ps.contains(&name), "nothing recorded: {ps}");
    }

    let vm = unique("vsock-guest");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--kernel-arg", "hangar.vsock=1"],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    ok(&hangar(state, &["start", &vm]));
    let logs = ok(&hangar(state, &["logs", &vm]));
    assert!(
        logs.contains("hangar-agent: listening on vsock port 1024"),
        "{logs}"
    );
    let modules = ok(&hangar(state, &["exec", &vm, "--", "cat", "/proc/modules"]));
    assert!(modules.contains("vmw_vsock_virtio_transport "), "{modules}");
}

/// User-mode networking: a published port on 127.0.0.1 reaches a server
/// in the guest; the guest has its address, and the record its MAC (from
/// the id) and the host port the OS picked.
#[test]
fn a_published_port_reaches_a_server_in_the_guest() {
    use std::net::TcpStream;

    let state = shared_state();
    let vm = unique("net");
    ok(&hangar(state, &["create", "--name", &vm, "-p", "8080"]));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    ok(&hangar(state, &["start", &vm]));
    let record = inspect(state, &vm);
    let id = record["id"].as_str().unwrap();
    let mac = record["mac"].as_str().unwrap().replace(':', "");
    assert_eq!(&mac[2..], &id[2..], "the MAC is the id");
    let port = record["ports"][0]["host"].as_u64().unwrap() as u16;
    assert_ne!(port, 0);
    assert_eq!(record["ports"][0]["guest"], 8080);
    let addresses = record["guest"]["addresses"].to_string();
    assert!(addresses.contains("eth0 10.0.2.15/24"), "{addresses}");
    // Loopback is up (IFF_UP | IFF_LOOPBACK).
    let lo = ok(&hangar(
        state,
        &["exec", &vm, "--", "cat", "/sys/class/net/lo/flags"],
    ));
    assert_eq!(lo.trim(), "0x9");

    ok(&hangar(
        state,
        &[
            "exec", &vm, "--", "sh", "-c",
            "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
        ],
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut conn = TcpStream::connect(("127.0.0.1", port))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            conn.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) if reply.contains("hello-from-guest") => break reply,
            other => assert!(
                Instant::now() < deadline,
                "no answer through 127.0.0.1:{port}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.starts_with("HTTP/1."), "{body}");

    // Bad forwards are refused before anything exists.
    let bad = hangar(
        state,
        &["create", "--name", &unique("badnet"), "-p", "80:0"],
    );
    assert_eq!(bad.status.code(), Some(125));
    assert!(
        text(&bad.stderr).contains("port forward 80:0 is invalid: the guest port must be 1-65535"),
        "{}",
        text(&bad.stderr)
    );
}

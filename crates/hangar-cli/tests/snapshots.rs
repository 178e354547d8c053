//! Snapshots on real VMs: a guest's files and processes survive snapshot
//! and restore; forks get their own hostname, machine-id and MAC, reach the
//! host through their network and do not see each other's writes; a disk
//! VM's snapshot freezes its disk while the VM writes on; export, rm,
//! import, restore; bad archives refused.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::io::Write;
use std::path::Path;

use common::images::add_ext4_bundle;
use common::*;

fn snapshot_guard<'a>(state: &'a Path, name: &str) -> SnapshotGuard<'a> {
    SnapshotGuard {
        state,
        name: name.to_owned(),
    }
}

fn exec(state: &Path, vm: &str, script: &str) -> String {
    let out = hangar(state, &["exec", vm, "--", "sh", "-c", script]);
    if !out.status.success() {
        // What the record says of the VM's end: the guard removes it.
        let record = hangar(state, &["inspect", vm, "--json"]);
        panic!(
            "exec in {vm} failed: {}\nrecord: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&record.stdout)
        );
    }
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_restored_vm_has_the_files_and_processes_of_its_snapshot() {
    let state = shared_state();
    let vm = unique("snap-src");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--network", "user"],
    ));
    let _vm = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    // A counter process in the background, and a file.
    exec(
        state,
        &vm,
        "echo kept > /root/file; (i=0; while true; do i=$((i+1)); echo $i > /root/count; sleep 1; done) </dev/null >/dev/null 2>&1 & echo $! > /root/counter.pid",
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Capitals are allowed in snapshot names; the forks' names made from
    // it are lowercase (VM names and hostnames are).
    let snap = unique("Warm");
    let _snap = snapshot_guard(state, &snap);
    ok(&hangar(
        state,
        &[
            "snapshot",
            "create",
            &vm,
            "--name",
            &snap,
            "--description",
            "a warm guest",
        ],
    ));
    // The source runs on, and its later writes are not in the snapshot.
    exec(state, &vm, "echo later > /root/later");
    let listed = ok(&hangar(state, &["snapshot", "ls"]));
    assert!(
        listed.contains(&snap) && listed.contains("a warm guest"),
        "{listed}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["snapshot", "inspect", &snap]))).unwrap();
    assert_eq!(record["memory"], "file", "{record}");
    assert_eq!(record["source"]["name"], vm.as_str());
    assert_eq!(record["resources"]["memory"], 256 << 20, "{record}");

    let restored = unique("restored");
    ok(&hangar(
        state,
        &[
            "restore",
            &snap,
            "--name",
            &restored,
            "--hostname",
            "phoenix",
        ],
    ));
    let _restored = VmGuard::new(state, &restored);
    // Its network works: slirp's gateway is the host's loopback, where a
    // server of this test answers.
    let server = http::serve(vec![(
        "/hello",
        http::Reply::Body(b"reached the host\n".to_vec()),
    )]);
    let port = server.rsplit(':').next().unwrap();
    // nc with a bound on the connect: the image's busybox wget crashes
    // given -T, and without it would wait minutes on a broken network
    // (a stall after the connect ends at hangar's command timeout). Its
    // errors are in the output the assertion shows.
    let reach = format!(
        "printf 'GET /hello HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.0.2.2 {port} 2>&1 | tail -n 3"
    );
    let reached = exec(state, &restored, &reach);
    assert_eq!(
        reached.lines().last(),
        Some("reached the host"),
        "{restored}: {reached}"
    );
    let seen = exec(
        state,
        &restored,
        "cat /root/file; ls /root; kill -0 $(cat /root/counter.pid) && echo counter-alive; a=$(cat /root/count); sleep 2.5; b=$(cat /root/count); [ $b -gt $a ] && echo counting; hostname",
    );
    assert!(seen.contains("kept"), "{seen}");
    assert!(
        !seen.contains("later"),
        "a write after the snapshot leaked: {seen}"
    );
    assert!(
        seen.contains("counter-alive") && seen.contains("counting"),
        "{seen}"
    );
    assert!(seen.trim_end().ends_with("phoenix"), "{seen}");
    // Its clock is the host's, not the snapshot's.
    let guest_time: i64 = exec(state, &restored, "date +%s").trim().parse().unwrap();
    let host_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_time - host_time).abs() <= 5,
        "guest {guest_time} host {host_time}"
    );
    let info = inspect(state, &restored);
    assert_eq!(info["state"], "running");
    assert_eq!(info["guest"]["hostname"], "phoenix");

    // Fork 3: distinct identities, private writes.
    let forked = ok(&hangar(state, &["fork", &snap, "--count", "3"]));
    let forks: Vec<String> = forked.lines().map(str::to_owned).collect();
    let _forks: Vec<_> = forks.iter().map(|f| VmGuard::new(state, f)).collect();
    assert_eq!(forks.len(), 3, "{forked}");
    for (n, fork) in forks.iter().enumerate() {
        assert_eq!(*fork, format!("{}-fork-{}", snap.to_lowercase(), n + 1));
    }
    let mut identities = std::collections::BTreeSet::new();
    for fork in &forks {
        let seen = exec(
            state,
            fork,
            &format!("echo {fork} > /root/mine; ls /root; hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address"),
        );
        for other in forks.iter().filter(|f| *f != fork) {
            assert!(
                !seen.contains(other.as_str()),
                "{fork} sees {other}'s write: {seen}"
            );
        }
        assert!(
            seen.contains(&format!("\n{fork}\n")),
            "hostname of {fork}: {seen}"
        );
        let mut lines = seen.lines().rev();
        let mac = lines.next().unwrap().to_owned();
        let machine_id = lines.next().unwrap().to_owned();
        assert_eq!(inspect(state, fork)["mac"], mac.as_str(), "{fork}");
        // The network follows the new MAC: eth0's IPv6 addresses (the
        // link-local one at once) carry its EUI-64, none the source's.
        let inet6 = exec(state, fork, "grep ' eth0$' /proc/net/if_inet6 || true");
        let iid = eui64(&mac);
        assert!(
            inet6
                .lines()
                .any(|l| l.starts_with(&format!("fe80000000000000{iid}"))),
            "{fork} has no link-local address from {mac}: {inet6}"
        );
        for line in inet6.lines() {
            assert_eq!(
                line.get(16..32),
                Some(iid.as_str()),
                "{fork} ({mac}): {inet6}"
            );
        }
        let reached = exec(state, fork, &reach);
        assert_eq!(
            reached.lines().last(),
            Some("reached the host"),
            "{fork} ({mac}): {reached}"
        );
        assert!(identities.insert(mac), "{seen}");
        assert!(identities.insert(machine_id), "{seen}");
    }
    // Each one's write stays its own, after all three wrote.
    for fork in &forks {
        assert_eq!(exec(state, fork, "cat /root/mine").trim(), fork.as_str());
    }
    // A restored VM runs on the snapshot's memory: its own snapshot carries
    // the RAM in the state stream, and restores like any other.
    let again = unique("again");
    let _again = snapshot_guard(state, &again);
    ok(&hangar(
        state,
        &["snapshot", "create", &restored, "--name", &again],
    ));
    let record: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["snapshot", "inspect", &again]))).unwrap();
    assert_eq!(record["memory"], "stream", "{record}");
    let third = unique("third");
    ok(&hangar(state, &["restore", &again, "--name", &third]));
    let _third = VmGuard::new(state, &third);
    assert_eq!(exec(state, &third, "cat /root/file").trim(), "kept");
    // Snapshots of running guests only; resources never shrink (growing
    // is tests/snapshot_growth.rs).
    let refused = hangar(state, &["restore", &snap, "--memory", "128M"]);
    assert_eq!(refused.status.code(), Some(125), "{refused:?}");
    assert!(
        text(&refused.stderr).contains("cannot give any back"),
        "{}",
        text(&refused.stderr)
    );
    ok(&hangar(state, &["stop", &restored]));
    let refused = hangar(state, &["snapshot", "create", &restored]);
    assert!(
        text(&refused.stderr).contains("is stopped: cannot snapshot it"),
        "{}",
        text(&refused.stderr)
    );
    // A restored VM starts cold later, from the snapshot's boot.
    ok(&hangar(state, &["start", &restored]));
    assert!(exec(state, &restored, "hostname").contains(&restored));
}

#[test]
fn a_disk_snapshot_freezes_the_disk_and_the_vm_writes_on() {
    let state = shared_state();
    let dir = scratch("snap-disk");
    let image = add_ext4_bundle(state, &dir, &unique("snapdisk"));
    let vm = unique("disk-src");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--image", &image],
    ));
    let _vm = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    exec(state, &vm, "echo one > /root/one; sync");
    let first = unique("disk-1");
    let _first = snapshot_guard(state, &first);
    ok(&hangar(
        state,
        &["snapshot", "create", &vm, "--name", &first],
    ));
    exec(state, &vm, "echo two > /root/two; sync");
    let second = unique("disk-2");
    let _second = snapshot_guard(state, &second);
    ok(&hangar(
        state,
        &["snapshot", "create", &vm, "--name", &second],
    ));
    exec(state, &vm, "echo three > /root/three; sync");

    // The image is pinned by the snapshots; snapshot 1 by snapshot 2 and
    // by the VM's disk chain.
    let refused = hangar(state, &["image", "rm", &image]);
    assert!(
        text(&refused.stderr).contains(&format!("snapshot {first}")),
        "{}",
        text(&refused.stderr)
    );
    let refused = hangar(state, &["snapshot", "rm", &first]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains(&format!("snapshot {second}")),
        "{}",
        text(&refused.stderr)
    );

    let from_first = unique("from-1");
    ok(&hangar(state, &["restore", &first, "--name", &from_first]));
    let _from_first = VmGuard::new(state, &from_first);
    assert_eq!(
        exec(state, &from_first, "ls /root")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["one"]
    );
    exec(state, &from_first, "echo mine > /root/mine; sync");
    // The source keeps everything across a cold restart.
    ok(&hangar(state, &["restart", &vm]));
    assert_eq!(
        exec(state, &vm, "ls /root")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["one", "three", "two"]
    );
    let refused = hangar(state, &["snapshot", "rm", &second]);
    assert!(
        text(&refused.stderr).contains(&format!("VM {vm}")),
        "{}",
        text(&refused.stderr)
    );

    // Export the second (its whole chain), remove it, import, restore.
    let archive = dir.join("second.tar.zst");
    ok(&hangar(
        state,
        &[
            "snapshot",
            "export",
            &second,
            "-o",
            archive.to_str().unwrap(),
        ],
    ));
    let forced = hangar(state, &["snapshot", "rm", "--force", &second]);
    ok(&forced);
    // --force says what it breaks.
    assert!(
        text(&forced.stderr).contains(&format!("VM {vm}"))
            && text(&forced.stderr).contains("can no longer start"),
        "{}",
        text(&forced.stderr)
    );
    let imported = unique("imported");
    let _imported = snapshot_guard(state, &imported);
    ok(&hangar(
        state,
        &[
            "snapshot",
            "import",
            archive.to_str().unwrap(),
            "--name",
            &imported,
        ],
    ));
    let back = unique("back");
    ok(&hangar(state, &["restore", &imported, "--name", &back]));
    let _back = VmGuard::new(state, &back);
    assert_eq!(
        exec(state, &back, "ls /root")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["one", "two"]
    );

    // Bad archives leave nothing (other tests add snapshots meanwhile:
    // look for this one's name and for folders without a record).
    let bytes = std::fs::read(&archive).unwrap();
    let truncated = dir.join("truncated.tar.zst");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let tampered = dir.join("tampered.tar.zst");
    std::fs::write(&tampered, tamper(&bytes)).unwrap();
    let newer = dir.join("newer.tar.zst");
    std::fs::write(&newer, newer_format_archive()).unwrap();
    for (path, expected) in [
        (&truncated, "truncated"),
        (&tampered, "checksum mismatch"),
        (&newer, "archive format 99 is newer"),
    ] {
        let refused = hangar(
            state,
            &[
                "snapshot",
                "import",
                path.to_str().unwrap(),
                "--name",
                "nope",
            ],
        );
        assert_eq!(refused.status.code(), Some(125), "{refused:?}");
        let message = text(&refused.stderr);
        assert!(
            message.contains(expected) && message.contains("nothing was imported"),
            "{message}"
        );
    }
    let listed = ok(&hangar(state, &["snapshot", "ls", "--json"]));
    assert!(!listed.contains("\"nope\""), "{listed}");
    for folder in std::fs::read_dir(state.join("snapshots-v1")).unwrap() {
        let folder = folder.unwrap().path();
        // Another test's snapshot may be under way: it gets its record
        // (or goes) within seconds; a leftover never does.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while folder.is_dir() && !folder.join("snapshot.json").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} was left",
                folder.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// The archive with one byte of the RAM member changed and the zstd frame
/// rebuilt, so only the member's sha256 can tell.
fn tamper(archive: &[u8]) -> Vec<u8> {
    let plain = zstd::decode_all(archive).unwrap();
    let mut tar = tar::Archive::new(plain.as_slice());
    let mut offset = None;
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("state") {
            offset = Some(entry.raw_file_position() as usize + 100);
        }
    }
    let mut plain = plain.clone();
    plain[offset.unwrap()] ^= 0xff;
    zstd::encode_all(plain.as_slice(), 1).unwrap()
}

/// An archive whose envelope says format 99.
fn newer_format_archive() -> Vec<u8> {
    let envelope = br#"{"format": 99, "snapshot": {}, "members": []}"#;
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(envelope.len() as u64);
    header.set_mode(0o600);
    builder
        .append_data(&mut header, "snapshot.json", &envelope[..])
        .unwrap();
    let plain = builder.into_inner().unwrap();
    let mut encoder = zstd::Encoder::new(Vec::new(), 1).unwrap();
    encoder.write_all(&plain).unwrap();
    encoder.finish().unwrap()
}

/// The IPv6 interface id Linux derives from a MAC (EUI-64, universal/local
/// bit flipped), as /proc/net/if_inet6 spells it.
fn eui64(mac: &str) -> String {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|part| u8::from_str_radix(part, 16).unwrap())
        .collect();
    assert_eq!(bytes.len(), 6, "{mac}");
    let id = [
        bytes[0] ^ 2,
        bytes[1],
        bytes[2],
        0xff,
        0xfe,
        bytes[3],
        bytes[4],
        bytes[5],
    ];
    id.iter().map(|b| format!("{b:02x}")).collect()
}

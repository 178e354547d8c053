//! cloud-init NoCloud seeds on a real VM: Hangar writes the seed (ISO 9660
//! `cidata`, no external tool), attaches it on the first boot only, and the
//! guest's kernel reads it. The password reaches the seed and nothing else.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHangarSeedTestKey000000000000000000000 test@hangar";
const PASSWORD: &str = "correct horse: battery {staple}";

/// Reads the seed from inside the guest (the default image carries isofs
/// without loading it).
const READ_SEED: &str = "for m in $(cat /hangar/modules-optional); do insmod $m; done; \
    mkdir -p /seed && mount -t iso9660 -o ro /dev/vda /seed && \
    ls /seed && cat /seed/meta-data /seed/network-config /seed/user-data";

#[test]
fn a_seed_is_read_by_the_guest_on_the_first_boot_only() {
    let state = shared_state();
    let vm = unique("seeded");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("seed-key"));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("id.pub");
    std::fs::write(&key_file, format!("# a comment\n{KEY}\n")).unwrap();

    let mut create = Command::new(hangar_bin())
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "create",
            "--name",
            &vm,
        ])
        .args(["--cloud-user", "alice", "--hostname", "seeded-host"])
        .args(["--ssh-key", key_file.to_str().unwrap()])
        .args(["--network", "user"])
        .args([
            "--ip",
            "10.0.2.50/24",
            "--gateway",
            "10.0.2.2",
            "--dns",
            "10.0.2.3",
        ])
        .arg("--password-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(create.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let created = create.wait_with_output().unwrap();
    ok(&created);
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };

    // The record and the store never see the password; the seed is 0600.
    let record = inspect(state, &vm);
    assert!(!record.to_string().contains("battery"), "{record}");
    for db in ["hangar.db", "hangar.db-wal"] {
        let bytes = std::fs::read(state.join(db)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("battery"),
            "{db} holds the password"
        );
    }
    let work_dir = std::path::PathBuf::from(record["work_dir"].as_str().unwrap());
    let seed = work_dir.join("seed.iso");
    assert_eq!(
        std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777,
        0o600
    );

    ok(&hangar(state, &["start", &vm]));
    let seen = ok(&hangar(state, &["exec", &vm, "--", "sh", "-c", READ_SEED]));
    let files: Vec<&str> = seen.lines().take(3).collect();
    assert_eq!(
        files,
        ["meta-data", "network-config", "user-data"],
        "{seen}"
    );
    for expected in [
        "instance-id: ",
        "local-hostname: seeded-host",
        "macaddress: ",
        "- 10.0.2.50/24",
        "via: 10.0.2.2",
        "#cloud-config",
        "name: alice",
        KEY,
        PASSWORD,
    ] {
        assert!(
            seen.contains(expected),
            "{expected:?} not in the seed:\n{seen}"
        );
    }
    let mac = record["mac"].as_str().unwrap();
    assert!(
        seen.contains(mac),
        "the seed matches the NIC by its MAC {mac}:\n{seen}"
    );
    // Up once: the seed (with the password) is gone from the host.
    assert!(!seed.exists(), "the seed outlived the first boot");

    // Later boots have no seed.
    ok(&hangar(state, &["restart", &vm]));
    let disks = ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "ls /dev/vd* 2>/dev/null; true",
        ],
    ));
    assert_eq!(
        disks, "",
        "a disk is attached after the first boot: {disks}"
    );
}

#[test]
fn bad_seed_values_create_nothing() {
    let state = shared_state();
    let vm = unique("bad-seed");
    for (args, expected) in [
        (
            vec!["--ip", "10.0.2.50/24"],
            "a static address needs a network device; add --network user",
        ),
        (
            vec!["--hostname", "under_score"],
            "cloud-init hostname \"under_score\" is not a valid host name",
        ),
        (vec!["--cloud-user", "Root"], "cloud-init user \"Root\""),
        (
            vec!["--disk", "3G"],
            "--disk applies to disk images only (--image disk:NAME)",
        ),
        (
            vec!["--image", "disk:not-added"],
            "disk image not-added is not stored; add it with `hangar image add FILE|URL`",
        ),
        (
            vec!["--network", "user", "--ip", "10.0.2.50"],
            "cloud-init address \"10.0.2.50\" needs a prefix length",
        ),
    ] {
        let mut full = vec!["create", "--name", vm.as_str()];
        full.extend(args);
        let out = hangar(state, &full);
        assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
    }
    let out = hangar(state, &["inspect", &vm]);
    assert!(!out.status.success(), "{vm} was created");
}

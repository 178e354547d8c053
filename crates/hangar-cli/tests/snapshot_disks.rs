//! Snapshots of VMs with data disks, on real VMs: the disks Hangar made
//! (`--data-disk`) are frozen with the root in the same instant, a
//! restore and each fork write on layers of their own above the frozen
//! one, a snapshot of a restored VM chains onto it and travels in an
//! archive; a host file attached as it is (`--attach-disk`) is refused.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;

use common::*;

/// The first 512-byte sector of the VM's only disk, `/dev/vda`, up to its
/// first NUL.
fn first_sector(state: &Path, vm: &str) -> String {
    sh(state, vm, "head -c 512 /dev/vda | tr -d '\\000'")
}

/// Writes `text` (a word) as the disk's first sector, flushed.
fn write_sector(state: &Path, vm: &str, text: &str) {
    sh(
        state,
        vm,
        &format!("echo {text} | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null"),
    );
}

fn snapshot_names(state: &Path) -> Vec<String> {
    let out = ok(&hangar(state, &["snapshot", "ls", "--json"]));
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn data_disks_are_frozen_with_the_snapshot_and_each_copy_writes_its_own() {
    let state = shared_state();
    let vm = unique("disks-src");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--data-disk", "64M"],
    ));
    let _vm = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    write_sector(state, &vm, "saved");
    let snap = unique("disks");
    let _snap = take_snapshot(state, &vm, &snap);
    // The source writes on in a new layer; the snapshot keeps "saved".
    write_sector(state, &vm, "source-after");
    let record = ok(&hangar(state, &["snapshot", "inspect", &snap]));
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["boot"]["data_disks"][0]["path"], "data-0.qcow2");
    let source = inspect(state, &vm);
    let layer = source["data_layers"]["0"].as_str().unwrap();
    assert!(layer.starts_with("data-0-"), "{source}");

    let restored = unique("disks-restored");
    ok(&hangar(state, &["restore", &snap, "--name", &restored]));
    let _restored = VmGuard::new(state, &restored);
    assert_eq!(first_sector(state, &restored).trim(), "saved");
    write_sector(state, &restored, "restored-own");

    ok(&hangar(state, &["fork", &snap, "--count", "2"]));
    let forks = [format!("{snap}-fork-1"), format!("{snap}-fork-2")];
    let _forks: Vec<_> = forks.iter().map(|f| VmGuard::new(state, f)).collect();
    for fork in &forks {
        assert_eq!(first_sector(state, fork).trim(), "saved", "{fork}");
        write_sector(state, fork, fork);
    }
    // Nobody sees another's writes.
    for fork in &forks {
        assert_eq!(first_sector(state, fork).trim(), fork.as_str());
    }
    assert_eq!(first_sector(state, &restored).trim(), "restored-own");
    assert_eq!(first_sector(state, &vm).trim(), "source-after");

    // A snapshot of the restored VM chains onto the first; the chain
    // travels in an archive and comes back as a snapshot of its own.
    let second = unique("disks-second");
    let _second = take_snapshot(state, &restored, &second);
    let out = hangar(state, &["snapshot", "rm", &snap]);
    assert!(!out.status.success(), "the second snapshot builds on it");
    let archive = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{second}.tar.zst"));
    let archive_arg = archive.to_str().unwrap();
    ok(&hangar(
        state,
        &["snapshot", "export", &second, "-o", archive_arg],
    ));
    let imported = unique("disks-imported");
    let _imported = SnapshotGuard {
        state,
        name: imported.clone(),
    };
    ok(&hangar(
        state,
        &["snapshot", "import", archive_arg, "--name", &imported],
    ));
    let _ = std::fs::remove_file(&archive);
    let back = unique("disks-back");
    ok(&hangar(state, &["restore", &imported, "--name", &back]));
    let _back = VmGuard::new(state, &back);
    assert_eq!(first_sector(state, &back).trim(), "restored-own");
    // A cold start goes on from the VM's own layer.
    write_sector(state, &back, "before-restart");
    ok(&hangar(state, &["stop", &back]));
    ok(&hangar(state, &["start", &back]));
    assert_eq!(first_sector(state, &back).trim(), "before-restart");
}

#[test]
fn a_host_file_attached_as_it_is_is_refused_and_nothing_is_made() {
    let state = shared_state();
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.raw", unique("attached")));
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let vm = unique("disks-host");
    let attach = file.to_str().unwrap();
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--attach-disk", attach],
    ));
    let _vm = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    let before = snapshot_names(state);
    let snap = unique("never");
    let out = hangar(state, &["snapshot", "create", &vm, "--name", &snap]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--attach-disk") && text(&out.stderr).contains("--data-disk"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(snapshot_names(state), before);
    // The VM runs on, untouched.
    sh(state, &vm, "true");
}

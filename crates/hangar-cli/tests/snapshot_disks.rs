//! Snapshots of VMs with data disks, on real VMs: the disks Hangar made
//! (`--data-disk`) are frozen with the root disk in the same instant, a
//! restore and each fork write on layers of their own above the frozen
//! ones, a snapshot of a restored VM chains onto it and travels in an
//! archive; a host file attached as it is (`--attach-disk`) is refused.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;

use common::images::add_ext4_bundle;
use common::*;

/// The data disk (the root disk is vda) and a file on the root disk.
const DATA_DISK: &str = "/dev/vdb";
const ROOT_FILE: &str = "/root/mark";

/// The data disk's first 512-byte sector up to its first NUL, and the
/// root disk's file, read from the disks: the guest's page cache (which a
/// restore brings back with its RAM) is dropped first.
fn marks(state: &Path, vm: &str) -> (String, String) {
    let out = sh(
        state,
        vm,
        &format!(
            "sync; echo 3 > /proc/sys/vm/drop_caches; head -c 512 {DATA_DISK} | tr -d '\\000'; cat {ROOT_FILE}"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    (lines[0].to_owned(), lines[1].to_owned())
}

/// Writes `text` (a word) as the data disk's first sector and into the
/// root disk's file, both flushed.
fn mark(state: &Path, vm: &str, text: &str) {
    sh(
        state,
        vm,
        &format!(
            "echo {text} | dd of={DATA_DISK} bs=512 count=1 conv=sync,fsync 2>/dev/null && echo {text} > {ROOT_FILE} && sync"
        ),
    );
}

/// A bundle VM with a 64M data disk (the root disk is vda, the data disk
/// vdb), started, with "saved" written to both disks.
fn started_with_marks<'a>(state: &'a Path, dir: &Path, prefix: &str) -> VmGuard<'a> {
    let image = add_ext4_bundle(state, dir, &unique(&format!("{prefix}-image")));
    let vm = unique(prefix);
    ok(&hangar(
        state,
        &[
            "create",
            "--name",
            &vm,
            "--image",
            &image,
            "--data-disk",
            "64M",
        ],
    ));
    let guard = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    mark(state, &vm, "saved");
    guard
}

fn same(text: &str) -> (String, String) {
    (text.to_owned(), text.to_owned())
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
    let dir = scratch("snap-disks");
    let source_guard = started_with_marks(state, &dir, "disks-src");
    let vm = source_guard.name.clone();
    let snap = unique("disks");
    let _snap = take_snapshot(state, &vm, &snap);
    // The source writes on in new layers; the snapshot keeps "saved".
    mark(state, &vm, "source-after");
    let record = ok(&hangar(state, &["snapshot", "inspect", &snap]));
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["boot"]["data_disks"][0]["path"], "data-0.qcow2");
    let source = inspect(state, &vm);
    let layer = source["data_layers"]["0"].as_str().unwrap();
    assert!(layer.starts_with("data-0-"), "{source}");
    assert!(source["root_layer"].as_str().unwrap().starts_with("root-"));

    let restored = unique("disks-restored");
    ok(&hangar(state, &["restore", &snap, "--name", &restored]));
    let _restored = VmGuard::new(state, &restored);
    assert_eq!(marks(state, &restored), same("saved"));
    mark(state, &restored, "restored-own");

    ok(&hangar(state, &["fork", &snap, "--count", "2"]));
    let forks = [format!("{snap}-fork-1"), format!("{snap}-fork-2")];
    let _forks: Vec<_> = forks.iter().map(|f| VmGuard::new(state, f)).collect();
    for fork in &forks {
        assert_eq!(marks(state, fork), same("saved"), "{fork}");
        mark(state, fork, fork);
    }
    // Nobody sees another's writes.
    for fork in &forks {
        assert_eq!(marks(state, fork), same(fork));
    }
    assert_eq!(marks(state, &restored), same("restored-own"));
    assert_eq!(marks(state, &vm), same("source-after"));

    // A fork's cold restart goes on from its own layers.
    ok(&hangar(state, &["stop", &forks[0]]));
    ok(&hangar(state, &["start", &forks[0]]));
    assert_eq!(marks(state, &forks[0]), same(&forks[0]));

    // A snapshot of the restored VM chains onto the first, which cannot go
    // while it does (nor while VMs sit on it).
    let second = unique("disks-second");
    let _second = take_snapshot(state, &restored, &second);
    let archive = dir.join(format!("{second}.tar.zst"));
    let archive_arg = archive.to_str().unwrap();
    ok(&hangar(
        state,
        &["snapshot", "export", &second, "-o", archive_arg],
    ));
    for user in forks.iter().chain([&restored, &vm]) {
        ok(&hangar(state, &["rm", "-f", user]));
    }
    let out = hangar(state, &["snapshot", "rm", &snap]);
    assert!(
        !out.status.success() && text(&out.stderr).contains(&format!("snapshot {second}")),
        "{}",
        text(&out.stderr)
    );
    // With both gone, the archive alone brings the whole chain back.
    ok(&hangar(state, &["snapshot", "rm", &second]));
    ok(&hangar(state, &["snapshot", "rm", &snap]));
    let imported = unique("disks-imported");
    let _imported = SnapshotGuard {
        state,
        name: imported.clone(),
    };
    ok(&hangar(
        state,
        &["snapshot", "import", archive_arg, "--name", &imported],
    ));
    let back = unique("disks-back");
    ok(&hangar(state, &["restore", &imported, "--name", &back]));
    let _back = VmGuard::new(state, &back);
    assert_eq!(marks(state, &back), same("restored-own"));
    // A cold start goes on from the VM's own layers.
    mark(state, &back, "before-restart");
    ok(&hangar(state, &["stop", &back]));
    ok(&hangar(state, &["start", &back]));
    assert_eq!(marks(state, &back), same("before-restart"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backing file `qemu-img` reads in a layer's header.
fn backing_of(layer: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(layer)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_snapshot_with_stop_ends_the_vm_and_its_next_start_goes_on_from_it() {
    let state = shared_state();
    let dir = scratch("snap-stop");
    let source_guard = started_with_marks(state, &dir, "stop-src");
    let vm = source_guard.name.clone();
    let snap = unique("stopped");
    let _snap = SnapshotGuard {
        state,
        name: snap.clone(),
    };
    let pid = inspect(state, &vm)["pid"].as_u64().unwrap() as u32;
    assert!(process_running(pid));
    ok(&hangar(
        state,
        &["snapshot", "create", &vm, "--name", &snap, "--stop"],
    ));
    let source = inspect(state, &vm);
    assert_eq!(source["state"], "stopped", "{source}");
    assert!(!process_running(pid), "QEMU {pid} still runs: {source}");
    // With QEMU gone, the new layers' headers were rewritten to name the
    // frozen layers inside the snapshot: the VM depends on the snapshot.
    let record: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["snapshot", "inspect", &snap]))).unwrap();
    let snapshot_id = record["id"].as_str().unwrap();
    assert_eq!(source["disk_snapshot"], snapshot_id, "{source}");
    let work_dir = Path::new(source["work_dir"].as_str().unwrap());
    for (layer, frozen) in [
        (source["root_layer"].as_str().unwrap(), "disk.qcow2"),
        (source["data_layers"]["0"].as_str().unwrap(), "data-0.qcow2"),
    ] {
        let backing = backing_of(&work_dir.join(layer));
        assert!(
            backing.ends_with(&format!("{snapshot_id}/{frozen}")),
            "{layer}: {backing}"
        );
    }
    let refused = hangar(state, &["snapshot", "rm", &snap]);
    assert!(
        text(&refused.stderr).contains(&format!("VM {vm}")),
        "{}",
        text(&refused.stderr)
    );
    // Its next start is a cold boot on its own layers above the frozen ones.
    ok(&hangar(state, &["start", &vm]));
    assert_eq!(marks(state, &vm), same("saved"));
    mark(state, &vm, "source-after");
    let restored = unique("stop-restored");
    ok(&hangar(state, &["restore", &snap, "--name", &restored]));
    let _restored = VmGuard::new(state, &restored);
    assert_eq!(marks(state, &restored), same("saved"));
    assert_eq!(marks(state, &vm), same("source-after"));
    let _ = std::fs::remove_dir_all(&dir);
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

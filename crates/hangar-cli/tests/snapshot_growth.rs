//! Restores and forks that grow a snapshot's guest, on real VMs: more
//! vCPUs and memory are plugged in after the state loads and come online,
//! the guest's processes and files are still there, a snapshot of a grown
//! VM restores grown, and shrinking or growing past the machine's room is
//! refused before anything is made.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;

use common::*;

/// Online vCPUs (the kernel's list), `nproc`, MemTotal in kB, and whether
/// the snapshot's counter process and file are there.
fn resources(state: &Path, vm: &str) -> (String, u32, u64, String) {
    let out = sh(
        state,
        vm,
        "cat /sys/devices/system/cpu/online; nproc; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; \
         kill -0 $(cat /root/counter.pid) && cat /root/file",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    (
        lines[0].to_owned(),
        lines[1].parse().unwrap(),
        lines[2].parse().unwrap(),
        lines[3].to_owned(),
    )
}

fn refused(state: &Path, args: &[&str], says: &str) {
    let out = hangar(state, args);
    assert_eq!(
        out.status.code(),
        Some(125),
        "{args:?}: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(says),
        "{args:?}: {}",
        text(&out.stderr)
    );
}

#[test]
fn restores_and_forks_grow_vcpus_and_memory_and_never_shrink() {
    let state = shared_state();
    let vm = unique("grow-src");
    ok(&hangar(state, &["create", "--name", &vm]));
    let _vm = VmGuard::new(state, &vm);
    ok(&hangar(state, &["start", &vm]));
    sh(
        state,
        &vm,
        "echo kept > /root/file; (while true; do sleep 1; done) </dev/null >/dev/null 2>&1 & echo $! > /root/counter.pid",
    );
    let snap = unique("grow");
    let _snap = take_snapshot(state, &vm, &snap);
    let (cpus, nproc, base_kb, file) = resources(state, &vm);
    assert_eq!((cpus.as_str(), nproc, file.as_str()), ("0", 1, "kept"));

    // Refused before anything is made: the VM name stays free.
    let name = unique("never");
    for (flags, says) in [
        (&["--cpus", "9"][..], "room for 8 vCPUs"),
        (&["--memory", "128M"][..], "cannot give any back"),
        (&["--memory", "300M"][..], "steps of 128M"),
        (&["--memory", "17G"][..], "room for 16G"),
    ] {
        let mut args = vec!["restore", &snap, "--name", &name];
        args.extend(flags);
        refused(state, &args, says);
    }
    assert!(!hangar(state, &["inspect", &name]).status.success());

    // Two vCPUs and 256M more: online at once, the processes still there.
    let grown = unique("grown");
    ok(&hangar(
        state,
        &[
            "restore", &snap, "--name", &grown, "--cpus", "2", "--memory", "512M",
        ],
    ));
    let _grown = VmGuard::new(state, &grown);
    let (cpus, nproc, kb, file) = resources(state, &grown);
    assert_eq!((cpus.as_str(), nproc, file.as_str()), ("0-1", 2, "kept"));
    // The DIMM's 256 MiB all count (less a little for its memory map).
    assert!(kb >= base_kb + 250 * 1024, "{kb} kB vs {base_kb} kB before");
    let record = inspect(state, &grown);
    assert_eq!(record["spec"]["cpus"], 2, "{record}");
    assert_eq!(record["machine"]["added_memory"][0], 256 << 20, "{record}");

    // A snapshot of the grown VM restores grown (its DIMM is recreated),
    // and its forks grow further.
    let snap2 = unique("grown-snap");
    let _snap2 = take_snapshot(state, &grown, &snap2);
    refused(
        state,
        &["restore", &snap2, "--name", &name, "--cpus", "1"],
        "give 2 to 8",
    );
    let again = unique("again");
    ok(&hangar(state, &["restore", &snap2, "--name", &again]));
    let _again = VmGuard::new(state, &again);
    let (cpus, _, again_kb, file) = resources(state, &again);
    assert_eq!((cpus.as_str(), file.as_str()), ("0-1", "kept"));
    assert!(again_kb.abs_diff(kb) < 8 * 1024, "{again_kb} kB vs {kb} kB");

    let forks = ok(&hangar(
        state,
        &[
            "fork", &snap2, "--count", "2", "--cpus", "3", "--memory", "640M",
        ],
    ));
    let names: Vec<String> = forks.split_whitespace().map(str::to_owned).collect();
    let _forks: Vec<_> = names.iter().map(|n| VmGuard::new(state, n)).collect();
    assert_eq!(names.len(), 2, "{forks}");
    for fork in &names {
        let (cpus, nproc, fork_kb, file) = resources(state, fork);
        assert_eq!((cpus.as_str(), nproc, file.as_str()), ("0-2", 3, "kept"));
        assert!(fork_kb >= kb + 120 * 1024, "{fork_kb} kB vs {kb} kB");
    }

    // A snapshot whose record has no machine (taken before VMs had room
    // to grow) restores with exactly its counts, and says why it cannot
    // grow.
    let record: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["snapshot", "inspect", &snap]))).unwrap();
    let file = state
        .join("snapshots-v1")
        .join(record["id"].as_str().unwrap())
        .join("snapshot.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let resources_of = saved
        .pointer_mut("/resources")
        .and_then(|r| r.as_object_mut())
        .unwrap_or_else(|| panic!("no resources in {}", file.display()));
    assert!(resources_of.remove("machine").is_some(), "{saved}");
    std::fs::write(&file, serde_json::to_vec_pretty(&saved).unwrap()).unwrap();
    refused(
        state,
        &[
            "restore", &snap, "--name", &name, "--cpus", "2", "--memory", "512M",
        ],
        "--cpus 2 --memory 512M: its VM's machine had no room to grow",
    );
    assert!(!hangar(state, &["inspect", &name]).status.success());
}

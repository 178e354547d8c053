//! Concurrency and crash safety: many hangar processes at once, and
//! `kill -9` of hangar at random points. Sizes come from the environment
//! (HANGAR_STORM, HANGAR_CRASH_NOOP, HANGAR_CRASH_QEMU, HANGAR_PARALLEL_VMS)
//! so a developer can run them bigger than CI does.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

const STORM_TIMEOUT: Duration = Duration::from_secs(300);

#[track_caller]
fn all_ok(outputs: &[std::process::Output], what: &str) {
    let failed: Vec<String> = outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.status.success())
        .map(|(i, o)| format!("#{i}: {}", text(&o.stderr)))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn a_storm_of_parallel_processes_loses_and_duplicates_nothing() {
    let n = env_count("HANGAR_STORM", 100);
    let state = scratch("storm");
    let names: Vec<String> = (0..n).map(|i| format!("vm{i}")).collect();
    let creates = names
        .iter()
        .map(|name| {
            spawn_hangar(
                &state,
                &["create", "--name", name, "--backend", "noop", "-p", "22"],
            )
        })
        .collect();
    all_ok(&wait_all(creates, STORM_TIMEOUT), "create");
    let vms = all_vms(&state);
    assert_eq!(vms.len(), n, "records after {n} parallel creates");
    let ids: BTreeSet<&str> = vms.iter().map(|v| v["id"].as_str().unwrap()).collect();
    let dirs: BTreeSet<&str> = vms
        .iter()
        .map(|v| v["work_dir"].as_str().unwrap())
        .collect();
    let got: BTreeSet<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let macs: BTreeSet<&str> = vms.iter().filter_map(|v| v["mac"].as_str()).collect();
    assert_eq!(
        (ids.len(), dirs.len(), got.len(), macs.len()),
        (n, n, n, n),
        "ids, work dirs, names and MACs are unique"
    );
    assert_eq!(work_dirs(&state).len(), n);

    let starts = names
        .iter()
        .map(|name| spawn_hangar(&state, &["start", name]))
        .collect();
    all_ok(&wait_all(starts, STORM_TIMEOUT), "start");
    assert!(all_vms(&state).iter().all(|v| v["state"] == "running"));

    let removes = names
        .iter()
        .map(|name| spawn_hangar(&state, &["rm", "-f", name]))
        .collect();
    all_ok(&wait_all(removes, STORM_TIMEOUT), "rm");
    assert!(all_vms(&state).is_empty());
    assert!(work_dirs(&state).is_empty());
    let _ = std::fs::remove_dir_all(&state);
}

/// After gc: the store opens, nothing is mid-operation, and every work dir
/// belongs to a record.
#[track_caller]
fn assert_consistent(state: &Path) {
    let vms = all_vms(state);
    for vm in &vms {
        let s = vm["state"].as_str().unwrap();
        assert!(
            !matches!(s, "starting" | "stopping"),
            "{} left {s} after gc: {vm:#}",
            vm["name"]
        );
    }
    let ids: BTreeSet<String> = vms
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let orphans: Vec<_> = work_dirs(state).difference(&ids).cloned().collect();
    assert!(orphans.is_empty(), "orphan work dirs after gc: {orphans:?}");
    let recorded: BTreeSet<u64> = vms.iter().filter_map(|v| v["pid"].as_u64()).collect();
    for pid in vmm_pids(state) {
        assert!(
            recorded.contains(&u64::from(pid)),
            "orphan VMM process {pid} after gc"
        );
    }
}

fn kill_after(mut child: std::process::Child, delay: Duration) {
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn kill_minus_9_of_hangar_at_random_points_noop() {
    let iterations = env_count("HANGAR_CRASH_NOOP", 100);
    let state = scratch("crash-noop");
    let mut rng = Lcg(0x5eed);
    for i in 0..iterations {
        let name = format!("vm{}", rng.next(4));
        let args: Vec<&str> = match rng.next(4) {
            0 => vec!["create", "--name", &name, "--backend", "noop"],
            1 => vec!["start", &name],
            2 => vec!["stop", &name],
            _ => vec!["rm", "-f", &name],
        };
        // Launch and stop take 20 ms, so kills land before, inside and after
        // the operation.
        let child = spawn_hangar_env(&state, &args, &[("HANGAR_NOOP_DELAY_MS", "20")]);
        kill_after(child, Duration::from_millis(rng.next(40)));
        // The store opens every time, whatever moment the kill hit.
        let ps = hangar(&state, &["ps", "-a", "--json"]);
        assert!(
            ps.status.success(),
            "iteration {i} ({args:?}): {}",
            text(&ps.stderr)
        );
    }
    ok(&hangar(&state, &["gc"]));
    assert_consistent(&state);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn kill_minus_9_of_hangar_during_real_vm_operations() {
    let iterations = env_count("HANGAR_CRASH_QEMU", 10);
    let state = scratch("crash-qemu");
    ok(&hangar(&state, &["create", "--name", "a"]));
    let mut rng = Lcg(0xc0ffee);
    for _ in 0..iterations {
        let args: Vec<&str> = match rng.next(4) {
            0 => vec!["run", "--", "sleep", "2"],
            1 => vec!["start", "a"],
            2 => vec!["stop", "a"],
            _ => vec!["restart", "a"],
        };
        let child = spawn_hangar(&state, &args);
        kill_after(child, Duration::from_millis(rng.next(4000)));
    }
    ok(&hangar(&state, &["gc"]));
    assert_consistent(&state);
    ok(&hangar(&state, &["rm", "-f", "a"]));
    assert!(
        vmm_pids(&state).is_empty(),
        "VMMs left after rm -f: {:?}",
        vmm_pids(&state)
    );
    assert!(work_dirs(&state).is_empty());
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn parallel_real_vms_get_their_own_everything() {
    let n = env_count("HANGAR_PARALLEL_VMS", 8);
    let state = shared_state();
    let names: Vec<String> = (0..n).map(|i| unique(&format!("par{i}"))).collect();
    let _guards: Vec<VmGuard> = names
        .iter()
        .map(|name| VmGuard {
            state,
            name: name.clone(),
        })
        .collect();
    let runs = names
        .iter()
        .map(|name| {
            spawn_hangar(
                state,
                &[
                    "run", "--keep", "--name", name, "-p", "22", "-p", "8080", "--", "hostname",
                ],
            )
        })
        .collect();
    let outputs = wait_all(runs, STORM_TIMEOUT);
    all_ok(&outputs, "run --keep");
    for (name, output) in names.iter().zip(&outputs) {
        assert_eq!(
            text(&output.stdout).trim(),
            name,
            "each guest is named after its VM"
        );
    }
    let vms: Vec<serde_json::Value> = all_vms(state)
        .into_iter()
        .filter(|v| names.iter().any(|n| v["name"] == n.as_str()))
        .collect();
    assert_eq!(vms.len(), n);
    let distinct = |field: &str| -> usize {
        vms.iter()
            .map(|v| {
                v.pointer(field)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect::<BTreeSet<_>>()
            .len()
    };
    assert!(vms.iter().all(|v| v["state"] == "running"));
    for field in [
        "/id",
        "/pid",
        "/work_dir",
        "/sockets/agent",
        "/sockets/qmp",
        "/sockets/console",
        "/mac",
        "/ports/0/host",
        "/ports/1/host",
    ] {
        assert_eq!(distinct(field), n, "{field} is unique per VM");
    }
    let host_ports: BTreeSet<u64> = vms
        .iter()
        .flat_map(|v| v["ports"].as_array().unwrap().iter())
        .map(|p| p["host"].as_u64().unwrap())
        .collect();
    assert_eq!(
        host_ports.len(),
        2 * n,
        "no host port is shared: {host_ports:?}"
    );
    assert!(!host_ports.contains(&0));
    let removes = names
        .iter()
        .map(|name| spawn_hangar(state, &["rm", "-f", name]))
        .collect();
    all_ok(&wait_all(removes, STORM_TIMEOUT), "rm -f");
    for vm in &vms {
        assert!(!process_running(vm["pid"].as_u64().unwrap() as u32));
    }
}

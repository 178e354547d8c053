//! `bench snapshot`, in one run:
//! - cold boot -> first exec (the baseline: the same 256 MiB VM with user
//!   networking that is snapshotted), restore -> first exec (as saved, and
//!   grown by a vCPU and 256 MiB), and fork N -> all ready, with the memory
//!   the forks share, each with the CPU time its VMMs used by then (and
//!   from the forks' the soonest they could all be ready on this host's
//!   cores);
//! - snapshot create time (and guest pause) and size for a 256 MiB and a
//!   1 GiB guest;
//! - the disk side for a 64 MiB and a 1 GiB root file system (it should
//!   not depend on the size).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hangar::guest::CollectSink;
use hangar::manager::{RestoreOptions, SnapshotOptions};
use hangar::{BackendKind, ByteSize, ExecRequest, Manager, VmSpec};

use super::bench::{median, ratio};
use super::open;
use crate::cli::Global;
use crate::output::print_json;

fn true_in(manager: &mut Manager, vm: &str) -> anyhow::Result<()> {
    let request = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    manager.exec(
        None,
        vm,
        request,
        Default::default(),
        &mut CollectSink::default(),
    )?;
    Ok(())
}

/// Everything the bench made, removed at the end whatever happened.
#[derive(Default)]
struct Made {
    vms: Vec<String>,
    snapshots: Vec<String>,
    bundles: Vec<String>,
}

impl Made {
    fn clean(&self, manager: &mut Manager) {
        for vm in &self.vms {
            let _ = manager.remove(None, vm, true);
        }
        for snapshot in &self.snapshots {
            let _ = manager.snapshot_remove(snapshot, true);
        }
        for bundle in &self.bundles {
            let _ = manager.remove_image(bundle);
        }
    }
}

/// What one snapshot cost.
#[derive(serde::Serialize)]
struct SnapshotCost {
    memory_mib: u64,
    disk: Option<String>,
    create_ms: u128,
    paused_ms: u64,
    own_bytes: u64,
}

pub fn snapshot(global: &Global, runs: usize, forks: usize) -> anyhow::Result<u8> {
    if runs == 0 || forks == 0 {
        bail!("--runs and --forks must be at least 1");
    }
    let mut manager = open(global)?;
    let mut made = Made::default();
    let result = measure(global, &mut manager, &mut made, runs, forks);
    made.clean(&mut manager);
    result
}

fn measure(
    global: &Global,
    manager: &mut Manager,
    made: &mut Made,
    runs: usize,
    forks: usize,
) -> anyhow::Result<u8> {
    let tag = hangar::manager::new_id()?;
    let accel = manager.accelerator()?.accel;
    // Cold boot -> first exec.
    let mut cold = Vec::new();
    let mut cold_cpu = Vec::new();
    for run in 0..runs {
        let name = format!("bench-cold-{tag}-{run}");
        made.vms.push(name.clone());
        let started = Instant::now();
        manager.create(source_spec(&name, 256), BackendKind::Qemu)?;
        let record = manager.start(None, &name)?;
        true_in(manager, &name)?;
        cold.push(started.elapsed());
        cold_cpu.push(cpu_of(record.pid)?);
        manager.remove(None, &name, true)?;
    }
    let (cold, cold_cpu) = (median(&cold), median(&cold_cpu));
    let mut costs = Vec::new();
    let (small, cost) = snapshot_of(manager, made, &tag, 256, None)?;
    costs.push(cost);
    // Restore -> first exec, as saved and grown.
    let (restore, restore_cpu) =
        restore_median(manager, made, &small, runs, &RestoreOptions::default())?;
    let grow = RestoreOptions {
        cpus: Some(2),
        memory: Some(ByteSize(512 << 20)),
        ..Default::default()
    };
    let (grown, _) = restore_median(manager, made, &small, runs, &grow)?;
    // Fork N -> all ready (their agents answered), then one exec in each.
    let started = Instant::now();
    let forked = manager.fork(&small, forks, &RestoreOptions::default())?;
    let fork = started.elapsed();
    let fork_cpu = forked
        .iter()
        .map(|vm| cpu_of(vm.pid))
        .sum::<anyhow::Result<Duration>>()?;
    made.vms.extend(forked.iter().map(|vm| vm.name.clone()));
    let started = Instant::now();
    for vm in &forked {
        true_in(manager, &vm.name)?;
    }
    let fork_execs = started.elapsed();
    let sharing = memory_of(forked.iter().filter_map(|vm| vm.pid));
    for vm in &forked {
        manager.remove(None, &vm.name, true)?;
    }
    let (_, cost) = snapshot_of(manager, made, &tag, 1024, None)?;
    costs.push(cost);
    for disk in ["64M", "1G"] {
        let bundle = bench_bundle(manager, &tag, disk)?;
        made.bundles.push(bundle.clone());
        let (_, cost) = snapshot_of(manager, made, &tag, 256, Some((&bundle, disk)))?;
        costs.push(cost);
    }
    // The forks' VMMs run side by side: on this host's cores (no more of
    // them than forks) they cannot all be ready much sooner than their
    // summed CPU time spread over them. About: the sum, read when the last
    // was ready, includes what the first ones used idling since.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sharing_cores = u32::try_from(cores.min(forks)).unwrap_or(1);
    let fork_floor = fork_cpu / sharing_cores;
    let report = serde_json::json!({
        "accelerator": accel,
        "runs": runs,
        "cold_boot_to_exec_median_ms": cold.as_millis(),
        "restore_to_exec_median_ms": restore.as_millis(),
        "restore_speedup": ratio(cold, restore),
        "cold_boot_vmm_cpu_median_ms": cold_cpu.as_millis(),
        "restore_vmm_cpu_median_ms": restore_cpu.as_millis(),
        "restore_cpu_speedup": ratio(cold_cpu, restore_cpu),
        "grown_restore_to_exec_median_ms": grown.as_millis(),
        "grown_vs_restore": ratio(grown, restore),
        "forks": forks,
        "fork_all_ready_ms": fork.as_millis(),
        "fork_then_one_exec_each_ms": fork_execs.as_millis(),
        "fork_vs_one_restore": ratio(fork, restore),
        "forks_vmm_cpu_ms": fork_cpu.as_millis(),
        "host_cores": cores,
        "fork_floor_ms": fork_floor.as_millis(),
        "forks_rss_mib": sharing.0 / 1024,
        "forks_pss_mib": sharing.1 / 1024,
        "snapshots": costs,
    });
    if global.json {
        print_json(&report)?;
        return Ok(0);
    }
    println!("accelerator: {accel} (medians of {runs} runs)");
    println!(
        "cold boot -> first exec      {:>6} ms   (VMM CPU {} ms)",
        cold.as_millis(),
        cold_cpu.as_millis()
    );
    println!(
        "restore -> first exec        {:>6} ms   {:.1}x faster than cold (goal >= 10x); VMM CPU {} ms, {:.1}x less",
        restore.as_millis(),
        ratio(cold, restore),
        restore_cpu.as_millis(),
        ratio(cold_cpu, restore_cpu)
    );
    println!(
        "restore +1 vCPU +256M -> exec {:>5} ms   {:.1}x a plain restore (vCPU and DIMM plugged in, brought online)",
        grown.as_millis(),
        ratio(grown, restore)
    );
    println!(
        "fork {forks:>2} -> all ready         {:>6} ms   {:.1}x one restore (goal <= 2x)",
        fork.as_millis(),
        ratio(fork, restore)
    );
    println!(
        "  the {forks} VMMs used {} ms of CPU: on {cores} cores they cannot all be ready much before {} ms ({:.1}x one restore)",
        fork_cpu.as_millis(),
        fork_floor.as_millis(),
        ratio(fork_floor, restore)
    );
    println!(
        "then one exec in each fork   {:>6} ms   (one after another)",
        fork_execs.as_millis()
    );
    println!(
        "the {forks} forks' memory: RSS {} MiB, PSS {} MiB (pages shared copy-on-write count once in PSS)",
        sharing.0 / 1024,
        sharing.1 / 1024
    );
    for cost in &costs {
        println!(
            "snapshot of a {:>4} MiB guest{:<20} create {:>5} ms (paused {:>4} ms)  size {:>7.1} MB",
            cost.memory_mib,
            cost.disk
                .as_deref()
                .map(|d| format!(", {d} root file system"))
                .unwrap_or_default(),
            cost.create_ms,
            cost.paused_ms,
            cost.own_bytes as f64 / 1e6
        );
    }
    Ok(0)
}

/// The medians of `runs` restores of `snapshot` with `options`, each up to
/// its first exec: the time, and the CPU its VMM used by then.
fn restore_median(
    manager: &mut Manager,
    made: &mut Made,
    snapshot: &str,
    runs: usize,
    options: &RestoreOptions,
) -> anyhow::Result<(Duration, Duration)> {
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..runs {
        let name = format!("bench-restored-{}", hangar::manager::new_id()?);
        let options = RestoreOptions {
            name: Some(name.clone()),
            ..options.clone()
        };
        let started = Instant::now();
        let record = manager.restore(snapshot, &options)?;
        made.vms.push(name.clone());
        true_in(manager, &name)?;
        times.push(started.elapsed());
        cpu.push(cpu_of(record.pid)?);
        manager.remove(None, &name, true)?;
    }
    Ok((median(&times), median(&cpu)))
}

/// The CPU time a VMM process has used so far, all its threads (user and
/// system; zero when it cannot be read). Under TCG nearly all of it is the
/// guest's code being translated and run.
fn cpu_of(pid: Option<u32>) -> anyhow::Result<Duration> {
    let pid = pid.context("the VM record has no VMM pid to read the CPU time of")?;
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // A VMM that ran a guest up to an exec has used CPU: none means the
    // line was not what this reads.
    match cpu_in_stat(&stat) {
        cpu if cpu.is_zero() => bail!("no CPU time in {path}: {stat:?}"),
        cpu => Ok(cpu),
    }
}

/// utime + stime of a `/proc/PID/stat` line.
fn cpu_in_stat(stat: &str) -> Duration {
    // The fields after the command name, which may hold spaces and
    // parentheses: state is the first, utime and stime the 12th and 13th.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    // Clock ticks are USER_HZ: 100 per second on x86-64 and arm64 Linux.
    Duration::from_millis(ticks * 10)
}

/// The VMs the bench snapshots, and (256 MiB) the ones it boots cold as
/// the baseline: the same machine both ways, with user networking (its
/// NIC gets a new MAC on every restore).
fn source_spec(name: &str, memory_mib: u64) -> VmSpec {
    let mut spec = VmSpec::new(name);
    spec.memory = ByteSize(memory_mib << 20);
    spec.network = hangar::spec::NetworkSpec::User {
        forwards: Vec::new(),
    };
    spec
}

/// A VM of `memory_mib` (on `disk`: an image and a root disk size), booted,
/// then snapshotted; returns the snapshot's name and cost.
fn snapshot_of(
    manager: &mut Manager,
    made: &mut Made,
    tag: &str,
    memory_mib: u64,
    disk: Option<(&str, &str)>,
) -> anyhow::Result<(String, SnapshotCost)> {
    let suffix = disk.map(|(_, size)| size).unwrap_or("nodisk");
    let name = format!("bench-src-{tag}-{memory_mib}-{}", suffix.to_lowercase());
    let mut spec = source_spec(&name, memory_mib);
    if let Some((image, _)) = disk {
        spec.image = hangar::manager::parse_image(image)?;
    }
    made.vms.push(name.clone());
    manager.create(spec, BackendKind::Qemu)?;
    manager.start(None, &name)?;
    // Some work since boot: 16 MB written (to the disk, when there is one).
    let request = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "dd if=/dev/zero of=/root/work bs=1M count=16 2>/dev/null; sync".into(),
        ],
        ..Default::default()
    };
    manager.exec(
        None,
        &name,
        request,
        Default::default(),
        &mut CollectSink::default(),
    )?;
    let snapshot = format!("{name}-snap");
    made.snapshots.push(snapshot.clone());
    let options = SnapshotOptions {
        name: Some(snapshot.clone()),
        ..Default::default()
    };
    let started = Instant::now();
    let record = manager.snapshot_create(None, &name, &options)?;
    let create_ms = started.elapsed().as_millis();
    let cost = SnapshotCost {
        memory_mib,
        disk: disk.map(|(_, size)| size.to_owned()),
        create_ms,
        paused_ms: record.paused_ms,
        own_bytes: manager.snapshot_store().own_bytes(&record),
    };
    Ok((snapshot, cost))
}

/// Summed RSS and PSS (KiB) of the processes, from smaps_rollup.
fn memory_of(pids: impl Iterator<Item = u32>) -> (u64, u64) {
    let mut rss = 0;
    let mut pss = 0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (key, value) = (
                words.next(),
                words.next().and_then(|v| v.parse::<u64>().ok()),
            );
            match (key, value) {
                (Some("Rss:"), Some(v)) => rss += v,
                (Some("Pss:"), Some(v)) => pss += v,
                _ => {}
            }
        }
    }
    (rss, pss)
}

/// A bundle with the default kernel and a busybox ext4 root of `size`: a VM
/// with a root disk to snapshot.
fn bench_bundle(manager: &mut Manager, tag: &str, size: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir().context("scratch dir")?;
    let tree = dir.path().join("tree");
    for sub in ["bin", "etc", "root", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("/bin/busybox (apt-get install busybox-static)")?;
    for applet in ["sh", "true", "dd", "sync"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    let kernel = manager.default_image()?.kernel;
    std::fs::copy(&kernel, dir.path().join("vmlinux"))?;
    let rootfs = dir.path().join("rootfs.ext4");
    // Captured: mke2fs says "Creating regular file" even with -q.
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&rootfs)
        .arg(size)
        .output()
        .context("mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !made.status.success() {
        bail!(
            "mkfs.ext4 failed: {}: {}",
            made.status,
            String::from_utf8_lossy(&made.stderr).trim()
        );
    }
    let id = format!("bench-{tag}-{}", size.to_lowercase());
    let manifest = serde_json::json!({
        "schemaVersion": 1,
        "bundleId": id,
        "arch": "x86_64",
        "rootfsType": "ext4",
        "kernel": {"path": "vmlinux"},
        "rootfs": {"path": "rootfs.ext4", "sha256": sha256_of(&rootfs)?},
    });
    let path = dir.path().join("bundle.json");
    std::fs::write(&path, manifest.to_string())?;
    // A large limit: the bench's bundle must not evict the user's.
    manager.add_bundle(&path.to_string_lossy(), Some(1024), &mut |_| {})?;
    Ok(format!("{}{id}", hangar::manager::BUNDLE_PREFIX))
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let output = Command::new("sha256sum").arg(path).output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_user_plus_system_after_the_command_name() {
        // A name with a space and a parenthesis, utime 7, stime 5 ticks.
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3";
        assert_eq!(cpu_in_stat(line), Duration::from_millis(120));
        assert_eq!(cpu_in_stat("garbage"), Duration::ZERO);
        // This process, working until its CPU time shows (a tick at most
        // on an idle host; bounded for a starved one).
        let started = Instant::now();
        let mut spin = 0u64;
        while cpu_of(Some(std::process::id())).is_err()
            && started.elapsed() < Duration::from_secs(10)
        {
            for _ in 0..100_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        }
        assert!(!cpu_of(Some(std::process::id())).unwrap().is_zero());
        assert!(cpu_of(None).is_err());
    }
}

//! vCPUs and memory the host plugged into a restored guest. The kernel
//! learns of them from an ACPI event it handles once the guest runs on, so
//! the agent waits (bounded) until it sees them, brings every offline one
//! online and reports what is online. vCPUs always need this step (nothing
//! in a minimal guest onlines them); memory usually comes online by itself
//! (`memhp_default_state=online`), but not in every kernel or image.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_proto::GuestResources;

/// How long all of it may take: the kernel noticing what was plugged in
/// and bringing it online (the host waits longer for the answer).
const GROW_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// The sysfs folders this works on (a fake tree in tests).
pub struct Sysfs {
    cpus: PathBuf,
    memory: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self {
            cpus: PathBuf::from("/sys/devices/system/cpu"),
            memory: PathBuf::from("/sys/devices/system/memory"),
        }
    }
}

/// Brings the guest to `cpus` online vCPUs and `memory_mib` of online
/// memory, all within `timeout`; returns what failed and what is online.
pub fn grow(
    sysfs: &Sysfs,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    timeout: Duration,
) -> (Vec<String>, GuestResources) {
    let deadline = Instant::now() + timeout;
    let mut errors = Vec::new();
    if let Some(want) = cpus {
        if let Err(err) = online_cpus(&sysfs.cpus, want, deadline) {
            errors.push(format!("cpus: {err}"));
        }
    }
    if let Some(want) = memory_mib {
        if let Err(err) = online_memory(&sysfs.memory, want, deadline) {
            errors.push(format!("memory: {err}"));
        }
    }
    let resources = GuestResources {
        cpus_online: online_cpu_count(&sysfs.cpus).unwrap_or(0),
        memory_mib: online_memory_mib(&sysfs.memory).unwrap_or(0),
    };
    for error in &errors {
        crate::log(&format!("identity: {error}"));
    }
    (errors, resources)
}

/// The default sysfs and timeout.
pub fn grow_guest(cpus: Option<u32>, memory_mib: Option<u64>) -> (Vec<String>, GuestResources) {
    grow(&Sysfs::default(), cpus, memory_mib, GROW_TIMEOUT)
}

fn online_cpus(dir: &Path, want: u32, deadline: Instant) -> io::Result<()> {
    let cpus = wait_for(deadline, || {
        let cpus = cpu_states(dir)?;
        Ok((cpus.len() >= want as usize).then_some(cpus))
    })?
    .ok_or_else(|| {
        let seen = cpu_states(dir).map(|c| c.len()).unwrap_or(0);
        io::Error::other(format!("{seen} of {want} vCPUs present in time"))
    })?;
    for (path, online) in cpus {
        if !online {
            // A guest that hangs bringing a vCPU up would block this write
            // for good: the session goes on without it.
            write_before(&path.join("online"), "1", deadline)?;
        }
    }
    let online = online_cpu_count(dir)?;
    if online < want {
        return Err(io::Error::other(format!("{online} of {want} vCPUs online")));
    }
    Ok(())
}

fn online_memory(dir: &Path, want_mib: u64, deadline: Instant) -> io::Result<()> {
    let want = want_mib << 20;
    let blocks = wait_for(deadline, || {
        let (size, blocks) = memory_blocks(dir)?;
        Ok((blocks.len() as u64 * size >= want).then_some(blocks))
    })?
    .ok_or_else(|| {
        let seen = memory_blocks(dir)
            .map(|(size, blocks)| mib(blocks.len(), size))
            .unwrap_or(0);
        io::Error::other(format!("{seen} of {want_mib} MiB present in time"))
    })?;
    for (path, online) in blocks {
        if online {
            continue;
        }
        let state = path.join("state");
        if let Err(err) = write_before(&state, "online", deadline) {
            // The kernel may have onlined it meanwhile (it does so itself
            // with memhp_default_state=online), and then refuses the write.
            if std::fs::read_to_string(&state)
                .map(|s| s.trim().to_owned())
                .ok()
                != Some("online".to_owned())
            {
                return Err(err);
            }
        }
    }
    let online = online_memory_mib(dir)?;
    if online < want_mib {
        return Err(io::Error::other(format!(
            "{online} of {want_mib} MiB online"
        )));
    }
    Ok(())
}

/// Writes `value` to a sysfs file in a thread of its own, waiting for it
/// until `deadline` at most.
fn write_before(path: &Path, value: &'static str, deadline: Instant) -> io::Result<()> {
    let (done, result) = std::sync::mpsc::channel();
    let target = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = done.send(std::fs::write(&target, value));
    });
    let wait = deadline.saturating_duration_since(Instant::now());
    match result.recv_timeout(wait.max(POLL)) {
        Ok(written) => {
            written.map_err(|err| io::Error::other(format!("{}: {err}", path.display())))
        }
        Err(_) => Err(io::Error::other(format!(
            "{}: no answer in time",
            path.display()
        ))),
    }
}

/// `count` blocks of `size` bytes, in MiB.
fn mib(count: usize, size: u64) -> u64 {
    (count as u64 * size) >> 20
}

/// Polls `probe` until it yields a value or `deadline` passes.
fn wait_for<T>(
    deadline: Instant,
    mut probe: impl FnMut() -> io::Result<Option<T>>,
) -> io::Result<Option<T>> {
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

fn online_cpu_count(dir: &Path) -> io::Result<u32> {
    Ok(cpu_states(dir)?
        .iter()
        .filter(|(_, online)| *online)
        .count() as u32)
}

fn online_memory_mib(dir: &Path) -> io::Result<u64> {
    let (size, blocks) = memory_blocks(dir)?;
    Ok(mib(
        blocks.iter().filter(|(_, online)| *online).count(),
        size,
    ))
}

/// Every vCPU the kernel knows (`cpuN` folders) and whether it is online.
/// A vCPU without an `online` file (the boot CPU) cannot go offline.
fn cpu_states(dir: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
    numbered_entries(dir, "cpu")?
        .into_iter()
        .map(|path| {
            let online = match std::fs::read_to_string(path.join("online")) {
                Ok(text) => text.trim() == "1",
                Err(err) if err.kind() == io::ErrorKind::NotFound => true,
                Err(err) => return Err(err),
            };
            Ok((path, online))
        })
        .collect()
}

/// The memory block size and every block with whether it is online.
fn memory_blocks(dir: &Path) -> io::Result<(u64, Vec<(PathBuf, bool)>)> {
    let size_file = dir.join("block_size_bytes");
    let text = std::fs::read_to_string(&size_file).map_err(|err| {
        io::Error::other(format!(
            "{}: {err} (a guest kernel without memory hotplug?)",
            size_file.display()
        ))
    })?;
    let size = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
        .map_err(|_| io::Error::other(format!("block_size_bytes is {:?}", text.trim())))?;
    let blocks = numbered_entries(dir, "memory")?
        .into_iter()
        .map(|path| {
            let state = std::fs::read_to_string(path.join("state"))?;
            Ok((path, state.trim() == "online"))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((size, blocks))
}

/// `dir`'s entries named `prefix` and digits, e.g. cpu0, cpu12.
fn numbered_entries(dir: &Path, prefix: &str) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|err| {
        io::Error::other(format!(
            "{}: {err} (a guest kernel without {prefix} hotplug?)",
            dir.display()
        ))
    })?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: cpu0 (no online file), cpuN with `online` values,
    /// 128 MiB memory blocks with `state` values.
    fn tree(cpus: &[&str], blocks: &[&str]) -> (tempfile::TempDir, Sysfs) {
        let root = tempfile::tempdir().unwrap();
        let sysfs = Sysfs {
            cpus: root.path().join("cpu"),
            memory: root.path().join("memory"),
        };
        std::fs::create_dir_all(sysfs.cpus.join("cpu0")).unwrap();
        std::fs::create_dir_all(sysfs.cpus.join("cpufreq")).unwrap();
        for (index, online) in cpus.iter().enumerate() {
            let dir = sysfs.cpus.join(format!("cpu{}", index + 1));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("online"), format!("{online}\n")).unwrap();
        }
        std::fs::create_dir_all(&sysfs.memory).unwrap();
        std::fs::write(sysfs.memory.join("block_size_bytes"), "8000000\n").unwrap();
        for (index, state) in blocks.iter().enumerate() {
            let dir = sysfs.memory.join(format!("memory{}", index * 16));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("state"), format!("{state}\n")).unwrap();
        }
        (root, sysfs)
    }

    #[test]
    fn offline_vcpus_and_blocks_come_online() {
        let (_root, sysfs) = tree(&["0", "1", "0"], &["online", "online", "offline"]);
        let (errors, resources) = grow(&sysfs, Some(4), Some(384), Duration::ZERO);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(resources.cpus_online, 4);
        assert_eq!(resources.memory_mib, 384);
        let cpu3 = std::fs::read_to_string(sysfs.cpus.join("cpu3/online")).unwrap();
        assert_eq!(cpu3, "1");
        let block = std::fs::read_to_string(sysfs.memory.join("memory32/state")).unwrap();
        assert_eq!(block, "online");
    }

    #[test]
    fn what_never_appears_is_reported_after_the_wait() {
        let (_root, sysfs) = tree(&["0"], &["online", "online"]);
        let started = Instant::now();
        let (errors, resources) = grow(&sysfs, Some(3), Some(512), Duration::from_millis(50));
        // One deadline for both parts.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("2 of 3 vCPUs present"), "{errors:?}");
        assert!(errors[1].contains("256 of 512 MiB present"), "{errors:?}");
        // Nothing was onlined: the wait ended before the counts were met.
        assert_eq!(resources.cpus_online, 1);
    }

    #[test]
    fn a_kernel_without_memory_hotplug_is_named() {
        let (_root, sysfs) = tree(&[], &["online"]);
        std::fs::remove_dir_all(&sysfs.memory).unwrap();
        let (errors, _) = grow(&sysfs, None, Some(512), Duration::ZERO);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("without memory hotplug"), "{errors:?}");
    }

    #[test]
    fn a_vcpu_that_appears_during_the_wait_is_onlined() {
        let (_root, sysfs) = tree(&[], &["online"]);
        // Made aside and moved in whole, as the kernel shows a new vCPU.
        let (making, late) = (sysfs.cpus.join(".new"), sysfs.cpus.join("cpu1"));
        std::fs::create_dir_all(&making).unwrap();
        std::fs::write(making.join("online"), "0\n").unwrap();
        let appear = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(40));
            std::fs::rename(&making, &late).unwrap();
        });
        let (errors, resources) = grow(&sysfs, Some(2), None, Duration::from_secs(5));
        appear.join().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(resources.cpus_online, 2);
    }
}

//! Host processes by pid *and* start time: a pid alone may have been reused
//! by an unrelated process since we recorded it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::record::ProcessRef;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), or None if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: the
    // fields we want follow the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field 22 is index 19.
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True if `pid` runs and is the process that started at `started`.
pub fn is_alive(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// This process, for recording who carries out an operation.
pub fn current() -> Option<ProcessRef> {
    let pid = std::process::id();
    Some(ProcessRef {
        pid,
        start_time: start_time(pid)?,
    })
}

/// True while the process `process` names still runs.
pub fn is_running(process: &ProcessRef) -> bool {
    is_alive(process.pid, Some(process.start_time))
}

/// Live processes whose command line mentions `needle` (a work dir path),
/// with their command lines. How orphan VMMs are found: every VMM Hangar
/// starts has its work dir in its arguments.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmdline.contains(&needle) && start_time(pid).is_some()).then_some((pid, cmdline))
        })
        .collect()
}

/// Sends `signal` to `pid` if it is still our process.
pub fn signal(pid: u32, started: Option<u64>, signal: Signal) -> bool {
    if !is_alive(pid, started) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(raw), signal).is_ok()
}

/// Polls until `pid` is gone or `timeout` passes; true if gone.
pub fn wait_gone(pid: u32, started: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid, started) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let started = start_time(me).unwrap();
        assert!(is_alive(me, Some(started)));
        assert!(!is_alive(me, Some(started + 1)));
        assert!(!is_alive(u32::MAX - 1, None));
    }

    #[test]
    fn killed_child_is_seen_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = start_time(pid);
        assert!(signal(pid, started, Signal::SIGKILL));
        let _ = child.wait();
        assert!(wait_gone(pid, started, Duration::from_secs(5)));
    }
}

//! Harness for tests that drive the real `hangar` binary against real QEMU
//! VMs. Every command runs under a timeout and a failure message shows what
//! was seen. A missing prerequisite fails the test (with the command that
//! installs it); these tests never skip, in CI or elsewhere.

#![allow(dead_code)]

pub mod http;
pub mod images;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest any single `hangar` invocation may take in a test. A TCG boot
/// takes ~3 s; the margin covers parallel tests on a 2-core CI machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

pub fn hangar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hangar")
}

/// One state dir shared by the real-VM tests of this binary, so the default
/// image is built and the accelerator probed once.
pub fn shared_state() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        check_prerequisites();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real-vm-state");
        std::fs::create_dir_all(&dir).expect("create shared state dir");
        dir
    })
}

/// Fails with the install command when the host lacks what VMs need.
pub fn check_prerequisites() {
    let mut missing = Vec::new();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox (apt-get install busybox-static)");
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        missing.push("qemu-img (apt-get install qemu-utils)");
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        missing.push("mkfs.ext4 (apt-get install e2fsprogs)");
    }
    assert!(
        missing.is_empty(),
        "real-VM tests need: {} — run `make deps` (CI={:?})",
        missing.join(", "),
        std::env::var("CI").ok()
    );
}

/// Runs `hangar` with `args` against `state`, killing it after
/// [`COMMAND_TIMEOUT`].
pub fn hangar(state: &Path, args: &[&str]) -> Output {
    hangar_env(state, args, &[])
}

pub fn hangar_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(hangar_bin());
    command
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("HANGAR_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn hangar");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait hangar") {
            break status;
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err_thread.join().unwrap_or_default()).into_owned();
            panic!(
                "hangar {args:?} still running after {COMMAND_TIMEOUT:?}; stderr so far:\n{err}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "hangar failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// `inspect` as JSON.
pub fn inspect(state: &Path, vm: &str) -> serde_json::Value {
    let out = ok(&hangar(state, &["inspect", vm]));
    serde_json::from_str(&out).expect("inspect prints JSON")
}

/// A VM name unique to this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A new empty directory under the test target's scratch space, named
/// `prefix` plus a unique suffix.
pub fn scratch(prefix: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh VM on the default image, started, removed when the guard drops.
pub fn running_vm(prefix: &str) -> (String, VmGuard<'static>) {
    let state = shared_state();
    let name = unique(prefix);
    ok(&hangar(state, &["create", "--name", &name]));
    ok(&hangar(state, &["start", &name]));
    (name.clone(), VmGuard { state, name })
}

/// Runs `script` with `sh -c` in `vm` and returns its stdout (panics with
/// its stderr when it fails).
pub fn sh(state: &Path, vm: &str, script: &str) -> String {
    ok(&hangar(state, &["exec", vm, "--", "sh", "-c", script]))
}

/// Removes a VM when dropped, so a failing test leaves no QEMU behind.
pub struct VmGuard<'a> {
    pub state: &'a Path,
    pub name: String,
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let _ = hangar(self.state, &["rm", "-f", &self.name]);
    }
}

impl VmGuard<'_> {
    pub fn new<'a>(state: &'a Path, name: &str) -> VmGuard<'a> {
        VmGuard {
            state,
            name: name.to_owned(),
        }
    }
}

/// Removes a snapshot when dropped (declared after the VMs built on it, so
/// it goes after them).
pub struct SnapshotGuard<'a> {
    pub state: &'a Path,
    pub name: String,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        let _ = hangar(self.state, &["snapshot", "rm", "--force", &self.name]);
    }
}

/// `hangar snapshot create VM --name NAME`, removed when the guard drops.
pub fn take_snapshot<'a>(state: &'a Path, vm: &str, name: &str) -> SnapshotGuard<'a> {
    let guard = SnapshotGuard {
        state,
        name: name.to_owned(),
    };
    ok(&hangar(state, &["snapshot", "create", vm, "--name", name]));
    guard
}

/// True while `pid` exists and is not a zombie. A daemonized QEMU is
/// reparented to PID 1; a zombie means it exited and waits for init (which
/// in some sandboxes never reaps), so it counts as gone.
pub fn process_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("X");
    !matches!(state, "Z" | "X")
}

/// Starts `hangar` without waiting; pair with [`wait_all`].
pub fn spawn_hangar(state: &Path, args: &[&str]) -> std::process::Child {
    spawn_hangar_env(state, args, &[])
}

pub fn spawn_hangar_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new(hangar_bin())
        .envs(env.iter().copied())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("HANGAR_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hangar")
}

/// Waits for every child (killing any still running after `timeout`) and
/// returns their outputs in order.
pub fn wait_all(children: Vec<std::process::Child>, timeout: Duration) -> Vec<Output> {
    let deadline = Instant::now() + timeout;
    let handles: Vec<_> = children
        .into_iter()
        .map(|mut child| {
            std::thread::spawn(move || loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return child.wait_with_output().expect("collect output");
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let output = child.wait_with_output().expect("collect output");
                    panic!(
                        "hangar still running after {timeout:?}; stderr: {}",
                        text(&output.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect()
}

/// `ps -a --json` as a list.
pub fn all_vms(state: &Path) -> Vec<serde_json::Value> {
    let out = ok(&hangar(state, &["ps", "-a", "--json"]));
    match serde_json::from_str(&out).expect("ps prints JSON") {
        serde_json::Value::Array(vms) => vms,
        other => panic!("ps printed {other}"),
    }
}

/// Ids of the work dirs under `state/vms`.
pub fn work_dirs(state: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(state.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of live processes whose command line names `state/vms/`: VMMs.
pub fn vmm_pids(state: &Path) -> Vec<u32> {
    let needle = format!("{}/vms/", state.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
                && process_running(*pid)
        })
        .collect()
}

/// A small deterministic pseudo-random sequence, so a failing iteration can
/// be replayed with the same seed.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

/// A count from the environment (stress sizes), else `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

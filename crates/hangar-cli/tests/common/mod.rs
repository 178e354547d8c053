//! Harness for tests that drive the real `hangar` binary against real QEMU
//! VMs. Every command runs under a timeout and a failure message shows what
//! was seen. A missing prerequisite fails the test (with the command that
//! installs it); these tests never skip, in CI or elsewhere.

#![allow(dead_code)]

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

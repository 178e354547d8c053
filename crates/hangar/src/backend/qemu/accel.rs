//! Which accelerator to use: KVM only if a tiny guest really boots under it.
//!
//! `/dev/kvm` existing is not enough: under some nested setups (PVM) a stock
//! kernel hangs under KVM, or QEMU aborts on an MSR it cannot set. So the
//! probe boots the default image with `hangar.probe=1` (the agent prints a
//! marker and powers off at once) under KVM with [`PROBE_TIMEOUT`]. The
//! verdict is cached per host kernel, QEMU binary and image, under a file
//! lock so concurrent `hangar` processes probe once.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::record::Accel;

/// How long the probe guest may take to reach userspace under KVM. A real
/// KVM boot of the default image takes well under a second.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent prints in probe mode.
const PROBE_MARKER: &str = "hangar-agent: probe ok";

/// The accelerator chosen and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
    /// True when the verdict came from the cache (no probe boot this time).
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    choice: AccelChoice,
}

/// Inputs of the probe boot.
#[derive(Debug)]
pub struct ProbeInputs {
    pub qemu: PathBuf,
    pub bios: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub image_key: String,
}

/// Picks KVM or TCG. `forced` (from `HANGAR_ACCEL` or a flag) skips the
/// probe. A fresh verdict (`cached == false`) is worth telling the user
/// once; later calls read it from the cache. A forced choice counts as
/// known (`cached == true`): the user already knows.
pub fn choose(cache_dir: &Path, inputs: &ProbeInputs, forced: Option<Accel>) -> AccelChoice {
    if let Some(accel) = forced {
        return AccelChoice {
            accel,
            reason: "chosen explicitly (HANGAR_ACCEL or --accel)".into(),
            cached: true,
        };
    }
    let key = cache_key(inputs);
    let cache_file = cache_dir.join("accel.json");
    let lock_path = cache_dir.join("accel.lock");
    // Hold the lock across read-probe-write so concurrent processes probe once.
    let _lock = crate::fsutil::lock_file(&lock_path, true).ok();
    if let Some(choice) = read_cache(&cache_file, &key) {
        return choice;
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    let choice = match kvm {
        Ok(_) => probe_kvm(inputs),
        Err(err) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!(
                "/dev/kvm is not usable ({err}); using TCG software emulation (slower)"
            ),
            cached: false,
        },
    };
    let entry = CacheEntry {
        key,
        choice: choice.clone(),
    };
    if let Ok(json) = serde_json::to_vec_pretty(&entry) {
        let _ = crate::fsutil::write_atomic(&cache_file, &json);
    }
    choice
}

fn read_cache(path: &Path, key: &str) -> Option<AccelChoice> {
    let text = std::fs::read_to_string(path).ok()?;
    let entry: CacheEntry = serde_json::from_str(&text).ok()?;
    (entry.key == key).then_some(AccelChoice {
        cached: true,
        ..entry.choice
    })
}

/// Host kernel release + QEMU binary identity + image: any change re-probes.
fn cache_key(inputs: &ProbeInputs) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu_id = std::fs::metadata(&inputs.qemu)
        .ok()
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}:{}", m.len(), mtime)
        })
        .unwrap_or_default();
    format!(
        "{}|{}|{}|{}",
        release.trim(),
        inputs.qemu.display(),
        qemu_id,
        inputs.image_key
    )
}

fn probe_kvm(inputs: &ProbeInputs) -> AccelChoice {
    match boot_to_marker(inputs, Accel::Kvm, PROBE_TIMEOUT) {
        Ok(took) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("KVM probe guest booted in {} ms", took.as_millis()),
            cached: false,
        },
        Err(why) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("KVM probe failed: {why}; using TCG software emulation (slower)"),
            cached: false,
        },
    }
}

/// Boots the default image in probe mode (the agent prints a marker right
/// after mounting /proc, /sys and /dev, then powers off) and returns how
/// long QEMU took from spawn to the marker. Used by the KVM probe and as
/// the raw-QEMU baseline of `hangar bench`.
pub fn boot_to_marker(
    inputs: &ProbeInputs,
    accel: Accel,
    timeout: Duration,
) -> Result<Duration, String> {
    let mut command = Command::new(&inputs.qemu);
    command.args(["-machine", &format!("q35,accel={accel}"), "-m", "256M"]);
    if accel == Accel::Kvm {
        command.args(["-cpu", "host"]);
    }
    command.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ]);
    if let Some(bios) = &inputs.bios {
        command.arg("-bios").arg(bios);
    }
    command.arg("-kernel").arg(&inputs.kernel);
    command.arg("-initrd").arg(&inputs.initramfs);
    command.arg("-append").arg(format!(
        "{} hangar.probe=1",
        crate::image::default_image::KERNEL_CMDLINE
    ));
    command.arg("-no-reboot");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot run {}: {err}", inputs.qemu.display()))?;
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(PROBE_MARKER) {
                    let _ = tx.send(());
                    return;
                }
            }
        });
    }
    let booted = loop {
        if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            break Some(started.elapsed());
        }
        if let Ok(Some(_)) = child.try_wait() {
            break rx.try_recv().ok().map(|()| started.elapsed());
        }
        if started.elapsed() >= timeout {
            break None;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    if let Some(took) = booted {
        return Ok(took);
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned();
    if last.is_empty() {
        Err(format!(
            "a test guest did not reach userspace under {accel} within {}s",
            timeout.as_secs()
        ))
    } else {
        Err(format!("QEMU failed under {accel}: {last}"))
    }
}

/// Parses `kvm`/`tcg` from `HANGAR_ACCEL`.
pub fn forced_from_env() -> Result<Option<Accel>, String> {
    match std::env::var("HANGAR_ACCEL").ok().as_deref() {
        None | Some("") | Some("auto") => Ok(None),
        Some("kvm") => Ok(Some(Accel::Kvm)),
        Some("tcg") => Ok(Some(Accel::Tcg)),
        Some(other) => Err(format!(
            "HANGAR_ACCEL={other:?} is invalid: use kvm, tcg or auto"
        )),
    }
}

/// Where the probe result lives, for messages.
pub fn cache_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("accel.json")
}

//! Snapshots on QEMU (Debian's 7.2 and later).
//!
//! A VM's RAM is a file in its work dir, mapped shared (`memory-backend-
//! file,share=on`). A snapshot pauses the guest, freezes the root disk's
//! writable layer (`blockdev-snapshot-sync`: the guest goes on in a new
//! empty layer, the old one is never written again), writes the device
//! state with the `x-ignore-shared` migration capability (RAM left out: it
//! is the file), copies the RAM file (sparse) and lets the guest run on.
//! A VM restored from it maps that RAM file privately (`share=off`), so
//! forks share its pages copy-on-write, and reads the device state with
//! `migrate-incoming`. Both directions go through a file descriptor passed
//! over QMP (`getfd`): no path or shell in a migration URI.
//!
//! A VM running on a snapshot's RAM (restored) has no file of its own: its
//! snapshots carry the RAM inside the device state stream instead.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp::{QmpClient, QmpCommand};
use super::QemuBackend;
use crate::backend::{BackendError, SavedState, SnapshotTaken, SnapshotTarget, Snapshotting};
use crate::record::VmRecord;

/// How long saving or loading the device state (and RAM, when it is in the
/// stream) may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The root disk's drive id on QEMU's command line.
const ROOT_DRIVE: &str = "root";
/// The fd name migration uses.
const MIGRATION_FD: &str = "hangar-migration";

/// The VM's own RAM file (shared with QEMU) in its work dir.
pub fn ram_path(work_dir: &Path) -> std::path::PathBuf {
    work_dir.join("ram")
}

impl Snapshotting for QemuBackend {
    fn snapshot(
        &self,
        vm: &VmRecord,
        target: &SnapshotTarget,
    ) -> Result<SnapshotTaken, BackendError> {
        let mut qmp = self.qmp(vm)?;
        let vmm_version = version_of(&mut qmp)?;
        let was_running = qmp.query_status()?.running;
        let seed_bytes = seed_size(&mut qmp)?;
        let paused_at = Instant::now();
        qmp.execute(QmpCommand::Stop)?;
        let mut saved = save(&mut qmp, vm, target);
        if let (Err(_), Some(freeze)) = (&saved, &target.disk) {
            // The guest now writes to the new layer: point its header back
            // at the frozen layer's name in the work dir, which outlives
            // the failed snapshot's folder.
            if freeze.next.is_file() {
                if let Err(err) = repoint_backing(&mut qmp, &freeze.node, &freeze.current) {
                    saved = Err(err);
                }
            }
        }
        let paused = paused_at.elapsed();
        if target.stop_after && saved.is_ok() {
            let _ = qmp.execute(QmpCommand::Quit);
        } else if was_running {
            // Runs on after a failure too: a failed snapshot must not cost
            // the user their VM.
            qmp.execute(QmpCommand::Cont)?;
        }
        let ram_file = saved?;
        Ok(SnapshotTaken {
            ram_file,
            paused,
            vmm_version,
            seed_bytes,
        })
    }

    fn receive(
        &self,
        vm: &VmRecord,
        saved: &SavedState<'_>,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let (state, ram_file) = (saved.state, saved.ram_file);
        let mut qmp = self.qmp(vm)?;
        let version = version_of(&mut qmp)?;
        if version != saved.vmm_version {
            return Err(BackendError::Unsupported {
                backend: crate::record::BackendKind::Qemu,
                what: "restore this snapshot".into(),
                why: format!(
                    "it was saved by {}, this host runs {version}; restore it where that QEMU runs",
                    saved.vmm_version
                ),
            });
        }
        qmp.call_with(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": ram_file }] }),
        )?;
        let file = File::open(state).map_err(|source| BackendError::Io {
            path: state.to_path_buf(),
            source,
        })?;
        qmp.pass_fd(MIGRATION_FD, file.as_fd())?;
        drop(file);
        qmp.call_with(
            "migrate-incoming",
            json!({ "uri": format!("fd:{MIGRATION_FD}") }),
        )?;
        wait_migration(&mut qmp, "loading the saved state", timeout)?;
        // Loaded guests stay paused until told otherwise.
        if !qmp.query_status()?.running {
            qmp.execute(QmpCommand::Cont)?;
        }
        Ok(())
    }
}

/// With the guest paused: disk, device state, RAM. True when the RAM went
/// to its own file.
fn save(qmp: &mut QmpClient, vm: &VmRecord, target: &SnapshotTarget) -> Result<bool, BackendError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackendError::Io { path, source }
    };
    if let Some(freeze) = &target.disk {
        let frozen = target.dir.join("disk.qcow2");
        let node = freeze.node.as_str();
        qmp.call_with(
            "blockdev-snapshot-sync",
            json!({
                "device": ROOT_DRIVE,
                "snapshot-file": freeze.next.to_string_lossy(),
                "snapshot-node-name": node,
                "format": "qcow2",
                "mode": "absolute-paths",
            }),
        )?;
        // QEMU made it under its umask; it holds the guest's writes.
        let _ = std::fs::set_permissions(
            &freeze.next,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        );
        // The frozen layer moves into the snapshot by a second name (the
        // same file: nothing is copied), and the new layer's header names
        // it there, so the VM's work dir can go without breaking it.
        std::fs::hard_link(&freeze.current, &frozen).map_err(io(&frozen))?;
        qmp.call_with(
            "change-backing-file",
            json!({
                "device": ROOT_DRIVE,
                "image-node-name": node,
                "backing-file": frozen.to_string_lossy(),
            }),
        )?;
    }
    let own_ram = ram_path(&vm.work_dir);
    // A VM restored from a snapshot maps that snapshot's RAM privately; its
    // RAM then goes into the stream.
    let ram_file = own_ram.is_file() && maps_shared(qmp)?;
    qmp.call_with(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": ram_file }] }),
    )?;
    let state = target.dir.join("state");
    let file = crate::fsutil::create_private(&state).map_err(io(&state))?;
    qmp.pass_fd(MIGRATION_FD, file.as_fd())?;
    drop(file);
    qmp.call_with("migrate", json!({ "uri": format!("fd:{MIGRATION_FD}") }))?;
    wait_migration(qmp, "saving the device state", MIGRATION_TIMEOUT)?;
    if ram_file {
        let copy = target.dir.join("ram");
        crate::fsutil::copy_sparse(&own_ram, &copy).map_err(io(&copy))?;
    }
    Ok(ram_file)
}

fn repoint_backing(qmp: &mut QmpClient, node: &str, backing: &Path) -> Result<(), BackendError> {
    qmp.call_with(
        "change-backing-file",
        json!({
            "device": ROOT_DRIVE,
            "image-node-name": node,
            "backing-file": backing.to_string_lossy(),
        }),
    )
    .map(drop)
}

/// `QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`, from `query-version`.
fn version_of(qmp: &mut QmpClient) -> Result<String, BackendError> {
    let value = qmp.call_with("query-version", json!({}))?;
    let part = |name: &str| {
        value
            .pointer(&format!("/qemu/{name}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let package = value
        .get("package")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim();
    Ok(format!(
        "QEMU {}.{}.{}{}",
        part("major"),
        part("minor"),
        part("micro"),
        if package.is_empty() {
            String::new()
        } else {
            format!(" ({package})")
        }
    ))
}

/// The virtual size of the `seed` drive, when this boot has one.
fn seed_size(qmp: &mut QmpClient) -> Result<Option<u64>, BackendError> {
    let blocks = qmp.call_with("query-block", json!({}))?;
    Ok(blocks.as_array().and_then(|blocks| {
        blocks
            .iter()
            .find(|b| b.get("device").and_then(Value::as_str) == Some("seed"))
            .and_then(|b| b.pointer("/inserted/image/virtual-size"))
            .and_then(Value::as_u64)
    }))
}

/// Whether guest RAM is the shared file backend Hangar starts VMs with.
fn maps_shared(qmp: &mut QmpClient) -> Result<bool, BackendError> {
    let share = qmp.call_with(
        "qom-get",
        json!({ "path": "/objects/ram0", "property": "share" }),
    );
    Ok(matches!(share, Ok(Value::Bool(true))))
}

/// Polls `query-migrate` until it completes, fails or `timeout` passes.
fn wait_migration(qmp: &mut QmpClient, what: &str, timeout: Duration) -> Result<(), BackendError> {
    let started = Instant::now();
    loop {
        let status = qmp.call_with("query-migrate", json!({}))?;
        let state = status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned();
        match state.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = status
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(BackendError::Launch {
                    what: what.into(),
                    detail: format!("migration {state}: {why}"),
                });
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            return Err(BackendError::Launch {
                what: what.into(),
                detail: format!("not done within {timeout:?}; migration status {state}"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

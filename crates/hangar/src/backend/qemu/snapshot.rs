//! Snapshots on QEMU (Debian's 7.2 and later).
//!
//! A VM's RAM is a file in its work dir, mapped shared (`memory-backend-
//! file,share=on`). A snapshot pauses the guest, freezes the writable
//! layers of the root disk and Hangar's data disks in one `transaction` of
//! `blockdev-snapshot-sync`s (the guest goes on in new empty layers, the
//! old ones are never written again), writes the device
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

use super::argv::drive_id;
use super::qmp::{QmpClient, QmpCommand};
use super::QemuBackend;
use crate::backend::machine::Growth;
use crate::backend::quiet::SETTLE_LIMIT;
use crate::backend::{
    BackendError, DiskRole, SavedState, SnapshotTaken, SnapshotTarget, Snapshotting,
};
use crate::record::VmRecord;

/// How long saving or loading the device state (and RAM, when it is in the
/// stream) may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a VMM told to quit after its snapshot may take to exit.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The fd name migration uses.
const MIGRATION_FD: &str = "hangar-migration";

/// Where a VM's own RAM file (shared with QEMU) lives: on tmpfs, in
/// `/dev/shm/hangar-<uid>/` (0700, checked to be ours), so guest memory
/// never reaches the state disk and a full disk cannot take a page from
/// under the guest; named by the state dir and the VM id. In the work dir
/// where there is no such tmpfs.
pub fn ram_path(work_dir: &Path) -> std::path::PathBuf {
    let id = work_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let state = work_dir.parent().and_then(Path::parent).unwrap_or(work_dir);
    match private_shm_dir() {
        Some(dir) => dir.join(format!("{}-{id}.ram", state_tag(state))),
        None => work_dir.join("ram"),
    }
}

/// The RAM files of one state dir in the tmpfs folder: (VM id, path).
pub fn ram_files(state: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Some(dir) = private_shm_dir() else {
        return Vec::new();
    };
    let prefix = format!("{}-", state_tag(state));
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(&prefix)?.strip_suffix(".ram")?.to_owned();
            Some((id, entry.path()))
        })
        .collect()
}

/// 12 hex digits naming a state dir.
fn state_tag(state: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..6])
}

/// `/dev/shm/hangar-<uid>`, created 0700; None unless it is a real folder
/// owned by this user and closed to others (another user could have made
/// one first).
fn private_shm_dir() -> Option<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return None;
    }
    let uid = nix::unistd::geteuid().as_raw();
    let dir = shm.join(format!("hangar-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
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
        if was_running {
            if let Some(pid) = vm.pid {
                let settled = crate::backend::quiet::wait_until_quiet(pid, SETTLE_LIMIT);
                crate::trace::phase(&format!("snapshot: guest {settled:?}"));
            }
        }
        let paused_at = Instant::now();
        qmp.execute(QmpCommand::Stop)?;
        // After a failed save the new layer (if the freeze happened) still
        // names the frozen one by its work-dir name: nothing to undo.
        let saved = save(&mut qmp, vm, target);
        let paused = paused_at.elapsed();
        let resumed = if target.stop_after && saved.is_ok() {
            // Ended by `finish_stopped` once the snapshot is on record: a
            // failure until then must not cost the guest's memory.
            Ok(())
        } else if was_running {
            // Runs on after a failure too: a failed snapshot must not cost
            // the user their VM.
            qmp.execute(QmpCommand::Cont).map(drop)
        } else {
            Ok(())
        };
        let ram_file = saved?;
        resumed?;
        Ok(SnapshotTaken {
            ram_file,
            paused,
            vmm_version,
            seed_bytes,
            was_running,
        })
    }

    fn finish_stopped(&self, vm: &VmRecord, end: bool) -> Result<(), BackendError> {
        let mut qmp = self.qmp(vm)?;
        if !end {
            return qmp.execute(QmpCommand::Cont).map(drop);
        }
        qmp.execute(QmpCommand::Quit)?;
        // The caller rewrites the new layers' headers next: QEMU must have
        // let go of them.
        if let Some(pid) = vm.pid {
            if !crate::backend::process::wait_gone(pid, vm.pid_start_time, QUIT_TIMEOUT) {
                return Err(BackendError::Launch {
                    what: "QEMU's exit after the snapshot".into(),
                    detail: format!("pid {pid} still runs after {QUIT_TIMEOUT:?}"),
                });
            }
        }
        Ok(())
    }

    fn relink_layer(
        &self,
        vm: &VmRecord,
        role: DiskRole,
        node: &str,
        backing: &Path,
    ) -> Result<(), BackendError> {
        self.qmp(vm)?
            .call_with(
                "change-backing-file",
                json!({
                    "device": drive_id(role),
                    "image-node-name": node,
                    "backing-file": backing.to_string_lossy(),
                }),
            )
            .map(drop)
    }

    fn receive(
        &self,
        vm: &VmRecord,
        saved: &SavedState<'_>,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let (state, ram_file) = (saved.state, saved.ram_file);
        let mut qmp = self.qmp(vm)?;
        crate::trace::phase("restore: QMP connected");
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
        // No announce rounds after the load (RARPs from QEMU and, through
        // virtio-net, gratuitous ARPs and neighbour advertisements from the
        // guest, five times over half a second): slirp, the only network
        // here, learns the guest's MAC from its next packet anyway, and a
        // restored guest answering them ran network code blocks for
        // nothing (ten forks used ~8% less CPU without). They would also
        // carry the old MAC, before the identity changes it: a bridge,
        // when TAP comes, wants QMP `announce-self` after the identity.
        qmp.call_with("migrate-set-parameters", json!({ "announce-rounds": 0 }))?;
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
        crate::trace::phase("restore: migration completed");
        plug(&mut qmp, saved.growth, saved.next_dimm)?;
        // Loaded guests stay paused until told otherwise.
        if !qmp.query_status()?.running {
            qmp.execute(QmpCommand::Cont)?;
        }
        Ok(())
    }
}

/// Plugs `growth` into a loaded, paused guest: vCPUs into the machine's
/// free CPU slots (lowest first, QEMU's own type and slot properties) and
/// one DIMM, number `next_dimm`. The guest handles the ACPI
/// events when it runs on; its agent brings the new parts online.
fn plug(qmp: &mut QmpClient, growth: &Growth, next_dimm: usize) -> Result<(), BackendError> {
    if let Some(want) = growth.cpus {
        let slots = qmp.call_with("query-hotpluggable-cpus", json!({}))?;
        let slots = slots.as_array().cloned().unwrap_or_default();
        let present = slots.iter().filter(|s| s.get("qom-path").is_some()).count();
        let mut free: Vec<&Value> = slots
            .iter()
            .filter(|s| s.get("qom-path").is_none())
            .collect();
        free.sort_by_key(|slot| slot_position(slot));
        let need = (want as usize).saturating_sub(present);
        if free.len() < need {
            return Err(BackendError::Launch {
                what: "adding vCPUs".into(),
                detail: format!(
                    "{want} wanted, {present} present and {} free slots",
                    free.len()
                ),
            });
        }
        for (n, slot) in free.into_iter().take(need).enumerate() {
            let mut args = slot
                .get("props")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            args.insert(
                "driver".into(),
                slot.get("type").cloned().unwrap_or(Value::Null),
            );
            args.insert("id".into(), json!(format!("cpu{}", present + n)));
            qmp.call_with("device_add", Value::Object(args))?;
        }
        crate::trace::phase("restore: vCPUs plugged in");
    }
    if let Some(size) = growth.memory {
        let (backend, device) = super::argv::dimm_ids(next_dimm);
        qmp.call_with(
            "object-add",
            json!({ "qom-type": "memory-backend-ram", "id": backend, "size": size.0 }),
        )?;
        qmp.call_with(
            "device_add",
            json!({ "driver": "pc-dimm", "id": device, "memdev": backend }),
        )?;
        crate::trace::phase("restore: memory plugged in");
    }
    Ok(())
}

/// A CPU slot's place: socket, die, core, thread.
fn slot_position(slot: &Value) -> [u64; 4] {
    ["socket-id", "die-id", "core-id", "thread-id"].map(|key| {
        slot.pointer(&format!("/props/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    })
}

/// With the guest paused: disk, device state, RAM. True when the RAM went
/// to its own file.
fn save(qmp: &mut QmpClient, vm: &VmRecord, target: &SnapshotTarget) -> Result<bool, BackendError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackendError::Io { path, source }
    };
    if !target.disks.is_empty() {
        // One transaction: every disk is frozen at the same instant, or
        // none is.
        let actions: Vec<Value> = target
            .disks
            .iter()
            .map(|freeze| {
                json!({
                    "type": "blockdev-snapshot-sync",
                    "data": {
                        "device": drive_id(freeze.role),
                        "snapshot-file": freeze.next.to_string_lossy(),
                        "snapshot-node-name": freeze.node,
                        "format": "qcow2",
                        "mode": "absolute-paths",
                    },
                })
            })
            .collect();
        if let Err(error) = qmp.try_call_with("transaction", json!({ "actions": actions }))? {
            // QEMU undid every action, but keeps the files it had made for
            // the ones before the failing one: the VM never used them, and
            // the caller takes an existing new layer for a frozen disk.
            for freeze in &target.disks {
                let _ = std::fs::remove_file(&freeze.next);
            }
            return Err(BackendError::Launch {
                what: "freezing the disks".into(),
                detail: format!("QEMU refused (nothing was frozen): {error}"),
            });
        }
        crate::trace::phase("snapshot: disks frozen");
    }
    for freeze in &target.disks {
        // QEMU made it under its umask; it holds the guest's writes.
        let _ = std::fs::set_permissions(
            &freeze.next,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        );
        // The frozen layer goes into the snapshot by a second name (the
        // same file: nothing is copied). The new layer's header still names
        // the work-dir name; `relink_layer` moves it once the snapshot is
        // recorded, so a failure before that leaves a whole chain.
        let frozen = target.dir.join(&freeze.frozen);
        std::fs::hard_link(&freeze.current, &frozen).map_err(io(&frozen))?;
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
    if let Err(err) = wait_migration(qmp, "saving the device state", MIGRATION_TIMEOUT) {
        // A migration left running would stop the guest when it ends.
        cancel_migration(qmp);
        return Err(err);
    }
    crate::trace::phase("snapshot: device state saved");
    if ram_file {
        let copy = target.dir.join("ram");
        crate::fsutil::copy_sparse(&own_ram, &copy).map_err(io(&copy))?;
        crate::trace::phase("snapshot: RAM copied");
    }
    Ok(ram_file)
}

/// Cancels a migration and waits (briefly) until it is no longer active.
fn cancel_migration(qmp: &mut QmpClient) {
    let _ = qmp.call_with("migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let active = qmp
            .call_with("query-migrate", json!({}))
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .is_some_and(|s| matches!(s.as_str(), "active" | "setup" | "cancelling" | "device"));
        if !active {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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

//! `snapshot create|ls|inspect|rm`: saving a running VM, and the rules for
//! removing what others depend on.

use std::path::{Path, PathBuf};

use super::{Manager, ManagerError};
use crate::backend::{BackendError, DiskFreeze, DiskRole, SnapshotTarget};
use crate::record::{SavedBoot, SavedDisk, VmRecord, VmState};
use crate::snapshot::store::SnapshotStore;
use crate::snapshot::{
    MemoryForm, Resources, SnapshotError, SnapshotFile, SnapshotRecord, SourceVm, SNAPSHOT_FORMAT,
};
use crate::spec::{ImageSource, NetworkSpec};

/// What `snapshot create` was asked for.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Stop the VM once saved instead of letting it run on.
    pub stop: bool,
}

impl Manager {
    pub fn snapshot_store(&self) -> SnapshotStore {
        SnapshotStore::new(self.layout.snapshots_dir())
    }

    /// Saves a running VM's memory, devices and disk. The VM runs on (or
    /// stops, with `stop`); its disk goes on in a new layer, the old one is
    /// the snapshot's.
    pub fn snapshot_create(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        options: &SnapshotOptions,
    ) -> Result<SnapshotRecord, ManagerError> {
        if let Some(description) = &options.description {
            if !crate::snapshot::valid_description(description) {
                return Err(ManagerError::Config(format!(
                    "--description: at most {} bytes on one line",
                    crate::snapshot::MAX_DESCRIPTION
                )));
            }
        }
        // Held from reading the VM to recording the snapshot: two snapshots
        // of one VM never freeze the same layer.
        let store = self.snapshot_store();
        let _lock = store.lock()?;
        let vm = self.inspect(namespace, key)?;
        // Under the lock no other snapshot of it is under way: a freeze on
        // record is one whose update was lost.
        let vm = if vm.freezing.is_some() {
            self.store.update(&vm.id, |r| {
                r.adopt_frozen_layers();
                Ok::<_, ManagerError>(())
            })?
        } else {
            vm
        };
        if vm.state != VmState::Running {
            return Err(ManagerError::InvalidState {
                name: vm.name.clone(),
                state: vm.state,
                action: "snapshot it",
                hint: "; snapshots save a running guest (`hangar start` it)",
            });
        }
        snapshot_supported(&vm)?;
        self.snapshotting(&vm)?;
        let plan = self.saved_boot(&vm)?;
        let (existing, _) = store.scan()?;
        let name = match &options.name {
            Some(name) => name.clone(),
            None => default_name(&vm.name, &existing),
        };
        crate::snapshot::validate_name(&name)?;
        if let Some(taken) = existing.iter().find(|s| s.name == name) {
            return Err(SnapshotError::NameTaken {
                name,
                id: taken.id.clone(),
            }
            .into());
        }
        let id = super::new_id()?;
        let dir = store.create_dir(&id)?;
        let result = self.take_snapshot(&vm, &id, &name, &dir, &plan, options);
        match result {
            Ok(record) => {
                if options.stop {
                    let _ = self.mark_ended(
                        &vm.id,
                        VmState::Stopped,
                        format!("stopped after snapshot {}", record.name),
                    );
                }
                Ok(record)
            }
            Err(err) => {
                // A snapshot on record stays, whatever failed after it.
                if !dir.join(crate::snapshot::store::RECORD_FILE).exists() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(err)
            }
        }
    }

    /// The backend's snapshot capability, or why there is none.
    fn snapshotting(
        &self,
        vm: &VmRecord,
    ) -> Result<&dyn crate::backend::Snapshotting, ManagerError> {
        self.backend(vm.backend)?
            .as_snapshotting()
            .ok_or_else(|| ManagerError::Backend {
                name: vm.name.clone(),
                source: BackendError::Unsupported {
                    backend: vm.backend,
                    what: "take snapshots".into(),
                    why: "this backend has no snapshot support".into(),
                },
            })
    }

    /// Saves the VM into `dir` and writes the record.
    fn take_snapshot(
        &mut self,
        vm: &VmRecord,
        id: &str,
        name: &str,
        dir: &Path,
        plan: &SavedBoot,
        options: &SnapshotOptions,
    ) -> Result<SnapshotRecord, ManagerError> {
        let store = self.snapshot_store();
        let (id, name, dir) = (id.to_owned(), name.to_owned(), dir.to_path_buf());
        let boot = link_boot_files(plan, vm.spec.data_disks.len(), &dir)?;
        let freezes = disk_freezes(vm, &boot, &id);
        let target = SnapshotTarget {
            dir: dir.clone(),
            disks: freezes.clone(),
            stop_after: options.stop,
        };
        if !freezes.is_empty() {
            // Told before the freeze: the record may fail to follow it.
            self.store.update(&vm.id, |r| {
                r.freezing = Some(id.clone());
                Ok::<_, ManagerError>(())
            })?;
        }
        let taken = self.snapshotting(vm)?.snapshot(vm, &target);
        let was_running = taken.as_ref().is_ok_and(|taken| taken.was_running);
        let followed = self.follow_frozen_disks(vm, &id, &freezes);
        let saved = followed.and_then(|()| {
            let taken = taken.map_err(|source| ManagerError::Backend {
                name: vm.name.clone(),
                source,
            })?;
            let record = SnapshotRecord {
                format: SNAPSHOT_FORMAT,
                id: id.clone(),
                name: name.clone(),
                description: options.description.clone(),
                created_at: chrono::Utc::now(),
                source: SourceVm {
                    id: vm.id.clone(),
                    name: vm.name.clone(),
                },
                backend: vm.backend,
                accel: vm.accel.unwrap_or(crate::record::Accel::Tcg),
                vmm_version: taken.vmm_version,
                agent_protocol: hangar_proto::PROTOCOL_VERSION,
                spec: recorded_spec(&vm.spec),
                resources: resources(vm, &dir),
                memory: if taken.ram_file {
                    MemoryForm::File
                } else {
                    MemoryForm::Stream
                },
                boot,
                parent: vm.disk_snapshot.clone().filter(|_| !freezes.is_empty()),
                image: image_reference(&vm.spec.image),
                seed_bytes: taken.seed_bytes,
                paused_ms: u64::try_from(taken.paused.as_millis()).unwrap_or(u64::MAX),
                files: sync_and_list(&dir)?,
            };
            store.save(&record)?;
            Ok(record)
        });
        let record = if options.stop {
            self.finish_stopped(vm, saved, was_running)?
        } else {
            saved?
        };
        self.relink_layers(vm, &id, &freezes, &dir, options.stop);
        Ok(record)
    }

    /// After a `--stop` snapshot, whose VM waited paused for its record:
    /// ends the VM once `saved`, else lets a guest that ran before run on.
    fn finish_stopped(
        &self,
        vm: &VmRecord,
        saved: Result<SnapshotRecord, ManagerError>,
        was_running: bool,
    ) -> Result<SnapshotRecord, ManagerError> {
        let backend = self.snapshotting(vm)?;
        match saved {
            Ok(record) => match backend.finish_stopped(vm, true) {
                Ok(()) => Ok(record),
                Err(source) => Err(ManagerError::NotEndedAfterSnapshot {
                    name: vm.name.clone(),
                    namespace_flag: namespace_flag(&vm.namespace),
                    snapshot: record.name,
                    source: Box::new(source),
                }),
            },
            Err(failure) if was_running => match backend.finish_stopped(vm, false) {
                Ok(()) => Err(failure),
                Err(source) => Err(ManagerError::NotResumedAfterSnapshot {
                    failure: Box::new(failure),
                    name: vm.name.clone(),
                    namespace_flag: namespace_flag(&vm.namespace),
                    source: Box::new(source),
                }),
            },
            Err(failure) => Err(failure),
        }
    }

    /// Once frozen, the VM writes to the new layers whatever else happened
    /// (a failed save included): the record follows the disks and the
    /// freeze ends. (Their headers name the frozen layers by their work-dir
    /// names until relinked.) Should this write be lost, the next start or
    /// snapshot follows them instead (`VmRecord::adopt_frozen_layers`).
    fn follow_frozen_disks(
        &mut self,
        vm: &VmRecord,
        id: &str,
        freezes: &[DiskFreeze],
    ) -> Result<(), ManagerError> {
        if freezes.is_empty() {
            return Ok(());
        }
        self.store.update(&vm.id, |r| {
            r.adopt_frozen_layers_of(id);
            Ok::<_, ManagerError>(())
        })?;
        Ok(())
    }

    /// Points the VM's new layers at the frozen ones' names in the
    /// snapshot, so the VM depends on the snapshot (not on second names in
    /// its work dir), and drops the work-dir names. Best effort: until it
    /// happens a chain goes through the work-dir name, which is just as
    /// whole.
    fn relink_layers(
        &mut self,
        vm: &VmRecord,
        id: &str,
        freezes: &[DiskFreeze],
        dir: &Path,
        stopped: bool,
    ) {
        let mut relinked = Vec::new();
        for freeze in freezes {
            let frozen = dir.join(&freeze.frozen);
            let done = if stopped {
                // No VMM holds the layer: rewrite its header directly.
                std::process::Command::new("qemu-img")
                    .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&frozen)
                    .arg(&freeze.next)
                    .output()
                    .is_ok_and(|out| out.status.success())
            } else {
                self.snapshotting(vm).ok().is_some_and(|backend| {
                    backend
                        .relink_layer(vm, freeze.role, &freeze.node, &frozen)
                        .is_ok()
                })
            };
            if done {
                relinked.push(&freeze.current);
            }
        }
        if relinked.is_empty() {
            return;
        }
        let updated = self.store.update(&vm.id, |r| {
            r.disk_snapshot = Some(id.to_owned());
            r.snapshot_ids.push(id.to_owned());
            Ok::<_, ManagerError>(())
        });
        if updated.is_ok() {
            for current in relinked {
                let _ = std::fs::remove_file(current);
            }
        }
    }

    /// Every snapshot, oldest first.
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotRecord>, ManagerError> {
        Ok(self.snapshot_store().list()?)
    }

    pub fn snapshot_inspect(&self, reference: &str) -> Result<SnapshotRecord, ManagerError> {
        Ok(self.snapshot_store().find(reference)?)
    }

    /// Removes a snapshot; refused while VMs or other snapshots build on its
    /// disk, unless `force` (they are named in the error; with force they
    /// can no longer start, and are returned to be told).
    pub fn snapshot_remove(
        &mut self,
        reference: &str,
        force: bool,
    ) -> Result<RemovedSnapshot, ManagerError> {
        let store = self.snapshot_store();
        let _lock = store.lock()?;
        let record = store.find(reference)?;
        let users = self.snapshot_users(&record.id)?;
        if !users.is_empty() && !force {
            return Err(SnapshotError::InUse {
                name: record.name.clone(),
                users: users.join(", "),
            }
            .into());
        }
        store.remove(&record.id)?;
        Ok(RemovedSnapshot {
            record,
            broken: users,
        })
    }

    /// Who builds on a snapshot: VMs on its disk (`VM name`), VMs still
    /// loading its state (a restore or fork under way; once running they
    /// need none of its files), and snapshots (`snapshot name`).
    pub fn snapshot_users(&self, id: &str) -> Result<Vec<String>, ManagerError> {
        use crate::record::VmState;
        let mut users: Vec<String> = self
            .store
            .list()?
            .into_iter()
            .filter_map(|vm| {
                // Not a cold start of a restored VM stopped since: that
                // boots from its work dir.
                let loading = vm.restored_from.as_deref() == Some(id)
                    && vm.stopped_at.is_none()
                    && matches!(vm.state, VmState::Created | VmState::Starting);
                if vm.disk_snapshot.as_deref() == Some(id) {
                    Some(format!("VM {}", vm.name))
                } else if loading {
                    Some(format!("VM {} (starting from it)", vm.name))
                } else {
                    None
                }
            })
            .collect();
        for snapshot in self.snapshot_store().list()? {
            if snapshot.parent.as_deref() == Some(id) {
                users.push(format!("snapshot {}", snapshot.name));
            }
        }
        Ok(users)
    }

    /// What `vm` booted: its saved boot when it came from a snapshot, else
    /// its image resolved now.
    fn saved_boot(&mut self, vm: &VmRecord) -> Result<SavedBoot, ManagerError> {
        if let Some(boot) = &vm.boot {
            return Ok(boot.clone());
        }
        let plan = self.plan(vm)?;
        Ok(SavedBoot {
            firmware_boot: plan.kernel.is_none(),
            kernel: plan.kernel,
            initramfs: plan.initramfs,
            cmdline: plan.cmdline,
            root_disk: plan.root_disk.map(|disk| SavedDisk {
                path: disk.base,
                format: disk.format,
                read_only: disk.read_only,
            }),
            // Named by `link_boot_files` for the snapshot.
            data_disks: Vec::new(),
        })
    }
}

/// The source's spec as a snapshot keeps it: without cloud-init input (it
/// may hold a password or keys, and did its work) or SSH settings.
fn recorded_spec(spec: &crate::spec::VmSpec) -> crate::spec::VmSpec {
    let mut spec = spec.clone();
    spec.cloud_init = None;
    spec.ssh = None;
    spec
}

/// A removed snapshot, and what `--force` broke: the VMs and snapshots
/// (`VM name`, `snapshot name`) that built on it.
#[derive(Clone, Debug)]
pub struct RemovedSnapshot {
    pub record: SnapshotRecord,
    pub broken: Vec<String>,
}

/// ` -n NAMESPACE` for a hint naming a VM outside the default namespace.
fn namespace_flag(namespace: &str) -> String {
    if namespace == crate::spec::DEFAULT_NAMESPACE {
        String::new()
    } else {
        format!(" -n {namespace}")
    }
}

/// What snapshots do not cover yet, refused before anything happens.
fn snapshot_supported(vm: &VmRecord) -> Result<(), ManagerError> {
    let refuse = |what: &str| {
        Err(ManagerError::Config(format!(
            "VM {}: snapshots of VMs with {what} are not supported yet",
            vm.name
        )))
    };
    if super::ssh::uses_ssh(vm) {
        return refuse(
            "no guest agent (reached over SSH): a restored copy could not be given a new identity",
        );
    }
    if vm.spec.data_disks.iter().any(|disk| disk.path.is_some()) {
        return refuse(
            "host disk files attached as they are (--attach-disk): a snapshot would have to freeze a file hangar does not own; give the VM --data-disk disks instead",
        );
    }
    if vm.spec.data_disks.iter().any(|disk| disk.read_only) {
        return refuse("read-only new data disks (data_disks with read_only and a size)");
    }
    if vm.spec.uefi {
        return refuse("UEFI firmware (its variable store is a disk of its own)");
    }
    if vm.spec.vsock {
        return refuse("vsock (the guest's CID would be shared by every copy)");
    }
    Ok(())
}

/// `web-1`, `web-2`, ...: the first free one.
fn default_name(vm: &str, existing: &[SnapshotRecord]) -> String {
    (1..)
        .map(|n| crate::spec::derived_name(vm, &format!("-{n}")))
        .find(|name| !existing.iter().any(|s| &s.name == name))
        .unwrap_or_else(|| vm.to_owned())
}

/// Hard-links the kernel, initramfs and a read-only root disk into the
/// snapshot (same file system: nothing copied; a copy otherwise) and
/// returns the boot with names relative to the folder, the `data_disks`
/// data disks' frozen layers included.
fn link_boot_files(
    boot: &SavedBoot,
    data_disks: usize,
    dir: &Path,
) -> Result<SavedBoot, ManagerError> {
    let link = |from: &Path, name: &str| -> Result<PathBuf, ManagerError> {
        let to = dir.join(name);
        link_or_copy(from, &to).map_err(|source| ManagerError::Io {
            path: from.to_path_buf(),
            source,
        })?;
        Ok(PathBuf::from(name))
    };
    let mut saved = boot.clone();
    if let Some(kernel) = &boot.kernel {
        saved.kernel = Some(link(kernel, "kernel")?);
    }
    if let Some(initramfs) = &boot.initramfs {
        saved.initramfs = Some(link(initramfs, "initramfs")?);
    }
    if let Some(disk) = &boot.root_disk {
        saved.root_disk = Some(if disk.read_only {
            SavedDisk {
                path: link(&disk.path, "base")?,
                ..disk.clone()
            }
        } else {
            // The frozen writable layer lands there during the snapshot.
            frozen_layer(crate::snapshot::ROOT_LAYER.into())
        });
    }
    saved.data_disks = (0..data_disks)
        .map(|index| frozen_layer(crate::snapshot::data_layer_name(index)))
        .collect();
    Ok(saved)
}

fn frozen_layer(name: String) -> SavedDisk {
    SavedDisk {
        path: PathBuf::from(name),
        format: crate::image::disk::DiskFormat::Qcow2,
        read_only: false,
    }
}

/// The writable layers a snapshot `id` of `vm` freezes (its root disk
/// unless read-only, every data disk: Hangar made them all, as
/// `snapshot_supported` checked), as `boot` names them in the snapshot.
fn disk_freezes(vm: &VmRecord, boot: &SavedBoot, id: &str) -> Vec<DiskFreeze> {
    let root = boot
        .root_disk
        .as_ref()
        .filter(|disk| !disk.read_only)
        .map(|disk| DiskFreeze {
            role: DiskRole::Root,
            current: vm.root_layer_path(),
            next: vm.work_dir.join(VmRecord::next_root_layer(id)),
            node: format!("layer-{id}"),
            frozen: disk.path.to_string_lossy().into_owned(),
        });
    let data = boot
        .data_disks
        .iter()
        .enumerate()
        .map(|(index, disk)| DiskFreeze {
            role: DiskRole::Data(index),
            current: vm.data_layer_path(index),
            next: vm.work_dir.join(VmRecord::next_data_layer(index, id)),
            node: format!("data{index}-{id}"),
            frozen: disk.path.to_string_lossy().into_owned(),
        });
    root.into_iter().chain(data).collect()
}

pub(super) fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(nix::libc::EXDEV) => {
            std::fs::copy(from, to).map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Flushes every file of the snapshot to disk and lists them with sizes.
fn sync_and_list(dir: &Path) -> Result<Vec<SnapshotFile>, ManagerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManagerError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        let bytes = file.metadata().map_err(io(&path))?.len();
        files.push(SnapshotFile {
            name: name.to_owned(),
            bytes,
            sha256: None,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

fn resources(vm: &VmRecord, dir: &Path) -> Resources {
    let disk_bytes = virtual_size(&dir.join(crate::snapshot::ROOT_LAYER))
        .or_else(|| virtual_size(&dir.join("base")));
    Resources {
        cpus: vm.spec.cpus,
        memory: vm.spec.memory,
        disk_bytes,
        nics: match &vm.spec.network {
            NetworkSpec::None => Vec::new(),
            NetworkSpec::User { .. } => vec!["user".into()],
            NetworkSpec::Tap { .. } => vec!["tap".into()],
        },
        machine: vm.machine.clone(),
    }
}

/// A disk's size as the guest sees it: a qcow2 header's size field, or a
/// raw file's length.
pub(super) fn virtual_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 32];
    let mut file = std::fs::File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    if file.read_exact(&mut head).is_ok() && head[..4] == *b"QFI\xfb" {
        return Some(u64::from_be_bytes(head[24..32].try_into().ok()?));
    }
    Some(length)
}

/// The image as `image ls` names it, for pins and listings.
pub(super) fn image_reference(image: &ImageSource) -> Option<String> {
    match image {
        ImageSource::Default => Some("default".into()),
        ImageSource::Oci { reference } => Some(reference.clone()),
        ImageSource::Bundle { id } => Some(format!("{}{id}", super::BUNDLE_PREFIX)),
        ImageSource::Disk { name } => Some(format!("{}{name}", super::DISK_PREFIX)),
        _ => None,
    }
}

impl Manager {
    /// Writes a snapshot to an archive at `output` (see
    /// `snapshot::archive`).
    pub fn snapshot_export(
        &self,
        reference: &str,
        output: &Path,
    ) -> Result<crate::snapshot::archive::ExportSummary, ManagerError> {
        let store = self.snapshot_store();
        let record = store.find(reference)?;
        Ok(crate::snapshot::archive::export(
            &record,
            &store.dir(&record.id),
            output,
        )?)
    }

    /// Adds a snapshot from an archive; a bad archive (newer format,
    /// truncated, a wrong checksum) leaves nothing behind.
    pub fn snapshot_import(
        &self,
        archive: &Path,
        name: Option<&str>,
    ) -> Result<SnapshotRecord, ManagerError> {
        if let Some(name) = name {
            crate::snapshot::validate_name(name)?;
        }
        let store = self.snapshot_store();
        let _lock = store.lock()?;
        let id = super::new_id()?;
        let dir = store.create_dir(&id)?;
        let imported =
            crate::snapshot::archive::import(archive, &dir, &id, name).and_then(|record| {
                if let Some(taken) = store.list()?.into_iter().find(|s| s.name == record.name) {
                    return Err(SnapshotError::NameTaken {
                        name: record.name,
                        id: taken.id,
                    });
                }
                store.save(&record)?;
                Ok(record)
            });
        if imported.is_err() {
            crate::snapshot::archive::discard(&store, &id);
        }
        Ok(imported?)
    }
}

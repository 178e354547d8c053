//! `restore` and `fork`: VMs started from a snapshot's saved state, each
//! with a new identity (id, MAC, hostname, machine-id, random pool, clock).
//! Forks run in parallel, each with its own manager (store connection).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Manager, ManagerError, ManagerOptions};
use crate::backend::machine::{Growth, MachineShape};
use crate::backend::{GuestMemory, LaunchPlan};
use crate::guest::identity::new_identity;
use crate::guest::{AgentClient, Check, GuestError};
use crate::record::{SavedBoot, SavedDisk, VmRecord};
use crate::size::ByteSize;
use crate::snapshot::{MemoryForm, SnapshotRecord};
use crate::spec::NetworkSpec;

/// How a restored VM may differ from its snapshot.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The new VM's name (default: the snapshot's name and a number).
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The guest's hostname (default: the new VM's name).
    pub hostname: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<ByteSize>,
    /// A bigger root disk than the snapshot's.
    pub disk_size: Option<ByteSize>,
}

/// How long the guest may take to apply its new identity.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(20);
/// The most forks one call starts.
pub const MAX_FORKS: usize = 64;

/// What a start from a snapshot needs beyond a cold start.
#[derive(Clone, Debug)]
pub struct Incoming {
    state: PathBuf,
    memory: MemoryForm,
    ram: PathBuf,
    /// Stands in for the seed disk the snapshot's boot had.
    seed: Option<PathBuf>,
    hostname: String,
    /// The VM's own MAC, when it has a NIC.
    mac: Option<String>,
    vmm_version: String,
    /// The vCPUs and RAM the saved guest had, and its machine's shape.
    saved_cpus: u32,
    saved_memory: ByteSize,
    machine: Option<MachineShape>,
    /// What is plugged in after the state is loaded.
    growth: Growth,
}

impl Incoming {
    /// The launch: paused, waiting for the state, RAM from the snapshot.
    pub(super) fn adjust(&self, plan: &mut LaunchPlan) {
        plan.incoming = true;
        // The saved machine: more vCPUs and memory are plugged in later.
        plan.cpus = self.saved_cpus;
        plan.memory = match &self.machine {
            Some(shape) => shape.boot_memory(self.saved_memory),
            None => self.saved_memory,
        };
        plan.machine = self.machine.clone();
        plan.guest_memory = match self.memory {
            MemoryForm::File => GuestMemory::Snapshot(self.ram.clone()),
            // The stream carries the RAM: into a file of the VM's own.
            MemoryForm::Stream => GuestMemory::Own,
        };
        plan.seed = self.seed.clone();
    }

    /// Sends the new identity and checks every part was applied.
    pub(super) fn apply_identity(
        &self,
        client: &mut AgentClient,
        timeout: Duration,
        check: Check<'_>,
    ) -> Result<(), GuestError> {
        let mut identity =
            new_identity(&self.hostname, self.mac.clone()).map_err(|err| GuestError::Aborted {
                reason: format!("cannot make an identity: {err}"),
            })?;
        identity.cpus = self.growth.cpus;
        let identity_memory = self
            .growth
            .memory
            .map(|more| (self.saved_memory.0 + more.0) >> 20);
        identity.memory_mib = identity_memory;
        let applied = client.set_identity(identity, timeout.min(IDENTITY_TIMEOUT), check)?;
        if !applied.errors.is_empty() {
            return Err(GuestError::Aborted {
                reason: format!(
                    "the guest could not take its new identity: {}",
                    applied.errors.join("; ")
                ),
            });
        }
        if self.growth.is_empty() {
            return Ok(());
        }
        let Some(online) = applied.resources else {
            return Err(GuestError::Aborted {
                reason: "the snapshot's guest agent does not bring added vCPUs or memory online (it is older than this hangar); restore without --cpus/--memory, or take the snapshot again".into(),
            });
        };
        let short_cpus = self.growth.cpus.filter(|want| online.cpus_online < *want);
        let short_memory = identity_memory.filter(|want| online.memory_mib < *want);
        if short_cpus.is_some() || short_memory.is_some() {
            return Err(GuestError::Aborted {
                reason: format!(
                    "the guest has {} vCPUs and {} MiB online, not the {} and {} MiB asked for",
                    online.cpus_online,
                    online.memory_mib,
                    self.growth.cpus.unwrap_or(self.saved_cpus),
                    identity_memory.unwrap_or(self.saved_memory.0 >> 20),
                ),
            });
        }
        Ok(())
    }

    /// The machine once the growth is plugged in.
    pub(super) fn grown_machine(&self) -> Option<MachineShape> {
        self.machine.as_ref().map(|shape| shape.grown(&self.growth))
    }
}

impl Manager {
    /// A VM running again from `snapshot`, ready for exec.
    pub fn restore(
        &mut self,
        snapshot: &str,
        options: &RestoreOptions,
    ) -> Result<VmRecord, ManagerError> {
        if let Some(hostname) = options.hostname.as_deref() {
            if !crate::spec::is_valid_name(hostname) {
                return Err(ManagerError::Config(format!(
                    "--hostname {hostname:?}: use 1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
                )));
            }
        }
        let snapshot = self.snapshot_store().find(snapshot)?;
        let growth = self.check_restorable(&snapshot, options)?;
        let name = match &options.name {
            Some(name) => name.clone(),
            None => self
                .free_names(&snapshot.name, "", 1, options.namespace.as_deref())?
                .remove(0),
        };
        let record = {
            // `snapshot rm` cannot run between the lookup and the record
            // that pins the snapshot.
            let _lock = self.snapshot_store().lock()?;
            let snapshot = self.snapshot_store().find(&snapshot.id)?;
            self.create_restored(&snapshot, &name, options)?
        };
        self.start_restored(record, &snapshot, options, &growth)
    }

    /// `count` VMs from one snapshot, started in parallel; their memory is
    /// the snapshot's, shared copy-on-write. All or nothing: when one
    /// fails, the others are removed and the first error is returned.
    pub fn fork(
        &mut self,
        snapshot: &str,
        count: usize,
        options: &RestoreOptions,
    ) -> Result<Vec<VmRecord>, ManagerError> {
        if count == 0 || count > MAX_FORKS {
            return Err(ManagerError::Config(format!(
                "--count {count}: give 1 to {MAX_FORKS}"
            )));
        }
        if options.name.is_some() || options.hostname.is_some() {
            return Err(ManagerError::Config(
                "fork names its VMs snapshot-fork-N (hostnames alike); --name and --hostname are for restore".into(),
            ));
        }
        let snapshot = self.snapshot_store().find(snapshot)?;
        let growth = self.check_restorable(&snapshot, options)?;
        let names =
            self.free_names(&snapshot.name, "-fork", count, options.namespace.as_deref())?;
        let accel = self.accelerator()?.accel;
        let mut records = Vec::new();
        {
            let _lock = self.snapshot_store().lock()?;
            let snapshot = self.snapshot_store().find(&snapshot.id)?;
            for name in &names {
                match self.create_restored(&snapshot, name, options) {
                    Ok(record) => records.push(record),
                    Err(err) => {
                        self.discard(&records);
                        return Err(err);
                    }
                }
            }
        }
        let manager_options = ManagerOptions {
            state_dir: Some(self.layout.root().to_path_buf()),
            accel: Some(accel),
        };
        let results: Vec<Result<VmRecord, ManagerError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = records
                .iter()
                .map(|record| {
                    let (record, snapshot, options, growth) = (
                        record.clone(),
                        snapshot.clone(),
                        options.clone(),
                        growth.clone(),
                    );
                    let manager_options = manager_options.clone();
                    scope.spawn(move || {
                        let mut manager = Manager::open(manager_options)?;
                        manager.start_restored(record, &snapshot, &options, &growth)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle.join().unwrap_or_else(|_| {
                        Err(ManagerError::Config("a fork's thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut started = Vec::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(record) => started.push(record),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            None => Ok(started),
            Some(err) => {
                self.discard(&records);
                Err(err)
            }
        }
    }

    /// Removes VMs a failed fork made.
    fn discard(&mut self, records: &[VmRecord]) {
        for record in records {
            let _ = self.remove(Some(&record.namespace), &record.id, true);
        }
    }

    /// Refuses what cannot work before anything is made: another backend,
    /// accelerator, VMM or agent version, smaller resources or more than
    /// the machine has room for; returns what to plug in.
    fn check_restorable(
        &mut self,
        snapshot: &SnapshotRecord,
        options: &RestoreOptions,
    ) -> Result<Growth, ManagerError> {
        let refuse = |why: String| {
            Err(ManagerError::Config(format!(
                "snapshot {}: {why}",
                snapshot.name
            )))
        };
        // The VMM's version is checked by the VMM that loads it.
        self.snapshotting_for(snapshot.backend)?;
        let accel = self.accelerator()?.accel;
        if accel != snapshot.accel {
            return refuse(format!(
                "taken under {}, this host runs VMs under {accel}; saved device state does not move between accelerators (set HANGAR_ACCEL={})",
                snapshot.accel, snapshot.accel
            ));
        }
        if snapshot.agent_protocol != hangar_proto::PROTOCOL_VERSION {
            return refuse(format!(
                "its guest agent speaks protocol {}, this hangar {}; use a matching hangar",
                snapshot.agent_protocol,
                hangar_proto::PROTOCOL_VERSION
            ));
        }
        let needs = &snapshot.resources;
        let saved = (needs.cpus, needs.memory);
        let growth = match &needs.machine {
            Some(shape) => {
                if let Err(why) = shape.validate_against(needs.cpus, needs.memory) {
                    return refuse(format!("its record's machine does not add up: {why}"));
                }
                match shape.growth(saved, (options.cpus, options.memory)) {
                    Ok(growth) => growth,
                    Err(why) => return refuse(why),
                }
            }
            None => {
                let asked = match (
                    options.cpus.filter(|c| *c != needs.cpus),
                    options.memory.filter(|m| *m != needs.memory),
                ) {
                    (Some(cpus), Some(memory)) => Some(format!("--cpus {cpus} --memory {memory}")),
                    (Some(cpus), None) => Some(format!("--cpus {cpus}")),
                    (None, Some(memory)) => Some(format!("--memory {memory}")),
                    (None, None) => None,
                };
                if let Some(flag) = asked {
                    return refuse(format!(
                        "{flag}: its VM's machine had no room to grow (a disk image's boot, or a VM started before hangar gave machines room), so the guest resumes with exactly {} vCPUs and {} of RAM: leave the flags out",
                        needs.cpus, needs.memory
                    ));
                }
                Growth::default()
            }
        };
        if growth.cpus.is_some()
            && accel == crate::record::Accel::Tcg
            && !crate::backend::machine::presets_delay_loop(&snapshot.boot.cmdline)
        {
            return refuse(format!(
                "--cpus: its guest kernel booted without a preset delay loop (lpj=, which hangar sets where /proc/cpuinfo gives the host's clock rate), and under TCG a vCPU added to such a guest can hang it while coming online; give --cpus {} or leave it out",
                needs.cpus
            ));
        }
        if let (Some(size), Some(needed)) = (options.disk_size, needs.disk_bytes) {
            if size.0 < needed {
                return refuse(format!(
                    "--disk {size} is smaller than the snapshot's disk ({}); give at least that",
                    ByteSize(needed)
                ));
            }
        }
        if snapshot.boot.root_disk.is_none() && options.disk_size.is_some() {
            return refuse("--disk: the snapshot's VM has no root disk".into());
        }
        let data = &snapshot.spec.data_disks;
        if data.len() != snapshot.boot.data_disks.len()
            || data
                .iter()
                .any(|disk| disk.path.is_some() || disk.size.is_none())
        {
            return refuse(
                "its record's data disks do not match the frozen layers it holds; the record is damaged (take the snapshot again)".into(),
            );
        }
        Ok(growth)
    }

    fn snapshotting_for(
        &self,
        kind: crate::record::BackendKind,
    ) -> Result<&dyn crate::backend::Snapshotting, ManagerError> {
        self.backend(kind)?.as_snapshotting().ok_or_else(|| {
            ManagerError::Config(format!("the {kind} backend cannot restore snapshots"))
        })
    }

    /// `count` VM names `BASE` + `TAG-N` not in use in the namespace, made
    /// valid (a snapshot's name may hold capitals, or be too long).
    fn free_names(
        &mut self,
        base: &str,
        tag: &str,
        count: usize,
        namespace: Option<&str>,
    ) -> Result<Vec<String>, ManagerError> {
        let namespace = namespace.unwrap_or(crate::spec::DEFAULT_NAMESPACE);
        let taken: std::collections::BTreeSet<String> = self
            .store
            .list()?
            .into_iter()
            .filter(|vm| vm.namespace == namespace)
            .map(|vm| vm.name)
            .collect();
        Ok((1..)
            .map(|n| crate::spec::derived_name(base, &format!("{tag}-{n}")))
            .filter(|name| !taken.contains(name))
            .take(count)
            .collect())
    }

    /// The record of a VM made from `snapshot`: its own id, MAC and name,
    /// the snapshot's boot with the files it needs linked into its work
    /// dir (its disk layer sits on the snapshot's frozen disk).
    fn create_restored(
        &mut self,
        snapshot: &SnapshotRecord,
        name: &str,
        options: &RestoreOptions,
    ) -> Result<VmRecord, ManagerError> {
        let dir = self.snapshot_store().dir(&snapshot.id);
        let spec = restored_spec(snapshot, name, options)?;
        // The image is not resolved again (the snapshot's boot is what runs);
        // the VM's spec still names it, which keeps it from removal.
        let id = super::new_id()?;
        let work_dir = self.layout.vm_dir(&id);
        let mut record = VmRecord::new(id, spec, snapshot.backend, work_dir.clone());
        if record.spec.network != NetworkSpec::None {
            record.mac = crate::net::mac_for(&record.id);
        }
        record.first_booted = true;
        record.restored_from = Some(snapshot.id.clone());
        let writable_disk = snapshot
            .boot
            .root_disk
            .as_ref()
            .is_some_and(|disk| !disk.read_only)
            || !snapshot.boot.data_disks.is_empty();
        record.disk_snapshot = writable_disk.then(|| snapshot.id.clone());
        record.boot = Some(SavedBoot {
            kernel: snapshot
                .boot
                .kernel
                .as_ref()
                .map(|_| work_dir.join("kernel")),
            initramfs: snapshot
                .boot
                .initramfs
                .as_ref()
                .map(|_| work_dir.join("initramfs")),
            cmdline: snapshot.boot.cmdline.clone(),
            root_disk: snapshot.boot.root_disk.as_ref().map(|disk| SavedDisk {
                path: if disk.read_only {
                    work_dir.join("base")
                } else {
                    dir.join(&disk.path)
                },
                format: disk.format,
                read_only: disk.read_only,
            }),
            firmware_boot: snapshot.boot.firmware_boot,
            data_disks: snapshot
                .boot
                .data_disks
                .iter()
                .map(|disk| SavedDisk {
                    path: dir.join(&disk.path),
                    ..disk.clone()
                })
                .collect(),
        });
        self.store.insert(&record)?;
        let made = crate::layout::create_private_dir(&work_dir)
            .map_err(ManagerError::from)
            .and_then(|()| link_boot_files(snapshot, &dir, &work_dir));
        if let Err(err) = made {
            let _ = std::fs::remove_dir_all(&work_dir);
            let _ = self.store.delete(&record.id);
            return Err(err);
        }
        Ok(record)
    }

    /// Launches a restored VM from the snapshot's state, applies its new
    /// identity and waits for the agent; a failure removes the VM.
    fn start_restored(
        &mut self,
        record: VmRecord,
        snapshot: &SnapshotRecord,
        options: &RestoreOptions,
        growth: &Growth,
    ) -> Result<VmRecord, ManagerError> {
        let dir = self.snapshot_store().dir(&snapshot.id);
        let seed = match snapshot.seed_bytes {
            Some(bytes) => Some(placeholder_seed(&record.work_dir, bytes)?),
            None => None,
        };
        let incoming = Incoming {
            state: dir.join("state"),
            memory: snapshot.memory,
            ram: dir.join("ram"),
            seed,
            hostname: options
                .hostname
                .clone()
                .unwrap_or_else(|| record.name.clone()),
            mac: record.mac.clone(),
            vmm_version: snapshot.vmm_version.clone(),
            saved_cpus: snapshot.resources.cpus,
            saved_memory: snapshot.resources.memory,
            machine: snapshot.resources.machine.clone(),
            growth: growth.clone(),
        };
        let (namespace, id) = (record.namespace.clone(), record.id.clone());
        match self.start_record_from(record, Some(incoming)) {
            Ok((record, client)) => {
                self.keep_started_session(&record, client);
                Ok(record)
            }
            Err(err) => {
                let _ = self.remove(Some(&namespace), &id, true);
                Err(err)
            }
        }
    }

    /// Loads the saved state into a VMM launched with `incoming`.
    pub(super) fn receive_state(
        &self,
        record: &VmRecord,
        incoming: &Incoming,
        timeout: Duration,
    ) -> Result<(), GuestError> {
        let backend = self
            .snapshotting_for(record.backend)
            .map_err(|err| GuestError::Aborted {
                reason: err.to_string(),
            })?;
        let saved = crate::backend::SavedState {
            state: &incoming.state,
            ram_file: incoming.memory == MemoryForm::File,
            vmm_version: &incoming.vmm_version,
            growth: &incoming.growth,
            next_dimm: incoming
                .machine
                .as_ref()
                .map_or(0, |shape| shape.added_memory.len()),
        };
        backend
            .receive(record, &saved, timeout)
            .map_err(|err| GuestError::Aborted {
                reason: format!("loading snapshot state: {err}"),
            })
    }
}

/// The new VM's spec, from an allow-list of the snapshot's (an imported
/// record is not trusted with host paths): image (for pins), vCPUs, memory,
/// network mode and guest ports (host ports picked free: fixed ones are the
/// source's), labels, data disks Hangar made (their layers sit on the
/// snapshot's). No host disk files, seed, SSH, shared dirs or vsock.
fn restored_spec(
    snapshot: &SnapshotRecord,
    name: &str,
    options: &RestoreOptions,
) -> Result<crate::spec::VmSpec, ManagerError> {
    let source = &snapshot.spec;
    let mut spec = crate::spec::VmSpec::new(name);
    if let Some(namespace) = &options.namespace {
        spec.namespace = namespace.clone();
    }
    spec.image = source.image.clone();
    // Checked against the snapshot's machine before (`check_restorable`).
    spec.cpus = options.cpus.unwrap_or(snapshot.resources.cpus);
    spec.memory = options.memory.unwrap_or(snapshot.resources.memory);
    spec.disk_size = options.disk_size;
    spec.labels = source.labels.clone();
    // Checked to be Hangar's own (a size, no host file) before.
    spec.data_disks = source
        .data_disks
        .iter()
        .map(|disk| crate::spec::DataDisk {
            size: disk.size,
            path: None,
            read_only: false,
        })
        .collect();
    spec.network = match &source.network {
        NetworkSpec::User { forwards } => NetworkSpec::User {
            forwards: forwards
                .iter()
                .map(|f| crate::spec::PortForward {
                    host: 0,
                    guest: f.guest,
                })
                .collect(),
        },
        _ => NetworkSpec::None,
    };
    spec.validate()?;
    Ok(spec)
}

/// Links the snapshot's kernel, initramfs and read-only base into the VM's
/// work dir, so cold starts later do not need the snapshot.
fn link_boot_files(
    snapshot: &SnapshotRecord,
    dir: &Path,
    work_dir: &Path,
) -> Result<(), ManagerError> {
    let mut files: Vec<(&Path, &str)> = Vec::new();
    if let Some(kernel) = &snapshot.boot.kernel {
        files.push((kernel, "kernel"));
    }
    if let Some(initramfs) = &snapshot.boot.initramfs {
        files.push((initramfs, "initramfs"));
    }
    if let Some(disk) = snapshot.boot.root_disk.as_ref().filter(|d| d.read_only) {
        files.push((&disk.path, "base"));
    }
    for (name, as_name) in files {
        let from = dir.join(name);
        super::snapshots::link_or_copy(&from, &work_dir.join(as_name)).map_err(|source| {
            ManagerError::Io {
                path: from.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// An empty disk the size of the snapshot's seed: the device must exist for
/// the saved state to load; the guest read the real seed long ago.
fn placeholder_seed(work_dir: &Path, bytes: u64) -> Result<PathBuf, ManagerError> {
    let path = work_dir.join("seed-placeholder.raw");
    let file = crate::fsutil::create_private(&path).map_err(|source| ManagerError::Io {
        path: path.clone(),
        source,
    })?;
    file.set_len(bytes).map_err(|source| ManagerError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

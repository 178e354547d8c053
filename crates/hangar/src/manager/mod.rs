//! [`Manager`]: the library's front door. The CLI and the daemon parse,
//! call one method, and print.

mod bundles;
mod control;
mod copy;
mod disks;
mod error;
mod filter;
mod gc;
mod images;
mod lifecycle;
mod plan;
mod reconcile;
mod restore;
mod run;
mod sessions;
mod snapshots;
mod ssh;
mod up;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backend::noop::NoopBackend;
use crate::backend::qemu::accel::{self, AccelChoice, ProbeInputs};
use crate::backend::qemu::QemuBackend;
use crate::backend::Backend;
use crate::guest::ssh::SshPrivateKey;
use crate::image::{ensure_default_image, DefaultImage};
use crate::layout::{create_private_dir, Layout};
use crate::record::{Accel, BackendKind, ProcessRef, VmRecord, VmSummary};
use crate::spec::{ImageSource, VmSpec};
use crate::store::{Store, StoreError};

pub use error::ManagerError;
pub use filter::ListFilter;
pub use gc::GcReport;
pub use images::ImageGcReport;
pub use restore::RestoreOptions;
pub use run::RunOutcome;
pub use snapshots::{RemovedSnapshot, SnapshotOptions};
pub use up::{UpAction, UpChange};

/// How many console lines are kept with a VM that ended on its own, and
/// shown in errors.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// Options that apply to every operation of one manager.
#[derive(Clone, Debug, Default)]
pub struct ManagerOptions {
    /// State directory; `HANGAR_HOME` or the default when None.
    pub state_dir: Option<PathBuf>,
    /// Force an accelerator instead of probing (also `HANGAR_ACCEL`).
    pub accel: Option<Accel>,
}

/// Owns the store connection and the backends.
#[derive(Debug)]
pub struct Manager {
    layout: Layout,
    store: Store,
    qemu: QemuBackend,
    noop: NoopBackend,
    forced_accel: Option<Accel>,
    accel: Option<AccelChoice>,
    /// SSH private keys given in memory, by VM id: held by this manager
    /// only, never written anywhere (their `Debug` shows fingerprints).
    ssh_keys: HashMap<String, SshPrivateKey>,
    /// Agent sessions kept from starts and execs, by VM id.
    sessions: sessions::Sessions,
}

impl Manager {
    pub fn open(options: ManagerOptions) -> Result<Self, ManagerError> {
        let layout = Layout::resolve(options.state_dir.as_deref())?;
        let store = Store::open(&layout.database())?;
        let forced_accel = match options.accel {
            Some(accel) => Some(accel),
            None => accel::forced_from_env().map_err(ManagerError::Config)?,
        };
        Ok(Self {
            layout,
            store,
            qemu: QemuBackend::default(),
            noop: NoopBackend::from_env(),
            forced_accel,
            accel: None,
            ssh_keys: HashMap::new(),
            sessions: sessions::Sessions::new(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn backend(&self, kind: BackendKind) -> Result<&dyn Backend, ManagerError> {
        match kind {
            BackendKind::Qemu => Ok(&self.qemu),
            BackendKind::Noop => Ok(&self.noop),
            other => Err(ManagerError::Config(format!(
                "the {other} backend is not available in this build"
            ))),
        }
    }

    /// Records a new VM (state `created`) after checking the spec and the
    /// host. On any error nothing is left behind.
    pub fn create(&mut self, spec: VmSpec, backend: BackendKind) -> Result<VmRecord, ManagerError> {
        self.create_record(spec, backend, None, None, None)
    }

    /// [`Self::create`] with a password for the cloud-init seed: it goes
    /// into the seed (read on the first boot, then deleted) and nowhere
    /// else, never the record or a log.
    pub fn create_with_password(
        &mut self,
        spec: VmSpec,
        backend: BackendKind,
        password: Option<&str>,
    ) -> Result<VmRecord, ManagerError> {
        self.create_record(spec, backend, None, password, None)
    }

    /// [`Self::create_with_password`] for a VM of a disk image reached over
    /// SSH with a private key given in memory (OpenSSH text, no
    /// passphrase) instead of a file: the seed authorizes its public half,
    /// the record says only that the key is in memory, and this manager
    /// holds the key for start, exec and cp. Another manager (a later
    /// process) needs it again: [`Self::supply_ssh_key`].
    pub fn create_with_ssh_key(
        &mut self,
        spec: VmSpec,
        backend: BackendKind,
        private_key: &str,
        password: Option<&str>,
    ) -> Result<VmRecord, ManagerError> {
        let key = SshPrivateKey::from_openssh(private_key)
            .map_err(|err| ManagerError::Config(err.to_string()))?;
        self.create_record(spec, backend, None, password, Some(key))
    }

    /// The record goes in first, then the work dir: a crash in between
    /// leaves a record whose dir `start` recreates, never a dir that `gc`
    /// could mistake for an orphan while a create is under way.
    fn create_record(
        &mut self,
        spec: VmSpec,
        backend: BackendKind,
        ephemeral_for: Option<ProcessRef>,
        password: Option<&str>,
        memory_key: Option<SshPrivateKey>,
    ) -> Result<VmRecord, ManagerError> {
        let mut spec = spec;
        ssh::mark_memory_key(&mut spec, memory_key.as_ref())?;
        disks::disk_defaults(&mut spec);
        spec.validate()?;
        let static_address = spec
            .cloud_init
            .as_ref()
            .is_some_and(|c| c.network.is_some());
        if static_address && spec.network == crate::spec::NetworkSpec::None {
            return Err(ManagerError::Config(
                "cloud-init: a static address needs a network device; add --network user".into(),
            ));
        }
        if password.is_some() && spec.cloud_init.is_none() {
            return Err(ManagerError::Config(
                "a password is only used for a cloud-init seed; add --cloud-user or another cloud-init option".into(),
            ));
        }
        // Held until the record is in: the bundle cache cannot evict the
        // VM's bundle in between.
        let (image, _bundle_in_use) = self.pin_image(spec.image)?;
        spec.image = image;
        let name = spec.name.clone();
        self.backend(backend)?
            .check(&spec)
            .map_err(|source| ManagerError::Backend { name, source })?;
        let id = new_id()?;
        let work_dir = self.layout.vm_dir(&id);
        let mut record = VmRecord::new(id, spec, backend, work_dir.clone());
        record.ephemeral_for = ephemeral_for;
        if record.spec.network != crate::spec::NetworkSpec::None {
            record.mac = crate::net::mac_for(&record.id);
        }
        // The seed authorizes the public half of the VM's SSH key: one given
        // in memory, the user's own file, or else a pair made for this VM.
        let (key, authorized) = match &record.spec.ssh {
            None => (None, None),
            Some(ssh) if ssh.private_key_in_memory => (None, ssh.public_key.clone()),
            Some(crate::spec::SshSpec {
                private_key_path: Some(path),
                ..
            }) => {
                let public = crate::guest::ssh::public_key_of(path).map_err(|err| {
                    ManagerError::Config(format!(
                        "--ssh-private-key: {err} (an OpenSSH private key without a passphrase)"
                    ))
                })?;
                (None, Some(public))
            }
            Some(_) => {
                let pair = crate::guest::ssh::generate_key(&format!("hangar@{}", record.name))
                    .map_err(|err| ManagerError::Config(err.to_string()))?;
                let public = pair.public.clone();
                (Some(pair), Some(public))
            }
        };
        let extra_keys: Vec<String> = authorized.into_iter().collect();
        // Built (and so validated) before anything is recorded.
        let seed = match &record.spec.cloud_init {
            Some(cloud_init) => Some(crate::cloudinit::seed_image(
                &crate::cloudinit::SeedInput {
                    spec: cloud_init,
                    vm_id: &record.id,
                    vm_name: &record.name,
                    mac: record.mac.as_deref(),
                    extra_keys: &extra_keys,
                    password,
                },
            )?),
            None => None,
        };
        self.store.insert(&record)?;
        let made = create_private_dir(&work_dir)
            .map_err(ManagerError::from)
            .and_then(|()| {
                if let Some(pair) = &key {
                    crate::guest::ssh::write_key(&ssh_key_path(&work_dir), pair)
                        .map_err(|err| ManagerError::Config(err.to_string()))?;
                }
                let Some(seed) = &seed else { return Ok(()) };
                let path = seed_path(&work_dir);
                crate::fsutil::write_private(&path, seed)
                    .map_err(|source| ManagerError::Io { path, source })
            });
        if let Err(err) = made {
            let _ = std::fs::remove_dir_all(&work_dir);
            let _ = self.store.delete(&record.id);
            return Err(err);
        }
        if let Some(key) = memory_key {
            self.ssh_keys.insert(record.id.clone(), key);
        }
        Ok(record)
    }

    /// One VM by name or id, its state reconciled with its process.
    pub fn inspect(
        &mut self,
        namespace: Option<&str>,
        key: &str,
    ) -> Result<VmRecord, ManagerError> {
        let record = self.store.find(namespace, key)?;
        self.reconcile(record)
    }

    /// All VMs, each reconciled.
    pub fn list(&mut self) -> Result<Vec<VmRecord>, ManagerError> {
        let records = self.store.list()?;
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            out.extend(self.reconcile_listed(record)?);
        }
        Ok(out)
    }

    /// `record`, reconciled; None if another command removed the VM since
    /// it was listed (`rm` kills the VMM before it drops the record, and a
    /// listing must not fail on that).
    fn reconcile_listed(&mut self, record: VmRecord) -> Result<Option<VmRecord>, ManagerError> {
        match self.reconcile(record) {
            Ok(record) => Ok(Some(record)),
            Err(ManagerError::Store(StoreError::NotFound { .. })) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Summaries of the VMs `filter` selects. Only VMs whose records say a
    /// VMM runs are decoded fully and reconciled; the rest cannot have
    /// changed behind Hangar's back.
    pub fn list_summaries(&mut self, filter: &ListFilter) -> Result<Vec<VmSummary>, ManagerError> {
        let mut out = Vec::new();
        for summary in self.store.list_summaries()? {
            let summary = if summary.state.has_process() {
                let Some(record) = self.store.get(&summary.id)? else {
                    continue;
                };
                let Some(record) = self.reconcile_listed(record)? else {
                    continue;
                };
                VmSummary::from(&record)
            } else {
                summary
            };
            if filter.matches_summary(&summary) {
                out.push(summary);
            }
        }
        Ok(out)
    }

    /// The VMs `filter` selects, each reconciled.
    pub fn list_filtered(&mut self, filter: &ListFilter) -> Result<Vec<VmRecord>, ManagerError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| filter.matches(r))
            .collect())
    }

    /// The console socket of a running VM, for [`crate::console::attach`].
    pub fn console_socket(
        &mut self,
        namespace: Option<&str>,
        key: &str,
    ) -> Result<PathBuf, ManagerError> {
        let record = self.inspect(namespace, key)?;
        match (&record.sockets.console, record.state.has_process()) {
            (Some(socket), true) => Ok(socket.clone()),
            _ => Err(ManagerError::InvalidState {
                name: record.name,
                state: record.state,
                action: "attach to its console",
                hint: "; start it first (`hangar start`)",
            }),
        }
    }

    /// Path of the VM's serial console log.
    pub fn console_log(
        &mut self,
        namespace: Option<&str>,
        key: &str,
    ) -> Result<PathBuf, ManagerError> {
        let record = self.store.find(namespace, key)?;
        Ok(record
            .sockets
            .console_log
            .clone()
            .unwrap_or_else(|| record.work_dir.join("console.log")))
    }

    /// Removes a VM: refused while it runs unless `force`, which kills it.
    pub fn remove(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        force: bool,
    ) -> Result<VmRecord, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if record.state.has_process() {
            if !force {
                return Err(ManagerError::InvalidState {
                    name: record.name,
                    state: record.state,
                    action: "remove it",
                    hint: "; stop it first (`hangar stop`) or use `hangar rm -f`",
                });
            }
            self.kill_now(&record)?;
        }
        self.destroy(&record)?;
        Ok(record)
    }

    /// Deletes the work dir, then the record (a crash in between leaves a
    /// record that `rm` removes again).
    fn destroy(&mut self, record: &VmRecord) -> Result<(), ManagerError> {
        self.sessions.remove(&record.id);
        lifecycle::drop_ram_file(record);
        match std::fs::remove_dir_all(&record.work_dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ManagerError::Io {
                    path: record.work_dir.clone(),
                    source,
                })
            }
        }
        self.store.delete(&record.id)?;
        self.ssh_keys.remove(&record.id);
        Ok(())
    }

    /// The default image, built on first use.
    pub fn default_image(&self) -> Result<DefaultImage, ManagerError> {
        Ok(ensure_default_image(
            &self.layout.images_dir(),
            &self.layout.packages_dir(),
        )?)
    }

    /// The QEMU binary that will run VMs.
    pub fn qemu_binary(&self) -> Result<PathBuf, ManagerError> {
        self.qemu.resolve_binary().map_err(ManagerError::Host)
    }

    /// What a raw QEMU boot of the default image needs (probe, bench).
    pub fn probe_inputs(&self) -> Result<ProbeInputs, ManagerError> {
        let image = self.default_image()?;
        Ok(ProbeInputs {
            qemu: self.qemu_binary()?,
            bios: self.qemu.bios(),
            kernel: image.kernel,
            initramfs: image.initramfs,
            image_key: image.key,
        })
    }

    /// When this process probed the host afresh and chose TCG: why. Callers
    /// print it once; a cached verdict stays quiet.
    pub fn fresh_tcg_note(&self) -> Option<&str> {
        self.accel
            .as_ref()
            .filter(|c| c.accel == Accel::Tcg && !c.cached)
            .map(|c| c.reason.as_str())
    }

    /// The accelerator VMs will use, probing once per host setup.
    pub fn accelerator(&mut self) -> Result<AccelChoice, ManagerError> {
        if let Some(choice) = &self.accel {
            return Ok(choice.clone());
        }
        let inputs = self.probe_inputs()?;
        let choice = accel::choose(&self.layout.cache_dir(), &inputs, self.forced_accel);
        self.accel = Some(choice.clone());
        Ok(choice)
    }
}

/// The NoCloud seed of a VM not booted yet (0600; it may hold a password,
/// so it goes once the first boot is up).
pub(crate) fn seed_path(work_dir: &Path) -> PathBuf {
    work_dir.join("seed.iso")
}

/// The private key Hangar made for a VM it reaches over SSH (0600).
pub(crate) fn ssh_key_path(work_dir: &Path) -> PathBuf {
    work_dir.join("ssh_key")
}

/// How `--image` names a base-image bundle: `bundle:ID` (like skopeo's
/// transport prefixes; a bare name is an OCI reference).
pub const BUNDLE_PREFIX: &str = "bundle:";
/// How `--image` names a stored cloud disk image: `disk:NAME`.
pub const DISK_PREFIX: &str = "disk:";

/// Parses what a user writes after `--image`.
pub fn parse_image(reference: &str) -> Result<ImageSource, ManagerError> {
    match reference {
        "" | "default" => Ok(ImageSource::Default),
        other if other.starts_with(DISK_PREFIX) => {
            let name = &other[DISK_PREFIX.len()..];
            crate::image::bundle::validate_bundle_id(name).map_err(|problem| {
                ManagerError::Config(format!("--image {other}: the disk image name {problem}"))
            })?;
            Ok(ImageSource::Disk {
                name: name.to_owned(),
            })
        }
        other if other.starts_with(BUNDLE_PREFIX) => {
            let id = &other[BUNDLE_PREFIX.len()..];
            crate::image::bundle::validate_bundle_id(id).map_err(|problem| {
                ManagerError::Config(format!("--image {other}: the bundle id {problem}"))
            })?;
            Ok(ImageSource::Bundle { id: id.to_owned() })
        }
        other => {
            crate::image::oci::normalize_reference(other)
                .map_err(crate::image::catalog::CatalogError::from)?;
            Ok(ImageSource::Oci {
                reference: other.to_owned(),
            })
        }
    }
}

/// 12 random hex digits.
pub fn new_id() -> Result<String, ManagerError> {
    let mut bytes = [0u8; 6];
    getrandom::getrandom(&mut bytes).map_err(|err| ManagerError::Io {
        path: Path::new("/dev/urandom").to_path_buf(),
        source: std::io::Error::other(err),
    })?;
    // The id doubles as the VM's MAC address: make it a valid local one.
    bytes[0] = crate::net::local_unicast(bytes[0]);
    Ok(hex::encode(bytes))
}

/// Whether `id` has the shape of a Hangar id (12 lowercase hex digits).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests;

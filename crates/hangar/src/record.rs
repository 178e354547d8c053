//! What exists: [`VmRecord`], persisted in the store, and [`VmState`] with
//! its one transition function.
//!
//! Compatibility: every field added after version 1 has a serde default, so a
//! record written by an older Hangar still loads.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::spec::VmSpec;

mod layers;

/// Version of the record document written today.
pub const RECORD_SCHEMA: u32 = 1;

/// Which hypervisor runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Qemu,
    Firecracker,
    CloudHypervisor,
    /// Runs no process; for tests and dry runs.
    Noop,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Noop => "noop",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" => Ok(Self::Qemu),
            "firecracker" => Ok(Self::Firecracker),
            "cloud-hypervisor" => Ok(Self::CloudHypervisor),
            "noop" => Ok(Self::Noop),
            other => Err(format!(
                "unknown backend {other:?}: use qemu, firecracker, cloud-hypervisor or noop"
            )),
        }
    }
}

/// Lifecycle of a VM. Change it only through [`VmState::valid_transition`]
/// (the store's update path enforces this).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded, work dir prepared, never started or not running.
    Created,
    /// VMM launched, waiting for the guest to be ready.
    Starting,
    /// Guest ready.
    Running,
    /// vCPUs stopped; memory kept.
    Paused,
    /// Shutdown requested, VMM still alive.
    Stopping,
    /// VMM gone after a requested stop or a guest power-off.
    Stopped,
    /// VMM gone for a reason nobody asked for, or the start failed.
    Failed,
}

impl VmState {
    /// The one place that says which state changes are legal.
    pub fn valid_transition(self, to: VmState) -> bool {
        use VmState::*;
        match self {
            Created => matches!(to, Starting),
            Starting => matches!(to, Running | Stopping | Stopped | Failed),
            Running => matches!(to, Paused | Stopping | Stopped | Failed),
            Paused => matches!(to, Running | Stopping | Stopped | Failed),
            Stopping => matches!(to, Stopped | Failed),
            Stopped => matches!(to, Starting),
            Failed => matches!(to, Starting | Stopped),
        }
    }

    /// Whether a VMM process is expected to exist.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Paused | Self::Stopping
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// Which accelerator a VM runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// Host-side endpoints of a running VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sockets {
    /// QMP control socket (QEMU).
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// Agent channel: a unix socket bridged to virtio-serial ...
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// ... and more of them, one per concurrent host session.
    #[serde(default)]
    pub agent_extra: Vec<PathBuf>,
    /// Serial console socket (attach) ...
    #[serde(default)]
    pub console: Option<PathBuf>,
    /// ... and its log file.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// The agent over vsock, when the VM has it (preferred for sessions:
    /// any number at once; readiness still comes over virtio-serial).
    #[serde(default)]
    pub agent_vsock: Option<crate::guest::AgentEndpoint>,
    /// The file (0600, in the work dir) holding the token vsock sessions
    /// present; written at each boot from the agent's serial hello.
    #[serde(default)]
    pub vsock_token: Option<PathBuf>,
}

/// A host process, named so that a reused pid is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    /// Clock ticks since host boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// A persisted VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    #[serde(default = "schema_one")]
    pub schema: u32,
    /// 12 hex digits, unique in the store.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub backend: BackendKind,
    pub state: VmState,
    pub spec: VmSpec,
    pub work_dir: PathBuf,
    #[serde(default)]
    pub sockets: Sockets,
    /// VMM process id while one runs ...
    #[serde(default)]
    pub pid: Option<u32>,
    /// ... and its start time (clock ticks since host boot), so a reused pid
    /// is never mistaken for our VMM.
    #[serde(default)]
    pub pid_start_time: Option<u64>,
    #[serde(default)]
    pub accel: Option<Accel>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub stopped_at: Option<DateTime<Utc>>,
    /// True once the VM has booted; first-boot-only inputs (a cloud-init
    /// seed) are attached only before.
    #[serde(default)]
    pub first_booted: bool,
    /// Why the VM last ended, when it ended on its own or failed.
    #[serde(default)]
    pub exit_reason: Option<String>,
    /// Last serial console lines when the VM ended on its own.
    #[serde(default)]
    pub last_console_lines: Vec<String>,
    #[serde(default)]
    pub snapshot_ids: Vec<String>,
    /// The `hangar` process carrying out a start or stop. If it dies with
    /// the VM still `starting`/`stopping`, the operation was interrupted and
    /// reconciliation finishes it.
    #[serde(default)]
    pub owner: Option<ProcessRef>,
    /// Set by `run` (without `--keep`): the VM exists only for that process,
    /// and `gc` removes it once the process is gone.
    #[serde(default)]
    pub ephemeral_for: Option<ProcessRef>,
    /// What the guest agent reported when the VM last became ready
    /// (kernel, hostname, addresses, boot time).
    #[serde(default)]
    pub guest: Option<hangar_proto::GuestFacts>,
    /// The NIC's MAC address, when the VM has a network (derived from
    /// the id, so unique in the store).
    #[serde(default)]
    pub mac: Option<String>,
    /// Host ports forwarded to the guest in the current or last run
    /// (127.0.0.1), with free ports filled in for the spec's 0s.
    #[serde(default)]
    pub ports: Vec<crate::spec::PortForward>,
    /// The guest's SSH host key (OpenSSH format), recorded on first
    /// contact and required from then on.
    #[serde(default)]
    pub ssh_host_key: Option<String>,
    /// The root disk's writable layer in the work dir, when a snapshot
    /// froze the first one (None: `root.qcow2`).
    #[serde(default)]
    pub root_layer: Option<String>,
    /// The writable layers of the data disks Hangar made, by index, where
    /// a snapshot froze the first one (absent: `data-N.qcow2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data_layers: BTreeMap<usize, String>,
    /// The snapshot whose frozen disks the writable layers sit on: it
    /// cannot be removed while this VM exists.
    #[serde(default)]
    pub disk_snapshot: Option<String>,
    /// A snapshot whose disk freeze is (or was, if this was never cleared)
    /// under way: see `adopt_frozen_layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freezing: Option<String>,
    /// The snapshot this VM was restored or forked from.
    #[serde(default)]
    pub restored_from: Option<String>,
    /// What the VM boots when it came from a snapshot (its image is not
    /// resolved again: the snapshot's kernel and disk are what it runs).
    #[serde(default)]
    pub boot: Option<SavedBoot>,
    /// The running machine's room to grow and the memory added to it (set
    /// at each launch; a snapshot records it). None: a fixed-size machine
    /// (or not launched since Hangar recorded shapes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<crate::backend::machine::MachineShape>,
}

/// A boot fixed at snapshot time: paths are absolute in a VM record and
/// file names inside the snapshot's folder in a snapshot record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBoot {
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub root_disk: Option<SavedDisk>,
    /// Booted with qboot (a kernel) rather than SeaBIOS (a disk).
    #[serde(default)]
    pub firmware_boot: bool,
    /// The frozen layers (qcow2) of the data disks Hangar made, in the
    /// spec's order: a restored VM's data disks sit on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<SavedDisk>,
}

/// A disk of a saved boot: a frozen writable layer (qcow2) or a read-only
/// base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub path: PathBuf,
    pub format: crate::image::disk::DiskFormat,
    pub read_only: bool,
}

fn schema_one() -> u32 {
    1
}

impl Sockets {
    /// Every agent socket, the first one first.
    pub fn agent_sockets(&self) -> Vec<PathBuf> {
        self.agent
            .iter()
            .chain(&self.agent_extra)
            .cloned()
            .collect()
    }
}

impl VmRecord {
    /// A freshly created VM: state `created`, no process, timestamps now.
    pub fn new(id: String, spec: VmSpec, backend: BackendKind, work_dir: PathBuf) -> Self {
        let now = Utc::now();
        Self {
            schema: RECORD_SCHEMA,
            id,
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            backend,
            state: VmState::Created,
            spec,
            work_dir,
            sockets: Sockets::default(),
            pid: None,
            pid_start_time: None,
            accel: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            stopped_at: None,
            first_booted: false,
            exit_reason: None,
            last_console_lines: Vec::new(),
            snapshot_ids: Vec::new(),
            owner: None,
            ephemeral_for: None,
            guest: None,
            mac: None,
            ports: Vec::new(),
            ssh_host_key: None,
            root_layer: None,
            data_layers: BTreeMap::new(),
            disk_snapshot: None,
            freezing: None,
            restored_from: None,
            boot: None,
            machine: None,
        }
    }

    /// The root disk's writable layer (qcow2) in the work dir.
    pub fn root_layer_path(&self) -> PathBuf {
        self.work_dir
            .join(self.root_layer.as_deref().unwrap_or("root.qcow2"))
    }

    /// Data disk `index`'s writable layer (qcow2) in the work dir.
    pub fn data_layer_path(&self, index: usize) -> PathBuf {
        match self.data_layers.get(&index) {
            Some(name) => self.work_dir.join(name),
            None => self.work_dir.join(format!("data-{index}.qcow2")),
        }
    }

    /// Records that the VMM is gone: the end state, why, and the console's
    /// last lines. The caller has checked the transition.
    pub fn mark_ended(&mut self, state: VmState, reason: String, console: Vec<String>) {
        self.state = state;
        self.pid = None;
        self.pid_start_time = None;
        self.stopped_at = Some(Utc::now());
        self.exit_reason = Some(reason);
        self.last_console_lines = console;
        self.owner = None;
    }
}

/// What `ps` shows of a VM: decoded from the stored document without the
/// parts a listing never needs (about half the cost of a full record, which
/// matters at 10,000 VMs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmSummary {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub backend: BackendKind,
    pub state: VmState,
    pub cpus: u32,
    pub memory: crate::size::ByteSize,
    pub labels: std::collections::BTreeMap<String, String>,
    pub exit_reason: Option<String>,
}

impl VmSummary {
    /// Decodes only the summary's fields of a stored record document.
    pub fn from_json(doc: &str) -> serde_json::Result<Self> {
        use std::borrow::Cow;
        #[derive(Deserialize)]
        struct Spec<'a> {
            cpus: u32,
            memory: crate::size::ByteSize,
            #[serde(borrow, default)]
            labels: std::collections::BTreeMap<Cow<'a, str>, Cow<'a, str>>,
        }
        #[derive(Deserialize)]
        struct Wire<'a> {
            #[serde(borrow)]
            id: Cow<'a, str>,
            #[serde(borrow)]
            name: Cow<'a, str>,
            #[serde(borrow)]
            namespace: Cow<'a, str>,
            backend: BackendKind,
            state: VmState,
            #[serde(borrow)]
            spec: Spec<'a>,
            #[serde(borrow, default)]
            exit_reason: Option<Cow<'a, str>>,
        }
        let wire: Wire<'_> = serde_json::from_str(doc)?;
        Ok(Self {
            id: wire.id.into_owned(),
            name: wire.name.into_owned(),
            namespace: wire.namespace.into_owned(),
            backend: wire.backend,
            state: wire.state,
            cpus: wire.spec.cpus,
            memory: wire.spec.memory,
            labels: wire
                .spec
                .labels
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            exit_reason: wire.exit_reason.map(Cow::into_owned),
        })
    }
}

impl From<&VmRecord> for VmSummary {
    fn from(record: &VmRecord) -> Self {
        Self {
            id: record.id.clone(),
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            backend: record.backend,
            state: record.state,
            cpus: record.spec.cpus,
            memory: record.spec.memory,
            labels: record.spec.labels.clone(),
            exit_reason: record.exit_reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [VmState; 7] = [
        VmState::Created,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ];

    #[test]
    fn no_state_transitions_to_itself_and_every_state_is_reachable() {
        for state in ALL {
            assert!(!state.valid_transition(state), "{state}");
        }
        for target in ALL.iter().filter(|s| **s != VmState::Created) {
            assert!(
                ALL.iter().any(|from| from.valid_transition(*target)),
                "{target}"
            );
        }
    }

    #[test]
    fn running_vm_cannot_be_started_again() {
        assert!(!VmState::Running.valid_transition(VmState::Starting));
        assert!(VmState::Stopped.valid_transition(VmState::Starting));
    }

    #[test]
    fn a_version_one_record_without_optional_fields_loads() {
        let old = r#"{
            "id": "0123456789ab", "name": "web", "namespace": "default",
            "backend": "qemu", "state": "stopped",
            "spec": {"name": "web"},
            "work_dir": "/var/lib/hangar/vms/0123456789ab",
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }"#;
        let record: VmRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.schema, 1);
        assert_eq!(record.state, VmState::Stopped);
        assert!(record.pid.is_none() && !record.first_booted);
        let again: VmRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(again, record);
    }

    #[test]
    fn summary_from_json_matches_summary_from_record() {
        let mut spec = VmSpec::new("web");
        spec.labels.insert("role".into(), "web \"quoted\"".into());
        let mut record = VmRecord::new("0123456789ab".into(), spec, BackendKind::Qemu, "/w".into());
        record.exit_reason = Some("done".into());
        let doc = serde_json::to_string(&record).unwrap();
        assert_eq!(
            VmSummary::from_json(&doc).unwrap(),
            VmSummary::from(&record)
        );
    }

    #[test]
    fn names_print_lowercase() {
        assert_eq!(VmState::Running.to_string(), "running");
        assert_eq!(BackendKind::CloudHypervisor.to_string(), "cloud-hypervisor");
        assert_eq!("noop".parse::<BackendKind>(), Ok(BackendKind::Noop));
    }
}

//! Backends run VMMs. A small core trait ([`Backend`]) every backend
//! implements, plus capability traits ([`Pausable`], later snapshots and
//! hotplug) that a backend offers through `as_*` accessors.

pub mod machine;
pub mod noop;
pub mod process;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod quiet;

pub use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::Duration;

use crate::record::{Accel, BackendKind, Sockets, VmRecord};
use crate::size::ByteSize;
use crate::spec::VmSpec;

/// What to boot, resolved by the manager from the spec and the image store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// A kernel to boot directly; None boots the root disk with firmware.
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// The root file system (an OCI image's ext4, a bundle's rootfs).
    pub root_disk: Option<RootDisk>,
    /// A cloud-init NoCloud seed (ISO 9660), attached read-only.
    pub seed: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory: ByteSize,
    pub accel: Accel,
    /// What backs guest RAM.
    pub guest_memory: GuestMemory,
    /// Start paused and wait for a saved state (a restore): the caller
    /// then calls [`Snapshotting::receive`].
    pub incoming: bool,
    /// Room to grow and memory added; None boots a plain machine (what
    /// snapshots taken before Hangar recorded shapes load into).
    pub machine: Option<machine::MachineShape>,
}

/// What backs a VM's RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GuestMemory {
    /// A file of the VM's own, shared with the VMM, so a snapshot of it
    /// is a copy of that file plus the device state. (Also what a saved
    /// state that carries its RAM is loaded into.)
    #[default]
    Own,
    /// A snapshot's RAM file, mapped copy-on-write: every VM restored from
    /// the snapshot shares its pages until it writes them.
    Snapshot(PathBuf),
}

/// A base root file system image, shared by every VM that boots it and
/// never written: a writable VM writes to its own copy-on-write overlay,
/// a read-only one gets the base itself, attached read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDisk {
    pub base: PathBuf,
    pub format: crate::image::disk::DiskFormat,
    pub read_only: bool,
    /// The overlay's size, when it should be bigger than the base.
    pub size: Option<u64>,
}

/// A VMM that was started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    pub pid: Option<u32>,
    pub pid_start_time: Option<u64>,
    pub sockets: Sockets,
    /// Host port forwards in effect (free ports filled in).
    pub ports: Vec<crate::spec::PortForward>,
}

/// What the VMM process is doing, as far as the host can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmStatus {
    Running,
    Paused,
    /// No process (never started, exited, or the pid now names another
    /// process).
    Gone,
    /// The process lives but did not answer (QMP busy or stuck): no
    /// conclusion should be drawn.
    Unknown,
}

/// How to stop: whether the guest was already asked to power off, and how
/// long to give it.
#[derive(Clone, Copy, Debug)]
pub struct StopRequest {
    pub guest_asked: bool,
    pub timeout: Duration,
}

/// Which rung of the shutdown ladder ended the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    AlreadyGone,
    GuestPowerOff,
    AcpiPowerdown,
    Terminated,
    Killed,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{binary} not found; install it (Debian: apt-get install {package})")]
    BinaryMissing { binary: String, package: String },
    #[error("the {backend} backend cannot {what}: {why}")]
    Unsupported {
        backend: BackendKind,
        what: String,
        why: String,
    },
    #[error("{what} failed: {detail}")]
    Launch { what: String, detail: String },
    #[error("socket path {path} is {len} bytes, over the 107-byte limit of unix sockets; use a shorter --state-dir")]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("QMP on {socket}: {detail}")]
    Qmp { socket: PathBuf, detail: String },
    #[error("process {pid} did not exit after SIGKILL within {timeout:?}")]
    Unkillable { pid: u32, timeout: Duration },
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The core every backend implements.
pub trait Backend: std::fmt::Debug + Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Refuses, before anything is created, a spec this backend cannot run
    /// or a host that lacks what the backend needs.
    fn check(&self, spec: &VmSpec) -> Result<(), BackendError>;

    /// Starts the VMM for `vm` (its work dir exists) and returns at once;
    /// readiness of the guest is the caller's business.
    fn launch(&self, vm: &VmRecord, plan: &LaunchPlan) -> Result<Launched, BackendError>;

    fn status(&self, vm: &VmRecord) -> VmmStatus;

    /// Walks the shutdown ladder until the VMM is gone.
    fn stop(&self, vm: &VmRecord, request: StopRequest) -> Result<StopOutcome, BackendError>;

    /// Sends `signal` to the VMM process.
    fn kill(&self, vm: &VmRecord, signal: nix::sys::signal::Signal) -> Result<(), BackendError>;

    /// Capability: pause and resume.
    fn as_pausable(&self) -> Option<&dyn Pausable> {
        None
    }

    /// Capability: snapshots and restores.
    fn as_snapshotting(&self) -> Option<&dyn Snapshotting> {
        None
    }
}

/// Where a snapshot's files go, and what the VM's disks do.
#[derive(Clone, Debug)]
pub struct SnapshotTarget {
    /// The snapshot's folder (exists, empty).
    pub dir: PathBuf,
    /// The writable disks whose layers are frozen into `dir`, all at the
    /// same instant; the VM goes on in new layers.
    pub disks: Vec<DiskFreeze>,
    /// Stop the VMM after saving instead of letting the guest run on.
    pub stop_after: bool,
}

/// Which of a VM's disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskRole {
    Root,
    /// A data disk, by its place in the spec.
    Data(usize),
}

/// One disk's freeze: its writable layer now (in the VM's work dir) goes
/// into the snapshot as `frozen`; `next` is the new layer.
#[derive(Clone, Debug)]
pub struct DiskFreeze {
    pub role: DiskRole,
    pub current: PathBuf,
    pub next: PathBuf,
    /// A name for the new layer, unique in the VMM.
    pub node: String,
    /// The frozen layer's file name in the snapshot's folder.
    pub frozen: String,
}

/// What a snapshot holds, as saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTaken {
    /// The RAM is in `dir/ram` (else inside `dir/state`).
    pub ram_file: bool,
    /// How long the guest was paused.
    pub paused: Duration,
    /// The VMM's version, which a restore must match.
    pub vmm_version: String,
    /// Size of a cloud-init seed attached to this boot: a restore needs a
    /// disk of that size in its place.
    pub seed_bytes: Option<u64>,
    /// The guest ran when the snapshot began (else the user had paused it).
    pub was_running: bool,
}

/// Capability: save a running VM (memory, devices, disk) and start VMs from
/// what was saved.
pub trait Snapshotting {
    /// Pauses the VM, freezes its disk layers, saves devices and memory
    /// into `target.dir`, then resumes it; with `stop_after` it stays
    /// paused for [`Snapshotting::finish_stopped`]. The guest runs on
    /// after a failure too.
    fn snapshot(
        &self,
        vm: &VmRecord,
        target: &SnapshotTarget,
    ) -> Result<SnapshotTaken, BackendError>;

    /// After a `stop_after` snapshot: ends the VM (`end`: its snapshot is
    /// safe; returns once the VMM has exited, so its disks are free) or
    /// lets its guest run on (the snapshot failed after all).
    fn finish_stopped(&self, vm: &VmRecord, end: bool) -> Result<(), BackendError>;

    /// Rewrites the header of the running VM's new layer `node` of disk
    /// `role` to name `backing` (the same file by another name) as its
    /// backing file.
    fn relink_layer(
        &self,
        vm: &VmRecord,
        role: DiskRole,
        node: &str,
        backing: &std::path::Path,
    ) -> Result<(), BackendError>;

    /// Feeds the saved device state to a VMM launched with `incoming` and
    /// lets the guest run, within `timeout`. Refused unless the VMM's
    /// version is the one that saved it.
    fn receive(
        &self,
        vm: &VmRecord,
        saved: &SavedState<'_>,
        timeout: Duration,
    ) -> Result<(), BackendError>;
}

/// A snapshot's saved state, as a restore feeds it to a new VMM.
#[derive(Clone, Copy, Debug)]
pub struct SavedState<'a> {
    pub state: &'a std::path::Path,
    /// The RAM is in its own file (else inside `state`).
    pub ram_file: bool,
    pub vmm_version: &'a str,
    /// vCPUs and memory to plug in once the state is loaded, before the
    /// guest runs on.
    pub growth: &'a machine::Growth,
    /// The number the added DIMM gets: how many the saved machine has.
    pub next_dimm: usize,
}

/// Capability: stop and continue the vCPUs.
pub trait Pausable {
    fn pause(&self, vm: &VmRecord) -> Result<(), BackendError>;
    fn resume(&self, vm: &VmRecord) -> Result<(), BackendError>;
}

//! Backends run VMMs. A small core trait ([`Backend`]) every backend
//! implements, plus capability traits ([`Pausable`], later snapshots and
//! hotplug) that a backend offers through `as_*` accessors.

pub mod noop;
pub mod process;
#[cfg(feature = "qemu")]
pub mod qemu;

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
}

/// Capability: stop and continue the vCPUs.
pub trait Pausable {
    fn pause(&self, vm: &VmRecord) -> Result<(), BackendError>;
    fn resume(&self, vm: &VmRecord) -> Result<(), BackendError>;
}

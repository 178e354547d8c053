//! The manager's error: one enum, each variant naming what failed and, where
//! the user can act, how to fix it.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::BackendError;
use crate::guest::GuestError;
use crate::image::DefaultImageError;
use crate::layout::LayoutError;
use crate::record::VmState;
use crate::spec::SpecError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("cannot prepare the default image")]
    Image(#[from] DefaultImageError),
    #[error("VM {name}: {source}")]
    Backend {
        name: String,
        #[source]
        source: BackendError,
    },
    #[error("VM {name}: snapshot {snapshot} is saved, but the VM could not be ended after it ({source}); end it with `hangar stop {name}{namespace_flag}`")]
    NotEndedAfterSnapshot {
        name: String,
        namespace_flag: String,
        snapshot: String,
        #[source]
        source: Box<BackendError>,
    },
    #[error("{failure}; and VM {name} stays paused: it could not be resumed ({source}); resume it with `hangar resume {name}{namespace_flag}`")]
    NotResumedAfterSnapshot {
        failure: Box<ManagerError>,
        name: String,
        namespace_flag: String,
        #[source]
        source: Box<BackendError>,
    },
    /// The host lacks something every VM needs.
    #[error(transparent)]
    Host(BackendError),
    #[error("VM {name} is {state}: cannot {action}{hint}")]
    InvalidState {
        name: String,
        state: VmState,
        action: &'static str,
        hint: &'static str,
    },
    #[error("VM {name} did not become ready within {waited:?}: {reason}{}", console_suffix(.console))]
    NotReady {
        name: String,
        waited: Duration,
        reason: String,
        console: Vec<String>,
    },
    #[error("VM {name}: {source}{}", console_suffix(.console))]
    Guest {
        name: String,
        #[source]
        source: GuestError,
        console: Vec<String>,
    },
    #[error("VM {name} did not reach {target} within {waited:?}; it is {state}")]
    WaitTimeout {
        name: String,
        target: VmState,
        state: VmState,
        waited: Duration,
    },
    #[error("VM {name}: provision step {step} (`{argv}`) failed with {status}")]
    Provision {
        name: String,
        step: usize,
        argv: String,
        status: String,
    },
    #[error(
        "image source {reference:?} is not supported yet: use \"default\" or an imported OCI image"
    )]
    UnknownImage { reference: String },
    #[error("image {reference} is used by VMs {vms}; remove them first")]
    ImageInUse { reference: String, vms: String },
    #[error(transparent)]
    Catalog(#[from] crate::image::catalog::CatalogError),
    #[error(transparent)]
    Import(#[from] crate::image::import::ImportError),
    #[error(transparent)]
    Pull(#[from] crate::image::pull::PullError),
    #[error(transparent)]
    Rootfs(#[from] crate::image::rootfs::RootfsError),
    #[error(transparent)]
    Bundle(#[from] crate::image::bundle_store::BundleError),
    #[error(transparent)]
    Seed(#[from] crate::cloudinit::SeedError),
    #[error(transparent)]
    Disk(#[from] crate::image::disk::DiskError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("VM {name}: {source}")]
    Ssh {
        name: String,
        #[source]
        source: crate::guest::ssh::SshError,
    },
    #[error("VM {name}: its SSH private key was given in memory to the process that created it, and this process does not hold it; give it again with Manager::supply_ssh_key (the library call), or recreate the VM with a key file (--ssh-private-key FILE)")]
    SshKeyNotHeld { name: String },
    #[error("{0}")]
    Config(String),
    #[error("interrupted")]
    Interrupted,
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ManagerError {
    /// The user's Ctrl-C stopped it, in whichever wait it came.
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            Self::Interrupted | Self::Snapshot(crate::snapshot::SnapshotError::Interrupted)
        )
    }
}

fn console_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut text = String::from("\nlast console lines:");
    for line in lines {
        text.push_str("\n  ");
        text.push_str(line);
    }
    text
}

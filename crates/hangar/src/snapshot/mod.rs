//! Snapshots: a VM's memory, device state and disk, saved so that VMs can
//! start from it in a fraction of a boot (`restore`, `fork`), and moved
//! between hosts as an archive (`export`, `import`).
//!
//! A snapshot is a folder `snapshots-v1/<id>/` holding `snapshot.json` (a
//! [`SnapshotRecord`], written last: a folder without it is unfinished and
//! `gc` removes it) and the files it names:
//!
//! ```text
//! state        device state (and RAM, when `memory` is `stream`)
//! ram          guest RAM (when `memory` is `file`), sparse
//! disk.qcow2   the frozen writable layer of the root disk; its backing
//!              file is the image, or the disk of the snapshot before it
//! data-N.qcow2 the frozen writable layer of data disk N (one Hangar
//!              made); no backing file, or the snapshot before it's
//! base         a read-only root disk (the image's file, hard-linked)
//! kernel, initramfs   what the guest was booted with (hard links)
//! ```

pub mod archive;
pub mod store;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::record::{Accel, BackendKind, SavedBoot};
use crate::size::ByteSize;
use crate::spec::VmSpec;

/// The root disk's frozen layer in a snapshot's folder.
pub const ROOT_LAYER: &str = "disk.qcow2";

/// Data disk `index`'s frozen layer in a snapshot's folder.
pub fn data_layer_name(index: usize) -> String {
    format!("data-{index}.qcow2")
}

/// Version of `snapshot.json` written today; a newer one is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Where the guest's RAM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryForm {
    /// In `ram`, mapped copy-on-write by every VM restored from it.
    File,
    /// Inside `state` (the VM ran on another snapshot's memory).
    Stream,
}

/// The resources a snapshot was taken with: a restore needs at least these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory: ByteSize,
    /// The root disk's virtual size, when the VM has one.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// NICs, by network mode ("user").
    #[serde(default)]
    pub nics: Vec<String>,
    /// The machine's room to grow and memory added: a restore loads the
    /// state into the same shape. None: a fixed-size machine, which
    /// restores with exactly `cpus` and `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<crate::backend::machine::MachineShape>,
}

/// The VM a snapshot was taken of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVm {
    pub id: String,
    pub name: String,
}

/// One file of a snapshot, with its size (and sha256 once computed: always
/// in an archive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub name: String,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub format: u32,
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub source: SourceVm,
    pub backend: BackendKind,
    pub accel: Accel,
    /// The VMM that saved it (`QEMU emulator version 7.2.22 ...`): a
    /// restore needs the same.
    pub vmm_version: String,
    /// The agent protocol of the guest inside.
    pub agent_protocol: u32,
    /// The source VM's spec: what a restored VM is, unless told otherwise.
    pub spec: VmSpec,
    pub resources: Resources,
    pub memory: MemoryForm,
    /// Boot files and disk, as names in the folder.
    pub boot: SavedBoot,
    /// The snapshot whose disk this one's frozen layer sits on.
    #[serde(default)]
    pub parent: Option<String>,
    /// The image it was made from, as a reference (`bundle:ID`, ...): the
    /// image cannot be removed while a snapshot needs it.
    #[serde(default)]
    pub image: Option<String>,
    /// Size of a cloud-init seed attached when it was taken (a restore
    /// attaches an empty disk of that size: the device must exist).
    #[serde(default)]
    pub seed_bytes: Option<u64>,
    /// How long the guest was paused to take it.
    #[serde(default)]
    pub paused_ms: u64,
    pub files: Vec<SnapshotFile>,
}

impl SnapshotRecord {
    /// Bytes on disk (holes not counted by the caller's `du`).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot named {reference:?} (see `hangar snapshot ls`)")]
    NotFound { reference: String },
    #[error(
        "a snapshot named {name:?} exists already (id {id}); pick another --name or remove it"
    )]
    NameTaken { name: String, id: String },
    #[error("snapshot name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("snapshot {name} is used by {users}; remove those first (a VM starting from it needs it only until it runs), or pass --force (they will no longer start)")]
    InUse { name: String, users: String },
    #[error("{path}: snapshot.json is format {found}, this hangar reads up to {supported}; upgrade hangar")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: {detail}")]
    Damaged { path: PathBuf, detail: String },
    #[error("archive {path}: {detail}; nothing was imported")]
    BadArchive { path: PathBuf, detail: String },
    #[error("{path}: another hangar has held the snapshot lock for over {waited:?} (a snapshot create, import or removal still running?); try again once it is done")]
    Busy {
        path: PathBuf,
        waited: std::time::Duration,
    },
    #[error("interrupted while waiting for the snapshot lock; nothing was changed")]
    Interrupted,
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The longest description kept.
pub const MAX_DESCRIPTION: usize = 1024;

/// A description shown in listings: one line, no control characters.
pub fn valid_description(text: &str) -> bool {
    text.len() <= MAX_DESCRIPTION && !text.chars().any(char::is_control)
}

/// Checks a snapshot name: like VM names, it goes into listings and
/// archive envelopes, never into paths.
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let bad = |why: &str| SnapshotError::BadName {
        name: name.to_owned(),
        why: why.to_owned(),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("use 1 to 63 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad("use letters, digits, '-', '_' and '.'"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("start with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["warm", "a.1", "step-2_b"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "../x", "a b", "-x", ".hidden", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}

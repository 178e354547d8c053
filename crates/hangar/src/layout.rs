//! Where Hangar keeps things. One state directory holds everything:
//!
//! ```text
//! <state>/                      0700
//!   hangar.db                   SQLite store (WAL): VM records
//!   hangar.lock                 held briefly while a process opens the store
//!   vms/<id>/                   a VM's work dir: qmp.sock, agent*.sock,
//!                               console.sock, console.log, qemu.pid,
//!                               qemu.log, root.qcow2 (its overlay of an
//!                               OCI image's or a bundle's root file system)
//!   images-v1/default/<key>/    the embedded default image: vmlinux,
//!                               initramfs.cpio, image.json (key = its inputs)
//!   images-v1/oci/<hex>/        an OCI image by manifest digest: image.json,
//!                               rootfs.ext4 (see image::catalog)
//!   images-v1/oci/refs/<name>   which manifest digest a name points to
//!   images-v1/bundles/<id>/     a base-image bundle: bundle.json, kernel,
//!                               rootfs (see image::bundle_store)
//!   images-v1/tmp/              half-built images and imports (removed by gc)
//!   blobs-v1/sha256/<hex>       content-addressed blobs, each verified
//!                               against its digest and size (image::blobs)
//!   blobs-v1/tmp/               blobs being written
//!   packages-v1/                Debian packages Hangar downloaded itself
//!   cache-v1/accel.json         the accelerator probe's cached verdict
//!   snapshots-v1/<id>/          a snapshot: snapshot.json, state, ram,
//!                               disk.qcow2, ... (see snapshot/mod.rs)
//!   snapshots-v1/lock           held while snapshots are added or removed
//! ```
//!
//! A running VM's RAM is a file on tmpfs, `/dev/shm/hangar-<uid>/<state
//! tag>-<id>.ram` (0700 folder; see `backend::qemu::snapshot::ram_path`),
//! removed when its VMM ends (`gc` removes leftovers).
//!
//! The state dir comes from `--state-dir`, else `HANGAR_HOME`, else
//! `/var/lib/hangar` for root and `$XDG_DATA_HOME/hangar` for other users.
//! Folders carry a version (`images-v1`) so a future layout can live beside
//! this one.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the state directory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot create state directory {path}; pass --state-dir or set HANGAR_HOME to a writable place")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no state directory: HOME is not set; pass --state-dir or set HANGAR_HOME")]
    NoHome,
}

/// Paths below one state directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Picks the state dir: explicit, then `HANGAR_HOME`, then the default.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, LayoutError> {
        let root = match explicit {
            Some(path) => path.to_path_buf(),
            None => match std::env::var_os("HANGAR_HOME").filter(|v| !v.is_empty()) {
                Some(home) => PathBuf::from(home),
                None if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/hangar"),
                None => dirs::data_dir().ok_or(LayoutError::NoHome)?.join("hangar"),
            },
        };
        Self::at(root)
    }

    /// Uses `root` as the state dir, creating it (0700) if needed. A
    /// relative `root` is taken from the current directory and kept
    /// absolute: records and the VMM's argv hold paths below it, and QEMU
    /// resolves them after it left the directory hangar ran in.
    pub fn at(root: PathBuf) -> Result<Self, LayoutError> {
        let root = std::path::absolute(&root).map_err(|source| LayoutError::Create {
            path: root.clone(),
            source,
        })?;
        let layout = Self { root };
        for dir in [
            layout.root.clone(),
            layout.vms_dir(),
            layout.images_dir(),
            layout.cache_dir(),
        ] {
            create_private_dir(&dir)?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("hangar.db")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images-v1")
    }

    pub fn packages_dir(&self) -> PathBuf {
        self.root.join("packages-v1")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache-v1")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots-v1")
    }
}

/// Creates `dir` and missing parents with mode 0700, and tightens an existing
/// one: the state dir holds sockets that control VMs.
pub fn create_private_dir(dir: &Path) -> Result<(), LayoutError> {
    let create_err = |source| LayoutError::Create {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(create_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_state_dir_is_kept_absolute() {
        let name = format!("hangar-layout-relative-{}", std::process::id());
        let cwd = std::env::current_dir().unwrap();
        let layout = Layout::at(PathBuf::from(&name)).unwrap();
        assert_eq!(layout.root(), cwd.join(&name));
        assert!(layout.vm_dir("x").is_absolute());
        std::fs::remove_dir_all(cwd.join(&name)).unwrap();
    }

    #[test]
    fn state_dir_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::at(tmp.path().join("state")).unwrap();
        let mode = std::fs::metadata(layout.root())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(layout.vms_dir().is_dir());
    }
}

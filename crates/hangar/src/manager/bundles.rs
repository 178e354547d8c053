//! Base-image bundles for VMs: add (fetch, verify, cache with LRU
//! eviction), list, remove, and what a VM of a bundle boots.

use std::collections::BTreeSet;

use super::{Manager, ManagerError};
use crate::image::bundle::{machine_owned_arg, RootfsType};
use crate::image::bundle_store::{
    AddReport, BundleError, BundleRecord, BundleStore, DamagedBundle, RemovedBundle,
};
use crate::image::pull::PullEvent;
use crate::spec::ImageSource;

/// The environment variable that sets the cache size when the caller
/// does not.
pub const MAX_BUNDLES_ENV: &str = "HANGAR_MAX_BUNDLES";

/// What a VM of a bundle boots: its kernel and root disk, and the kernel
/// arguments that go with them.
#[derive(Clone, Debug)]
pub(super) struct BundleBoot {
    pub kernel: std::path::PathBuf,
    pub root_disk: crate::backend::RootDisk,
    pub cmdline_extra: String,
}

impl Manager {
    pub fn bundle_store(&self) -> BundleStore {
        BundleStore::new(self.layout.root())
    }

    /// The cache size: `max` if given, else `HANGAR_MAX_BUNDLES`, else 2.
    pub fn max_bundles(max: Option<usize>) -> Result<usize, ManagerError> {
        if let Some(max) = max {
            if max == 0 {
                return Err(ManagerError::Config(
                    "--max-bundles 0 would evict the bundle being added; give 1 or more".into(),
                ));
            }
            return Ok(max);
        }
        match std::env::var(MAX_BUNDLES_ENV) {
            Ok(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    ManagerError::Config(format!(
                        "{MAX_BUNDLES_ENV}={text:?} is not a number of bundles (1 or more)"
                    ))
                }),
            Err(_) => Ok(crate::image::bundle_store::DEFAULT_MAX_BUNDLES),
        }
    }

    /// Adds the bundle a manifest (file or http(s) URL) describes: both
    /// artifacts fetched and checked (sha256, size, format) before the
    /// bundle is named, then bundles beyond `max` evicted, least recently
    /// used first, never one a VM uses.
    pub fn add_bundle(
        &self,
        manifest_source: &str,
        max: Option<usize>,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<AddReport, ManagerError> {
        let max = Self::max_bundles(max)?;
        // Shared with other image work; `image gc` (alone) then never
        // takes this add's scratch files for leftovers.
        let _in_use = self.image_work_lock(false)?;
        let store = self.bundle_store();
        progress(PullEvent::Step("reading the manifest".into()));
        let manifest = store.read_manifest(manifest_source)?;
        let fetched = store.fetch(&manifest, progress)?;
        let _alone = store.lock(true)?;
        let pinned = self.pinned_bundles()?;
        Ok(store.install(&manifest, manifest_source, fetched, max, &pinned)?)
    }

    /// The cached bundles, and the damaged entries listing skipped (each
    /// one's `Display` is the warning to print).
    pub fn scan_bundles(&self) -> Result<(Vec<BundleRecord>, Vec<DamagedBundle>), ManagerError> {
        Ok(self.bundle_store().scan()?)
    }

    pub fn bundle(&self, id: &str) -> Result<BundleRecord, ManagerError> {
        Ok(self.bundle_store().require(id)?)
    }

    /// Removes a bundle (also a damaged one), refused while a VM uses it.
    pub(super) fn remove_bundle(&self, id: &str) -> Result<RemovedBundle, ManagerError> {
        // Image work, like an add: `image gc` (alone) never empties the
        // scratch folder under this removal's feet.
        let _in_use = self.image_work_lock(false)?;
        let store = self.bundle_store();
        let _alone = store.lock(true)?;
        let users = self.bundle_users(id)?;
        if !users.is_empty() {
            return Err(BundleError::InUse {
                bundle_id: id.to_owned(),
                users: format!("VMs {}", users.join(", ")),
            }
            .into());
        }
        Ok(store.remove(id)?)
    }

    /// Bundles VMs use (and so may not be evicted or changed).
    fn pinned_bundles(&self) -> Result<BTreeSet<String>, ManagerError> {
        Ok(self
            .image_users()?
            .into_iter()
            .filter_map(|(_, image)| match image {
                ImageSource::Bundle { id } => Some(id),
                _ => None,
            })
            .collect())
    }

    fn bundle_users(&self, id: &str) -> Result<Vec<String>, ManagerError> {
        Ok(self
            .image_users()?
            .into_iter()
            .filter(|(_, image)| matches!(image, ImageSource::Bundle { id: used } if used == id))
            .map(|(user, _)| user)
            .collect())
    }

    /// A bundle's kernel, root disk and arguments for a boot (and a mark
    /// in the LRU clock, under the cache lock: the VM pins the bundle, so
    /// its files stay once the lock is released).
    pub(super) fn bundle_boot(&self, id: &str) -> Result<BundleBoot, ManagerError> {
        let store = self.bundle_store();
        let record = store.touch(id)?;
        let mut extra = vec![
            "hangar.root=/dev/vda".to_owned(),
            format!("hangar.rootfstype={}", record.rootfs_type.as_str()),
        ];
        if record.rootfs_read_only {
            extra.push("hangar.rootro=1".into());
        }
        // The bundle's own arguments, minus those Hangar's machine owns.
        extra.extend(
            record
                .boot_args
                .split_whitespace()
                .filter(|arg| !machine_owned_arg(arg))
                .map(str::to_owned),
        );
        Ok(BundleBoot {
            kernel: store.kernel_path(id),
            root_disk: crate::backend::RootDisk {
                base: store.rootfs_path(id),
                format: crate::image::disk::DiskFormat::Raw,
                read_only: record.rootfs_read_only || record.rootfs_type == RootfsType::Squashfs,
                size: None,
            },
            cmdline_extra: extra.join(" "),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::manager::ManagerOptions;
    use crate::record::Accel;

    fn manager(state: &Path) -> Manager {
        Manager::open(ManagerOptions {
            state_dir: Some(state.to_path_buf()),
            accel: Some(Accel::Tcg),
        })
        .unwrap()
    }

    /// Adds bundle `id`: an ELF header for a kernel, an ext4 magic for a
    /// root file system (all the add checks).
    fn add(m: &Manager, files: &Path, id: &str) {
        std::fs::create_dir_all(files).unwrap();
        let mut kernel = b"\x7fELF".to_vec();
        kernel.resize(4096, 0);
        let mut rootfs = vec![0u8; 4096];
        rootfs[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        std::fs::write(files.join("vmlinux"), kernel).unwrap();
        std::fs::write(files.join("rootfs"), rootfs).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 1, "bundleId": id, "arch": "x86_64", "rootfsType": "ext4",
            "kernel": {"path": "vmlinux"}, "rootfs": {"path": "rootfs"},
        });
        let path = files.join(format!("{id}.json"));
        std::fs::write(&path, manifest.to_string()).unwrap();
        m.add_bundle(path.to_str().unwrap(), Some(8), &mut |_| {})
            .unwrap();
    }

    #[test]
    fn removing_a_damaged_bundle_waits_for_image_gc() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let m = manager(&state);
        add(&m, &dir.path().join("files"), "a");
        let record = m.bundle_store().bundle_dir("a").join("bundle.json");
        std::fs::write(&record, b"not json").unwrap();
        // `image gc` holds the image-work lock alone while it empties the
        // scratch folders a removal goes through.
        let gc = m.image_work_lock(true).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let remover = {
            let state = state.clone();
            std::thread::spawn(move || {
                let removed = manager(&state)
                    .remove_image("bundle:a")
                    .map_err(|err| err.to_string());
                done.send(()).unwrap();
                removed
            })
        };
        assert!(
            finished.recv_timeout(Duration::from_millis(500)).is_err(),
            "the removal did not wait for image gc"
        );
        drop(gc);
        finished.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(remover.join().unwrap().unwrap(), "a");
        assert!(!m.bundle_store().bundle_dir("a").exists());
        assert!(m.scan_bundles().unwrap().1.is_empty());
    }

    #[test]
    fn a_boot_waits_while_the_cache_changes() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let m = manager(&state);
        add(&m, &dir.path().join("files"), "a");
        let changing = m.bundle_store().lock(true).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let booter = {
            let state = state.clone();
            std::thread::spawn(move || {
                let boot = manager(&state).bundle_boot("a").map(|boot| boot.kernel);
                done.send(()).unwrap();
                boot.map_err(|err| err.to_string())
            })
        };
        assert!(
            finished.recv_timeout(Duration::from_millis(500)).is_err(),
            "the boot's touch did not wait for the cache lock"
        );
        drop(changing);
        finished.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            booter.join().unwrap().unwrap(),
            m.bundle_store().kernel_path("a")
        );
    }
}

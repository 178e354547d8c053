//! Base-image bundles for VMs: add (fetch, verify, cache with LRU
//! eviction), list, remove, and what a VM of a bundle boots.

use std::collections::BTreeSet;

use super::{Manager, ManagerError};
use crate::image::bundle::{machine_owned_arg, RootfsType};
use crate::image::bundle_store::{AddReport, BundleError, BundleRecord, BundleStore};
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

    pub fn bundles(&self) -> Result<Vec<BundleRecord>, ManagerError> {
        Ok(self.bundle_store().list()?)
    }

    pub fn bundle(&self, id: &str) -> Result<BundleRecord, ManagerError> {
        Ok(self.bundle_store().require(id)?)
    }

    /// Removes a bundle, refused while a VM uses it.
    pub(super) fn remove_bundle(&self, id: &str) -> Result<BundleRecord, ManagerError> {
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
    /// in the LRU clock).
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

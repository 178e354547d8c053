//! OCI images for VMs: import, list, remove, and what a VM of an image
//! boots and runs.

use std::path::{Path, PathBuf};

use hangar_proto::ExecRequest;

use super::{Manager, ManagerError};
use crate::image::blobs::BlobStore;
use crate::image::bundle_store::BundleLock;
use crate::image::catalog::{Catalog, ImageRecord};
use crate::image::import::{import, Imported};
use crate::image::pull::{pull, PullEvent, PullOptions};
use crate::image::rootfs::ensure_rootfs;
use crate::record::VmRecord;
use crate::spec::ImageSource;

impl Manager {
    pub fn blob_store(&self) -> BlobStore {
        BlobStore::new(self.layout.root())
    }

    pub fn image_catalog(&self) -> Catalog {
        Catalog::new(self.layout.root())
    }

    /// Imports an OCI layout or `docker save` archive: every blob checked,
    /// the root file system built (so a hostile or broken layer is refused
    /// now), and only then the names recorded.
    pub fn import_image(&self, source: &Path, tag: Option<&str>) -> Result<Imported, ManagerError> {
        let scratch = self.layout.images_dir().join("tmp");
        crate::layout::create_private_dir(&scratch)?;
        let _in_use = self.image_work_lock(false)?;
        let imported = import(source, tag, &self.blob_store(), &scratch)?;
        for (names, record) in &imported {
            self.build_rootfs(record)?;
            self.image_catalog().save(record, names)?;
        }
        Ok(imported)
    }

    /// Pulls an image from its registry, builds its root file system, and
    /// names it. `progress` hears steps and bytes (for a progress bar).
    pub fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<(String, ImageRecord), ManagerError> {
        let scratch = self.layout.images_dir().join("tmp");
        crate::layout::create_private_dir(&scratch)?;
        let _in_use = self.image_work_lock(false)?;
        let (name, record) = pull(reference, options, &self.blob_store(), &scratch, progress)?;
        progress(PullEvent::Step("building the root file system".into()));
        self.build_rootfs(&record)?;
        self.image_catalog()
            .save(&record, std::slice::from_ref(&name))?;
        Ok((name, record))
    }

    pub fn images(&self) -> Result<Vec<(Vec<String>, ImageRecord)>, ManagerError> {
        Ok(self.image_catalog().list()?)
    }

    pub fn image(&self, reference: &str) -> Result<ImageRecord, ManagerError> {
        Ok(self.image_catalog().resolve(reference)?)
    }

    /// Removes an image name (or a `bundle:ID`), refused while a VM was
    /// made from the image.
    pub fn remove_image(&mut self, reference: &str) -> Result<String, ManagerError> {
        if let Some(id) = reference.strip_prefix(super::BUNDLE_PREFIX) {
            return Ok(self.remove_bundle(id)?.bundle_id);
        }
        if let Some(name) = reference.strip_prefix(super::DISK_PREFIX) {
            return Ok(self.remove_disk_image(name)?.sha256);
        }
        let record = self.image(reference)?;
        let users: Vec<String> = self
            .image_users()?
            .into_iter()
            .filter(|(_, image)| {
                image_digest(image).as_deref() == Some(record.manifest_digest.as_str())
            })
            .map(|(user, _)| user)
            .collect();
        if !users.is_empty() {
            return Err(ManagerError::ImageInUse {
                reference: reference.to_owned(),
                vms: users.join(", "),
            });
        }
        Ok(self.image_catalog().remove(reference)?)
    }

    /// Pins an OCI reference to the digest it names now, so a VM keeps
    /// its image when the name later moves. A bundle is marked used and
    /// its cache lock returned, to hold until the VM's record exists.
    pub(super) fn pin_image(
        &self,
        image: ImageSource,
    ) -> Result<(ImageSource, Option<BundleLock>), ManagerError> {
        let pinned = match image {
            ImageSource::Oci { reference } => {
                let record = self.image(&reference)?;
                let name = crate::image::oci::normalize_reference(&reference)
                    .map_err(crate::image::catalog::CatalogError::from)?;
                let name = name.split('@').next().unwrap_or(&name).to_owned();
                ImageSource::Oci {
                    reference: format!("{name}@{}", record.manifest_digest),
                }
            }
            ImageSource::Disk { name } => {
                self.disk_catalog().require(&name)?;
                ImageSource::Disk { name }
            }
            ImageSource::Bundle { id } => {
                let store = self.bundle_store();
                let lock = store.lock(false)?;
                store.touch(&id)?;
                return Ok((ImageSource::Bundle { id }, Some(lock)));
            }
            other => other,
        };
        Ok((pinned, None))
    }

    /// The image's ext4 root file system, built on first use (the image
    /// work a `run` of a stored image does).
    pub fn image_rootfs(&self, reference: &str) -> Result<PathBuf, ManagerError> {
        let record = self.image(reference)?;
        let _in_use = self.image_work_lock(false)?;
        self.build_rootfs(&record)
    }

    /// Image work (import, pull, rootfs builds) holds this shared; `image
    /// gc` holds it alone, so it never deletes a blob an import has stored
    /// but not yet named.
    pub(super) fn image_work_lock(
        &self,
        exclusive: bool,
    ) -> Result<nix::fcntl::Flock<std::fs::File>, ManagerError> {
        let dir = self.layout.images_dir();
        crate::layout::create_private_dir(&dir)?;
        let path = dir.join("gc.lock");
        crate::fsutil::lock_file_as(&path, exclusive, true)
            .map_err(|source| ManagerError::Io { path, source })
    }

    /// Removes blobs no stored image refers to, and what interrupted
    /// imports and pulls left behind. Images (and so their blobs) are kept
    /// while named; a VM keeps its image from being removed.
    pub fn gc_images(&self) -> Result<ImageGcReport, ManagerError> {
        let _alone = self.image_work_lock(true)?;
        let mut keep = std::collections::BTreeSet::new();
        for (_, record) in self.images()? {
            keep.insert(record.manifest_digest.clone());
            keep.insert(record.config_digest.clone());
            keep.extend(record.layers.iter().map(|l| l.digest.clone()));
        }
        let mut report = ImageGcReport::default();
        let blob_dir = self.layout.root().join("blobs-v1").join("sha256");
        for entry in std::fs::read_dir(&blob_dir).into_iter().flatten().flatten() {
            let name = format!("sha256:{}", entry.file_name().to_string_lossy());
            if keep.contains(&name) {
                continue;
            }
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(entry.path()).is_ok() {
                report.blobs_removed += 1;
                report.bytes_freed += bytes;
            }
        }
        // Nothing is in flight (we hold the lock alone): every scratch
        // entry is a leftover.
        let bundle_scratch = self.bundle_store().scratch_dir();
        let scratch_dirs = [
            self.layout.root().join("blobs-v1").join("tmp"),
            self.layout.images_dir().join("tmp"),
            bundle_scratch.clone(),
        ];
        for dir in scratch_dirs {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = dir.ends_with("blobs-v1/tmp")
                    || dir == bundle_scratch
                    || ["import-", "rootfs-", "pull-", "blob-"]
                        .iter()
                        .any(|prefix| name.starts_with(prefix));
                if !ours {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if removed.is_ok() {
                    report.scratch_removed += 1;
                }
            }
        }
        Ok(report)
    }

    fn build_rootfs(&self, record: &ImageRecord) -> Result<PathBuf, ManagerError> {
        let scratch = self.layout.images_dir().join("tmp");
        crate::layout::create_private_dir(&scratch)?;
        Ok(ensure_rootfs(
            record,
            &self.blob_store(),
            &self.image_catalog(),
            &scratch,
        )?)
    }

    /// A request with the image's defaults (Env, WorkingDir, User, and
    /// Entrypoint/Cmd when no command is given) filled in, like `docker
    /// run`/`docker exec`.
    pub(super) fn with_image_defaults(
        &self,
        vm: &VmRecord,
        mut request: ExecRequest,
    ) -> Result<ExecRequest, ManagerError> {
        let ImageSource::Oci { reference } = &vm.spec.image else {
            return Ok(request);
        };
        let config = self.image(reference)?.config;
        request.argv = config.argv(&request.argv);
        let mut env = config.env_pairs();
        env.retain(|(key, _)| !request.env.iter().any(|(k, _)| k == key));
        env.append(&mut request.env);
        request.env = env;
        if request.cwd.is_none() {
            request.cwd = config.working_dir.filter(|dir| !dir.is_empty());
        }
        if request.user.is_none() {
            request.user = config.user.filter(|user| !user.is_empty());
        }
        Ok(request)
    }
}

/// What `image gc` removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageGcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Leftovers of interrupted imports and pulls.
    pub scratch_removed: u64,
}

/// The manifest digest a VM's image is pinned to.
fn image_digest(image: &ImageSource) -> Option<String> {
    match image {
        ImageSource::Oci { reference } => reference.split_once('@').map(|(_, d)| d.to_owned()),
        _ => None,
    }
}

impl Manager {
    /// Who uses which image: every VM (by name) and every snapshot (as
    /// `snapshot NAME`). An image in this list may not be removed.
    pub(super) fn image_users(&self) -> Result<Vec<(String, ImageSource)>, ManagerError> {
        let mut users: Vec<(String, ImageSource)> = self
            .store
            .list()?
            .into_iter()
            .map(|vm| (vm.name, vm.spec.image))
            .collect();
        for snapshot in self.snapshot_store().list()? {
            users.push((format!("snapshot {}", snapshot.name), snapshot.spec.image));
        }
        Ok(users)
    }
}

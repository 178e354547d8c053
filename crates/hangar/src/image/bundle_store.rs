//! The base-image bundle cache: at most N bundles, the least recently used
//! evicted first, never one a VM (or, later, a snapshot) uses.
//!
//! ```text
//! images-v1/bundles/<bundle id>/bundle.json  a BundleRecord
//! images-v1/bundles/<bundle id>/kernel       verified copies of the artifacts
//! images-v1/bundles/<bundle id>/rootfs
//! images-v1/bundles/tmp/                     artifacts being fetched
//! images-v1/bundles/lock                     shared: using; exclusive: changing
//! ```
//!
//! A bundle folder appears by one rename of a fully verified folder, so a
//! bundle in the cache is always whole.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::bundle::{ArtifactSource, BundleManifest, ManifestError, ManifestOrigin, RootfsType};
use super::fetch::{fetch_file, fetch_url, Expect, FetchError, Fetched};
use super::pull::PullEvent;

/// Bundles kept when the caller does not say.
pub const DEFAULT_MAX_BUNDLES: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("bundle {bundle_id}: the {what} ({from}) is not {expected}; refused")]
    WrongFormat {
        bundle_id: String,
        what: &'static str,
        from: String,
        expected: String,
    },
    #[error("bundle {bundle_id} is not in the bundle cache; add it with `hangar image add --manifest FILE|URL`")]
    NotFound { bundle_id: String },
    #[error("bundle {bundle_id} is in use by {users}; its files cannot change or go (remove those first)")]
    InUse { bundle_id: String, users: String },
    #[error("the bundle cache entry {path} is damaged ({detail}); remove it with `hangar image rm bundle:ID` and add it again")]
    Damaged { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One stored artifact: what it is and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    pub source: ArtifactSource,
    /// Always recorded, also when the manifest gave none.
    pub sha256: String,
    pub size: u64,
}

/// A bundle in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub bundle_id: String,
    pub name: Option<String>,
    pub arch: String,
    pub firecracker_version: Option<String>,
    pub rootfs_type: RootfsType,
    pub rootfs_read_only: bool,
    pub boot_args: String,
    pub kernel: StoredArtifact,
    pub rootfs: StoredArtifact,
    /// The manifest's path or URL.
    pub manifest: String,
    pub added_at: DateTime<Utc>,
    pub last_accessed_at: DateTime<Utc>,
}

/// What adding a bundle did to the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddReport {
    pub bundle: BundleRecord,
    /// True when the same artifacts were cached already (only the access
    /// time changed).
    pub unchanged: bool,
    /// Bundles evicted to stay within the limit, least recently used first.
    pub evicted: Vec<String>,
    /// Set when the cache stays over its limit because the rest is in use.
    pub over_limit: Option<String>,
}

/// The cache under one state dir.
#[derive(Clone, Debug)]
pub struct BundleStore {
    root: PathBuf,
}

/// A held cache lock (shared to use a bundle, exclusive to change the cache).
pub type BundleLock = nix::fcntl::Flock<std::fs::File>;

impl BundleStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("images-v1").join("bundles"),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    }

    fn ensure_dirs(&self) -> Result<(), BundleError> {
        for dir in [self.root.clone(), self.scratch_dir()] {
            crate::layout::create_private_dir(&dir).map_err(|err| BundleError::Io {
                path: dir.clone(),
                source: std::io::Error::other(err.to_string()),
            })?;
        }
        Ok(())
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn bundle_dir(&self, bundle_id: &str) -> PathBuf {
        self.root.join(bundle_id)
    }

    pub fn kernel_path(&self, bundle_id: &str) -> PathBuf {
        self.bundle_dir(bundle_id).join("kernel")
    }

    pub fn rootfs_path(&self, bundle_id: &str) -> PathBuf {
        self.bundle_dir(bundle_id).join("rootfs")
    }

    /// Takes the cache lock: shared while a bundle is put to use (so it
    /// is not evicted meanwhile), exclusive while the cache changes.
    pub fn lock(&self, exclusive: bool) -> Result<BundleLock, BundleError> {
        self.ensure_dirs()?;
        let path = self.root.join("lock");
        crate::fsutil::lock_file_as(&path, exclusive, true).map_err(Self::io(&path))
    }

    /// Reads a manifest from a file or an http(s) URL.
    pub fn read_manifest(&self, source: &str) -> Result<BundleManifest, BundleError> {
        let is_url = source.starts_with("http://") || source.starts_with("https://");
        self.ensure_dirs()?;
        let scratch = tempfile::NamedTempFile::new_in(self.scratch_dir())
            .map_err(Self::io(&self.scratch_dir()))?;
        let limit = Expect {
            limit: Some(super::bundle::MAX_MANIFEST_BYTES),
            ..Default::default()
        };
        let origin = if is_url {
            fetch_url("manifest", source, scratch.path(), &limit, &mut |_| {})?;
            ManifestOrigin::Url
        } else {
            let path = Path::new(source);
            fetch_file("manifest", path, scratch.path(), &limit, &mut |_| {})?;
            let absolute = std::path::absolute(path).map_err(Self::io(path))?;
            ManifestOrigin::File {
                dir: absolute.parent().unwrap_or(Path::new("/")).to_path_buf(),
            }
        };
        let bytes = std::fs::read(scratch.path()).map_err(Self::io(scratch.path()))?;
        Ok(BundleManifest::parse(&bytes, source, &origin)?)
    }

    /// Fetches and checks a manifest's artifacts into a scratch folder
    /// (no lock held: downloads can be long), ready for [`Self::install`].
    pub fn fetch(
        &self,
        manifest: &BundleManifest,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<Fetching, BundleError> {
        self.ensure_dirs()?;
        let dir = tempfile::Builder::new()
            .prefix("add-")
            .tempdir_in(self.scratch_dir())
            .map_err(Self::io(&self.scratch_dir()))?;
        let mut fetched = Vec::new();
        for (what, artifact) in [("kernel", &manifest.kernel), ("rootfs", &manifest.rootfs)] {
            progress(PullEvent::Step(format!("fetching the {what}")));
            let dest = dir.path().join(what);
            let expect = Expect {
                sha256: artifact.sha256.clone(),
                size: artifact.size_bytes,
                limit: None,
            };
            let label = format!("bundle {} {what}", manifest.bundle_id);
            let Fetched { sha256, size } = match &artifact.source {
                ArtifactSource::Path { path } => {
                    fetch_file(&label, path, &dest, &expect, progress)?
                }
                ArtifactSource::Url { url } => fetch_url(&label, url, &dest, &expect, progress)?,
            };
            fetched.push(super::bundle_store::StoredArtifact {
                source: artifact.source.clone(),
                sha256,
                size,
            });
        }
        let rootfs = fetched.pop().expect("two artifacts");
        let kernel = fetched.pop().expect("two artifacts");
        check_kernel(manifest, &dir.path().join("kernel"))?;
        check_rootfs(manifest, &dir.path().join("rootfs"))?;
        Ok(Fetching {
            dir,
            kernel,
            rootfs,
        })
    }

    /// Puts fetched artifacts into the cache under `bundle_id`, then
    /// evicts least-recently-used bundles beyond `max` that are not in
    /// `pinned`. The caller holds the exclusive lock and computed `pinned`
    /// under it.
    pub fn install(
        &self,
        manifest: &BundleManifest,
        manifest_source: &str,
        fetched: Fetching,
        max: usize,
        pinned: &BTreeSet<String>,
    ) -> Result<AddReport, BundleError> {
        let id = &manifest.bundle_id;
        let now = Utc::now();
        let existing = self.get(id)?;
        let unchanged = existing.as_ref().is_some_and(|old| {
            old.kernel.sha256 == fetched.kernel.sha256
                && old.rootfs.sha256 == fetched.rootfs.sha256
                // What a start reads from the record must not change
                // under a VM either.
                && old.rootfs_type == manifest.rootfs_type
                && old.rootfs_read_only == manifest.rootfs_read_only
                && old.boot_args == manifest.boot_args
        });
        if existing.is_some() && !unchanged && pinned.contains(id) {
            return Err(BundleError::InUse {
                bundle_id: id.clone(),
                users: "a VM or snapshot".into(),
            });
        }
        let record = BundleRecord {
            bundle_id: id.clone(),
            name: manifest.name.clone(),
            arch: manifest.arch.clone(),
            firecracker_version: manifest.firecracker_version.clone(),
            rootfs_type: manifest.rootfs_type,
            rootfs_read_only: manifest.rootfs_read_only,
            boot_args: manifest.boot_args.clone(),
            kernel: fetched.kernel,
            rootfs: fetched.rootfs,
            manifest: manifest_source.to_owned(),
            added_at: existing
                .as_ref()
                .filter(|_| unchanged)
                .map_or(now, |old| old.added_at),
            last_accessed_at: now,
        };
        if unchanged {
            // The verified copies already there stay; the new ones go.
            self.write_record(&record)?;
        } else {
            let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
            let staged = fetched.dir.path().join("bundle.json");
            crate::fsutil::write_private(&staged, &json).map_err(Self::io(&staged))?;
            let target = self.bundle_dir(id);
            if existing.is_some() {
                // Replaced content: the old folder moves aside first (one
                // rename), then the new one takes its name.
                let aside = self.scratch_dir().join(format!(
                    "old-{id}-{}",
                    now.timestamp_nanos_opt().unwrap_or(0)
                ));
                std::fs::rename(&target, &aside).map_err(Self::io(&target))?;
                let _ = std::fs::remove_dir_all(&aside);
            }
            let staged_dir = fetched.dir.keep();
            std::fs::rename(&staged_dir, &target).map_err(Self::io(&target))?;
        }
        let (evicted, over_limit) = self.evict(max, id, pinned)?;
        Ok(AddReport {
            bundle: record,
            unchanged,
            evicted,
            over_limit,
        })
    }

    /// Removes the least recently used bundles until at most `max` remain,
    /// never `keep` nor a pinned one.
    fn evict(
        &self,
        max: usize,
        keep: &str,
        pinned: &BTreeSet<String>,
    ) -> Result<(Vec<String>, Option<String>), BundleError> {
        let mut bundles = self.list()?;
        bundles.sort_by_key(|b| b.last_accessed_at);
        let mut count = bundles.len();
        let mut evicted = Vec::new();
        for bundle in &bundles {
            if count <= max {
                break;
            }
            if bundle.bundle_id == keep || pinned.contains(&bundle.bundle_id) {
                continue;
            }
            self.remove_dir(&bundle.bundle_id)?;
            evicted.push(bundle.bundle_id.clone());
            count -= 1;
        }
        let over_limit = (count > max).then(|| {
            let held: Vec<&str> = bundles
                .iter()
                .map(|b| b.bundle_id.as_str())
                .filter(|id| *id != keep && pinned.contains(*id))
                .collect();
            format!(
                "the bundle cache holds {count} bundles, over its limit of {max}: {} in use",
                held.join(", ")
            )
        });
        Ok((evicted, over_limit))
    }

    fn remove_dir(&self, bundle_id: &str) -> Result<(), BundleError> {
        // Renamed away first, so a half-removed bundle never looks whole.
        let dir = self.bundle_dir(bundle_id);
        let aside = self
            .scratch_dir()
            .join(format!("rm-{bundle_id}-{}", std::process::id()));
        std::fs::rename(&dir, &aside).map_err(Self::io(&dir))?;
        std::fs::remove_dir_all(&aside).map_err(Self::io(&aside))
    }

    /// Removes a bundle; the caller holds the exclusive lock and checked
    /// that nothing uses it.
    pub fn remove(&self, bundle_id: &str) -> Result<BundleRecord, BundleError> {
        let record = self.get(bundle_id)?.ok_or_else(|| BundleError::NotFound {
            bundle_id: bundle_id.to_owned(),
        })?;
        self.remove_dir(bundle_id)?;
        Ok(record)
    }

    pub fn get(&self, bundle_id: &str) -> Result<Option<BundleRecord>, BundleError> {
        if super::bundle::validate_bundle_id(bundle_id).is_err() {
            return Ok(None);
        }
        let path = self.bundle_dir(bundle_id).join("bundle.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BundleError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| BundleError::Damaged {
                path,
                detail: err.to_string(),
            })
    }

    /// A bundle that must exist.
    pub fn require(&self, bundle_id: &str) -> Result<BundleRecord, BundleError> {
        self.get(bundle_id)?.ok_or_else(|| BundleError::NotFound {
            bundle_id: bundle_id.to_owned(),
        })
    }

    /// Marks a bundle used now (the LRU clock).
    pub fn touch(&self, bundle_id: &str) -> Result<BundleRecord, BundleError> {
        let mut record = self.require(bundle_id)?;
        record.last_accessed_at = Utc::now();
        self.write_record(&record)?;
        Ok(record)
    }

    fn write_record(&self, record: &BundleRecord) -> Result<(), BundleError> {
        let path = self.bundle_dir(&record.bundle_id).join("bundle.json");
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        crate::fsutil::write_atomic(&path, &json).map_err(Self::io(&path))
    }

    /// Every cached bundle, by id.
    pub fn list(&self) -> Result<Vec<BundleRecord>, BundleError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(BundleError::Io {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "tmp" || !entry.path().is_dir() {
                continue;
            }
            if let Some(record) = self.get(&name)? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.bundle_id.cmp(&b.bundle_id));
        Ok(out)
    }
}

/// Artifacts fetched and verified, waiting for [`BundleStore::install`];
/// dropped, the scratch folder goes.
#[derive(Debug)]
pub struct Fetching {
    dir: tempfile::TempDir,
    kernel: StoredArtifact,
    rootfs: StoredArtifact,
}

/// A kernel QEMU (and Firecracker) can load: an ELF vmlinux or a bzImage.
fn check_kernel(manifest: &BundleManifest, path: &Path) -> Result<(), BundleError> {
    let head = read_head(path, 0x210)?;
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS";
    if elf || bzimage {
        return Ok(());
    }
    Err(BundleError::WrongFormat {
        bundle_id: manifest.bundle_id.clone(),
        what: "kernel",
        from: describe(&manifest.kernel.source),
        expected: "an ELF vmlinux or a bzImage".into(),
    })
}

/// The root file system is the type the manifest says.
fn check_rootfs(manifest: &BundleManifest, path: &Path) -> Result<(), BundleError> {
    let head = read_head(path, 2048)?;
    let ok = match manifest.rootfs_type {
        // The superblock starts at 1024; its magic 0xEF53 at offset 56.
        RootfsType::Ext4 => head.len() >= 1082 && head[1080..1082] == [0x53, 0xEF],
        RootfsType::Squashfs => head.starts_with(b"hsqs"),
    };
    if ok {
        return Ok(());
    }
    Err(BundleError::WrongFormat {
        bundle_id: manifest.bundle_id.clone(),
        what: "rootfs",
        from: describe(&manifest.rootfs.source),
        expected: match manifest.rootfs_type {
            RootfsType::Ext4 => "an ext4 file system".into(),
            RootfsType::Squashfs => "a squashfs file system".into(),
        },
    })
}

fn read_head(path: &Path, len: usize) -> Result<Vec<u8>, BundleError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(len);
    std::fs::File::open(path)
        .and_then(|file| file.take(len as u64).read_to_end(&mut head))
        .map_err(BundleStore::io(path))?;
    Ok(head)
}

fn describe(source: &ArtifactSource) -> String {
    match source {
        ArtifactSource::Path { path } => path.display().to_string(),
        ArtifactSource::Url { url } => url.clone(),
    }
}

#[cfg(test)]
mod tests;

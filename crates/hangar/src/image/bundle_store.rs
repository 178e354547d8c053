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
//! A bundle folder appears by one rename of a fully verified folder (its
//! record flushed first), and a changed bundle replaces the old folder by
//! one atomic exchange, so a bundle in the cache is always whole and a
//! crash never leaves neither the old nor the new one. A folder whose
//! record is damaged is skipped (with a warning) by listing and eviction,
//! and `hangar image rm bundle:ID` removes it without reading it.
//!
//! URLs are recorded redacted (no `user:pass@`, no query): the full URL
//! lives only in memory, for the download.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::bundle::{
    validate_bundle_id, Artifact, ArtifactSource, BundleManifest, ManifestError, ManifestOrigin,
    RootfsType,
};
use super::fetch::{fetch_file, fetch_url, redact_url, Expect, FetchError, Fetched};
use super::pull::PullEvent;

/// Bundles kept when the caller does not say.
pub const DEFAULT_MAX_BUNDLES: usize = 2;

/// The most bytes Hangar downloads for an artifact `url` whose manifest
/// gives no `sizeBytes`, so a hostile or broken server cannot fill the
/// disk. A manifest that declares `sizeBytes` may name a larger file.
pub const MAX_UNDECLARED_DOWNLOAD_BYTES: u64 = 4 << 30;

/// The record's file name in a bundle's folder.
const RECORD_FILE: &str = "bundle.json";

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
    #[error("the bundle cache entry {path} is damaged ({detail}); remove it with `hangar image rm bundle:{bundle_id}` and add it again")]
    Damaged {
        bundle_id: String,
        path: PathBuf,
        detail: String,
    },
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
    /// Damaged entries eviction skipped (neither counted nor removed).
    pub damaged: Vec<DamagedBundle>,
}

/// A cache folder that is not a readable bundle (its record damaged,
/// missing or unreadable): listing and eviction skip it, `hangar image rm
/// bundle:ID` removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedBundle {
    pub bundle_id: String,
    pub dir: PathBuf,
    pub detail: String,
}

impl std::fmt::Display for DamagedBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "skipped the damaged bundle cache entry {} ({}); remove it with `hangar image rm bundle:{}` and add it again",
            self.dir.display(),
            self.detail,
            self.bundle_id
        )
    }
}

/// What removing a bundle removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemovedBundle {
    pub bundle_id: String,
    /// None when the record was damaged (the folder went all the same).
    pub record: Option<BundleRecord>,
}

/// The cache under one state dir.
#[derive(Clone, Debug)]
pub struct BundleStore {
    root: PathBuf,
    /// [`MAX_UNDECLARED_DOWNLOAD_BYTES`] (smaller in tests).
    download_cap: u64,
}

/// A held cache lock (shared to use a bundle, exclusive to change the cache).
pub type BundleLock = nix::fcntl::Flock<std::fs::File>;

impl BundleStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("images-v1").join("bundles"),
            download_cap: MAX_UNDECLARED_DOWNLOAD_BYTES,
        }
    }

    #[cfg(test)]
    fn with_download_cap(mut self, bytes: u64) -> Self {
        self.download_cap = bytes;
        self
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
    /// is not evicted meanwhile), exclusive while the cache changes. A
    /// process holding it exclusive must not take it again (a second
    /// descriptor waits for the first); shared twice is fine.
    pub fn lock(&self, exclusive: bool) -> Result<BundleLock, BundleError> {
        self.ensure_dirs()?;
        let path = self.root.join("lock");
        crate::fsutil::lock_file_as(&path, exclusive, true).map_err(Self::io(&path))
    }

    /// Reads a manifest from a file or an http(s) URL (named redacted in
    /// errors).
    pub fn read_manifest(&self, source: &str) -> Result<BundleManifest, BundleError> {
        let is_url = source.starts_with("http://") || source.starts_with("https://");
        self.ensure_dirs()?;
        let scratch = tempfile::NamedTempFile::new_in(self.scratch_dir())
            .map_err(Self::io(&self.scratch_dir()))?;
        let limit = Expect {
            limit: Some(super::bundle::MAX_MANIFEST_BYTES),
            limit_note: Some("the most a bundle manifest may be".into()),
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
        Ok(BundleManifest::parse(&bytes, &redact_url(source), &origin)?)
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
            let expect = self.expect(what, artifact);
            let label = format!("bundle {} {what}", manifest.bundle_id);
            let Fetched { sha256, size } = match &artifact.source {
                ArtifactSource::Path { path } => {
                    fetch_file(&label, path, &dest, &expect, progress)?
                }
                ArtifactSource::Url { url } => fetch_url(&label, url, &dest, &expect, progress)?,
            };
            fetched.push(StoredArtifact {
                source: recorded_source(&artifact.source),
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

    /// What to check while `artifact` (the `what` of a manifest) is
    /// fetched: its sha256 and size, and for a download of no declared
    /// size, the cap.
    fn expect(&self, what: &str, artifact: &Artifact) -> Expect {
        let capped =
            artifact.size_bytes.is_none() && matches!(artifact.source, ArtifactSource::Url { .. });
        Expect {
            sha256: artifact.sha256.clone(),
            size: artifact.size_bytes,
            limit: capped.then_some(self.download_cap),
            limit_note: capped.then(|| {
                format!(
                    "the most Hangar downloads for an artifact without `sizeBytes` ({}, MAX_UNDECLARED_DOWNLOAD_BYTES); declare `{what}.sizeBytes` in the manifest to take a larger file",
                    human_bytes(self.download_cap)
                )
            }),
        }
    }

    /// Puts fetched artifacts into the cache under `bundle_id`, then
    /// evicts least-recently-used bundles beyond `max` that are not in
    /// `pinned`. The caller holds the exclusive lock and computed `pinned`
    /// under it. A damaged entry of the same id is replaced.
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
        let (existing, present) = match self.get(id) {
            Ok(existing) => {
                let present = existing.is_some();
                (existing, present)
            }
            // Present, content unknown: replaced like changed content.
            Err(BundleError::Damaged { .. }) => (None, true),
            Err(other) => return Err(other),
        };
        let unchanged = existing.as_ref().is_some_and(|old| {
            old.kernel.sha256 == fetched.kernel.sha256
                && old.rootfs.sha256 == fetched.rootfs.sha256
                // What a start reads from the record must not change
                // under a VM either.
                && old.rootfs_type == manifest.rootfs_type
                && old.rootfs_read_only == manifest.rootfs_read_only
                && old.boot_args == manifest.boot_args
        });
        if present && !unchanged && pinned.contains(id) {
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
            manifest: redact_url(manifest_source),
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
            self.put_in_place(&record, fetched.dir, present)?;
        }
        let eviction = self.evict(max, id, pinned)?;
        Ok(AddReport {
            bundle: record,
            unchanged,
            evicted: eviction.evicted,
            over_limit: eviction.over_limit,
            damaged: eviction.damaged,
        })
    }

    /// Writes the record into the fetched folder (flushed: the folder is
    /// whole before it has a name), then gives the folder the bundle's
    /// name: one rename, or one exchange with the folder there (`present`),
    /// whose old content is then deleted.
    fn put_in_place(
        &self,
        record: &BundleRecord,
        fetched: tempfile::TempDir,
        present: bool,
    ) -> Result<(), BundleError> {
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        let staged = fetched.path().join(RECORD_FILE);
        crate::fsutil::write_atomic(&staged, &json).map_err(Self::io(&staged))?;
        sync_dir(fetched.path()).map_err(Self::io(fetched.path()))?;
        let target = self.bundle_dir(&record.bundle_id);
        // From here a crash leaves the folder to `image gc`, not to the
        // guard's drop.
        let staged_dir = fetched.keep();
        let moved = if present {
            let aside = self.aside_path("old", &record.bundle_id);
            replace_dir(&staged_dir, &target, &aside)
        } else {
            std::fs::rename(&staged_dir, &target).map(|()| staged_dir.clone())
        };
        let old = match moved {
            Ok(old) => old,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&staged_dir);
                return Err(BundleError::Io {
                    path: target,
                    source,
                });
            }
        };
        // The new name durable before the old content goes (best effort:
        // the bundle is in place, an error now would say it is not); what
        // a failed delete leaves in the scratch folder is `image gc`'s.
        let _ = sync_dir(&self.root);
        if present {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }

    /// A fresh name in the scratch folder for a folder on its way out.
    fn aside_path(&self, kind: &str, bundle_id: &str) -> PathBuf {
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or(0);
        self.scratch_dir()
            .join(format!("{kind}-{bundle_id}-{}-{nanos}", std::process::id()))
    }

    /// Removes the least recently used bundles until at most `max` remain,
    /// never `keep` nor a pinned one; damaged entries are skipped (and
    /// returned, for a warning).
    fn evict(
        &self,
        max: usize,
        keep: &str,
        pinned: &BTreeSet<String>,
    ) -> Result<Eviction, BundleError> {
        let (mut bundles, damaged) = self.scan()?;
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
        Ok(Eviction {
            evicted,
            over_limit,
            damaged,
        })
    }

    fn remove_dir(&self, bundle_id: &str) -> Result<(), BundleError> {
        // Renamed away first, so a half-removed bundle never looks whole.
        let dir = self.bundle_dir(bundle_id);
        let aside = self.aside_path("rm", bundle_id);
        std::fs::rename(&dir, &aside).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BundleError::NotFound {
                    bundle_id: bundle_id.to_owned(),
                }
            } else {
                BundleError::Io { path: dir, source }
            }
        })?;
        // The bundle is gone from here on; what a failed delete leaves in
        // the scratch folder is `image gc`'s.
        let _ = std::fs::remove_dir_all(&aside);
        Ok(())
    }

    /// Removes a bundle, also one whose record is damaged (the record is
    /// returned when readable, never needed); the caller holds the
    /// exclusive lock and checked that nothing uses it.
    pub fn remove(&self, bundle_id: &str) -> Result<RemovedBundle, BundleError> {
        let not_found = || BundleError::NotFound {
            bundle_id: bundle_id.to_owned(),
        };
        if validate_bundle_id(bundle_id).is_err() || !self.bundle_dir(bundle_id).is_dir() {
            return Err(not_found());
        }
        let record = self.get(bundle_id).ok().flatten();
        self.remove_dir(bundle_id)?;
        Ok(RemovedBundle {
            bundle_id: bundle_id.to_owned(),
            record,
        })
    }

    /// A bundle's record: None when there is no such folder, `Damaged`
    /// when the folder's record is missing, unreadable as a record, or of
    /// another bundle.
    pub fn get(&self, bundle_id: &str) -> Result<Option<BundleRecord>, BundleError> {
        if validate_bundle_id(bundle_id).is_err() {
            return Ok(None);
        }
        let dir = self.bundle_dir(bundle_id);
        let path = dir.join(RECORD_FILE);
        let damaged = |detail: String| BundleError::Damaged {
            bundle_id: bundle_id.to_owned(),
            path: path.clone(),
            detail,
        };
        // A second look when the record is missing from a folder that is
        // there: the read may have walked into a folder an exchange had
        // just swapped out (and deleted).
        let mut looks = 0;
        let bytes = loop {
            looks += 1;
            match std::fs::read(&path) {
                Ok(bytes) => break bytes,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    match dir.symlink_metadata() {
                        Ok(_) if looks < 2 => continue,
                        Ok(_) => return Err(damaged(format!("the folder has no {RECORD_FILE}"))),
                        Err(_) => return Ok(None),
                    }
                }
                Err(source) => return Err(BundleError::Io { path, source }),
            }
        };
        let record: BundleRecord =
            serde_json::from_slice(&bytes).map_err(|err| damaged(err.to_string()))?;
        if record.bundle_id != bundle_id {
            return Err(damaged(format!("it records bundle {:?}", record.bundle_id)));
        }
        Ok(Some(record))
    }

    /// A bundle that must exist.
    pub fn require(&self, bundle_id: &str) -> Result<BundleRecord, BundleError> {
        self.get(bundle_id)?.ok_or_else(|| BundleError::NotFound {
            bundle_id: bundle_id.to_owned(),
        })
    }

    /// Marks a bundle used now (the LRU clock). Takes the cache lock
    /// shared, so no add, eviction or removal changes the bundle meanwhile
    /// (the caller may hold it shared already, never exclusive), and the
    /// bundle folder's own lock, so two touches never write over each
    /// other's record.
    pub fn touch(&self, bundle_id: &str) -> Result<BundleRecord, BundleError> {
        let _using = self.lock(false)?;
        let not_found = || BundleError::NotFound {
            bundle_id: bundle_id.to_owned(),
        };
        // The id is checked before its folder is opened; the record is
        // read once, under the folder's lock.
        validate_bundle_id(bundle_id).map_err(|_| not_found())?;
        let dir = self.bundle_dir(bundle_id);
        let _record = match std::fs::File::open(&dir) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            opened => opened
                .and_then(|file| {
                    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                        .map_err(|(_, errno)| std::io::Error::from(errno))
                })
                .map_err(Self::io(&dir))?,
        };
        let mut record = self.require(bundle_id)?;
        record.last_accessed_at = record.last_accessed_at.max(Utc::now());
        self.write_record(&record)?;
        Ok(record)
    }

    fn write_record(&self, record: &BundleRecord) -> Result<(), BundleError> {
        let path = self.bundle_dir(&record.bundle_id).join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        crate::fsutil::write_atomic(&path, &json).map_err(Self::io(&path))
    }

    /// Every cached bundle, by id; damaged entries skipped.
    pub fn list(&self) -> Result<Vec<BundleRecord>, BundleError> {
        self.scan().map(|(records, _)| records)
    }

    /// Every cached bundle by id, and the entries that are damaged (for
    /// warnings). Folders whose names are no bundle ids are not the
    /// cache's and are left alone.
    pub fn scan(&self) -> Result<(Vec<BundleRecord>, Vec<DamagedBundle>), BundleError> {
        let mut records = Vec::new();
        let mut damaged = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok((records, damaged))
            }
            Err(source) => {
                return Err(BundleError::Io {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(Self::io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "tmp" || validate_bundle_id(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let detail = match self.get(&name) {
                Ok(Some(record)) => {
                    records.push(record);
                    continue;
                }
                // Removed since the folder was listed.
                Ok(None) => continue,
                Err(BundleError::Damaged { detail, .. }) => detail,
                Err(BundleError::Io { path, source }) => {
                    format!("reading {}: {source}", path.display())
                }
                Err(other) => other.to_string(),
            };
            damaged.push(DamagedBundle {
                bundle_id: name,
                dir: entry.path(),
                detail,
            });
        }
        records.sort_by(|a, b| a.bundle_id.cmp(&b.bundle_id));
        damaged.sort_by(|a, b| a.bundle_id.cmp(&b.bundle_id));
        Ok((records, damaged))
    }
}

/// An artifact's source as recorded: a URL without its secrets.
fn recorded_source(source: &ArtifactSource) -> ArtifactSource {
    match source {
        ArtifactSource::Url { url } => ArtifactSource::Url {
            url: redact_url(url),
        },
        path => path.clone(),
    }
}

/// Flushes a folder's entries (a rename in or out of it) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Puts the folder `staged` at `target`, where a folder is, and returns
/// where the old folder went. One atomic exchange (`renameat2`
/// `RENAME_EXCHANGE`) where the file system has it: `target` always holds
/// the old or the new folder, and the old one ends up at `staged`.
fn replace_dir(staged: &Path, target: &Path, aside: &Path) -> std::io::Result<PathBuf> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, staged, None, target, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => return Ok(staged.to_path_buf()),
            // This file system (or kernel) cannot exchange: renames below.
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    replace_by_renames(staged, target, aside, &mut |from, to| {
        std::fs::rename(from, to)
    })?;
    Ok(aside.to_path_buf())
}

/// Without an exchange: the old folder moves to `aside`, the new one
/// takes its name, and the old one moves back if that fails; nothing is
/// deleted here. A crash between the two renames leaves the old folder in
/// the scratch folder and none at `target`, the one window this cannot
/// close.
fn replace_by_renames(
    staged: &Path,
    target: &Path,
    aside: &Path,
    rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    rename(target, aside)?;
    if let Err(err) = rename(staged, target) {
        return match rename(aside, target) {
            Ok(()) => Err(err),
            Err(back) => Err(std::io::Error::other(format!(
                "{err}; moving the old folder back from {} failed too: {back}",
                aside.display()
            ))),
        };
    }
    Ok(())
}

/// A size for a message: whole GiB or MiB when it is one, else bytes.
fn human_bytes(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".into(),
        b if b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// What an eviction did (see [`AddReport`]'s fields of the same names).
struct Eviction {
    evicted: Vec<String>,
    over_limit: Option<String>,
    damaged: Vec<DamagedBundle>,
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
        ArtifactSource::Url { url } => redact_url(url),
    }
}

#[cfg(test)]
mod tests;

//! Which OCI images the store holds, and their names.
//!
//! ```text
//! images-v1/oci/<manifest hex>/image.json   an ImageRecord
//! images-v1/oci/<manifest hex>/rootfs.ext4  its root filesystem (built once)
//! images-v1/oci/refs/<percent-encoded ref>  the manifest digest a name points to
//! ```
//!
//! Every file is written atomically; a name moves to another image by one
//! rename, so concurrent imports never leave a half-written name.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::blobs::{BlobError, Sha256Digest};
use super::oci::{normalize_reference, Descriptor, ReferenceError, RunConfig};

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<Descriptor>,
    pub architecture: String,
    pub os: String,
    /// How the image wants to run.
    pub config: RunConfig,
    /// Sum of the layer blobs.
    pub size: u64,
    pub imported_at: DateTime<Utc>,
}

impl ImageRecord {
    /// The record of a manifest (stored under `manifest_digest`) whose
    /// config blob was read as `config`.
    pub fn new(
        manifest_digest: String,
        manifest: &super::oci::Manifest,
        config: super::oci::ImageConfigFile,
    ) -> Self {
        Self {
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers.clone(),
            architecture: config.architecture,
            os: config.os,
            config: config.config,
            size: manifest.layers.iter().map(|l| l.size).sum(),
            imported_at: Utc::now(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("image {reference} is not in the image store; get it with `hangar pull {reference}` or `hangar image import FILE`")]
    NotFound { reference: String },
    #[error("the image store entry {path} is damaged; remove it with `hangar image rm` and import again")]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The image catalog under one state dir.
#[derive(Clone, Debug)]
pub struct Catalog {
    root: PathBuf,
}

impl Catalog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("images-v1").join("oci"),
        }
    }

    /// The folder of one image (its record and root filesystem).
    pub fn image_dir(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join(digest.hex())
    }

    fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }

    fn ref_path(&self, normalized: &str) -> PathBuf {
        let encoded: String = normalized
            .chars()
            .map(|c| match c {
                '/' => "%2F".to_owned(),
                ':' => "%3A".to_owned(),
                '@' => "%40".to_owned(),
                other => other.to_string(),
            })
            .collect();
        self.refs_dir().join(encoded)
    }

    /// Saves `record` and points `references` at it.
    pub fn save(&self, record: &ImageRecord, references: &[String]) -> Result<(), CatalogError> {
        let digest = Sha256Digest::parse(&record.manifest_digest)?;
        let dir = self.image_dir(&digest);
        for folder in [&dir, &self.refs_dir()] {
            std::fs::create_dir_all(folder).map_err(|source| CatalogError::Io {
                path: folder.clone(),
                source,
            })?;
        }
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        let path = dir.join("image.json");
        crate::fsutil::write_atomic(&path, &json)
            .map_err(|source| CatalogError::Io { path, source })?;
        for reference in references {
            let normalized = normalize_reference(reference)?;
            let path = self.ref_path(&normalized);
            crate::fsutil::write_atomic(&path, record.manifest_digest.as_bytes())
                .map_err(|source| CatalogError::Io { path, source })?;
        }
        Ok(())
    }

    /// The image a reference names: a name the store knows, or
    /// `name@sha256:...` of a stored image.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, CatalogError> {
        let normalized = normalize_reference(reference)?;
        let not_found = || CatalogError::NotFound {
            reference: reference.to_owned(),
        };
        let digest = match normalized.split_once('@') {
            Some((_, digest)) => Sha256Digest::parse(digest)?,
            None => {
                let path = self.ref_path(&normalized);
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    if source.kind() == std::io::ErrorKind::NotFound {
                        not_found()
                    } else {
                        CatalogError::Io { path, source }
                    }
                })?;
                Sha256Digest::parse(text.trim())?
            }
        };
        self.record(&digest)?.ok_or_else(not_found)
    }

    fn record(&self, digest: &Sha256Digest) -> Result<Option<ImageRecord>, CatalogError> {
        let path = self.image_dir(digest).join("image.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CatalogError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CatalogError::Damaged { path, source })
    }

    /// Every image with the names pointing at it.
    pub fn list(&self) -> Result<Vec<(Vec<String>, ImageRecord)>, CatalogError> {
        let mut names: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (name, digest) in self.refs()? {
            names.entry(digest).or_default().push(name);
        }
        let mut images = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(images),
            Err(source) => {
                return Err(CatalogError::Io {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for entry in entries.flatten() {
            let hex = entry.file_name().to_string_lossy().into_owned();
            let Ok(digest) = Sha256Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            if let Some(record) = self.record(&digest)? {
                let refs = names.remove(&record.manifest_digest).unwrap_or_default();
                images.push((refs, record));
            }
        }
        images.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(images)
    }

    /// (normalized name, digest) for every name.
    fn refs(&self) -> Result<Vec<(String, String)>, CatalogError> {
        let dir = self.refs_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CatalogError::Io { path: dir, source }),
        };
        let mut refs = Vec::new();
        for entry in entries.flatten() {
            let name = entry
                .file_name()
                .to_string_lossy()
                .replace("%2F", "/")
                .replace("%3A", ":")
                .replace("%40", "@");
            if let Ok(digest) = std::fs::read_to_string(entry.path()) {
                refs.push((name, digest.trim().to_owned()));
            }
        }
        Ok(refs)
    }

    /// Removes a name; the image itself goes when no name is left (its
    /// blobs stay for `image gc`). Returns the image's digest.
    pub fn remove(&self, reference: &str) -> Result<String, CatalogError> {
        let record = self.resolve(reference)?;
        let normalized = normalize_reference(reference)?;
        let _ = std::fs::remove_file(self.ref_path(&normalized));
        let still_named = self
            .refs()?
            .iter()
            .any(|(_, digest)| *digest == record.manifest_digest);
        if !still_named {
            let digest = Sha256Digest::parse(&record.manifest_digest)?;
            let dir = self.image_dir(&digest);
            std::fs::remove_dir_all(&dir)
                .map_err(|source| CatalogError::Io { path: dir, source })?;
        }
        Ok(record.manifest_digest)
    }
}

//! `hangar image import`: an OCI layout (a directory or a tar of one) or a
//! `docker save` archive into the blob store and catalog. Every blob is
//! checked against its digest and declared size as it is stored; a multi-
//! platform index resolves to linux/amd64.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::blobs::{BlobError, BlobStore, Sha256Digest};
use super::catalog::{CatalogError, ImageRecord};
use super::oci::{
    Descriptor, ImageConfigFile, Index, Manifest, ANNOTATION_REF_NAME, MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST, MEDIA_INDEX, MEDIA_MANIFEST,
};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is neither an OCI layout (index.json) nor a docker save archive (manifest.json)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{what} in {path} is not valid: {source}")]
    Json {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("archive entry {entry:?} is not a plain relative path; refused")]
    UnsafeEntry { entry: String },
    #[error("no linux/amd64 image in the index of {path} (this host boots x86_64 guests)")]
    NoPlatform { path: PathBuf },
    #[error("{path} holds no image")]
    Empty { path: PathBuf },
    #[error("the image in {path} has no name; give one with --tag NAME[:TAG]")]
    Unnamed { path: PathBuf },
    #[error("{0}")]
    Blob(#[from] BlobError),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
}

/// What an import stored: each image's names and record.
pub type Imported = Vec<(Vec<String>, ImageRecord)>;

/// Reads `source` (directory or tar) into the blob store and returns each
/// image with its names; naming them in the catalog is the caller's last
/// step, once the image proved usable. `tag` names the image (required
/// when the source does not name it; with several images, only the first
/// takes it). `scratch` is a private folder for unpacking a tar.
pub fn import(
    source: &Path,
    tag: Option<&str>,
    blobs: &BlobStore,
    scratch: &Path,
) -> Result<Imported, ImportError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    let meta = std::fs::metadata(source).map_err(io_err(source))?;
    let unpacked;
    let dir = if meta.is_dir() {
        source
    } else {
        unpacked = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(scratch)
            .map_err(io_err(scratch))?;
        extract_plain_files(source, unpacked.path())?;
        unpacked.path()
    };
    let images = if dir.join("index.json").is_file() {
        from_oci_layout(dir, source, blobs)?
    } else if dir.join("manifest.json").is_file() {
        from_docker_save(dir, blobs)?
    } else {
        return Err(ImportError::UnknownFormat {
            path: source.to_path_buf(),
        });
    };
    if images.is_empty() {
        return Err(ImportError::Empty {
            path: source.to_path_buf(),
        });
    }
    let mut imported = Vec::new();
    for (index, (mut names, record)) in images.into_iter().enumerate() {
        if let (0, Some(tag)) = (index, tag) {
            names = vec![tag.to_owned()];
        }
        // A bare `ref.name` (no registry, no tag separator) is only a tag
        // in OCI layouts made by skopeo: it does not name a repository.
        names.retain(|name| name.contains(':') || name.contains('/'));
        if names.is_empty() {
            return Err(ImportError::Unnamed {
                path: source.to_path_buf(),
            });
        }
        for name in &names {
            crate::image::oci::normalize_reference(name).map_err(CatalogError::from)?;
        }
        imported.push((names, record));
    }
    Ok(imported)
}

/// Unpacks a tar holding only directories and regular files (what OCI
/// layouts and docker save archives are made of) into `dest`.
fn extract_plain_files(archive: &Path, dest: &Path) -> Result<(), ImportError> {
    let file = File::open(archive).map_err(|source| ImportError::Io {
        path: archive.to_path_buf(),
        source,
    })?;
    let stream = |source| ImportError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().map_err(stream)? {
        let mut entry = entry.map_err(stream)?;
        let name = entry.path().map_err(stream)?.into_owned();
        let plain = !name.as_os_str().is_empty()
            && name
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(ImportError::UnsafeEntry {
                entry: name.display().to_string(),
            });
        }
        let target = dest.join(&name);
        let kind = entry.header().entry_type();
        let io_err = |source| ImportError::Io {
            path: target.clone(),
            source,
        };
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_err)?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err)?;
            }
            let mut out = File::create(&target).map_err(io_err)?;
            std::io::copy(&mut entry, &mut out).map_err(io_err)?;
        }
        // Links and other kinds have no place in these archives: skipped
        // (a layout that needed them fails its digest checks later).
    }
    Ok(())
}

/// A blob file of an OCI layout, stored with its descriptor checked.
fn store_layout_blob(
    dir: &Path,
    descriptor: &Descriptor,
    blobs: &BlobStore,
) -> Result<Sha256Digest, ImportError> {
    let digest = Sha256Digest::parse(&descriptor.digest)?;
    let path = dir.join("blobs").join("sha256").join(digest.hex());
    let file = File::open(&path).map_err(|source| ImportError::Io {
        path: path.clone(),
        source,
    })?;
    blobs.put(&digest, descriptor.size, file)?;
    Ok(digest)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    path: &Path,
) -> Result<T, ImportError> {
    serde_json::from_slice(bytes).map_err(|source| ImportError::Json {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn from_oci_layout(dir: &Path, source: &Path, blobs: &BlobStore) -> Result<Imported, ImportError> {
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|source| ImportError::Io {
        path: index_path.clone(),
        source,
    })?;
    let index: Index = parse_json(&bytes, "index.json", &index_path)?;
    let mut images = Vec::new();
    for descriptor in &index.manifests {
        let names: Vec<String> = descriptor
            .annotations
            .get(ANNOTATION_REF_NAME)
            .cloned()
            .into_iter()
            .collect();
        let manifest = resolve_platform(dir, descriptor, blobs, source)?;
        images.push((names, record_from(dir, &manifest, blobs)?));
    }
    Ok(images)
}

/// Follows an index down to the linux/amd64 manifest; returns it with its
/// descriptor, every blob on the way stored.
fn resolve_platform(
    dir: &Path,
    descriptor: &Descriptor,
    blobs: &BlobStore,
    source: &Path,
) -> Result<(Descriptor, Manifest), ImportError> {
    let mut current = descriptor.clone();
    // Indexes may nest; a handful of levels is more than any real image.
    for _ in 0..4 {
        let digest = store_layout_blob(dir, &current, blobs)?;
        let bytes = blobs.read(&digest)?;
        let is_index = matches!(current.media_type.as_str(), MEDIA_INDEX | MEDIA_DOCKER_LIST)
            || (current.media_type.is_empty() && serde_json::from_slice::<Index>(&bytes).is_ok());
        if !is_index {
            let manifest: Manifest = parse_json(&bytes, "image manifest", dir)?;
            return Ok((current, manifest));
        }
        let nested: Index = parse_json(&bytes, "image index", dir)?;
        current = nested
            .manifests
            .into_iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    && matches!(
                        m.media_type.as_str(),
                        MEDIA_MANIFEST | MEDIA_DOCKER_MANIFEST | ""
                    )
            })
            .ok_or_else(|| ImportError::NoPlatform {
                path: source.to_path_buf(),
            })?;
    }
    Err(ImportError::NoPlatform {
        path: source.to_path_buf(),
    })
}

fn record_from(
    dir: &Path,
    (descriptor, manifest): &(Descriptor, Manifest),
    blobs: &BlobStore,
) -> Result<ImageRecord, ImportError> {
    store_layout_blob(dir, &manifest.config, blobs)?;
    for layer in &manifest.layers {
        store_layout_blob(dir, layer, blobs)?;
    }
    record_from_stored(descriptor, manifest, blobs, dir)
}

/// `docker save`'s own format: manifest.json naming a config file and
/// layer tars; digests are computed here (the archive carries none).
fn from_docker_save(dir: &Path, blobs: &BlobStore) -> Result<Imported, ImportError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Config")]
        config: String,
        #[serde(rename = "RepoTags", default)]
        repo_tags: Option<Vec<String>>,
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let manifest_path = dir.join("manifest.json");
    let bytes = std::fs::read(&manifest_path).map_err(|source| ImportError::Io {
        path: manifest_path.clone(),
        source,
    })?;
    let entries: Vec<Entry> = parse_json(&bytes, "manifest.json", &manifest_path)?;
    let mut images = Vec::new();
    for entry in entries {
        let config = store_file(dir, &entry.config, blobs)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let mut descriptor = store_file(dir, layer, blobs)?;
            descriptor.media_type = "application/vnd.docker.image.rootfs.diff.tar".into();
            layers.push(descriptor);
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.into()),
            config: Descriptor {
                media_type: "application/vnd.oci.image.config.v1+json".into(),
                ..config
            },
            layers,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let digest = Sha256Digest::of(&manifest_bytes);
        blobs.put(
            &digest,
            manifest_bytes.len() as u64,
            manifest_bytes.as_slice(),
        )?;
        let descriptor = Descriptor {
            media_type: MEDIA_MANIFEST.into(),
            digest: digest.to_string(),
            size: manifest_bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        };
        let names = entry.repo_tags.unwrap_or_default();
        let record = record_from_stored(&descriptor, &manifest, blobs, dir)?;
        images.push((names, record));
    }
    Ok(images)
}

fn record_from_stored(
    descriptor: &Descriptor,
    manifest: &Manifest,
    blobs: &BlobStore,
    dir: &Path,
) -> Result<ImageRecord, ImportError> {
    let config_digest = Sha256Digest::parse(&manifest.config.digest)?;
    let config: ImageConfigFile = parse_json(&blobs.read(&config_digest)?, "image config", dir)?;
    Ok(ImageRecord::new(
        descriptor.digest.clone(),
        manifest,
        config,
    ))
}

/// Hashes a file of the archive, then stores it under that digest (the
/// store checks it again as it copies).
fn store_file(dir: &Path, name: &str, blobs: &BlobStore) -> Result<Descriptor, ImportError> {
    let relative = Path::new(name);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(ImportError::UnsafeEntry {
            entry: name.to_owned(),
        });
    }
    let path = dir.join(relative);
    let io_err = |source| ImportError::Io {
        path: path.clone(),
        source,
    };
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut file = File::open(&path).map_err(io_err)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        sha2::Digest::update(&mut hasher, &buf[..n]);
    }
    let digest = Sha256Digest::parse(&format!(
        "sha256:{}",
        hex::encode(sha2::Digest::finalize(hasher))
    ))?;
    blobs.put(&digest, size, File::open(&path).map_err(io_err)?)?;
    Ok(Descriptor {
        media_type: String::new(),
        digest: digest.to_string(),
        size,
        platform: None,
        annotations: Default::default(),
    })
}

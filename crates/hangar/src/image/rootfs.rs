//! An OCI image's root filesystem as an ext4 file, built once per image
//! (manifest digest) and shared read-only by every VM of that image, each
//! writing to its own qcow2 overlay.
//!
//! Built in a scratch folder (layers applied in order, see `layer`), then
//! `mkfs.ext4 -d` (e2fsprogs) turns the tree into a file system image,
//! which is renamed into place: a half-built image is never used.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::blobs::{BlobError, BlobStore, Sha256Digest};
use super::catalog::{Catalog, ImageRecord};
use super::layer::{apply_layer, LayerError};

/// Free room on top of the files, so the guest can write a little before
/// its overlay grows the disk (and ext4 has room for its metadata).
const HEADROOM_BYTES: u64 = 256 << 20;
/// ext4 wants room for inodes and block groups besides the data.
const OVERHEAD_PERCENT: u64 = 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{0}")]
    Blob(#[from] BlobError),
    #[error("layer {digest} of image {image}: {source}")]
    Layer {
        image: String,
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the root file system of image {image} needs root (it keeps the files' owners); run hangar as root for OCI images")]
    NotRoot { image: String },
    #[error("mkfs.ext4 failed for image {image}: {detail}; install e2fsprogs (`apt-get install e2fsprogs`)")]
    Mkfs { image: String, detail: String },
}

/// The image's ext4 root filesystem, built now if it is not yet.
pub fn ensure_rootfs(
    record: &ImageRecord,
    blobs: &BlobStore,
    catalog: &Catalog,
    scratch: &Path,
) -> Result<PathBuf, RootfsError> {
    let digest = Sha256Digest::parse(&record.manifest_digest)?;
    let target = catalog.image_dir(&digest).join("rootfs.ext4");
    if target.is_file() {
        return Ok(target);
    }
    // Without root the layers' owners cannot be set, and mkfs.ext4 would
    // make the builder own the whole guest system.
    if !nix::unistd::geteuid().is_root() {
        return Err(RootfsError::NotRoot {
            image: record.manifest_digest.clone(),
        });
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Io { path, source }
    };
    std::fs::create_dir_all(scratch).map_err(io_err(scratch))?;
    let work = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(scratch)
        .map_err(io_err(scratch))?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).map_err(io_err(&tree))?;
    for layer in &record.layers {
        let layer_digest = Sha256Digest::parse(&layer.digest)?;
        let blob = blobs.open(&layer_digest)?;
        apply_layer(std::io::BufReader::new(blob), &tree).map_err(|source| RootfsError::Layer {
            image: record.manifest_digest.clone(),
            digest: layer.digest.clone(),
            source,
        })?;
    }
    // Mount points the agent moves its own mounts onto.
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        let path = tree.join(dir);
        if std::fs::symlink_metadata(&path).is_err() {
            std::fs::create_dir(&path).map_err(io_err(&path))?;
        }
    }
    let used = tree_size(&tree).map_err(io_err(&tree))?;
    let size = used + used * OVERHEAD_PERCENT / 100 + HEADROOM_BYTES;
    let image_file = work.path().join("rootfs.ext4");
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "hangar-root", "-d"])
        .arg(&tree)
        .arg(&image_file)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|err| RootfsError::Mkfs {
            image: record.manifest_digest.clone(),
            detail: err.to_string(),
        })?;
    if !output.status.success() {
        return Err(RootfsError::Mkfs {
            image: record.manifest_digest.clone(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let dir = catalog.image_dir(&digest);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // First build wins: never replace a published file system (mkfs output
    // differs run to run, and VM overlays are bound to the first one).
    match std::fs::hard_link(&image_file, &target) {
        Ok(()) => Ok(target),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(target),
        Err(source) => Err(RootfsError::Io {
            path: target,
            source,
        }),
    }
}

/// Bytes the tree takes, counting each entry as at least one 4 KiB block.
fn tree_size(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut total = meta.len().div_ceil(4096).max(1) * 4096;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            total += tree_size(&entry?.path())?;
        }
    }
    Ok(total)
}

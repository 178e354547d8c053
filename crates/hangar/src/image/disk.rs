//! Cloud disk images (qcow2 or raw), booted with firmware: added from a
//! file or an http(s) URL, sha256 always recorded (and checked when
//! given), format detected from the content, never trusted to point at
//! other host files.
//!
//! ```text
//! images-v1/disks/<name>/disk        the verified image
//! images-v1/disks/<name>/image.json  a DiskRecord
//! images-v1/disks/tmp/               images being added
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::fetch::{fetch_file, fetch_url, redact_url, Expect, FetchError};
use super::pull::PullEvent;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("disk image name {name:?}: {problem}")]
    Name { name: String, problem: String },
    #[error("--sha256 {value:?} must be 64 hex digits")]
    Sha256 { value: String },
    #[error("{from}: {problem}")]
    Format { from: String, problem: String },
    #[error("disk image {name} is already stored with other content (sha256:{existing}); remove it with `hangar image rm disk:{name}` or add this one with --name")]
    Exists { name: String, existing: String },
    #[error("disk image {name} is not stored; add it with `hangar image add FILE|URL`")]
    NotFound { name: String },
    #[error("the disk image store entry {path} is damaged ({detail}); remove it with `hangar image rm disk:NAME` and add it again")]
    Damaged { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A disk image's format, as QEMU names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// A stored disk image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    pub format: DiskFormat,
    /// The size the guest sees.
    pub virtual_size: u64,
    /// Bytes on the host.
    pub file_size: u64,
    pub sha256: String,
    /// The path or URL it was added from (a URL without its secrets:
    /// `user:pass@` and the query string are `***`).
    pub source: String,
    pub added_at: DateTime<Utc>,
}

/// What the first bytes say about a disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// qcow2 header fields (big-endian): magic, version, backing file offset
/// (8..16), size (24..32), incompatible features (72..80, v3).
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// Incompatible feature bit 2: the data lives in an external file.
const QCOW2_EXTERNAL_DATA: u64 = 1 << 2;

/// Detects the format from the first bytes (at least 512) and the file's
/// length. A qcow2 naming a backing file or an external data file is
/// refused: either would make QEMU read a host file the image chose.
pub fn detect(head: &[u8], file_size: u64, from: &str) -> Result<Detected, DiskError> {
    let problem = |problem: &str| DiskError::Format {
        from: from.to_owned(),
        problem: problem.to_owned(),
    };
    let be = |range: std::ops::Range<usize>| -> u64 {
        head.get(range)
            .map(|bytes| bytes.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
            .unwrap_or(0)
    };
    if head.starts_with(QCOW2_MAGIC) {
        if head.len() < 104 {
            return Err(problem("is a truncated qcow2 image"));
        }
        let version = be(4..8);
        if !(2..=3).contains(&version) {
            return Err(problem(&format!(
                "is qcow2 version {version}; QEMU reads versions 2 and 3"
            )));
        }
        if be(8..16) != 0 {
            return Err(problem(
                "is a qcow2 image with a backing file; refused (it would read a host file the image names): flatten it with `qemu-img convert -O qcow2 IN OUT`",
            ));
        }
        if version == 3 && be(72..80) & QCOW2_EXTERNAL_DATA != 0 {
            return Err(problem(
                "is a qcow2 image with an external data file; refused: flatten it with `qemu-img convert -O qcow2 IN OUT`",
            ));
        }
        return Ok(Detected {
            format: DiskFormat::Qcow2,
            virtual_size: be(24..32),
        });
    }
    let other = [
        (&b"KDMV"[..], "VMDK"),
        (b"vhdxfile", "VHDX"),
        (b"conectix", "VHD"),
        (b"QFI", "an unknown qcow version"),
    ];
    for (magic, name) in other {
        if head.starts_with(magic) {
            return Err(problem(&format!(
                "is {name}; convert it with `qemu-img convert -O qcow2 IN OUT`"
            )));
        }
    }
    if head.len() >= 0x50 && &head[0x40..0x44] == b"\x7f\x10\xda\xbe" {
        return Err(problem(
            "is VDI; convert it with `qemu-img convert -O qcow2 IN OUT`",
        ));
    }
    if file_size == 0 || !file_size.is_multiple_of(512) {
        return Err(problem(&format!(
            "is {file_size} bytes: not a qcow2 image, and a raw disk is a whole number of 512-byte sectors"
        )));
    }
    Ok(Detected {
        format: DiskFormat::Raw,
        virtual_size: file_size,
    })
}

/// Detects the format of a file on disk.
pub fn detect_file(path: &Path) -> Result<Detected, DiskError> {
    let io = |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(4096);
    file.take(4096).read_to_end(&mut head).map_err(io)?;
    detect(&head, size, &path.display().to_string())
}

/// The stored disk images under one state dir.
#[derive(Clone, Debug)]
pub struct DiskCatalog {
    root: PathBuf,
}

/// A name from a file name: `debian-12-genericcloud-amd64.qcow2` ->
/// `debian-12-genericcloud-amd64`.
pub fn name_from_source(source: &str) -> String {
    let base = source.rsplit('/').next().unwrap_or(source);
    let base = base.split(['?', '#']).next().unwrap_or(base);
    let mut name = base.to_ascii_lowercase();
    for ext in [".xz", ".gz", ".qcow2", ".img", ".raw"] {
        if let Some(stripped) = name.strip_suffix(ext) {
            name = stripped.to_owned();
        }
    }
    name
}

impl DiskCatalog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("images-v1").join("disks"),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
        let path = path.to_path_buf();
        move |source| DiskError::Io { path, source }
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.root.join(name).join("disk")
    }

    /// Adds a disk image from a file or URL under `name` (default: from
    /// the file name). The image is copied while hashed, checked against
    /// `sha256` when given, its format detected, and only then named.
    pub fn add(
        &self,
        source: &str,
        name: Option<&str>,
        sha256: Option<&str>,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<DiskRecord, DiskError> {
        let name = name.map_or_else(|| name_from_source(source), str::to_owned);
        super::bundle::validate_bundle_id(&name).map_err(|problem| DiskError::Name {
            name: name.clone(),
            problem: format!("{problem}; give one with --name"),
        })?;
        let sha256 = match sha256 {
            Some(value) => {
                let hex = value
                    .strip_prefix("sha256:")
                    .unwrap_or(value)
                    .to_ascii_lowercase();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(DiskError::Sha256 {
                        value: value.to_owned(),
                    });
                }
                Some(hex)
            }
            None => None,
        };
        for dir in [&self.root, &self.scratch_dir()] {
            crate::layout::create_private_dir(dir).map_err(|err| DiskError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(err.to_string()),
            })?;
        }
        let staged = tempfile::Builder::new()
            .prefix("add-")
            .tempdir_in(self.scratch_dir())
            .map_err(Self::io(&self.scratch_dir()))?;
        let disk = staged.path().join("disk");
        let expect = Expect {
            sha256,
            ..Default::default()
        };
        let what = format!("disk image {name}");
        // What is recorded and printed: a URL's credentials or signed
        // query never reach the disk or an error.
        let shown = redact_url(source);
        progress(PullEvent::Step(format!("fetching {name}")));
        let fetched = if source.starts_with("http://") || source.starts_with("https://") {
            fetch_url(&what, source, &disk, &expect, progress)?
        } else {
            fetch_file(&what, Path::new(source), &disk, &expect, progress)?
        };
        let detected = detect_file(&disk).map_err(|err| match err {
            DiskError::Format { problem, .. } => DiskError::Format {
                from: shown.clone(),
                problem,
            },
            other => other,
        })?;
        if let Some(existing) = self.get(&name)? {
            if existing.sha256 == fetched.sha256 {
                return Ok(existing);
            }
            return Err(DiskError::Exists {
                name,
                existing: existing.sha256,
            });
        }
        let record = DiskRecord {
            name: name.clone(),
            format: detected.format,
            virtual_size: detected.virtual_size,
            file_size: fetched.size,
            sha256: fetched.sha256,
            source: shown,
            added_at: Utc::now(),
        };
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let record_path = staged.path().join("image.json");
        crate::fsutil::write_private(&record_path, &json).map_err(Self::io(&record_path))?;
        // Read-only from here on: VMs only ever get overlays of it.
        let _ =
            std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o400));
        let target = self.root.join(&name);
        let staged_dir = staged.keep();
        if let Err(err) = std::fs::rename(&staged_dir, &target) {
            let _ = std::fs::remove_dir_all(&staged_dir);
            // Another add of the same name won the race.
            if let Some(existing) = self.get(&name)? {
                if existing.sha256 == record.sha256 {
                    return Ok(existing);
                }
            }
            return Err(DiskError::Io {
                path: target,
                source: err,
            });
        }
        Ok(record)
    }

    pub fn get(&self, name: &str) -> Result<Option<DiskRecord>, DiskError> {
        if super::bundle::validate_bundle_id(name).is_err() {
            return Ok(None);
        }
        let path = self.root.join(name).join("image.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DiskError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| DiskError::Damaged {
                path,
                detail: err.to_string(),
            })
    }

    pub fn require(&self, name: &str) -> Result<DiskRecord, DiskError> {
        self.get(name)?.ok_or_else(|| DiskError::NotFound {
            name: name.to_owned(),
        })
    }

    pub fn list(&self) -> Result<Vec<DiskRecord>, DiskError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "tmp" {
                if let Some(record) = self.get(&name)? {
                    out.push(record);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a stored image; the caller checked no VM uses it.
    pub fn remove(&self, name: &str) -> Result<DiskRecord, DiskError> {
        let record = self.require(name)?;
        let dir = self.root.join(name);
        let aside = self
            .scratch_dir()
            .join(format!("rm-{name}-{}", std::process::id()));
        std::fs::rename(&dir, &aside).map_err(Self::io(&dir))?;
        std::fs::remove_dir_all(&aside).map_err(Self::io(&aside))?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(version: u32, backing: u64, size: u64, incompatible: u64) -> Vec<u8> {
        let mut head = vec![0u8; 512];
        head[..4].copy_from_slice(QCOW2_MAGIC);
        head[4..8].copy_from_slice(&version.to_be_bytes());
        head[8..16].copy_from_slice(&backing.to_be_bytes());
        head[24..32].copy_from_slice(&size.to_be_bytes());
        head[72..80].copy_from_slice(&incompatible.to_be_bytes());
        head
    }

    #[test]
    fn formats_are_detected_and_host_file_references_refused() {
        let gib = 1 << 30;
        assert_eq!(
            detect(&qcow2_header(3, 0, 2 * gib, 0), 1 << 20, "a").unwrap(),
            Detected {
                format: DiskFormat::Qcow2,
                virtual_size: 2 * gib
            }
        );
        let err = detect(&qcow2_header(3, 0x200, gib, 0), 1 << 20, "a").unwrap_err();
        assert!(err.to_string().contains("backing file; refused"), "{err}");
        let err = detect(&qcow2_header(3, 0, gib, QCOW2_EXTERNAL_DATA), 1 << 20, "a").unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
        let err = detect(&qcow2_header(9, 0, gib, 0), 1 << 20, "a").unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        let raw = vec![0u8; 512];
        assert_eq!(detect(&raw, 4096, "r").unwrap().format, DiskFormat::Raw);
        let err = detect(&raw, 4097, "r").unwrap_err();
        assert!(err.to_string().contains("512-byte sectors"), "{err}");
        let mut vmdk = vec![0u8; 512];
        vmdk[..4].copy_from_slice(b"KDMV");
        let err = detect(&vmdk, 4096, "v.vmdk").unwrap_err();
        assert!(err.to_string().contains("is VMDK; convert it"), "{err}");
    }

    #[test]
    fn names_come_from_the_file_name() {
        assert_eq!(
            name_from_source("https://cloud.debian.org/x/debian-12-genericcloud-amd64.qcow2?x=1"),
            "debian-12-genericcloud-amd64"
        );
        assert_eq!(name_from_source("/tmp/Ubuntu.IMG"), "ubuntu");
    }

    #[test]
    fn add_checks_the_digest_and_keeps_one_content_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = DiskCatalog::new(&dir.path().join("state"));
        let file = dir.path().join("small.raw");
        std::fs::write(&file, vec![1u8; 4096]).unwrap();
        let source = file.to_str().unwrap();
        let err = catalog
            .add(source, None, Some(&"0".repeat(64)), &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("tampered"), "{err}");
        assert!(catalog.list().unwrap().is_empty());
        let record = catalog.add(source, None, None, &mut |_| {}).unwrap();
        assert_eq!(
            (record.name.as_str(), record.format, record.virtual_size),
            ("small", DiskFormat::Raw, 4096)
        );
        assert_eq!(
            catalog.add(source, None, None, &mut |_| {}).unwrap(),
            record
        );
        std::fs::write(&file, vec![2u8; 4096]).unwrap();
        let err = catalog.add(source, None, None, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("already stored with other content"),
            "{err}"
        );
        catalog.remove("small").unwrap();
        assert!(catalog.list().unwrap().is_empty());
    }
}

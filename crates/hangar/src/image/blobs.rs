//! The content-addressed blob store: `<state>/blobs-v1/sha256/<hex>`.
//!
//! Every blob is written to `blobs-v1/tmp/` while its sha256 and length are
//! checked against what the manifest declared, then renamed into place, so
//! a blob under its digest is always whole and correct. Reading more bytes
//! than declared stops at once (a hostile source cannot make us store
//! without bound). Two processes storing the same blob both write a
//! temporary file; the second rename replaces identical content.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a blob could not be stored or found.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("digest {digest:?} is not a sha256 digest (expected sha256:<64 hex digits>)")]
    BadDigest { digest: String },
    #[error("blob {digest} is larger than the {declared} bytes its descriptor declares; refused")]
    TooLarge { digest: String, declared: u64 },
    #[error("blob {digest} has {got} bytes, its descriptor declares {declared}; the source is truncated or wrong")]
    WrongSize {
        digest: String,
        declared: u64,
        got: u64,
    },
    #[error("blob {digest} does not match its digest (content hashes to sha256:{got}); the source is corrupt or tampered with")]
    WrongDigest { digest: String, got: String },
    #[error("blob {digest} is not in the store")]
    Missing { digest: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A validated `sha256:<hex>` digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    pub fn parse(text: &str) -> Result<Self, BlobError> {
        let hex = text.strip_prefix("sha256:").unwrap_or("");
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(hex.to_owned()))
        } else {
            Err(BlobError::BadDigest {
                digest: text.to_owned(),
            })
        }
    }

    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// The blob store under one state dir.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// The store at `<state>/blobs-v1`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("blobs-v1"),
        }
    }

    pub fn path(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Opens a stored blob for reading.
    pub fn open(&self, digest: &Sha256Digest) -> Result<File, BlobError> {
        let path = self.path(digest);
        File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => BlobError::Missing {
                digest: digest.to_string(),
            },
            _ => BlobError::Io { path, source },
        })
    }

    /// Reads a stored blob whole (manifests and configs: small).
    pub fn read(&self, digest: &Sha256Digest) -> Result<Vec<u8>, BlobError> {
        let mut bytes = Vec::new();
        let path = self.path(digest);
        self.open(digest)?
            .read_to_end(&mut bytes)
            .map_err(|source| BlobError::Io { path, source })?;
        Ok(bytes)
    }

    /// Stores `source` as `digest`, checking its length against `size`
    /// and its content against the digest. Already stored: nothing to do.
    pub fn put(
        &self,
        digest: &Sha256Digest,
        size: u64,
        source: impl Read,
    ) -> Result<PathBuf, BlobError> {
        let final_path = self.path(digest);
        if final_path.is_file() {
            return Ok(final_path);
        }
        let tmp_dir = self.root.join("tmp");
        let sha_dir = self.root.join("sha256");
        for dir in [&tmp_dir, &sha_dir] {
            crate::layout::create_private_dir(dir).map_err(|source| BlobError::Io {
                path: dir.clone(),
                source: io::Error::other(source),
            })?;
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BlobError::Io { path, source }
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        check_stream(digest, size, source, Some(tmp.as_file_mut()))?;
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        tmp.persist(&final_path).map_err(|err| BlobError::Io {
            path: final_path.clone(),
            source: err.error,
        })?;
        Ok(final_path)
    }

    /// Like [`BlobStore::put`] for a file already on disk (a download): it
    /// is checked where it lies and renamed into place, not copied. The
    /// file is consumed on success.
    pub fn put_file(
        &self,
        digest: &Sha256Digest,
        size: u64,
        path: &Path,
    ) -> Result<PathBuf, BlobError> {
        let final_path = self.path(digest);
        if final_path.is_file() {
            return Ok(final_path);
        }
        let io_err = |source| BlobError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        check_stream(digest, size, &file, None)?;
        file.sync_all().map_err(io_err)?;
        let sha_dir = self.root.join("sha256");
        crate::layout::create_private_dir(&sha_dir).map_err(|source| BlobError::Io {
            path: sha_dir.clone(),
            source: io::Error::other(source),
        })?;
        match std::fs::rename(path, &final_path) {
            Ok(()) => Ok(final_path),
            // Another file system: copy it through the checks instead.
            Err(_) => self.put(digest, size, File::open(path).map_err(io_err)?),
        }
    }
}

/// Reads `source` to its end, checking it is exactly `size` bytes (reading
/// at most one byte more) whose sha256 is `digest`; copies it into `sink`
/// when given.
fn check_stream(
    digest: &Sha256Digest,
    size: u64,
    source: impl Read,
    mut sink: Option<&mut File>,
) -> Result<(), BlobError> {
    // One byte past the declared size is enough to know it is too big.
    let mut limited = source.take(size.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(BlobError::Io {
                    path: PathBuf::from(digest.to_string()),
                    source,
                })
            }
        };
        got += n as u64;
        if got > size {
            return Err(BlobError::TooLarge {
                digest: digest.to_string(),
                declared: size,
            });
        }
        hasher.update(&buf[..n]);
        if let Some(sink) = sink.as_deref_mut() {
            sink.write_all(&buf[..n]).map_err(|source| BlobError::Io {
                path: PathBuf::from(digest.to_string()),
                source,
            })?;
        }
    }
    if got != size {
        return Err(BlobError::WrongSize {
            digest: digest.to_string(),
            declared: size,
            got,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if actual != digest.hex() {
        return Err(BlobError::WrongDigest {
            digest: digest.to_string(),
            got: actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_stored_only_when_size_and_digest_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(dir.path());
        let data = b"layer bytes";
        let digest = Sha256Digest::of(data);
        let path = store
            .put(&digest, data.len() as u64, &data[..])
            .expect("put");
        assert_eq!(std::fs::read(path).expect("read"), data);
        assert!(store.contains(&digest));

        let other = Sha256Digest::of(b"something else");
        assert!(matches!(
            store.put(&other, data.len() as u64, &data[..]),
            Err(BlobError::WrongDigest { .. })
        ));
        assert!(matches!(
            store.put(&other, 3, &data[..]),
            Err(BlobError::TooLarge { declared: 3, .. })
        ));
        assert!(matches!(
            store.put(&other, 100, &data[..]),
            Err(BlobError::WrongSize { got: 11, .. })
        ));
        assert!(!store.contains(&other), "nothing half-written stays");
        let leftovers = std::fs::read_dir(dir.path().join("blobs-v1/tmp"))
            .expect("tmp dir")
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_downloaded_file_is_checked_then_moved_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(dir.path());
        let download = dir.path().join("download");
        std::fs::write(&download, b"blob").expect("write");
        let wrong = Sha256Digest::of(b"other");
        assert!(matches!(
            store.put_file(&wrong, 4, &download),
            Err(BlobError::WrongDigest { .. })
        ));
        assert!(!store.contains(&wrong) && download.exists());
        let digest = Sha256Digest::of(b"blob");
        let stored = store.put_file(&digest, 4, &download).expect("put_file");
        assert_eq!(std::fs::read(stored).expect("read"), b"blob");
        assert!(!download.exists(), "moved, not copied");
    }

    #[test]
    fn digests_are_checked_for_shape() {
        assert!(Sha256Digest::parse("sha256:abc").is_err());
        assert!(Sha256Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(Sha256Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Sha256Digest::parse(&format!("sha256:{}", "../".repeat(21) + "a")).is_err());
        let ok = Sha256Digest::parse(&format!("sha256:{}", "0f".repeat(32))).expect("valid");
        assert_eq!(ok.to_string(), format!("sha256:{}", "0f".repeat(32)));
    }
}

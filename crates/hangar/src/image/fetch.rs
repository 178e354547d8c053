//! Artifacts from a file or an http(s) URL into a file, with their sha256
//! and size checked while they stream: reading stops one byte past a
//! declared size, and nothing is trusted until the whole file hashed right.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::pull::PullEvent;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{what} ({from}) is larger than the {declared} bytes declared; refused")]
    TooLarge {
        what: String,
        from: String,
        declared: u64,
    },
    #[error(
        "{what} ({from}) has {got} bytes, {declared} declared; the source is truncated or wrong"
    )]
    WrongSize {
        what: String,
        from: String,
        declared: u64,
        got: u64,
    },
    #[error("{what} ({from}) hashes to sha256:{got}, not the declared sha256:{expected}; the source is corrupt or tampered with")]
    WrongDigest {
        what: String,
        from: String,
        expected: String,
        got: String,
    },
    #[error("{what}: downloading {url}: {detail}")]
    Http {
        what: String,
        url: String,
        detail: String,
    },
    #[error("{what}: {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a fetched file turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub sha256: String,
    pub size: u64,
}

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// Refuse more bytes than this even when no size is declared.
    pub limit: Option<u64>,
}

/// Writes the bytes of `chunks` into `out`, hashing and counting, refusing
/// more than declared, then checks size and digest.
struct Checker<'a> {
    what: &'a str,
    from: &'a str,
    expect: &'a Expect,
    hasher: Sha256,
    count: u64,
}

impl<'a> Checker<'a> {
    fn new(what: &'a str, from: &'a str, expect: &'a Expect) -> Self {
        Self {
            what,
            from,
            expect,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn take(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        self.count += chunk.len() as u64;
        let bound = match (self.expect.size, self.expect.limit) {
            (Some(size), Some(limit)) => Some(size.min(limit)),
            (size, limit) => size.or(limit),
        };
        if let Some(bound) = bound.filter(|bound| self.count > *bound) {
            return Err(FetchError::TooLarge {
                what: self.what.to_owned(),
                from: self.from.to_owned(),
                declared: bound,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(self) -> Result<Fetched, FetchError> {
        if let Some(declared) = self.expect.size.filter(|size| *size != self.count) {
            return Err(FetchError::WrongSize {
                what: self.what.to_owned(),
                from: self.from.to_owned(),
                declared,
                got: self.count,
            });
        }
        let got = hex::encode(self.hasher.finalize());
        if let Some(expected) = self.expect.sha256.as_ref().filter(|e| **e != got) {
            return Err(FetchError::WrongDigest {
                what: self.what.to_owned(),
                from: self.from.to_owned(),
                expected: expected.clone(),
                got,
            });
        }
        Ok(Fetched {
            sha256: got,
            size: self.count,
        })
    }
}

/// Copies `source` into `dest` (created 0600), checked.
pub fn fetch_file(
    what: &str,
    source: &Path,
    dest: &Path,
    expect: &Expect,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<Fetched, FetchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        let what = what.to_owned();
        move |source| FetchError::Io { what, path, source }
    };
    let from = source.display().to_string();
    let mut input = std::fs::File::open(source).map_err(io(source))?;
    let meta = input.metadata().map_err(io(source))?;
    if !meta.is_file() {
        // A device or FIFO would copy a disk, read for ever or hang.
        return Err(io(source)(std::io::Error::other("not a regular file")));
    }
    progress(PullEvent::Total(meta.len()));
    let mut out = crate::fsutil::create_private(dest).map_err(io(dest))?;
    let mut checker = Checker::new(what, &from, expect);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buffer).map_err(io(source))?;
        if n == 0 {
            break;
        }
        checker.take(&buffer[..n])?;
        out.write_all(&buffer[..n]).map_err(io(dest))?;
        progress(PullEvent::Bytes(n as u64));
    }
    out.sync_all().map_err(io(dest))?;
    checker.finish()
}

/// Downloads `url` into `dest` (created 0600), checked.
pub fn fetch_url(
    what: &str,
    url: &str,
    dest: &Path,
    expect: &Expect,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<Fetched, FetchError> {
    let http = |detail: String| FetchError::Http {
        what: what.to_owned(),
        url: url.to_owned(),
        detail,
    };
    let io = |source| FetchError::Io {
        what: what.to_owned(),
        path: dest.to_path_buf(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    let mut out = crate::fsutil::create_private(dest).map_err(io)?;
    let mut checker = Checker::new(what, url, expect);
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            // A server that stops sending must not hold `image add` (and
            // the image-work lock) for ever.
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|err| http(err.to_string()))?;
        let mut response = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|err| http(describe(&err)))?;
        if let Some(total) = response.content_length() {
            progress(PullEvent::Total(total));
        }
        while let Some(chunk) = response.chunk().await.map_err(|err| http(describe(&err)))? {
            checker.take(&chunk)?;
            out.write_all(&chunk).map_err(io)?;
            progress(PullEvent::Bytes(chunk.len() as u64));
        }
        Ok::<(), FetchError>(())
    })?;
    out.sync_all().map_err(io)?;
    checker.finish()
}

/// reqwest's error with its causes, which say what actually went wrong.
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn a_file_is_copied_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"kernel bytes").unwrap();
        let dest = dir.path().join("dest");
        let good = Expect {
            sha256: Some(sha(b"kernel bytes")),
            size: Some(12),
            limit: None,
        };
        let fetched = fetch_file("kernel", &src, &dest, &good, &mut |_| {}).unwrap();
        assert_eq!(fetched.size, 12);
        assert_eq!(std::fs::read(&dest).unwrap(), b"kernel bytes");
        for (expect, message) in [
            (
                Expect {
                    size: Some(11),
                    ..Default::default()
                },
                "larger than the 11 bytes",
            ),
            (
                Expect {
                    size: Some(13),
                    ..Default::default()
                },
                "has 12 bytes, 13 declared",
            ),
            (
                Expect {
                    sha256: Some(sha(b"other")),
                    ..Default::default()
                },
                "tampered",
            ),
            (
                Expect {
                    limit: Some(4),
                    ..Default::default()
                },
                "larger than the 4 bytes",
            ),
        ] {
            let err = fetch_file("kernel", &src, &dest, &expect, &mut |_| {}).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
        }
    }
}

//! Artifacts from a file or an http(s) URL into a file, with their sha256
//! and size checked while they stream: reading stops one byte past a
//! declared size (or a cap), and nothing is trusted until the whole file
//! hashed right. A URL's secrets (`user:pass@`, a signed query string)
//! never reach an error: messages carry [`redact_url`]'s form.

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
    #[error("{what} ({from}) is larger than {limit} bytes, {note}; refused")]
    OverLimit {
        what: String,
        from: String,
        limit: u64,
        note: String,
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
    /// What `limit` is and how to get past it, for the error.
    pub limit_note: Option<String>,
}

/// `url` fit to record, print or put in an error: the userinfo
/// (`user:pass@`) and the query and fragment (where signed URLs carry
/// their token) become `***`. Text without a `scheme://` stays as it is.
pub fn redact_url(url: &str) -> String {
    let trimmed = url.trim_matches(|c: char| c == ' ' || c.is_ascii_control());
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return url.to_owned();
    };
    let is_scheme = scheme
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if scheme.is_empty() || !is_scheme {
        return url.to_owned();
    }
    // The authority ends at the first of these (URL parsers also end it at
    // `\`; ending it later only redacts more).
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let (path, extra) = tail.split_at(path_end);
    let mut out = format!("{scheme}://{host}{path}");
    if extra.starts_with('?') {
        out.push_str("?***");
    }
    if extra.contains('#') {
        out.push_str("#***");
    }
    out
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
        self.check_size(self.count)?;
        self.hasher.update(chunk);
        Ok(())
    }

    /// Refuses `bytes` beyond the declared size or the cap (also a length
    /// a server announces, before any byte of it is written).
    fn check_size(&self, bytes: u64) -> Result<(), FetchError> {
        if let Some(declared) = self.expect.size.filter(|size| bytes > *size) {
            return Err(FetchError::TooLarge {
                what: self.what.to_owned(),
                from: self.from.to_owned(),
                declared,
            });
        }
        if let Some(limit) = self.expect.limit.filter(|limit| bytes > *limit) {
            return Err(FetchError::OverLimit {
                what: self.what.to_owned(),
                from: self.from.to_owned(),
                limit,
                note: self
                    .expect
                    .limit_note
                    .clone()
                    .unwrap_or_else(|| "the most this file may be".into()),
            });
        }
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

/// Downloads `url` into `dest` (created 0600), checked. Errors name the
/// URL in its [`redact_url`] form.
pub fn fetch_url(
    what: &str,
    url: &str,
    dest: &Path,
    expect: &Expect,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<Fetched, FetchError> {
    let shown = redact_url(url);
    let http = |detail: String| FetchError::Http {
        what: what.to_owned(),
        url: shown.clone(),
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
    let mut checker = Checker::new(what, &shown, expect);
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
            .map_err(|err| http(describe(err)))?;
        if let Some(total) = response.content_length() {
            checker.check_size(total)?;
            progress(PullEvent::Total(total));
        }
        while let Some(chunk) = response.chunk().await.map_err(|err| http(describe(err)))? {
            checker.take(&chunk)?;
            out.write_all(&chunk).map_err(io)?;
            progress(PullEvent::Bytes(chunk.len() as u64));
        }
        Ok::<(), FetchError>(())
    })?;
    out.sync_all().map_err(io)?;
    checker.finish()
}

/// reqwest's error with its causes, which say what actually went wrong;
/// without the URL (the caller names it redacted).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
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
            ..Default::default()
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
                    limit_note: Some("the cap for test files".into()),
                    ..Default::default()
                },
                "is larger than 4 bytes, the cap for test files; refused",
            ),
        ] {
            let err = fetch_file("kernel", &src, &dest, &expect, &mut |_| {}).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[test]
    fn urls_lose_their_secrets() {
        for (url, shown) in [
            (
                "https://user:pa%40ss@example.com:8443/a/rootfs.ext4?X-Amz-Signature=abc&x=1#frag",
                "https://***@example.com:8443/a/rootfs.ext4?***#***",
            ),
            ("http://token@host/x", "http://***@host/x"),
            ("http://u:p@host?sig=1", "http://***@host?***"),
            ("http://a@b@host/p@q", "http://***@host/p@q"),
            (
                "https://example.com/rootfs.ext4",
                "https://example.com/rootfs.ext4",
            ),
            (" http://u:p@host/x", "http://***@host/x"),
            ("ftp://u:p@host/x", "ftp://***@host/x"),
            ("/srv/bundles/bundle.json", "/srv/bundles/bundle.json"),
            ("./odd?name", "./odd?name"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn a_download_error_names_the_url_without_its_secrets() {
        // Nothing listens on port 9 of 127.0.0.1 here: the connection is
        // refused, and the error still must not carry the secrets.
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_url(
            "kernel",
            "http://user:hunter2@127.0.0.1:9/vmlinux?sig=hunter2",
            &dir.path().join("dest"),
            &Expect::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("http://***@127.0.0.1:9/vmlinux?***"), "{err}");
    }
}

//! `hangar pull`: an image from a registry into the blob store, through
//! oci-client. Manifests are checked against the digest the registry names
//! (and the one the user pinned); every blob goes through the blob store,
//! which checks digest and size. An index resolves to linux/amd64.
//!
//! Registries on 127.0.0.1/localhost are spoken to over plain HTTP (as
//! docker does); others only with `--insecure-registry`. Credentials come
//! from the caller or `~/.docker/config.json` and never reach a log or the
//! state dir.

use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::blobs::{BlobError, BlobStore, Sha256Digest};
use super::catalog::{CatalogError, ImageRecord};
use super::oci::{
    normalize_reference, Descriptor, ImageConfigFile, Index, Manifest, MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST, MEDIA_INDEX, MEDIA_MANIFEST,
};

/// Nested indexes deeper than this are refused.
const MAX_INDEX_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{reference}: {detail}")]
    Registry { reference: String, detail: String },
    #[error("{reference}: the registry sent a manifest whose content hashes to {got}, not {expected}; refused")]
    ManifestDigest {
        reference: String,
        expected: String,
        got: String,
    },
    #[error("{reference}: {what} is not valid: {source}")]
    Json {
        reference: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{reference}: no linux/amd64 image in its index (this host boots x86_64 guests)")]
    NoPlatform { reference: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to reach the registry.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// User and password; else `~/.docker/config.json`; else anonymous.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        f.debug_struct("PullOptions")
            .field("insecure_registries", &self.insecure_registries)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(user, _)| user),
            )
            .finish()
    }
}

/// What a pull reports as it goes, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// A step, in words.
    Step(String),
    /// The bytes the image's blobs will take, once the manifest is known
    /// (blobs already stored count as done at once).
    Total(u64),
    /// This many more bytes arrived (or were found stored).
    Bytes(u64),
}

/// Pulls `reference` into `blobs`; returns its normalised name and record.
pub fn pull(
    reference: &str,
    options: &PullOptions,
    blobs: &BlobStore,
    scratch: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(String, ImageRecord), PullError> {
    let normalized = normalize_reference(reference).map_err(CatalogError::from)?;
    let registry_err = |detail: String| PullError::Registry {
        reference: normalized.clone(),
        detail,
    };
    let image: Reference = normalized
        .parse()
        .map_err(|err| registry_err(format!("not a registry reference: {err}")))?;
    let registry = image.resolve_registry().to_owned();
    let mut insecure = options.insecure_registries.clone();
    let host = registry.split(':').next().unwrap_or("");
    if host == "127.0.0.1" || host == "localhost" {
        insecure.push(registry.clone());
    }
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        ..Default::default()
    });
    let auth = match &options.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => docker_config_auth(&registry).unwrap_or(RegistryAuth::Anonymous),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PullError::Io {
            path: PathBuf::from("tokio runtime"),
            source,
        })?;
    runtime.block_on(async {
        progress(PullEvent::Step("resolving manifest".into()));
        let (digest, manifest) =
            resolve_manifest(&client, &image, &auth, &normalized, blobs).await?;
        let blobs_to_get: Vec<&Descriptor> = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .collect();
        progress(PullEvent::Total(blobs_to_get.iter().map(|b| b.size).sum()));
        let count = blobs_to_get.len();
        for (index, blob) in blobs_to_get.into_iter().enumerate() {
            progress(PullEvent::Step(format!("blob {}/{count}", index + 1)));
            fetch_blob(&client, &image, blob, blobs, scratch, &normalized, progress).await?;
        }
        let config_digest = Sha256Digest::parse(&manifest.config.digest)?;
        let config: ImageConfigFile = serde_json::from_slice(&blobs.read(&config_digest)?)
            .map_err(|source| PullError::Json {
                reference: normalized.clone(),
                what: "image config",
                source,
            })?;
        let record = ImageRecord::new(digest.to_string(), &manifest, config);
        Ok((normalized.clone(), record))
    })
}

/// The linux/amd64 manifest of `image`, with every manifest on the way
/// checked against its digest and stored.
async fn resolve_manifest(
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
    name: &str,
    blobs: &BlobStore,
) -> Result<(Sha256Digest, Manifest), PullError> {
    let accepted = [
        MEDIA_INDEX,
        MEDIA_MANIFEST,
        MEDIA_DOCKER_LIST,
        MEDIA_DOCKER_MANIFEST,
    ];
    let mut current = image.clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let (bytes, digest) = client
            .pull_manifest_raw(&current, auth, &accepted)
            .await
            .map_err(|err| PullError::Registry {
                reference: name.to_owned(),
                detail: err.to_string(),
            })?;
        let actual = Sha256Digest::of(&bytes);
        for expected in [Some(digest.as_str()), current.digest()]
            .into_iter()
            .flatten()
        {
            if expected != actual.to_string() {
                return Err(PullError::ManifestDigest {
                    reference: name.to_owned(),
                    expected: expected.to_owned(),
                    got: actual.to_string(),
                });
            }
        }
        blobs.put(&actual, bytes.len() as u64, bytes.as_slice())?;
        let json = |what, source| PullError::Json {
            reference: name.to_owned(),
            what,
            source,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| json("manifest", e))?;
        if value.get("manifests").is_none() {
            let manifest: Manifest =
                serde_json::from_value(value).map_err(|e| json("image manifest", e))?;
            return Ok((actual, manifest));
        }
        let index: Index = serde_json::from_value(value).map_err(|e| json("image index", e))?;
        let chosen = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| PullError::NoPlatform {
                reference: name.to_owned(),
            })?;
        current = image.clone_with_digest(chosen.digest.clone());
    }
    Err(PullError::NoPlatform {
        reference: name.to_owned(),
    })
}

/// Downloads one blob (unless stored) and stores it through the checks.
async fn fetch_blob(
    client: &Client,
    image: &Reference,
    blob: &Descriptor,
    blobs: &BlobStore,
    scratch: &Path,
    name: &str,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), PullError> {
    let digest = Sha256Digest::parse(&blob.digest)?;
    if blobs.contains(&digest) {
        progress(PullEvent::Bytes(blob.size));
        return Ok(());
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PullError::Io { path, source }
    };
    // Concurrent pulls of one image share the work: whoever holds a blob's
    // lock downloads it; the others wait, then find it stored.
    let lock_path = scratch.join(format!("blob-{}.lock", digest.hex()));
    let _lock = crate::fsutil::lock_file(&lock_path, true).map_err(io_err(&lock_path))?;
    if blobs.contains(&digest) {
        progress(PullEvent::Bytes(blob.size));
        return Ok(());
    }
    let download = tempfile::Builder::new()
        .prefix("pull-")
        .tempfile_in(scratch)
        .map_err(io_err(scratch))?;
    let path = download.path().to_path_buf();
    let file = tokio::fs::File::create(&path)
        .await
        .map_err(io_err(&path))?;
    // Never more than declared: the blob store refuses a longer stream,
    // and this bounds what lands on disk before it does.
    let mut limited = LimitedWriter {
        inner: file,
        left: blob.size.saturating_add(1),
        progress,
    };
    client
        .pull_blob(image, blob.digest.as_str(), &mut limited)
        .await
        .map_err(|err| PullError::Registry {
            reference: name.to_owned(),
            detail: format!("blob {}: {err}", blob.digest),
        })?;
    // tokio's file buffers: everything must be written before it is read.
    tokio::io::AsyncWriteExt::flush(&mut limited.inner)
        .await
        .map_err(io_err(&path))?;
    blobs.put_file(&digest, blob.size, &path)?;
    Ok(())
}

/// Fails a write past `left` bytes; reports what it writes.
struct LimitedWriter<'p, W> {
    inner: W,
    left: u64,
    progress: &'p mut dyn FnMut(PullEvent),
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LimitedWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the registry sent more bytes than the blob's declared size",
            )));
        }
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &written {
            this.left -= *n as u64;
            (this.progress)(PullEvent::Bytes(*n as u64));
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Basic credentials for `registry` from `~/.docker/config.json`
/// (`auths.<registry>.auth`, base64 of `user:password`).
fn docker_config_auth(registry: &str) -> Option<RegistryAuth> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".docker/config.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let auths = config.get("auths")?;
    let keys = [
        registry.to_owned(),
        format!("https://{registry}"),
        if registry == "docker.io" || registry == "index.docker.io" {
            "https://index.docker.io/v1/".to_owned()
        } else {
            String::new()
        },
    ];
    let encoded = keys
        .iter()
        .find_map(|key| auths.get(key)?.get("auth")?.as_str())?;
    let decoded = base64_decode(encoded)?;
    let (user, password) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_owned(), p.to_owned()))?;
    Some(RegistryAuth::Basic(user, password))
}

/// Standard base64 (with or without padding); None if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let bytes: Vec<u8> = text.trim().trim_end_matches('=').bytes().collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let produced = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_docker_auth_strings() {
        assert_eq!(base64_decode("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(base64_decode("YTpi").unwrap(), b"a:b");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("$$$$").is_none());
    }

    #[test]
    fn options_never_print_a_password() {
        let options = PullOptions {
            insecure_registries: vec![],
            credentials: Some(("me".into(), "s3cret".into())),
        };
        assert!(!format!("{options:?}").contains("s3cret"));
    }
}

//! OCI image types (the parts Hangar reads) and image references.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The annotation naming an image inside an OCI layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A pointer to a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index (or Docker manifest list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The image configuration blob; only what running needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
}

/// How the image wants to be run (`config` in the OCI image config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

impl RunConfig {
    /// Entrypoint then Cmd, or `command` in place of Cmd (like `docker
    /// run IMAGE CMD...`).
    pub fn argv(&self, command: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        if command.is_empty() {
            argv.extend(self.cmd.clone().unwrap_or_default());
        } else {
            argv.extend(command.iter().cloned());
        }
        argv
    }

    /// `Env` as pairs; entries without `=` are skipped.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .flatten()
            .filter_map(|entry| {
                let (key, value) = entry.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            })
            .collect()
    }
}

/// Why a reference is not usable.
#[derive(Debug, thiserror::Error)]
#[error("image reference {reference:?} is not valid: {why}")]
pub struct ReferenceError {
    pub reference: String,
    pub why: &'static str,
}

/// Normalises a reference like docker does: `alpine` ->
/// `docker.io/library/alpine:latest`, `me/app:1` -> `docker.io/me/app:1`,
/// `localhost:5000/app` -> `localhost:5000/app:latest`.
pub fn normalize_reference(reference: &str) -> Result<String, ReferenceError> {
    let bad = |why| ReferenceError {
        reference: reference.to_owned(),
        why,
    };
    if reference.is_empty() || reference.len() > 255 {
        return Err(bad("it must be 1-255 characters"));
    }
    if !reference
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return Err(bad(
            "use letters, digits and . _ - / : @ only (like registry/name:tag)",
        ));
    }
    if reference.contains("..") || reference.starts_with('/') || reference.ends_with('/') {
        return Err(bad("it must be registry/name:tag without empty parts"));
    }
    let (name, suffix) = match reference.split_once('@') {
        Some((name, digest)) => (name, format!("@{digest}")),
        None => {
            let last = reference.rsplit('/').next().unwrap_or(reference);
            match last.rsplit_once(':') {
                Some((_, tag)) if !tag.is_empty() => {
                    let cut = reference.len() - tag.len() - 1;
                    (&reference[..cut], format!(":{tag}"))
                }
                Some(_) => return Err(bad("the tag after ':' is empty")),
                None => (reference, ":latest".to_owned()),
            }
        }
    };
    let first = name.split('/').next().unwrap_or(name);
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        name.to_owned()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    Ok(format!("{full}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        let n = |r| normalize_reference(r).expect(r);
        assert_eq!(n("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(n("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(n("me/app:1"), "docker.io/me/app:1");
        assert_eq!(n("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(n("ghcr.io/o/r:v"), "ghcr.io/o/r:v");
        let pinned = format!("alpine@sha256:{}", "a".repeat(64));
        assert_eq!(
            n(&pinned),
            format!("docker.io/library/alpine@sha256:{}", "a".repeat(64))
        );
        for bad in ["", "a b", "../x", "x:", "/x", "x/"] {
            assert!(normalize_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_config_builds_argv_and_env() {
        let config = RunConfig {
            env: Some(vec!["PATH=/bin".into(), "broken".into()]),
            entrypoint: Some(vec!["/init.sh".into()]),
            cmd: Some(vec!["serve".into()]),
            ..Default::default()
        };
        assert_eq!(config.argv(&[]), vec!["/init.sh", "serve"]);
        assert_eq!(config.argv(&["debug".into()]), vec!["/init.sh", "debug"]);
        assert_eq!(config.env_pairs(), vec![("PATH".into(), "/bin".into())]);
    }
}

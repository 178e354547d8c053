//! Base-image bundle manifests (SmartVM's model): a kernel and a root file
//! system, each a file or a download with its sha256 and size, and the boot
//! arguments they go with. Parsing and validation only; no I/O.
//!
//! ```json
//! {
//!   "schemaVersion": 1,
//!   "bundleId": "debian-12-min",
//!   "arch": "x86_64",
//!   "rootfsType": "ext4",
//!   "rootfsIsReadOnly": false,
//!   "bootArgs": "reboot=k panic=1",
//!   "kernel": { "path": "vmlinux", "sha256": "…", "sizeBytes": 1234 },
//!   "rootfs": { "url": "https://…/rootfs.ext4", "sha256": "…" }
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest format this Hangar reads.
pub const SCHEMA_VERSION: u32 = 1;
/// The only architecture this build's backends run.
pub const HOST_ARCH: &str = "x86_64";
/// A manifest is a few hundred bytes; anything far larger is not one.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("bundle manifest {source_name} is not valid JSON for a bundle manifest: {detail}")]
    Syntax { source_name: String, detail: String },
    #[error("bundle manifest {source_name}: field `{field}` {problem}")]
    Field {
        source_name: String,
        field: String,
        problem: String,
    },
}

/// The root file system's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsType {
    Ext4,
    Squashfs,
}

impl RootfsType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Squashfs => "squashfs",
        }
    }
}

/// One artifact as the manifest states it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawArtifact {
    url: Option<String>,
    path: Option<String>,
    file_name: Option<String>,
    sha256: Option<String>,
    size_bytes: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawManifest {
    schema_version: serde_json::Value,
    bundle_id: String,
    name: Option<String>,
    arch: String,
    firecracker_version: Option<String>,
    rootfs_type: String,
    rootfs_is_read_only: Option<bool>,
    boot_args: Option<String>,
    kernel: RawArtifact,
    rootfs: RawArtifact,
}

/// Where an artifact comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ArtifactSource {
    /// A local file: the manifest names it relative to its own folder
    /// (no absolute path, no `..`); stored resolved.
    Path { path: PathBuf },
    /// An http(s) download.
    Url { url: String },
}

/// A validated artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub source: ArtifactSource,
    /// Lowercase hex; required for downloads.
    pub sha256: Option<String>,
    pub size_bytes: Option<u64>,
}

/// A validated manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub bundle_id: String,
    pub name: Option<String>,
    pub arch: String,
    pub firecracker_version: Option<String>,
    pub rootfs_type: RootfsType,
    /// squashfs is always read-only.
    pub rootfs_read_only: bool,
    pub boot_args: String,
    pub kernel: Artifact,
    pub rootfs: Artifact,
}

/// Where the manifest itself came from: local paths inside it are only
/// allowed in a local manifest (a downloaded one must not read host files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestOrigin {
    File { dir: PathBuf },
    Url,
}

impl BundleManifest {
    /// Parses and validates `bytes` read from `source_name`.
    pub fn parse(
        bytes: &[u8],
        source_name: &str,
        origin: &ManifestOrigin,
    ) -> Result<Self, ManifestError> {
        let syntax = |err: serde_json::Error| ManifestError::Syntax {
            source_name: source_name.to_owned(),
            detail: err.to_string(),
        };
        let field = |field: &str, problem: String| ManifestError::Field {
            source_name: source_name.to_owned(),
            field: field.to_owned(),
            problem,
        };
        // The version first: a newer manifest may have fields this one
        // does not know, and that is the error worth reporting.
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(syntax)?;
        let version = value.get("schemaVersion").cloned().unwrap_or_default();
        if let Some(newer) = version.as_u64().filter(|v| *v > u64::from(SCHEMA_VERSION)) {
            return Err(field(
                "schemaVersion",
                format!(
                    "is {newer}, newer than this Hangar reads ({SCHEMA_VERSION}); upgrade Hangar"
                ),
            ));
        }
        let raw: RawManifest = serde_json::from_value(value).map_err(syntax)?;
        match raw.schema_version.as_u64() {
            Some(1) => {}
            Some(newer) if newer > u64::from(SCHEMA_VERSION) => {
                return Err(field(
                    "schemaVersion",
                    format!(
                    "is {newer}, newer than this Hangar reads ({SCHEMA_VERSION}); upgrade Hangar"
                ),
                ))
            }
            _ => {
                return Err(field(
                    "schemaVersion",
                    format!("is {}, expected {SCHEMA_VERSION}", raw.schema_version),
                ))
            }
        }
        validate_bundle_id(&raw.bundle_id).map_err(|problem| field("bundleId", problem))?;
        if raw.arch != HOST_ARCH {
            return Err(field(
                "arch",
                format!("is {:?}; this host runs {HOST_ARCH} guests only", raw.arch),
            ));
        }
        let rootfs_type = match raw.rootfs_type.as_str() {
            "ext4" => RootfsType::Ext4,
            "squashfs" => RootfsType::Squashfs,
            other => {
                return Err(field(
                    "rootfsType",
                    format!("is {other:?}; expected \"ext4\" or \"squashfs\""),
                ))
            }
        };
        let boot_args = raw.boot_args.unwrap_or_default();
        if boot_args.len() > 2048 || boot_args.chars().any(|c| c.is_control()) {
            return Err(field(
                "bootArgs",
                "must be one line of at most 2048 bytes".into(),
            ));
        }
        for (text, name) in [
            (&raw.name, "name"),
            (&raw.firecracker_version, "firecrackerVersion"),
        ] {
            if text
                .as_deref()
                .is_some_and(|t| t.len() > 256 || t.chars().any(|c| c.is_control()))
            {
                return Err(field(name, "must be one line of at most 256 bytes".into()));
            }
        }
        let kernel =
            artifact(raw.kernel, origin).map_err(|(f, p)| field(&format!("kernel.{f}"), p))?;
        let rootfs =
            artifact(raw.rootfs, origin).map_err(|(f, p)| field(&format!("rootfs.{f}"), p))?;
        Ok(Self {
            bundle_id: raw.bundle_id,
            name: raw.name,
            arch: raw.arch,
            firecracker_version: raw.firecracker_version,
            rootfs_type,
            rootfs_read_only: rootfs_type == RootfsType::Squashfs
                || raw.rootfs_is_read_only.unwrap_or(false),
            boot_args,
            kernel,
            rootfs,
        })
    }
}

/// Bundle ids name folders and appear in `bundle:ID` references.
pub fn validate_bundle_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let starts_well = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if id.is_empty() || id.len() > 64 || !starts_well || !id.chars().all(ok_char) {
        return Err(format!(
            "is {id:?}; use 1-64 of lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
        ));
    }
    // The bundle store's own entries (also keeps disk image names clear
    // of their catalog's scratch folder).
    if matches!(id, "tmp" | "lock") {
        return Err(format!("is {id:?}, a name Hangar reserves; pick another"));
    }
    Ok(())
}

fn artifact(raw: RawArtifact, origin: &ManifestOrigin) -> Result<Artifact, (String, String)> {
    let sha256 = match raw.sha256 {
        Some(hex) => {
            let hex = hex.strip_prefix("sha256:").unwrap_or(&hex).to_owned();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(("sha256".into(), "must be 64 hex digits".into()));
            }
            Some(hex.to_ascii_lowercase())
        }
        None => None,
    };
    if let Some(name) = &raw.file_name {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(("fileName".into(), "must be a plain file name".into()));
        }
    }
    let source = match (raw.url, raw.path) {
        (Some(_), Some(_)) => {
            return Err(("url".into(), "and `path` are both set; give one".into()))
        }
        (None, None) => return Err(("url".into(), "or `path` is required".into())),
        (Some(url), None) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                let shown = super::fetch::redact_url(&url);
                return Err(("url".into(), format!("{shown:?} is not an http(s) URL")));
            }
            if sha256.is_none() {
                return Err((
                    "sha256".into(),
                    "is required when the artifact is downloaded (`url`)".into(),
                ));
            }
            ArtifactSource::Url { url }
        }
        (None, Some(path)) => match origin {
            ManifestOrigin::Url => return Err((
                "path".into(),
                "is not allowed in a downloaded manifest (it would read a host file); use `url`"
                    .into(),
            )),
            ManifestOrigin::File { dir } => {
                check_relative(&path).map_err(|problem| ("path".to_owned(), problem))?;
                ArtifactSource::Path {
                    path: dir.join(&path),
                }
            }
        },
    };
    Ok(Artifact {
        source,
        sha256,
        size_bytes: raw.size_bytes,
    })
}

/// A manifest's files sit beside it (or below): a bundle folder can be
/// moved or copied whole, and the manifest reads nothing else on the host.
fn check_relative(path: &str) -> Result<(), String> {
    use std::path::Component;
    if path.is_empty() {
        return Err("is empty; give the file's path relative to the manifest's folder".into());
    }
    let shown = path.escape_debug();
    if Path::new(path).is_absolute() {
        return Err(format!(
            "is \"{shown}\", an absolute path; give it relative to the manifest's folder (move the file beside the manifest, or use `url`)"
        ));
    }
    if Path::new(path)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(format!(
            "is \"{shown}\", which climbs out with `..`; give a path inside the manifest's folder (move the file beside the manifest, or use `url`)"
        ));
    }
    Ok(())
}

/// Kernel arguments a bundle may not set on Hangar's QEMU machine: Hangar
/// owns the console, the root device and PID 1, and the machine has PCI
/// devices (`pci=off`, common in Firecracker boot args, would hide every
/// one of them; `8250.nr_uarts=0` the serial console).
pub fn machine_owned_arg(arg: &str) -> bool {
    let key = arg.split_once('=').map_or(arg, |(key, _)| key);
    // Hangar's own options (the agent takes the last value of a key) and
    // `--` (what follows goes to init) are the machine's too.
    key.starts_with("hangar.")
        || key == "--"
        || matches!(
            key,
            "pci"
                | "8250.nr_uarts"
                | "console"
                | "root"
                | "rootfstype"
                | "ro"
                | "rw"
                | "init"
                | "rdinit"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "a3f1c0d1b2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9";

    fn manifest(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
        let mut value = serde_json::json!({
            "schemaVersion": 1,
            "bundleId": "fc-ubuntu-24.04",
            "arch": "x86_64",
            "firecrackerVersion": "v1.12.0",
            "rootfsType": "ext4",
            "bootArgs": "console=ttyS0 reboot=k panic=1 pci=off",
            "kernel": {"path": "vmlinux", "sha256": HASH, "sizeBytes": 10},
            "rootfs": {"url": "https://example.com/rootfs.ext4", "sha256": HASH}
        });
        edit(&mut value);
        value
    }

    fn parse(value: &serde_json::Value, origin: &ManifestOrigin) -> Result<BundleManifest, String> {
        BundleManifest::parse(value.to_string().as_bytes(), "m.json", origin)
            .map_err(|e| e.to_string())
    }

    fn local() -> ManifestOrigin {
        ManifestOrigin::File {
            dir: "/bundles".into(),
        }
    }

    #[test]
    fn a_smartvm_manifest_parses_with_paths_resolved() {
        let parsed = parse(&manifest(|_| {}), &local()).unwrap();
        assert_eq!(parsed.bundle_id, "fc-ubuntu-24.04");
        assert_eq!(
            parsed.kernel.source,
            ArtifactSource::Path {
                path: "/bundles/vmlinux".into()
            }
        );
        assert_eq!(parsed.kernel.size_bytes, Some(10));
        assert!(!parsed.rootfs_read_only);
    }

    #[test]
    fn squashfs_is_read_only() {
        let parsed = parse(&manifest(|m| m["rootfsType"] = "squashfs".into()), &local()).unwrap();
        assert!(parsed.rootfs_read_only);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|m| m["schemaVersion"] = 2.into()),
                "`schemaVersion` is 2, newer",
            ),
            (
                Box::new(|m| m["schemaVersion"] = "1".into()),
                "`schemaVersion`",
            ),
            (Box::new(|m| m["bundleId"] = "../etc".into()), "`bundleId`"),
            (Box::new(|m| m["bundleId"] = "".into()), "`bundleId`"),
            (
                Box::new(|m| m["arch"] = "aarch64".into()),
                "`arch` is \"aarch64\"",
            ),
            (
                Box::new(|m| m["rootfsType"] = "btrfs".into()),
                "`rootfsType`",
            ),
            (Box::new(|m| m["bootArgs"] = "a\nb".into()), "`bootArgs`"),
            (
                Box::new(|m| m["rootfs"]["sha256"] = serde_json::Value::Null),
                "`rootfs.sha256` is required",
            ),
            (
                Box::new(|m| m["kernel"]["sha256"] = "abc".into()),
                "`kernel.sha256` must be 64",
            ),
            (
                Box::new(|m| m["kernel"]["url"] = "ftp://x".into()),
                "`kernel.url` and `path`",
            ),
            (
                Box::new(|m| m["rootfs"]["url"] = "ftp://x/rootfs".into()),
                "`rootfs.url` \"ftp://x/rootfs\" is not an http(s) URL",
            ),
            (Box::new(|m| m["bundleId"] = "tmp".into()), "reserves"),
            (
                Box::new(|m| m["rootfs"]["url"] = "file:///etc/shadow".into()),
                "`rootfs.url`",
            ),
            (
                Box::new(|m| m["kernel"]["fileName"] = "../x".into()),
                "`kernel.fileName`",
            ),
            (
                Box::new(|m| {
                    m["kernel"]["path"] = serde_json::Value::Null;
                }),
                "`kernel.url` or `path` is required",
            ),
            (
                Box::new(|m| m["kernel"]["path"] = "/etc/shadow".into()),
                "`kernel.path` is \"/etc/shadow\", an absolute path",
            ),
            (
                Box::new(|m| m["kernel"]["path"] = "../vmlinux".into()),
                "`kernel.path` is \"../vmlinux\", which climbs out with `..`",
            ),
            (
                Box::new(|m| m["kernel"]["path"] = "boot/../../x".into()),
                "`kernel.path` is \"boot/../../x\", which climbs out",
            ),
            (
                Box::new(|m| m["kernel"]["path"] = "".into()),
                "`kernel.path` is empty",
            ),
            (
                Box::new(|m| m["rootfs"]["url"] = "ftp://u:secret@x/r?sig=secret".into()),
                "`rootfs.url` \"ftp://***@x/r?***\" is not an http(s) URL",
            ),
        ];
        for (edit, expected) in cases {
            let err = parse(&manifest(edit), &local()).unwrap_err();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        let err = parse(&manifest(|m| m["extra"] = 1.into()), &local()).unwrap_err();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn paths_inside_the_manifest_folder_resolve_under_it() {
        let parsed = parse(
            &manifest(|m| m["kernel"]["path"] = "./boot/vmlinux".into()),
            &local(),
        )
        .unwrap();
        assert_eq!(
            parsed.kernel.source,
            ArtifactSource::Path {
                path: "/bundles/./boot/vmlinux".into()
            }
        );
    }

    #[test]
    fn a_downloaded_manifest_may_not_name_host_files() {
        let err = parse(&manifest(|_| {}), &ManifestOrigin::Url).unwrap_err();
        assert!(err.contains("`kernel.path` is not allowed"), "{err}");
    }

    #[test]
    fn hangar_keeps_the_machine_arguments() {
        let kept: Vec<&str> =
            "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=0 ro init=/sbin/init hangar.rootro=0 hangar.probe -- quiet"
                .split_whitespace()
                .filter(|a| !machine_owned_arg(a))
                .collect();
        assert_eq!(kept, ["reboot=k", "panic=1", "quiet"]);
    }
}

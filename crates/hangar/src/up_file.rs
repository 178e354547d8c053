//! The declarative file of `hangar up` / `hangar down` (vm-manager's
//! VMFile): several VMs, each a [`VmSpec`] plus ordered provision steps.
//!
//! ```toml
//! namespace = "demo"              # the stack; default "default"
//!
//! [[vm]]
//! name = "web"
//! memory = "512M"
//! labels = { role = "web" }
//! [[vm.provision]]
//! copy = "site"                   # a host file or directory, relative to this file
//! to = "/srv/site"
//! [[vm.provision]]
//! run = ["sh", "-c", "echo ready > /run/web"]
//! ```
//!
//! A step either runs a command through the agent (`run`, with optional
//! `env` and `workdir`) or copies a host path into the guest (`copy` and
//! `to`, with `hangar cp`'s rules). The content of copied paths is part of
//! the entry's hash, so `up` notices an edited file.
//!
//! TOML, JSON or YAML by extension, like spec files. Unknown fields are
//! refused, every error names the file and the VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::{is_valid_name, SpecError, VmSpec, DEFAULT_NAMESPACE};

/// Label marking VMs that `up` manages.
pub const MANAGED_LABEL: &str = "hangar.up";
/// Label holding the hash of the entry a VM was made from.
pub const HASH_LABEL: &str = "hangar.up.hash";

/// One step after the VM boots: a command run through the agent, or a host
/// path copied in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionStep {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Host path to copy in; relative paths are taken from the up file's
    /// directory (resolved when the file is read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<PathBuf>,
    /// Guest destination of `copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl ProvisionStep {
    /// Exactly one kind of step, with only its own fields.
    fn check(&self) -> Result<(), String> {
        match (&self.run.is_empty(), &self.copy, &self.to) {
            (false, None, None) => Ok(()),
            (true, Some(_), Some(to)) if !to.is_empty() => {
                if self.env.is_empty() && self.workdir.is_none() {
                    Ok(())
                } else {
                    Err("a `copy` step takes only `copy` and `to`".into())
                }
            }
            (true, Some(_), _) => Err("a `copy` step needs `to`, the guest path".into()),
            (true, None, _) => Err("a step needs `run` (a command) or `copy` and `to`".into()),
            (false, _, _) => Err("a step has either `run` or `copy`, not both".into()),
        }
    }
}

/// One VM of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpVm {
    pub spec: VmSpec,
    pub provision: Vec<ProvisionStep>,
    /// Hash of spec and steps: a VM whose label differs is replaced.
    pub hash: String,
}

/// A parsed up file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpFile {
    pub namespace: String,
    pub vms: Vec<UpVm>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: VM #{index}: {message}")]
    Vm {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{path}: {source}")]
    Spec {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default, rename = "vm")]
    vms: Vec<serde_json::Value>,
}

pub fn read_up_file(path: &Path) -> Result<UpFile, UpFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| UpFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file = parse_up_file(path, &text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (index, vm) in file.vms.iter_mut().enumerate() {
        resolve_copies(vm, base).map_err(|message| UpFileError::Vm {
            path: path.to_path_buf(),
            index: index + 1,
            message,
        })?;
    }
    Ok(file)
}

/// Makes `copy` paths absolute (from the up file's directory), checks they
/// exist, and folds their content into the entry's hash.
fn resolve_copies(vm: &mut UpVm, base: &Path) -> Result<(), String> {
    let mut hasher = Sha256::new();
    let mut any = false;
    for (number, step) in vm.provision.iter_mut().enumerate() {
        let Some(copy) = &step.copy else { continue };
        let absolute = if copy.is_absolute() {
            copy.clone()
        } else {
            base.join(copy)
        };
        hash_tree(&absolute, &mut hasher).map_err(|e| {
            format!(
                "provision step {}: copy {}: {e}",
                number + 1,
                absolute.display()
            )
        })?;
        step.copy = Some(absolute);
        any = true;
    }
    if any {
        hasher.update(vm.hash.as_bytes());
        let hash = hex::encode(&hasher.finalize()[..8]);
        vm.spec.labels.insert(HASH_LABEL.into(), hash.clone());
        vm.hash = hash;
    }
    Ok(())
}

/// Feeds names, kinds, modes, link targets and contents under `path` (not
/// following symlinks) into `hasher`.
fn hash_tree(path: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update(meta.permissions().mode().to_le_bytes());
    if meta.file_type().is_symlink() {
        hasher.update(std::fs::read_link(path)?.as_os_str().as_encoded_bytes());
    } else if meta.is_dir() {
        let mut children = std::fs::read_dir(path)?.collect::<Result<Vec<_>, _>>()?;
        children.sort_by_key(std::fs::DirEntry::file_name);
        for child in children {
            hash_tree(&child.path(), hasher)?;
        }
    } else {
        let mut file = std::fs::File::open(path)?;
        std::io::copy(&mut file, hasher)?;
    }
    Ok(())
}

pub fn parse_up_file(path: &Path, text: &str) -> Result<UpFile, UpFileError> {
    let parse = |message: String| UpFileError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let wire: Wire = match extension {
        "toml" => toml::from_str(text).map_err(|e| parse(e.to_string().trim().to_owned()))?,
        "json" => serde_json::from_str(text).map_err(|e| parse(e.to_string()))?,
        "yaml" | "yml" => serde_yaml::from_str(text).map_err(|e| parse(e.to_string()))?,
        _ => {
            return Err(parse(
                "unknown extension: use .toml, .json, .yaml or .yml".into(),
            ))
        }
    };
    let namespace = wire
        .namespace
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    if !is_valid_name(&namespace) {
        return Err(UpFileError::Spec {
            path: path.to_path_buf(),
            source: SpecError::Namespace { namespace },
        });
    }
    let mut vms = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (index, value) in wire.vms.into_iter().enumerate() {
        let vm_err = |message: String| UpFileError::Vm {
            path: path.to_path_buf(),
            index: index + 1,
            message,
        };
        let vm = entry(value, &namespace).map_err(vm_err)?;
        if !names.insert(vm.spec.name.clone()) {
            return Err(vm_err(format!("the name {:?} is used twice", vm.spec.name)));
        }
        vms.push(vm);
    }
    Ok(UpFile { namespace, vms })
}

fn entry(value: serde_json::Value, namespace: &str) -> Result<UpVm, String> {
    let serde_json::Value::Object(mut fields) = value else {
        return Err("each [[vm]] must be a table".into());
    };
    let provision: Vec<ProvisionStep> = match fields.remove("provision") {
        Some(steps) => serde_json::from_value(steps).map_err(|e| format!("provision: {e}"))?,
        None => Vec::new(),
    };
    for (number, step) in provision.iter().enumerate() {
        step.check()
            .map_err(|e| format!("provision step {}: {e}", number + 1))?;
    }
    match fields.get("namespace").and_then(|v| v.as_str()) {
        Some(ns) if ns != namespace => {
            return Err(format!(
                "namespace {ns:?} differs from the file's {namespace:?}; set it once at the top"
            ))
        }
        _ => {}
    }
    fields.insert("namespace".into(), namespace.into());
    let mut spec: VmSpec =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| e.to_string())?;
    let hash = entry_hash(&spec, &provision);
    spec.labels.insert(MANAGED_LABEL.into(), "true".into());
    spec.labels.insert(HASH_LABEL.into(), hash.clone());
    spec.validate().map_err(|e| e.to_string())?;
    Ok(UpVm {
        spec,
        provision,
        hash,
    })
}

fn entry_hash(spec: &VmSpec, provision: &[ProvisionStep]) -> String {
    let json = serde_json::to_vec(&(spec, provision)).unwrap_or_default();
    hex::encode(&Sha256::digest(json)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
namespace = "demo"
[[vm]]
name = "web"
memory = "512M"
[[vm.provision]]
run = ["sh", "-c", "echo hi"]
[[vm]]
name = "db"
"#;

    #[test]
    fn parses_vms_steps_and_namespace() {
        let file = parse_up_file(Path::new("hangar.toml"), FILE).unwrap();
        assert_eq!(file.namespace, "demo");
        assert_eq!(file.vms.len(), 2);
        assert_eq!(file.vms[0].spec.namespace, "demo");
        assert_eq!(file.vms[0].provision[0].run[2], "echo hi");
        assert_eq!(file.vms[0].spec.labels[MANAGED_LABEL], "true");
        assert_ne!(file.vms[0].hash, file.vms[1].hash);
    }

    #[test]
    fn the_hash_follows_spec_and_steps() {
        let a = parse_up_file(Path::new("a.toml"), FILE).unwrap();
        let b = parse_up_file(Path::new("a.toml"), &FILE.replace("512M", "1G")).unwrap();
        let c = parse_up_file(Path::new("a.toml"), &FILE.replace("echo hi", "echo ho")).unwrap();
        assert_ne!(a.vms[0].hash, b.vms[0].hash);
        assert_ne!(a.vms[0].hash, c.vms[0].hash);
        assert_eq!(a.vms[1].hash, b.vms[1].hash);
    }

    #[test]
    fn mistakes_name_the_vm() {
        let dup = "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"a\"\n";
        let err = parse_up_file(Path::new("f.toml"), dup).unwrap_err();
        assert!(
            err.to_string()
                .contains("VM #2: the name \"a\" is used twice"),
            "{err}"
        );
        let unknown = "[[vm]]\nname = \"a\"\ncpu = 2\n";
        let err = parse_up_file(Path::new("f.toml"), unknown).unwrap_err();
        assert!(
            err.to_string().contains("VM #1: unknown field `cpu`"),
            "{err}"
        );
        let step = "[[vm]]\nname = \"a\"\n[[vm.provision]]\ncopy = \"x\"\n";
        let err = parse_up_file(Path::new("f.toml"), step).unwrap_err();
        assert!(
            err.to_string()
                .contains("provision step 1: a `copy` step needs `to`"),
            "{err}"
        );
        let both =
            "[[vm]]\nname = \"a\"\n[[vm.provision]]\ncopy = \"x\"\nto = \"/x\"\nrun = [\"true\"]\n";
        let err = parse_up_file(Path::new("f.toml"), both).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let empty = "[[vm]]\nname = \"a\"\n[[vm.provision]]\nenv = { A = \"b\" }\n";
        let err = parse_up_file(Path::new("f.toml"), empty).unwrap_err();
        assert!(err.to_string().contains("needs `run`"), "{err}");
    }

    #[test]
    fn copy_paths_resolve_from_the_file_and_their_content_counts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.txt"), b"v1").unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(
            &file,
            "[[vm]]\nname = \"a\"\n[[vm.provision]]\ncopy = \"site.txt\"\nto = \"/srv/\"\n",
        )
        .unwrap();
        let first = read_up_file(&file).unwrap();
        let step = &first.vms[0].provision[0];
        assert_eq!(
            step.copy.as_deref(),
            Some(dir.path().join("site.txt").as_path())
        );
        std::fs::write(dir.path().join("site.txt"), b"v2").unwrap();
        let second = read_up_file(&file).unwrap();
        assert_ne!(first.vms[0].hash, second.vms[0].hash);
        assert_eq!(second.vms[0].spec.labels[HASH_LABEL], second.vms[0].hash);
        std::fs::remove_file(dir.path().join("site.txt")).unwrap();
        let err = read_up_file(&file).unwrap_err();
        assert!(err.to_string().contains("provision step 1: copy"), "{err}");
    }
}

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
//! run = ["sh", "-c", "echo ready > /run/web"]
//! ```
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

/// One command run through the agent after the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionStep {
    pub run: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
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
    parse_up_file(path, &text)
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
    if provision.iter().any(|step| step.run.is_empty()) {
        return Err("provision: a step's `run` needs a program".into());
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
        assert!(err.to_string().contains("provision"), "{err}");
    }
}

//! Reading a [`VmSpec`] from a file: TOML, JSON or YAML by extension.
//! Unknown fields are refused (the spec denies them), and every error names
//! the file and, where the parser knows it, the line and field.

use std::path::{Path, PathBuf};

use crate::spec::{SpecError, VmSpec};

#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("cannot read spec file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec file {path} has an unknown extension: use .toml, .json, .yaml or .yml")]
    Format { path: PathBuf },
    #[error("spec file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("spec file {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: SpecError,
    },
}

/// Reads, parses and validates a spec file.
pub fn read_spec_file(path: &Path) -> Result<VmSpec, SpecFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let spec = parse_spec(path, &text)?;
    spec.validate().map_err(|source| SpecFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(spec)
}

/// Parses `text` in the format `path`'s extension names.
pub fn parse_spec(path: &Path, text: &str) -> Result<VmSpec, SpecFileError> {
    let parse = |message: String| SpecFileError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("toml") => toml::from_str(text).map_err(|e| parse(e.to_string().trim().to_owned())),
        Some("json") => serde_json::from_str(text).map_err(|e| parse(e.to_string())),
        Some("yaml" | "yml") => serde_yaml::from_str(text).map_err(|e| parse(e.to_string())),
        _ => Err(SpecFileError::Format {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::size::ByteSize;

    #[test]
    fn the_same_spec_in_three_formats() {
        let toml = "name = \"web\"\ncpus = 2\nmemory = \"512M\"\n[labels]\nrole = \"web\"\n";
        let json = r#"{"name":"web","cpus":2,"memory":"512M","labels":{"role":"web"}}"#;
        let yaml = "name: web\ncpus: 2\nmemory: 512M\nlabels:\n  role: web\n";
        for (file, text) in [("a.toml", toml), ("a.json", json), ("a.yaml", yaml)] {
            let spec = parse_spec(Path::new(file), text).unwrap();
            assert_eq!(spec.cpus, 2, "{file}");
            assert_eq!(spec.memory, ByteSize::mib(512), "{file}");
            assert_eq!(spec.labels["role"], "web", "{file}");
        }
    }

    #[test]
    fn unknown_fields_and_extensions_are_named() {
        let err = parse_spec(Path::new("vm.toml"), "name = \"w\"\ncpu = 2\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
        assert!(err.to_string().contains("vm.toml"), "{err}");
        let err = parse_spec(Path::new("vm.txt"), "").unwrap_err();
        assert!(err.to_string().contains(".toml, .json, .yaml"), "{err}");
    }
}

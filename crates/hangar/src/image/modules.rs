//! Kernel module dependency resolution.
//!
//! Debian's kernel package ships no `modules.dep` (depmod writes it at
//! install time, and Hangar never installs the kernel on the host), so Hangar
//! builds the same mapping from each module's `.modinfo` section, where
//! `depends=` lists the modules it needs, and resolves a load order from it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

/// Why modules could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read kernel modules under {dir}")]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {module} is neither built into the kernel nor present under {dir}")]
    Missing { module: String, dir: PathBuf },
    #[error("module file {path} has no readable .modinfo section")]
    BadModinfo { path: PathBuf },
}

/// Every module of one kernel, by name (`-` normalised to `_`).
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name -> (relative path, dependencies).
    modules: BTreeMap<String, (PathBuf, Vec<String>)>,
    builtin: BTreeSet<String>,
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleIndex {
    /// Reads `dir` (`/lib/modules/<release>`): `modules.builtin` and every
    /// `.ko` below `kernel/`.
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let read_err = |source| ModulesError::Read {
            dir: dir.to_path_buf(),
            source,
        };
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .map_err(read_err)?
            .lines()
            .filter_map(|line| module_name(Path::new(line)))
            .collect();
        let mut index = Self {
            dir: dir.to_path_buf(),
            modules: BTreeMap::new(),
            builtin,
        };
        let mut stack = vec![dir.join("kernel")];
        while let Some(folder) = stack.pop() {
            for entry in std::fs::read_dir(&folder).map_err(read_err)? {
                let path = entry.map_err(read_err)?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name(&path) {
                    let deps = read_depends(&path)?;
                    let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                    index.modules.insert(name, (relative, deps));
                }
            }
        }
        Ok(index)
    }

    /// The module files needed for `wanted`, dependencies first, each once.
    /// Built-in modules need no file and are skipped.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(&normalise(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), ModulesError> {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let (path, deps) = self
            .modules
            .get(name)
            .ok_or_else(|| ModulesError::Missing {
                module: name.to_owned(),
                dir: self.dir.clone(),
            })?;
        for dep in deps {
            self.visit(dep, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
}

/// `.../virtio_pci.ko` -> `virtio_pci`; None for non-module files.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".ko")?;
    Some(normalise(stem))
}

fn read_depends(path: &Path) -> Result<Vec<String>, ModulesError> {
    let bad = || ModulesError::BadModinfo {
        path: path.to_path_buf(),
    };
    let data = std::fs::read(path).map_err(|_| bad())?;
    let file = object::File::parse(&*data).map_err(|_| bad())?;
    let section = file.section_by_name(".modinfo").ok_or_else(bad)?;
    let info = section.data().map_err(|_| bad())?;
    let depends = info
        .split(|byte| *byte == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .next()
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(depends)
        .split(',')
        .filter(|dep| !dep.is_empty())
        .map(normalise)
        .collect())
}

//! `cp`: files between the host and a VM.

use std::io::IsTerminal;
use std::path::Path;

use super::open;
use crate::cli::{CpArgs, Global};
use crate::output::print_json;

/// One side of a copy: a host path or a path in a VM.
#[derive(Debug, PartialEq, Eq)]
enum Side<'a> {
    Host(&'a str),
    Vm { vm: &'a str, path: &'a str },
}

/// `VM:PATH` names a VM; a path starting with `/` or `.` is always a host
/// path, so host files with a colon in their name stay reachable
/// (`./a:b`), as with `docker cp`.
fn side(arg: &str) -> Side<'_> {
    if arg.starts_with('/') || arg.starts_with('.') {
        return Side::Host(arg);
    }
    match arg.split_once(':') {
        Some((vm, path)) if !vm.is_empty() => Side::Vm { vm, path },
        _ => Side::Host(arg),
    }
}

pub fn cp(global: &Global, args: CpArgs) -> anyhow::Result<u8> {
    let namespace = args.namespace.as_deref();
    let mut manager = open(global)?;
    let (summary, vm) = match (side(&args.source), side(&args.dest)) {
        (Side::Host(source), Side::Vm { vm, path }) => {
            let path = if path.is_empty() { "/" } else { path };
            let summary = manager.copy_into(namespace, vm, Path::new(source), path)?;
            (summary, vm)
        }
        (Side::Vm { vm, path }, Side::Host(dest)) => {
            anyhow::ensure!(
                !path.is_empty(),
                "name the path in the VM: {vm}:/path/in/guest"
            );
            let summary = manager.copy_from(namespace, vm, path, Path::new(dest))?;
            (summary, vm)
        }
        (Side::Vm { .. }, Side::Vm { .. }) => {
            anyhow::bail!("copying between two VMs is not supported: copy to the host first")
        }
        (Side::Host(_), Side::Host(_)) => anyhow::bail!(
            "one side must be in a VM, written VM:PATH (for example web:/etc/hostname)"
        ),
    };
    if global.json {
        print_json(&summary)?;
    } else if std::io::stderr().is_terminal() {
        eprintln!(
            "hangar: copied {} files, {} directories, {} symlinks ({} bytes) {} {vm}",
            summary.files,
            summary.dirs,
            summary.symlinks,
            summary.bytes,
            if matches!(side(&args.dest), Side::Vm { .. }) {
                "into"
            } else {
                "from"
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_follow_docker_cp() {
        assert_eq!(
            side("web:/etc"),
            Side::Vm {
                vm: "web",
                path: "/etc"
            }
        );
        assert_eq!(
            side("web:"),
            Side::Vm {
                vm: "web",
                path: ""
            }
        );
        assert_eq!(side("./a:b"), Side::Host("./a:b"));
        assert_eq!(side("/x:y"), Side::Host("/x:y"));
        assert_eq!(side("plain"), Side::Host("plain"));
        assert_eq!(side(":x"), Side::Host(":x"));
    }
}

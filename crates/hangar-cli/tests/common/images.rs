//! Small root file systems and bundles built by tests from the host's
//! busybox and the default image's kernel.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

use super::{hangar, ok, text};

pub fn sha256_file(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The default image's kernel (a PVH vmlinux the QEMU machine boots).
pub fn default_kernel(state: &Path) -> PathBuf {
    let info: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["info", "--json"]))).unwrap();
    PathBuf::from(info["default_image"]["kernel"].as_str().unwrap())
}

/// A busybox root file system tree that names its bundle in /etc/bundle-id.
pub fn root_tree(dir: &Path, id: &str) -> PathBuf {
    let tree = dir.join("tree");
    for sub in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "run"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "grep", "test", "cut"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(tree.join("etc/bundle-id"), format!("{id}\n")).unwrap();
    tree
}

pub fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "{program} is needed ({err}); run `make deps` (CI={:?})",
                std::env::var("CI").ok()
            )
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        text(&out.stderr)
    );
}

pub fn ext4_of(tree: &Path, out: &Path) {
    run_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            out.to_str().unwrap(),
            "24M",
        ],
    );
}

/// Adds an ext4 bundle `id` (default kernel, busybox root) built in `dir`;
/// returns its image reference.
pub fn add_ext4_bundle(state: &Path, dir: &Path, id: &str) -> String {
    std::fs::copy(default_kernel(state), dir.join("vmlinux")).unwrap();
    ext4_of(&root_tree(dir, id), &dir.join("rootfs.ext4"));
    let manifest = serde_json::json!({
        "schemaVersion": 1,
        "bundleId": id,
        "arch": "x86_64",
        "rootfsType": "ext4",
        "kernel": {"path": "vmlinux"},
        "rootfs": {"path": "rootfs.ext4", "sha256": sha256_file(&dir.join("rootfs.ext4"))},
    });
    let path = dir.join("bundle.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    ok(&hangar(
        state,
        &[
            "image",
            "add",
            "--manifest",
            path.to_str().unwrap(),
            "--max-bundles",
            "8",
        ],
    ));
    format!("bundle:{id}")
}

//! Base-image bundles (SmartVM's manifests) on real VMs: a bundle the test
//! builds (the default kernel and a busybox root file system as ext4 or
//! squashfs), added from a manifest file or over http from a server on
//! 127.0.0.1 (URLs with credentials never recorded or printed), verified,
//! booted; the LRU cache with pins; a damaged record skipped and removable.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::Path;

use common::http::{serve, Reply};
use common::images::*;
use common::*;

fn squashfs_of(tree: &Path, out: &Path) {
    run_tool(
        "mksquashfs",
        &[
            tree.to_str().unwrap(),
            out.to_str().unwrap(),
            "-quiet",
            "-noappend",
            "-all-root",
        ],
    );
}

#[test]
fn an_ext4_bundle_boots_its_own_root_and_keeps_its_writes() {
    let state = shared_state();
    let dir = scratch("bundle-ext4");
    let id = unique("ext4-bundle");
    std::fs::copy(default_kernel(state), dir.join("vmlinux")).unwrap();
    ext4_of(&root_tree(&dir, &id), &dir.join("rootfs.ext4"));
    let rootfs_sha = sha256_file(&dir.join("rootfs.ext4"));
    // Firecracker-style boot args: `pci=off` would hide every device of
    // Hangar's machine, so Hangar drops it (and keeps the rest).
    let manifest = serde_json::json!({
        "schemaVersion": 1,
        "bundleId": id,
        "arch": "x86_64",
        "firecrackerVersion": "v1.12.0",
        "rootfsType": "ext4",
        "bootArgs": "console=ttyS0 reboot=k panic=1 pci=off",
        "kernel": {"path": "vmlinux", "sizeBytes": std::fs::metadata(dir.join("vmlinux")).unwrap().len()},
        "rootfs": {"path": "rootfs.ext4", "sha256": rootfs_sha},
    });
    let manifest_path = dir.join("bundle.json");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();

    let added = ok(&hangar(
        state,
        &[
            "image",
            "add",
            "--manifest",
            manifest_path.to_str().unwrap(),
            "--max-bundles",
            "8",
        ],
    ));
    assert!(added.starts_with(&format!("bundle:{id} ")), "{added}");
    assert!(
        added.contains(&format!("rootfs sha256:{rootfs_sha}")),
        "{added}"
    );
    let listed = ok(&hangar(state, &["image", "ls"]));
    assert!(listed.contains(&format!("bundle:{id}")), "{listed}");
    let record: serde_json::Value = serde_json::from_str(&ok(&hangar(
        state,
        &["image", "inspect", &format!("bundle:{id}")],
    )))
    .unwrap();
    assert_eq!(record["rootfs"]["sha256"], rootfs_sha.as_str());
    let stored = state.join("images-v1/bundles").join(&id).join("rootfs");
    assert_eq!(sha256_file(&stored), rootfs_sha);

    let vm = unique("bundle-vm");
    let image = format!("bundle:{id}");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--image", &image],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    ok(&hangar(state, &["start", &vm]));
    let seen = sh(
        state,
        &vm,
        "cat /etc/bundle-id; grep -c pci=off /proc/cmdline; echo kept > /kept",
    );
    assert_eq!(seen, format!("{id}\n0\n"));
    // Writes go to the VM's overlay: kept across a restart, never into the
    // cached bundle.
    ok(&hangar(state, &["restart", &vm]));
    assert_eq!(
        ok(&hangar(state, &["exec", &vm, "--", "cat", "/kept"])),
        "kept\n"
    );
    assert_eq!(sha256_file(&stored), rootfs_sha);

    let refused = hangar(state, &["image", "rm", &image]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains(&format!("in use by VMs {vm}")),
        "{}",
        text(&refused.stderr)
    );
    ok(&hangar(state, &["rm", "-f", &vm]));
    ok(&hangar(state, &["image", "rm", &image]));
    assert!(!stored.exists());
}

#[test]
fn a_squashfs_bundle_from_a_url_is_verified_and_writable_only_in_ram() {
    let state = shared_state();
    let dir = scratch("bundle-squashfs");
    let id = unique("sq-bundle");
    std::fs::copy(default_kernel(state), dir.join("vmlinux")).unwrap();
    squashfs_of(&root_tree(&dir, &id), &dir.join("rootfs.sqfs"));
    // Credentials and a signed query string, which the server ignores:
    // Hangar uses them to download, never records or prints them.
    let secret = "hunter2";
    let routes = ["vmlinux", "rootfs.sqfs", "tampered.json", "good.json"]
        .map(|name| (format!("/{name}"), Reply::File(dir.join(name))));
    let base = serve(
        routes
            .iter()
            .map(|(p, r)| (p.as_str(), r.clone()))
            .collect(),
    )
    .replacen("http://", &format!("http://user:{secret}@"), 1);
    let url = |name: &str| format!("{base}/{name}?X-Amz-Signature={secret}");
    let manifest = |rootfs_sha: &str| {
        serde_json::json!({
            "schemaVersion": 1,
            "bundleId": id,
            "arch": "x86_64",
            "rootfsType": "squashfs",
            "kernel": {"url": url("vmlinux"), "sha256": sha256_file(&dir.join("vmlinux"))},
            "rootfs": {"url": url("rootfs.sqfs"), "sha256": rootfs_sha},
        })
        .to_string()
    };
    // A checksum that does not match what the server sends: refused,
    // nothing stored.
    std::fs::write(dir.join("tampered.json"), manifest(&"0".repeat(64))).unwrap();
    let refused = hangar(
        state,
        &[
            "image",
            "add",
            "--manifest",
            &url("tampered.json"),
            "--max-bundles",
            "8",
        ],
    );
    assert!(!refused.status.success());
    let said = text(&refused.stderr);
    assert!(
        said.contains(&format!("not the declared sha256:{}", "0".repeat(64))),
        "{said}"
    );
    assert!(said.contains("/rootfs.sqfs?***"), "{said}");
    assert!(!said.contains(secret), "{said}");
    assert!(!ok(&hangar(state, &["image", "ls"])).contains(&id));
    assert!(!state.join("images-v1/bundles").join(&id).exists());

    std::fs::write(
        dir.join("good.json"),
        manifest(&sha256_file(&dir.join("rootfs.sqfs"))),
    )
    .unwrap();
    let added = hangar(
        state,
        &[
            "image",
            "add",
            "--manifest",
            &url("good.json"),
            "--max-bundles",
            "8",
        ],
    );
    ok(&added);
    let image = format!("bundle:{id}");
    let inspected = ok(&hangar(state, &["image", "inspect", &image]));
    assert!(inspected.contains("http://***@127.0.0.1:"), "{inspected}");
    let stored_dir = state.join("images-v1/bundles").join(&id);
    let record = std::fs::read_to_string(stored_dir.join("bundle.json")).unwrap();
    for shown in [text(&added.stdout), text(&added.stderr), inspected, record] {
        assert!(!shown.contains(secret), "{shown}");
    }

    let vm = unique("sq-vm");
    ok(&hangar(
        state,
        &["create", "--name", &vm, "--image", &image],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    ok(&hangar(state, &["start", &vm]));
    let seen = sh(state, &vm, "cat /etc/bundle-id; echo written > /etc/new; cat /etc/new; grep ' / ' /proc/mounts | cut -d' ' -f3");
    assert_eq!(seen, format!("{id}\nwritten\noverlay\n"));
    // The writes lived in RAM: gone after a restart, the bundle unchanged.
    ok(&hangar(state, &["restart", &vm]));
    let seen = sh(
        state,
        &vm,
        "cat /etc/bundle-id; if test -e /etc/new; then echo kept; else echo gone; fi",
    );
    assert_eq!(seen, format!("{id}\ngone\n"));
    assert_eq!(
        sha256_file(&stored_dir.join("rootfs")),
        sha256_file(&dir.join("rootfs.sqfs"))
    );
    ok(&hangar(state, &["rm", "-f", &vm]));
    ok(&hangar(state, &["image", "rm", &image]));
}

#[test]
fn the_bundle_cache_evicts_the_least_recently_used_never_one_in_use() {
    // A state dir of its own: the cache's contents are the test's.
    let state = scratch("bundle-cache-state");
    let dir = scratch("bundle-cache");
    let mut kernel = b"\x7fELF".to_vec();
    kernel.resize(8192, 0);
    std::fs::write(dir.join("vmlinux"), &kernel).unwrap();
    let add = |id: &str, env: &[(&str, &str)], extra: &[&str]| {
        let tree = dir.join(id);
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("id"), id).unwrap();
        ext4_of(&tree, &dir.join(format!("{id}.ext4")));
        let manifest = serde_json::json!({
            "schemaVersion": 1, "bundleId": id, "arch": "x86_64", "rootfsType": "ext4",
            "kernel": {"path": "vmlinux"}, "rootfs": {"path": format!("{id}.ext4")},
        });
        let path = dir.join(format!("{id}.json"));
        std::fs::write(&path, manifest.to_string()).unwrap();
        let mut args = vec!["image", "add", "--manifest", path.to_str().unwrap()];
        args.extend(extra);
        hangar_env(&state, &args, env)
    };
    let bundles = || -> Vec<String> {
        let listed: serde_json::Value =
            serde_json::from_str(&ok(&hangar(&state, &["image", "ls", "--json"]))).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|entry| entry["bundle"]["bundle_id"].as_str().map(str::to_owned))
            .collect()
    };
    ok(&add("a", &[], &[]));
    ok(&add("b", &[], &[]));
    // A VM of "a": "a" is now in use and the most recently used.
    ok(&hangar(
        &state,
        &["create", "--name", "uses-a", "--image", "bundle:a"],
    ));
    let third = add("c", &[], &["--max-bundles", "1"]);
    ok(&third);
    let warned = text(&third.stderr);
    assert!(warned.contains("evicted bundle b"), "{warned}");
    assert!(warned.contains("over its limit of 1: a in use"), "{warned}");
    assert_eq!(bundles(), ["a", "c"]);
    // HANGAR_MAX_BUNDLES sets the default; "c" is the least recently used
    // bundle that is not in use.
    let again = add("b", &[("HANGAR_MAX_BUNDLES", "2")], &[]);
    assert!(
        text(&again.stderr).contains("evicted bundle c"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(bundles(), ["a", "b"]);

    let refused = hangar(&state, &["image", "rm", "bundle:a"]);
    assert!(
        text(&refused.stderr).contains("in use by VMs uses-a"),
        "{}",
        text(&refused.stderr)
    );
    ok(&hangar(&state, &["rm", "uses-a"]));
    ok(&hangar(&state, &["image", "rm", "bundle:a"]));
    assert_eq!(bundles(), ["b"]);

    // A damaged record: listing skips it, `rm` removes it all the same.
    let b = state.join("images-v1/bundles/b");
    std::fs::write(b.join("bundle.json"), "{\"bundle_id\": \"b\", trunc").unwrap();
    assert!(bundles().is_empty());
    ok(&hangar(&state, &["image", "ls"]));
    let inspected = hangar(&state, &["image", "inspect", "bundle:b"]);
    assert!(
        text(&inspected.stderr).contains("remove it with `hangar image rm bundle:b`"),
        "{}",
        text(&inspected.stderr)
    );
    ok(&hangar(&state, &["image", "rm", "bundle:b"]));
    assert!(!b.exists());

    // Bad references and manifests name what is wrong.
    let missing = hangar(&state, &["create", "--name", "x", "--image", "bundle:nope"]);
    assert!(
        text(&missing.stderr).contains(
            "bundle nope is not in the bundle cache; add it with `hangar image add --manifest"
        ),
        "{}",
        text(&missing.stderr)
    );
    let bad_id = hangar(&state, &["create", "--name", "x", "--image", "bundle:../x"]);
    assert!(
        text(&bad_id.stderr).contains("the bundle id is \"../x\""),
        "{}",
        text(&bad_id.stderr)
    );
    let newer = dir.join("newer.json");
    std::fs::write(&newer, r#"{"schemaVersion": 2}"#).unwrap();
    let refused = hangar(
        &state,
        &["image", "add", "--manifest", newer.to_str().unwrap()],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("`schemaVersion` is 2, newer"),
        "{}",
        text(&refused.stderr)
    );
}

//! OCI images on real VMs: import a layout the test builds, run its
//! Entrypoint/Cmd with its Env, WorkingDir and User, keep each VM's writes
//! to itself, refuse tampered blobs and hostile layers.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;
mod oci_layout;

use common::*;
use oci_layout::{app_docker_save, app_image, layer, write_layout, Item};

#[test]
fn an_imported_image_runs_like_docker_run() {
    let state = shared_state();
    let tag = format!("hangar-test/{}:1", unique("app"));
    let layout = app_image(&scratch("layout"), None);

    // No name in the layout and none given: refused, nothing stored.
    let unnamed = hangar(state, &["image", "import", layout.to_str().unwrap()]);
    assert_eq!(unnamed.status.code(), Some(125));
    assert!(
        text(&unnamed.stderr).contains("has no name; give one with --tag"),
        "{}",
        text(&unnamed.stderr)
    );

    let out = ok(&hangar(
        state,
        &["image", "import", layout.to_str().unwrap(), "--tag", &tag],
    ));
    assert!(out.contains("sha256:"), "{out}");
    let listed = ok(&hangar(state, &["image", "ls"]));
    assert!(listed.contains(&format!("docker.io/{tag}")), "{listed}");

    // No command: Entrypoint + Cmd with the image's Env.
    let default = hangar(state, &["run", "--image", &tag]);
    assert_eq!(
        text(&default.stdout),
        "hi from ID=hangar-test\n",
        "{}",
        text(&default.stderr)
    );
    assert_eq!(default.status.code(), Some(0));

    // A command replaces Cmd; user, working dir and both layers apply.
    let script = "id -u; pwd; cat hello.txt; test -e /etc/motd || echo motd-whited-out; exit 4";
    let custom = hangar(state, &["run", "--image", &tag, "--", script]);
    assert_eq!(
        text(&custom.stdout),
        "1000\n/app\nhello from layer 2\nmotd-whited-out\n",
        "{}",
        text(&custom.stderr)
    );
    assert_eq!(custom.status.code(), Some(4));

    // Writes stay in each VM's own overlay and survive a restart.
    let a = unique("img-a");
    let b = unique("img-b");
    let _guards = [
        VmGuard {
            state,
            name: a.clone(),
        },
        VmGuard {
            state,
            name: b.clone(),
        },
    ];
    for vm in [&a, &b] {
        ok(&hangar(state, &["create", "--name", vm, "--image", &tag]));
        ok(&hangar(state, &["start", vm]));
    }
    ok(&hangar(state, &["exec", &a, "--", "echo kept > /tmp/mine"]));
    ok(&hangar(state, &["restart", &a]));
    assert_eq!(
        ok(&hangar(state, &["exec", &a, "--", "cat /tmp/mine"])),
        "kept\n"
    );
    let other = hangar(state, &["exec", &b, "--", "test -e /tmp/mine"]);
    assert_eq!(other.status.code(), Some(1), "b does not see a's file");

    // In use: the image stays.
    let busy = hangar(state, &["image", "rm", &tag]);
    assert_eq!(busy.status.code(), Some(125));
    assert!(
        text(&busy.stderr).contains("is used by VMs"),
        "{}",
        text(&busy.stderr)
    );
    for vm in [&a, &b] {
        ok(&hangar(state, &["rm", "-f", vm]));
    }
    ok(&hangar(state, &["image", "rm", &tag]));
    let listed = ok(&hangar(state, &["image", "ls"]));
    assert!(!listed.contains(&tag), "{listed}");
    // Its blobs are no longer used by any image: gc frees them (this
    // layout's base layer is unique to it), and the layout imports again.
    let gc: serde_json::Value =
        serde_json::from_str(&ok(&hangar(state, &["--json", "image", "gc"]))).unwrap();
    assert!(gc["blobs_removed"].as_u64().unwrap() >= 1, "{gc}");
    ok(&hangar(
        state,
        &["image", "import", layout.to_str().unwrap(), "--tag", &tag],
    ));
    ok(&hangar(state, &["image", "rm", &tag]));
}

#[test]
fn tampered_blobs_and_hostile_layers_are_refused() {
    let state = shared_state();

    // One byte of a layer changed after the manifest was written.
    let tampered = app_image(&scratch("tampered"), None);
    let blobs = tampered.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&biggest, &bytes).unwrap();
    let tag = format!("hangar-test/{}:1", unique("tampered"));
    let out = hangar(
        state,
        &["image", "import", tampered.to_str().unwrap(), "--tag", &tag],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("does not match its digest"),
        "{}",
        text(&out.stderr)
    );
    assert!(!ok(&hangar(state, &["image", "ls"])).contains(&tag));

    // Layers that try to leave the root file system.
    let escapes: [(&str, Vec<Item<'_>>, &str); 3] = [
        ("parent", vec![Item::RawFile(b"../../evil", b"x")], ".."),
        (
            "symlink",
            vec![Item::Link("etc", "/"), Item::File("etc/evil", 0o644, b"x")],
            "symlink",
        ),
        ("absolute", vec![Item::RawFile(b"/etc/evil", b"x")], "evil"),
    ];
    for (what, items, expect) in escapes {
        let layout = write_layout(
            &scratch(what),
            &[(layer(&items), false)],
            serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}}),
            None,
        );
        let tag = format!("hangar-test/{}:1", unique(what));
        let out = hangar(
            state,
            &["image", "import", layout.to_str().unwrap(), "--tag", &tag],
        );
        assert_eq!(out.status.code(), Some(125), "{what}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("layer sha256:"), "{what}: {stderr}");
        assert!(stderr.contains(expect), "{what}: {stderr}");
        assert!(
            !ok(&hangar(state, &["image", "ls"])).contains(&tag),
            "{what}"
        );
    }

    let unknown = hangar(
        state,
        &["run", "--image", "hangar-test/none:1", "--", "true"],
    );
    assert!(
        text(&unknown.stderr).contains("is not in the image store"),
        "{}",
        text(&unknown.stderr)
    );
}

#[test]
fn a_docker_save_archive_imports_and_runs() {
    let state = shared_state();
    let tag = format!("hangar-test/{}:1", unique("saved"));
    let archive = app_docker_save(&scratch("saved"), &tag);
    let out = ok(&hangar(
        state,
        &["image", "import", archive.to_str().unwrap()],
    ));
    assert!(out.contains(&tag), "the archive's RepoTags name it: {out}");
    let run = hangar(
        state,
        &["run", "--image", &tag, "--", "id -un; cat /app/hello.txt"],
    );
    assert_eq!(
        text(&run.stdout),
        "app\nhello from layer 2\n",
        "{}",
        text(&run.stderr)
    );
    ok(&hangar(state, &["image", "rm", &tag]));
}

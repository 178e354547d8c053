//! A real cloud-init guest: a Debian bookworm disk image built with
//! debootstrap (scripts/build-test-guest.sh, cached between runs), added as
//! a disk image, booted with BIOS firmware from a per-VM overlay and a
//! NoCloud seed, reached over SSH only (no agent in the image).

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

/// Where the built guest image is kept between runs.
fn guest_cache() -> PathBuf {
    std::env::var_os("HANGAR_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-guest"))
}

/// Builds the guest image once (the script skips a current image).
fn guest_image() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = guest_cache();
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-guest.sh");
            let started = Instant::now();
            let out = Command::new("bash")
                .arg(&script)
                .arg(&dir)
                .output()
                .expect("run scripts/build-test-guest.sh");
            assert!(
                out.status.success(),
                "building the test guest failed ({}):\n{}\n{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            );
            eprintln!(
                "test guest ready in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            dir.join("debian-bookworm-cloud.qcow2")
        })
        .clone()
}

#[test]
fn a_cloud_init_guest_boots_from_its_disk_and_answers_over_ssh() {
    let state = shared_state();
    let image = guest_image();
    let added = ok(&hangar(
        state,
        &[
            "image",
            "add",
            image.to_str().unwrap(),
            "--name",
            "debian-test",
        ],
    ));
    assert!(
        added.starts_with("disk:debian-test qcow2 sha256:"),
        "{added}"
    );

    let vm = unique("cloudy");
    ok(&hangar(
        state,
        &[
            "create",
            "--name",
            &vm,
            "--image",
            "disk:debian-test",
            "--hostname",
            "cloudy-host",
            "--disk",
            "3G",
            "--memory",
            "512M",
        ],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    let record = inspect(state, &vm);
    let work_dir = PathBuf::from(record["work_dir"].as_str().unwrap());
    assert!(work_dir.join("seed.iso").is_file());
    assert!(work_dir.join("ssh_key").is_file());

    let started = Instant::now();
    ok(&hangar(state, &["start", &vm]));
    eprintln!(
        "boot to SSH under the test's accelerator: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let record = inspect(state, &vm);
    assert!(
        record["ssh_host_key"].as_str().unwrap().starts_with("ssh-"),
        "{record}"
    );
    assert!(
        !work_dir.join("seed.iso").exists(),
        "the seed outlived the first boot"
    );

    // cloud-init set the hostname; exec runs as the seeded user with sudo.
    let seen = ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            "hostname; id -un; sudo -n true && echo sudo-ok",
        ],
    ));
    assert_eq!(seen, "cloudy-host\nhangar\nsudo-ok\n");
    // Arguments reach the guest unsplit and unexpanded.
    let echoed = ok(&hangar(
        state,
        &["exec", &vm, "--", "printf", "%s|", "a b", "$HOME", "it's"],
    ));
    assert_eq!(echoed, "a b|$HOME|it's|");
    let failed = hangar(
        state,
        &["exec", &vm, "--", "sh", "-c", "echo oops >&2; exit 3"],
    );
    assert_eq!(failed.status.code(), Some(3));
    assert_eq!(text(&failed.stderr), "oops\n");
    // --disk grew the root disk's overlay.
    let size = ok(&hangar(
        state,
        &["exec", &vm, "--", "cat", "/sys/block/vda/size"],
    ));
    assert_eq!(size.trim().parse::<u64>().unwrap() * 512, 3 << 30);

    // cp both ways over SSH.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("ssh-cp"));
    std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
    std::fs::write(dir.join("tree/sub/file.txt"), "over ssh\n").unwrap();
    ok(&hangar(
        state,
        &[
            "cp",
            dir.join("tree").to_str().unwrap(),
            &format!("{vm}:/tmp/copied"),
        ],
    ));
    let inside = ok(&hangar(
        state,
        &["exec", &vm, "--", "cat", "/tmp/copied/sub/file.txt"],
    ));
    assert_eq!(inside, "over ssh\n");
    ok(&hangar(
        state,
        &[
            "cp",
            &format!("{vm}:/etc/hostname"),
            dir.join("hostname").to_str().unwrap(),
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(dir.join("hostname")).unwrap(),
        "cloudy-host\n"
    );

    // A second boot: no seed attached, and the host key recorded on the
    // first contact still matches (cloud-init did not run again and
    // regenerate it).
    ok(&hangar(state, &["restart", &vm]));
    let disks = ok(&hangar(
        state,
        &["exec", &vm, "--", "sh", "-c", "ls /sys/block | grep ^vd"],
    ));
    assert_eq!(disks, "vda\n", "the seed is attached after the first boot");
    assert_eq!(inspect(state, &vm)["ssh_host_key"], record["ssh_host_key"]);
    let refused = hangar(state, &["image", "rm", "disk:debian-test"]);
    assert!(
        text(&refused.stderr).contains(&vm),
        "{}",
        text(&refused.stderr)
    );
}

//! A real cloud-init guest: a Debian bookworm disk image built with
//! debootstrap (scripts/build-test-guest.sh, cached between runs), added as
//! a disk image, booted with BIOS firmware from a per-VM overlay and a
//! NoCloud seed, reached over SSH only (no agent in the image). One VM
//! takes its address from slirp's DHCP, another a static one from the
//! seed's network-config. A third boots the same tree's GPT image through
//! UEFI (OVMF, systemd-boot) and keeps its variable store across a restart.

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

/// Builds the guest images once (the script skips current images) and
/// returns the folder holding them.
fn guest_images() -> PathBuf {
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
            dir
        })
        .clone()
}

/// Longest a `start` or `restart` may take: longer than Hangar's own limit
/// for a first boot under TCG to reach SSH (300 s), so that limit's error is
/// what a slow boot shows. A first boot under TCG on an idle 2-core machine
/// takes 65-85 s with 2 vCPUs (100-110 s with 1), longer on a busy one.
const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(330);

/// `hangar ARGS` (a start or restart) under [`BOOT_TIMEOUT`].
fn boot(state: &Path, args: &[&str]) -> std::process::Output {
    wait_all(vec![spawn_hangar(state, args)], BOOT_TIMEOUT).remove(0)
}

/// The BIOS guest image added to `state` once as `disk:debian-test`,
/// shared by the tests of this file.
fn add_guest_image(state: &Path) {
    static ADDED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ADDED.get_or_init(|| add_image(state, "debian-bookworm-cloud.qcow2", "debian-test"));
}

/// The UEFI guest image added to `state` once as `disk:debian-uefi-test`.
fn add_uefi_guest_image(state: &Path) {
    static ADDED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ADDED.get_or_init(|| {
        add_image(
            state,
            "debian-bookworm-cloud-uefi.qcow2",
            "debian-uefi-test",
        )
    });
}

/// `hangar image add` of the built image `file` as `disk:NAME`.
fn add_image(state: &Path, file: &str, name: &str) {
    let image = guest_images().join(file);
    let add = ["image", "add", image.to_str().unwrap(), "--name", name];
    let mut out = hangar(state, &add);
    // The state dir outlives the guest: one built by an older script is
    // replaced.
    if !out.status.success() && text(&out.stderr).contains("already stored with other content") {
        ok(&hangar(state, &["image", "rm", &format!("disk:{name}")]));
        out = hangar(state, &add);
    }
    let added = ok(&out);
    assert!(
        added.starts_with(&format!("disk:{name} qcow2 sha256:")),
        "{added}"
    );
}

/// Held by each test for its whole run: two cloud-init boots at once under
/// TCG on a 2-core machine take about as long as two in a row, and each
/// comes close to its time limit.
fn one_guest_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed holding it poisons it; the next one may still run.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `-netdev` argument of the QEMU whose command line names `work_dir`,
/// once `start` has launched it.
fn qemu_netdev(work_dir: &str, start: &mut std::process::Child) -> String {
    let started = Instant::now();
    loop {
        for pid in std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args.iter().any(|a| a.contains(work_dir)) {
                continue;
            }
            if let Some(i) = args.iter().position(|a| a == "-netdev") {
                return args.get(i + 1).cloned().unwrap_or_default();
            }
        }
        if let Some(status) = start.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = start.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            panic!("hangar start ended ({status}) before its QEMU was seen: {stderr}");
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = start.kill();
            let _ = start.wait();
            panic!("no QEMU for {work_dir} after {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What the guest's network looks like from inside, over `hangar exec`
/// (so over SSH through the 127.0.0.1 port forward).
struct GuestNet {
    /// The address sshd saw the connection arrive on (`SSH_CONNECTION`):
    /// where slirp forwarded the host port to.
    ssh_server_addr: String,
    /// `ip -4 -o addr show dev eth0`.
    addrs: String,
    /// `ip -4 route show default`.
    default_route: String,
    /// `ip -4 route get 192.0.2.1`: the route an off-link address takes.
    off_link: String,
    /// `resolvectl dns eth0`.
    dns: String,
    /// The upstream servers systemd-resolved writes out.
    upstream_resolv_conf: String,
    /// Where /etc/resolv.conf points.
    resolv_conf_link: String,
}

fn guest_net(state: &Path, vm: &str) -> GuestNet {
    let script = "set -e; \
        echo \"$SSH_CONNECTION\"; echo @@; \
        ip -4 -o addr show dev eth0; echo @@; \
        ip -4 route show default; echo @@; \
        ip -4 route get 192.0.2.1; echo @@; \
        resolvectl dns eth0; echo @@; \
        cat /run/systemd/resolve/resolv.conf; echo @@; \
        readlink /etc/resolv.conf";
    let out = sh(state, vm, script);
    let parts: Vec<String> = out.split("@@\n").map(str::to_owned).collect();
    assert_eq!(parts.len(), 7, "{out}");
    let ssh_server_addr = parts[0]
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("SSH_CONNECTION is {:?}", parts[0]))
        .to_owned();
    let mut parts = parts.into_iter().skip(1);
    let mut next = || parts.next().unwrap();
    GuestNet {
        ssh_server_addr,
        addrs: next(),
        default_route: next(),
        off_link: next(),
        dns: next(),
        upstream_resolv_conf: next(),
        resolv_conf_link: next().trim().to_owned(),
    }
}

#[test]
fn a_cloud_init_guest_boots_from_its_disk_and_answers_over_ssh() {
    let _one = one_guest_at_a_time();
    let state = shared_state();
    add_guest_image(state);

    let vm = unique("cloudy");
    // A host file attached read-only beside a new data disk.
    let attached = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("attached.raw"));
    let mut marker = b"hangar-attached".to_vec();
    marker.resize(32 << 20, 0);
    std::fs::write(&attached, &marker).unwrap();
    let attach = format!("{}:ro", attached.display());
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
            "--data-disk",
            "64M",
            "--attach-disk",
            &attach,
            "--memory",
            "512M",
            "--cpus",
            "2",
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
    ok(&boot(state, &["start", &vm]));
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
    let seen = sh(state, &vm, "hostname; id -un; sudo -n true && echo sudo-ok");
    assert_eq!(seen, "cloudy-host\nhangar\nsudo-ok\n");
    // No network-config in the seed: cloud-init's fallback, DHCP on eth0
    // (systemd-networkd), gets slirp's lease, route and DNS server.
    let net = guest_net(state, &vm);
    assert_eq!(net.ssh_server_addr, "10.0.2.15");
    assert!(
        net.addrs.contains(" eth0 ") && net.addrs.contains("inet 10.0.2.15/24 "),
        "{}",
        net.addrs
    );
    assert!(
        net.default_route
            .starts_with("default via 10.0.2.2 dev eth0"),
        "{}",
        net.default_route
    );
    assert!(net.dns.contains("10.0.2.3"), "{}", net.dns);
    assert_eq!(
        net.resolv_conf_link,
        "../run/systemd/resolve/stub-resolv.conf"
    );
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
    // The data disk and the attached file follow the root disk (the seed
    // comes last, so they keep their names once it is gone); the file is
    // read-only in the guest, the data disk takes writes.
    let disks = sh(state, &vm, "for d in vdb vdc; do echo $d $(cat /sys/block/$d/size) $(cat /sys/block/$d/ro); done; \
             sudo -n head -c 15 /dev/vdc; echo; \
             printf data-kept | sudo -n dd of=/dev/vdb conv=notrunc status=none && sync && echo written");
    assert_eq!(
        disks,
        format!(
            "vdb {} 0\nvdc {} 1\nhangar-attached\nwritten\n",
            (64u64 << 20) / 512,
            (32u64 << 20) / 512
        )
    );

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
    ok(&boot(state, &["restart", &vm]));
    let disks = sh(
        state,
        &vm,
        "ls /sys/block | grep ^vd; sudo -n head -c 9 /dev/vdb; echo; cat /sys/block/vdc/ro",
    );
    assert_eq!(
        disks, "vda\nvdb\nvdc\ndata-kept\n1\n",
        "after the first boot: no seed, the data disks under the same names, the data kept"
    );
    let _ = std::fs::remove_file(&attached);
    assert_eq!(inspect(state, &vm)["ssh_host_key"], record["ssh_host_key"]);
    let refused = hangar(state, &["image", "rm", "disk:debian-test"]);
    assert!(
        text(&refused.stderr).contains(&vm),
        "{}",
        text(&refused.stderr)
    );
}

/// `--ip/--gateway/--dns` go into the seed's network-config; cloud-init
/// renders them for systemd-networkd and resolved. The SSH forward reaches
/// the static address (slirp forwards to the address the VM was given, not
/// its DHCP address).
#[test]
fn a_static_address_from_the_seed_has_its_route_and_dns_and_ssh_reaches_it() {
    let _one = one_guest_at_a_time();
    let state = shared_state();
    add_guest_image(state);

    let vm = unique("static");
    ok(&hangar(
        state,
        &[
            "create",
            "--name",
            &vm,
            "--image",
            "disk:debian-test",
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--ip",
            "10.0.2.50/24",
            "--gateway",
            "10.0.2.2",
            "--dns",
            "10.0.2.3",
        ],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    let work_dir = inspect(state, &vm)["work_dir"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let mut start = spawn_hangar(state, &["start", &vm]);
    // slirp forwards a host port to the guest address named in `hostfwd`,
    // or to the address its DHCP server hands out (10.0.2.15) when none is:
    // then SSH never answers and `start` only ends at its readiness limit.
    let netdev = qemu_netdev(&work_dir, &mut start);
    if !netdev.contains("-10.0.2.50:22") {
        let _ = start.kill();
        let _ = start.wait();
        panic!(
            "the SSH forward does not go to the static address 10.0.2.50 \
             (without one slirp forwards to 10.0.2.15): -netdev {netdev}"
        );
    }
    let out = wait_all(vec![start], BOOT_TIMEOUT).remove(0);
    ok(&out);
    eprintln!(
        "static address: boot to SSH in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let net = guest_net(state, &vm);
    assert_eq!(
        net.ssh_server_addr, "10.0.2.50",
        "the SSH forward did not reach the static address"
    );
    // The static address only: no DHCP lease besides it.
    assert!(
        net.addrs.contains(" eth0 ") && net.addrs.contains("inet 10.0.2.50/24 "),
        "{}",
        net.addrs
    );
    assert!(!net.addrs.contains("10.0.2.15"), "{}", net.addrs);
    assert!(
        net.default_route
            .starts_with("default via 10.0.2.2 dev eth0"),
        "{}",
        net.default_route
    );
    assert!(
        net.off_link.contains("via 10.0.2.2 dev eth0 src 10.0.2.50"),
        "{}",
        net.off_link
    );
    assert!(net.dns.contains("10.0.2.3"), "resolvectl dns: {}", net.dns);
    assert!(
        net.upstream_resolv_conf
            .lines()
            .any(|l| l.trim() == "nameserver 10.0.2.3"),
        "{}",
        net.upstream_resolv_conf
    );
    assert_eq!(
        net.resolv_conf_link,
        "../run/systemd/resolve/stub-resolv.conf"
    );
    // The seeded user and sudo work as with DHCP.
    let seen = sh(state, &vm, "id -un; sudo -n true && echo sudo-ok");
    assert_eq!(seen, "hangar\nsudo-ok\n");
}

/// OVMF's code, shared read-only by every UEFI VM (Debian's `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// A non-volatile UEFI variable the guest writes through efivarfs
/// (`Name-GUID`; the file holds 4 bytes of attributes, then the data).
const EFI_VAR: &str = "HangarTest-2d9f6c1e-8b47-4a0f-b3c5-71e0a6d4f982";

/// `--uefi`: OVMF from a per-VM variable store boots the GPT image's ESP
/// (systemd-boot at the removable-media path, no boot entry needed). A
/// variable the guest writes is in that store after a stop, and the guest
/// reads it back after the next start: the store is the VM's own and
/// outlives its QEMU.
#[test]
fn a_uefi_guest_boots_through_ovmf_and_keeps_its_variable_store() {
    let _one = one_guest_at_a_time();
    let state = shared_state();
    // The build script installs OVMF when it is missing.
    add_uefi_guest_image(state);
    assert!(
        Path::new(OVMF_CODE).is_file(),
        "the UEFI test needs {OVMF_CODE}: apt-get install ovmf (CI={:?})",
        std::env::var("CI").ok()
    );

    let vm = unique("uefi");
    ok(&hangar(
        state,
        &[
            "create",
            "--name",
            &vm,
            "--image",
            "disk:debian-uefi-test",
            "--uefi",
            "--hostname",
            "uefi-host",
            "--memory",
            "512M",
            "--cpus",
            "2",
        ],
    ));
    let _guard = VmGuard {
        state,
        name: vm.clone(),
    };
    let work_dir = PathBuf::from(inspect(state, &vm)["work_dir"].as_str().unwrap());
    let vars = work_dir.join("OVMF_VARS.fd");

    let started = Instant::now();
    ok(&boot(state, &["start", &vm]));
    eprintln!(
        "UEFI: boot to SSH in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let vars_inode = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&vars)
            .unwrap_or_else(|e| panic!("{}: {e} (no variable store)", vars.display())),
    );

    // Booted through UEFI from the GPT disk's second partition; cloud-init
    // ran (hostname) and exec works as the seeded user with sudo.
    let seen = sh(
        state,
        &vm,
        "test -d /sys/firmware/efi && echo uefi; findmnt -no SOURCE /; \
             hostname; id -un; sudo -n true && echo sudo-ok",
    );
    assert_eq!(seen, "uefi\n/dev/vda2\nuefi-host\nhangar\nsudo-ok\n");
    // Attributes 7: non-volatile, boot and runtime access. efivarfs files
    // cannot seek, hence `cat | tail`.
    let write = format!(
        "sudo -n sh -c 'printf \"\\007\\000\\000\\000hangar-nvram\" \
         > /sys/firmware/efi/efivars/{EFI_VAR}' && cat /sys/firmware/efi/efivars/{EFI_VAR} | tail -c +5"
    );
    assert_eq!(
        ok(&hangar(state, &["exec", &vm, "--", "sh", "-c", &write])),
        "hangar-nvram"
    );

    ok(&hangar(state, &["stop", &vm]));
    let store = std::fs::read(&vars).unwrap();
    let name: Vec<u8> = "HangarTest"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let has = |needle: &[u8]| store.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&name) && has(b"hangar-nvram"),
        "the variable the guest wrote is not in {} ({} bytes)",
        vars.display(),
        store.len()
    );

    let started = Instant::now();
    ok(&boot(state, &["start", &vm]));
    eprintln!(
        "UEFI: second boot to SSH in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let seen = ok(&hangar(
        state,
        &[
            "exec",
            &vm,
            "--",
            "sh",
            "-c",
            &format!(
                "test -d /sys/firmware/efi && echo uefi; hostname; \
                 ls /sys/block | grep ^vd; cat /sys/firmware/efi/efivars/{EFI_VAR} | tail -c +5"
            ),
        ],
    ));
    assert_eq!(seen, "uefi\nuefi-host\nvda\nhangar-nvram");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&vars).unwrap()),
        vars_inode,
        "the variable store was replaced on the second start"
    );
}

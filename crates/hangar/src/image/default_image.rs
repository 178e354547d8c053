//! The embedded default image: the Debian cloud kernel plus an initramfs that
//! Hangar writes itself, with `hangar-agent` as PID 1, busybox for a shell,
//! and the virtio modules the agent loads.
//!
//! Inputs, all from Debian packages on the host:
//! - the kernel package `linux-image-*-cloud-amd64` as a `.deb`, from
//!   `HANGAR_KERNEL_DEB`, else the first of `<state>/packages-v1/`,
//!   `/var/cache/hangar/packages/` (where `scripts/install-deps.sh` puts it)
//!   and apt's cache; when none has it, Hangar runs `apt-get download` into
//!   `<state>/packages-v1/`. It is unpacked into Hangar's image store, never
//!   installed into the host's /boot.
//! - `/bin/busybox` from `busybox-static` (must be static: the guest has no libc).
//! - the agent, embedded in this library at build time.
//!
//! The built image is cached under a key of those inputs; it is rebuilt only
//! when one of them changes.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cpio::CpioWriter;
use super::kernel::{extract_vmlinux, KernelError};
use super::modules::{ModuleIndex, ModulesError};
use crate::fsutil::{create_private, write_private};

/// Modules the agent loads at boot, in this order (dependencies resolved).
/// virtio_console carries the agent channel; virtio_rng seeds the guest's
/// entropy pool so nothing in the guest blocks on getrandom under TCG.
const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "virtio_rng",
    "virtio_blk",
    "virtio_net",
];

/// Modules for the agent's vsock listener, loaded only when the VM has a
/// vsock device (`hangar.vsock=1`), so other boots do not pay for them.
const VSOCK_MODULES: &[&str] = &["vmw_vsock_virtio_transport"];

/// Modules for an image's root file system (`hangar.root=`): ext4 (OCI
/// images, bundles), squashfs and the overlay that makes a read-only
/// bundle root writable in RAM.
const ROOTFS_MODULES: &[&str] = &["ext4", "squashfs", "overlay"];

/// Modules carried but never loaded by the agent, for commands that want
/// them (`insmod $(cat /hangar/modules-optional)`): isofs reads a
/// cloud-init seed.
const OPTIONAL_MODULES: &[&str] = &["isofs"];

/// Kernel arguments every boot of the default image takes (VMs, the
/// accelerator probe, the raw-QEMU baseline). `quiet` because printing to
/// an emulated UART is slow under TCG (errors still print); crypto
/// self-tests are skipped for the same reason. `no_timer_check`: with
/// vCPUs starved by a loaded host (8 TCG guests on 2 cores in the crash
/// test), the kernel's IO-APIC timer check saw no ticks and panicked
/// ("IO-APIC + timer doesn't work!"); the emulated timer is known good.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests no_timer_check";

/// Folders searched for the kernel package after the state dir's own.
const PACKAGE_DIRS: &[&str] = &["/var/cache/hangar/packages", "/var/cache/apt/archives"];
/// The Debian metapackage that names the current cloud kernel package.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "/bin/busybox";
/// Bump when the initramfs layout changes, so old cached images are not used.
const IMAGE_FORMAT: u32 = 5;

/// Why the default image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DefaultImageError {
    #[error("no Debian cloud kernel package found (looked in {looked}; `apt-get download` failed: {download}); run `make deps`, or set HANGAR_KERNEL_DEB to a linux-image-*-cloud-amd64 .deb")]
    KernelPackageMissing { looked: String, download: String },
    #[error("HANGAR_KERNEL_DEB={path} is not a file; point it at a linux-image-*-cloud-amd64 .deb or unset it")]
    KernelDebNotFile { path: PathBuf },
    #[error("{path} is missing; install Debian's busybox-static package (the guest needs a static busybox)")]
    BusyboxMissing { path: PathBuf },
    #[error(
        "{path} is dynamically linked; install Debian's busybox-static package instead of busybox"
    )]
    BusyboxNotStatic { path: PathBuf },
    #[error("cannot unpack kernel package {deb} with dpkg-deb: {detail}")]
    Unpack { deb: PathBuf, detail: String },
    #[error("kernel package {deb} contains no boot/vmlinuz-*")]
    NoKernelInPackage { deb: PathBuf },
    #[error("cannot unpack the kernel from {deb}")]
    Kernel {
        deb: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DefaultImageError + '_ {
    move |source| DefaultImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A built default image, ready to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultImage {
    /// Uncompressed PVH kernel.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_release: String,
    /// The image's cache key (hex), also its folder name.
    pub key: String,
}

/// Returns the default image under `images_dir`, building it when missing.
/// `packages_dir` is the state dir's own package cache.
pub fn ensure_default_image(
    images_dir: &Path,
    packages_dir: &Path,
) -> Result<DefaultImage, DefaultImageError> {
    let deb = find_kernel_deb(packages_dir)?;
    check_busybox(Path::new(BUSYBOX))?;
    let key = image_key(&deb, Path::new(BUSYBOX))?;
    let final_dir = images_dir.join("default").join(&key);
    let manifest = final_dir.join("image.json");
    if let Ok(text) = std::fs::read_to_string(&manifest) {
        if let Ok(image) = serde_json::from_str::<DefaultImage>(&text) {
            return Ok(image);
        }
    }
    let tmp_root = images_dir.join("tmp");
    private_dir(&tmp_root)?;
    let tmp = tempfile::Builder::new()
        .prefix("default-")
        .tempdir_in(&tmp_root)
        .map_err(io_err(&tmp_root))?;
    let kernel_release = build_into(tmp.path(), &deb)?;
    let image = DefaultImage {
        kernel: final_dir.join("vmlinux"),
        initramfs: final_dir.join("initramfs.cpio"),
        kernel_release,
        key,
    };
    let json = serde_json::to_vec_pretty(&image).unwrap_or_default();
    let tmp_manifest = tmp.path().join("image.json");
    write_private(&tmp_manifest, &json).map_err(io_err(&tmp_manifest))?;
    fs_err::remove_dir_all(tmp.path().join("pkg")).map_err(io_err(tmp.path()))?;
    private_dir(&images_dir.join("default"))?;
    // Another process may have finished the same image first: theirs wins,
    // ours is dropped with the temp dir.
    let built = tmp.keep();
    std::fs::set_permissions(&built, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(&built))?;
    if std::fs::rename(&built, &final_dir).is_err() {
        let _ = std::fs::remove_dir_all(&built);
        if !manifest.exists() {
            return Err(DefaultImageError::Io {
                path: final_dir,
                source: std::io::Error::other("could not move the built image into place"),
            });
        }
    }
    Ok(image)
}

fn find_kernel_deb(packages_dir: &Path) -> Result<PathBuf, DefaultImageError> {
    if let Some(path) = std::env::var_os("HANGAR_KERNEL_DEB").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(DefaultImageError::KernelDebNotFile { path });
    }
    let mut dirs = vec![packages_dir.to_path_buf()];
    dirs.extend(PACKAGE_DIRS.iter().map(PathBuf::from));
    for dir in &dirs {
        if let Some(deb) = newest_kernel_deb(dir) {
            return Ok(deb);
        }
    }
    let looked = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match download_kernel_deb(packages_dir) {
        Ok(deb) => Ok(deb),
        Err(download) => Err(DefaultImageError::KernelPackageMissing { looked, download }),
    }
}

/// The most recently modified `linux-image-*-cloud-amd64_*.deb` in `dir`.
fn newest_kernel_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("linux-image-")
                && name.contains("-cloud-amd64_")
                && name.ends_with(".deb")
        })
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
}

/// Asks apt which package the cloud-kernel metapackage depends on and
/// downloads that `.deb` (not installs it) into `dir`. Fixed arguments only.
fn download_kernel_deb(dir: &Path) -> Result<PathBuf, String> {
    let depends = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .output()
        .map_err(|err| format!("cannot run apt-cache: {err}"))?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let package = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-cloud-amd64"))
        .ok_or_else(|| format!("apt-cache knows no {KERNEL_METAPACKAGE} (run apt-get update?)"))?
        .to_owned();
    // Only package names apt itself printed reach apt-get, and they are
    // checked to be plain names.
    if !package
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.+".contains(c))
    {
        return Err(format!(
            "unexpected package name {package:?} from apt-cache"
        ));
    }
    crate::layout::create_private_dir(dir).map_err(|err| err.to_string())?;
    let output = Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(dir)
        .output()
        .map_err(|err| format!("cannot run apt-get: {err}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
    }
    let deb = newest_kernel_deb(dir)
        .ok_or_else(|| format!("apt-get download {package} wrote no .deb"))?;
    std::fs::set_permissions(&deb, std::fs::Permissions::from_mode(0o600))
        .map_err(|err| format!("{}: {err}", deb.display()))?;
    Ok(deb)
}

fn private_dir(dir: &Path) -> Result<(), DefaultImageError> {
    crate::layout::create_private_dir(dir).map_err(|err| DefaultImageError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(err.to_string()),
    })
}

/// A static ELF has no PT_INTERP program header.
fn check_busybox(path: &Path) -> Result<(), DefaultImageError> {
    let data = std::fs::read(path).map_err(|_| DefaultImageError::BusyboxMissing {
        path: path.to_path_buf(),
    })?;
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).map_err(|_| {
        DefaultImageError::BusyboxNotStatic {
            path: path.to_path_buf(),
        }
    })?;
    use object::read::elf::ProgramHeader;
    let endian = elf.endian();
    let dynamic = elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP);
    if dynamic {
        return Err(DefaultImageError::BusyboxNotStatic {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Identity of the inputs: file names, sizes and mtimes of the packages
/// (cheap, no hashing of 30 MB on every run) plus the agent's digest.
fn image_key(deb: &Path, busybox: &Path) -> Result<String, DefaultImageError> {
    let mut hasher = Sha256::new();
    hasher.update(IMAGE_FORMAT.to_le_bytes());
    for path in [deb, busybox] {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        hasher.update(path.as_os_str().as_encoded_bytes());
        hasher.update(meta.len().to_le_bytes());
        hasher.update(mtime.to_le_bytes());
    }
    hasher.update(Sha256::digest(super::agent::AGENT_BINARY));
    Ok(hex::encode(&hasher.finalize()[..8]))
}

/// Unpacks the kernel package into `dir/pkg` and writes `dir/vmlinux` and
/// `dir/initramfs.cpio`. Returns the kernel release.
fn build_into(dir: &Path, deb: &Path) -> Result<String, DefaultImageError> {
    let pkg = dir.join("pkg");
    let output = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&pkg)
        .output()
        .map_err(|err| DefaultImageError::Unpack {
            deb: deb.to_path_buf(),
            detail: err.to_string(),
        })?;
    if !output.status.success() {
        return Err(DefaultImageError::Unpack {
            deb: deb.to_path_buf(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let boot = pkg.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| DefaultImageError::NoKernelInPackage {
            deb: deb.to_path_buf(),
        })?;
    let release = vmlinuz
        .file_name()
        .map(|name| {
            name.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let compressed = fs_err::read(&vmlinuz).map_err(io_err(&vmlinuz))?;
    let vmlinux = extract_vmlinux(&compressed).map_err(|source| DefaultImageError::Kernel {
        deb: deb.to_path_buf(),
        source,
    })?;
    let kernel_path = dir.join("vmlinux");
    write_private(&kernel_path, &vmlinux).map_err(io_err(&kernel_path))?;
    let modules_dir = pkg.join("lib/modules").join(&release);
    let index = ModuleIndex::load(&modules_dir)?;
    let boot = index.load_order(GUEST_MODULES)?;
    let only_extra = |wanted: &[&str]| -> Result<Vec<PathBuf>, ModulesError> {
        Ok(index
            .load_order(wanted)?
            .into_iter()
            .filter(|module| !boot.contains(module))
            .collect())
    };
    let vsock = only_extra(VSOCK_MODULES)?;
    let rootfs = only_extra(ROOTFS_MODULES)?;
    let optional = only_extra(OPTIONAL_MODULES)?;
    write_initramfs(
        &dir.join("initramfs.cpio"),
        &modules_dir,
        &release,
        &[
            ("hangar/modules", &boot),
            ("hangar/modules-vsock", &vsock),
            ("hangar/modules-rootfs", &rootfs),
            ("hangar/modules-optional", &optional),
        ],
    )?;
    Ok(release)
}

fn write_initramfs(
    dest: &Path,
    modules_dir: &Path,
    release: &str,
    module_lists: &[(&str, &[PathBuf])],
) -> Result<(), DefaultImageError> {
    let file = create_private(dest).map_err(io_err(dest))?;
    let mut cpio = CpioWriter::new(std::io::BufWriter::new(file));
    let io = io_err(dest);
    (|| -> std::io::Result<()> {
        for dir in [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "dev",
            "proc",
            "sys",
            "run",
            "root",
            "etc",
            "hangar",
            "lib",
            "lib/modules",
        ] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.dir("tmp", 0o1777)?;
        // The kernel opens /dev/console for PID 1's stdio before devtmpfs is
        // mounted, so the node must exist in the archive.
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("init", 0o755, super::agent::AGENT_BINARY)?;
        cpio.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        cpio.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
        cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
        let busybox = std::fs::read(BUSYBOX)?;
        cpio.file("bin/busybox", 0o755, &busybox)?;
        for applet in busybox_applets()? {
            if applet != "bin/busybox" && !applet.contains("..") {
                let depth = applet.matches('/').count();
                let target = format!("{}bin/busybox", "../".repeat(depth));
                cpio.symlink(&applet, &target)?;
            }
        }
        let guest_dir = format!("lib/modules/{release}");
        // A module may sit in two lists (shared dependencies): one copy.
        let mut modules: Vec<&PathBuf> = module_lists
            .iter()
            .flat_map(|(_, modules)| modules.iter())
            .collect();
        modules.sort();
        modules.dedup();
        let mut made = std::collections::BTreeSet::new();
        for module in &modules {
            let guest_path = format!("{guest_dir}/{}", module.display());
            // Parent folders from lib/modules/<release> down (the archive
            // already has lib/modules); written shallowest first below.
            for ancestor in Path::new(&guest_path).ancestors().skip(1) {
                let text = ancestor.to_string_lossy().into_owned();
                if text.matches('/').count() >= 2 {
                    made.insert(text);
                }
            }
        }
        let mut dirs: Vec<_> = made.into_iter().collect();
        dirs.sort_by_key(|d| d.matches('/').count());
        for dir in dirs {
            cpio.dir(&dir, 0o755)?;
        }
        for module in &modules {
            let data = std::fs::read(modules_dir.join(module))?;
            cpio.file(&format!("{guest_dir}/{}", module.display()), 0o644, &data)?;
        }
        // One list per purpose: guest paths in load order.
        for (list_path, modules) in module_lists {
            let list: String = modules
                .iter()
                .map(|module| format!("/{guest_dir}/{}\n", module.display()))
                .collect();
            cpio.file(list_path, 0o644, list.as_bytes())?;
        }
        cpio.finish()?.flush()
    })()
    .map_err(io)
}

/// `busybox --list-full`: applet paths such as `usr/bin/awk`.
fn busybox_applets() -> std::io::Result<Vec<String>> {
    let output = Command::new(BUSYBOX).arg("--list-full").output()?;
    if !output.status.success() {
        return Err(std::io::Error::other("busybox --list-full failed"));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().trim_start_matches('/').to_owned())
        .filter(|line| !line.is_empty())
        .collect())
}

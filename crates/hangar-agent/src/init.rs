//! PID 1 duties: filesystems, kernel modules, hostname, environment.

use std::io;

use crate::cmdline::KernelCmdline;
use crate::sys;

/// Modules to load at boot, one path per line in dependency order; written
/// by the host when it builds the initramfs.
pub const BOOT_MODULES: &str = "/hangar/modules";
/// Modules for vsock, loaded only when the VM has a vsock device.
pub const VSOCK_MODULES: &str = "/hangar/modules-vsock";
/// Modules for an image's root file system (ext4), loaded only for
/// `hangar.root=`.
pub const ROOTFS_MODULES: &str = "/hangar/modules-rootfs";
/// Where the image's root file system is mounted before it becomes `/`.
const SYSROOT: &str = "/sysroot";
/// How long to wait for the root disk to appear.
const ROOT_DEVICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a read-only root is mounted under its writable overlay, and the
/// tmpfs that holds the overlay's writes.
const LOWER: &str = "/hangar/lower";
const WRITES: &str = "/hangar/writes";

/// The root file system to switch into.
pub struct RootSpec<'a> {
    pub device: &'a str,
    /// "ext4" or "squashfs".
    pub fstype: &'a str,
    /// Mounted read-only with a tmpfs overlay on top: commands can write,
    /// the writes live in RAM until the VM stops, the disk never changes.
    pub read_only: bool,
}

impl<'a> RootSpec<'a> {
    pub fn from_cmdline(cmdline: &'a KernelCmdline) -> Option<Self> {
        let device = cmdline.value("hangar.root")?;
        let fstype = cmdline.value("hangar.rootfstype").unwrap_or("ext4");
        Some(Self {
            device,
            fstype,
            read_only: cmdline.flag("hangar.rootro") || fstype == "squashfs",
        })
    }
}

/// Makes the file system on `root.device` the root: mounts it, moves the
/// kernel file systems into it, and moves it over `/` (what switch_root
/// does, without deleting the initramfs). The agent keeps running as PID
/// 1; every command from here on sees the image.
pub fn switch_root(root: &RootSpec) -> io::Result<()> {
    let device = root.device;
    let deadline = std::time::Instant::now() + ROOT_DEVICE_TIMEOUT;
    while !std::path::Path::new(device).exists() {
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("root disk {device} did not appear (is virtio_blk loaded?)"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::create_dir_all(SYSROOT)?;
    if root.read_only {
        std::fs::create_dir_all(LOWER)?;
        sys::mount_from(device, LOWER, root.fstype, libc::MS_RDONLY, "")?;
        std::fs::create_dir_all(WRITES)?;
        sys::mount_from("tmpfs", WRITES, "tmpfs", 0, "mode=0755")?;
        for dir in ["upper", "work"] {
            std::fs::create_dir_all(format!("{WRITES}/{dir}"))?;
        }
        let options = format!("lowerdir={LOWER},upperdir={WRITES}/upper,workdir={WRITES}/work");
        sys::mount_from("overlay", SYSROOT, "overlay", 0, &options)?;
    } else {
        sys::mount_from(device, SYSROOT, root.fstype, 0, "")?;
    }
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let inside = format!("{SYSROOT}{dir}");
        std::fs::create_dir_all(&inside)?;
        sys::move_mount(dir, &inside)?;
    }
    std::env::set_current_dir(SYSROOT)?;
    sys::move_mount(".", "/")?;
    sys::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Default `PATH` for commands the agent runs.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounts the basics, then applies the kernel command line (readable only
/// once /proc is mounted) and returns it.
pub fn setup() -> io::Result<KernelCmdline> {
    sys::mount("proc", "/proc", "")?;
    sys::mount("sysfs", "/sys", "")?;
    sys::mount("devtmpfs", "/dev", "mode=0755")?;
    sys::mount("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")?;
    sys::mount("tmpfs", "/dev/shm", "mode=1777")?;
    sys::mount("tmpfs", "/run", "mode=0755")?;
    sys::mount("tmpfs", "/tmp", "mode=1777")?;
    let cmdline = KernelCmdline::read();
    let hostname = cmdline.value("hangar.hostname").unwrap_or("hangar");
    if let Err(err) = sys::set_hostname(hostname) {
        crate::log(&format!("sethostname {hostname}: {err}"));
    }
    std::env::set_var("PATH", DEFAULT_PATH);
    std::env::set_var("HOME", "/root");
    Ok(cmdline)
}

pub fn load_modules(list_path: &str) {
    let Ok(list) = std::fs::read_to_string(list_path) else {
        return;
    };
    // The modules are built for the default kernel; a bundle's own kernel
    // cannot load them and must have its drivers built in.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ours = format!("/lib/modules/{}/", release.trim());
    if list
        .lines()
        .any(|line| !line.trim().is_empty() && !line.starts_with(&ours))
    {
        crate::log(&format!(
            "{list_path}: modules are for another kernel than {}; relying on built-in drivers",
            release.trim()
        ));
        return;
    }
    for path in list.lines().map(str::trim).filter(|line| !line.is_empty()) {
        // A missing optional driver must not stop the boot; the host notices
        // a missing agent port and reports the console, which has this line.
        if let Err(err) = sys::load_module(path) {
            crate::log(&err.to_string());
        }
    }
}

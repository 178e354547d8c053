//! PID 1 duties: filesystems, kernel modules, hostname, environment.

use std::io;

use crate::cmdline::KernelCmdline;
use crate::sys;

/// Modules to load at boot, one path per line in dependency order; written
/// by the host when it builds the initramfs.
pub const BOOT_MODULES: &str = "/hangar/modules";
/// Modules for vsock, loaded only when the VM has a vsock device.
pub const VSOCK_MODULES: &str = "/hangar/modules-vsock";

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
    for path in list.lines().map(str::trim).filter(|line| !line.is_empty()) {
        // A missing optional driver must not stop the boot; the host notices
        // a missing agent port and reports the console, which has this line.
        if let Err(err) = sys::load_module(path) {
            crate::log(&err.to_string());
        }
    }
}

//! Thin wrappers over the syscalls the agent needs as PID 1.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;

/// Mounts `fstype` at `target`, creating the directory. EBUSY (already
/// mounted) is fine.
pub fn mount(fstype: &str, target: &str, options: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let source = CString::new(fstype)?;
    let target_c = CString::new(target)?;
    let fstype_c = CString::new(fstype)?;
    let data = CString::new(options)?;
    let flags = libc::MS_NOSUID;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(io::Error::new(
        err.kind(),
        format!("mount {fstype} on {target}: {err}"),
    ))
}

/// Mounts `source` (a device, or a name for virtual file systems) at
/// `target` with `fstype`, `flags` and file-system options `data`.
pub fn mount_from(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    mount_raw(source, target, Some(fstype), flags, Some(data))
}

/// Moves the mount at `from` (with everything mounted below it) to `to`.
pub fn move_mount(from: &str, to: &str) -> io::Result<()> {
    mount_raw(from, to, None, libc::MS_MOVE, None)
}

/// mount(2); `fstype` and `data` None for flags that take none (MS_MOVE).
fn mount_raw(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source_c = CString::new(source)?;
    let target_c = CString::new(target)?;
    let fstype_c = fstype.map(CString::new).transpose()?;
    let data_c = data.map(CString::new).transpose()?;
    // SAFETY: valid NUL-terminated strings, or null where none is given.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(io::Error::new(
        err.kind(),
        format!(
            "mount {source} on {target} ({}): {err}",
            fstype.unwrap_or("move")
        ),
    ))
}

pub fn chroot(path: &str) -> io::Result<()> {
    let path_c = CString::new(path)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chroot(path_c.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a network interface up, like `ip link set NAME up`.
pub fn interface_up(name: &str) -> io::Result<()> {
    set_interface_up(name, true)
}

/// A socket for interface ioctls and an `ifreq` naming `name`.
fn interface_request(name: &str) -> io::Result<(std::os::fd::OwnedFd, libc::ifreq)> {
    // SAFETY: socket takes plain integers; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::other("interface name too long"));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok((socket, request))
}

/// Sets a network interface up or down (SIOCGIFFLAGS, then SIOCSIFFLAGS).
pub fn set_interface_up(name: &str, up: bool) -> io::Result<()> {
    let (socket, mut request) = interface_request(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq; the
    // flags member of the union is the one these requests use.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        if up {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        } else {
            request.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets an Ethernet interface's MAC address (SIOCSIFHWADDR).
pub fn set_hardware_address(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let (socket, mut request) = interface_request(name)?;
    // SAFETY: the hwaddr member of the union is the one SIOCSIFHWADDR
    // reads: a sockaddr with the link type and the address bytes.
    unsafe {
        request.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (slot, byte) in request.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *slot = byte as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFHWADDR as _, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Loads a kernel module from a file. Already-loaded modules are fine.
pub fn load_module(path: &str) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::default();
    // SAFETY: finit_module takes an open fd, a NUL-terminated parameter
    // string and flags; the fd outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(io::Error::new(
        err.kind(),
        format!("load module {path}: {err}"),
    ))
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flushes filesystems and powers the machine off. As PID 1 this never
/// returns; the loop only guards against a kernel that refuses.
pub fn power_off() -> ! {
    reboot_with(libc::LINUX_REBOOT_CMD_POWER_OFF)
}

pub fn reboot() -> ! {
    reboot_with(libc::LINUX_REBOOT_CMD_RESTART)
}

fn reboot_with(cmd: libc::c_int) -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `uname -r` and `uname -n`.
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return (String::new(), String::new());
    }
    let field = |raw: &[libc::c_char]| {
        let bytes: Vec<u8> = raw
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&uts.release), field(&uts.nodename))
}

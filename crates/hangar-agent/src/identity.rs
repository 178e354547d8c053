//! A new identity for a guest restored or forked from a snapshot: hostname,
//! machine-id, the NIC's MAC (and IPv6 addresses made from it), a reseeded
//! random pool and the host's clock.
//! Each part is tried even when an earlier one failed; the host gets the
//! list of what failed.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use hangar_proto::GuestIdentity;

/// Applies `identity`; returns the parts that failed, as messages.
pub fn apply(identity: &GuestIdentity) -> Vec<String> {
    let mut errors = Vec::new();
    let mut attempt = |what: &str, result: io::Result<()>| {
        if let Err(err) = result {
            crate::log(&format!("identity: {what}: {err}"));
            errors.push(format!("{what}: {err}"));
        }
    };
    // The clock first: everything after is stamped with the right time.
    attempt("clock", set_clock(identity.clock_unix_ns));
    attempt("entropy", reseed(&identity.entropy));
    attempt("hostname", set_hostname(&identity.hostname));
    attempt("machine-id", write_machine_id(&identity.machine_id));
    if let Some(mac) = &identity.mac {
        match vm_nic(Path::new(SYS_CLASS_NET)) {
            Ok(nic) => {
                let changed = set_mac(&nic, mac);
                let renew = changed.is_ok();
                attempt("mac", changed);
                if renew {
                    attempt("ipv6", renew_ipv6(&nic));
                }
            }
            Err(err) => attempt("mac", Err(err)),
        }
    }
    errors
}

const SYS_CLASS_NET: &str = "/sys/class/net";

/// The VM's network interface: `eth0` where the kernel's names are kept
/// (Hangar's initramfs, images booted with net.ifnames=0), else the one
/// Ethernet device an image with predictable names calls ens3 or enp0s2.
/// Interfaces without a device behind them (bridges, veths, tunnels) are
/// not it. More than one such device: refused, naming them.
fn vm_nic(sys_class_net: &Path) -> io::Result<String> {
    if sys_class_net.join("eth0").exists() {
        return Ok("eth0".into());
    }
    let mut found = Vec::new();
    let listing = std::fs::read_dir(sys_class_net)
        .map_err(|err| io::Error::other(format!("{}: {err}", sys_class_net.display())))?;
    for entry in listing {
        let entry = entry?;
        let dir = entry.path();
        let is_ethernet =
            std::fs::read_to_string(dir.join("type")).is_ok_and(|kind| kind.trim() == ARPHRD_ETHER);
        if is_ethernet && dir.join("device").exists() {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    match found.as_slice() {
        [nic] => Ok(nic.clone()),
        [] => Err(io::Error::other("no Ethernet device in the guest")),
        several => Err(io::Error::other(format!(
            "several Ethernet devices ({}): cannot tell which is the VM's NIC",
            several.join(", ")
        ))),
    }
}

/// `/sys/class/net/*/type` of an Ethernet interface.
const ARPHRD_ETHER: &str = "1";

fn set_hostname(name: &str) -> io::Result<()> {
    crate::sys::set_hostname(name)?;
    // Keep /etc/hostname in step where the guest has one.
    let path = std::path::Path::new("/etc/hostname");
    if path.is_file() && !path.is_symlink() {
        overwrite(path, format!("{name}\n").as_bytes())?;
    }
    Ok(())
}

/// Writes /etc/machine-id (and D-Bus's copy when it is a file of its own).
fn write_machine_id(id: &str) -> io::Result<()> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(io::Error::other("not 32 hex digits"));
    }
    if !std::path::Path::new("/etc").is_dir() {
        return Ok(());
    }
    let path = std::path::Path::new("/etc/machine-id");
    if path.is_symlink() {
        std::fs::remove_file(path)?;
    }
    let line = format!("{id}\n");
    overwrite(path, line.as_bytes())?;
    let dbus = std::path::Path::new("/var/lib/dbus/machine-id");
    if dbus.is_file() && !dbus.is_symlink() {
        overwrite(dbus, line.as_bytes())?;
    }
    Ok(())
}

/// Writes `content` as the whole file: in place when the file is already
/// that long (a machine-id always is), else anew. In place, a restored
/// guest runs no truncate or page-allocation path, which TCG would
/// translate again for every restore (measured: ~10 ms of the identity).
fn overwrite(path: &Path, content: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
        if file.metadata()?.len() == content.len() as u64 {
            return file.write_all_at(content, 0);
        }
    }
    std::fs::write(path, content)
}

fn set_clock(unix_ns: u64) -> io::Result<()> {
    let time = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// RNDADDENTROPY (_IOW('R', 0x03, int[2])) and RNDRESEEDCRNG (_IO('R', 0x07)).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes the host's bytes into the pool, credits them, and makes the
/// kernel's generator reseed now rather than at its next interval.
fn reseed(entropy_hex: &str) -> io::Result<()> {
    let bytes = hex_decode(entropy_hex).ok_or_else(|| io::Error::other("entropy is not hex"))?;
    if bytes.len() < 32 || bytes.len() > 512 {
        return Err(io::Error::other("entropy must be 32 to 512 bytes"));
    }
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + bytes.len());
    request.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    request.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    request.extend_from_slice(&bytes);
    // SAFETY: the buffer holds the header and `buf_size` bytes the kernel
    // reads; it outlives the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, request.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for slot in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Changes `name`'s hardware address (SIOCSIFHWADDR). virtio-net takes it
/// live; a driver that refuses while up (EBUSY) gets it with the link down
/// for a moment, and then the network is set up again.
fn set_mac(name: &str, mac: &str) -> io::Result<()> {
    let mac = parse_mac(mac).ok_or_else(|| io::Error::other("not a MAC address"))?;
    if !std::path::Path::new("/sys/class/net").join(name).exists() {
        return Err(io::Error::other(format!("no {name}")));
    }
    match crate::sys::set_hardware_address(name, mac) {
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
            crate::sys::set_interface_up(name, false)?;
            let result = crate::sys::set_hardware_address(name, mac);
            crate::sys::set_interface_up(name, true)?;
            // Hangar's own kernel sets eth0 up from its command line; an
            // image with its own init (no hangar.net) does it itself.
            crate::net::configure(crate::cmdline::KernelCmdline::read().value("hangar.net"));
            result
        }
        other => other,
    }
}

/// Makes `name`'s IPv6 addresses anew from its current MAC. Linux keeps
/// the addresses it derived from the old one (the link-local address, the
/// autoconfigured ones) once they passed duplicate address detection, so
/// forks of one snapshot would share them. Switching IPv6 off and on for
/// the interface drops them and starts address configuration again (a new
/// link-local address at once, the router's prefix after its next
/// advertisement); IPv4 and its routes are not touched, unlike taking the
/// link down. Nothing to do where IPv6 is off or absent.
fn renew_ipv6(name: &str) -> io::Result<()> {
    let switch = std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(name)
        .join("disable_ipv6");
    match std::fs::read_to_string(&switch) {
        Ok(value) if value.trim() == "0" => {
            std::fs::write(&switch, "1")?;
            std::fs::write(&switch, "0")
        }
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_hex_are_parsed_strictly() {
        assert_eq!(
            parse_mac("02:aB:00:00:00:ff"),
            Some([2, 0xab, 0, 0, 0, 0xff])
        );
        for bad in [
            "02:ab:00:00:00",
            "02:ab:00:00:00:ff:00",
            "2:ab:00:00:00:ff",
            "zz:ab:00:00:00:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(hex_decode("00ff"), Some(vec![0, 255]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    /// A /sys/class/net of `(name, type, has a device)` entries.
    fn fake_sys(interfaces: &[(&str, &str, bool)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind, device) in interfaces {
            let nic = dir.path().join(name);
            std::fs::create_dir(&nic).unwrap();
            std::fs::write(nic.join("type"), format!("{kind}\n")).unwrap();
            if *device {
                // As sysfs has it: a link to the device's directory.
                std::os::unix::fs::symlink(dir.path(), nic.join("device")).unwrap();
            }
        }
        dir
    }

    #[test]
    fn the_nic_is_eth0_or_the_only_ethernet_device() {
        let kernel_names = fake_sys(&[
            ("lo", "772", false),
            ("eth0", "1", true),
            ("eth1", "1", true),
        ]);
        assert_eq!(vm_nic(kernel_names.path()).unwrap(), "eth0");
        // Predictable names, with a bridge and a veth beside the NIC.
        let predictable = fake_sys(&[
            ("lo", "772", false),
            ("docker0", "1", false),
            ("veth1", "1", false),
            ("ens3", "1", true),
        ]);
        assert_eq!(vm_nic(predictable.path()).unwrap(), "ens3");
        let two = fake_sys(&[("ens3", "1", true), ("ens4", "1", true)]);
        let err = vm_nic(two.path()).unwrap_err().to_string();
        assert!(err.contains("ens3, ens4"), "{err}");
        let none = fake_sys(&[("lo", "772", false), ("wg0", "65534", true)]);
        let err = vm_nic(none.path()).unwrap_err().to_string();
        assert!(err.contains("no Ethernet device"), "{err}");
    }

    #[test]
    fn overwrite_replaces_the_whole_file_in_place_or_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        overwrite(&path, b"first\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first\n");
        overwrite(&path, b"other\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"other\n");
        overwrite(&path, b"much longer\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"much longer\n");
        overwrite(&path, b"short\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short\n");
    }

    #[test]
    fn a_malformed_machine_id_is_refused() {
        assert!(write_machine_id("../../etc/passwd").is_err());
        assert!(write_machine_id("abc").is_err());
    }
}

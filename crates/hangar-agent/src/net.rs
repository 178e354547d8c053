//! Guest networking as PID 1: loopback always; with `hangar.net=user`,
//! eth0 gets QEMU user-mode networking's fixed address, gateway and DNS.
//! Done with the initramfs's busybox `ip` (fixed argv, no shell).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// User-mode networking's guest side (QEMU's slirp defaults).
const USER_ADDRESS: &str = "10.0.2.15/24";
const USER_GATEWAY: &str = "10.0.2.2";
const USER_DNS: &str = "10.0.2.3";
/// How long to wait for the NIC after its driver loaded.
const NIC_TIMEOUT: Duration = Duration::from_secs(5);

pub fn configure(mode: Option<&str>) {
    // Every boot needs loopback; a syscall, not a process (a spawn costs
    // tens of milliseconds under TCG).
    if let Err(err) = crate::sys::interface_up("lo") {
        crate::log(&format!("lo: {err}"));
    }
    match mode {
        None => {}
        Some("user") => user_network(),
        Some(other) => crate::log(&format!(
            "hangar.net={other}: unknown mode, network left down"
        )),
    }
}

fn user_network() {
    let deadline = Instant::now() + NIC_TIMEOUT;
    while !Path::new("/sys/class/net/eth0").exists() {
        if Instant::now() >= deadline {
            crate::log("no eth0 appeared; network left down");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ok = run(&["ip", "link", "set", "eth0", "up"])
        && run(&["ip", "addr", "add", USER_ADDRESS, "dev", "eth0"])
        && run(&["ip", "route", "add", "default", "via", USER_GATEWAY]);
    write_resolv_conf(Some("user"));
    if ok {
        crate::log(&format!("eth0 {USER_ADDRESS} via {USER_GATEWAY}"));
    }
}

/// Points the resolver at user-mode networking's DNS (again after the
/// root moved to an image).
pub fn write_resolv_conf(mode: Option<&str>) {
    if mode != Some("user") {
        return;
    }
    // An image's /etc/resolv.conf may be a dangling symlink (systemd-
    // resolved): replace the link, never write through it.
    let path = std::path::Path::new("/etc/resolv.conf");
    if path.is_symlink() {
        let _ = std::fs::remove_file(path);
    }
    if let Err(err) = std::fs::write(path, format!("nameserver {USER_DNS}\n")) {
        crate::log(&format!("/etc/resolv.conf: {err}"));
    }
}

/// Runs one command, logging a failure; true on success.
fn run(argv: &[&str]) -> bool {
    match Command::new(argv[0]).args(&argv[1..]).status() {
        Ok(status) if status.success() => true,
        Ok(status) => {
            crate::log(&format!("{}: {status}", argv.join(" ")));
            false
        }
        Err(err) => {
            crate::log(&format!("{}: {err}", argv.join(" ")));
            false
        }
    }
}

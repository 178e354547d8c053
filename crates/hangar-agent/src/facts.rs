//! Guest facts sent with the hello.
//!
//! Every hello gathers them, and a restored guest runs this through cold
//! TCG translation caches (each guest code path is translated again on its
//! first run after a restore). Measured there in translated blocks:
//! getifaddrs's rtnetlink dumps cost less than SIOCGIFCONF plus
//! /proc/net/if_inet6, so they stay; /proc/uptime gave way to a clock.

use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use hangar_proto::GuestFacts;

pub fn gather() -> GuestFacts {
    let (kernel_release, hostname) = crate::sys::uname();
    let uptime_ms = uptime_ms();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    GuestFacts {
        kernel_release,
        hostname,
        uptime_ms,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        addresses: addresses(),
        boot_time_unix_ms: now_ms.saturating_sub(uptime_ms),
        vsock_token: None,
    }
}

/// Time since boot, suspend included: what /proc/uptime shows.
fn uptime_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return 0;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// Non-loopback addresses as `interface addr/prefix`.
fn addresses() -> Vec<String> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return found;
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor is a node of the list getifaddrs returned; its
        // name is a NUL-terminated string and its addresses, when not
        // null, point to sockaddrs of the family they state.
        unsafe {
            let entry = &*cursor;
            cursor = entry.ifa_next;
            if entry.ifa_addr.is_null() {
                continue;
            }
            let name = CStr::from_ptr(entry.ifa_name).to_string_lossy();
            if let Some((address, prefix)) = describe(entry.ifa_addr, entry.ifa_netmask) {
                if !address.is_loopback() {
                    found.push(format!("{name} {address}/{prefix}"));
                }
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The address and prefix length of an interface address.
///
/// # Safety
/// `addr` must point to a valid sockaddr; `mask`, when not null, to one of
/// the same family.
unsafe fn describe(
    addr: *const libc::sockaddr,
    mask: *const libc::sockaddr,
) -> Option<(std::net::IpAddr, u32)> {
    match i32::from((*addr).sa_family) {
        libc::AF_INET => {
            let v4 = &*addr.cast::<libc::sockaddr_in>();
            let prefix = if mask.is_null() {
                32
            } else {
                u32::from_be((*mask.cast::<libc::sockaddr_in>()).sin_addr.s_addr).count_ones()
            };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some((ip.into(), prefix))
        }
        libc::AF_INET6 => {
            let v6 = &*addr.cast::<libc::sockaddr_in6>();
            let prefix = if mask.is_null() {
                128
            } else {
                let bytes = (*mask.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr;
                bytes.iter().map(|b| b.count_ones()).sum()
            };
            Some((Ipv6Addr::from(v6.sin6_addr.s6_addr).into(), prefix))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime_agrees_with_proc_uptime() {
        let proc_ms = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            * 1000.0;
        let ours = super::uptime_ms() as f64;
        assert!((ours - proc_ms).abs() < 2000.0, "{ours} vs {proc_ms}");
    }
}

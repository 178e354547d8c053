//! Guest network identity and host port forwards.
//!
//! A VM's MAC address is its id: ids are 48 random bits with the first
//! byte marked locally administered and unicast (see
//! [`crate::manager::new_id`]), and they are unique in the store, so MACs
//! are unique without a registry. Host ports come from the OS (a bind to
//! port 0 on 127.0.0.1) at each start: no hashing, so no collisions with
//! each other or with anything else listening.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

use crate::spec::PortForward;

/// User-mode (slirp) networking as QEMU sets it up: the guest's subnet,
/// the host side's gateway and DNS addresses in it, and the first
/// address its DHCP server hands out.
pub const USER_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const USER_PREFIX: u8 = 24;
pub const USER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const USER_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const USER_DHCP_START: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Marks the first byte of a MAC locally administered (bit 1) and unicast
/// (bit 0 clear).
pub fn local_unicast(first: u8) -> u8 {
    (first & 0xfc) | 0x02
}

/// The MAC address of the VM with this id (12 hex digits).
pub fn mac_for(id: &str) -> Option<String> {
    let bytes = hex::decode(id).ok().filter(|b| b.len() == 6)?;
    let mut parts = vec![format!("{:02x}", local_unicast(bytes[0]))];
    parts.extend(bytes[1..].iter().map(|b| format!("{b:02x}")));
    Some(parts.join(":"))
}

/// The forwards with every host port 0 replaced by a port free right now.
/// (The VMM binds it a moment later; a port taken in between makes the
/// start fail with that reason, and the caller may try again.)
pub fn assign_ports(forwards: &[PortForward]) -> io::Result<Vec<PortForward>> {
    forwards
        .iter()
        .map(|forward| {
            let host = if forward.host == 0 {
                free_port()?
            } else {
                forward.host
            };
            Ok(PortForward {
                host,
                guest: forward.guest,
            })
        })
        .collect()
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_come_from_ids_and_are_local_unicast() {
        assert_eq!(mac_for("ffeeddccbbaa").unwrap(), "fe:ee:dd:cc:bb:aa");
        assert_eq!(mac_for("0123456789ab").unwrap(), "02:23:45:67:89:ab");
        assert_eq!(mac_for("xyz"), None);
        for first in 0..=255u8 {
            let byte = local_unicast(first);
            assert_eq!(byte & 0x01, 0, "unicast");
            assert_eq!(byte & 0x02, 0x02, "locally administered");
        }
    }

    #[test]
    fn zero_host_ports_get_distinct_free_ports() {
        let wanted = [
            PortForward { host: 0, guest: 22 },
            PortForward { host: 0, guest: 80 },
            PortForward {
                host: 4242,
                guest: 8080,
            },
        ];
        let assigned = assign_ports(&wanted).unwrap();
        assert_ne!(assigned[0].host, 0);
        assert_ne!(assigned[1].host, 0);
        assert_eq!(assigned[2].host, 4242);
        assert_eq!(
            assigned.iter().map(|f| f.guest).collect::<Vec<_>>(),
            vec![22, 80, 8080]
        );
    }
}

//! What the user asks for: [`VmSpec`]. Plain data, validated without I/O.
//!
//! The fields carry the concepts of the systems Hangar unifies: boot source
//! (default image, kernel + initramfs, disk, OCI), resources, network,
//! cloud-init, SSH, shared directories, vsock, kernel arguments and labels.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::{USER_DHCP_START, USER_DNS, USER_GATEWAY, USER_PREFIX, USER_SUBNET};
use crate::size::{ByteSize, GIB, MIB};

/// Namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY: ByteSize = ByteSize::mib(256);
pub const MIN_MEMORY: u64 = 64 * MIB;
pub const MAX_MEMORY: u64 = 1024 * GIB;
pub const MAX_CPUS: u32 = 255;

/// Everything needed to create a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique within the namespace: lowercase letters, digits, `-`, `_`, `.`.
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub image: ImageSource,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// Size of the VM's root disk, for disk images: its overlay is made
    /// this big (at least the image's own size).
    #[serde(default)]
    pub disk_size: Option<ByteSize>,
    /// Boot disk images with UEFI (OVMF) instead of BIOS.
    #[serde(default)]
    pub uefi: bool,
    /// More disks, after the root disk.
    #[serde(default)]
    pub data_disks: Vec<DataDisk>,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
    #[serde(default)]
    pub ssh: Option<SshSpec>,
    #[serde(default)]
    pub shared_dirs: Vec<SharedDir>,
    /// Give the guest a vsock device.
    #[serde(default)]
    pub vsock: bool,
    /// Extra kernel command-line arguments, appended after Hangar's own.
    #[serde(default)]
    pub kernel_args: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}
fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_memory() -> ByteSize {
    DEFAULT_MEMORY
}

/// What the VM boots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// Hangar's embedded image: Debian cloud kernel + agent initramfs.
    #[default]
    Default,
    /// A kernel and initramfs of the user's own (stateless boot).
    Kernel {
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: Option<String>,
    },
    /// A stored cloud disk image (qcow2 or raw, `disk:NAME`), booted with
    /// firmware from a per-VM overlay.
    Disk { name: String },
    /// An OCI image reference such as `docker.io/library/alpine:3.20`.
    Oci { reference: String },
    /// A base-image bundle (kernel + root file system) in the bundle cache,
    /// written `bundle:ID`.
    Bundle { id: String },
}

/// How the VM is networked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetworkSpec {
    /// No network device.
    #[default]
    None,
    /// User-mode (slirp) networking with host port forwards.
    User {
        #[serde(default)]
        forwards: Vec<PortForward>,
    },
    /// A TAP device on a host bridge.
    Tap { bridge: String },
}

/// `HOST:GUEST` TCP forward on 127.0.0.1. `host` 0 asks for a free port
/// chosen by the OS at each start (the one in use is in the VM record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// A NoCloud seed for cloud-init images, attached on the first boot only.
/// A password is never part of it: it is given to create and used for
/// the seed alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSpec {
    /// The user's own user-data (cloud-config, a script, ...). Without it
    /// Hangar writes a cloud-config that creates `user` with the keys.
    #[serde(default)]
    pub user_data: Option<String>,
    /// Default: the VM id.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Default: the VM name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The user to create (default "hangar"); not with `user_data`.
    #[serde(default)]
    pub user: Option<String>,
    /// OpenSSH public key lines to authorize.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// A static address instead of DHCP (network-config v2).
    #[serde(default)]
    pub network: Option<StaticNetwork>,
}

/// A static IPv4/IPv6 address for the guest's first NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNetwork {
    /// ADDRESS/PREFIX, e.g. 10.0.2.15/24.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

impl StaticNetwork {
    /// The address and prefix length of `address`, when it parses as
    /// ADDRESS/PREFIX (the seed's checks name what is wrong otherwise).
    pub fn ip_and_prefix(&self) -> Option<(std::net::IpAddr, u8)> {
        let (address, prefix) = self.address.split_once('/')?;
        Some((address.parse().ok()?, prefix.parse().ok()?))
    }
}

/// How to reach the guest over SSH when it has no agent. The private key
/// is a file of the user's (`private_key_path`), one given in memory to
/// [`crate::Manager::create_with_ssh_key`], or else Hangar's per-VM key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSpec {
    pub user: String,
    /// For a key given in memory: its public half (authorized_keys line),
    /// set by Hangar so a key given again can be checked against it.
    pub public_key: Option<String>,
    pub private_key_path: Option<PathBuf>,
    /// The private key was given in memory: only the process holding it
    /// can reach the guest (see [`crate::Manager::supply_ssh_key`]). The
    /// key itself is never recorded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub private_key_in_memory: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// An extra disk: a new empty one of `size` (kept in the VM's work dir),
/// or a host file (raw or qcow2) attached as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDisk {
    #[serde(default)]
    pub size: Option<ByteSize>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
}

/// A host directory visible in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDir {
    pub host_path: PathBuf,
    pub guest_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A field of the spec is wrong; the message names it and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("name {name:?} is invalid: use 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit")]
    Name { name: String },
    #[error("namespace {namespace:?} is invalid: use 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit")]
    Namespace { namespace: String },
    #[error("cpus is {cpus}: give a number from 1 to {MAX_CPUS}")]
    Cpus { cpus: u32 },
    #[error("memory is {memory}: give at least 64M and at most 1T, e.g. --memory 512M")]
    Memory { memory: ByteSize },
    #[error("label key {key:?} is invalid: use letters, digits, '-', '_', '.' or '/'")]
    LabelKey { key: String },
    #[error("kernel argument {arg:?} is invalid: arguments must be non-empty and contain no whitespace or control characters")]
    KernelArg { arg: String },
    #[error("port forward {host}:{guest} is invalid: the guest port must be 1-65535 (host 0 picks a free port)")]
    Port { host: u16, guest: u16 },
    #[error("host port {host} is forwarded twice; give each forward its own host port (or 0 for a free one)")]
    PortTwice { host: u16 },
    #[error("{field} applies to disk images only (--image disk:NAME)")]
    DiskOnly { field: &'static str },
    #[error(
        "data disk {index}: give either a size (a new disk) or a path (a host file), not {what}"
    )]
    DataDisk { index: usize, what: &'static str },
    #[error("ssh: give the private key either as a file (private_key_path, --ssh-private-key) or in memory, not both")]
    SshKeyTwice,
    #[error("--ip {address}: {problem}; user-mode networking is the subnet {}/{} (gateway {}, DNS {}, DHCP from {}) and SSH is forwarded to --ip: give an address in it such as {}/{}, or leave --ip out for DHCP (another subnet needs TAP networking)", USER_SUBNET, USER_PREFIX, USER_GATEWAY, USER_DNS, USER_DHCP_START, USER_DHCP_START, USER_PREFIX)]
    UserNetAddress { address: String, problem: String },
    #[error("--gateway {gateway}: user-mode networking's only router is {}; give --gateway {} (another gateway needs TAP networking)", USER_GATEWAY, USER_GATEWAY)]
    UserNetGateway { gateway: String },
}

/// Checks a VM or namespace name: DNS-label-like, so it can also be a
/// guest hostname.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(b))
}

/// `base` followed by `suffix` as a valid name: lowercased, and `base`
/// cut short so the whole fits in 63 characters (`suffix` is kept whole;
/// callers give short ones such as `-fork-12`). Names derived from a
/// snapshot's (which may hold capitals) or a long VM name.
pub fn derived_name(base: &str, suffix: &str) -> String {
    let room = 63usize.saturating_sub(suffix.len());
    let base: String = base
        .chars()
        .take(room)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("{base}{suffix}")
}

impl VmSpec {
    /// A spec with defaults for everything but the name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: default_namespace(),
            image: ImageSource::Default,
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            disk_size: None,
            uefi: false,
            data_disks: Vec::new(),
            network: NetworkSpec::None,
            cloud_init: None,
            ssh: None,
            shared_dirs: Vec::new(),
            vsock: false,
            kernel_args: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Checks every field that can be checked without I/O.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_valid_name(&self.name) {
            return Err(SpecError::Name {
                name: self.name.clone(),
            });
        }
        if !is_valid_name(&self.namespace) {
            return Err(SpecError::Namespace {
                namespace: self.namespace.clone(),
            });
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(SpecError::Cpus { cpus: self.cpus });
        }
        if self.memory.0 < MIN_MEMORY || self.memory.0 > MAX_MEMORY {
            return Err(SpecError::Memory {
                memory: self.memory,
            });
        }
        for key in self.labels.keys() {
            let ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !ok {
                return Err(SpecError::LabelKey { key: key.clone() });
            }
        }
        for arg in &self.kernel_args {
            if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(SpecError::KernelArg { arg: arg.clone() });
            }
        }
        let is_disk = matches!(self.image, ImageSource::Disk { .. });
        if !is_disk && self.disk_size.is_some() {
            return Err(SpecError::DiskOnly { field: "--disk" });
        }
        if !is_disk && self.uefi {
            return Err(SpecError::DiskOnly { field: "--uefi" });
        }
        for (index, disk) in self.data_disks.iter().enumerate() {
            let what = match (&disk.size, &disk.path) {
                (Some(_), Some(_)) => "both",
                (None, None) => "neither",
                (Some(size), None) if size.0 < MIB => "a size under 1M",
                _ => continue,
            };
            return Err(SpecError::DataDisk { index, what });
        }
        if let NetworkSpec::User { forwards } = &self.network {
            if let Some(bad) = forwards.iter().find(|f| f.guest == 0) {
                return Err(SpecError::Port {
                    host: bad.host,
                    guest: bad.guest,
                });
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(twice) = forwards
                .iter()
                .find(|f| f.host != 0 && !seen.insert(f.host))
            {
                return Err(SpecError::PortTwice { host: twice.host });
            }
            if let Some(network) = self.cloud_init.as_ref().and_then(|c| c.network.as_ref()) {
                check_user_net_address(network)?;
            }
        }
        if self
            .ssh
            .as_ref()
            .is_some_and(|s| s.private_key_in_memory && s.private_key_path.is_some())
        {
            return Err(SpecError::SshKeyTwice);
        }
        Ok(())
    }
}

/// A static address under user-mode networking must be one slirp routes
/// to: in its subnet, not one of its own addresses, with its gateway.
/// (Malformed values are left to the seed's checks, which name them.)
fn check_user_net_address(network: &StaticNetwork) -> Result<(), SpecError> {
    let refuse = |problem: &str| SpecError::UserNetAddress {
        address: network.address.clone(),
        problem: problem.to_owned(),
    };
    let Some((ip, prefix)) = network.ip_and_prefix() else {
        return Ok(());
    };
    let std::net::IpAddr::V4(ip) = ip else {
        return Err(refuse(
            "is IPv6, and user-mode networking forwards to an IPv4 address",
        ));
    };
    let mask = u32::MAX << (32 - u32::from(USER_PREFIX));
    if u32::from(ip) & mask != u32::from(USER_SUBNET) {
        return Err(refuse("is outside the subnet"));
    }
    let broadcast = std::net::Ipv4Addr::from(u32::from(USER_SUBNET) | !mask);
    let taken = [
        (USER_SUBNET, "is the subnet's network address"),
        (broadcast, "is the subnet's broadcast address"),
        (USER_GATEWAY, "is the gateway's own address"),
        (USER_DNS, "is the DNS server's own address"),
    ];
    if let Some((_, problem)) = taken.iter().find(|(taken, _)| *taken == ip) {
        return Err(refuse(problem));
    }
    if prefix != USER_PREFIX {
        return Err(refuse(&format!(
            "has the prefix /{prefix}, and the subnet is /{USER_PREFIX}"
        )));
    }
    if let Some(gateway) = &network.gateway {
        if gateway
            .parse::<std::net::IpAddr>()
            .is_ok_and(|gateway| gateway != std::net::IpAddr::V4(USER_GATEWAY))
        {
            return Err(SpecError::UserNetGateway {
                gateway: gateway.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_are_valid_names() {
        assert_eq!(derived_name("Warm.Guest", "-fork-3"), "warm.guest-fork-3");
        let long = "S".repeat(63);
        let name = derived_name(&long, "-fork-12");
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("-fork-12"), "{name}");
        assert!(is_valid_name(&name), "{name}");
        assert!(is_valid_name(&derived_name("web", "-1")));
    }

    #[test]
    fn defaults_fill_a_minimal_json_spec() {
        let spec: VmSpec = serde_json::from_str(r#"{"name":"web"}"#).unwrap();
        assert_eq!(spec, VmSpec::new("web"));
        spec.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<VmSpec>(r#"{"name":"web","cpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
    }

    #[test]
    fn bad_fields_name_the_fix() {
        let mut spec = VmSpec::new("Web!");
        assert!(matches!(spec.validate(), Err(SpecError::Name { .. })));
        spec.name = "web".into();
        spec.memory = ByteSize(0);
        let err = spec.validate().unwrap_err();
        assert!(err.to_string().contains("at least 64M"), "{err}");
        spec.memory = DEFAULT_MEMORY;
        spec.cpus = 0;
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cpus is 0"));
        spec.cpus = 1;
        spec.kernel_args = vec!["a b".into()];
        assert!(matches!(spec.validate(), Err(SpecError::KernelArg { .. })));
    }

    fn user_net_with(address: &str, gateway: Option<&str>) -> VmSpec {
        let mut spec = VmSpec::new("web");
        spec.network = NetworkSpec::User {
            forwards: Vec::new(),
        };
        spec.cloud_init = Some(CloudInitSpec {
            network: Some(StaticNetwork {
                address: address.into(),
                gateway: gateway.map(str::to_owned),
                dns: vec!["1.1.1.1".into()],
            }),
            ..Default::default()
        });
        spec
    }

    #[test]
    fn static_addresses_under_user_networking_are_in_slirps_subnet() {
        for good in [
            "10.0.2.15/24",
            "10.0.2.50/24",
            "10.0.2.4/24",
            "10.0.2.254/24",
        ] {
            user_net_with(good, Some("10.0.2.2")).validate().unwrap();
            user_net_with(good, None).validate().unwrap();
        }
        for (bad, problem) in [
            ("192.168.1.5/24", "is outside the subnet"),
            ("10.0.3.15/24", "is outside the subnet"),
            ("10.0.2.2/24", "gateway's own address"),
            ("10.0.2.3/24", "DNS server's own address"),
            ("10.0.2.0/24", "network address"),
            ("10.0.2.255/24", "broadcast address"),
            ("10.0.2.15/16", "prefix /16"),
            ("fd00::5/64", "is IPv6"),
        ] {
            let err = user_net_with(bad, None).validate().unwrap_err();
            assert!(
                matches!(err, SpecError::UserNetAddress { .. }),
                "{bad}: {err:?}"
            );
            let text = err.to_string();
            for part in [
                format!("--ip {bad}: "),
                problem.into(),
                "10.0.2.0/24".into(),
            ] {
                assert!(text.contains(&part), "{bad}: {text}");
            }
            assert!(text.contains("such as 10.0.2.15/24"), "{text}");
        }
        for gateway in ["10.0.2.1", "192.168.1.1", "fd00::1"] {
            let err = user_net_with("10.0.2.15/24", Some(gateway))
                .validate()
                .unwrap_err();
            assert_eq!(
                err,
                SpecError::UserNetGateway {
                    gateway: gateway.into()
                }
            );
            assert!(err.to_string().contains("--gateway 10.0.2.2"), "{err}");
        }
        // Malformed values are the seed's to name; TAP keeps any address.
        user_net_with("not-an-address", None).validate().unwrap();
        let mut tap = user_net_with("192.168.1.5/24", Some("192.168.1.1"));
        tap.network = NetworkSpec::Tap {
            bridge: "br0".into(),
        };
        tap.validate().unwrap();
    }

    #[test]
    fn every_image_source_round_trips() {
        for image in [
            ImageSource::Default,
            ImageSource::Kernel {
                kernel: "/k".into(),
                initramfs: Some("/i".into()),
                cmdline: None,
            },
            ImageSource::Disk {
                name: "debian-12".into(),
            },
            ImageSource::Oci {
                reference: "alpine:3.20".into(),
            },
            ImageSource::Bundle {
                id: "fc-ubuntu".into(),
            },
        ] {
            let mut spec = VmSpec::new("x");
            spec.image = image;
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
        }
    }
}

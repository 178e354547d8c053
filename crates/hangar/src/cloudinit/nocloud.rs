//! The files of a cloud-init NoCloud seed: `meta-data` (instance-id,
//! local-hostname, public-keys), `user-data` (the user's own, or a
//! cloud-config Hangar writes for `--user`/`--ssh-key`/a password) and
//! `network-config` v2 when the VM has a static address. Every value is
//! validated and serialized as YAML by serde, never pasted into text.

use std::net::IpAddr;

use serde::Serialize;

use crate::spec::{CloudInitSpec, StaticNetwork};

/// The user Hangar creates when the spec names none.
pub const DEFAULT_USER: &str = "hangar";
/// cloud-init's NoCloud label.
pub const VOLUME_ID: &str = "cidata";
const MAX_USER_DATA: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeedError {
    #[error("cloud-init {field} {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error(transparent)]
    Iso(#[from] super::iso9660::IsoError),
}

fn field(field: &'static str, problem: impl Into<String>) -> SeedError {
    SeedError::Field {
        field,
        problem: problem.into(),
    }
}

/// What goes into one seed: the spec plus what is only known at create
/// (the VM's id and MAC, Hangar's own SSH key, a password never stored).
#[derive(Clone, Debug)]
pub struct SeedInput<'a> {
    pub spec: &'a CloudInitSpec,
    /// Used when the spec gives no instance id.
    pub vm_id: &'a str,
    /// Used when the spec gives no hostname.
    pub vm_name: &'a str,
    pub mac: Option<&'a str>,
    /// Keys authorized besides the spec's (Hangar's per-VM key).
    pub extra_keys: &'a [String],
    pub password: Option<&'a str>,
}

#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: &'a str,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
    #[serde(rename = "public-keys", skip_serializing_if = "Vec::is_empty")]
    public_keys: Vec<&'a str>,
}

#[derive(Serialize)]
struct CloudConfig<'a> {
    /// The hostname resolves (sudo and others look it up).
    manage_etc_hosts: bool,
    users: Vec<User<'a>>,
    write_files: Vec<WriteFile>,
    ssh_pwauth: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    chpasswd: Option<Chpasswd<'a>>,
}

#[derive(Serialize)]
struct WriteFile {
    path: &'static str,
    content: &'static str,
}

/// The seed is attached on the first boot only. Without it, a later boot
/// finds no NoCloud source, falls back to another datasource and counts
/// as a new instance: new SSH host keys, per-instance modules again. This
/// file makes cloud-init keep the instance it has.
const KEEP_INSTANCE: WriteFile = WriteFile {
    path: "/etc/cloud/cloud.cfg.d/99-hangar-keep-instance.cfg",
    content: "manual_cache_clean: true\n",
};

#[derive(Serialize)]
struct User<'a> {
    name: &'a str,
    shell: &'static str,
    sudo: &'static str,
    lock_passwd: bool,
    ssh_authorized_keys: Vec<&'a str>,
}

#[derive(Serialize)]
struct Chpasswd<'a> {
    expire: bool,
    users: Vec<PasswordEntry<'a>>,
}

#[derive(Serialize)]
struct PasswordEntry<'a> {
    name: &'a str,
    password: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The three files, validated.
pub fn seed_files(input: &SeedInput) -> Result<Vec<(&'static str, Vec<u8>)>, SeedError> {
    let spec = input.spec;
    let instance_id = spec.instance_id.as_deref().unwrap_or(input.vm_id);
    check_instance_id(instance_id)?;
    let hostname = spec.hostname.as_deref().unwrap_or(input.vm_name);
    check_hostname(hostname)?;
    let mut keys: Vec<&str> = Vec::new();
    for key in spec.ssh_authorized_keys.iter().chain(input.extra_keys) {
        check_ssh_key(key)?;
        keys.push(key.trim());
    }
    let user_data = match &spec.user_data {
        Some(raw) => {
            check_user_data(raw)?;
            if spec.user.is_some() || input.password.is_some() {
                return Err(field(
                    "user-data",
                    "is your own: set the user and password in it (a user or password flag cannot be merged into it)",
                ));
            }
            raw.clone().into_bytes()
        }
        None => {
            let name = spec.user.as_deref().unwrap_or(DEFAULT_USER);
            check_user(name)?;
            if let Some(password) = input.password {
                if password.is_empty() || password.chars().any(|c| c.is_control()) {
                    return Err(field("password", "must be one line, not empty"));
                }
            }
            let config = CloudConfig {
                manage_etc_hosts: true,
                users: vec![User {
                    name,
                    shell: "/bin/bash",
                    sudo: "ALL=(ALL) NOPASSWD:ALL",
                    lock_passwd: input.password.is_none(),
                    ssh_authorized_keys: keys.clone(),
                }],
                write_files: vec![KEEP_INSTANCE],
                ssh_pwauth: input.password.is_some(),
                chpasswd: input.password.map(|password| Chpasswd {
                    expire: false,
                    users: vec![PasswordEntry {
                        name,
                        password,
                        kind: "text",
                    }],
                }),
            };
            let yaml =
                serde_yaml::to_string(&config).map_err(|e| field("user-data", e.to_string()))?;
            format!("#cloud-config\n{yaml}").into_bytes()
        }
    };
    // With the user's own user-data the keys go to the image's default
    // user, through the meta-data.
    let meta = MetaData {
        instance_id,
        local_hostname: hostname,
        public_keys: if spec.user_data.is_some() {
            keys
        } else {
            Vec::new()
        },
    };
    let meta = serde_yaml::to_string(&meta).map_err(|e| field("meta-data", e.to_string()))?;
    let mut files = vec![("meta-data", meta.into_bytes()), ("user-data", user_data)];
    if let Some(network) = &spec.network {
        files.push(("network-config", network_config(network, input.mac)?));
    }
    Ok(files)
}

/// The seed as an ISO 9660 image.
pub fn seed_image(input: &SeedInput) -> Result<Vec<u8>, SeedError> {
    let files = seed_files(input)?;
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    Ok(super::iso9660::build(VOLUME_ID, &refs, chrono::Utc::now())?)
}

#[derive(Serialize)]
struct NetworkConfig<'a> {
    version: u8,
    ethernets: std::collections::BTreeMap<&'static str, Ethernet<'a>>,
}

#[derive(Serialize)]
struct Ethernet<'a> {
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    match_: Option<MacMatch<'a>>,
    #[serde(rename = "set-name", skip_serializing_if = "Option::is_none")]
    set_name: Option<&'static str>,
    addresses: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nameservers: Option<Nameservers>,
}

#[derive(Serialize)]
struct MacMatch<'a> {
    macaddress: &'a str,
}

#[derive(Serialize)]
struct Route {
    to: &'static str,
    via: String,
}

#[derive(Serialize)]
struct Nameservers {
    addresses: Vec<String>,
}

fn network_config(network: &StaticNetwork, mac: Option<&str>) -> Result<Vec<u8>, SeedError> {
    let (address, prefix) = network.address.split_once('/').ok_or_else(|| {
        field(
            "address",
            format!(
                "{:?} needs a prefix length, e.g. 10.0.2.15/24",
                network.address
            ),
        )
    })?;
    let ip: IpAddr = address
        .parse()
        .map_err(|_| field("address", format!("{address:?} is not an IP address")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| field("address", format!("prefix /{prefix} is not 0-{max}")))?;
    let mut routes = Vec::new();
    if let Some(gateway) = &network.gateway {
        let gateway: IpAddr = gateway
            .parse()
            .map_err(|_| field("gateway", format!("{gateway:?} is not an IP address")))?;
        routes.push(Route {
            // cloud-init 22.4 (Debian bookworm) rejects `to: default`
            // ("not a valid ip network"): spell the default route out.
            to: if gateway.is_ipv4() {
                "0.0.0.0/0"
            } else {
                "::/0"
            },
            via: gateway.to_string(),
        });
    }
    let mut dns = Vec::new();
    for server in &network.dns {
        let server: IpAddr = server
            .parse()
            .map_err(|_| field("dns", format!("{server:?} is not an IP address")))?;
        dns.push(server.to_string());
    }
    let ethernet = Ethernet {
        match_: mac.map(|macaddress| MacMatch { macaddress }),
        set_name: mac.map(|_| "eth0"),
        addresses: vec![format!("{ip}/{prefix}")],
        routes,
        nameservers: (!dns.is_empty()).then_some(Nameservers { addresses: dns }),
    };
    let config = NetworkConfig {
        version: 2,
        ethernets: [("eth0", ethernet)].into_iter().collect(),
    };
    serde_yaml::to_string(&config)
        .map(String::into_bytes)
        .map_err(|e| field("network-config", e.to_string()))
}

fn check_instance_id(id: &str) -> Result<(), SeedError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    ok.then_some(()).ok_or_else(|| {
        field(
            "instance-id",
            format!("{id:?} must be 1-128 of letters, digits, '.', '_' and '-'"),
        )
    })
}

/// RFC 1123 host names: dot-separated labels of letters, digits and '-'.
fn check_hostname(name: &str) -> Result<(), SeedError> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    (name.len() <= 253 && name.split('.').all(label_ok))
        .then_some(())
        .ok_or_else(|| {
            field(
                "hostname",
                format!("{name:?} is not a valid host name (letters, digits and '-' in dot-separated labels of at most 63); set one with --hostname"),
            )
        })
}

fn check_user(name: &str) -> Result<(), SeedError> {
    let mut chars = name.chars();
    let ok = name.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    ok.then_some(()).ok_or_else(|| {
        field(
            "user",
            format!(
                "{name:?} must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter or '_'"
            ),
        )
    })
}

fn check_ssh_key(key: &str) -> Result<(), SeedError> {
    let key = key.trim();
    let kinds = [
        "ssh-ed25519 ",
        "ssh-rsa ",
        "ecdsa-sha2-",
        "sk-ssh-ed25519@",
        "sk-ecdsa-sha2-",
    ];
    let ok = key.len() <= 16 * 1024
        && !key.chars().any(|c| c.is_control())
        && kinds.iter().any(|kind| key.starts_with(kind));
    ok.then_some(()).ok_or_else(|| {
        field(
            "ssh key",
            "must be one OpenSSH public key line (ssh-ed25519 AAAA..., ssh-rsa ..., ecdsa-sha2-...): pass the .pub file",
        )
    })
}

fn check_user_data(raw: &str) -> Result<(), SeedError> {
    if raw.len() > MAX_USER_DATA {
        return Err(field("user-data", "is over 16 MiB"));
    }
    let first = raw.lines().next().unwrap_or("").trim_end();
    let known = [
        "#cloud-config",
        "#!",
        "#include",
        "#cloud-boothook",
        "#part-handler",
        "## template: jinja",
        "Content-Type:",
        "#cloud-config-archive",
    ];
    if known.iter().any(|header| first.starts_with(header)) {
        return Ok(());
    }
    Err(field(
        "user-data",
        format!("starts with {first:?}; cloud-init would ignore it (begin with #cloud-config, #! or another cloud-init header)"),
    ))
}

#[cfg(test)]
mod tests;

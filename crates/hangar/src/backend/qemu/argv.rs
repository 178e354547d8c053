//! QEMU's command line, built from typed options. Nothing here passes
//! through a shell: each value is one argv element, and paths inside
//! `key=value,...` option strings have their commas doubled as QEMU requires.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::backend::machine::{MachineShape, MEMORY_SLOTS};
use crate::backend::DiskRole;
use crate::record::Accel;

/// Everything QEMU needs for one VM.
#[derive(Clone, Debug)]
pub struct QemuArgs {
    pub name: String,
    pub accel: Accel,
    /// Firmware: qboot when available (fastest to a PVH kernel), else
    /// QEMU's default SeaBIOS.
    pub bios: Option<PathBuf>,
    /// UEFI firmware (OVMF code, read-only) and the VM's own variable
    /// store; None boots with `bios` (or SeaBIOS).
    pub uefi: Option<(PathBuf, PathBuf)>,
    pub cpus: u32,
    /// The RAM the machine boots with (hot-added DIMMs not included).
    pub memory_mib: u64,
    /// Room for more vCPUs and DIMMs, and the DIMMs added (see
    /// [`crate::backend::machine`]); None: a machine of fixed size.
    pub machine: Option<MachineShape>,
    /// A kernel to boot directly; None boots the disks with firmware.
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub qmp_socket: PathBuf,
    /// One socket per agent port, in port order.
    pub agent_sockets: Vec<PathBuf>,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
    /// The guest's vsock context id, when the VM has vsock (vhost-vsock).
    pub vsock_cid: Option<u32>,
    /// User-mode networking, when the VM has a network.
    pub user_net: Option<UserNet>,
    /// The VM's root disk, when it boots an image.
    pub root_disk: Option<Disk>,
    /// A cloud-init seed, after every other disk.
    pub seed: Option<PathBuf>,
    /// More disks, after the root disk.
    pub data_disks: Vec<Disk>,
    /// Guest RAM in a file (see [`MemoryFile`]); None: anonymous memory.
    pub memory_file: Option<MemoryFile>,
    /// Start paused, waiting for a migration stream (`migrate-incoming`).
    pub incoming: bool,
}

/// Guest RAM backed by a file. Shared: the file is the RAM, so a snapshot
/// needs only the device state beside a copy of it. Private: the file is a
/// snapshot's RAM mapped copy-on-write, so VMs restored from one snapshot
/// share its pages until they write them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryFile {
    pub path: PathBuf,
    pub shared: bool,
}

/// A virtio disk.
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    /// "qcow2" or "raw".
    pub format: &'static str,
    pub read_only: bool,
}

/// A virtio NIC on QEMU's user-mode network, with TCP forwards from
/// 127.0.0.1 (never other host addresses).
#[derive(Clone, Debug)]
pub struct UserNet {
    pub mac: String,
    /// The guest's static address (cloud-init `--ip`). None: slirp forwards
    /// to the address its DHCP server hands out (10.0.2.15).
    pub guest_addr: Option<std::net::Ipv4Addr>,
    pub forwards: Vec<crate::spec::PortForward>,
}

/// The memory backend and pc-dimm device of DIMM number `index` (the
/// `-object` and `-device` values; QMP's `object-add` and `device_add`
/// take the same names).
pub fn dimm_options(index: usize, mib: u64) -> (String, String) {
    let (backend, device) = dimm_ids(index);
    (
        format!("memory-backend-ram,id={backend},size={mib}M"),
        format!("pc-dimm,id={device},memdev={backend}"),
    )
}

/// The ids of DIMM number `index`: its memory backend's and its device's.
pub fn dimm_ids(index: usize) -> (String, String) {
    (format!("dimm{index}-ram"), format!("dimm{index}"))
}

/// A disk's drive id on the command line (QMP names drives by it).
pub fn drive_id(role: DiskRole) -> String {
    match role {
        DiskRole::Root => "root".to_owned(),
        DiskRole::Data(index) => format!("data{index}"),
    }
}

/// Doubles commas so a path can sit inside a QEMU option string.
pub fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

impl QemuArgs {
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
        push(&["-name", &self.name]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        let mut machine = format!("q35,accel={}", self.accel);
        if let Some(memory) = &self.memory_file {
            machine.push_str(",memory-backend=ram0");
            let backend = format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share={}",
                self.memory_mib,
                escape(&memory.path),
                if memory.shared { "on" } else { "off" }
            );
            push(&["-object", &backend]);
        }
        push(&["-machine", &machine]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        match &self.uefi {
            Some((code, vars)) => {
                let code = format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    escape(code)
                );
                let vars = format!("if=pflash,format=raw,unit=1,file={}", escape(vars));
                push(&["-drive", &code, "-drive", &vars]);
            }
            None => {
                if let Some(bios) = &self.bios {
                    push(&["-bios", &bios.to_string_lossy()]);
                }
            }
        }
        match &self.machine {
            Some(shape) => {
                let smp = format!("{},maxcpus={}", self.cpus, shape.max_cpus);
                let memory = format!(
                    "{}M,slots={MEMORY_SLOTS},maxmem={}M",
                    self.memory_mib,
                    shape.max_memory.as_mib()
                );
                push(&["-smp", &smp, "-m", &memory]);
                // DIMMs added before a snapshot: a saved state loads only
                // into a machine that has them, under the same names.
                for (index, size) in shape.added_memory.iter().enumerate() {
                    let (backend, device) = dimm_options(index, size.as_mib());
                    push(&["-object", &backend, "-device", &device]);
                }
            }
            None => {
                push(&["-smp", &self.cpus.to_string()]);
                push(&["-m", &format!("{}M", self.memory_mib)]);
            }
        }
        if let Some(kernel) = &self.kernel {
            push(&["-kernel", &kernel.to_string_lossy()]);
            if let Some(initramfs) = &self.initramfs {
                push(&["-initrd", &initramfs.to_string_lossy()]);
            }
            push(&["-append", &self.cmdline]);
        }
        // Serial console: a socket to attach to, mirrored into a log file.
        let console = format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            escape(&self.console_socket),
            escape(&self.console_log)
        );
        push(&["-chardev", &console, "-serial", "chardev:console"]);
        // Agent channels: virtio-serial ports, each bridged to a unix socket.
        push(&["-device", "virtio-serial-pci,id=vser0,max_ports=32"]);
        for (index, socket) in self.agent_sockets.iter().enumerate() {
            let agent = format!(
                "socket,id=agent{index},path={},server=on,wait=off",
                escape(socket)
            );
            let port = format!(
                "virtserialport,bus=vser0.0,chardev=agent{index},name={}",
                hangar_proto::port_name(index as u32)
            );
            push(&["-chardev", &agent, "-device", &port]);
        }
        let qmp = format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(&self.qmp_socket)
        );
        push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
        // Entropy from the host, so nothing in the guest waits for its pool.
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-pci,rng=rng0"]);
        // A guest reboot or panic ends the VMM instead of looping.
        if let Some(disk) = &self.root_disk {
            let mode = if disk.read_only {
                "readonly=on"
            } else {
                "discard=unmap"
            };
            let id = drive_id(DiskRole::Root);
            let drive = format!(
                "file={},format={},if=none,id={id},{mode}",
                escape(&disk.path),
                disk.format
            );
            let device = format!("virtio-blk-pci,drive={id}");
            push(&["-drive", &drive, "-device", &device]);
        }
        for (index, disk) in self.data_disks.iter().enumerate() {
            let mode = if disk.read_only {
                "readonly=on"
            } else {
                "discard=unmap"
            };
            let id = drive_id(DiskRole::Data(index));
            let drive = format!(
                "file={},format={},if=none,id={id},{mode}",
                escape(&disk.path),
                disk.format
            );
            let device = format!("virtio-blk-pci,drive={id}");
            push(&["-drive", &drive, "-device", &device]);
        }
        // The seed last: it is there on the first boot only, and data disks
        // keep their guest names (vdb, vdc...) when it goes.
        if let Some(seed) = &self.seed {
            let drive = format!(
                "file={},format=raw,if=none,id=seed,readonly=on",
                escape(seed)
            );
            push(&["-drive", &drive, "-device", "virtio-blk-pci,drive=seed"]);
        }
        if let Some(net) = &self.user_net {
            let mut netdev = String::from("user,id=net0");
            let guest = net.guest_addr.map(|a| a.to_string()).unwrap_or_default();
            for forward in &net.forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:127.0.0.1:{}-{guest}:{}",
                    forward.host, forward.guest
                ));
            }
            let nic = format!("virtio-net-pci,netdev=net0,mac={}", net.mac);
            push(&["-netdev", &netdev, "-device", &nic]);
        }
        if let Some(cid) = self.vsock_cid {
            push(&["-device", &format!("vhost-vsock-pci,guest-cid={cid}")]);
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        push(&["-no-reboot"]);
        push(&["-daemonize", "-pidfile", &self.pidfile.to_string_lossy()]);
        args.into_iter().map(OsString::from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> QemuArgs {
        QemuArgs {
            name: "web".into(),
            accel: Accel::Tcg,
            bios: Some("/usr/share/qemu/qboot.rom".into()),
            uefi: None,
            cpus: 2,
            memory_mib: 512,
            machine: None,
            kernel: Some("/img/vmlinux".into()),
            initramfs: Some("/img/initramfs.cpio".into()),
            cmdline: "console=ttyS0 quiet".into(),
            qmp_socket: "/s/q,mp.sock".into(),
            agent_sockets: vec!["/s/agent.sock".into(), "/s/agent-1.sock".into()],
            console_socket: "/s/console.sock".into(),
            console_log: "/s/console.log".into(),
            pidfile: "/s/qemu.pid".into(),
            vsock_cid: None,
            user_net: None,
            root_disk: None,
            seed: None,
            data_disks: Vec::new(),
            memory_file: None,
            incoming: false,
        }
    }

    fn joined(args: &QemuArgs) -> String {
        args.to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_machine_with_room_to_grow_has_its_ceilings_and_added_dimms() {
        let mut with = args();
        assert!(joined(&with).contains("-smp 2 -m 512M "));
        let mut shape = MachineShape::for_boot(2, crate::size::ByteSize::mib(512));
        with.machine = Some(shape.clone());
        let plain = joined(&with);
        assert!(
            plain.contains("-smp 2,maxcpus=8 -m 512M,slots=8,maxmem=16384M "),
            "{plain}"
        );
        assert!(!plain.contains("pc-dimm"));
        shape.added_memory = vec![
            crate::size::ByteSize::mib(256),
            crate::size::ByteSize::mib(128),
        ];
        with.machine = Some(shape);
        assert!(joined(&with).contains(
            "-object memory-backend-ram,id=dimm0-ram,size=256M -device pc-dimm,id=dimm0,memdev=dimm0-ram \
             -object memory-backend-ram,id=dimm1-ram,size=128M -device pc-dimm,id=dimm1,memdev=dimm1-ram"
        ));
    }

    #[test]
    fn guest_ram_can_live_in_a_file() {
        let mut with = args();
        with.memory_file = Some(MemoryFile {
            path: "/snap/r,am".into(),
            shared: false,
        });
        with.incoming = true;
        let joined = with
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains("-object memory-backend-file,id=ram0,size=512M,mem-path=/snap/r,,am,share=off -machine q35,accel=tcg,memory-backend=ram0"),
            "{joined}"
        );
        assert!(joined.contains("-incoming defer"));
        assert!(!args().to_argv().iter().any(|a| a == "-incoming"));
    }

    /// The argv of a VM with user networking and one forward of guest 22.
    fn user_net_argv(guest_addr: Option<std::net::Ipv4Addr>) -> Vec<String> {
        let mut with = args();
        with.user_net = Some(UserNet {
            mac: "02:00:00:00:00:01".into(),
            guest_addr,
            forwards: vec![crate::spec::PortForward {
                host: 40022,
                guest: 22,
            }],
        });
        with.to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn user_net_forwards_only_from_loopback() {
        let joined = user_net_argv(None);
        let i = joined.iter().position(|a| a == "-netdev").unwrap();
        assert_eq!(
            joined[i + 1],
            "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"
        );
        assert_eq!(
            joined[i + 3],
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01"
        );
    }

    #[test]
    fn user_net_forwards_to_a_static_guest_address() {
        let joined = user_net_argv(Some(std::net::Ipv4Addr::new(10, 0, 2, 50)));
        let i = joined.iter().position(|a| a == "-netdev").unwrap();
        assert_eq!(
            joined[i + 1],
            "user,id=net0,hostfwd=tcp:127.0.0.1:40022-10.0.2.50:22"
        );
    }

    #[test]
    fn vsock_adds_a_vhost_device_with_the_cid() {
        let mut with = args();
        with.vsock_cid = Some(1234);
        let joined: Vec<String> = with
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let i = joined
            .iter()
            .position(|a| a == "vhost-vsock-pci,guest-cid=1234")
            .unwrap();
        assert_eq!(joined[i - 1], "-device");
        assert!(!args()
            .to_argv()
            .iter()
            .any(|a| a.to_string_lossy().contains("vsock")));
    }

    #[test]
    fn argv_is_typed_and_escaped() {
        let argv: Vec<String> = args()
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = argv.join(" ");
        assert!(joined.contains("-machine q35,accel=tcg"));
        assert!(joined.contains("-smp 2 -m 512M"));
        assert!(joined.contains("path=/s/q,,mp.sock"), "{joined}");
        assert!(
            joined.contains("chardev=agent1,name=org.hangar.agent.1"),
            "{joined}"
        );
        // The cmdline stays one argument, spaces and all.
        let i = argv.iter().position(|a| a == "-append").unwrap();
        assert_eq!(argv[i + 1], "console=ttyS0 quiet");
        assert!(!joined.contains("-cpu host"));
    }

    #[test]
    fn a_read_only_root_is_attached_read_only() {
        let mut with = args();
        with.root_disk = Some(Disk {
            path: "/b/root,fs".into(),
            format: "raw",
            read_only: true,
        });
        let argv: Vec<String> = with
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(
            argv.contains(&"file=/b/root,,fs,format=raw,if=none,id=root,readonly=on".to_owned())
        );
    }

    #[test]
    fn a_disk_image_boots_with_firmware_and_its_disks() {
        let mut disk = args();
        disk.kernel = None;
        disk.bios = None;
        disk.uefi = Some(("/ovmf/CODE.fd".into(), "/vm/VARS.fd".into()));
        disk.data_disks = vec![Disk {
            path: "/data/d.raw".into(),
            format: "raw",
            read_only: true,
        }];
        let argv: Vec<String> = disk
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = argv.join(" ");
        assert!(
            !joined.contains("-kernel") && !joined.contains("-append") && !joined.contains("-bios")
        );
        assert!(joined.contains("-drive if=pflash,format=raw,unit=0,readonly=on,file=/ovmf/CODE.fd -drive if=pflash,format=raw,unit=1,file=/vm/VARS.fd"), "{joined}");
        assert!(joined.contains("file=/data/d.raw,format=raw,if=none,id=data0,readonly=on -device virtio-blk-pci,drive=data0"), "{joined}");
    }

    #[test]
    fn data_disks_come_before_the_seed() {
        // The seed goes after the first boot: disks before it would be
        // renamed in the guest (vdc -> vdb) on the next one.
        let mut disk = args();
        disk.root_disk = Some(Disk {
            path: "/vm/root.qcow2".into(),
            format: "qcow2",
            read_only: false,
        });
        disk.seed = Some("/vm/seed.iso".into());
        disk.data_disks = vec![Disk {
            path: "/data/d.qcow2".into(),
            format: "qcow2",
            read_only: false,
        }];
        let joined = disk
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        let (root, data, seed) = (
            joined.find("drive=root").unwrap(),
            joined.find("drive=data0").unwrap(),
            joined.find("drive=seed").unwrap(),
        );
        assert!(root < data && data < seed, "{joined}");
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut kvm = args();
        kvm.accel = Accel::Kvm;
        let joined: Vec<String> = kvm
            .to_argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(joined
            .join(" ")
            .contains("-machine q35,accel=kvm -cpu host"));
    }
}

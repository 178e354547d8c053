//! The QEMU backend: argv from typed options, a daemonized process tracked
//! by pid and start time, QMP for status and power, and the shutdown ladder.

pub mod accel;
pub mod argv;
pub mod qmp;
pub mod snapshot;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process;
use super::{
    Backend, BackendError, GuestMemory, LaunchPlan, Launched, Pausable, Snapshotting, StopOutcome,
    StopRequest, VmmStatus,
};
use crate::guest::AgentEndpoint;
use crate::record::{BackendKind, Sockets, VmRecord};
use crate::spec::{ImageSource, NetworkSpec, VmSpec};
use argv::{QemuArgs, UserNet};
use qmp::{QmpClient, QmpCommand};

/// How long QEMU may take to initialise and daemonize.
pub const DAEMONIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// After `system_powerdown`, how long the guest's ACPI handling gets.
pub const ACPI_TIMEOUT: Duration = Duration::from_secs(3);
/// After SIGTERM, how long QEMU gets to exit.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(5);
/// After SIGKILL, how long until we call the process unkillable.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest path a unix socket address holds (sun_path minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where Debian puts qboot, the minimal firmware that boots a PVH kernel
/// fastest.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// The host device QEMU's vhost-vsock needs.
const VHOST_VSOCK: &str = "/dev/vhost-vsock";

/// A random guest context id for vsock. 0-2 are reserved (hypervisor,
/// local, host) and `u32::MAX` means "any"; a CID already held by another
/// VM on this host makes QEMU fail at start with that reason, which at
/// four billion choices is not worth a registry.
fn new_vsock_cid() -> std::io::Result<u32> {
    let mut bytes = [0u8; 4];
    getrandom::getrandom(&mut bytes).map_err(std::io::Error::other)?;
    Ok(3 + u32::from_le_bytes(bytes) % (u32::MAX - 4))
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    binary: PathBuf,
}

impl Default for QemuBackend {
    fn default() -> Self {
        let binary = std::env::var_os("HANGAR_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        Self { binary }
    }
}

impl QemuBackend {
    pub fn with_binary(binary: PathBuf) -> Self {
        Self { binary }
    }

    /// The QEMU binary as found on PATH (or the explicit path), if any.
    pub fn resolve_binary(&self) -> Result<PathBuf, BackendError> {
        let missing = || BackendError::BinaryMissing {
            binary: self.binary.display().to_string(),
            package: "qemu-system-x86".into(),
        };
        if self.binary.components().count() > 1 {
            return is_executable(&self.binary)
                .then(|| self.binary.clone())
                .ok_or_else(missing);
        }
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join(&self.binary))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(missing)
    }

    /// qboot if installed, else QEMU's default firmware.
    pub fn bios(&self) -> Option<PathBuf> {
        Path::new(QBOOT).is_file().then(|| PathBuf::from(QBOOT))
    }

    fn qmp(&self, vm: &VmRecord) -> Result<QmpClient, BackendError> {
        let socket = vm
            .sockets
            .qmp
            .clone()
            .unwrap_or_else(|| vm.work_dir.join("qmp.sock"));
        QmpClient::connect(&socket)
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The sockets and files of a VM's work dir.
pub fn sockets_for(work_dir: &Path) -> Sockets {
    Sockets {
        qmp: Some(work_dir.join("qmp.sock")),
        agent: Some(work_dir.join("agent.sock")),
        agent_extra: (1..hangar_proto::AGENT_PORTS)
            .map(|i| work_dir.join(format!("agent-{i}.sock")))
            .collect(),
        console: Some(work_dir.join("console.sock")),
        console_log: Some(work_dir.join("console.log")),
        agent_vsock: None,
        vsock_token: None,
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn check(&self, spec: &VmSpec) -> Result<(), BackendError> {
        self.resolve_binary()?;
        let unsupported = |what: &str, why: &str| BackendError::Unsupported {
            backend: BackendKind::Qemu,
            what: what.into(),
            why: why.into(),
        };
        if matches!(spec.image, ImageSource::Kernel { .. }) {
            return Err(unsupported(
                "boot a kernel of your own",
                "not implemented yet; use a base-image bundle (`hangar image add --manifest`)",
            ));
        }
        if matches!(spec.network, NetworkSpec::Tap { .. }) {
            return Err(unsupported(
                "attach a TAP device",
                "TAP networking is not implemented yet; use user-mode networking (--network user)",
            ));
        }
        if !spec.shared_dirs.is_empty() {
            return Err(unsupported("share host directories", "not implemented yet"));
        }
        if spec.vsock && !Path::new(VHOST_VSOCK).exists() {
            return Err(unsupported(
                "give the VM vsock",
                "this host has no /dev/vhost-vsock (load the vhost_vsock module); or leave vsock off: the agent works over virtio-serial",
            ));
        }
        Ok(())
    }

    fn launch(&self, vm: &VmRecord, plan: &LaunchPlan) -> Result<Launched, BackendError> {
        let binary = self.resolve_binary()?;
        let sockets = sockets_for(&vm.work_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BackendError::Io { path, source }
        };
        let mut paths = Vec::new();
        let agent_sockets = sockets.agent_sockets();
        for socket in [&sockets.qmp, &sockets.console]
            .into_iter()
            .flatten()
            .chain(&agent_sockets)
        {
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(BackendError::SocketPathTooLong {
                    path: socket.clone(),
                    len,
                });
            }
            // A socket left by an earlier run would make QEMU fail to bind.
            let _ = std::fs::remove_file(socket);
            paths.push(socket.clone());
        }
        let pidfile = vm.work_dir.join("qemu.pid");
        let _ = std::fs::remove_file(&pidfile);
        // One log per boot: the previous boot's log moves aside, so lines of
        // an earlier run are never read as this run's.
        if let Some(log) = &sockets.console_log {
            let _ = std::fs::rename(log, log.with_extension("log.1"));
            // Created here so it is 0600; QEMU appends to it.
            crate::fsutil::create_private(log).map_err(io(log))?;
        }
        let vsock_cid = if vm.spec.vsock {
            Some(new_vsock_cid().map_err(io(Path::new(VHOST_VSOCK)))?)
        } else {
            None
        };
        let mut sockets = sockets;
        sockets.agent_vsock = vsock_cid.map(|cid| AgentEndpoint::Vsock {
            cid,
            port: hangar_proto::AGENT_VSOCK_PORT,
        });
        sockets.vsock_token = vsock_cid.map(|_| vm.work_dir.join("vsock.token"));
        let forwards = match &vm.spec.network {
            NetworkSpec::User { forwards } => Some(forwards.as_slice()),
            _ => None,
        };
        // qboot boots a kernel fastest but cannot boot a disk; SeaBIOS
        // (QEMU's default) or OVMF do that.
        let uefi = match (&plan.kernel, vm.spec.uefi) {
            (None, true) => Some(uefi_firmware(&vm.work_dir)?),
            _ => None,
        };
        let mut args = QemuArgs {
            name: vm.name.clone(),
            accel: plan.accel,
            bios: plan.kernel.as_ref().and_then(|_| self.bios()),
            uefi,
            cpus: plan.cpus,
            memory_mib: plan.memory.as_mib(),
            machine: plan.machine.clone(),
            kernel: plan.kernel.clone(),
            initramfs: plan.initramfs.clone(),
            cmdline: plan.cmdline.clone(),
            qmp_socket: paths[0].clone(),
            console_socket: paths[1].clone(),
            agent_sockets,
            console_log: sockets.console_log.clone().unwrap_or_default(),
            pidfile: pidfile.clone(),
            vsock_cid,
            user_net: None,
            root_disk: match &plan.root_disk {
                Some(disk) if disk.read_only => Some(argv::Disk {
                    path: disk.base.clone(),
                    format: disk.format.as_str(),
                    read_only: true,
                }),
                Some(disk) => Some(argv::Disk {
                    path: root_overlay(disk, &vm.root_layer_path(), vm.root_layer.is_some())?,
                    format: "qcow2",
                    read_only: false,
                }),
                None => None,
            },
            seed: plan.seed.clone(),
            data_disks: data_disks(vm)?,
            memory_file: memory_file(&plan.guest_memory, &vm.work_dir)?,
            incoming: plan.incoming,
        };
        let log_path = vm.work_dir.join("qemu.log");
        let mut ports = Vec::new();
        for attempt in 1..=PORT_ATTEMPTS {
            if let Some(forwards) = forwards {
                ports = crate::net::assign_ports(forwards).map_err(io(Path::new("127.0.0.1")))?;
                args.user_net = Some(UserNet {
                    mac: vm
                        .mac
                        .clone()
                        .or_else(|| crate::net::mac_for(&vm.id))
                        .unwrap_or_default(),
                    guest_addr: static_ipv4(vm),
                    forwards: ports.clone(),
                });
            }
            crate::trace::phase("qemu: spawning");
            match spawn_daemonized(&binary, &args, &vm.work_dir, &log_path) {
                Ok(()) => break,
                // A free port taken by someone else between our check and
                // QEMU's bind: pick again.
                Err(BackendError::Launch { detail, .. })
                    if attempt < PORT_ATTEMPTS
                        && detail.contains("host forwarding")
                        && forwards.is_some_and(|f| f.iter().any(|p| p.host == 0)) => {}
                Err(err) => return Err(err),
            }
        }
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .map_err(io(&pidfile))?
            .trim()
            .parse()
            .map_err(|_| BackendError::Launch {
                what: "reading QEMU's pidfile".into(),
                detail: format!("{} holds no pid", pidfile.display()),
            })?;
        // QEMU binds its sockets under its umask; they control the VM.
        for socket in &paths {
            let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Launched {
            pid: Some(pid),
            pid_start_time: process::start_time(pid),
            sockets,
            ports,
        })
    }

    fn status(&self, vm: &VmRecord) -> VmmStatus {
        let Some(pid) = vm.pid else {
            return VmmStatus::Gone;
        };
        if !process::is_alive(pid, vm.pid_start_time) {
            return VmmStatus::Gone;
        }
        match self.qmp(vm).and_then(|mut qmp| qmp.query_status()) {
            Ok(status) if !status.running && status.status == "paused" => VmmStatus::Paused,
            Ok(_) => VmmStatus::Running,
            Err(_) => VmmStatus::Unknown,
        }
    }

    fn stop(&self, vm: &VmRecord, request: StopRequest) -> Result<StopOutcome, BackendError> {
        let Some(pid) = vm.pid else {
            return Ok(StopOutcome::AlreadyGone);
        };
        let started = vm.pid_start_time;
        if !process::is_alive(pid, started) {
            return Ok(StopOutcome::AlreadyGone);
        }
        if request.guest_asked && process::wait_gone(pid, started, request.timeout) {
            return Ok(StopOutcome::GuestPowerOff);
        }
        if let Ok(mut qmp) = self.qmp(vm) {
            let _ = qmp.execute(QmpCommand::SystemPowerdown);
            let wait = if request.guest_asked {
                ACPI_TIMEOUT
            } else {
                request.timeout.max(ACPI_TIMEOUT)
            };
            if process::wait_gone(pid, started, wait) {
                return Ok(StopOutcome::AcpiPowerdown);
            }
        }
        process::signal(pid, started, Signal::SIGTERM);
        if process::wait_gone(pid, started, TERM_TIMEOUT) {
            return Ok(StopOutcome::Terminated);
        }
        process::signal(pid, started, Signal::SIGKILL);
        if process::wait_gone(pid, started, KILL_TIMEOUT) {
            return Ok(StopOutcome::Killed);
        }
        Err(BackendError::Unkillable {
            pid,
            timeout: KILL_TIMEOUT,
        })
    }

    fn kill(&self, vm: &VmRecord, signal: Signal) -> Result<(), BackendError> {
        if let Some(pid) = vm.pid {
            process::signal(pid, vm.pid_start_time, signal);
        }
        Ok(())
    }

    fn as_pausable(&self) -> Option<&dyn Pausable> {
        Some(self)
    }

    fn as_snapshotting(&self) -> Option<&dyn Snapshotting> {
        Some(self)
    }
}

/// Guest RAM: the VM's own shared file (new for each boot, 0600: it holds
/// the guest's memory), or a snapshot's file mapped privately.
fn memory_file(
    memory: &GuestMemory,
    work_dir: &Path,
) -> Result<Option<argv::MemoryFile>, BackendError> {
    match memory {
        GuestMemory::Own => {
            let path = snapshot::ram_path(work_dir);
            let _ = std::fs::remove_file(&path);
            crate::fsutil::create_private(&path).map_err(|source| BackendError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(Some(argv::MemoryFile { path, shared: true }))
        }
        GuestMemory::Snapshot(path) => Ok(Some(argv::MemoryFile {
            path: path.clone(),
            shared: false,
        })),
    }
}

impl Pausable for QemuBackend {
    fn pause(&self, vm: &VmRecord) -> Result<(), BackendError> {
        self.qmp(vm)?.execute(QmpCommand::Stop).map(drop)
    }

    fn resume(&self, vm: &VmRecord) -> Result<(), BackendError> {
        self.qmp(vm)?.execute(QmpCommand::Cont).map(drop)
    }
}

/// The static IPv4 address the VM's seed gives it (`--ip`), which slirp
/// must forward to instead of its DHCP address.
fn static_ipv4(vm: &VmRecord) -> Option<std::net::Ipv4Addr> {
    let network = vm.spec.cloud_init.as_ref()?.network.as_ref()?;
    match network.ip_and_prefix()? {
        (std::net::IpAddr::V4(ip), _) => Some(ip),
        (std::net::IpAddr::V6(_), _) => None,
    }
}

/// The VM's copy-on-write overlay of `base`, made on its first start and
/// kept across restarts (like a container's writable layer).
fn root_overlay(
    disk: &crate::backend::RootDisk,
    layer: &Path,
    recorded: bool,
) -> Result<PathBuf, BackendError> {
    if !layer.is_file() {
        if recorded {
            return Err(missing_layer("the root disk", layer));
        }
        let backing = (disk.base.as_path(), disk.format.as_str());
        new_layer(layer, Some(backing), disk.size, "the root disk overlay")?;
    }
    Ok(layer.to_path_buf())
}

/// A layer the record names (a snapshot made it) is gone: making a new
/// one would silently give the guest an older disk.
fn missing_layer(disk: &str, layer: &Path) -> BackendError {
    BackendError::Launch {
        what: format!("{disk}'s writable layer"),
        detail: format!(
            "{} is missing (removed behind hangar's back); the VM's later writes are lost, so hangar does not start it on an older disk: remove the VM (`hangar rm`) and restore it from a snapshot",
            layer.display()
        ),
    }
}

/// Makes a qcow2 file at `path` (private to the user): on `backing` (its
/// file and format) or empty, of `size` bytes (else the backing's size).
fn new_layer(
    path: &Path,
    backing: Option<(&Path, &str)>,
    size: Option<u64>,
    what: &str,
) -> Result<(), BackendError> {
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", "qcow2"]);
    if let Some((file, format)) = backing {
        command.args(["-F", format, "-b"]).arg(file);
    }
    command.arg(path);
    if let Some(size) = size {
        command.arg(size.to_string());
    }
    let output = command.output().map_err(|err| BackendError::Launch {
        what: "qemu-img (install qemu-utils)".into(),
        detail: err.to_string(),
    })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(BackendError::Launch {
            what: format!("creating {what}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(())
}

/// Debian's OVMF (package `ovmf`): the firmware, and the template of the
/// variable store each VM gets a copy of (as vm-manager does).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The OVMF code and this VM's variable store (copied once, kept across
/// restarts so boot entries persist).
fn uefi_firmware(work_dir: &Path) -> Result<(PathBuf, PathBuf), BackendError> {
    let missing = || BackendError::Launch {
        what: "UEFI firmware".into(),
        detail: format!("{OVMF_CODE} is missing; install it with `apt-get install ovmf`"),
    };
    if !Path::new(OVMF_CODE).is_file() || !Path::new(OVMF_VARS).is_file() {
        return Err(missing());
    }
    let vars = work_dir.join("OVMF_VARS.fd");
    if !vars.is_file() {
        let template = std::fs::read(OVMF_VARS).map_err(|source| BackendError::Io {
            path: OVMF_VARS.into(),
            source,
        })?;
        crate::fsutil::write_private(&vars, &template).map_err(|source| BackendError::Io {
            path: vars.clone(),
            source,
        })?;
    }
    Ok((PathBuf::from(OVMF_CODE), vars))
}

/// The VM's data disks: new ones made once in its work dir (qcow2 of the
/// asked size, or on the snapshot's frozen layer for a restored VM), host
/// files attached as they are (format detected; a qcow2 naming a backing
/// file is refused).
fn data_disks(vm: &VmRecord) -> Result<Vec<argv::Disk>, BackendError> {
    let mut disks = Vec::new();
    for (index, spec) in vm.spec.data_disks.iter().enumerate() {
        let disk = match (&spec.path, spec.size) {
            (Some(path), _) => {
                let detected =
                    crate::image::disk::detect_file(path).map_err(|err| BackendError::Launch {
                        what: format!("data disk {}", path.display()),
                        detail: err.to_string(),
                    })?;
                argv::Disk {
                    path: path.clone(),
                    format: detected.format.as_str(),
                    read_only: spec.read_only,
                }
            }
            (None, Some(size)) => {
                let path = vm.data_layer_path(index);
                if !path.is_file() {
                    if vm.data_layers.contains_key(&index) {
                        return Err(missing_layer(&format!("data disk {index}"), &path));
                    }
                    // A restored VM's disk sits on the snapshot's frozen
                    // layer; a new one starts empty.
                    let frozen = vm.boot.as_ref().and_then(|b| b.data_disks.get(index));
                    let backing = frozen.map(|disk| (disk.path.as_path(), disk.format.as_str()));
                    let size = frozen.is_none().then_some(size.0);
                    new_layer(&path, backing, size, &format!("data disk {index}"))?;
                }
                argv::Disk {
                    path,
                    format: "qcow2",
                    read_only: spec.read_only,
                }
            }
            (None, None) => continue, // refused by the spec's validation
        };
        disks.push(disk);
    }
    Ok(disks)
}

/// How often a start picks new free ports when one was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// Runs QEMU with `-daemonize` and waits for its first process to exit:
/// success once QEMU is initialised, else its log says why.
fn spawn_daemonized(
    binary: &Path,
    args: &QemuArgs,
    work_dir: &Path,
    log_path: &Path,
) -> Result<(), BackendError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackendError::Io { path, source }
    };
    let log = crate::fsutil::create_private(log_path).map_err(io(log_path))?;
    let mut child = Command::new(binary)
        .args(args.to_argv())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .current_dir(work_dir)
        .spawn()
        .map_err(|err| BackendError::Launch {
            what: format!("starting {}", binary.display()),
            detail: err.to_string(),
        })?;
    // Waited for on a thread of its own: the parent exits the moment QEMU
    // is initialised, and a restore's time counts every millisecond a
    // polling loop would add.
    let pid = child.id();
    // Named by start time too: the waiter may reap it just before a kill.
    let started = process::start_time(pid);
    let (sender, exited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = sender.send(child.wait());
    });
    let status = match exited.recv_timeout(DAEMONIZE_TIMEOUT) {
        Ok(status) => {
            let _ = waiter.join();
            status
        }
        Err(_) => {
            process::signal(pid, started, Signal::SIGKILL);
            let _ = waiter.join();
            match exited.try_recv() {
                // It finished right at the deadline, before the kill.
                Ok(Ok(status)) if status.success() => Ok(status),
                _ => {
                    return Err(BackendError::Launch {
                        what: "QEMU initialisation".into(),
                        detail: format!("did not finish within {DAEMONIZE_TIMEOUT:?}"),
                    })
                }
            }
        }
    };
    let status = status.map_err(io(binary))?;
    if status.success() {
        return Ok(());
    }
    let detail = std::fs::read_to_string(log_path).unwrap_or_default();
    Err(BackendError::Launch {
        what: "QEMU".into(),
        detail: format!("exited with {status}: {}", detail.trim()),
    })
}

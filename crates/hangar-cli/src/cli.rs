//! Command-line types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Boot, run commands in and destroy real VMs"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// State directory (default: $HANGAR_HOME, /var/lib/hangar for root,
    /// else ~/.local/share/hangar).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Accelerator: kvm, tcg, or auto (probe whether KVM really runs a guest).
    #[arg(
        long,
        global = true,
        value_name = "ACCEL",
        env = "HANGAR_ACCEL",
        default_value = "auto"
    )]
    pub accel: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM, run a command in it, print its output, remove the VM.
    Run(RunArgs),
    /// Record a new VM without starting it.
    Create(CreateArgs),
    /// Boot a VM and wait until its guest agent is ready.
    Start(VmArg),
    /// Stop a VM: guest power-off, then ACPI, SIGTERM, SIGKILL.
    Stop(StopArgs),
    /// Remove VMs.
    Rm(RmArgs),
    /// Send a signal to a VM's VMM process (default SIGKILL).
    Kill(KillArgs),
    /// Stop a VM if it runs, then start it.
    Restart(StopArgs),
    /// Stop a VM's vCPUs (memory stays).
    Pause(VmArg),
    /// Continue a paused VM.
    Resume(VmArg),
    /// Wait until a VM reaches a state.
    Wait(WaitArgs),
    /// List VMs.
    #[command(alias = "ls")]
    Ps(PsArgs),
    /// Show a VM's record as JSON.
    Inspect(VmArg),
    /// Attach to a VM's serial console (detach with Ctrl-]).
    Console(VmArg),
    /// Print a VM's serial console log.
    Logs(LogsArgs),
    /// Run a command in a running VM.
    Exec(ExecArgs),
    /// SSH into a VM booted from a disk image: a shell (through the ssh
    /// client, with the VM's key and recorded host key), or `-- CMD`.
    Ssh(SshArgs),
    /// Copy files between the host and a VM: `cp SRC VM:DST` or
    /// `cp VM:SRC DST` (directories, modes and symlinks kept).
    Cp(CpArgs),
    /// Clean up after crashes: orphan VMM processes and work dirs, VMs of
    /// `run`s that died, interrupted starts and stops.
    Gc,
    /// Bring up the VMs of a file (create, start, provision what changed).
    Up(UpArgs),
    /// Remove the VMs a file's `up` made.
    Down(UpArgs),
    /// Show what this host offers: accelerator, default image, state dir.
    Info,
    /// Pull an image from a registry (127.0.0.1/localhost over HTTP).
    Pull(PullArgs),
    /// OCI images: import, ls, inspect, rm, gc.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Snapshots of running VMs: create, ls, inspect, rm, export, import.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Start a VM from a snapshot, ready for exec, with a new identity.
    Restore(RestoreArgs),
    /// Start N VMs from one snapshot (memory shared copy-on-write), each
    /// with a new identity.
    Fork(ForkArgs),
    /// Write the guest agent (a static x86_64 binary) to a file, to put in
    /// a disk image and run as a service (see contrib/hangar-agent.service).
    Agent(AgentArgs),
    /// Measure performance against baselines from the same run.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ResourceArgs {
    /// Image to boot ("default": the embedded Debian kernel + agent initramfs).
    #[arg(long, default_value = "default")]
    pub image: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = hangar::spec::DEFAULT_CPUS)]
    pub cpus: u32,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Namespace (a group of VMs).
    #[arg(long, short = 'n', default_value = hangar::spec::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Extra kernel command-line argument (repeatable).
    #[arg(long = "kernel-arg", value_name = "ARG")]
    pub kernel_args: Vec<String>,
    /// Network: "none" (the default) or "user" (QEMU user-mode networking:
    /// the guest reaches out through the host, 10.0.2.15/24).
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,
    /// Forward a TCP port from 127.0.0.1 to the guest: HOST:GUEST, or
    /// GUEST alone for a free host port (see `inspect`). Implies
    /// --network user. Repeatable.
    #[arg(long = "publish", short = 'p', value_name = "[HOST:]GUEST")]
    pub publish: Vec<String>,
    /// Give the VM a vsock device; the agent then also answers over vsock
    /// (QEMU needs /dev/vhost-vsock on the host).
    #[arg(long)]
    pub vsock: bool,
    #[command(flatten)]
    pub cloud_init: CloudInitArgs,
    /// Root disk size for a disk image, e.g. 10G (its overlay grows to it).
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    /// The user Hangar logs in as over SSH (disk images; default: the
    /// cloud-init user).
    #[arg(long, value_name = "NAME")]
    pub ssh_user: Option<String>,
    /// Your own OpenSSH private key for SSH (no passphrase) instead of the
    /// per-VM key Hangar makes; the seed authorizes its public half.
    #[arg(long, value_name = "FILE")]
    pub ssh_private_key: Option<PathBuf>,
    /// Boot a disk image with UEFI (OVMF) instead of BIOS.
    #[arg(long)]
    pub uefi: bool,
    /// Add a new empty disk of SIZE (repeatable).
    #[arg(long = "data-disk", value_name = "SIZE")]
    pub data_disks: Vec<String>,
    /// Attach a host disk file, PATH or PATH:ro (repeatable).
    #[arg(long = "attach-disk", value_name = "PATH[:ro]")]
    pub attach_disks: Vec<String>,
}

/// A cloud-init NoCloud seed, attached on the first boot only. Any of
/// these flags makes one.
#[derive(Debug, Args, Default)]
pub struct CloudInitArgs {
    /// Your own user-data file (#cloud-config, a script, ...).
    #[arg(long = "cloud-init", value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Authorize the OpenSSH public keys in FILE (a .pub file; repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// The user cloud-init creates (default "hangar"; sudo without password).
    #[arg(long, value_name = "NAME")]
    pub cloud_user: Option<String>,
    /// The guest's host name (default: the VM name).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// A static address instead of DHCP, ADDRESS/PREFIX (network-config v2).
    #[arg(long, value_name = "ADDRESS/PREFIX")]
    pub ip: Option<String>,
    /// Default gateway for --ip.
    #[arg(long, value_name = "IP", requires = "ip")]
    pub gateway: Option<String>,
    /// DNS server for --ip (repeatable).
    #[arg(long, value_name = "IP", requires = "ip")]
    pub dns: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Name of the VM (default: run-<id>).
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the VM when the command ends (the default).
    #[arg(long, conflicts_with = "keep")]
    pub rm: bool,
    /// Keep the VM running after the command, for later `exec`.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub command: CommandArgs,
}

/// The guest command of `run` and `exec`.
#[derive(Debug, Args)]
pub struct CommandArgs {
    /// Pass this terminal's stdin to the command (otherwise /dev/null).
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Give the command a pseudo-terminal (with -i: this terminal in raw
    /// mode, its size followed).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Run as USER[:GROUP] (names or numeric ids, as in the guest).
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Environment variable KEY=VALUE for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// The command and its arguments.
    /// (For `run --image`, the image's Entrypoint/Cmd when left out.)
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Name of the VM (overrides the spec file's).
    #[arg(long, required_unless_present = "file")]
    pub name: Option<String>,
    /// Spec file (.toml, .json, .yaml): the whole VM spec; resource flags
    /// are not mixed in.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Backend: qemu or noop.
    #[arg(long, default_value = "qemu")]
    pub backend: String,
    /// Read a password for the cloud-init user from stdin: used for the
    /// seed only, never stored in the record or logs.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct VmArg {
    /// VM name or id.
    pub vm: String,
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Seconds the guest gets to power off before ACPI, SIGTERM, SIGKILL.
    #[arg(long, short = 't', default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// VM names or ids.
    #[arg(required = true)]
    pub vms: Vec<String>,
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Kill running VMs first.
    #[arg(long, short = 'f')]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show all VMs, not only those with a running VMM.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Only VMs of this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only VMs in this state (repeatable; implies -a).
    #[arg(long, value_name = "STATE")]
    pub state: Vec<String>,
    /// Only VMs with this label, KEY or KEY=VALUE (repeatable).
    #[arg(long, short = 'l', value_name = "KEY[=VALUE]")]
    pub label: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Signal name or number (KILL, SIGTERM, 15...).
    #[arg(long, short = 's', default_value = "KILL")]
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// State to wait for.
    #[arg(long, default_value = "stopped")]
    pub state: String,
    /// Give up after this many seconds.
    #[arg(long, short = 't', default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Keep printing new output until the VM stops (Ctrl-C ends it).
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub vm: VmArg,
    #[command(flatten)]
    pub command: CommandArgs,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    #[command(flatten)]
    pub vm: VmArg,
    /// Pass this terminal's stdin to CMD.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// The command; none opens a shell.
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image, e.g. registry.example.com/team/app:1 or alpine:3.20.
    pub reference: String,
    /// A registry (HOST:PORT) to speak plain HTTP to (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// User name for the registry; the password is read from stdin
    /// (--password-stdin), never from the command line.
    #[arg(long, short = 'u', requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI layout (directory or tar) or a `docker save` archive.
    Import {
        /// The directory or tar file.
        source: PathBuf,
        /// Name for the image, NAME[:TAG] (required when the source names
        /// none).
        #[arg(long, short = 't')]
        tag: Option<String>,
    },
    /// Add a cloud disk image (qcow2 or raw; run it with `--image
    /// disk:NAME`), or with --manifest a base-image bundle (a kernel and a
    /// root file system; run it with `--image bundle:ID`).
    Add {
        /// The disk image: a file or an http(s) URL.
        #[arg(
            value_name = "FILE|URL",
            required_unless_present = "manifest",
            conflicts_with = "manifest"
        )]
        source: Option<String>,
        /// Name for the disk image (default: from the file name).
        #[arg(long, conflicts_with = "manifest")]
        name: Option<String>,
        /// The disk image's expected sha256 (checked; recorded either way).
        #[arg(long, value_name = "HEX", conflicts_with = "manifest")]
        sha256: Option<String>,
        /// A bundle manifest: a JSON file or an http(s) URL (schemaVersion 1).
        #[arg(long, value_name = "FILE|URL")]
        manifest: Option<String>,
        /// Keep at most this many bundles, evicting the least recently
        /// used (never one a VM uses). Default: $HANGAR_MAX_BUNDLES, else 2.
        #[arg(long, value_name = "N")]
        max_bundles: Option<usize>,
    },
    /// List stored images and bundles.
    #[command(alias = "list")]
    Ls,
    /// Show an image's (or a `bundle:ID`'s) record as JSON.
    Inspect { reference: String },
    /// Remove an image name (the image goes with its last name), or a
    /// bundle (`bundle:ID`).
    Rm { reference: String },
    /// Remove blobs no stored image uses, and leftovers of interrupted
    /// imports and pulls.
    Gc,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where to write the agent binary.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// A host path, or VM:PATH in a VM.
    pub source: String,
    /// A host path, or VM:PATH in a VM.
    pub dest: String,
    /// Namespace of the VM.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// `hangar run -- true` against raw QEMU booting the same image.
    Boot {
        /// Boots per variant.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Pull + unpack + ext4 of an image through Hangar against skopeo copy
    /// + tar -x + mkfs.ext4 -d, and the image work of a second run.
    Image {
        /// Size of the image's one layer.
        #[arg(long, default_value_t = 100)]
        megabytes: u64,
    },
    /// Cold boot vs restore (as saved and grown) vs fork to a first exec;
    /// snapshot time and size for 256 MiB and 1 GiB guests and for 64 MiB
    /// and 1 GiB root file systems.
    Snapshot {
        /// Cold boots and restores to time (medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// VMs to fork at once.
        #[arg(long, default_value_t = 10)]
        forks: usize,
    },
    /// `hangar exec -- true` and start -> ready over SSH (a cloud disk
    /// image) against the agent (the default image).
    Ssh {
        /// The cloud image, as disk:NAME (e.g. the test guest that
        /// scripts/build-test-guest.sh builds).
        #[arg(long)]
        image: String,
        /// Execs to time on each VM.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Exec round trip, stdout throughput and concurrent execs on one VM.
    Exec {
        /// Round trips to time.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Megabytes to stream from guest stdout.
        #[arg(long, default_value_t = 100)]
        megabytes: u64,
    },
    /// `ps` over many records, and the create -> rm throughput of parallel
    /// processes (noop backend, in a temporary state dir).
    Store {
        /// Records for the `ps` measurement.
        #[arg(long, default_value_t = 10_000)]
        records: usize,
        /// Parallel processes for the storm.
        #[arg(long, default_value_t = 100)]
        storm: usize,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The up file (.toml, .json, .yaml).
    #[arg(long, short = 'f', default_value = "hangar.toml")]
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running VM's memory, devices and disk; it runs on (or stops
    /// with --stop).
    Create {
        #[command(flatten)]
        vm: VmArg,
        /// The snapshot's name (default: VM-N).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Stop the VM once saved.
        #[arg(long)]
        stop: bool,
    },
    /// List snapshots.
    #[command(alias = "list")]
    Ls,
    /// Show a snapshot's record as JSON.
    Inspect { snapshot: String },
    /// Remove snapshots (refused while VMs or snapshots build on one).
    Rm {
        #[arg(required = true)]
        snapshots: Vec<String>,
        /// Remove even when VMs or snapshots build on it (they will no
        /// longer start).
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Write a snapshot to an archive (tar + zstd, checksummed).
    Export {
        snapshot: String,
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
    /// Add a snapshot from an archive written by `export`.
    Import {
        file: PathBuf,
        /// Name for it here (default: its name in the archive).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RestoreResources {
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// vCPUs: the snapshot's, or more (plugged in, up to the ceiling its VM
    /// booted with: 8 or its count).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory: the snapshot's, or more in steps of 128M (a DIMM plugged
    /// in, up to 16G or twice the VM's boot memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// Root disk size (at least the snapshot's).
    #[arg(long)]
    pub disk: Option<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot name or id.
    pub snapshot: String,
    /// Name of the new VM (default: SNAPSHOT-N).
    #[arg(long)]
    pub name: Option<String>,
    /// The guest's hostname (default: the new VM's name).
    #[arg(long)]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub resources: RestoreResources,
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Snapshot name or id.
    pub snapshot: String,
    /// How many VMs.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub count: usize,
    #[command(flatten)]
    pub resources: RestoreResources,
}

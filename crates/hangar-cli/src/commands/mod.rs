//! One function per command; each parses its arguments, calls the library
//! once and prints.

mod bench;
mod bench_exec;
mod bench_snapshot;
mod bench_ssh;
mod console;
mod control;
mod copy;
mod image;
mod lifecycle;
mod run;
mod show;
mod snapshot;
mod up;

use anyhow::{bail, Context};

use crate::cli::{Cli, Command, Global, ResourceArgs};
use hangar::{Accel, Manager, ManagerOptions, VmSpec};

pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let global = &cli.global;
    match cli.command {
        Command::Run(args) => run::run(global, args),
        Command::Exec(args) => run::exec(global, args),
        Command::Ssh(args) => run::ssh(global, args),
        Command::Cp(args) => copy::cp(global, args),
        Command::Create(args) => lifecycle::create(global, args),
        Command::Start(args) => lifecycle::start(global, args),
        Command::Stop(args) => lifecycle::stop(global, args),
        Command::Rm(args) => lifecycle::rm(global, args),
        Command::Kill(args) => control::kill(global, args),
        Command::Restart(args) => control::restart(global, args),
        Command::Pause(args) => control::pause(global, args),
        Command::Resume(args) => control::resume(global, args),
        Command::Wait(args) => control::wait(global, args),
        Command::Ps(args) => show::ps(global, args),
        Command::Inspect(args) => show::inspect(global, args),
        Command::Logs(args) => show::logs(global, args),
        Command::Console(args) => console::console(global, args),
        Command::Info => show::info(global),
        Command::Image(command) => image::image(global, command),
        Command::Snapshot(command) => snapshot::snapshot(global, command),
        Command::Restore(args) => snapshot::restore(global, args),
        Command::Fork(args) => snapshot::fork(global, args),
        Command::Pull(args) => image::pull(global, args),
        Command::Agent(args) => show::export_agent(global, &args.output),
        Command::Gc => show::gc(global),
        Command::Up(args) => up::up(global, args),
        Command::Down(args) => up::down(global, args),
        Command::Bench(args) => bench::bench(global, args),
    }
}

pub fn open(global: &Global) -> anyhow::Result<Manager> {
    let accel = match global.accel.as_str() {
        "auto" | "" => None,
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        other => bail!("--accel {other:?} is invalid: use kvm, tcg or auto"),
    };
    Ok(Manager::open(ManagerOptions {
        state_dir: global.state_dir.clone(),
        accel,
    })?)
}

/// Says once, on stderr, when VMs will run under software emulation and
/// why (the probe's verdict is cached, so later runs stay quiet).
pub fn note_accelerator(manager: &mut Manager, global: &Global) -> anyhow::Result<()> {
    manager.accelerator()?;
    if let (Some(reason), false) = (manager.fresh_tcg_note(), global.json) {
        eprintln!("hangar: {reason}");
    }
    Ok(())
}

/// Builds a spec from the shared resource flags; every value is validated
/// by the library.
pub fn spec_from(name: String, resources: &ResourceArgs) -> anyhow::Result<VmSpec> {
    let mut spec = VmSpec::new(name);
    spec.namespace = resources.namespace.clone();
    spec.image = hangar::manager::parse_image(&resources.image)?;
    spec.cpus = resources.cpus;
    spec.memory = resources
        .memory
        .parse()
        .with_context(|| format!("--memory {}", resources.memory))?;
    spec.kernel_args = resources.kernel_args.clone();
    spec.vsock = resources.vsock;
    spec.network = network_from(resources)?;
    spec.cloud_init = cloud_init_from(&resources.cloud_init)?;
    spec.disk_size = match &resources.disk {
        Some(size) => Some(size.parse().with_context(|| format!("--disk {size}"))?),
        None => None,
    };
    spec.uefi = resources.uefi;
    if resources.ssh_user.is_some() || resources.ssh_private_key.is_some() {
        spec.ssh = Some(hangar::spec::SshSpec {
            user: resources.ssh_user.clone().unwrap_or_default(),
            private_key_path: match &resources.ssh_private_key {
                Some(path) => Some(
                    std::path::absolute(path)
                        .with_context(|| format!("--ssh-private-key {}", path.display()))?,
                ),
                None => None,
            },
            ..Default::default()
        });
    }
    for size in &resources.data_disks {
        spec.data_disks.push(hangar::spec::DataDisk {
            size: Some(
                size.parse()
                    .with_context(|| format!("--data-disk {size}"))?,
            ),
            path: None,
            read_only: false,
        });
    }
    for text in &resources.attach_disks {
        let (path, read_only) = match text.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (text.as_str(), false),
        };
        let path = std::path::absolute(path).with_context(|| format!("--attach-disk {text}"))?;
        spec.data_disks.push(hangar::spec::DataDisk {
            size: None,
            path: Some(path),
            read_only,
        });
    }
    for label in &resources.labels {
        let (key, value) = label
            .split_once('=')
            .with_context(|| format!("--label {label:?} must be KEY=VALUE"))?;
        spec.labels.insert(key.to_owned(), value.to_owned());
    }
    spec.validate()?;
    Ok(spec)
}

/// The cloud-init flags as a seed spec (None when none is given). Files
/// are read here; the library validates every value.
fn cloud_init_from(
    args: &crate::cli::CloudInitArgs,
) -> anyhow::Result<Option<hangar::spec::CloudInitSpec>> {
    let given = args.user_data.is_some()
        || !args.ssh_keys.is_empty()
        || args.cloud_user.is_some()
        || args.hostname.is_some()
        || args.ip.is_some();
    if !given {
        return Ok(None);
    }
    let user_data = match &args.user_data {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--cloud-init {}", path.display()))?,
        ),
        None => None,
    };
    let mut keys = Vec::new();
    for path in &args.ssh_keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--ssh-key {}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(Some(hangar::spec::CloudInitSpec {
        user_data,
        instance_id: None,
        hostname: args.hostname.clone(),
        user: args.cloud_user.clone(),
        ssh_authorized_keys: keys,
        network: args.ip.as_ref().map(|address| hangar::spec::StaticNetwork {
            address: address.clone(),
            gateway: args.gateway.clone(),
            dns: args.dns.clone(),
        }),
    }))
}

/// `--network` and `-p` as a network spec.
fn network_from(resources: &ResourceArgs) -> anyhow::Result<hangar::spec::NetworkSpec> {
    use hangar::spec::{NetworkSpec, PortForward};
    let forwards = resources
        .publish
        .iter()
        .map(|text| {
            let bad = || {
                anyhow::anyhow!(
                    "--publish {text:?} must be HOST:GUEST or GUEST (ports 1-65535; host 0 or none picks a free port)"
                )
            };
            let (host, guest) = match text.split_once(':') {
                Some((host, guest)) => (host.parse().map_err(|_| bad())?, guest),
                None => (0, text.as_str()),
            };
            Ok(PortForward {
                host,
                guest: guest.parse().map_err(|_| bad())?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    match resources.network.as_deref() {
        None if forwards.is_empty() => Ok(NetworkSpec::None),
        None | Some("user") => Ok(NetworkSpec::User { forwards }),
        Some("none") if forwards.is_empty() => Ok(NetworkSpec::None),
        Some("none") => anyhow::bail!("--publish needs a network: drop --network none"),
        Some(other) => {
            anyhow::bail!("--network {other:?} is not known: use \"user\" or \"none\"")
        }
    }
}

/// Prints a VM as JSON, or its name.
pub fn print_vm(global: &Global, record: &hangar::VmRecord) -> anyhow::Result<()> {
    if global.json {
        crate::output::print_json(record)
    } else {
        println!("{}", record.name);
        Ok(())
    }
}

/// A state name as `ps` prints it.
pub fn parse_state(text: &str) -> anyhow::Result<hangar::VmState> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        anyhow::anyhow!(
            "unknown state {text:?}: use created, starting, running, paused, stopping, stopped or failed"
        )
    })
}

/// `KEY=VALUE` pairs for `--env`.
pub fn parse_env(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?} must be KEY=VALUE"))?;
            if key.is_empty() {
                bail!("--env {pair:?} has an empty name");
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A guest exit status as a process exit code.
pub fn exit_code(status: hangar::ExitStatus) -> u8 {
    match status {
        hangar::ExitStatus::Code(code) => (code & 0xff) as u8,
        hangar::ExitStatus::Signal(signal) => (128 + signal).clamp(0, 255) as u8,
    }
}

//! hangar-agent: the guest side of Hangar.
//!
//! As PID 1 of Hangar's initramfs it sets the guest up (mounts, kernel
//! modules, hostname), then serves the host over virtio-serial ports: hello
//! with guest facts, exec with streamed output, file copy, shutdown. It
//! never exits as PID 1: a fatal error is logged to the serial console and
//! the guest powers off, so the host sees the VM end and shows the
//! console's last lines.
//!
//! Started as any other process it is a service (for disk images with
//! their own init; see `contrib/hangar-agent.service`): no mounts, no
//! console shell, shutdown through the guest's `poweroff`. Options:
//! `--port N` (repeatable) serves only those virtio-serial ports; `--vsock`
//! listens on vsock port 1024 (then serial ports only if also named). As
//! PID 1, the kernel argument `hangar.ports=N` serves only the first N
//! ports, leaving the rest to a service, and `hangar.vsock=1` loads the
//! vsock modules and listens on vsock too.

mod cmdline;
mod console;
mod copy;
mod exec;
mod facts;
mod hotplug;
mod identity;
mod init;
mod net;
mod port;
mod program;
mod pty;
mod reaper;
mod session;
mod sys;
mod user;
mod vsock;

use std::time::Duration;

use hangar_proto::{port_name, AGENT_PORTS, AGENT_VSOCK_PORT};

/// How long to wait for the virtio-serial port to appear after boot.
const PORT_APPEAR_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    // Before any thread: they all inherit the mask.
    port::block_host_signal();
    let is_init = std::process::id() == 1;
    let options = if is_init {
        let cmdline = init::setup().unwrap_or_else(|err| {
            log(&format!("init failed: {err}"));
            sys::power_off()
        });
        if cmdline.flag("hangar.probe") {
            // The accelerator probe only needs proof that userspace ran.
            log("probe ok");
            sys::power_off();
        }
        init::load_modules(init::BOOT_MODULES);
        // Network first: it uses the initramfs's busybox `ip`, which an
        // image's root may not have.
        let net_mode = cmdline.value("hangar.net");
        net::configure(net_mode);
        if let Some(root) = init::RootSpec::from_cmdline(&cmdline) {
            init::load_modules(init::ROOTFS_MODULES);
            if let Err(err) = init::switch_root(&root) {
                log(&format!(
                    "cannot switch to the image's root file system: {err}"
                ));
                sys::power_off();
            }
            net::write_resolv_conf(net_mode);
        }
        let count = cmdline
            .value("hangar.ports")
            .and_then(|n| n.parse::<u32>().ok())
            .map_or(AGENT_PORTS, |n| n.clamp(1, AGENT_PORTS));
        let vsock = cmdline.flag("hangar.vsock");
        if vsock {
            init::load_modules(init::VSOCK_MODULES);
        }
        Options {
            ports: (0..count).collect(),
            vsock,
        }
    } else {
        match service_options(std::env::args().skip(1)) {
            Ok(options) => options,
            Err(message) => {
                log(&message);
                std::process::exit(2);
            }
        }
    };
    let reaper = reaper::Reaper::start();
    if is_init {
        console::spawn_shell(reaper.clone());
    }
    if options.vsock {
        match vsock_token() {
            Ok(token) => {
                let _ = session::VSOCK_TOKEN.set(token);
            }
            Err(err) => log(&format!(
                "vsock: no token ({err}); vsock sessions are refused"
            )),
        }
        // Without vsock the serial ports still serve; the log says why.
        if let Err(err) = vsock::spawn_listener(AGENT_VSOCK_PORT, reaper.clone(), is_init) {
            log(&format!("vsock: {err}"));
        }
        if options.ports.is_empty() {
            loop {
                std::thread::park();
            }
        }
    }
    if let Err(err) = serve_ports(&reaper, is_init, options.ports) {
        log(&format!("fatal: {err}"));
    }
    if is_init {
        sys::power_off();
    }
    std::process::exit(1);
}

/// 128 random bits as hex: what a vsock session must present.
fn vsock_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the agent serves.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    /// Virtio-serial port indexes.
    ports: Vec<u32>,
    /// Listen on vsock port [`AGENT_VSOCK_PORT`].
    vsock: bool,
}

/// A service's options: every `--port N` and `--vsock`; with neither,
/// all serial ports.
fn service_options(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let usage = "usage: hangar-agent [--port N]... [--vsock] (N from 0 to 15; default all ports)";
    let mut ports = Vec::new();
    let mut vsock = false;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let port = args
                    .next()
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| *n < AGENT_PORTS)
                    .ok_or_else(|| format!("--port needs a number from 0 to 15; {usage}"))?;
                ports.push(port);
            }
            "--vsock" => vsock = true,
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    if ports.is_empty() && !vsock {
        ports = (0..AGENT_PORTS).collect();
    }
    Ok(Options { ports, vsock })
}

/// The first port must appear; the others come with the same device, so
/// once it is there they are too (a missing one only means fewer concurrent
/// host sessions). Serves the first port on this thread, the rest on their
/// own.
fn serve_ports(reaper: &reaper::Reaper, is_init: bool, ports: Vec<u32>) -> std::io::Result<()> {
    let Some((&first_index, rest)) = ports.split_first() else {
        return Ok(());
    };
    let first = port::open_agent_port(&port_name(first_index), PORT_APPEAR_TIMEOUT)?;
    let reaper_for_rest = reaper.clone();
    let mut missing: Vec<u32> = rest.to_vec();
    // Port names reach the guest one by one; serve each as it appears. The
    // thread ends as soon as the last one is served, not a sleep later (a
    // snapshot taken in that sleep left the thread's end to every restore).
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + PORT_APPEAR_TIMEOUT;
        loop {
            missing.retain(|index| {
                let Ok(port) = port::open_agent_port(&port_name(*index), Duration::ZERO) else {
                    return true;
                };
                let reaper = reaper_for_rest.clone();
                std::thread::spawn(move || session::serve(port, reaper, is_init));
                false
            });
            if missing.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !missing.is_empty() {
            log(&format!("ports never appeared: {missing:?}"));
        }
    });
    log("ready");
    session::serve(first, reaper.clone(), is_init)
}

/// Writes one line to the agent's stderr: the serial console as PID 1.
pub(crate) fn log(message: &str) {
    eprintln!("hangar-agent: {message}");
}

#[cfg(test)]
mod tests {
    use super::{service_options, Options};

    fn parse(args: &[&str]) -> Result<Options, String> {
        service_options(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn service_options_default_to_all_ports_and_are_checked() {
        assert_eq!(parse(&[]).unwrap().ports.len(), 16);
        assert_eq!(
            parse(&["--port", "15", "--port", "3"]).unwrap().ports,
            vec![15, 3]
        );
        assert_eq!(
            parse(&["--vsock"]).unwrap(),
            Options {
                ports: vec![],
                vsock: true
            }
        );
        assert!(parse(&["--port", "16"]).unwrap_err().contains("0 to 15"));
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--serve"])
            .unwrap_err()
            .contains("unknown argument"));
    }
}

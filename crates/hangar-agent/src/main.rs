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
//! `--port N` (repeatable) serves only those ports. As PID 1, the kernel
//! argument `hangar.ports=N` serves only the first N, leaving the rest to
//! a service.

mod cmdline;
mod console;
mod copy;
mod exec;
mod facts;
mod init;
mod port;
mod pty;
mod reaper;
mod session;
mod sys;
mod user;

use std::time::Duration;

use hangar_proto::{port_name, AGENT_PORTS};

/// How long to wait for the virtio-serial port to appear after boot.
const PORT_APPEAR_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let is_init = std::process::id() == 1;
    let ports = if is_init {
        let cmdline = init::setup().unwrap_or_else(|err| {
            log(&format!("init failed: {err}"));
            sys::power_off()
        });
        if cmdline.flag("hangar.probe") {
            // The accelerator probe only needs proof that userspace ran.
            log("probe ok");
            sys::power_off();
        }
        init::load_modules();
        let count = cmdline
            .value("hangar.ports")
            .and_then(|n| n.parse::<u32>().ok())
            .map_or(AGENT_PORTS, |n| n.clamp(1, AGENT_PORTS));
        (0..count).collect()
    } else {
        match service_ports(std::env::args().skip(1)) {
            Ok(ports) => ports,
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
    if let Err(err) = serve_ports(&reaper, is_init, ports) {
        log(&format!("fatal: {err}"));
    }
    if is_init {
        sys::power_off();
    }
    std::process::exit(1);
}

/// The ports a service serves: every `--port N`, or all of them.
fn service_ports(args: impl Iterator<Item = String>) -> Result<Vec<u32>, String> {
    let usage = "usage: hangar-agent [--port N]... (N from 0 to 15; default all)";
    let mut ports = Vec::new();
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
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    if ports.is_empty() {
        ports = (0..AGENT_PORTS).collect();
    }
    Ok(ports)
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
    // Port names reach the guest one by one; serve each as it appears.
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + PORT_APPEAR_TIMEOUT;
        while !missing.is_empty() && std::time::Instant::now() < deadline {
            missing.retain(|index| {
                let Ok(port) = port::open_agent_port(&port_name(*index), Duration::ZERO) else {
                    return true;
                };
                let reaper = reaper_for_rest.clone();
                std::thread::spawn(move || session::serve(port, reaper, is_init));
                false
            });
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
    use super::service_ports;

    fn parse(args: &[&str]) -> Result<Vec<u32>, String> {
        service_ports(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn service_ports_default_to_all_and_are_checked() {
        assert_eq!(parse(&[]).unwrap().len(), 16);
        assert_eq!(
            parse(&["--port", "15", "--port", "3"]).unwrap(),
            vec![15, 3]
        );
        assert!(parse(&["--port", "16"]).unwrap_err().contains("0 to 15"));
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--serve"])
            .unwrap_err()
            .contains("unknown argument"));
    }
}

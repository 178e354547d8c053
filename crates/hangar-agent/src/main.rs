//! hangar-agent: the guest side of Hangar.
//!
//! As PID 1 of Hangar's initramfs it sets the guest up (mounts, kernel
//! modules, hostname), then serves the host over a virtio-serial port: hello
//! with guest facts, exec with streamed output, shutdown. It never exits as
//! PID 1: a fatal error is logged to the serial console and the guest powers
//! off, so the host sees the VM end and shows the console's last lines.

mod cmdline;
mod console;
mod exec;
mod facts;
mod init;
mod port;
mod reaper;
mod session;
mod sys;

use std::time::Duration;

use hangar_proto::{port_name, AGENT_PORTS};

/// How long to wait for the virtio-serial port to appear after boot.
const PORT_APPEAR_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
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
    }
    let reaper = reaper::Reaper::start();
    if is_init {
        console::spawn_shell(reaper.clone());
    }
    if let Err(err) = serve_ports(&reaper, is_init) {
        log(&format!("fatal: {err}"));
    }
    if is_init {
        sys::power_off();
    }
    std::process::exit(1);
}

/// Port 0 must appear; the others come with the same device, so once port
/// 0 is there they are too (a missing one only means fewer concurrent host
/// sessions). Serves port 0 on this thread, the rest on their own.
fn serve_ports(reaper: &reaper::Reaper, is_init: bool) -> std::io::Result<()> {
    let first = port::open_agent_port(&port_name(0), PORT_APPEAR_TIMEOUT)?;
    let reaper_for_rest = reaper.clone();
    // Port names reach the guest one by one; serve each as it appears.
    std::thread::spawn(move || {
        let mut missing: Vec<u32> = (1..AGENT_PORTS).collect();
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

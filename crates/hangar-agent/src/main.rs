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
    let result =
        port::open_agent_port(PORT_APPEAR_TIMEOUT).and_then(|port| session::serve(port, is_init));
    if let Err(err) = result {
        log(&format!("fatal: {err}"));
    }
    if is_init {
        sys::power_off();
    }
    std::process::exit(1);
}

/// Writes one line to the agent's stderr: the serial console as PID 1.
pub(crate) fn log(message: &str) {
    eprintln!("hangar-agent: {message}");
}

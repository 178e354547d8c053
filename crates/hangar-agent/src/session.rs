//! The request loop: decode host frames, dispatch, answer.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use hangar_proto::{Frame, FrameError, FrameReader, GuestMessage, HostMessage, PROTOCOL_VERSION};

use crate::port::AgentPort;
use crate::reaper::Reaper;

/// Shared writer: every frame goes out in one locked `write_all`, so frames
/// of concurrent execs never interleave.
#[derive(Clone, Debug)]
pub struct Sender {
    port: Arc<Mutex<File>>,
}

impl Sender {
    pub fn send_frame(&self, frame: &Frame) {
        let bytes = frame.encode();
        let mut port = self
            .port
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        // A write fails only if the device is gone; the next host hello
        // starts over, so there is nobody to report this to.
        let _ = port.write_all(&bytes).and_then(|()| port.flush());
    }

    pub fn send_message(&self, message: &GuestMessage) {
        self.send_frame(&message.to_frame());
    }
}

pub fn serve(port: AgentPort, is_init: bool) -> io::Result<()> {
    let sender = Sender {
        port: Arc::new(Mutex::new(port.try_clone_file()?)),
    };
    let reaper = Reaper::start();
    if is_init {
        crate::console::spawn_shell(reaper.clone());
    }
    // Announce readiness; if no host is connected yet this is dropped and the
    // host's own hello gets the answer.
    send_hello(&sender, None);
    crate::log("ready");
    let mut reader = FrameReader::new(port);
    loop {
        let frame = match reader.read_frame() {
            Ok(frame) => frame,
            Err(FrameError::Io(err)) => return Err(err),
            Err(FrameError::Closed) => continue,
            Err(err) => {
                sender.send_message(&GuestMessage::Error {
                    message: err.to_string(),
                });
                continue;
            }
        };
        match HostMessage::from_frame(&frame) {
            Ok(message) => handle(message, &sender, &reaper, is_init),
            Err(err) => sender.send_message(&GuestMessage::Error {
                message: err.to_string(),
            }),
        }
    }
}

fn handle(message: HostMessage, sender: &Sender, reaper: &Reaper, is_init: bool) {
    match message {
        HostMessage::Hello { version, nonce } if version == PROTOCOL_VERSION => {
            send_hello(sender, Some(nonce));
        }
        HostMessage::Hello { version, .. } => {
            sender.send_message(&GuestMessage::VersionMismatch {
                agent: PROTOCOL_VERSION,
                host: version,
            });
        }
        HostMessage::Exec { id, request } => {
            crate::exec::spawn(id, request, sender.clone(), reaper.clone());
        }
        HostMessage::Shutdown { reboot } => shutdown(reboot, is_init),
    }
}

fn send_hello(sender: &Sender, nonce: Option<u64>) {
    sender.send_message(&GuestMessage::Hello {
        version: PROTOCOL_VERSION,
        nonce,
        facts: crate::facts::gather(),
    });
}

fn shutdown(reboot: bool, is_init: bool) {
    crate::log(if reboot { "rebooting" } else { "powering off" });
    if is_init {
        if reboot {
            crate::sys::reboot();
        }
        crate::sys::power_off();
    }
    // As a service, leave the shutdown to the guest's init system.
    let program = if reboot { "reboot" } else { "poweroff" };
    if let Err(err) = std::process::Command::new(program).status() {
        crate::log(&format!("{program}: {err}"));
    }
}

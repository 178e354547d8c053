//! One host session on one port: decode host frames, dispatch, answer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use hangar_proto::{
    Frame, FrameError, FrameKind, FrameReader, GuestMessage, HostMessage, TtySize, PROTOCOL_VERSION,
};

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
        // Replies may echo host input (a path, a program name); one too big
        // for a frame is dropped with a log line, never a panic in PID 1.
        if frame.payload.len() > hangar_proto::MAX_PAYLOAD as usize {
            crate::log(&format!(
                "dropped a {}-byte reply: over the frame limit",
                frame.payload.len()
            ));
            return;
        }
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

/// A command of this session, as the session reaches it: its pid for
/// signals (None until spawned) and the feed of its stdin (None once
/// closed). Entered before the command spawns, so stdin that arrives at
/// once is queued, not lost; removed as soon as its exit status is known.
#[derive(Debug)]
pub struct Running {
    pub pid: Option<u32>,
    pub stdin: Option<mpsc::Sender<Vec<u8>>>,
    /// The terminal's controller side, for resizes (`exec -t`).
    pub tty: Option<Arc<File>>,
}

/// The longest wait for a host between reads of an idle port (SIGIO
/// normally ends it at once; this bounds a missed one).
const HOST_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The token vsock sessions must present (set once at boot when the agent
/// listens on vsock; serial sessions hand it to the host in their hello).
pub static VSOCK_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The session's running commands by exec id.
pub type Table = Arc<Mutex<BTreeMap<u32, Running>>>;

/// What the end of input means on a channel.
#[derive(Debug)]
pub enum OnEnd {
    /// A virtio-serial port: no host is connected right now; the next one
    /// will come through the same device.
    WaitForHost(crate::port::HostWait),
    /// A vsock connection: the host hung up; the session is over.
    Finish,
}

/// Serves one virtio-serial port for as long as the guest runs.
pub fn serve(port: AgentPort, reaper: Reaper, is_init: bool) -> io::Result<()> {
    let writer = port.try_clone_file()?;
    let host_wait = port.host_wait()?;
    serve_channel(port, writer, OnEnd::WaitForHost(host_wait), reaper, is_init)
}

/// Serves one channel: frames in through `input`, out through `output`.
pub fn serve_channel(
    input: impl io::Read,
    output: File,
    mut on_end: OnEnd,
    reaper: Reaper,
    is_init: bool,
) -> io::Result<()> {
    let sender = Sender {
        port: Arc::new(Mutex::new(output)),
    };
    let table: Table = Arc::default();
    // A serial port is private to the VM's owner on the host; a vsock
    // connection proves itself with the token first.
    let private = matches!(on_end, OnEnd::WaitForHost(_));
    let mut authenticated = private;
    // No hello of our own: the host opens every session with its hello
    // (with a nonce it waits for), which stays queued in the port until
    // this reads it. Gathering facts for 16 unsolicited hellos that no one
    // reads also kept a freshly booted guest busy after it became ready.
    let mut reader = FrameReader::new(input);
    loop {
        let frame = match reader.read_frame() {
            Ok(frame) => frame,
            Err(err) if host_gone(&err) => {
                // The host is gone: its commands' stdin ends with it.
                close_all_stdin(&table);
                let OnEnd::WaitForHost(host_wait) = &mut on_end else {
                    return Ok(());
                };
                // Maybe mid-frame: forget the partial frame and wait for
                // the next host.
                reader.reset();
                host_wait.wait(HOST_WAIT_MAX);
                continue;
            }
            Err(FrameError::Io(err)) => {
                close_all_stdin(&table);
                return Err(err);
            }
            Err(err) => {
                sender.send_message(&GuestMessage::Error {
                    message: err.to_string(),
                });
                continue;
            }
        };
        if !authenticated {
            match HostMessage::from_frame(&frame) {
                Ok(HostMessage::Hello {
                    token: Some(token),
                    version,
                    nonce,
                }) if VSOCK_TOKEN.get().is_some_and(|expected| *expected == token) => {
                    authenticated = true;
                    let hello = HostMessage::Hello {
                        version,
                        nonce,
                        token: None,
                    };
                    handle(hello, &sender, &reaper, &table, is_init, private);
                    continue;
                }
                _ => {
                    sender.send_message(&GuestMessage::Error {
                        message: "this channel needs the VM's token in the first hello".into(),
                    });
                    return Ok(());
                }
            }
        }
        if frame.kind == FrameKind::Stdin {
            feed_stdin(&table, frame.stream, frame.payload);
            continue;
        }
        match HostMessage::from_frame(&frame) {
            Ok(message) => handle(message, &sender, &reaper, &table, is_init, private),
            Err(err) => sender.send_message(&GuestMessage::Error {
                message: err.to_string(),
            }),
        }
    }
}

fn handle(
    message: HostMessage,
    sender: &Sender,
    reaper: &Reaper,
    table: &Table,
    is_init: bool,
    private: bool,
) {
    match message {
        HostMessage::Hello { version, nonce, .. } if version == PROTOCOL_VERSION => {
            send_hello(sender, Some(nonce), private);
        }
        HostMessage::Hello { version, .. } => {
            sender.send_message(&GuestMessage::VersionMismatch {
                agent: PROTOCOL_VERSION,
                host: version,
            });
        }
        HostMessage::Exec { id, request } => {
            let (feed, queue) = if request.stdin {
                // Unbounded: the host keeps at most STDIN_WINDOW bytes in
                // flight (credits), and the session must never block here.
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            lock(table).insert(
                id,
                Running {
                    pid: None,
                    stdin: feed,
                    tty: None,
                },
            );
            let job = crate::exec::Job {
                id,
                request,
                stdin: queue,
                sender: sender.clone(),
                reaper: reaper.clone(),
                table: Arc::clone(table),
            };
            crate::exec::spawn(job);
        }
        HostMessage::CloseStdin { id } => {
            if let Some(running) = lock(table).get_mut(&id) {
                running.stdin = None;
            }
        }
        HostMessage::Signal { id, signal } => {
            let table = lock(table);
            if let Some(pid) = table.get(&id).and_then(|r| r.pid) {
                // SAFETY: kill takes plain integers. The entry leaves the
                // table (under this lock) as soon as the child is reaped, so
                // the pid is still our child here.
                unsafe {
                    libc::kill(pid as libc::pid_t, signal);
                }
            }
        }
        HostMessage::Resize { id, rows, cols } => {
            let tty = lock(table).get(&id).and_then(|r| r.tty.clone());
            if let Some(tty) = tty {
                if let Err(err) = crate::pty::resize(&tty, TtySize { rows, cols }) {
                    crate::log(&format!("resize exec {id}: {err}"));
                }
            }
        }
        HostMessage::CopyIn { id, path } => {
            let (feed, queue) = mpsc::channel();
            lock(table).insert(
                id,
                Running {
                    pid: None,
                    stdin: Some(feed),
                    tty: None,
                },
            );
            crate::copy::copy_in(id, path, queue, sender.clone(), Arc::clone(table));
        }
        HostMessage::CopyOut { id, path } => crate::copy::copy_out(id, path, sender.clone()),
        HostMessage::Shutdown { reboot } => shutdown(reboot, is_init, reaper),
        HostMessage::SetIdentity { id, identity } => {
            let mut errors = crate::identity::apply(&identity);
            // Only when asked: an agent that leaves it out cannot grow.
            let resources = (identity.cpus.is_some() || identity.memory_mib.is_some()).then(|| {
                let (failed, resources) =
                    crate::hotplug::grow_guest(identity.cpus, identity.memory_mib);
                errors.extend(failed);
                resources
            });
            sender.send_message(&GuestMessage::IdentitySet {
                id,
                errors,
                facts: crate::facts::gather(),
                resources,
            });
        }
    }
}

fn feed_stdin(table: &Table, id: u32, data: Vec<u8>) {
    if let Some(feed) = lock(table).get(&id).and_then(|r| r.stdin.as_ref()) {
        // Never blocks. The writer may have stopped (the command closed its
        // stdin); the data then has nowhere to go, like a closed pipe.
        let _ = feed.send(data);
    }
}

/// End of input, clean or in the middle of a frame: no host any more.
fn host_gone(err: &FrameError) -> bool {
    match err {
        FrameError::Closed => true,
        FrameError::Io(err) => err.kind() == io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

/// Closes every command's stdin (its host went away).
fn close_all_stdin(table: &Table) {
    for running in lock(table).values_mut() {
        running.stdin = None;
    }
}

pub fn lock(table: &Table) -> std::sync::MutexGuard<'_, BTreeMap<u32, Running>> {
    table.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The hello; `private` channels also carry the vsock token.
fn send_hello(sender: &Sender, nonce: Option<u64>, private: bool) {
    let mut facts = crate::facts::gather();
    if private {
        facts.vsock_token = VSOCK_TOKEN.get().cloned();
    }
    sender.send_message(&GuestMessage::Hello {
        version: PROTOCOL_VERSION,
        nonce,
        facts,
    });
}

fn shutdown(reboot: bool, is_init: bool, reaper: &Reaper) {
    crate::log(if reboot { "rebooting" } else { "powering off" });
    if is_init {
        if reboot {
            crate::sys::reboot();
        }
        crate::sys::power_off();
    }
    // As a service, leave the shutdown to the guest's init system. Spawned
    // like every child: under the reaper's lock, its exit from the reaper.
    let program = if reboot { "reboot" } else { "poweroff" };
    let mut guard = reaper.lock();
    match std::process::Command::new(program).spawn() {
        Ok(child) => {
            let exited = reaper.register(&mut guard, child.id());
            drop(guard);
            let _ = exited.recv_timeout(std::time::Duration::from_secs(30));
        }
        Err(err) => crate::log(&format!("{program}: {err}")),
    }
}

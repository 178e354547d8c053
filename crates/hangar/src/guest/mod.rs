//! The host side of `hangar-proto`: wait for the agent's hello, run commands
//! with streamed output (`exec`), copy files (`copy`), ask the guest to
//! power off.
//!
//! Never hangs: every read has [`POLL_INTERVAL`] as its timeout, and between
//! reads the caller's `check` says whether to go on (the VMM is still alive,
//! the user did not interrupt, the deadline has not passed).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;

use socket2::Socket;

mod copy;
mod credit;
mod exec;
pub mod identity;
pub mod ssh;
pub mod transport;

pub use exec::{ExecEvent, ExecIo, ExecStream, TtySizeSource};
pub use transport::AgentEndpoint;

use hangar_proto::{
    Frame, FrameError, FrameKind, FrameReader, GuestFacts, GuestMessage, HostMessage,
    PROTOCOL_VERSION,
};

/// How often a blocked read wakes up to run the caller's check.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the hello is repeated while the agent is silent (a frame can be
/// lost to a previous host's half-written frame).
const HELLO_RETRY: Duration = Duration::from_secs(2);

/// Receives a command's output as it arrives, in chunks.
pub trait OutputSink {
    fn on_stdout(&mut self, chunk: &[u8]);
    fn on_stderr(&mut self, chunk: &[u8]);
}

/// Collects output in memory.
#[derive(Debug, Default)]
pub struct CollectSink {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl OutputSink for CollectSink {
    fn on_stdout(&mut self, chunk: &[u8]) {
        self.stdout.extend_from_slice(chunk);
    }
    fn on_stderr(&mut self, chunk: &[u8]) {
        self.stderr.extend_from_slice(chunk);
    }
}

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to the agent at {endpoint}")]
    Connect {
        endpoint: AgentEndpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("agent channel {endpoint} failed")]
    Channel {
        endpoint: AgentEndpoint,
        #[source]
        source: FrameError,
    },
    #[error("the guest agent speaks protocol version {agent}, this hangar speaks {host}; use a matching hangar and image")]
    VersionMismatch { agent: u32, host: u32 },
    #[error("the agent did not answer within {waited:?}")]
    Timeout { waited: Duration },
    #[error("{reason}")]
    Aborted { reason: String },
    #[error("the command could not start in the guest: {message}")]
    ExecFailed { message: String },
    #[error("the command did not finish within {after:?} and was killed")]
    ExecTimeout { after: Duration },
    #[error("copy failed in the guest: {message}")]
    CopyFailed { message: String },
    #[error(transparent)]
    Transfer(#[from] hangar_proto::transfer::TransferError),
    #[error("all {ports} agent ports stayed busy for {waited:?} (other hangar processes are using them)")]
    PortsBusy { ports: usize, waited: Duration },
}

/// What the caller's check returns between reads: go on, or stop with a
/// reason (VMM died, user interrupted).
pub type Check<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// A session with one VM's agent.
#[derive(Debug)]
pub struct AgentClient {
    endpoint: AgentEndpoint,
    reader: FrameReader<Socket>,
    /// Shared with stdin pumps; one frame per locked write.
    writer: Arc<Mutex<Socket>>,
    facts: GuestFacts,
    next_id: u32,
    /// Held while connected: this port is ours until the client drops.
    _port_lock: Option<Flock<File>>,
}

impl AgentClient {
    /// Connects through the first free socket of `sockets` (a lock file
    /// beside each socket says who uses it), waiting up to `timeout` for one
    /// to free up and for the agent's hello.
    ///
    /// `per_port` bounds the wait for one port's hello: a port the agent
    /// does not serve is then skipped for the next (during boot, give the
    /// whole `timeout`).
    pub fn connect_any(
        sockets: &[PathBuf],
        timeout: Duration,
        per_port: Duration,
        check: Check<'_>,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        loop {
            for socket in sockets {
                let Some(lock) = try_lock(socket) else {
                    continue;
                };
                let left = timeout.saturating_sub(started.elapsed());
                match Self::connect(socket, left.min(per_port), check) {
                    Ok(mut client) => {
                        client._port_lock = Some(lock);
                        return Ok(client);
                    }
                    Err(GuestError::Timeout { .. }) if started.elapsed() < timeout => continue,
                    Err(err) => return Err(err),
                }
            }
            if sockets.is_empty() || started.elapsed() >= timeout {
                return Err(GuestError::PortsBusy {
                    ports: sockets.len(),
                    waited: started.elapsed(),
                });
            }
            check().map_err(|reason| GuestError::Aborted { reason })?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A session for a running VM: over its vsock endpoint when it has one
    /// and it answers within `per_port`, else through the first free
    /// virtio-serial port (see [`AgentClient::connect_any`]).
    pub fn connect_vm(
        sockets: &crate::record::Sockets,
        timeout: Duration,
        per_port: Duration,
        check: Check<'_>,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        let token = sockets
            .vsock_token
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok());
        if let (Some(endpoint), Some(token)) = (&sockets.agent_vsock, token) {
            let token = Some(token.trim().to_owned());
            match Self::connect_endpoint(endpoint, token, per_port.min(timeout), check) {
                Ok(client) => return Ok(client),
                Err(GuestError::Aborted { reason }) => return Err(GuestError::Aborted { reason }),
                // Fall back to the serial ports, which every QEMU VM has.
                Err(_) => {}
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        Self::connect_any(&sockets.agent_sockets(), left, per_port, check)
    }

    /// Connects to one virtio-serial agent socket and waits for the
    /// agent's hello, at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration, check: Check<'_>) -> Result<Self, GuestError> {
        let endpoint = AgentEndpoint::Serial {
            socket: path.to_path_buf(),
        };
        Self::connect_endpoint(&endpoint, None, timeout, check)
    }

    /// Connects over any transport and waits for the agent's hello, at
    /// most `timeout`. vsock endpoints need the VM's `token` (what the
    /// agent reported over virtio-serial at boot).
    pub fn connect_endpoint(
        endpoint: &AgentEndpoint,
        token: Option<String>,
        timeout: Duration,
        check: Check<'_>,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        let stream = loop {
            match transport::open(endpoint) {
                Ok(stream) => break stream,
                Err(source) if started.elapsed() >= timeout => {
                    return Err(GuestError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    })
                }
                Err(_) => {
                    check().map_err(|reason| GuestError::Aborted { reason })?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let channel = |source| GuestError::Channel {
            endpoint: endpoint.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(POLL_INTERVAL))
            .map_err(|e| channel(e.into()))?;
        let writer = stream.try_clone().map_err(|e| channel(e.into()))?;
        let mut nonce_bytes = [0u8; 8];
        getrandom::getrandom(&mut nonce_bytes)
            .map_err(|e| channel(std::io::Error::other(e).into()))?;
        let nonce = u64::from_le_bytes(nonce_bytes);
        let mut client = Self {
            endpoint: endpoint.clone(),
            reader: FrameReader::new(stream),
            writer: Arc::new(Mutex::new(writer)),
            facts: GuestFacts::default(),
            next_id: (nonce as u32) | 1,
            _port_lock: None,
        };
        let hello = HostMessage::Hello {
            version: PROTOCOL_VERSION,
            nonce,
            token,
        };
        let mut last_hello = None::<Instant>;
        loop {
            if last_hello.is_none_or(|at| at.elapsed() >= HELLO_RETRY) {
                client.send(&hello)?;
                last_hello = Some(Instant::now());
            }
            match client.next_frame()? {
                Some(frame) if frame.kind == FrameKind::Guest => {
                    match GuestMessage::from_frame(&frame) {
                        Ok(GuestMessage::Hello {
                            version,
                            nonce: Some(got),
                            facts,
                        }) if got == nonce && version == PROTOCOL_VERSION => {
                            client.facts = facts;
                            return Ok(client);
                        }
                        Ok(GuestMessage::VersionMismatch { agent, host }) => {
                            return Err(GuestError::VersionMismatch { agent, host })
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            if started.elapsed() >= timeout {
                return Err(GuestError::Timeout {
                    waited: started.elapsed(),
                });
            }
            check().map_err(|reason| GuestError::Aborted { reason })?;
        }
    }

    /// A fresh id for an exec or copy of this session.
    pub(crate) fn allocate_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(2);
        id
    }

    pub(crate) fn writer(&self) -> Arc<Mutex<Socket>> {
        Arc::clone(&self.writer)
    }

    /// What the agent said about the guest.
    /// The channel this session runs over.
    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    pub fn facts(&self) -> &GuestFacts {
        &self.facts
    }

    /// Asks the guest to power off; does not wait for it.
    pub fn shutdown(&mut self) -> Result<(), GuestError> {
        self.send(&HostMessage::Shutdown { reboot: false })
    }

    pub(crate) fn send(&mut self, message: &HostMessage) -> Result<(), GuestError> {
        let frame = message.to_frame();
        self.write_frame(&frame)
    }

    fn write_frame(&mut self, frame: &Frame) -> Result<(), GuestError> {
        write_locked(&self.writer, frame).map_err(|e| GuestError::Channel {
            endpoint: self.endpoint.clone(),
            source: e.into(),
        })
    }

    /// The next frame, or None when the poll interval passed without one.
    /// Undecodable frames are skipped (the reader resynchronises).
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, GuestError> {
        match self.reader.read_frame() {
            Ok(frame) => Ok(Some(frame)),
            Err(FrameError::Io(err))
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(FrameError::TooLarge { .. } | FrameError::UnknownKind { .. }) => Ok(None),
            Err(source) => Err(GuestError::Channel {
                endpoint: self.endpoint.clone(),
                source,
            }),
        }
    }
}

pub(crate) fn write_locked(writer: &Mutex<Socket>, frame: &Frame) -> std::io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|poison| poison.into_inner());
    stream.write_all(&frame.encode())
}

/// An exclusive, non-blocking lock on `<socket>.lock`, or None if another
/// process holds it.
fn try_lock(socket: &Path) -> Option<Flock<File>> {
    crate::fsutil::lock_file(&socket.with_extension("lock"), false).ok()
}

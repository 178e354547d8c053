//! The host side of `hangar-proto`: wait for the agent's hello, run commands
//! with streamed output, ask the guest to power off.
//!
//! Never hangs: every read has [`POLL_INTERVAL`] as its timeout, and between
//! reads the caller's `check` says whether to go on (the VMM is still alive,
//! the user did not interrupt, the deadline has not passed).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hangar_proto::{
    ExecRequest, ExitStatus, Frame, FrameError, FrameKind, FrameReader, GuestFacts, GuestMessage,
    HostMessage, PROTOCOL_VERSION,
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
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent channel {path} failed")]
    Channel {
        path: PathBuf,
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
}

/// What the caller's check returns between reads: go on, or stop with a
/// reason (VMM died, user interrupted).
pub type Check<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// A session with one VM's agent.
#[derive(Debug)]
pub struct AgentClient {
    path: PathBuf,
    reader: FrameReader<UnixStream>,
    writer: UnixStream,
    facts: GuestFacts,
    next_id: u32,
}

impl AgentClient {
    /// Connects to the agent socket and waits for the agent's hello, at most
    /// `timeout`.
    pub fn connect(path: &Path, timeout: Duration, check: Check<'_>) -> Result<Self, GuestError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(source) if started.elapsed() >= timeout => {
                    return Err(GuestError::Connect {
                        path: path.to_path_buf(),
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
            path: path.to_path_buf(),
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
            path: path.to_path_buf(),
            reader: FrameReader::new(stream),
            writer,
            facts: GuestFacts::default(),
            next_id: (nonce as u32) | 1,
        };
        let hello = HostMessage::Hello {
            version: PROTOCOL_VERSION,
            nonce,
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

    /// What the agent said about the guest.
    pub fn facts(&self) -> &GuestFacts {
        &self.facts
    }

    /// Runs `request`, streaming its output to `sink`, until it exits.
    pub fn exec(
        &mut self,
        request: ExecRequest,
        sink: &mut dyn OutputSink,
        check: Check<'_>,
    ) -> Result<ExitStatus, GuestError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(2);
        self.send(&HostMessage::Exec { id, request })?;
        loop {
            if let Some(frame) = self.next_frame()? {
                if frame.stream == id && frame.kind == FrameKind::Stdout {
                    sink.on_stdout(&frame.payload);
                } else if frame.stream == id && frame.kind == FrameKind::Stderr {
                    sink.on_stderr(&frame.payload);
                } else if frame.kind == FrameKind::Guest {
                    match GuestMessage::from_frame(&frame) {
                        Ok(GuestMessage::ExecExited { id: done, status }) if done == id => {
                            return Ok(status)
                        }
                        Ok(GuestMessage::ExecFailed { id: done, message }) if done == id => {
                            return Err(GuestError::ExecFailed { message })
                        }
                        _ => {}
                    }
                }
                continue;
            }
            check().map_err(|reason| GuestError::Aborted { reason })?;
        }
    }

    /// Asks the guest to power off; does not wait for it.
    pub fn shutdown(&mut self) -> Result<(), GuestError> {
        self.send(&HostMessage::Shutdown { reboot: false })
    }

    fn send(&mut self, message: &HostMessage) -> Result<(), GuestError> {
        let frame = message.to_frame();
        self.write_frame(&frame)
    }

    fn write_frame(&mut self, frame: &Frame) -> Result<(), GuestError> {
        self.writer
            .write_all(&frame.encode())
            .map_err(|e| GuestError::Channel {
                path: self.path.clone(),
                source: e.into(),
            })
    }

    /// The next frame, or None when the poll interval passed without one.
    /// Undecodable frames are skipped (the reader resynchronises).
    fn next_frame(&mut self) -> Result<Option<Frame>, GuestError> {
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
                path: self.path.clone(),
                source,
            }),
        }
    }
}

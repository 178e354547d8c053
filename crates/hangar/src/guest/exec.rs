//! Commands in the guest: a streaming form ([`ExecStream`], one event at a
//! time) and the sink form built on it ([`AgentClient::exec_with`]).

use std::sync::{Arc, Mutex};

use socket2::Socket;
use std::time::{Duration, Instant};

use hangar_proto::{ExecRequest, ExitStatus, Frame, FrameKind, GuestMessage, HostMessage, TtySize};

use super::credit::CreditGate;
use super::{write_locked, AgentClient, Check, GuestError, OutputSink, POLL_INTERVAL};

/// Reports the terminal size the guest command should have; polled while
/// the command runs, a change is forwarded as a resize.
pub type TtySizeSource = Box<dyn FnMut() -> Option<TtySize> + Send>;

/// How a command gets its input, how long it may run, and its terminal.
#[derive(Default)]
pub struct ExecIo {
    /// Piped to the command's stdin (and closed at its end); None gives the
    /// command /dev/null.
    pub stdin: Option<Box<dyn std::io::Read + Send>>,
    /// Killed (SIGKILL) after this long.
    pub timeout: Option<Duration>,
    /// With a `tty` request: where its size comes from (the user's
    /// terminal); None keeps the size the request asked for.
    pub tty_size: Option<TtySizeSource>,
}

impl std::fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stdin", &self.stdin.is_some())
            .field("timeout", &self.timeout)
            .field("tty_size", &self.tty_size.is_some())
            .finish()
    }
}

/// One step of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; no event follows.
    Exited(ExitStatus),
}

/// After a timeout's SIGKILL, how long the exit report may take.
const KILL_REPORT_WAIT: Duration = Duration::from_secs(5);
const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
/// Stdin is sent in frames of at most this size.
const STDIN_CHUNK: usize = 32 * 1024;

/// A command running in the guest, read one event at a time.
pub struct ExecStream<'c> {
    client: &'c mut AgentClient,
    id: u32,
    timeout: Option<Duration>,
    tty_size: Option<TtySizeSource>,
    last_size: Option<TtySize>,
    started: Instant,
    killed_at: Option<Instant>,
    last_check: Instant,
    finished: bool,
    /// Stdin flow control, when stdin is piped.
    credits: Option<Arc<CreditGate>>,
}

impl Drop for ExecStream<'_> {
    fn drop(&mut self) {
        // The stdin pump stops waiting for credit that will never come.
        if let Some(credits) = &self.credits {
            credits.close();
        }
    }
}

impl std::fmt::Debug for ExecStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("id", &self.id)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Starts `request` and returns its stream of events.
    pub fn start_exec(
        &mut self,
        mut request: ExecRequest,
        io: ExecIo,
    ) -> Result<ExecStream<'_>, GuestError> {
        let id = self.allocate_id();
        request.stdin = io.stdin.is_some();
        let last_size = request.tty;
        self.send(&HostMessage::Exec { id, request })?;
        let credits = io.stdin.map(|input| {
            let credits = CreditGate::new();
            pump_stdin(id, input, self.writer(), Arc::clone(&credits));
            credits
        });
        Ok(ExecStream {
            client: self,
            id,
            timeout: io.timeout,
            tty_size: io.tty_size,
            last_size,
            started: Instant::now(),
            killed_at: None,
            last_check: Instant::now(),
            finished: false,
            credits,
        })
    }

    /// Runs `request`, streaming its output to `sink`, until it exits.
    pub fn exec(
        &mut self,
        request: ExecRequest,
        sink: &mut dyn OutputSink,
        check: Check<'_>,
    ) -> Result<ExitStatus, GuestError> {
        self.exec_with(request, ExecIo::default(), sink, check)
    }

    /// Like [`AgentClient::exec`], with stdin, a time limit and a terminal.
    /// Ctrl-C (the process-wide interrupt flag) is forwarded as SIGINT to
    /// the command, which decides what it means.
    pub fn exec_with(
        &mut self,
        request: ExecRequest,
        io: ExecIo,
        sink: &mut dyn OutputSink,
        check: Check<'_>,
    ) -> Result<ExitStatus, GuestError> {
        let mut stream = self.start_exec(request, io)?;
        loop {
            match stream.next_event(check)? {
                Some(ExecEvent::Stdout(chunk)) => sink.on_stdout(&chunk),
                Some(ExecEvent::Stderr(chunk)) => sink.on_stderr(&chunk),
                Some(ExecEvent::Exited(status)) => return Ok(status),
                None => {}
            }
        }
    }
}

impl ExecStream<'_> {
    /// The next event, or None when [`POLL_INTERVAL`] passed without one
    /// (call again). Between reads it forwards Ctrl-C as SIGINT, enforces
    /// the timeout, forwards terminal resizes and runs `check`.
    pub fn next_event(&mut self, check: Check<'_>) -> Result<Option<ExecEvent>, GuestError> {
        if self.finished {
            return Err(GuestError::Aborted {
                reason: "the command already ended".into(),
            });
        }
        let frame = self.client.next_frame()?;
        let event = frame.and_then(|frame| self.event_of(frame));
        let event = match event {
            Some(Ok(event)) => Some(event),
            Some(Err(err)) => {
                self.finished = true;
                return Err(err);
            }
            None => None,
        };
        if matches!(event, Some(ExecEvent::Exited(_))) {
            self.finished = true;
            return Ok(event);
        }
        // Checks run at least every POLL_INTERVAL, also while output
        // floods in without pause.
        if event.is_none() || self.last_check.elapsed() >= POLL_INTERVAL {
            self.last_check = Instant::now();
            self.between_reads(check)?;
        }
        Ok(event)
    }

    /// Sends signal number `signal` to the command.
    pub fn signal(&mut self, signal: i32) -> Result<(), GuestError> {
        self.client.send(&HostMessage::Signal {
            id: self.id,
            signal,
        })
    }

    /// Resizes the command's terminal (a `tty` request).
    pub fn resize(&mut self, size: TtySize) -> Result<(), GuestError> {
        self.client.send(&HostMessage::Resize {
            id: self.id,
            rows: size.rows,
            cols: size.cols,
        })
    }

    fn event_of(&mut self, frame: Frame) -> Option<Result<ExecEvent, GuestError>> {
        if frame.stream == self.id && frame.kind == FrameKind::Stdout {
            return Some(Ok(ExecEvent::Stdout(frame.payload)));
        }
        if frame.stream == self.id && frame.kind == FrameKind::Stderr {
            return Some(Ok(ExecEvent::Stderr(frame.payload)));
        }
        if frame.kind != FrameKind::Guest {
            return None;
        }
        match GuestMessage::from_frame(&frame) {
            Ok(GuestMessage::ExecExited { id, status }) if id == self.id => {
                Some(match (self.killed_at, self.timeout) {
                    (Some(_), Some(after)) => Err(GuestError::ExecTimeout { after }),
                    _ => Ok(ExecEvent::Exited(status)),
                })
            }
            Ok(GuestMessage::ExecFailed { id, message }) if id == self.id => {
                Some(Err(GuestError::ExecFailed { message }))
            }
            Ok(GuestMessage::StdinCredit { id, bytes }) if id == self.id => {
                if let Some(credits) = &self.credits {
                    credits.give(u64::from(bytes));
                }
                None
            }
            _ => None,
        }
    }

    fn between_reads(&mut self, check: Check<'_>) -> Result<(), GuestError> {
        if crate::interrupt::take() {
            self.signal(SIGINT)?;
        }
        match (self.timeout, self.killed_at) {
            (Some(after), None) if self.started.elapsed() >= after => {
                self.signal(SIGKILL)?;
                self.killed_at = Some(Instant::now());
            }
            (Some(after), Some(at)) if at.elapsed() >= KILL_REPORT_WAIT => {
                self.finished = true;
                return Err(GuestError::ExecTimeout { after });
            }
            _ => {}
        }
        if let Some(size) = self.tty_size.as_mut().and_then(|source| source()) {
            if self.last_size != Some(size) {
                self.last_size = Some(size);
                self.resize(size)?;
            }
        }
        check().map_err(|reason| GuestError::Aborted { reason })
    }
}

/// Sends `input` to the command `id` as stdin frames, then closes its
/// stdin. Runs on its own thread so a slow reader never stalls output; it
/// ends with its input or when the channel breaks.
fn pump_stdin(
    id: u32,
    mut input: Box<dyn std::io::Read + Send>,
    writer: Arc<Mutex<Socket>>,
    credits: Arc<CreditGate>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match input.read(&mut buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !credits.acquire(n as u64) {
                        return;
                    }
                    let frame = Frame {
                        kind: FrameKind::Stdin,
                        stream: id,
                        payload: buf[..n].to_vec(),
                    };
                    if write_locked(&writer, &frame).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = write_locked(&writer, &HostMessage::CloseStdin { id }.to_frame());
    });
}

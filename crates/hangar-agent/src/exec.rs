//! Running one command and streaming its output as data frames.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::Duration;

use hangar_proto::{ExecRequest, Frame, FrameKind, GuestMessage};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use std::fs::File;

use crate::pty::Pty;
use crate::reaper::Reaper;
use crate::session::{self, Sender, Table};

/// Output is sent in chunks of at most this size, as soon as it is read.
const CHUNK: usize = 32 * 1024;

/// After the command exits, how long its output pipes may stay open *and
/// idle* (held by a background child) before the exit is reported anyway.
const OUTPUT_IDLE_GRACE: Duration = Duration::from_millis(500);

/// Everything one command needs, handed to its thread.
#[derive(Debug)]
pub struct Job {
    pub id: u32,
    pub request: ExecRequest,
    /// Queued stdin, when the host pipes it.
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub sender: Sender,
    pub reaper: Reaper,
    pub table: Table,
}

pub fn spawn(job: Job) {
    std::thread::spawn(move || {
        run(job);
    });
}

fn run(job: Job) {
    let Job {
        id,
        request,
        stdin,
        sender,
        reaper,
        table,
    } = job;
    let forget = || {
        session::lock(&table).remove(&id);
    };
    let Some((program, args)) = request.argv.split_first() else {
        forget();
        sender.send_message(&GuestMessage::ExecFailed {
            id,
            message: "empty argv: give a program to run".into(),
        });
        return;
    };
    let fail = |message: String| {
        forget();
        sender.send_message(&GuestMessage::ExecFailed { id, message });
    };
    let cwd = request.cwd.as_deref().unwrap_or("/");
    let path_var = request
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map_or(crate::init::DEFAULT_PATH, |(_, value)| value.as_str());
    // Looked up as the agent (root) sees the files, so only for commands
    // that run as root: `-u USER` keeps execvp's search as that user (it
    // skips files the user may not run), and forks anyway to drop to it.
    let resolved = match request.user {
        None => crate::program::resolve(program, path_var, Path::new(cwd)),
        Some(_) => None,
    };
    let mut command = match resolved {
        Some(file) => {
            let mut command = Command::new(file);
            // argv[0] stays what the host asked for (busybox applets and
            // `ps` rely on it).
            command.arg0(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .env("PATH", crate::init::DEFAULT_PATH)
        .current_dir(cwd);
    if let Some(spec) = &request.user {
        match crate::user::lookup(spec) {
            Ok(identity) => crate::user::apply(&mut command, &identity),
            Err(message) => return fail(message),
        }
    }
    if request.tty.is_some() {
        command.env("TERM", "xterm");
    }
    command.envs(request.env.iter().map(|(k, v)| (k, v)));
    // Every spawn in the agent holds this lock, so none can inherit the
    // terminal's fds in the moment before they are marked close-on-exec.
    let mut guard = reaper.lock();
    let pty = match request.tty.map(Pty::open).transpose() {
        Ok(pty) => pty,
        Err(err) => return fail(format!("cannot open a pseudo-terminal: {err}")),
    };
    let wired = match &pty {
        Some(pty) => pty.attach(&mut command),
        None => {
            command
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            Ok(())
        }
    };
    if let Err(err) = wired {
        return fail(format!("cannot set up the terminal: {err}"));
    }
    let spawned = command.spawn();
    // The command holds the terminal side now; the agent's copies must go,
    // or reading the controller would never see the command's end.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            drop(guard);
            return fail(if std::path::Path::new(cwd).is_dir() {
                format!("{program}: {err}")
            } else {
                format!("working directory {cwd} does not exist in the guest")
            });
        }
    };
    let pid = child.id();
    let exit_rx = reaper.register(&mut guard, pid);
    drop(guard);
    let controller = pty.map(|pty| Arc::new(pty.controller));
    if let Some(entry) = session::lock(&table).get_mut(&id) {
        entry.pid = Some(pid);
        entry.tty.clone_from(&controller);
    }
    let pumps = match controller {
        Some(controller) => {
            if let Some(queue) = stdin {
                write_terminal(Arc::clone(&controller), queue, Credits::new(&sender, id));
            }
            sender.send_message(&GuestMessage::ExecStarted { id, pid });
            [
                Some(pump(SharedFile(controller), FrameKind::Stdout, id, &sender)),
                None,
            ]
        }
        None => {
            if let (Some(pipe), Some(queue)) = (child.stdin.take(), stdin) {
                write_stdin(pipe, queue, Credits::new(&sender, id));
            }
            sender.send_message(&GuestMessage::ExecStarted { id, pid });
            [
                child
                    .stdout
                    .take()
                    .map(|out| pump(out, FrameKind::Stdout, id, &sender)),
                child
                    .stderr
                    .take()
                    .map(|err| pump(err, FrameKind::Stderr, id, &sender)),
            ]
        }
    };
    let status = loop {
        match exit_rx.recv_timeout(Duration::from_secs(3600)) {
            Ok(status) => break status,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
    };
    // Reaped: no signal may reach this pid any more.
    forget();
    for pump in pumps.into_iter().flatten() {
        pump.finish();
    }
    sender.send_message(&GuestMessage::ExecExited { id, status });
}

/// Tells the host how much of an exec's or copy's stdin was consumed, so
/// it may send more (`StdinCredit`).
#[derive(Debug)]
pub struct Credits {
    sender: Sender,
    id: u32,
}

impl Credits {
    pub fn new(sender: &Sender, id: u32) -> Self {
        Self {
            sender: sender.clone(),
            id,
        }
    }

    pub fn consumed(&self, bytes: usize) {
        self.sender.send_message(&GuestMessage::StdinCredit {
            id: self.id,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        });
    }
}

/// Writes queued stdin into the command; the pipe closes when the host
/// closes stdin (the queue's sender is dropped).
fn write_stdin(
    mut pipe: std::process::ChildStdin,
    queue: mpsc::Receiver<Vec<u8>>,
    credits: Credits,
) {
    std::thread::spawn(move || {
        use std::io::Write;
        for chunk in queue {
            if pipe.write_all(&chunk).is_err() {
                return;
            }
            credits.consumed(chunk.len());
        }
    });
}

/// Writes queued stdin into a terminal. When the host closes stdin the
/// terminal stays open (it carries the output); an end-of-file character
/// tells a reading shell that input ended, as at a real terminal.
fn write_terminal(controller: Arc<File>, queue: mpsc::Receiver<Vec<u8>>, credits: Credits) {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut terminal = &*controller;
        for chunk in queue {
            if terminal.write_all(&chunk).is_err() {
                return;
            }
            credits.consumed(chunk.len());
        }
        let _ = terminal.write_all(&[EOF_CHARACTER]);
    });
}

/// Ctrl-D, the default VEOF of a new terminal.
const EOF_CHARACTER: u8 = 0x04;

/// Reads through a shared file (the terminal's controller side, also used
/// for input and resizes).
struct SharedFile(Arc<File>);

impl Read for SharedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// An output pipe being forwarded, with a count of chunks sent so far.
struct Pump {
    handle: JoinHandle<()>,
    sent: Arc<AtomicU64>,
}

impl Pump {
    /// Waits for the pipe's end while output still flows. A pipe that stays
    /// open but idle (a background child holding it) is left after
    /// [`OUTPUT_IDLE_GRACE`], so the exit is still reported.
    fn finish(self) {
        let mut last = self.sent.load(Ordering::SeqCst);
        let mut idle_since = std::time::Instant::now();
        while !self.handle.is_finished() {
            let now = self.sent.load(Ordering::SeqCst);
            if now != last {
                last = now;
                idle_since = std::time::Instant::now();
            } else if idle_since.elapsed() >= OUTPUT_IDLE_GRACE {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.handle.join();
    }
}

fn pump(mut pipe: impl Read + Send + 'static, kind: FrameKind, id: u32, sender: &Sender) -> Pump {
    let sender = sender.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let handle = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    sender.send_frame(&Frame {
                        kind,
                        stream: id,
                        payload: buf[..n].to_vec(),
                    });
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    Pump { handle, sent }
}

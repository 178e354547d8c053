//! Running one command and streaming its output as data frames.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::Duration;

use hangar_proto::{ExecRequest, Frame, FrameKind, GuestMessage};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

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
    let mut command = Command::new(program);
    command
        .args(args)
        .env("PATH", crate::init::DEFAULT_PATH)
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .current_dir(request.cwd.as_deref().unwrap_or("/"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let mut guard = reaper.lock();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            drop(guard);
            forget();
            let cwd = request.cwd.as_deref().unwrap_or("/");
            let message = if std::path::Path::new(cwd).is_dir() {
                format!("{program}: {err}")
            } else {
                format!("working directory {cwd} does not exist in the guest")
            };
            sender.send_message(&GuestMessage::ExecFailed { id, message });
            return;
        }
    };
    let pid = child.id();
    let exit_rx = Reaper::register(&mut guard, pid);
    drop(guard);
    if let Some(entry) = session::lock(&table).get_mut(&id) {
        entry.pid = Some(pid);
    }
    if let (Some(pipe), Some(queue)) = (child.stdin.take(), stdin) {
        write_stdin(pipe, queue);
    }
    sender.send_message(&GuestMessage::ExecStarted { id, pid });

    let pumps = [
        child
            .stdout
            .take()
            .map(|out| pump(out, FrameKind::Stdout, id, &sender)),
        child
            .stderr
            .take()
            .map(|err| pump(err, FrameKind::Stderr, id, &sender)),
    ];
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

/// Writes queued stdin into the command; the pipe closes when the host
/// closes stdin (the queue's sender is dropped).
fn write_stdin(mut pipe: std::process::ChildStdin, queue: mpsc::Receiver<Vec<u8>>) {
    std::thread::spawn(move || {
        use std::io::Write;
        for chunk in queue {
            if pipe.write_all(&chunk).is_err() {
                return;
            }
        }
    });
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

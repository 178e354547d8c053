//! Running one command and streaming its output as data frames.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::Duration;

use hangar_proto::{ExecRequest, Frame, FrameKind, GuestMessage};

use crate::reaper::Reaper;
use crate::session::Sender;

/// Output is sent in chunks of at most this size, as soon as it is read.
const CHUNK: usize = 32 * 1024;

/// After the command exits, how long its output pipes may stay open (held by
/// a background child) before the exit is reported anyway.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(500);

pub fn spawn(id: u32, request: ExecRequest, sender: Sender, reaper: Reaper) {
    std::thread::spawn(move || run(id, &request, &sender, &reaper));
}

fn run(id: u32, request: &ExecRequest, sender: &Sender, reaper: &Reaper) {
    let Some((program, args)) = request.argv.split_first() else {
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let mut guard = reaper.lock();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            drop(guard);
            sender.send_message(&GuestMessage::ExecFailed {
                id,
                message: format!("{program}: {err}"),
            });
            return;
        }
    };
    let exit_rx = Reaper::register(&mut guard, child.id());
    drop(guard);
    sender.send_message(&GuestMessage::ExecStarted {
        id,
        pid: child.id(),
    });

    let readers = [
        child
            .stdout
            .take()
            .map(|out| pump(out, FrameKind::Stdout, id, sender)),
        child
            .stderr
            .take()
            .map(|err| pump(err, FrameKind::Stderr, id, sender)),
    ];
    let status = loop {
        match exit_rx.recv_timeout(Duration::from_secs(3600)) {
            Ok(status) => break status,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
    };
    for reader in readers.into_iter().flatten() {
        join_with_grace(reader);
    }
    sender.send_message(&GuestMessage::ExecExited { id, status });
}

fn pump(
    mut pipe: impl Read + Send + 'static,
    kind: FrameKind,
    id: u32,
    sender: &Sender,
) -> JoinHandle<()> {
    let sender = sender.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => sender.send_frame(&Frame {
                    kind,
                    stream: id,
                    payload: buf[..n].to_vec(),
                }),
            }
        }
    })
}

fn join_with_grace(handle: JoinHandle<()>) {
    let deadline = std::time::Instant::now() + OUTPUT_DRAIN_GRACE;
    while !handle.is_finished() {
        if std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = handle.join();
}

//! `hangar cp` in the guest: unpack a tar stream the host sends into a
//! path, or pack a path into a tar stream for the host. The rules (no
//! writes through symlinks, `docker cp` destinations) are in
//! `hangar_proto::transfer`, shared with the host.

use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use hangar_proto::transfer::{self, UnpackOptions};
use hangar_proto::{CopySummary, Frame, FrameKind, GuestMessage};

use crate::exec::Credits;
use crate::session::{self, Sender, Table};

/// Tar data goes out in frames of at most this size.
const CHUNK: usize = 32 * 1024;

/// Unpacks the stdin frames of `id` into `path`, then reports.
pub fn copy_in(
    id: u32,
    path: String,
    queue: mpsc::Receiver<Vec<u8>>,
    sender: Sender,
    table: Table,
) {
    std::thread::spawn(move || {
        let input = QueueReader {
            queue,
            chunk: Vec::new(),
            at: 0,
            credits: Credits::new(&sender, id),
        };
        // The host is trusted with what it writes into its own guest,
        // setuid bits included (as root, like `docker cp`).
        let options = UnpackOptions {
            keep_setid_bits: true,
            ..Default::default()
        };
        let result = transfer::unpack(input, &guest_path(&path), options);
        // Stdin that still arrives (padding, or data after an error) is
        // dropped from here on.
        session::lock(&table).remove(&id);
        report(&sender, id, result);
    });
}

/// Packs `path` and sends it as stdout frames of `id`, then reports.
pub fn copy_out(id: u32, path: String, sender: Sender) {
    std::thread::spawn(move || {
        let out = BufWriter::with_capacity(
            CHUNK,
            FrameWriter {
                sender: sender.clone(),
                id,
            },
        );
        let result = transfer::pack(&guest_path(&path), out);
        report(&sender, id, result);
    });
}

fn report(sender: &Sender, id: u32, result: Result<CopySummary, transfer::TransferError>) {
    let (error, summary) = match result {
        Ok(summary) => (None, summary),
        Err(err) => (Some(err.to_string()), CopySummary::default()),
    };
    sender.send_message(&GuestMessage::CopyDone { id, error, summary });
}

/// Relative guest paths are taken from `/`, whatever the agent's own
/// working directory (it differs when the agent runs as a service).
fn guest_path(path: &str) -> PathBuf {
    Path::new("/").join(path)
}

/// The stdin frames of one copy as a byte stream; ends when the host
/// closes stdin.
struct QueueReader {
    queue: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
    credits: Credits,
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.queue.recv() {
                Ok(chunk) => {
                    // Taken off the queue: the host may send that much more.
                    self.credits.consumed(chunk.len());
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Sends everything written as stdout frames of one copy.
struct FrameWriter {
    sender: Sender,
    id: u32,
}

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for piece in buf.chunks(CHUNK) {
            self.sender.send_frame(&Frame {
                kind: FrameKind::Stdout,
                stream: self.id,
                payload: piece.to_vec(),
            });
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

//! `hangar cp` through the agent: a tar stream (`hangar_proto::transfer`)
//! in stdin frames into the guest, or in stdout frames out of it.

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use socket2::Socket;

use hangar_proto::transfer::{self, TransferError, UnpackOptions};
use hangar_proto::{CopySummary, Frame, FrameKind, GuestMessage, HostMessage};

use super::credit::CreditGate;
use super::{write_locked, AgentClient, Check, GuestError};

/// Tar data goes out in frames of at most this size.
const CHUNK: usize = 32 * 1024;

impl AgentClient {
    /// Copies the host path `source` (file, directory or symlink) to
    /// `dest` in the guest, with `docker cp`'s rules.
    pub fn copy_in(
        &mut self,
        source: &Path,
        dest: &str,
        check: Check<'_>,
    ) -> Result<CopySummary, GuestError> {
        if std::fs::symlink_metadata(source).is_err() {
            return Err(TransferError::NoSource {
                path: source.to_path_buf(),
            }
            .into());
        }
        let id = self.allocate_id();
        self.send(&HostMessage::CopyIn {
            id,
            path: dest.to_owned(),
        })?;
        let cancel = Arc::new(AtomicBool::new(false));
        let credits = CreditGate::new();
        let packer = {
            let writer = self.writer();
            let cancel = Arc::clone(&cancel);
            let credits = Arc::clone(&credits);
            let source = source.to_path_buf();
            std::thread::spawn(move || {
                let out = BufWriter::with_capacity(
                    CHUNK,
                    StdinFrames {
                        writer: Arc::clone(&writer),
                        id,
                        cancel,
                        credits,
                    },
                );
                let packed = transfer::pack(&source, out);
                // Closing stdin ends the guest's stream, also after an error
                // here (the guest then reports a short stream).
                let _ = write_locked(&writer, &HostMessage::CloseStdin { id }.to_frame());
                packed
            })
        };
        let done = self.wait_copy_done(id, &credits, check);
        cancel.store(true, Ordering::SeqCst);
        credits.close();
        // On error the packer is not joined: it stops at its next write.
        let (error, _) = done?;
        let packed = packer.join().unwrap_or(Err(TransferError::Empty));
        match (packed, error) {
            // A local cause (a file that changed, a fifo) explains the
            // guest's short stream best ...
            (Err(err), _) if !matches!(err, TransferError::Stream(_)) => Err(err.into()),
            // ... while a broken stream here is the guest's error seen
            // from this side (it stopped reading).
            (_, Some(message)) => Err(GuestError::CopyFailed { message }),
            (Err(err), None) => Err(err.into()),
            (Ok(summary), None) => Ok(summary),
        }
    }

    /// Copies the guest path `source` to `dest` on the host, with `docker
    /// cp`'s rules. What the guest sends is checked like any untrusted
    /// archive, and setuid/setgid bits are dropped.
    pub fn copy_out(
        &mut self,
        source: &str,
        dest: &Path,
        check: Check<'_>,
    ) -> Result<CopySummary, GuestError> {
        let id = self.allocate_id();
        self.send(&HostMessage::CopyOut {
            id,
            path: source.to_owned(),
        })?;
        let mut stream = CopyStream {
            client: self,
            id,
            check,
            chunk: Vec::new(),
            at: 0,
            done: None,
            failure: None,
            last_check: std::time::Instant::now(),
        };
        // The host names what lands in its directory, not the guest.
        let options = UnpackOptions {
            root_name: Some(transfer::expected_root_name(source)),
            ..Default::default()
        };
        let unpacked = transfer::unpack(&mut stream, dest, options);
        // Read to the end (the tail of the stream, or all of it after a
        // local error) so the session stays in step.
        let mut sink = [0u8; CHUNK];
        while stream.done.is_none() && stream.failure.is_none() {
            if stream.read(&mut sink).is_err() {
                break;
            }
        }
        if let Some(failure) = stream.failure.take() {
            return Err(failure);
        }
        match (stream.done.take(), unpacked) {
            (Some(Some(message)), _) => Err(GuestError::CopyFailed { message }),
            (_, Err(err)) => Err(err.into()),
            (_, Ok(summary)) => Ok(summary),
        }
    }

    /// Waits for the `CopyDone` of `id`: its error, if any, and summary.
    fn wait_copy_done(
        &mut self,
        id: u32,
        credits: &CreditGate,
        check: Check<'_>,
    ) -> Result<(Option<String>, CopySummary), GuestError> {
        loop {
            match self.next_frame()? {
                Some(frame) if frame.kind == FrameKind::Guest => {
                    match GuestMessage::from_frame(&frame) {
                        Ok(GuestMessage::CopyDone {
                            id: done,
                            error,
                            summary,
                        }) if done == id => return Ok((error, summary)),
                        Ok(GuestMessage::StdinCredit { id: done, bytes }) if done == id => {
                            credits.give(u64::from(bytes));
                        }
                        _ => {}
                    }
                }
                Some(_) => {}
                None => check().map_err(|reason| GuestError::Aborted { reason })?,
            }
        }
    }
}

/// Everything written becomes stdin frames of one copy.
struct StdinFrames {
    writer: Arc<Mutex<Socket>>,
    id: u32,
    cancel: Arc<AtomicBool>,
    credits: Arc<CreditGate>,
}

impl Write for StdinFrames {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::other("the copy ended in the guest"));
        }
        for piece in buf.chunks(CHUNK) {
            if !self.credits.acquire(piece.len() as u64) {
                return Err(io::Error::other("the copy ended in the guest"));
            }
            let frame = Frame {
                kind: FrameKind::Stdin,
                stream: self.id,
                payload: piece.to_vec(),
            };
            write_locked(&self.writer, &frame)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The stdout frames of one `CopyOut` as a byte stream, ending at its
/// `CopyDone`.
struct CopyStream<'a, 'c> {
    client: &'a mut AgentClient,
    id: u32,
    check: Check<'c>,
    chunk: Vec<u8>,
    at: usize,
    /// Set at `CopyDone`: the guest's error, if any.
    done: Option<Option<String>>,
    /// The channel broke or the caller's check stopped the copy.
    failure: Option<GuestError>,
    /// The check runs at least this often, also while data floods in.
    last_check: std::time::Instant,
}

impl Read for CopyStream<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.done.is_some() {
                return Ok(0);
            }
            if self.failure.is_some() {
                return Err(io::Error::other("the copy was stopped"));
            }
            let frame = self.client.next_frame();
            if matches!(frame, Ok(None)) || self.last_check.elapsed() >= super::POLL_INTERVAL {
                self.last_check = std::time::Instant::now();
                if let Err(reason) = (self.check)() {
                    self.failure = Some(GuestError::Aborted { reason });
                    continue;
                }
            }
            match frame {
                Ok(Some(frame)) if frame.stream == self.id && frame.kind == FrameKind::Stdout => {
                    self.chunk = frame.payload;
                    self.at = 0;
                }
                Ok(Some(frame)) if frame.kind == FrameKind::Guest => {
                    if let Ok(GuestMessage::CopyDone { id, error, .. }) =
                        GuestMessage::from_frame(&frame)
                    {
                        if id == self.id {
                            self.done = Some(error);
                        }
                    }
                }
                Ok(Some(_)) | Ok(None) => {}
                Err(err) => self.failure = Some(err),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

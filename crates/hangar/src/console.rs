//! Attaching to a VM's serial console (`hangar console`): bytes flow both
//! ways between the console socket and the caller's input/output until the
//! detach key is typed or the VM goes away. Terminal modes are the
//! caller's business; this only moves bytes.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Ctrl-] : the detach key of telnet and `virsh console`.
pub const DETACH_KEY: u8 = 0x1d;
/// How often the input wait wakes up to notice the VM went away.
const POLL_MS: u16 = 100;

/// Why an attach ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachEnd {
    /// The user typed the detach key (or the input ended).
    Detached,
    /// The console closed: the VM stopped.
    ConsoleClosed,
}

/// Bridges `socket` and the caller's streams until detach or console end.
pub fn attach<I, O>(
    socket: &Path,
    mut input: I,
    mut output: O,
    detach_key: u8,
) -> io::Result<AttachEnd>
where
    I: Read + AsFd,
    O: Write + Send + 'static,
{
    let mut stream = UnixStream::connect(socket)?;
    let mut from_vm = stream.try_clone()?;
    let closed = Arc::new(AtomicBool::new(false));
    let closed_writer = Arc::clone(&closed);
    let pump = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from_vm.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if output
                        .write_all(&buf[..n])
                        .and_then(|()| output.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        closed_writer.store(true, Ordering::SeqCst);
    });
    let mut buf = [0u8; 1024];
    let end = loop {
        if closed.load(Ordering::SeqCst) {
            break AttachEnd::ConsoleClosed;
        }
        let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(POLL_MS)).map_err(io::Error::from)?;
        if ready == 0 {
            continue;
        }
        let n = input.read(&mut buf)?;
        if n == 0 {
            // Input ended (a pipe): let the guest's answer arrive, then go.
            std::thread::sleep(Duration::from_millis(300));
            break AttachEnd::Detached;
        }
        let chunk = &buf[..n];
        if let Some(at) = chunk.iter().position(|b| *b == detach_key) {
            stream.write_all(&chunk[..at])?;
            break AttachEnd::Detached;
        }
        if stream.write_all(chunk).is_err() {
            break AttachEnd::ConsoleClosed;
        }
    };
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = pump.join();
    Ok(end)
}

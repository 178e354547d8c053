//! Pseudo-terminals for `exec -t`: the command gets the terminal side as
//! stdin, stdout, stderr and controlling terminal; the agent keeps the
//! controller side to forward bytes and window sizes.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use hangar_proto::TtySize;

#[derive(Debug)]
pub struct Pty {
    /// The agent's side: reads the command's output, takes its input.
    pub controller: File,
    /// The command's side.
    pub terminal: File,
}

impl Pty {
    pub fn open(size: TtySize) -> io::Result<Self> {
        let mut controller: libc::c_int = -1;
        let mut terminal: libc::c_int = -1;
        let winsize = winsize(size);
        // SAFETY: openpty writes two fds into the given ints; the name
        // pointer may be null, the termios pointer too, the winsize is
        // valid for the call.
        let rc = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                &winsize,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Commands spawned by other sessions must not inherit them.
        set_cloexec(controller)?;
        set_cloexec(terminal)?;
        // SAFETY: both fds were just opened and are owned by nobody else.
        Ok(unsafe {
            Self {
                controller: File::from_raw_fd(controller),
                terminal: File::from_raw_fd(terminal),
            }
        })
    }

    /// Wires `command` to the terminal side: stdio, a new session, and the
    /// terminal as its controlling terminal (so Ctrl-C and job control
    /// work).
    pub fn attach(&self, command: &mut Command) -> io::Result<()> {
        command
            .stdin(Stdio::from(self.terminal.try_clone()?))
            .stdout(Stdio::from(self.terminal.try_clone()?))
            .stderr(Stdio::from(self.terminal.try_clone()?));
        // SAFETY: runs in the child after fork, before exec: setsid and
        // ioctl are async-signal-safe; fd 0 is the terminal by then.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground
/// process group.
pub fn resize(controller: &File, size: TtySize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let winsize = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let rc = unsafe { libc::ioctl(controller.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with plain integer arguments.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

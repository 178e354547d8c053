//! The agent's vsock listener: every accepted connection is one host
//! session (vsock takes any number at once, unlike a virtio-serial port).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::reaper::Reaper;
use crate::session::{self, OnEnd};

/// How long to wait for the vsock transport to come up after its modules
/// are loaded.
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on `port` (any CID) and serves connections on their own threads.
/// Returns once listening; errors if the transport never came up.
pub fn spawn_listener(port: u32, reaper: Reaper, is_init: bool) -> io::Result<()> {
    let listener = listen(port)?;
    std::thread::spawn(move || loop {
        match accept(&listener) {
            Ok(conn) => {
                let reaper = reaper.clone();
                std::thread::spawn(move || {
                    let serve = || -> io::Result<()> {
                        let output = File::from(conn.try_clone()?);
                        session::serve_channel(
                            File::from(conn),
                            output,
                            OnEnd::Finish,
                            reaper,
                            is_init,
                        )
                    };
                    if let Err(err) = serve() {
                        crate::log(&format!("vsock session: {err}"));
                    }
                });
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                crate::log(&format!("vsock accept: {err}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    crate::log(&format!("listening on vsock port {port}"));
    Ok(())
}

fn listen(port: u32) -> io::Result<OwnedFd> {
    let deadline = Instant::now() + TRANSPORT_TIMEOUT;
    loop {
        match try_listen(port) {
            Ok(fd) => return Ok(fd),
            // The address family appears once the transport module is in.
            Err(err)
                if err.raw_os_error() == Some(libc::EAFNOSUPPORT) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err),
        }
    }
}

fn try_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers; a non-negative result is a new
    // fd that nobody else owns.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes for the call.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    // SAFETY: listen takes an fd we own and a backlog.
    if bound != 0 || unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: null address pointers are allowed; the result is a new fd.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

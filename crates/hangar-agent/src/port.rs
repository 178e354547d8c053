//! Finding and opening the agent's virtio-serial port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The port device. A read returns 0 bytes while no host is connected: the
/// session then drops any half-received frame and waits for the next host.
#[derive(Debug)]
pub struct AgentPort {
    file: File,
}

impl AgentPort {
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// What waits for this port's next host.
    pub fn host_wait(&self) -> io::Result<HostWait> {
        Ok(HostWait {
            file: self.file.try_clone()?,
            armed_for: None,
        })
    }
}

/// Waits for a host to connect to a port. A port has no blocking way to
/// wait for that (a read returns 0 at once, poll reports it readable), but
/// the driver raises SIGIO on a file with O_ASYNC when the host connects
/// (and when data comes). The signal goes to the waiting thread only
/// (F_SETOWN_EX), is blocked in every agent thread ([`block_host_signal`])
/// and is taken with `sigtimedwait`: an idle guest no longer wakes every
/// 20 ms per port, and a new host is seen at once.
#[derive(Debug)]
pub struct HostWait {
    file: File,
    /// The thread SIGIO is directed at.
    armed_for: Option<libc::pid_t>,
}

/// `F_SETOWN_EX` and `F_OWNER_TID` (Linux's fcntl.h; not in the libc crate
/// for every target).
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// How long to sleep between reads where SIGIO cannot be armed.
const FALLBACK_POLL: Duration = Duration::from_millis(20);

impl HostWait {
    /// Returns once the host may have connected (SIGIO from this port, a
    /// stale one included: the caller just reads again) or after `max`.
    pub fn wait(&mut self, max: Duration) {
        match self.arm() {
            // Armed just now: a host that connected between the caller's
            // read and the arming raised no signal, so read again first.
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => {
                std::thread::sleep(FALLBACK_POLL);
                return;
            }
        }
        let set = sigio_set();
        let timeout = libc::timespec {
            tv_sec: libc::time_t::try_from(max.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: max.subsec_nanos().into(),
        };
        // SAFETY: both pointers are to values on this stack; no siginfo is
        // asked for.
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
    }

    /// Directs the port's SIGIO at this thread and turns O_ASYNC on; true
    /// when that happened now (false: it was already so). Refused where
    /// this thread does not block SIGIO: its default action would end the
    /// agent.
    fn arm(&mut self) -> io::Result<bool> {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
        if self.armed_for == Some(tid) {
            return Ok(false);
        }
        if !sigio_blocked() {
            return Err(io::Error::other("SIGIO is not blocked in this thread"));
        }
        let fd = self.file.as_raw_fd();
        let owner = OwnerEx {
            kind: F_OWNER_TID,
            pid: tid,
        };
        // SAFETY: fcntl on a descriptor we own; F_SETOWN_EX reads `owner`.
        if unsafe { libc::fcntl(fd, F_SETOWN_EX, &owner) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = Some(tid);
        Ok(true)
    }
}

/// Whether this thread's signal mask blocks SIGIO.
fn sigio_blocked() -> bool {
    // SAFETY: pthread_sigmask writes the current mask into `mask` (no
    // change asked for); sigismember reads the initialised set.
    unsafe {
        let mut mask = std::mem::zeroed::<libc::sigset_t>();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) == 0
            && libc::sigismember(&mask, libc::SIGIO) == 1
    }
}

fn sigio_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        set
    }
}

/// Blocks SIGIO in this thread and every thread it starts afterwards (call
/// it first thing): SIGIO's default action ends the process, and only a
/// [`HostWait`] takes it. Commands the agent spawns start with an empty
/// mask (std resets it in the child).
pub fn block_host_signal() {
    let set = sigio_set();
    // SAFETY: `set` is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

impl Read for AgentPort {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// Waits for the port called `name` and opens it.
pub fn open_agent_port(name: &str, timeout: Duration) -> io::Result<AgentPort> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(device) = find_port_device(name)? {
            let file = OpenOptions::new().read(true).write(true).open(&device)?;

            return Ok(AgentPort { file });
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no virtio-serial port named {name} after {}s \
                     (is virtio_console loaded?)",
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_port_device(wanted: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir("/sys/class/virtio-ports") {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == wanted {
            let device = PathBuf::from("/dev").join(entry.file_name());
            if device.exists() {
                return Ok(Some(device));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use std::time::Instant;

    /// A pipe raises SIGIO like a port: a write wakes the waiting thread at
    /// once, and with nothing written the wait ends at its limit.
    #[test]
    fn a_wait_ends_when_the_file_signals_or_at_its_limit() {
        block_host_signal();
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from pipe, each owned once.
        let (reader, mut writer) =
            unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let mut wait = HostWait {
            file: reader,
            armed_for: None,
        };
        // The first wait arms and returns at once (the caller reads again).
        let started = Instant::now();
        wait.wait(Duration::from_secs(20));
        assert!(started.elapsed() < Duration::from_secs(10));
        let started = Instant::now();
        wait.wait(Duration::from_millis(300));
        let idle = started.elapsed();
        assert!(idle >= Duration::from_millis(250), "{idle:?}");
        let writing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            writer.write_all(b"x").unwrap();
            writer
        });
        let started = Instant::now();
        wait.wait(Duration::from_secs(20));
        let woken = started.elapsed();
        drop(writing.join().unwrap());
        assert!(
            woken >= Duration::from_millis(150) && woken < Duration::from_secs(10),
            "{woken:?}"
        );
    }

    /// Where SIGIO is not blocked (its default action would end the
    /// agent) the port is never armed: the wait is the short fallback
    /// sleep, every time.
    #[test]
    fn a_thread_that_does_not_block_sigio_falls_back_to_polling() {
        std::thread::spawn(|| {
            // SAFETY: all zeroes is a valid sigset_t; sigemptyset then
            // initialises it, and SIG_UNBLOCK changes this thread only.
            unsafe {
                let mut mask = std::mem::zeroed::<libc::sigset_t>();
                libc::sigemptyset(&mut mask);
                libc::sigaddset(&mut mask, libc::SIGIO);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &mask, std::ptr::null_mut());
            }
            let mut fds = [0; 2];
            // SAFETY: pipe fills two descriptors we then own.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: fresh descriptors from pipe, each owned once.
            let (reader, _writer) =
                unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
            let mut wait = HostWait {
                file: reader,
                armed_for: None,
            };
            for _ in 0..2 {
                let started = Instant::now();
                wait.wait(Duration::from_secs(20));
                assert!(started.elapsed() < Duration::from_secs(10));
            }
            assert!(wait.armed_for.is_none());
        })
        .join()
        .unwrap();
    }
}

//! One thread reaps every child (PID 1 inherits orphans) and hands exit
//! statuses of the commands we started to whoever waits for them.
//!
//! Two rules keep it from racing `Command::spawn`:
//! - a child is registered under the lock that spawning holds, so one that
//!   exits at once is never missed;
//! - the reaper first *peeks* at an exited child (`waitid` with `WNOWAIT`),
//!   then takes that same lock, and only then reaps it. A spawn whose exec
//!   failed reaps its own child inside `spawn` (and asserts that it could):
//!   the reaper must not take that child from under it, or the standard
//!   library panics, and a panic in PID 1 is a kernel panic.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hangar_proto::ExitStatus;

type Waiters = BTreeMap<u32, Sender<ExitStatus>>;

#[derive(Clone, Debug, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    pub fn start() -> Self {
        let reaper = Self::default();
        let waiters = Arc::clone(&reaper.waiters);
        std::thread::spawn(move || reap_forever(&waiters));
        reaper
    }

    /// Locks the registry; spawn the child, then `register` with the guard.
    pub fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn register(guard: &mut MutexGuard<'_, Waiters>, pid: u32) -> Receiver<ExitStatus> {
        let (tx, rx) = channel();
        guard.insert(pid, tx);
        rx
    }
}

fn reap_forever(waiters: &Mutex<Waiters>) {
    loop {
        let Some(pid) = peek_exited() else {
            // No children yet (ECHILD). Poll briefly; a spawn makes one.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut guard = waiters.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut status = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if reaped != pid as libc::pid_t {
            // A failed spawn reaped its own child while we waited for the lock.
            continue;
        }
        let exit = if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        };
        if let Some(tx) = guard.remove(&pid) {
            let _ = tx.send(exit);
        }
    }
}

/// Blocks until some child has exited and returns its pid, leaving it a
/// zombie (WNOWAIT). None when there are no children.
fn peek_exited() -> Option<u32> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        return None;
    }
    // SAFETY: waitid succeeded with WEXITED, so si_pid is set.
    let pid = unsafe { info.si_pid() };
    u32::try_from(pid).ok().filter(|pid| *pid != 0)
}

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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hangar_proto::ExitStatus;

/// The longest the reaper sleeps while the agent has no children, in case
/// one arrives unregistered (an orphan handed to PID 1).
const CHILDLESS_RECHECK: Duration = Duration::from_secs(1);

/// Who waits for which child, and how many children were registered (the
/// reaper sleeps while that count stays what it was when it found none).
#[derive(Debug, Default)]
pub struct Waiters {
    pending: BTreeMap<u32, Sender<ExitStatus>>,
    registered: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
    /// Signalled by every registration: the end of a childless wait.
    child_registered: Arc<Condvar>,
    /// How often the reaper found no child (a measure of how much it wakes).
    childless_wakeups: Arc<std::sync::atomic::AtomicU64>,
}

impl Reaper {
    pub fn start() -> Self {
        let reaper = Self::default();
        let for_thread = reaper.clone();
        std::thread::spawn(move || for_thread.reap_forever());
        reaper
    }

    /// Locks the registry; spawn the child, then `register` with the guard.
    pub fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn register(&self, guard: &mut MutexGuard<'_, Waiters>, pid: u32) -> Receiver<ExitStatus> {
        let (tx, rx) = channel();
        guard.pending.insert(pid, tx);
        guard.registered = guard.registered.wrapping_add(1);
        self.child_registered.notify_all();
        rx
    }

    fn reap_forever(&self) {
        loop {
            let registered = self.lock().registered;
            let Some(pid) = peek_exited() else {
                self.childless_wakeups
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // No children (ECHILD): sleep until a spawn registers one,
                // rather than polling (which kept an idle guest's CPU busy
                // wherever the agent had no child, e.g. as a service).
                let guard = self.lock();
                let _ =
                    self.child_registered
                        .wait_timeout_while(guard, CHILDLESS_RECHECK, |waiters| {
                            waiters.registered == registered
                        });
                continue;
            };
            self.reap(pid);
        }
    }

    fn reap(&self, pid: u32) {
        let mut guard = self.lock();
        let mut status = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if reaped != pid as libc::pid_t {
            // A failed spawn reaped its own child while we waited for the lock.
            return;
        }
        let exit = if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        };
        if let Some(tx) = guard.pending.remove(&pid) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The only test in this crate that spawns a process: the reaper
    /// reaps every child of the test process.
    #[test]
    fn a_child_spawned_after_a_childless_wait_is_reaped_at_once() {
        let reaper = Reaper::start();
        // Let the reaper find no child and go to sleep: it must not poll.
        std::thread::sleep(Duration::from_millis(300));
        let wakeups = reaper
            .childless_wakeups
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!((1..=2).contains(&wakeups), "{wakeups} wake-ups in 300 ms");
        let started = Instant::now();
        let mut guard = reaper.lock();
        // Reaped by the reaper, as every child of the agent is.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("true").spawn().unwrap();
        let exited = reaper.register(&mut guard, child.id());
        drop(guard);
        let status = exited.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(status, ExitStatus::Code(0));
        // Woken by the registration, not by the one-second recheck.
        assert!(
            started.elapsed() < CHILDLESS_RECHECK / 2,
            "{:?}",
            started.elapsed()
        );
    }
}

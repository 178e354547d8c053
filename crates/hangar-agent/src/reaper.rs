//! One thread reaps every child (PID 1 inherits orphans) and hands exit
//! statuses of the commands we started to whoever waits for them.
//!
//! `Child::wait` cannot be used: a concurrent `waitpid(-1)` would steal its
//! status. Registering a pid happens under the same lock the reaper takes
//! before dispatching, so a child that exits instantly is never missed.

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
        let mut status = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            // ECHILD: no children yet. Poll briefly; a spawn makes one.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let exit = if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        };
        let mut guard = waiters.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Some(tx) = guard.remove(&(pid as u32)) {
            let _ = tx.send(exit);
        }
    }
}

//! Stdin flow control: the host sends at most [`STDIN_WINDOW`] bytes of one
//! exec's or copy's stdin that the guest has not acknowledged
//! (`StdinCredit`), so the agent never has to stop reading its channel
//! because one command does not read its input (which would also hold up
//! that session's signals, resizes and exits).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hangar_proto::STDIN_WINDOW;

/// How often a waiting sender wakes to see whether the gate closed.
const WAKE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct CreditGate {
    /// (bytes that may still be sent, closed)
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl CreditGate {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((STDIN_WINDOW, false)),
            changed: Condvar::new(),
        })
    }

    /// Waits until `bytes` may be sent and takes them; false once the
    /// gate is closed (the command or copy ended).
    pub(crate) fn acquire(&self, bytes: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.1 {
                return false;
            }
            if state.0 >= bytes {
                state.0 -= bytes;
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, WAKE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The guest consumed `bytes`.
    pub(crate) fn give(&self, bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = state.0.saturating_add(bytes).min(STDIN_WINDOW);
        self.changed.notify_all();
    }

    pub(crate) fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_wait_for_credit_and_stop_when_closed() {
        let gate = CreditGate::new();
        assert!(gate.acquire(STDIN_WINDOW));
        let waiter = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || gate.acquire(10))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "no credit: the sender waits");
        gate.give(10);
        assert!(waiter.join().unwrap_or(false));
        let blocked = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || gate.acquire(1))
        };
        gate.close();
        assert!(
            !blocked.join().unwrap_or(true),
            "closed: the sender gives up"
        );
    }
}

//! A process-wide "the user pressed Ctrl-C" flag. The CLI sets it from its
//! signal handler; long waits in the library poll it and stop cleanly
//! (removing what a `run` created) instead of leaving orphans behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the process as interrupted. Async-signal-safe.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Returns whether an interrupt arrived since the last call, and clears it:
/// for waits that forward each Ctrl-C (to a guest command) instead of
/// stopping.
pub fn take() -> bool {
    INTERRUPTED.swap(false, Ordering::SeqCst)
}

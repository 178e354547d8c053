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

//! `HANGAR_TRACE=1`: the phases of a start, restore or exec on stderr with
//! the time since the process began, to see where the time goes (e.g. a
//! restore that is slower than it should be). Phase names only, never
//! values: nothing a user or guest sent is printed.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Option<Instant> {
    static ORIGIN: OnceLock<Option<Instant>> = OnceLock::new();
    *ORIGIN.get_or_init(|| {
        std::env::var_os("HANGAR_TRACE")
            .filter(|value| !value.is_empty() && value != "0")
            .map(|_| Instant::now())
    })
}

/// Starts the clock (call early; the first phase does it otherwise).
pub fn init() {
    let _ = origin();
}

/// Notes that `what` just finished, when tracing is on.
pub fn phase(what: &str) {
    if let Some(origin) = origin() {
        let ms = origin.elapsed().as_secs_f64() * 1000.0;
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("-");
        eprintln!("hangar trace {ms:9.1} ms [{name}] {what}");
    }
}

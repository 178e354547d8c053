//! Waiting for a guest to go quiet before its snapshot.
//!
//! Work a guest has in flight when it is paused (the tail of its boot, a
//! command that just ended) goes on in every VM restored from the
//! snapshot, and there it runs through empty TCG translation caches: every
//! code path it takes is translated again, in every fork. Measured here:
//! a snapshot taken right after `start` made the restored guest translate
//! about 13,000 blocks on its own in its first half second (the agent
//! opening its other ports), against about 3,000 for one taken when the
//! guest was idle. So a snapshot first waits, briefly, for a moment when
//! the VMM uses little CPU; a guest that stays busy is snapshotted anyway
//! when the wait runs out.

use std::time::{Duration, Instant};

/// The longest a snapshot waits for a quiet guest.
pub const SETTLE_LIMIT: Duration = Duration::from_millis(500);
/// One look at the VMM's CPU use.
const WINDOW: Duration = Duration::from_millis(25);
/// At most this share of one CPU over a window counts as quiet (an idle
/// TCG guest's QEMU uses about 5%, a busy one 100%).
const QUIET_SHARE: f64 = 0.2;

/// How the wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The VMM was quiet after this long.
    Quiet(Duration),
    /// Still busy when the limit ran out.
    Busy,
    /// Its CPU time cannot be read (no such process, no schedstat).
    Unknown,
}

/// Waits at most `limit` for a window in which the process `pid` (all its
/// threads) used at most [`QUIET_SHARE`] of a CPU.
pub fn wait_until_quiet(pid: u32, limit: Duration) -> Settled {
    wait_with(|| cpu_time(pid), limit, WINDOW)
}

fn wait_with(
    mut cpu: impl FnMut() -> Option<Duration>,
    limit: Duration,
    window: Duration,
) -> Settled {
    let started = Instant::now();
    let Some(mut before) = cpu() else {
        return Settled::Unknown;
    };
    let mut at = Instant::now();
    while started.elapsed() < limit {
        std::thread::sleep(window);
        let Some(now) = cpu() else {
            return Settled::Unknown;
        };
        let elapsed = at.elapsed();
        let used = now.saturating_sub(before);
        if used.as_secs_f64() <= elapsed.as_secs_f64() * QUIET_SHARE {
            return Settled::Quiet(started.elapsed());
        }
        before = now;
        at = Instant::now();
    }
    Settled::Busy
}

/// CPU time of all threads of `pid` so far (the first field of each
/// thread's `schedstat`, in nanoseconds).
fn cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total: u64 = 0;
    for task in tasks.flatten() {
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total = total.saturating_add(text.split_whitespace().next()?.parse().ok()?);
    }
    Some(Duration::from_nanos(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_is_not_quiet_and_an_idle_one_is() {
        // Busy: this process, with four threads spinning (on a loaded
        // two-core machine one spinning process alone could get less than
        // a fifth of a CPU in some window and pass for quiet).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..4)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let busy = wait_until_quiet(std::process::id(), Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for spinner in spinners {
            spinner.join().unwrap();
        }
        assert_eq!(busy, Settled::Busy);

        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let idle = wait_until_quiet(child.id(), Duration::from_millis(500));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(idle, Settled::Quiet(_)), "{idle:?}");
    }

    #[test]
    fn a_guest_that_goes_quiet_is_waited_for_and_no_process_is_unknown() {
        // CPU use by window: busy, busy, then idle.
        let mut used = [0u64, 10, 20, 21].into_iter().map(Duration::from_millis);
        let settled = wait_with(
            || used.next(),
            Duration::from_secs(5),
            Duration::from_millis(10),
        );
        assert!(
            matches!(settled, Settled::Quiet(waited) if waited >= Duration::from_millis(30)),
            "{settled:?}"
        );
        assert_eq!(wait_until_quiet(u32::MAX, SETTLE_LIMIT), Settled::Unknown);
    }
}

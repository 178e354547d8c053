//! The verbs around a running VM: kill, restart, pause, resume, wait.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::lifecycle::transition;
use super::{Manager, ManagerError};
use crate::backend::process;
use crate::record::{VmRecord, VmState};

/// How often `wait` and `follow_console_log` look again.
pub const POLL: Duration = Duration::from_millis(100);
/// After `kill`, how long to wait for the VMM to exit before reporting it
/// still running (a signal QEMU ignores, or a slow exit).
pub const KILL_EXIT_WAIT: Duration = Duration::from_secs(5);

impl Manager {
    /// Sends `signal` to the VMM. If the VMM exits, the VM is recorded as
    /// stopped with the signal as the reason.
    pub fn kill(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        signal: Signal,
    ) -> Result<VmRecord, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if !record.state.has_process() {
            return Err(not_running(&record, "send it a signal"));
        }
        let backend = self.backend(record.backend)?;
        backend
            .kill(&record, signal)
            .map_err(|source| ManagerError::Backend {
                name: record.name.clone(),
                source,
            })?;
        let gone = match record.pid {
            Some(pid) => process::wait_gone(pid, record.pid_start_time, KILL_EXIT_WAIT),
            // A backend without a process (noop) "exits" at once.
            None => true,
        };
        if !gone {
            return self.inspect(None, &record.id);
        }
        self.mark_ended(
            &record.id,
            VmState::Stopped,
            format!("killed with {signal} on request"),
        )
    }

    /// Stops the VM if it runs, then starts it.
    pub fn restart(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        timeout: Option<Duration>,
    ) -> Result<VmRecord, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if record.state.has_process() {
            self.stop(None, &record.id, timeout)?;
        }
        self.start(None, &record.id)
    }

    /// Stops the vCPUs; memory and devices stay.
    pub fn pause(&mut self, namespace: Option<&str>, key: &str) -> Result<VmRecord, ManagerError> {
        self.pause_or_resume(namespace, key, VmState::Paused)
    }

    pub fn resume(&mut self, namespace: Option<&str>, key: &str) -> Result<VmRecord, ManagerError> {
        self.pause_or_resume(namespace, key, VmState::Running)
    }

    fn pause_or_resume(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        to: VmState,
    ) -> Result<VmRecord, ManagerError> {
        let pausing = to == VmState::Paused;
        let action = if pausing { "pause it" } else { "resume it" };
        let record = self.inspect(namespace, key)?;
        let expected = if pausing {
            VmState::Running
        } else {
            VmState::Paused
        };
        if record.state != expected {
            return Err(ManagerError::InvalidState {
                name: record.name,
                state: record.state,
                action,
                hint: if pausing {
                    "; only a running VM pauses"
                } else {
                    "; only a paused VM resumes"
                },
            });
        }
        let backend = self.backend(record.backend)?;
        let pausable = backend.as_pausable().ok_or_else(|| {
            ManagerError::Config(format!("the {} backend cannot pause VMs", record.backend))
        })?;
        let result = if pausing {
            pausable.pause(&record)
        } else {
            pausable.resume(&record)
        };
        result.map_err(|source| ManagerError::Backend {
            name: record.name.clone(),
            source,
        })?;
        self.store.update(&record.id, |r| transition(r, to, action))
    }

    /// Waits until the VM reaches `target`, at most `timeout`.
    pub fn wait_for(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        target: VmState,
        timeout: Duration,
    ) -> Result<VmRecord, ManagerError> {
        let started = Instant::now();
        loop {
            let record = self.inspect(namespace, key)?;
            if record.state == target {
                return Ok(record);
            }
            if crate::interrupt::requested() {
                return Err(ManagerError::Interrupted);
            }
            if started.elapsed() >= timeout {
                return Err(ManagerError::WaitTimeout {
                    name: record.name,
                    target,
                    state: record.state,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Streams the console log to `sink`: the last `tail` lines (all when
    /// None), then, if `follow`, new output until the VM stops or the user
    /// interrupts.
    pub fn console_log_stream(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        tail: Option<usize>,
        follow: bool,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ManagerError> {
        let record = self.inspect(namespace, key)?;
        let path = self.console_log(None, &record.id)?;
        let mut offset = match tail {
            Some(lines) => {
                for line in crate::fsutil::tail_lines(&path, lines) {
                    sink(line.as_bytes());
                    sink(b"\n");
                }
                std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
            }
            None => 0,
        };
        loop {
            offset = crate::fsutil::copy_new_bytes(&path, offset, sink).map_err(|source| {
                ManagerError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
            if !follow || crate::interrupt::requested() {
                return Ok(());
            }
            let current = self.inspect(None, &record.id)?;
            if !current.state.has_process() {
                // One last read for what the VM wrote while stopping.
                crate::fsutil::copy_new_bytes(&path, offset, sink).map_err(|source| {
                    ManagerError::Io {
                        path: path.clone(),
                        source,
                    }
                })?;
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
    }
}

fn not_running(record: &VmRecord, action: &'static str) -> ManagerError {
    ManagerError::InvalidState {
        name: record.name.clone(),
        state: record.state,
        action,
        hint: "; it is not running",
    }
}

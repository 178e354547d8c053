//! Start and stop: the state changes around a VMM process.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{Manager, ManagerError, CONSOLE_TAIL_LINES};
use crate::backend::{process, StopOutcome, StopRequest};
use crate::guest::AgentClient;
use crate::record::{Accel, BackendKind, VmRecord, VmState};

/// How long a guest may take from VMM start to the agent's hello. Under TCG
/// the default image needs ~2 s; the margin covers a loaded CI machine.
pub const READY_TIMEOUT_TCG: Duration = Duration::from_secs(60);
pub const READY_TIMEOUT_KVM: Duration = Duration::from_secs(20);
/// How long `stop` gives a guest that accepted the power-off request.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits to reach the agent before falling back to ACPI.
const AGENT_CONNECT_FOR_STOP: Duration = Duration::from_secs(2);

/// Applies a state change if the transition function allows it.
pub(super) fn transition(
    record: &mut VmRecord,
    to: VmState,
    action: &'static str,
) -> Result<(), ManagerError> {
    if !record.state.valid_transition(to) {
        return Err(ManagerError::InvalidState {
            name: record.name.clone(),
            state: record.state,
            action,
            hint: match record.state {
                VmState::Running | VmState::Starting => "; it is already running",
                VmState::Stopped | VmState::Created => "; it is not running (`hangar start` it)",
                _ => "",
            },
        });
    }
    record.state = to;
    Ok(())
}

impl Manager {
    /// Boots a VM and returns once its guest agent has said hello.
    pub fn start(&mut self, namespace: Option<&str>, key: &str) -> Result<VmRecord, ManagerError> {
        let record = self.inspect(namespace, key)?;
        let (record, client) = self.start_record(record)?;
        self.keep_started_session(&record, client);
        Ok(record)
    }

    /// `record` with the layers of a freeze that a snapshot left unended
    /// (its record update was lost): see `VmRecord::adopt_frozen_layers`.
    /// Only for a VM without a VMM: one that runs may be in the middle of
    /// another process's snapshot (and a start refuses it anyway).
    fn layers_followed(&mut self, record: VmRecord) -> Result<VmRecord, ManagerError> {
        if record.freezing.is_none() {
            return Ok(record);
        }
        self.store.update(&record.id, |r| {
            if !r.state.has_process() {
                r.adopt_frozen_layers();
            }
            Ok::<_, ManagerError>(())
        })
    }

    /// Starts `record` and returns the agent session used for readiness.
    pub(super) fn start_record(
        &mut self,
        record: VmRecord,
    ) -> Result<(VmRecord, Option<AgentClient>), ManagerError> {
        self.start_record_from(record, None)
    }

    /// Starts `record`, cold or (with `incoming`) from a snapshot's saved
    /// state, which then gets its new identity before it counts as ready.
    pub(super) fn start_record_from(
        &mut self,
        record: VmRecord,
        incoming: Option<super::restore::Incoming>,
    ) -> Result<(VmRecord, Option<AgentClient>), ManagerError> {
        let record = self.layers_followed(record)?;
        if !record.state.valid_transition(VmState::Starting) {
            let mut probe = record.clone();
            transition(&mut probe, VmState::Starting, "start it")?;
        }
        self.check_ssh_key_held(&record)?;
        crate::trace::phase("start: begin");
        let mut plan = self.plan(&record)?;
        crate::trace::phase("start: planned");
        if let Some(incoming) = &incoming {
            incoming.adjust(&mut plan);
        }
        // A create interrupted between record and dir leaves no dir.
        crate::layout::create_private_dir(&record.work_dir)?;
        let id = record.id.clone();
        let record = self.store.update(&id, |r| {
            transition(r, VmState::Starting, "start it")?;
            r.owner = process::current();
            r.exit_reason = None;
            r.last_console_lines.clear();
            r.accel = Some(plan.accel);
            // A restore launches the saved machine and plugs its growth in:
            // recorded grown from the start, so a snapshot never sees a
            // record without the DIMM the guest has.
            r.machine = match &incoming {
                Some(incoming) => incoming.grown_machine(),
                None => plan.machine.clone(),
            };
            Ok::<_, ManagerError>(())
        })?;
        let backend = self.backend(record.backend)?;
        let launched = match backend.launch(&record, &plan) {
            Ok(launched) => {
                crate::trace::phase("start: VMM launched");
                launched
            }
            Err(source) => {
                let reason = source.to_string();
                self.mark_ended(&id, VmState::Failed, reason)?;
                return Err(ManagerError::Backend {
                    name: record.name,
                    source,
                });
            }
        };
        // Another process may have stopped, killed or removed the VM while
        // it launched: then this VMM belongs to nobody and must go.
        let me = record.owner;
        let recorded = self.store.update(&id, |r| {
            if r.state != VmState::Starting || r.owner != me {
                return Err(ManagerError::InvalidState {
                    name: r.name.clone(),
                    state: r.state,
                    action: "finish starting it",
                    hint: "; another hangar command changed it while it started",
                });
            }
            r.pid = launched.pid;
            r.pid_start_time = launched.pid_start_time;
            r.sockets = launched.sockets.clone();
            r.ports = launched.ports.clone();
            r.started_at = Some(chrono::Utc::now());
            Ok::<_, ManagerError>(())
        });
        let record = match recorded {
            Ok(record) => record,
            Err(err) => {
                if let Some(pid) = launched.pid {
                    process::signal(pid, launched.pid_start_time, Signal::SIGKILL);
                }
                return Err(err);
            }
        };
        if record.backend == BackendKind::Noop {
            let record = self.mark_running(&id, None)?;
            return Ok((record, None));
        }
        if super::ssh::uses_ssh(&record) {
            return Ok((self.wait_ssh_ready(record, plan.accel)?, None));
        }
        let timeout = match plan.accel {
            Accel::Kvm => READY_TIMEOUT_KVM,
            Accel::Tcg => READY_TIMEOUT_TCG,
        };
        let sockets = record.sockets.agent_sockets();
        let started = Instant::now();
        let (pid, pid_start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_alive_check(pid, pid_start);
        let connected = match &incoming {
            Some(incoming) => self
                .receive_state(&record, incoming, timeout)
                .and_then(|()| {
                    crate::trace::phase("restore: state loaded, guest running");
                    AgentClient::connect_any(&sockets, timeout, timeout, &mut check)
                })
                .and_then(|mut client| {
                    crate::trace::phase("restore: agent hello");
                    incoming.apply_identity(&mut client, timeout, &mut check)?;
                    crate::trace::phase("restore: identity applied");
                    Ok(client)
                }),
            None => AgentClient::connect_any(&sockets, timeout, timeout, &mut check),
        };
        match connected {
            Ok(client) => match self
                .keep_vsock_token(&record, client.facts().clone())
                .and_then(|facts| self.mark_running(&id, Some(facts)))
            {
                Ok(record) => {
                    crate::trace::phase("start: running");
                    Ok((record, Some(client)))
                }
                Err(err) => {
                    // Stopped or removed by someone else meanwhile.
                    let _ = self.kill_now(&record);
                    Err(err)
                }
            },
            Err(err) => {
                let console = self.console_tail(&record);
                // A guest that never became ready is killed, not left running.
                let _ = self.kill_now(&record);
                let reason = err.to_string();
                self.mark_ended(&id, VmState::Failed, format!("not ready: {reason}"))?;
                if crate::interrupt::requested() {
                    return Err(ManagerError::Interrupted);
                }
                Err(ManagerError::NotReady {
                    name: record.name,
                    waited: started.elapsed(),
                    reason,
                    console,
                })
            }
        }
    }

    /// Takes the vsock token out of the hello's facts (they are shown by
    /// `inspect`) and keeps it in the VM's private token file.
    fn keep_vsock_token(
        &self,
        record: &VmRecord,
        mut facts: hangar_proto::GuestFacts,
    ) -> Result<hangar_proto::GuestFacts, ManagerError> {
        let token = facts.vsock_token.take();
        if let (Some(token), Some(path)) = (token, &record.sockets.vsock_token) {
            crate::fsutil::write_private(path, token.as_bytes()).map_err(|source| {
                ManagerError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(facts)
    }

    pub(super) fn mark_running(
        &mut self,
        id: &str,
        facts: Option<hangar_proto::GuestFacts>,
    ) -> Result<VmRecord, ManagerError> {
        self.store
            .update(id, |r| {
                transition(r, VmState::Running, "mark it running")?;
                r.owner = None;
                r.first_booted = true;
                r.guest = facts;
                Ok::<_, ManagerError>(())
            })
            .inspect(|record| {
                // The first boot is up: the seed (which may hold a password)
                // has done its work and goes. QEMU keeps its open file.
                let _ = std::fs::remove_file(super::seed_path(&record.work_dir));
            })
    }

    /// Records that the VMM is gone, with why.
    pub(super) fn mark_ended(
        &mut self,
        id: &str,
        state: VmState,
        reason: String,
    ) -> Result<VmRecord, ManagerError> {
        self.sessions.remove(id);
        let record = self.store.get(id)?;
        let console = record
            .as_ref()
            .map(|r| self.console_tail(r))
            .unwrap_or_default();
        self.store
            .update(id, |r| {
                if r.state != state {
                    transition(r, state, "record its end")?;
                }
                r.mark_ended(state, reason, console);
                Ok::<_, ManagerError>(())
            })
            .inspect(drop_ram_file)
    }

    /// Stops a running VM: agent power-off, then ACPI, SIGTERM, SIGKILL.
    pub fn stop(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        timeout: Option<Duration>,
    ) -> Result<VmRecord, ManagerError> {
        let record = self.inspect(namespace, key)?;
        let id = record.id.clone();
        // A session this manager kept asks for the power-off (and frees its
        // port); else a free port does.
        let kept = self.take_session(&record);
        let record = self.store.update(&id, begin_stop)?;
        let mut guest_asked = false;
        let sockets = record.sockets.agent_sockets();
        if let Some(mut client) = kept {
            guest_asked = client.shutdown().is_ok();
        } else if !sockets.is_empty() {
            let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
            let mut check = || vmm_alive_check(pid, start);
            let connected = AgentClient::connect_any(
                &sockets,
                AGENT_CONNECT_FOR_STOP,
                AGENT_CONNECT_FOR_STOP,
                &mut check,
            );
            if let Ok(mut client) = connected {
                guest_asked = client.shutdown().is_ok();
            }
        }
        self.finish_stop(
            &record,
            guest_asked,
            timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
        )
    }

    /// Walks the backend's ladder and records the outcome.
    pub(super) fn finish_stop(
        &mut self,
        record: &VmRecord,
        guest_asked: bool,
        timeout: Duration,
    ) -> Result<VmRecord, ManagerError> {
        let request = StopRequest {
            guest_asked,
            timeout,
        };
        let outcome = self
            .backend(record.backend)?
            .stop(record, request)
            .map_err(|source| ManagerError::Backend {
                name: record.name.clone(),
                source,
            })?;
        let how = match outcome {
            StopOutcome::AlreadyGone => "the VMM had already exited",
            StopOutcome::GuestPowerOff => "the guest powered off",
            StopOutcome::AcpiPowerdown => "ACPI power button",
            StopOutcome::Terminated => "SIGTERM after the guest ignored power-off",
            StopOutcome::Killed => "SIGKILL after the guest and QEMU ignored power-off and SIGTERM",
        };
        self.mark_ended(
            &record.id,
            VmState::Stopped,
            format!("stopped on request ({how})"),
        )
    }

    /// SIGKILL and wait: for `rm -f` and failed starts.
    pub(super) fn kill_now(&self, record: &VmRecord) -> Result<(), ManagerError> {
        let backend = self.backend(record.backend)?;
        let _ = backend.kill(record, Signal::SIGKILL);
        if let Some(pid) = record.pid {
            process::wait_gone(
                pid,
                record.pid_start_time,
                crate::backend::qemu::KILL_TIMEOUT,
            );
        }
        Ok(())
    }

    pub(super) fn console_tail(&self, record: &VmRecord) -> Vec<String> {
        let log = record
            .sockets
            .console_log
            .clone()
            .unwrap_or_else(|| record.work_dir.join("console.log"));
        crate::fsutil::tail_lines(&log, CONSOLE_TAIL_LINES)
    }
}

/// Moves a record to `stopping`, naming this process as the one doing it.
pub(super) fn begin_stop(record: &mut VmRecord) -> Result<(), ManagerError> {
    transition(record, VmState::Stopping, "stop it")?;
    record.owner = process::current();
    Ok(())
}

/// The check run between reads while a command runs: stop waiting if the
/// VMM died. (Ctrl-C goes to the guest command instead.)
pub(super) fn vmm_only_check(pid: u32, start: Option<u64>) -> Result<(), String> {
    if pid != 0 && !process::is_alive(pid, start) {
        return Err(format!("the VMM process {pid} exited"));
    }
    Ok(())
}

/// The check run between agent reads: stop waiting if the VMM died or the
/// user interrupted.
pub(super) fn vmm_alive_check(pid: u32, start: Option<u64>) -> Result<(), String> {
    if crate::interrupt::requested() {
        return Err("interrupted".into());
    }
    if pid != 0 && !process::is_alive(pid, start) {
        return Err(format!("the VMM process {pid} exited"));
    }
    Ok(())
}

/// A stopped VM's RAM file is garbage (and the guest's memory): removed
/// once the VMM is gone.
pub(super) fn drop_ram_file(record: &VmRecord) {
    let _ = std::fs::remove_file(crate::backend::qemu::snapshot::ram_path(&record.work_dir));
}

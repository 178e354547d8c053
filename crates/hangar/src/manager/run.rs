//! `exec` in a running VM, and `run`: create, start, exec, clean up.

use std::time::Duration;

use hangar_proto::{ExecRequest, ExitStatus};

use super::lifecycle::{vmm_alive_check, vmm_only_check, DEFAULT_STOP_TIMEOUT};
use super::{Manager, ManagerError};
use crate::backend::process;
use crate::guest::{AgentClient, ExecIo, GuestError, OutputSink};
use crate::record::{BackendKind, VmRecord, VmState};
use crate::spec::VmSpec;

/// How long `exec` waits to reach the agent of a running VM ...
pub const EXEC_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and for the hello on one port before trying the next.
pub const PORT_HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// What `run` did.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// The VM, when it was kept (`keep`); None when it was removed.
    pub kept: Option<VmRecord>,
}

impl Manager {
    /// Runs a command in a running VM, streaming its output to `sink`.
    pub fn exec(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        request: ExecRequest,
        io: ExecIo,
        sink: &mut dyn OutputSink,
    ) -> Result<ExitStatus, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if super::ssh::uses_ssh(&record) && record.state == VmState::Running {
            let request = self.runnable(&record, request)?;
            return self.exec_ssh(&record, request, io, sink);
        }
        let (record, mut client) = self.running_agent(namespace, key, "run a command in it")?;
        crate::trace::phase("exec: agent session ready");
        let request = self.runnable(&record, request)?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_only_check(pid, start);
        let status = client
            .exec_with(request, io, sink, &mut check)
            .map_err(|source| self.guest_error(&record, source));
        crate::trace::phase("exec: exited");
        // A session whose exec ended normally is fit for the next one; a
        // failed or interrupted one may hold half a frame.
        if status.is_ok() && !crate::interrupt::requested() {
            self.keep_session(&record, client);
        }
        status
    }

    /// The request with the VM image's defaults, refused if it still has
    /// no program to run.
    fn runnable(
        &self,
        record: &VmRecord,
        request: ExecRequest,
    ) -> Result<ExecRequest, ManagerError> {
        let request = self.with_image_defaults(record, request)?;
        if request.argv.is_empty() {
            return Err(ManagerError::Config(
                "no command to run: give one after `--` (the image names none)".into(),
            ));
        }
        Ok(request)
    }

    /// A session with the agent of a VM that must be running; `action`
    /// names what the caller wanted, for the error when it is not.
    pub(super) fn running_agent(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        action: &'static str,
    ) -> Result<(VmRecord, AgentClient), ManagerError> {
        let record = self.inspect(namespace, key)?;
        if record.state != VmState::Running {
            return Err(ManagerError::InvalidState {
                name: record.name,
                state: record.state,
                action,
                hint: if record.state == VmState::Paused {
                    "; resume it first (`hangar resume`)"
                } else {
                    "; start it first (`hangar start`)"
                },
            });
        }
        if let Some(client) = self.take_session(&record) {
            crate::trace::phase("agent: session kept from before");
            return Ok((record, client));
        }
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_alive_check(pid, start);
        let client = AgentClient::connect_vm(
            &record.sockets,
            EXEC_CONNECT_TIMEOUT,
            PORT_HELLO_TIMEOUT,
            &mut check,
        )
        .map_err(|source| self.guest_error(&record, source))?;
        Ok((record, client))
    }

    /// An open agent session with a running VM, for many commands in a row
    /// (benchmarks, library users) without reconnecting each time.
    pub fn connect_agent(
        &mut self,
        namespace: Option<&str>,
        key: &str,
    ) -> Result<AgentClient, ManagerError> {
        let record = self.inspect(namespace, key)?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_alive_check(pid, start);
        AgentClient::connect_vm(
            &record.sockets,
            EXEC_CONNECT_TIMEOUT,
            PORT_HELLO_TIMEOUT,
            &mut check,
        )
        .map_err(|source| self.guest_error(&record, source))
    }

    /// `docker run` for VMs: a fresh VM from `spec` runs `request`; the VM
    /// is removed afterwards unless `keep`, in which case it stays running.
    /// On error or interrupt the VM is always removed.
    pub fn run(
        &mut self,
        spec: VmSpec,
        request: ExecRequest,
        io: ExecIo,
        sink: &mut dyn OutputSink,
        keep: bool,
    ) -> Result<RunOutcome, ManagerError> {
        // Without `keep` the VM belongs to this process: if it dies (even
        // by SIGKILL), `gc` removes the VM.
        let ephemeral_for = if keep { None } else { process::current() };
        let record = self.create_record(spec, BackendKind::Qemu, ephemeral_for, None, None)?;
        let request = match self.runnable(&record, request) {
            Ok(request) => request,
            Err(err) => {
                let _ = self.remove(None, &record.id, true);
                return Err(err);
            }
        };
        let result = self.start_and_exec(&record, request, io, sink);
        match result {
            Ok((status, _client)) if keep => Ok(RunOutcome {
                status,
                kept: Some(self.inspect(None, &record.id)?),
            }),
            Ok((status, client)) => {
                let current = self.store.get(&record.id)?.unwrap_or(record);
                let guest_asked = match client {
                    Some(mut client) => client.shutdown().is_ok(),
                    None => false,
                };
                let stopping = self
                    .store
                    .update(&current.id, super::lifecycle::begin_stop)?;
                self.finish_stop(&stopping, guest_asked, DEFAULT_STOP_TIMEOUT)?;
                self.remove(None, &current.id, true)?;
                Ok(RunOutcome { status, kept: None })
            }
            Err(err) => {
                let _ = self.remove(None, &record.id, true);
                Err(err)
            }
        }
    }

    fn start_and_exec(
        &mut self,
        record: &VmRecord,
        request: ExecRequest,
        io: ExecIo,
        sink: &mut dyn OutputSink,
    ) -> Result<(ExitStatus, Option<AgentClient>), ManagerError> {
        let (record, client) = self.start_record(record.clone())?;
        let Some(mut client) = client else {
            return Err(ManagerError::Config(
                "this backend has no guest agent to run commands".into(),
            ));
        };
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_only_check(pid, start);
        let status = client
            .exec_with(request, io, sink, &mut check)
            .map_err(|source| self.guest_error(&record, source))?;
        if crate::interrupt::requested() {
            return Err(ManagerError::Interrupted);
        }
        Ok((status, Some(client)))
    }

    pub(super) fn guest_error(&self, record: &VmRecord, source: GuestError) -> ManagerError {
        if crate::interrupt::requested() {
            return ManagerError::Interrupted;
        }
        // The console helps when the VM misbehaves, not when a command does.
        let console = match source {
            GuestError::ExecFailed { .. }
            | GuestError::ExecTimeout { .. }
            | GuestError::CopyFailed { .. }
            | GuestError::Transfer(_) => Vec::new(),
            _ => self.console_tail(record),
        };
        ManagerError::Guest {
            name: record.name.clone(),
            source,
            console,
        }
    }
}

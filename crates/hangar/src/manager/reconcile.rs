//! Reconciliation: every command compares records with the processes they
//! name, so a VMM that died behind Hangar's back is noticed at the next
//! `ps` or `inspect`, without a daemon.

use super::{Manager, ManagerError};
use crate::backend::{process, VmmStatus};
use crate::record::{VmRecord, VmState};

/// What the kernel prints when the guest powers itself off.
const GUEST_POWER_OFF_LINE: &str = "reboot: Power down";

impl Manager {
    pub(super) fn reconcile(&mut self, record: VmRecord) -> Result<VmRecord, ManagerError> {
        if !record.state.has_process() {
            return Ok(record);
        }
        if matches!(record.state, VmState::Starting | VmState::Stopping) {
            match record.owner {
                // Another hangar process is starting or stopping it: its
                // business, not ours.
                Some(owner) if process::is_running(&owner) => return Ok(record),
                Some(owner) => return self.finish_interrupted(&record, owner.pid),
                None => {}
            }
        }
        let backend = self.backend(record.backend)?;
        let status = backend.status(&record);
        match (record.state, status) {
            (_, VmmStatus::Gone) => self.record_death(&record),
            (VmState::Running, VmmStatus::Paused) | (VmState::Paused, VmmStatus::Running) => {
                let to = if status == VmmStatus::Paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                Ok(self.store.update(&record.id, |r| {
                    if r.state == record.state {
                        super::lifecycle::transition(r, to, "follow its VMM")?;
                    }
                    Ok::<_, ManagerError>(())
                })?)
            }
            _ => Ok(record),
        }
    }

    /// The hangar process that was starting or stopping this VM died (say,
    /// SIGKILL): kill whatever VMM it left and record the outcome.
    fn finish_interrupted(
        &mut self,
        record: &VmRecord,
        owner_pid: u32,
    ) -> Result<VmRecord, ManagerError> {
        self.kill_now(record)?;
        kill_processes_in(&record.work_dir);
        let console = self.console_tail(record);
        let (state, reason) = if record.state == VmState::Stopping {
            (
                VmState::Stopped,
                format!("stop interrupted (hangar process {owner_pid} died); VMM killed"),
            )
        } else {
            (
                VmState::Failed,
                format!("start interrupted (hangar process {owner_pid} died before the guest was ready)"),
            )
        };
        self.record_end_if_unchanged(record, state, reason, console)
    }

    fn record_death(&mut self, record: &VmRecord) -> Result<VmRecord, ManagerError> {
        let console = self.console_tail(record);
        let qemu_log = crate::fsutil::tail_lines(&record.work_dir.join("qemu.log"), 1);
        let powered_off = console
            .iter()
            .any(|line| line.contains(GUEST_POWER_OFF_LINE));
        let (state, reason) = if record.state == VmState::Stopping || powered_off {
            (VmState::Stopped, "the guest powered off".to_owned())
        } else {
            let pid = record.pid.map_or("?".into(), |p| p.to_string());
            let detail = qemu_log
                .first()
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            (
                VmState::Failed,
                format!("the VMM process {pid} exited unexpectedly (killed or crashed){detail}"),
            )
        };
        self.record_end_if_unchanged(record, state, reason, console)
    }

    /// Records the end of the VM as `record` showed it. Another process may
    /// have acted since we looked (state, pid or owner changed): then what
    /// we saw is stale and nothing is written.
    fn record_end_if_unchanged(
        &mut self,
        record: &VmRecord,
        state: VmState,
        reason: String,
        console: Vec<String>,
    ) -> Result<VmRecord, ManagerError> {
        let observed = (record.state, record.pid, record.owner);
        self.store
            .update(&record.id, |r| {
                if (r.state, r.pid, r.owner) != observed {
                    return Ok(());
                }
                super::lifecycle::transition(r, state, "record its end")?;
                r.mark_ended(state, reason, console);
                Ok::<_, ManagerError>(())
            })
            .inspect(|r| {
                if r.pid.is_none() {
                    super::lifecycle::drop_ram_file(r);
                }
            })
    }
}

/// SIGKILLs every process whose command line names `work_dir`: a VMM whose
/// pid never reached the record. Waits for each to go.
pub(super) fn kill_processes_in(work_dir: &std::path::Path) -> Vec<u32> {
    let needle = work_dir.join("");
    let pidfile_arg = format!("-pidfile {}", work_dir.join("qemu.pid").display());
    let mut killed = Vec::new();
    for (pid, cmdline) in process::processes_mentioning(&needle) {
        // Only the VMM (it names its pidfile here), not a reader of its logs.
        if !cmdline.contains(&pidfile_arg) {
            continue;
        }
        let start = process::start_time(pid);
        if process::signal(pid, start, nix::sys::signal::Signal::SIGKILL) {
            process::wait_gone(pid, start, crate::backend::qemu::KILL_TIMEOUT);
            killed.push(pid);
        }
    }
    killed
}

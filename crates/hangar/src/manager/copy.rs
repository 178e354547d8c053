//! `hangar cp`: files between the host and a running VM, through its agent.

use std::path::Path;

use hangar_proto::CopySummary;

use super::lifecycle::vmm_only_check;
use super::{Manager, ManagerError};
use crate::record::VmState;

impl Manager {
    /// Copies the host path `source` into the VM at `dest` (`docker cp`
    /// rules: into an existing directory, or as the new name `dest`).
    pub fn copy_into(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        source: &Path,
        dest: &str,
    ) -> Result<CopySummary, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if super::ssh::uses_ssh(&record) && record.state == VmState::Running {
            return self.copy_into_ssh(&record, source, dest);
        }
        let (record, mut client) = self.running_agent(namespace, key, "copy files into it")?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || interrupted_or(vmm_only_check(pid, start));
        client
            .copy_in(source, dest, &mut check)
            .map_err(|source| self.guest_error(&record, source))
    }

    /// Copies the guest path `source` out of the VM to `dest` on the host.
    /// The guest's stream is checked like any untrusted archive.
    pub fn copy_from(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        source: &str,
        dest: &Path,
    ) -> Result<CopySummary, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if super::ssh::uses_ssh(&record) && record.state == VmState::Running {
            return self.copy_from_ssh(&record, source, dest);
        }
        let (record, mut client) = self.running_agent(namespace, key, "copy files out of it")?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || interrupted_or(vmm_only_check(pid, start));
        client
            .copy_out(source, dest, &mut check)
            .map_err(|source| self.guest_error(&record, source))
    }
}

/// A copy stops at Ctrl-C (there is no guest command to forward it to).
fn interrupted_or(check: Result<(), String>) -> Result<(), String> {
    if crate::interrupt::requested() {
        return Err("interrupted".into());
    }
    check
}

//! `up` and `down`: make a namespace match an up file, acting only on what
//! changed, and tear it down again.

use serde::Serialize;

use super::{Manager, ManagerError};
use crate::guest::{ExecIo, OutputSink};
use crate::record::{BackendKind, VmState};
use crate::up_file::{UpFile, UpVm, HASH_LABEL, MANAGED_LABEL};
use hangar_proto::{ExecRequest, ExitStatus};

/// What `up` did to one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpAction {
    /// New: created, started, provisioned.
    Created,
    /// Its entry changed: removed and created again.
    Replaced,
    /// It existed but did not run: started and provisioned again (a fresh
    /// boot of a stateless image has lost what provisioning did).
    Started,
    /// Running and unchanged: left alone.
    Unchanged,
    /// Managed by this file before, no longer in it: removed.
    Removed,
}

/// One line of an up report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpChange {
    pub name: String,
    pub action: UpAction,
}

impl Manager {
    /// Makes the file's namespace match the file, in file order. Provision
    /// output goes to `sink`; a step that fails stops `up` with its exit
    /// status (VMs already brought up stay).
    pub fn up(
        &mut self,
        file: &UpFile,
        sink: &mut dyn OutputSink,
    ) -> Result<Vec<UpChange>, ManagerError> {
        let mut changes = Vec::new();
        for vm in &file.vms {
            let action = self.up_one(vm, sink)?;
            changes.push(UpChange {
                name: vm.spec.name.clone(),
                action,
            });
        }
        for record in self.managed_in(&file.namespace)? {
            if !file.vms.iter().any(|vm| vm.spec.name == record) {
                self.remove(Some(&file.namespace), &record, true)?;
                changes.push(UpChange {
                    name: record,
                    action: UpAction::Removed,
                });
            }
        }
        Ok(changes)
    }

    /// Removes every VM `up` made in `namespace`.
    pub fn down(&mut self, namespace: &str) -> Result<Vec<String>, ManagerError> {
        let names = self.managed_in(namespace)?;
        for name in &names {
            self.remove(Some(namespace), name, true)?;
        }
        Ok(names)
    }

    fn up_one(&mut self, vm: &UpVm, sink: &mut dyn OutputSink) -> Result<UpAction, ManagerError> {
        let namespace = vm.spec.namespace.clone();
        let existing = match self.inspect(Some(&namespace), &vm.spec.name) {
            Ok(record) => Some(record),
            Err(ManagerError::Store(crate::store::StoreError::NotFound { .. })) => None,
            Err(other) => return Err(other),
        };
        let action = match &existing {
            None => UpAction::Created,
            Some(r) if r.spec.labels.get(HASH_LABEL) != Some(&vm.hash) => UpAction::Replaced,
            Some(r) if r.state.has_process() => return Ok(UpAction::Unchanged),
            Some(_) => UpAction::Started,
        };
        if action == UpAction::Replaced {
            self.remove(Some(&namespace), &vm.spec.name, true)?;
        }
        if action != UpAction::Started {
            self.create(vm.spec.clone(), BackendKind::Qemu)?;
        }
        let record = self.start(Some(&namespace), &vm.spec.name)?;
        debug_assert_eq!(record.state, VmState::Running);
        for (index, step) in vm.provision.iter().enumerate() {
            if let (Some(source), Some(dest)) = (&step.copy, &step.to) {
                self.copy_into(Some(&namespace), &record.id, source, dest)
                    .map_err(|err| ManagerError::Provision {
                        name: vm.spec.name.clone(),
                        step: index + 1,
                        argv: format!("copy {} to {dest}", source.display()),
                        status: err.to_string(),
                    })?;
                continue;
            }
            let request = ExecRequest {
                argv: step.run.clone(),
                env: step.env.clone().into_iter().collect(),
                cwd: step.workdir.clone(),
                ..ExecRequest::default()
            };
            let status = self.exec(
                Some(&namespace),
                &record.id,
                request,
                ExecIo::default(),
                sink,
            )?;
            if status != ExitStatus::Code(0) {
                return Err(ManagerError::Provision {
                    name: vm.spec.name.clone(),
                    step: index + 1,
                    argv: step.run.join(" "),
                    status: status.to_string(),
                });
            }
        }
        Ok(action)
    }

    /// Names of the VMs in `namespace` that carry the managed label.
    fn managed_in(&mut self, namespace: &str) -> Result<Vec<String>, ManagerError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|r| r.namespace == namespace && r.spec.labels.contains_key(MANAGED_LABEL))
            .map(|r| r.name)
            .collect())
    }
}
